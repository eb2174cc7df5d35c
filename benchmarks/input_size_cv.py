"""Benchmark: choose the backbone's input size by K-fold CV on train + valid, never test (issue 4).

Run by hand, not in CI:
    uv run python benchmarks/input_size_cv.py [--data ../shared/data/boats16] [--sizes 120x400,240x800]
                                              [--heads lda,logreg,svm_tuned] [--tta] [--cv 5]

For every input size, the train + valid features are extracted (cached, so `beat_seed.py` at the chosen size
reuses them), every listed head is tuned by `--cv`-fold CV exactly as `transferlab run --cv K` does, and its
best CV metrics are printed. The size whose best head scores highest (macro-F1) is the choice. Only train and
valid images are read: the test split plays no part. Writes benchmarks/results/input_size_cv[_TAG].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from transferlab.features.backbones import parse_size
from transferlab.heads import make_head
from transferlab.report.format import markdown_table

sys.path.insert(0, str(Path(__file__).parent))
from heads_grid import train_valid_features  # noqa: E402  (the same features the study uses)

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/boats16")
    ap.add_argument("--sizes", default="120x400,240x800", help="comma-separated HxW")
    ap.add_argument("--heads", default="lda,logreg,svm_tuned")
    ap.add_argument("--tta", action="store_true", help="mean of plain and flipped features")
    ap.add_argument("--cv", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    rows = [
        [
            "input size",
            "head",
            "CV macro-F1",
            "CV accuracy",
            "CV bal. acc.",
            "chosen hyperparameters",
            "extract s",
            "tune s",
        ]
    ]
    out: dict[str, dict] = {}
    for text in args.sizes.split(","):
        size = parse_size(text)
        t0 = time.perf_counter()
        (Xtr, ytr), (Xva, yva) = train_valid_features(args.data, size, args.seed, args.tta)
        extract_s = time.perf_counter() - t0
        out[text] = {"extract_seconds": extract_s, "n": len(ytr) + len(yva), "heads": {}}
        for name in args.heads.split(","):
            t0 = time.perf_counter()
            est = make_head(name, seed=args.seed, cv=args.cv).fit(Xtr, ytr, eval_set=(Xva, yva))
            v = est.best_valid_
            out[text]["heads"][name] = {"cv": v, "best_params": est.best_params_, "seconds": time.perf_counter() - t0}
            rows.append(
                [
                    text,
                    name,
                    f"{v['macro_f1']:.3f}",
                    f"{v['accuracy']:.3f}",
                    f"{v['balanced_accuracy']:.3f}",
                    str(est.best_params_),
                    f"{extract_s:.0f}",
                    f"{time.perf_counter() - t0:.0f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    best = {s: max(h["cv"]["macro_f1"] for h in r["heads"].values()) for s, r in out.items()}
    chosen = max(best, key=best.get)
    print(markdown_table(rows))
    print(
        "\nbest CV macro-F1 per size: "
        + ", ".join(f"{s} {v:.3f}" for s, v in best.items())
        + f"\nchosen input size: {chosen} ({args.cv}-fold CV on train + valid; test not read)"
    )
    RESULTS.mkdir(exist_ok=True)
    result = {
        "data": args.data,
        "tta": args.tta,
        "cv": args.cv,
        "seed": args.seed,
        "sizes": out,
        "best_cv_macro_f1": best,
        "chosen": chosen,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0]},
    }
    path = RESULTS / f"input_size_cv{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
