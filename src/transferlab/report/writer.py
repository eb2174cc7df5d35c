"""Report: metrics.json, report.md, per-class tables, history CSVs and plots for one study."""

from __future__ import annotations

import csv
import json
import os
import platform
from pathlib import Path

import numpy as np

from .. import __version__
from . import plots, sections
from ..evaluation.metrics import format_report
from .format import markdown_table, number, seconds

SEED_RESULTS = {  # the seed report, ResNet50 (torchvision) at 800x240, same boats test set
    "softmax": {"accuracy": 0.786, "macro_f1": 0.359, "train_seconds": 13 * 60 + 52},
    "svm": {"accuracy": 0.872, "macro_f1": 0.556, "train_seconds": 18},
}


def versions() -> dict:
    import lightning
    import sklearn
    import timm
    import torch
    return {"transferlab": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "scikit-learn": sklearn.__version__, "lightning": lightning.__version__}


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "device": device}
    if device.startswith("cuda"):
        import torch
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def method_metrics(res: dict) -> dict:
    test = res.get("test", {})
    m = {k: test.get(k) for k in ("accuracy", "macro_f1", "weighted_f1", "balanced_accuracy")}
    m.update(train_seconds=res["train_seconds"], predict_seconds=res.get("predict_seconds"),
             per_class=test.get("per_class", {}), confusion_matrix=test.get("confusion_matrix"))
    if "valid" in res:
        m["valid"] = {k: res["valid"][k] for k in ("accuracy", "macro_f1", "balanced_accuracy")}
    m["train_note"] = res.get("train_note", "on cached features")
    m["head_from_cache"] = bool(res.get("cached_head"))
    if "bundle" in res:  # the saved model (bundle.py), for `transferlab predict` and transferlab.load
        m["bundle"] = res["bundle"]
    if "details" in res:  # e.g. fine-tuning: epochs run, images/s, checkpoints
        m["details"] = res["details"]
    if "cv" in res:  # fine-tuning under --cv K: its own pooled out-of-fold scores and their cost
        m["cv"] = res["cv"]
    est = res["estimator"]
    m["params"] = {k: v for k, v in est.get_params(deep=False).items() if isinstance(v, (int, float, str, bool, type(None)))}
    if hasattr(est, "best_params_"):  # a tuned head (selection.ValidationSearch): what it chose, from what
        m["tuning"] = est.summary()
    return m


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
    lines.append(f"Highest test accuracy: **{best_acc}** ({scored[best_acc]['accuracy']:.3f}); highest macro-F1: "
                 f"**{best_f1}** ({scored[best_f1]['macro_f1']:.3f}); fastest to train: **{fastest}** "
                 f"({seconds(scored[fastest]['train_seconds'])}).")
    for n, m in scored.items():
        zero = [c for c, r in m["per_class"].items() if r["recall"] == 0]
        gap = m["accuracy"] - m["macro_f1"]
        text = f"{n}: accuracy exceeds macro-F1 by {gap:.3f}"
        text += f"; zero recall on {len(zero)} of {len(m['per_class'])} test classes ({', '.join(zero)})" if zero else "; every test class is recalled at least once"
        lines.append(text + ".")
    counts = metrics["counts"].get("train", {})
    if counts:
        big, small = max(counts.values()), max(1, min(v for v in counts.values() if v))
        lines.append(f"Imbalance: the largest training class has {big} images, the smallest {small} "
                     f"(ratio {big / small:.0f}:1); classes with fewer than 30 training images: "
                     f"{', '.join(c for c, v in counts.items() if v < 30) or 'none'}.")
    return lines


def write(out: Path, *, cfg: dict, dataset, backbone, splits, extract: dict, results: dict,
          analysis: dict | None = None, leakage: dict | None = None) -> dict:
    classes = dataset.classes
    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "backbone": backbone.name, "weights": backbone.weights, "weights_digest": backbone.weights_digest,
        "input_size": list(backbone.input_size), "preprocessing": backbone.preprocessing(),
        "seed": cfg["seed"], "classes": classes,
        "n_train": len(splits["train"].y), "n_valid": len(splits["valid"].y), "n_test": len(splits["test"].y),
        "counts": dataset.counts(),
        "extract": {k: v for k, v in extract.items() if k != "skipped"},
        "skipped": extract["skipped"], "notes": dataset.notes,
        "methods": {n: method_metrics(r) for n, r in results.items()},
        "versions": versions(), "machine": machine(extract["device"]),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        **(analysis or {}),  # selected, selection, ci, mcnemar, data_efficiency, recall_changes (analysis.py)
        **({"leakage": leakage} if leakage is not None else {}),  # duplicates across splits (leakage.py)
    }
    figures = _plots(out, metrics, results, classes)
    figures["selection"] = sections.selection_figures(out, metrics)
    for name, res in results.items():
        if "test" in res:
            (out / f"{name}_report.tsv").write_text(format_report(res["test"], classes) + "\n")
        hist = getattr(res["estimator"], "history_", None)
        if hist:
            with open(out / f"{name}_history.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(list(hist))
                w.writerows(zip(*hist.values()))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    (out / "report.md").write_text(render_markdown(metrics, figures))
    from .html import write_html, write_predictions
    for name, res in results.items():
        if "test_pred" in res:
            write_predictions(out / f"{name}_predictions.csv", splits["test"], res, classes)
    write_html(out)  # report.html: report.md's sections, self-contained, plus mistakes and examples
    return metrics


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _plots(out: Path, metrics: dict, results: dict, classes: list[str]) -> dict[str, list[tuple[str, str]]]:
    figs: dict[str, list[tuple[str, str]]] = {"data": [], "curves": [], "confusion": []}
    p = plots.plot_class_distribution(metrics["counts"], classes, out / "class_distribution.png",
                                      title="Images per class and split")
    figs["data"].append(("Class distribution", p.name))
    for name, res in results.items():
        hist = getattr(res["estimator"], "history_", None)
        if hist:
            p = plots.plot_learning_curves(hist, out / f"{name}_learning_curves.png", title=f"{name}: learning curves")
            q = plots.plot_lr_schedule(hist, out / f"{name}_lr.png", title=f"{name}: learning rate")
            figs["curves"] += [(f"{name} learning curves", p.name), (f"{name} learning rate", q.name)]
        if "test" in res:
            p = plots.plot_confusion_matrix(np.array(res["test"]["confusion_matrix"]), classes,
                                            out / f"{name}_confusion.png", title=f"{name}: confusion matrix (test)")
            figs["confusion"].append((f"{name} confusion matrix", p.name))
    return figs


def render_markdown(metrics: dict, figures: dict) -> str:
    classes, methods = metrics["classes"], metrics["methods"]
    ex = metrics["extract"]
    md = [f"# transferlab study: {Path(str(metrics['config']['data'])).name}", ""]
    md += ["## Setup", "", markdown_table([
        ["item", "value"],
        ["data", str(metrics["config"]["data"])],
        ["images (train / valid / test)", f"{metrics['n_train']} / {metrics['n_valid']} / {metrics['n_test']}"],
        ["classes", str(len(classes))],
        ["backbone", f"{metrics['backbone']} ({metrics['weights']})"],
        ["input size (H x W)", "x".join(map(str, metrics["input_size"]))],
        ["preprocessing", f"mean {metrics['preprocessing']['mean']}, std {metrics['preprocessing']['std']}, "
                          f"{metrics['preprocessing']['interpolation']}, whole image resized"],
        ["precision / device", f"{ex['precision']} / {ex['device']}"],
        ["seed", str(metrics["seed"])],
        ["versions", ", ".join(f"{k} {v}" for k, v in metrics["versions"].items())],
        ["machine", f"{metrics['machine']['processor']}, {metrics['machine']['cpus']} CPUs"
                    + (f", {metrics['machine']['gpu']}" if "gpu" in metrics["machine"] else "")],
    ]), ""]
    splits = [s for s in ("train", "valid", "test") if s in metrics["counts"]]
    rows = [["index", "class", *splits]]
    rows += [[str(i), c, *[str(metrics["counts"][s][c]) for s in splits]] for i, c in enumerate(classes)]
    rows.append(["", "total", *[str(sum(metrics["counts"][s].values())) for s in splits]])
    md += ["### Images per class", "", markdown_table(rows), ""]
    md += [f"![{t}]({f})" for t, f in figures["data"]] + [""]

    md += ["## Results (test set)", "", markdown_table(
        [["method", "accuracy", "macro-F1", "weighted F1", "balanced acc.", "valid macro-F1", "train", "predict"]]
        + [[n + (" (selected)" if n == metrics.get("selected") else ""), number(m["accuracy"]), number(m["macro_f1"]),
            number(m["weighted_f1"]), number(m["balanced_accuracy"]),
            number(m.get("valid", {}).get("macro_f1")), seconds(m["train_seconds"]), seconds(m["predict_seconds"])]
           for n, m in methods.items()]), ""]
    seed_rows = [[f"seed {n} (ResNet50, 800x240)", number(v["accuracy"]), number(v["macro_f1"]), seconds(v["train_seconds"])]
                 for n, v in SEED_RESULTS.items()]
    md += ["For reference, the seed report's numbers on the boats test set:", "",
           markdown_table([["method", "accuracy", "macro-F1", "train"]] + seed_rows), ""]

    md += ["### Per-class results (test set)", "", "Rows are the classes present in the test set; averages are over "
           "those classes, as in the seed's tables. P = precision, R = recall.", ""]
    scored = {n: m for n, m in methods.items() if m["per_class"]}
    if scored:
        header = ["class"] + [f"{n} {k}" for n in scored for k in ("P", "R", "F1")] + ["support"]
        present = list(next(iter(scored.values()))["per_class"])
        rows = [header]
        for c in present:
            first = next(iter(scored.values()))["per_class"][c]
            rows.append([f"{first['index']} {c}"] + [number(scored[n]["per_class"][c][k]) for n in scored
                                                      for k in ("precision", "recall", "f1")] + [str(first["support"])])
        rows.append(["accuracy"] + [v for n in scored for v in ("", "", number(scored[n]["accuracy"]))] + [str(metrics["n_test"])])
        rows.append(["macro F1 / balanced acc."] + [v for n in scored for v in ("", number(scored[n]["balanced_accuracy"]), number(scored[n]["macro_f1"]))] + [""])
        md += [markdown_table(rows), "", "Each method's table in the seed's exact layout is in `<method>_report.tsv`.", ""]
    md += sections.selection_section(metrics, figures.get("selection", []))

    md += ["## Timings", "", markdown_table([
        ["step", "time", "notes"],
        ["feature extraction (this run)", seconds(ex["seconds"]),
         f"{ex['computed']} computed, {ex['from_cache']} from cache, {number(ex['images_per_second'], 1)} images/s"],
        ["feature extraction (cold)", seconds(ex["cold_seconds"]),
         "backbone forward + decoding, as recorded in the cache when these features were computed"],
        ["feature extraction (fully cached)", seconds(ex["cached_seconds"]), f"{ex['images']} images, no forward pass"],
        *[[f"{n}: train", seconds(m["train_seconds"]), m.get("train_note", "on cached features")] for n, m in methods.items()],
        *[[f"{n}: predict test", seconds(m["predict_seconds"]), f"{metrics['n_test']} images"] for n, m in methods.items()],
        *[[f"{n}: {m['cv']['k']}-fold CV", seconds(m["cv"]["seconds"]), "selection score: one fit per fold, on images"]
          for n, m in methods.items() if m.get("cv")],
    ]), ""]

    bundles = {n: m["bundle"] for n, m in methods.items() if m.get("bundle")}
    if bundles:
        md += ["## Trained models", "", "Each method is saved as a bundle (config.json + safetensors or skops, no pickle): "
               "`transferlab predict BUNDLE IMAGES... --out preds.csv`, `transferlab.load(BUNDLE).predict(images)`, "
               "`transferlab export BUNDLE --onnx model.onnx` (linear heads).", "",
               markdown_table([["method", "bundle"]] + [[n + (" (selected)" if n == metrics.get("selected") else ""),
                                                          f"`{b}`"] for n, b in bundles.items()]), ""]
    if figures["curves"] or figures["confusion"]:
        md += ["## Plots", ""] + [f"![{t}]({f})" for t, f in figures["curves"] + figures["confusion"]] + [""]
    if metrics.get("leakage"):
        md += sections.leakage_section(metrics["leakage"])
    md += ["## Findings", ""] + [f"- {line}" for line in findings(metrics, classes)] + [""]
    notes = list(metrics["notes"])
    if metrics["skipped"]:
        notes.append(f"{len(metrics['skipped'])} unreadable images skipped:")
        notes += [f"  - `{s['path']}`: {s['reason']}" for s in metrics["skipped"][:50]]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" if not n.startswith("  ") else n for n in notes] + [""]
    return "\n".join(md)


def console_summary(metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"transferlab: {metrics['backbone']} {'x'.join(map(str, metrics['input_size']))}")
    for col in ("method", "accuracy", "macro-F1", "balanced acc.", "valid macro-F1", "train", "predict"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for n, m in metrics["methods"].items():
        table.add_row(n + (" *" if n == metrics.get("selected") else ""), number(m["accuracy"]), number(m["macro_f1"]), number(m["balanced_accuracy"]),
                      number(m.get("valid", {}).get("macro_f1")), seconds(m["train_seconds"]), seconds(m["predict_seconds"]))
    if metrics.get("selected"):
        table.caption = f"* selected on validation {metrics['selection']['metric']}"
    Console(stderr=False).print(table)
