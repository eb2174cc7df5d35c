"""Fine-tuning's K-fold CV score on boats16, on the heads' folds, so it can compete in CV selection (issue 4).

Run by hand, not in CI (about 75 minutes on 2 CPU cores for 5 folds at 120x400):
    uv run python benchmarks/finetune_cv.py [--data ../shared/data/boats16] [--cv 5]
        [--heads benchmarks/results/beat_seed_lda_tta_cv5.json] [--final benchmarks/results/beat_seed_finetune_valid.json]

`transferlab run --methods all,finetune --cv K` does the same inside one study (`finetune.cross_val_predict`);
this script runs it alone, fold by fold, saving progress after each fold (rerun to continue), because the
heads' CV scores already exist (--heads: a `beat_seed.py --cv K` result on the same data, seed and folds).
1. Pooled out-of-fold scores of `finetune` (fixed options, as in `beat_seed.py --finetune`) over train + valid.
2. The CV ranking of the heads (--heads) with `finetune` added; the selected method is the best by macro-F1.
3. Only then the test numbers of the selected method, from --final (the run that fitted `finetune` on train
   with the same options, and every head) or --heads, checked against issue 4's target.
Writes benchmarks/results/finetune_cv.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from beat_seed import target_checks  # noqa: E402  (issue 4's target, as beat_seed.py checks it)

from transferlab.data.datasets import discover  # noqa: E402
from transferlab.evaluation.selection import select_method  # noqa: E402
from transferlab.features.backbones import load_backbone, parse_size  # noqa: E402
from transferlab.finetune.tuner import cross_val_predict  # noqa: E402
from transferlab.heads.search import score  # noqa: E402
from transferlab.study import StudyConfig, extract_splits  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/boats16")
    ap.add_argument("--input-size", default="120x400")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cv", type=int, default=5)
    ap.add_argument("--unfreeze", default="2")
    ap.add_argument("--ft-epochs", type=int, default=6)
    ap.add_argument("--warmup-epochs", type=float, default=0.5)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--heads", default=str(RESULTS / "beat_seed_lda_tta_cv5.json"))
    ap.add_argument("--final", default=str(RESULTS / "beat_seed_finetune_valid.json"))
    ap.add_argument("--out", default="/tmp/finetune_cv", help="fold logs and the progress file")
    args = ap.parse_args()
    heads = json.loads(Path(args.heads).read_text())
    assert heads["options"]["cv"] == args.cv and heads["seed"] == args.seed, "--heads must use the same folds"

    ft = {
        "unfreeze": args.unfreeze,
        "epochs": args.ft_epochs,
        "warmup_epochs": args.warmup_epochs,
        "label_smoothing": args.label_smoothing,
        "patience": 0,
    }
    cfg = StudyConfig(
        data=args.data,
        out=args.out,
        input_size=parse_size(args.input_size),
        seed=args.seed,
        cv=args.cv,
        finetune=ft,
        progress=False,
    )
    ds = discover(cfg.data, seed=cfg.seed, valid_fraction=cfg.valid_fraction, test_fraction=cfg.test_fraction)
    bb = load_backbone(cfg.backbone, input_size=cfg.input_size)
    splits, _ = extract_splits(cfg, ds, bb)
    tr, va = splits["train"], splits["valid"]
    paths, y = list(tr.paths) + list(va.paths), np.concatenate([tr.y, va.y])
    X = np.concatenate([tr.X, va.X])

    progress = Path(args.out) / "progress.json"
    state = json.loads(progress.read_text()) if progress.exists() else {}
    if state.get("options") != {**ft, "cv": args.cv, "seed": args.seed, "n": len(y)}:
        state = {"options": {**ft, "cv": args.cv, "seed": args.seed, "n": len(y)}, "pred": [-1] * len(y), "folds": {}}
    pred = np.asarray(state["pred"], dtype=y.dtype)
    todo = [i for i in range(args.cv) if str(i) not in state["folds"]]

    def save(i, p):
        nonlocal t0
        state["pred"], state["folds"][str(i)] = p.tolist(), time.perf_counter() - t0
        progress.parent.mkdir(parents=True, exist_ok=True)
        progress.write_text(json.dumps(state))
        print(f"fold {i} done in {state['folds'][str(i)]:.0f} s", flush=True)
        t0 = time.perf_counter()

    t0 = time.perf_counter()
    if todo:
        new = cross_val_predict(cfg, paths, y, X, bb, folds=todo, on_fold=save)
        pred = np.where(new >= 0, new, pred)
    assert (pred >= 0).all(), "some folds have no predictions"
    cv_scores = score(y, pred)

    scores = dict(heads["study"]["selection"]["scores"])
    scores["finetune"] = cv_scores
    selection = select_method(scores, "macro_f1")
    chosen = selection["method"]
    ranking = sorted(((m, s["macro_f1"]) for m, s in scores.items()), key=lambda t: -t[1])
    print(f"finetune {args.cv}-fold CV: " + ", ".join(f"{k} {v:.3f}" for k, v in cv_scores.items()))
    print("CV ranking: " + ", ".join(f"{m} {v:.3f}" for m, v in ranking))
    print(f"selected: {chosen}")

    # test numbers only now, after selection
    final = json.loads(Path(args.final).read_text())
    source = final if chosen == "finetune" else heads
    sel = source["study"]["methods"][chosen]
    ci = source["study"]["ci"][chosen]
    checks = target_checks(sel, heads["seed_study"]["methods"])
    for k in ("accuracy", "macro_f1", "balanced_accuracy"):
        print(f"test {k}: {sel[k]:.3f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]")
    print("target: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in checks.items()))

    result = {
        "data": args.data,
        "input_size": args.input_size,
        "seed": args.seed,
        "cv": args.cv,
        "finetune": ft,
        "finetune_cv": cv_scores,
        "fold_seconds": state["folds"],
        "heads_from": args.heads,
        "ranking": ranking,
        "selected": chosen,
        "test_from": args.final if source is final else args.heads,
        "test": {k: sel[k] for k in ("accuracy", "macro_f1", "balanced_accuracy")},
        "ci": ci,
        "checks": checks,
        "met": all(checks.values()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "finetune_cv.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {RESULTS / 'finetune_cv.json'}")


if __name__ == "__main__":
    main()
