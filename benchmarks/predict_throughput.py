"""Prediction throughput of a saved bundle on the boats16 test images (issue 6), cold and cached.

Run by hand, not in CI:
    uv run transferlab run ../shared/data/boats16 --input-size 120x400 --out /tmp/boats_run   # makes the bundles
    uv run python benchmarks/predict_throughput.py --run /tmp/boats_run [--methods softmax,linear_svm]

For each bundle (default: softmax and the run's selected method), on the 1324 test images:
- cold: a fresh, empty feature cache, so every image is decoded and goes through the backbone;
- cached: the same call again, every feature from the cache (hash the files, look up, apply the head);
- CLI, cached: `transferlab predict ... --out CSV` as a subprocess, wall clock including Python start-up
  and imports, which dominate once features are cached;
- onnxruntime: the exported graph (backbone + head) on CPU, preprocessing from its metadata included
  (linear heads only).
images/s = test images / seconds of the prediction call (bundle loading timed separately).
Writes benchmarks/results/predict_throughput.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import transferlab
from transferlab.data.datasets import list_images
from transferlab.model.export import ExportError, export_onnx, preprocess
from transferlab.model.predict import predict_paths

RESULTS = Path(__file__).parent / "results"


def measure(bundle: Path, test_dir: Path, onnx: bool) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory(prefix="predict-bench-") as tmp:
        t0 = time.perf_counter()
        model = transferlab.load(bundle, cache_dir=Path(tmp) / "cache")
        rows["load_seconds"] = time.perf_counter() - t0
        for phase in ("cold", "cached"):
            p = predict_paths(model, [test_dir], progress=False)
            rows[phase] = {
                "images": len(p.paths),
                "seconds": p.seconds,
                "images_per_second": p.images_per_second,
                "through_backbone": p.computed,
                "from_cache": p.from_cache,
            }
        rows["precision"] = model.config.get("precision")
        csv_out = Path(tmp) / "preds.csv"
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "transferlab.cli",
                "predict",
                str(bundle),
                str(test_dir),
                "--out",
                str(csv_out),
                "--cache-dir",
                str(Path(tmp) / "cache"),
                "--no-progress",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - t0
        rows["cli_cached"] = {"images": p.paths.__len__(), "seconds": wall, "images_per_second": len(p.paths) / wall}
        if onnx:
            try:
                path = export_onnx(model, Path(tmp) / "model.onnx")
            except ExportError as exc:
                rows["onnxruntime"] = {"skipped": str(exc)[:120]}
            else:
                import onnxruntime as ort

                sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                meta = sess.get_modelmeta().custom_metadata_map
                paths = [str(q) for q in list_images(test_dir)]
                t0 = time.perf_counter()
                for i in range(0, len(paths), 64):
                    sess.run(None, {"image": preprocess(paths[i : i + 64], meta)})
                s = time.perf_counter() - t0
                rows["onnxruntime"] = {"images": len(paths), "seconds": s, "images_per_second": len(paths) / s}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="/tmp/boats_run", help="a `transferlab run` folder on boats16 (with models/)")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/boats16"))
    ap.add_argument("--methods", help="comma-separated bundles under RUN/models (default: softmax + selected)")
    ap.add_argument("--no-onnx", action="store_true")
    args = ap.parse_args()
    run = Path(args.run)
    metrics = json.loads((run / "metrics.json").read_text())
    methods = args.methods.split(",") if args.methods else list(dict.fromkeys(["softmax", metrics.get("selected")]))
    methods = [m for m in methods if m and (run / "models" / m).is_dir()]
    test_dir = Path(args.data) / "test"
    results = {
        "data": str(test_dir),
        "run": str(run),
        "backbone": metrics["backbone"],
        "input_size": metrics["input_size"],
        "selected": metrics.get("selected"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        },
        "methods": {},
    }
    for m in methods:
        print(f"measuring {m} ...", flush=True)
        results["methods"][m] = measure(run / "models" / m, test_dir, onnx=not args.no_onnx)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "predict_throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{metrics['backbone']} {'x'.join(map(str, metrics['input_size']))}, {results['machine']['cpus']} CPUs")
    print(f"{'method':<14} {'phase':<14} {'images':>7} {'seconds':>9} {'images/s':>10}")
    for m, r in results["methods"].items():
        print(f"{m:<14} {'load bundle':<14} {'':>7} {r['load_seconds']:>9.2f} {'':>10}")
        for phase in ("cold", "cached", "cli_cached", "onnxruntime"):
            row = r.get(phase)
            if row and "seconds" in row:
                print(
                    f"{m:<14} {phase:<14} {row['images']:>7} {row['seconds']:>9.2f} {row['images_per_second']:>10.1f}"
                )
    print(f"wrote {RESULTS / 'predict_throughput.json'}")


if __name__ == "__main__":
    main()
