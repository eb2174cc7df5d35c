"""report.md: the study's report as markdown, written from metrics.json's keys and the run's figure paths.

`render_markdown` lays out every section (setup, images per class, results, per-class tables, selection
and statistics and leakage from sections.py, timings, trained models, plots, findings, notes); `findings`
writes the short sentences that report.md's "Findings" and report.html's headline share.
"""

from __future__ import annotations

from pathlib import Path

from . import sections
from .format import markdown_table, number, seconds

SEED_RESULTS = {  # the seed report, ResNet50 (torchvision) at 800x240, same boats test set
    "softmax": {"accuracy": 0.786, "macro_f1": 0.359, "train_seconds": 13 * 60 + 52},
    "svm": {"accuracy": 0.872, "macro_f1": 0.556, "train_seconds": 18},
}


def findings(metrics: dict, classes: list[str]) -> list[str]:
    """Short sentences written from the numbers."""
    methods = metrics["methods"]
    scored = {n: m for n, m in methods.items() if m.get("accuracy") is not None}
    if not scored:
        return ["No test split: only validation numbers are available."]
    lines = []
    best_acc = max(scored, key=lambda n: scored[n]["accuracy"])
    best_f1 = max(scored, key=lambda n: scored[n]["macro_f1"])
    fastest = min(scored, key=lambda n: scored[n]["train_seconds"])
    lines.append(
        f"Highest test accuracy: **{best_acc}** ({scored[best_acc]['accuracy']:.3f}); highest macro-F1: "
        f"**{best_f1}** ({scored[best_f1]['macro_f1']:.3f}); fastest to train: **{fastest}** "
        f"({seconds(scored[fastest]['train_seconds'])})."
    )
    for n, m in scored.items():
        zero = [c for c, r in m["per_class"].items() if r["recall"] == 0]
        gap = m["accuracy"] - m["macro_f1"]
        text = f"{n}: accuracy exceeds macro-F1 by {gap:.3f}"
        text += (
            f"; zero recall on {len(zero)} of {len(m['per_class'])} test classes ({', '.join(zero)})"
            if zero
            else "; every test class is recalled at least once"
        )
        lines.append(text + ".")
    counts = metrics["counts"].get("train", {})
    if counts:
        big, small = max(counts.values()), max(1, min(v for v in counts.values() if v))
        lines.append(
            f"Imbalance: the largest training class has {big} images, the smallest {small} "
            f"(ratio {big / small:.0f}:1); classes with fewer than 30 training images: "
            f"{', '.join(c for c, v in counts.items() if v < 30) or 'none'}."
        )
    return lines


STAGE_NOTES = {
    "extract": "the whole extraction stage: hashing, cache lookups, forward passes (views too)",
    "heads": "fitting every method (tuning grids, CV folds, fine-tuning), loading cached heads",
    "analysis": "selection, data efficiency, bootstrap intervals, McNemar, leakage check",
}


def render_markdown(metrics: dict, figures: dict) -> str:
    classes, methods = metrics["classes"], metrics["methods"]
    ex = metrics["extract"]
    md = [f"# transferlab study: {Path(str(metrics['config']['data'])).name}", ""]
    md += [
        "## Setup",
        "",
        markdown_table(
            [
                ["item", "value"],
                ["data", str(metrics["config"]["data"])],
                ["images (train / valid / test)", f"{metrics['n_train']} / {metrics['n_valid']} / {metrics['n_test']}"],
                ["classes", str(len(classes))],
                ["backbone", f"{metrics['backbone']} ({metrics['weights']})"],
                ["input size (H x W)", "x".join(map(str, metrics["input_size"]))],
                [
                    "preprocessing",
                    f"mean {metrics['preprocessing']['mean']}, std {metrics['preprocessing']['std']}, "
                    f"{metrics['preprocessing']['interpolation']}, whole image resized",
                ],
                ["precision / device", f"{ex['precision']} / {ex['device']}"],
                ["seed", str(metrics["seed"])],
                ["versions", ", ".join(f"{k} {v}" for k, v in metrics["versions"].items())],
                [
                    "machine",
                    f"{metrics['machine']['processor']}, {metrics['machine']['cpus']} CPUs"
                    + (f", {metrics['machine']['gpu']}" if "gpu" in metrics["machine"] else ""),
                ],
            ]
        ),
        "",
    ]
    splits = [s for s in ("train", "valid", "test") if s in metrics["counts"]]
    rows = [["index", "class", *splits]]
    rows += [[str(i), c, *[str(metrics["counts"][s][c]) for s in splits]] for i, c in enumerate(classes)]
    rows.append(["", "total", *[str(sum(metrics["counts"][s].values())) for s in splits]])
    md += ["### Images per class", "", markdown_table(rows), ""]
    md += [f"![{t}]({f})" for t, f in figures["data"]] + [""]

    chosen_on, scores = sections.selection_column(metrics)  # the score "selected" was chosen on, if not valid's
    cv = [chosen_on] if chosen_on.startswith("CV") else []
    md += [
        "## Results (test set)",
        "",
        markdown_table(
            [
                [
                    "method",
                    "accuracy",
                    "macro-F1",
                    "weighted F1",
                    "balanced acc.",
                    *cv,
                    "valid macro-F1",
                    "train",
                    "predict",
                ]
            ]
            + [
                [
                    n + (" (selected)" if n == metrics.get("selected") else ""),
                    number(m["accuracy"]),
                    number(m["macro_f1"]),
                    number(m["weighted_f1"]),
                    number(m["balanced_accuracy"]),
                    *([number(scores[n])] if cv else []),
                    number(m.get("valid", {}).get("macro_f1")),
                    seconds(m["train_seconds"]),
                    seconds(m["predict_seconds"]),
                ]
                for n, m in methods.items()
            ]
        ),
        "",
    ]
    seed_rows = [
        [f"seed {n} (ResNet50, 800x240)", number(v["accuracy"]), number(v["macro_f1"]), seconds(v["train_seconds"])]
        for n, v in SEED_RESULTS.items()
    ]
    md += [
        "For reference, the seed report's numbers on the boats test set:",
        "",
        markdown_table([["method", "accuracy", "macro-F1", "train"]] + seed_rows),
        "",
    ]

    md += [
        "### Per-class results (test set)",
        "",
        "Rows are the classes present in the test set; averages are over "
        "those classes, as in the seed's tables. P = precision, R = recall.",
        "",
    ]
    scored = {n: m for n, m in methods.items() if m["per_class"]}
    if scored:
        header = ["class"] + [f"{n} {k}" for n in scored for k in ("P", "R", "F1")] + ["support"]
        present = list(next(iter(scored.values()))["per_class"])
        rows = [header]
        for c in present:
            first = next(iter(scored.values()))["per_class"][c]
            rows.append(
                [f"{first['index']} {c}"]
                + [number(scored[n]["per_class"][c][k]) for n in scored for k in ("precision", "recall", "f1")]
                + [str(first["support"])]
            )
        rows.append(
            ["accuracy"]
            + [v for n in scored for v in ("", "", number(scored[n]["accuracy"]))]
            + [str(metrics["n_test"])]
        )
        rows.append(
            ["macro F1 / balanced acc."]
            + [v for n in scored for v in ("", number(scored[n]["balanced_accuracy"]), number(scored[n]["macro_f1"]))]
            + [""]
        )
        md += [
            markdown_table(rows),
            "",
            "Each method's table in the seed's exact layout is in `methods/<method>/report.tsv`.",
            "",
        ]
    md += sections.selection_section(metrics, figures.get("selection", []))

    stages = metrics.get("timings") or {}
    md += [
        "## Timings",
        "",
        markdown_table(
            [
                ["step", "time", "notes"],
                *[[f"stage: {k}", seconds(v), STAGE_NOTES.get(k, "")] for k, v in stages.items()],
                [
                    "feature extraction (this run)",
                    seconds(ex["seconds"]),
                    f"{ex['computed']} computed, {ex['from_cache']} from cache, {number(ex['images_per_second'], 1)} images/s",
                ],
                [
                    "feature extraction (cold)",
                    seconds(ex["cold_seconds"]),
                    "backbone forward + decoding, as recorded in the cache when these features were computed",
                ],
                [
                    "feature extraction (fully cached)",
                    seconds(ex["cached_seconds"]),
                    f"{ex['images']} images, no forward pass",
                ],
                *[
                    [f"{n}: train", seconds(m["train_seconds"]), m.get("train_note", "on cached features")]
                    for n, m in methods.items()
                ],
                *[
                    [f"{n}: predict test", seconds(m["predict_seconds"]), f"{metrics['n_test']} images"]
                    for n, m in methods.items()
                ],
                *[
                    [
                        f"{n}: {m['cv']['k']}-fold CV",
                        seconds(m["cv"]["seconds"]),
                        "selection score: one fit per fold, on images",
                    ]
                    for n, m in methods.items()
                    if m.get("cv")
                ],
            ]
        ),
        "",
        "Writing the report (bundles, tables, plots, report.html) and the total wall time are recorded in "
        "metrics.json (`timings`) and printed at the end of the run.",
        "",
    ]

    bundles = {n: m["bundle"] for n, m in methods.items() if m.get("bundle")}
    if bundles:
        md += [
            "## Trained models",
            "",
            "Each method is saved as a bundle (config.json + safetensors or skops, no pickle): "
            "`transferlab predict BUNDLE IMAGES... --out preds.csv`, `transferlab.load(BUNDLE).predict(images)`, "
            "`transferlab export BUNDLE --onnx model.onnx` (linear heads).",
            "",
            markdown_table(
                [["method", "bundle"]]
                + [[n + (" (selected)" if n == metrics.get("selected") else ""), f"`{b}`"] for n, b in bundles.items()]
            ),
            "",
        ]
    if figures["curves"] or figures["confusion"]:
        md += ["## Plots", ""] + [f"![{t}]({f})" for t, f in figures["curves"] + figures["confusion"]] + [""]
        if len(classes) > sections.CONFUSION_ALL_MAX and len(metrics["methods"]) > 1:
            md += [
                f"With {len(classes)} classes only the selected method's confusion matrix is drawn; every method's "
                "per-class precision, recall and F1 are in `methods/<method>/report.tsv`, its predictions in "
                "`predictions.csv`.",
                "",
            ]
    if metrics.get("leakage"):
        md += sections.leakage_section(metrics["leakage"])
    md += ["## Findings", ""] + [f"- {line}" for line in findings(metrics, classes)] + [""]
    notes = list(metrics["notes"])
    if metrics["skipped"]:
        n = len(metrics["skipped"])
        notes.append(f"{n} unreadable image{'s' * (n != 1)} skipped:")
        notes += [f"  - `{s['path']}`: {s['reason']}" for s in metrics["skipped"][:50]]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" if not n.startswith("  ") else n for n in notes] + [""]
    return "\n".join(md)
