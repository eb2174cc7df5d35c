"""Compare runs (`transferlab compare RUN_DIR...`): one table across runs and methods, the best on validation.

Each run folder's `metrics.json` gives one row per method: test accuracy, macro-F1 and balanced accuracy,
validation macro-F1, feature-extraction time and training time. The validation macro-F1 is the one the run
itself selected on: the repeated CV score of a default run, the K-fold CV score of a run made with `--cv K`, or the
validation split's (`--selection validation`, the seed's `--methods softmax,svm`). The best row is
chosen by it only; test numbers are shown, never used to choose.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from .format import markdown_table, number, seconds
from .html import page
from .html import table as html_table
from .sections import METRIC_NAMES

COLUMNS = [
    "run",
    "backbone",
    "input",
    "method",
    "test accuracy",
    "test macro-F1",
    "test balanced acc.",
    "valid macro-F1",
    "extraction (cold)",
    "train",
]
SHORT = ["run", "backbone", "input", "method", "test acc.", "test F1", "test bal.", "valid F1", "extract", "train"]


def load_run(run_dir) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a transferlab run folder (no metrics.json in it or in its subfolders)"
        )
    return json.loads(path.read_text())


def _labels(run_dirs: list[Path]) -> list[str]:
    """Short, distinct run names: the folder name, or more of the path where names repeat."""
    names = [p.name or str(p) for p in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in run_dirs]


def expand_runs(run_dirs) -> list[Path]:
    """The run folders: each given folder, or, for a folder of runs (no metrics.json in it, some in its
    subfolders, e.g. `runs/` after `--out runs/a`, `--out runs/b`), those subfolders in name order."""
    found: list[Path] = []
    for d in map(Path, run_dirs):
        inner = [] if (d / "metrics.json").is_file() or not d.is_dir() else sorted(d.glob("*/metrics.json"))
        found += [m.parent for m in inner] or [d]
    return found


def rows(run_dirs) -> list[dict]:
    run_dirs = expand_runs(run_dirs)
    out = []
    for label, run_dir in zip(_labels(run_dirs), run_dirs):
        m = load_run(run_dir)
        ex = m.get("extract", {})
        extraction = ex.get("cold_seconds")  # what computing the features cost, even when this run read the cache
        if (extraction is None or (isinstance(extraction, float) and math.isnan(extraction))) and not ex.get(
            "from_cache"
        ):
            extraction = ex.get("seconds")
        selection = m.get("selection") or {}
        for method, r in m["methods"].items():
            scored = (selection.get("scores") or {}).get(method)  # what the run selected on: split or CV
            valid = scored or r.get("valid") or {}
            metric = selection.get("metric", "macro_f1")
            out.append(
                {
                    "run": label,
                    "path": str(run_dir),
                    "backbone": m.get("backbone"),
                    "input": "x".join(map(str, m.get("input_size", []))),
                    "method": method,
                    "accuracy": r.get("accuracy"),
                    "macro_f1": r.get("macro_f1"),
                    "balanced_accuracy": r.get("balanced_accuracy"),
                    "valid_macro_f1": valid.get("macro_f1"),
                    "select_metric": metric,
                    "select_score": valid.get(metric),
                    "valid_protocol": selection.get("protocol", "validation split") if scored else "validation split",
                    "extract_seconds": extraction,
                    "train_seconds": r.get("train_seconds"),
                    "data": Path(str(m.get("config", {}).get("data", ""))).name,
                    "test_counts": m.get("counts", {}).get("test"),
                    "classes": m.get("classes"),
                }
            )
    return out


def best(table: list[dict]) -> dict | None:
    """The row with the highest validation score on the metric its run selected on (`--select-metric`; first listed
    wins ties), or None without validation."""
    scored = [r for r in table if r.get("select_score", r["valid_macro_f1"]) is not None]
    return max(scored, key=lambda r: r.get("select_score", r["valid_macro_f1"])) if scored else None


def caveats(table: list[dict]) -> list[str]:
    """Reasons the runs may not be comparable (different data, test sets or classes; mixed selection protocols)."""
    differ = [
        what
        for key, what in (("data", "data folder"), ("test_counts", "test set"), ("classes", "classes"))
        if len({json.dumps(r[key]) for r in table}) > 1
    ]
    out = [f"The runs differ in {', '.join(differ)}: their test numbers are not directly comparable."] if differ else []
    protocols = sorted({r["valid_protocol"] for r in table if r["valid_macro_f1"] is not None})
    if len(protocols) > 1:
        out.append(
            f"Validation macro-F1 comes from different protocols ({'; '.join(protocols)}): rerun with the "
            f"same --selection (and --cv) for a like-for-like choice."
        )
    metrics = sorted({r.get("select_metric", "macro_f1") for r in table})
    if len(metrics) > 1:
        out.append(
            f"The runs selected on different metrics ({', '.join(metrics)}): each row's score is on its own "
            f"run's metric, so the best row is not a like-for-like choice; rerun with the same --select-metric."
        )
    return out


def cells(r: dict, top: dict | None) -> list[str]:
    return [
        r["run"],
        str(r["backbone"]),
        r["input"],
        r["method"] + (" ★" if r is top else ""),
        number(r["accuracy"]),
        number(r["macro_f1"]),
        number(r["balanced_accuracy"]),
        number(r["valid_macro_f1"]),
        seconds(r["extract_seconds"]),
        seconds(r["train_seconds"]),
    ]


def summary(top: dict | None) -> str:
    if top is None:
        return "No run has validation numbers: no best run/method is named."
    metric = METRIC_NAMES.get(top.get("select_metric", "macro_f1"), top.get("select_metric"))
    return (
        f"Best on validation: {top['run']} / {top['method']} (valid {metric} "
        f"{number(top.get('select_score', top['valid_macro_f1']))}, "
        f"{top['valid_protocol']}; "
        f"its test accuracy {number(top['accuracy'])}, test macro-F1 {number(top['macro_f1'])})."
    )


def render_markdown(table: list[dict]) -> str:
    top = best(table)
    lines = [
        "# transferlab: runs compared",
        "",
        markdown_table([COLUMNS] + [cells(r, top) for r in table]),
        "",
        f"★ {summary(top)}",
        "",
        "Extraction (cold): backbone forward + decoding for all images, as recorded "
        "when the features were computed; train: fitting the method on cached features.",
        "",
    ]
    lines += [f"- {w}" for w in caveats(table)]
    lines += ["", "Runs:", ""] + [f"- `{p}`" for p in dict.fromkeys(r["path"] for r in table)] + [""]
    return "\n".join(lines)


def render_html(table: list[dict]) -> str:
    top = best(table)
    body = [
        "<h1>transferlab: runs compared</h1>",
        f'<p class="sub">{len({r["path"] for r in table})} runs, {len(table)} run/method rows. '
        "Click a column to sort.</p>",
        f"<p><strong>★ {html.escape(summary(top))}</strong></p>",
        html_table([COLUMNS] + [cells(r, top) for r in table]),
        '<p class="note">Best is chosen by the metric the runs selected on (macro-F1 unless --select-metric; '
        "a default run's repeated CV score, the K-fold CV score of a run made with --cv K, or the validation "
        "split's); test numbers are shown, not used to choose. "
        "Extraction (cold): backbone forward + decoding for all images, as recorded when the features were "
        "computed; train: fitting the method on cached features.</p>",
    ]
    body += [f'<p class="note">⚠ {html.escape(w)}</p>' for w in caveats(table)]
    links = "".join(f"<li><code>{html.escape(p)}</code></li>" for p in dict.fromkeys(r["path"] for r in table))
    body.append(f"<h2>Runs</h2><ul>{links}</ul>")
    return page("transferlab: runs compared", "\n".join(body))


def print_table(table: list[dict]) -> None:
    """The comparison as a rich table on the terminal (run, backbone and input size in one column)."""
    from rich.console import Console
    from rich.table import Table

    top = best(table)
    t = Table(
        title="transferlab: runs compared",
        caption="test F1 / valid F1: macro-F1; bal.: balanced accuracy; extract: cold feature extraction",
    )
    t.add_column("run", overflow="fold")
    t.add_column("method", overflow="fold")
    for col in ("test\nacc.", "test\nF1", "test\nbal.", "valid\nF1", "extract", "train"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in table:
        c = cells(r, top)
        t.add_row(
            f"{r['run']}\n[dim]{r['backbone']} {r['input']}[/dim]", c[3], *c[4:], style="bold" if r is top else None
        )
    console = Console()
    console.print(t)
    console.print(f"★ {summary(top)}")
    for w in caveats(table):
        console.print(f"[yellow]{w}[/yellow]")


def compare(run_dirs, out=None) -> list[dict]:
    """Rows for every run and method; with `out`, also write compare.md and compare.html there."""
    table = rows(run_dirs)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(render_markdown(table))
        (out / "compare.html").write_text(render_html(table), encoding="utf-8")
    return table
