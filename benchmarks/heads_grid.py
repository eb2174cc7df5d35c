"""Benchmark: every tuned head with its grid, on cached features (issue 4; goal <= 60 s on 2 CPU cores).

Run by hand, not in CI:  uv run python benchmarks/heads_grid.py [--data ../shared/data/boats16] [--input-size 120x400]
Features come from the cache (extracted first if missing). Each head is tuned exactly as in the study:
fit every grid point on train, score on the validation split, keep the best. Only validation numbers are
printed: this benchmark never reads the test split. Writes benchmarks/results/heads_grid.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from transferlab.data.datasets import discover
from transferlab.features.backbones import DEFAULT_BACKBONE, load_backbone, parse_size
from transferlab.features.extract import extract_features
from transferlab.heads import make_head, names
from transferlab.report.format import markdown_table

TUNED_HEADS = tuple(names("tuned"))

RESULTS = Path(__file__).parent / "results"


def train_valid_features(data: str, input_size, seed: int, tta: bool):
    ds = discover(data, seed=seed)
    bb = load_backbone(DEFAULT_BACKBONE, input_size=input_size)
    paths = [s.path for s in ds.samples if s.split in ("train", "valid")]
    ex = extract_features(paths, bb, progress=False)
    X = ex.features
    if tta:
        X = (X + extract_features(paths, bb, progress=False, view="hflip").features) / 2
    split = {s.path: s for s in ds.samples}
    y = np.array([split[p].label for p in ex.paths])
    is_train = np.array([split[p].split == "train" for p in ex.paths])
    return (X[is_train], y[is_train]), (X[~is_train], y[~is_train])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/boats16")
    ap.add_argument("--input-size", default="120x400")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tta", action="store_true", help="mean of plain and flipped features")
    ap.add_argument("--heads", default=",".join(TUNED_HEADS))
    ap.add_argument("--jobs", type=int, default=1, help="processes per search (ValidationSearch n_jobs)")
    args = ap.parse_args()
    (Xtr, ytr), (Xva, yva) = train_valid_features(args.data, parse_size(args.input_size), args.seed, args.tta)
    print(f"train {Xtr.shape}, valid {Xva.shape}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    rows, out = [], {}
    total0 = time.perf_counter()
    for name in args.heads.split(","):
        est = make_head(name, seed=args.seed).set_params(n_jobs=args.jobs)
        t0 = time.perf_counter()
        est.fit(Xtr, ytr, eval_set=(Xva, yva))
        seconds = time.perf_counter() - t0
        s = est.summary()
        out[name] = {
            "seconds": seconds,
            "grid_points": s["grid_points"],
            "failed": s["failed"],
            "best_params": s["best_params"],
            "valid": s["valid"],
        }
        rows.append(
            [
                name,
                str(s["grid_points"]),
                f"{seconds:.1f}",
                f"{s['valid']['macro_f1']:.3f}",
                f"{s['valid']['accuracy']:.3f}",
                f"{s['valid']['balanced_accuracy']:.3f}",
                ", ".join(f"{k.split('__')[-1]}={v}" for k, v in s["best_params"].items()),
            ]
        )
        print(f"{name}: {seconds:.1f} s", flush=True)
    total = time.perf_counter() - total0
    rows.append(
        [
            "all heads",
            str(sum(v["grid_points"] for v in out.values())),
            f"{total:.1f}",
            "",
            "",
            "",
            f"goal <= 60 s: {'met' if total <= 60 else 'missed'}",
        ]
    )
    print(
        markdown_table(
            [["head", "grid points", "seconds", "valid macro-F1", "valid acc", "valid bal. acc", "chosen"], *rows]
        )
    )
    RESULTS.mkdir(exist_ok=True)
    result = {
        "data": args.data,
        "input_size": args.input_size,
        "seed": args.seed,
        "tta": args.tta,
        "jobs": args.jobs,
        "n_train": len(ytr),
        "n_valid": len(yva),
        "dims": int(Xtr.shape[1]),
        "total_seconds": total,
        "goal_seconds": 60,
        "met": total <= 60,
        "heads": out,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1min": os.getloadavg()[0],
        },
    }
    name = f"heads_grid{'_tta' if args.tta else ''}{f'_jobs{args.jobs}' if args.jobs != 1 else ''}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
