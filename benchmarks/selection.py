"""Benchmark: does the default `transferlab run` choose well on data it has never seen? (issue 16)

Run by hand, not in CI:
    uv run python benchmarks/selection.py [--data-root ../shared/data] [--datasets boats16,imagewoof10,...]
                                          [--cache-dir DIR] [--input-size HxW] [--time-budget 30s] [--tag NAME]
                                          [--flip-train] [--selection validation] [--repeats 3]

For each dataset: `transferlab run DATA` with the defaults (methods `auto`, selection by repeated CV over
train + valid, the aspect-aware input size unless --input-size), then, from its metrics.json:
- the selected method and why (its CV score and the SE of its gap to the best), its test accuracy / macro-F1 /
  balanced accuracy, and the seed procedures' (softmax, svm) on the same features;
- the best method in hindsight (test macro-F1) and the regret (hindsight-best test macro-F1 - selected's);
  the regret the one-SE rule (`evaluation.crossval`, rule="one_se") would have had, for comparison;
- the time split: extraction (cold, from the run's own `extract.cold_seconds`), heads (CV + final fits),
  analysis, report, total; and (heads + analysis) / cold extraction.
With `--repeats N` each dataset runs N times, each cold (a fresh feature and head cache): its row is the first
run's, with the median of each timing and of the (heads + analysis) / cold extraction ratios, each ratio measured
within one run (this 2-core machine's timings vary by 10-20% from run to run); `repeats` keeps every run's timings
and `same_choice` whether every run chose and scored the same.
Test labels are read here, after every run has finished: they played no part in any choice. Writes
benchmarks/results/selection[_TAG].json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
from pathlib import Path

from transferlab.evaluation.crossval import PREFERENCE
from transferlab.features.backbones import parse_size
from transferlab.report.format import markdown_table
from transferlab.study import StudyConfig, run_study

RESULTS = Path(__file__).parent / "results"
DATASETS = ("boats16", "imagewoof10", "brain_mri4", "intel_scenes6")


def summarise(name: str, m: dict) -> dict:
    """One dataset's row from a run's metrics.json."""
    sel = m["selection"]
    methods = m["methods"]
    chosen = m["selected"]
    cv = sel.get("cv") or {  # --selection validation: the validation scores in the CV columns, no SEs
        "best": chosen,
        "why": f"best validation {sel['metric']}",
        "within_one_se": [chosen],
        "methods": {n: {"score": {sel["metric"]: v}, "se": 0.0} for n, v in sel["ranking"]},
    }
    best_cv = cv["best"]
    rank = {n: PREFERENCE.index(n) if n in PREFERENCE else len(PREFERENCE) for n in cv["within_one_se"]}
    one_se = min(cv["within_one_se"], key=rank.get)  # what the one-SE rule (rule="one_se") would have chosen
    hindsight = max(methods, key=lambda n: methods[n]["macro_f1"])
    seeds = {s: methods[s] for s in ("softmax", "svm") if s in methods}
    t = m["timings"]
    cold = m["extract"].get("cold_seconds") or m["extract"]["seconds"]
    return {
        "dataset": name,
        "input_size": m["input_size"],
        "protocol": sel["protocol"],
        "selected": chosen,
        "why": cv["why"],
        "cv": {n: {"score": r["score"][sel["metric"]], "se": r["se"]} for n, r in cv["methods"].items()},
        "test": {n: {k: methods[n][k] for k in ("accuracy", "macro_f1", "balanced_accuracy")} for n in methods},
        "hindsight": hindsight,
        "regret": methods[hindsight]["macro_f1"] - methods[chosen]["macro_f1"],
        "best_cv": best_cv,
        "one_se": one_se,
        "regret_one_se_rule": methods[hindsight]["macro_f1"] - methods[one_se]["macro_f1"],
        "seed_best_macro_f1": max((s["macro_f1"] for s in seeds.values()), default=None),
        "seed_best_accuracy": max((s["accuracy"] for s in seeds.values()), default=None),
        "timings": {**t, "extract_cold": cold},
        "heads_analysis_over_cold_extract": (t["heads"] + t["analysis"]) / cold if cold else None,
    }


def with_medians(runs: list[dict]) -> dict:
    """The first run's row, its timings and ratio replaced by the medians over `runs` (rows of one dataset)."""
    row = dict(runs[0])
    row["repeats"] = [
        {"timings": r["timings"], "heads_analysis_over_cold_extract": r["heads_analysis_over_cold_extract"]}
        for r in runs
    ]
    row["timings"] = {k: statistics.median(r["timings"][k] for r in runs) for k in runs[0]["timings"]}
    row["heads_analysis_over_cold_extract"] = statistics.median(r["heads_analysis_over_cold_extract"] for r in runs)
    row["same_choice"] = all(r["selected"] == runs[0]["selected"] and r["test"] == runs[0]["test"] for r in runs)
    return row


def _why(r: dict) -> str:
    """The selected method's CV score and the runner-up's with the SE of their gap (the selected's own SE of its gap
    to the best is 0 by definition: it said nothing)."""
    s, cv = r["selected"], r["cv"]
    others = sorted((n for n in cv if n != s), key=lambda n: -cv[n]["score"])
    if not others:
        return f"{s} ({cv[s]['score']:.3f})"
    n = others[0]
    return f"{s} ({cv[s]['score']:.3f}; {n} {cv[n]['score']:.3f}, SE {cv[n]['se']:.3f})"


def table(rows: list[dict]) -> str:
    head = [
        "dataset",
        "input",
        "selected (CV macro-F1; runner-up, SE of the gap)",
        "test acc / macro-F1 / bal. acc",
        "seed softmax / svm macro-F1",
        "hindsight best (macro-F1)",
        "regret",
        "regret of the one-SE rule",
        "extract (cold) / heads / analysis / report / total s",
        "(heads+analysis) / extract",
    ]
    out = [head]
    for r in rows:
        s, t = r["selected"], r["timings"]
        te = r["test"][s]
        out.append(
            [
                r["dataset"],
                "x".join(map(str, r["input_size"])),
                _why(r),
                f"{te['accuracy']:.3f} / {te['macro_f1']:.3f} / {te['balanced_accuracy']:.3f}",
                " / ".join(f"{r['test'][n]['macro_f1']:.3f}" for n in ("softmax", "svm") if n in r["test"]),
                f"{r['hindsight']} ({r['test'][r['hindsight']]['macro_f1']:.3f})",
                f"{r['regret']:.3f}",
                f"{r['regret_one_se_rule']:.3f} ({r['one_se']})",
                f"{t['extract_cold']:.0f} / {t['heads']:.0f} / {t['analysis']:.0f} / {t['report']:.0f} / {t['total']:.0f}",
                f"{r['heads_analysis_over_cold_extract']:.2f}",
            ]
        )
    return markdown_table(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--cache-dir", default=None, help="feature cache (default: a fresh temporary folder: cold)")
    ap.add_argument("--input-size", default=None, help="force one HxW (default: the aspect-aware default)")
    ap.add_argument("--out", default=None, help="keep the runs' report folders here")
    ap.add_argument("--time-budget", default=None, help="pass --time-budget DURATION to every run (e.g. 30s)")
    ap.add_argument("--flip-train", action="store_true", help="pass --flip-train to every run (CV fits both views)")
    ap.add_argument("--selection", default="auto", help="pass --selection (e.g. validation, to compare)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per dataset, each cold in a fresh cache (medians)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if args.repeats > 1 and args.cache_dir:
        ap.error("--repeats runs every dataset cold in fresh caches: leave out --cache-dir")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            runs = []
            for i in range(args.repeats):
                cfg = StudyConfig(
                    data=str(Path(args.data_root) / name),
                    out=str(Path(args.out or tmp) / name),
                    cache_dir=args.cache_dir or str(Path(tmp) / f"cache{i}"),
                    input_size=parse_size(args.input_size),
                    progress=False,
                    time_budget=args.time_budget,
                    flip_train=args.flip_train,
                    selection=args.selection,
                )
                runs.append(summarise(name, run_study(cfg)))
                if args.repeats > 1:
                    shutil.rmtree(Path(tmp) / f"cache{i}", ignore_errors=True)
            rows.append(with_medians(runs) if len(runs) > 1 else runs[0])
            print(table(rows[-1:]), flush=True)
    regrets = [r["regret"] for r in rows]
    summary = {
        "max_regret": max(regrets),
        "mean_regret": sum(regrets) / len(regrets),
        "mean_regret_one_se_rule": sum(r["regret_one_se_rule"] for r in rows) / len(rows),
        "max_regret_one_se_rule": max(r["regret_one_se_rule"] for r in rows),
        "never_below_seed_macro_f1": all(
            r["test"][r["selected"]]["macro_f1"] >= r["seed_best_macro_f1"] for r in rows if r["seed_best_macro_f1"]
        ),
        "accuracy_within_0.01_of_seed": all(
            r["test"][r["selected"]]["accuracy"] >= r["seed_best_accuracy"] - 0.01
            for r in rows
            if r["seed_best_accuracy"]
        ),
    }
    print(table(rows))
    print(json.dumps(summary, indent=1))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"selection{'_' + args.tag if args.tag else ''}.json"
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()}
    summary["repeats"] = args.repeats
    path.write_text(json.dumps({"machine": machine, "rows": rows, "summary": summary}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
