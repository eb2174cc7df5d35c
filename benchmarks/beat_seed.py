"""Benchmark: the selected method against the seed's two procedures on the seed's own data (issue 4).

Run by hand, not in CI:
    uv run python benchmarks/beat_seed.py [--data ../shared/data/boats16] [--input-size 120x400] [--tta]
                                          [--flip-train] [--cv K] [--finetune] [--tag NAME]

1. the seed's study as it was (softmax + SVM on plain features, `transferlab run` defaults);
2. `transferlab run --methods all` with the given options: every head, the one best on validation selected
   (validation split, or --cv K-fold CV over train + valid); test numbers computed once, after selection.
   With --finetune, end-to-end fine-tuning (`finetune`, its options below, fixed before the run) competes too,
   on the validation split (use it without --cv: fine-tuning has no K-fold score).
Prints a table (test accuracy / macro-F1 / balanced accuracy with bootstrap 95% intervals, McNemar p-values,
per-class recalls that changed most) and writes benchmarks/results/beat_seed[_TAG].json. The target
(macro-F1 >= 0.78, accuracy >= 0.91, never below the better seed procedure on either) is checked on test
numbers that played no part in any choice.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from transferlab.evaluation.metrics import bootstrap_ci
from transferlab.features.backbones import parse_size
from transferlab.report.format import markdown_table
from transferlab.study import StudyConfig, run_study

RESULTS = Path(__file__).parent / "results"
TARGET = {"macro_f1": 0.78, "accuracy": 0.91}


def _run(data, out, input_size, seed, **kw) -> tuple[dict, float]:
    cfg = StudyConfig(data=data, out=str(out), input_size=input_size, seed=seed, progress=False, **kw)
    t0 = time.perf_counter()
    return run_study(cfg), time.perf_counter() - t0


def target_checks(sel: dict, seed_methods: dict) -> dict[str, bool]:
    """Issue 4's target for the selected method's test metrics `sel`, against the seed procedures' own."""
    better = {k: max(seed_methods[s][k] for s in ("softmax", "svm")) for k in TARGET}
    checks = {f"{k} >= {v}": sel[k] >= v for k, v in TARGET.items()}
    checks.update({f"{k} >= better seed procedure ({better[k]:.3f})": sel[k] >= better[k] for k in TARGET})
    return checks


def _row(label: str, m: dict, ci: dict) -> list[str]:
    def cell(k):
        return f"{m[k]:.3f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]"

    return [
        label,
        cell("accuracy"),
        cell("macro_f1"),
        cell("balanced_accuracy"),
        f"{m['valid']['macro_f1']:.3f}" if m.get("valid") else "–",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/boats16")
    ap.add_argument("--input-size", default="120x400")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--flip-train", action="store_true")
    ap.add_argument("--cv", type=int, default=0)
    ap.add_argument("--select-metric", default="macro_f1")
    ap.add_argument("--finetune", action="store_true", help="add the `finetune` method to `all`")
    ap.add_argument("--unfreeze", default="2")
    ap.add_argument("--ft-epochs", type=int, default=6)
    ap.add_argument("--warmup-epochs", type=float, default=0.5)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--out", help="keep the two runs' report folders here (default: a temporary folder)")
    args = ap.parse_args()
    size = parse_size(args.input_size)
    if args.finetune and args.cv:
        ap.error("--finetune selects on the validation split: leave out --cv")
    with tempfile.TemporaryDirectory(prefix="beat_seed_") as tmp:
        root = Path(args.out or tmp)
        seed_m, seed_s = _run(args.data, root / "seed", size, args.seed)
        opts = dict(tta=args.tta, flip_train=args.flip_train, cv=args.cv, select_metric=args.select_metric)
        if args.finetune:
            opts["finetune"] = {
                "unfreeze": args.unfreeze,
                "epochs": args.ft_epochs,
                "warmup_epochs": args.warmup_epochs,
                "label_smoothing": args.label_smoothing,
                "patience": 0,
            }
        methods = ["all", "finetune"] if args.finetune else ["all"]
        all_m, all_s = _run(args.data, root / "all", size, args.seed, methods=methods, **opts)

    n = len(seed_m["classes"])
    seed_ci = {}
    for name in ("softmax", "svm"):  # the seed run keeps no predictions in metrics.json: CIs from its confusion matrix
        cm = seed_m["methods"][name]["confusion_matrix"]
        y_true = [i for i, row in enumerate(cm) for j, c in enumerate(row) for _ in range(c)]
        y_pred = [j for i, row in enumerate(cm) for j, c in enumerate(row) for _ in range(c)]
        seed_ci[name] = bootstrap_ci(y_true, y_pred, n, 1000, args.seed)
    chosen = all_m["selected"]
    sel = all_m["methods"][chosen]
    checks = target_checks(sel, seed_m["methods"])

    rows = [["method", "test accuracy [95% CI]", "test macro-F1 [95% CI]", "test bal. acc. [95% CI]", "valid macro-F1"]]
    rows += [
        _row(f"seed {s} (plain features, as the seed)", seed_m["methods"][s], seed_ci[s]) for s in ("softmax", "svm")
    ]
    rows += [_row(f"{s} (this run's features)", all_m["methods"][s], all_m["ci"][s]) for s in ("softmax", "svm")]
    rows += [_row(f"**{chosen}** (selected)", sel, all_m["ci"][chosen])]
    print(markdown_table(rows))
    sc = all_m["selection"]
    print(
        f"\nselected {chosen} by {sc.get('protocol')} {sc['metric']}: "
        + ", ".join(f"{k} {v:.3f}" for k, v in sc["valid"].items())
    )
    print("ranking: " + ", ".join(f"{n_} {v:.3f}" for n_, v in sc["ranking"]))
    if sel.get("tuning"):
        print(f"chosen hyperparameters: {sel['tuning']['best_params']}")
    for k, t in all_m.get("mcnemar", {}).items():
        print(f"McNemar {k}: only first right {t['b']}, only second right {t['c']}, p = {t['p_value']:.3g}")
    rc = all_m.get("recall_changes")
    if rc:
        print(f"\nper-class recall, {rc['method']} vs {rc['baseline']} (this run), largest changes:")
        print(
            markdown_table(
                [["class", "support", rc["baseline"], rc["method"], "change"]]
                + [
                    [
                        r["class"],
                        str(r["support"]),
                        f"{r['baseline_recall']:.3f}",
                        f"{r['recall']:.3f}",
                        f"{r['change']:+.3f}",
                    ]
                    for r in rc["classes"][:8]
                ]
            )
        )
    print("\ntarget: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in checks.items()))

    RESULTS.mkdir(exist_ok=True)
    keep = (
        "accuracy",
        "macro_f1",
        "balanced_accuracy",
        "valid",
        "per_class",
        "tuning",
        "train_seconds",
        "predict_seconds",
        "details",
    )
    result = {
        "data": args.data,
        "input_size": args.input_size,
        "seed": args.seed,
        "options": opts,
        "seed_study": {
            "seconds": seed_s,
            "methods": {s: {k: seed_m["methods"][s].get(k) for k in keep} for s in ("softmax", "svm")},
            "ci": seed_ci,
        },
        "study": {
            "seconds": all_s,
            "selected": chosen,
            "selection": sc,
            "ci": all_m["ci"],
            "mcnemar": all_m.get("mcnemar"),
            "recall_changes": rc,
            "data_efficiency": all_m.get("data_efficiency"),
            "methods": {k: {f: v.get(f) for f in keep} for k, v in all_m["methods"].items()},
        },
        "target": TARGET,
        "checks": checks,
        "met": all(checks.values()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0]},
    }
    name = f"beat_seed{'_' + args.tag if args.tag else ''}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
