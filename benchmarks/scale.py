"""Benchmark: time and peak memory of the default run at 2k, 20k and 50k training images (issue 16, item 5).

Run by hand, not in CI:
    uv run python benchmarks/scale.py [--sizes 2000,20000,50000] [--classes 10] [--side 64] [--tag NAME]

For each size: a generated 10-class set of 64x64 JPEGs (a class-dependent colour and stripe under noise; the
test split is a tenth of train), then `transferlab run DIR --input-size 64x64` with every other default (methods
`auto`, repeated-CV selection) in a fresh process. Records the stages' times from metrics.json and the peak
resident memory of the largest process (the run or one of its fold workers: getrusage of the waited-for
children), and which methods stepped aside. Writes benchmarks/results/scale[_TAG].json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from transferlab.report.format import markdown_table

RESULTS = Path(__file__).parent / "results"


def generate(root: Path, n_train: int, classes: int, side: int, seed: int = 0) -> Path:
    """train/<class>/*.jpg (n_train, balanced) and test/<class>/*.jpg (a tenth), each image telling its class
    by colour and stripe frequency under heavy noise, so heads have something to learn but not everything."""
    rng = np.random.default_rng(seed)
    xx = np.arange(side)[None, :, None]
    for split, n in (("train", n_train), ("test", max(classes, n_train // 10))):
        for i in range(n):
            c = i % classes
            colour = np.array([(c * 97) % 256, (c * 57 + 80) % 256, (c * 23 + 160) % 256], dtype=np.float32)
            stripes = 40 * np.sin(xx * (0.2 + 0.07 * c))
            img = 0.5 * colour + stripes + rng.normal(0, 60, (side, side, 3))
            path = root / split / f"c{c:02d}" / f"{i:06d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return root


def run_one(data: Path, out: Path, cache: Path, side: int) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "transferlab.cli", "run", str(data), "--out", str(out), "--cache-dir", str(cache)]
    cmd += ["--input-size", f"{side}x{side}", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run failed on {data}:\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, the largest child so far
    m = json.loads((out / "metrics.json").read_text())
    sel = m["selection"]
    return {
        "n_train": m["n_train"],
        "n_valid": m["n_valid"],
        "n_test": m["n_test"],
        "timings": m["timings"],
        "wall_seconds": wall,
        "peak_rss_mib": peak / 1024,  # sizes run in increasing order: the largest child so far is this run's
        "selected": m["selected"],
        "protocol": sel["protocol"],
        "stepped_aside": sel.get("cv", {}).get("stepped_aside", {}),
        "test_macro_f1": m["methods"][m["selected"]]["macro_f1"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,20000,50000")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    rows, table = (
        [],
        [
            [
                "training images",
                "extract",
                "heads",
                "analysis",
                "report",
                "total s",
                "peak RSS MiB",
                "stepped aside",
                "selected (test macro-F1)",
            ]
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            data = generate(Path(tmp) / f"data{n}", n, args.classes, args.side)
            r = {"generated_train": n, **run_one(data, Path(tmp) / f"run{n}", Path(tmp) / f"cache{n}", args.side)}
            rows.append(r)
            t = r["timings"]
            table.append(
                [
                    f"{n} ({r['n_train']} train + {r['n_valid']} valid)",
                    f"{t['extract']:.0f}",
                    f"{t['heads']:.0f}",
                    f"{t['analysis']:.0f}",
                    f"{t['report']:.0f}",
                    f"{t['total']:.0f}",
                    f"{r['peak_rss_mib']:.0f}",
                    ", ".join(r["stepped_aside"]) or "–",
                    f"{r['selected']} ({r['test_macro_f1']:.3f})",
                ]
            )
            print(markdown_table(table[:1] + table[-1:]), flush=True)
    print(markdown_table(table))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"scale{'_' + args.tag if args.tag else ''}.json"
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()}
    path.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
