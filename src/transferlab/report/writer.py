"""Writes a study's run folder: metrics.json, each method's files, the plots, report.md, report.html.

`write` gathers the numbers into metrics.json (plus versions and machine), writes methods/<name>/
(the seed-layout table, predictions, history, plots) and plots/, then report.md (markdown.py) and
report.html (html.py) from them, and README.txt; where each file goes is layout.py's. Also the
terminal summary `transferlab run` prints.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import warnings
from pathlib import Path

import numpy as np

from .. import __version__
from ..data.datasets import DatasetWarning
from ..evaluation.metrics import format_report
from . import layout, plots, sections
from .format import number, seconds
from .html import write_html, write_predictions
from .markdown import render_markdown


def versions() -> dict:
    import lightning
    import sklearn
    import timm
    import torch

    return {
        "transferlab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "scikit-learn": sklearn.__version__,
        "lightning": lightning.__version__,
    }


def machine(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "device": device,
    }
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def method_metrics(res: dict) -> dict:
    test = res.get("test", {})
    m = {k: test.get(k) for k in ("accuracy", "macro_f1", "weighted_f1", "balanced_accuracy")}
    m.update(
        train_seconds=res["train_seconds"],
        predict_seconds=res.get("predict_seconds"),
        per_class=test.get("per_class", {}),
        confusion_matrix=test.get("confusion_matrix"),
    )
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
    m["params"] = {
        k: v for k, v in est.get_params(deep=False).items() if isinstance(v, (int, float, str, bool, type(None)))
    }
    if hasattr(est, "best_params_"):  # a tuned head (selection.ValidationSearch): what it chose, from what
        m["tuning"] = est.summary()
    return m


def write(out: Path, *, cfg: dict, **kw) -> dict:
    """Write the run folder (`_write`), the figures kept in the cache's `figures/` (`plots.figure_store`): a study
    rerun into another folder copies the figures it drew before."""
    from ..features.cache import default_cache_dir

    with plots.figure_store(Path(cfg.get("cache_dir") or default_cache_dir()) / "figures"):
        return _write(out, cfg=cfg, **kw)


def _write(
    out: Path,
    *,
    cfg: dict,
    dataset,
    backbone,
    splits,
    extract: dict,
    results: dict,
    analysis: dict | None = None,
    leakage: dict | None = None,
    timings: dict | None = None,
    on_step=None,
) -> dict:
    """Write the run folder; `timings` (seconds per stage so far) goes to metrics.json's `timings` and report.md.
    `on_step(description)` is called after each of its `write_steps(results)` steps (the study's progress bar: at
    150 classes the report took 16 s, most of it one confusion matrix per method)."""
    step = on_step or (lambda _d: None)
    classes = dataset.classes
    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "backbone": backbone.name,
        "weights": backbone.weights,
        "weights_digest": backbone.weights_digest,
        "input_size": list(backbone.input_size),
        "preprocessing": backbone.preprocessing(),
        "seed": cfg["seed"],
        "classes": classes,
        "n_train": len(splits["train"].y),
        "n_valid": len(splits["valid"].y),
        "n_test": len(splits["test"].y),
        "counts": dataset.counts(),
        "extract": {k: v for k, v in extract.items() if k != "skipped"},
        "skipped": extract["skipped"],
        "notes": dataset.notes,
        "methods": {n: method_metrics(r) for n, r in results.items()},
        "versions": versions(),
        "machine": machine(extract["device"]),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        **(analysis or {}),  # selected, selection, ci, mcnemar, data_efficiency, recall_changes (analysis.py)
        **({"leakage": leakage} if leakage is not None else {}),  # duplicates across splits (leakage.py)
        "timings": dict(timings or {}),
    }
    missing = plots.missing_glyphs(classes)
    if missing:  # matplotlib drew boxes for them, with a warning per glyph per figure
        msg = (
            f"class names use characters no installed font draws ({''.join(missing[:12])}"
            f"{'...' if len(missing) > 12 else ''}): the figures show boxes for them (the tables name them); install "
            "a font that covers them (e.g. Noto Sans CJK: fonts-noto-cjk) for readable figures"
        )
        metrics["notes"].append(msg)
        warnings.warn(msg, DatasetWarning, stacklevel=2)
    figures = {"data": [class_distribution(out, metrics)], "curves": [], "confusion": []}
    step("report: class counts")
    chosen = metrics.get("selected") or next(iter(results), None)
    for name, res in results.items():
        drawn = len(classes) <= sections.CONFUSION_ALL_MAX or name == chosen
        curves, confusion = write_method(out, name, res, splits["test"], classes, draw_confusion=drawn)
        figures["curves"] += curves
        figures["confusion"] += confusion
        step(f"report: {name}")
    figures["selection"] = sections.selection_figures(out, metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    (out / "report.md").write_text(render_markdown(metrics, figures))
    (out / "README.txt").write_text(layout.README)
    step("report: report.md")
    write_html(out)  # report.html: report.md's sections, self-contained, plus mistakes and examples
    step("report: report.html")
    return metrics


def write_steps(results: dict) -> int:
    """How many times `write` calls `on_step`."""
    return len(results) + 3


def write_timings(out: Path, metrics: dict, timings: dict) -> None:
    """Record the stages' final timings (report and total are known only after the report is written) in
    metrics.json; report.md's "Timings" section already has the stages before them."""
    metrics["timings"] = dict(timings)
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def class_distribution(out: Path, metrics: dict) -> tuple[str, str]:
    """plots/class_distribution.png; (caption, path relative to the run folder)."""
    p = plots.plot_class_distribution(
        metrics["counts"],
        metrics["classes"],
        layout.plot_path(out, "class_distribution.png"),
        title="Images per class and split",
    )
    return "Class distribution", layout.relative(out, p)


def write_method(
    out: Path, name: str, res: dict, test, classes: list[str], draw_confusion: bool = True
) -> tuple[list, list]:
    """methods/<name>/: report.tsv, predictions.csv, history.csv and the method's plots (its confusion matrix only
    with `draw_confusion`; an earlier run's is removed otherwise).

    Returns the (caption, relative path) of its curve plots and of its confusion matrix, for report.md.
    """
    folder = layout.method_dir(out, name)
    folder.mkdir(parents=True, exist_ok=True)
    curves, confusion = [], []
    hist = getattr(res["estimator"], "history_", None)
    if hist:
        with open(folder / layout.HISTORY, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(hist))
            w.writerows(zip(*hist.values()))
        p = plots.plot_learning_curves(hist, folder / layout.LEARNING_CURVES, title=f"{name}: learning curves")
        q = plots.plot_lr_schedule(hist, folder / layout.LR, title=f"{name}: learning rate")
        curves += [
            (f"{name} learning curves", layout.relative(out, p)),
            (f"{name} learning rate", layout.relative(out, q)),
        ]
    if "test" in res and not draw_confusion:
        (folder / layout.CONFUSION).unlink(missing_ok=True)
    if "test" in res:
        (folder / layout.REPORT_TSV).write_text(format_report(res["test"], classes) + "\n")
    if "test" in res and draw_confusion:
        p = plots.plot_confusion_matrix(
            np.array(res["test"]["confusion_matrix"]),
            classes,
            folder / layout.CONFUSION,
            title=f"{name}: confusion matrix (test)",
        )
        confusion.append((f"{name} confusion matrix", layout.relative(out, p)))
    if "test_pred" in res:
        write_predictions(folder / layout.PREDICTIONS, test, res, classes)
    return curves, confusion


def console_summary(metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"transferlab: {metrics['backbone']} {'x'.join(map(str, metrics['input_size']))}")
    chosen_on, scores = sections.selection_column(metrics)  # the score the star was chosen on
    for col in ("method", "accuracy", "macro-F1", "balanced acc.", chosen_on, "train", "predict"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for n, m in metrics["methods"].items():
        table.add_row(
            n + (" *" if n == metrics.get("selected") else ""),
            number(m["accuracy"]),
            number(m["macro_f1"]),
            number(m["balanced_accuracy"]),
            number(scores[n]),
            seconds(m["train_seconds"]),
            seconds(m["predict_seconds"]),
        )
    if metrics.get("selected"):
        sel = metrics["selection"]
        label = sections.METRIC_NAMES.get(sel["metric"], sel["metric"])
        table.caption = (
            f"* selected by {label} on {sel.get('protocol', 'validation')}; accuracy, macro-F1, balanced acc.: test set"
        )
    console = Console(stderr=False)
    console.print(table)
    stages = metrics.get("timings") or {}
    if stages:
        # one line, unwrapped by rich (at 80 columns it split "15.86 s" between the number and its unit)
        console.print("time: " + ", ".join(f"{k} {seconds(v)}" for k, v in stages.items()), soft_wrap=True)
    budget = metrics.get("budget") or {}
    if budget.get("skipped"):  # was only in the report's notes: a budgeted run's short table went unexplained
        whats = ", ".join(s["what"] for s in budget["skipped"])
        console.print(f"time budget {seconds(budget['seconds'])}: skipped {whats} (the report's notes say why)")
