"""Report sections rendered from evaluation results: "Selection and statistics" and "Leakage check".

evaluation/analysis.py and evaluation/leakage.py compute (what goes into metrics.json); this module turns
those entries into report.md lines and draws the data-efficiency plot. It reads metrics.json's keys only,
so a section can be rendered again from a saved run.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from . import layout, plots
from .format import interval, markdown_table, number, p_value

METRIC_NAMES = {"macro_f1": "macro-F1", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy"}


# Above this many classes only the selected method's confusion matrix is drawn (the others' per-class numbers are in
# their report.tsv and predictions.csv): at 150 classes each took 2 s to draw, 12 s for six methods' unreadable grids.
CONFUSION_ALL_MAX = 40


def selection_column(metrics: dict) -> tuple[str, dict]:
    """The score each method was selected on, as a results table's column: (header, {method: value}). Under CV
    the CV score ("CV macro-F1"; none for a baseline CV did not score, e.g. the seed's softmax), else the
    validation split's. A table that showed the validation split's score beside a CV choice starred a method
    with a lower number than another's."""
    sel = metrics.get("selection") or {}
    metric = sel.get("metric", "macro_f1")
    label = METRIC_NAMES.get(metric, metric)
    if "CV" in (sel.get("protocol") or "") and sel.get("scores"):
        return f"CV {label}", {n: (sel["scores"].get(n) or {}).get(metric) for n in metrics["methods"]}
    return f"valid {label}", {n: (m.get("valid") or {}).get(metric) for n, m in metrics["methods"].items()}


def selection_figures(out: Path, metrics: dict) -> list[tuple[str, str]]:
    """plots/data_efficiency.png for the selected method, as [(caption, relative path)] (empty without a curve)."""
    eff = metrics.get("data_efficiency")
    if not eff:
        return []
    pts = [(p["k"], p["score"]) for p in eff["points"] if p["score"] is not None]
    label = METRIC_NAMES.get(eff["metric"], eff["metric"])
    p = plots.plot_data_efficiency(
        {eff["method"]: pts},
        layout.plot_path(out, "data_efficiency.png"),
        ylabel=f"validation {label}",
        title=f"{eff['method']}: validation {label} vs training images per class",
    )
    return [("Data efficiency of the selected method", layout.relative(out, p))]


def features_note(cfg: dict) -> str:
    """A sentence on how features were built (--flip-train, --tta), or "" for plain features."""
    if cfg.get("flip_train"):
        return (
            " Every head trained on each training image and its horizontal flip as two samples and predicts on "
            "the mean of both views' features (`--flip-train`)."
        )
    if cfg.get("tta"):
        return " Features: the mean of each image's and its horizontal flip's (`--tta`)."
    return ""


def selection_caveat(metrics: dict, tag: str) -> str:
    """Why the selection scores are noisy: the validation split's size (tag "valid") or what CV pools."""
    counts = metrics.get("counts", {}).get("valid", {})
    rare = min((c for c in counts.values() if c), default=None)
    if tag == "valid":
        return (
            "The validation split is small"
            + (f" (its rarest class has {rare} image{'s' * (rare != 1)})" if rare is not None else "")
            + ", so validation scores are noisy, and a tuned head's score is the best of its grid, which "
            "flatters it a little."
        )
    if metrics.get("selection", {}).get("cv"):
        return (
            "CV scores pool out-of-fold predictions of every train + valid image (averaged over repeats), so rare "
            "classes weigh in with all their images. The `valid` numbers elsewhere in this report are the final "
            "models' (fitted on train) on the validation split, which the CV also saw."
        )
    return (
        "CV scores pool out-of-fold predictions of every train + valid image, so rare classes weigh in with "
        "all their images; a tuned head's score is still the best of its grid, which flatters it a little. "
        "The `valid` numbers elsewhere in this report are the final models' (fitted on train) on the "
        "validation split."
    )


def _param(key: str, value) -> str:
    value = f"{value:.3g}" if isinstance(value, float) else value
    return f"{key.split('__')[-1]}={value}"


def tuned_section(tuned: dict, cvsel: dict | None, metric: str, tag: str, protocol: str) -> list[str]:
    """'Tuned hyperparameters': each tuned head's chosen point, the score that chose it, the grid and its cost.
    Under repeated CV these are the CV's (the point's pooled out-of-fold score over the whole grid's folds); the
    final fit's one-point search on the validation split is in the results table's `valid` column."""
    name = METRIC_NAMES[metric]
    rows = [["method", "chosen hyperparameters", f"{tag} {name}", "grid points", "search"]]
    for n, t in tuned.items():
        c = (cvsel or {}).get("methods", {}).get(n)
        if c is not None:
            params = c["params"]
            if all(isinstance(v, dict) for v in params.values()) and params:  # an ensemble: its members' points
                params = {f"{m}.{k.split('__')[-1]}": v for m, p in params.items() for k, v in p.items()}
            value = c.get("point_score", c["score"])[metric]
            points, secs, failed = c["grid_points"], c["seconds"], 0
            cached = c.get("cached", False)
        else:
            params = t["best_params"] or t.get("inner", {}).get("best_params", {})
            value, points, secs, failed = t["valid"][metric], t["grid_points"], t["search_seconds"], t["failed"]
            cached = False
        rows.append(
            [
                n,
                ", ".join(_param(k, v) for k, v in params.items()),
                number(value),
                str(points) + (f" ({failed} failed)" if failed else ""),
                f"{secs:.1f} s" + (" (cached)" if cached else ""),
            ]
        )
    note = (
        [
            f"Under {protocol}: the {tag} {name} of the chosen point is its pooled out-of-fold score, the "
            "best of its grid, so it sits above the method's honest score in the table above; search is the CV's "
            "fitting time, summed over its threads (cached: when it was computed; this run read the scores from the cache). The final fit on train is scored on validation in the results "
            "table.",
            "",
        ]
        if cvsel
        else []
    )
    return ["### Tuned hyperparameters", "", markdown_table(rows), "", *note]


def selection_section(metrics: dict, figs: list[tuple[str, str]]) -> list[str]:
    """The report section 'Selection and statistics' as markdown lines (empty when nothing was selected)."""
    chosen = metrics.get("selected")
    if not chosen:
        return []
    sel, methods, ci = metrics["selection"], metrics["methods"], metrics.get("ci", {})
    name = METRIC_NAMES[sel["metric"]]
    v = sel["valid"]
    protocol = sel.get("protocol", "validation split")
    how = (
        "each grid point fitted on train, scored on the validation split"
        if protocol == "validation split"
        else f"each grid point scored by {protocol} (pooled out-of-fold predictions), the chosen one then "
        "fitted on train"
    )
    cvsel = sel.get("cv")
    if cvsel:
        c = cvsel["methods"][chosen]
        headline = (
            f"Selected: **{chosen}** by {protocol} among {len(sel['ranking'])} methods: {cvsel['why']}. CV {name} "
            f"{c['score'][sel['metric']]:.3f}. Every method's CV score is honest: a tuned head's grid point is "
            "chosen for each fold on the other folds' out-of-fold predictions, so no score is a grid's maximum; "
            "the ensemble is scored on the mean of its members' such predictions. The standard error (SE) of "
            "each method's gap to the best is Nadeau and Bengio's, corrected for overlapping training sets. "
            + (
                "Rule: the best honest CV score (the SEs say how far apart the methods really are). "
                if cvsel.get("rule") == "best"
                else "Rule: among the methods within one SE of the best, the first in the preference order "
                "(linear heads, LDA, the SVMs, the ensemble). "
            )
            + "Each chosen grid point (the best on all folds pooled) was then fitted on train. Test labels played no part; test numbers below were computed once, "
            "after selection."
        )
    else:
        headline = (
            f"Selected: **{chosen}**, the best {name} on the {protocol} of {len(sel['ranking'])} methods "
            f"(macro-F1 {v['macro_f1']:.3f}, accuracy {v['accuracy']:.3f}, balanced accuracy "
            f"{v['balanced_accuracy']:.3f}; ties broken by the other two, then by order). Tuned heads chose their "
            f"hyperparameters the same way: {how}. Test labels "
            "played no part; test numbers below were computed once, after selection."
        )
    md = [
        "## Selection and statistics",
        "",
        headline
        + (
            f" Not candidates (no score under this protocol): {', '.join(sel['left_out'])}."
            if sel.get("left_out")
            else ""
        )
        + features_note(metrics.get("config", {})),
        "",
    ]
    tag = "valid" if protocol == "validation split" else "CV"
    rows = [
        [
            "method",
            f"{tag} macro-F1",
            f"{tag} acc.",
            f"{tag} bal. acc.",
            "test accuracy [95% CI]",
            "test macro-F1 [95% CI]",
            "test bal. acc. [95% CI]",
            "selected",
        ]
    ]
    if cvsel:
        rows[0].insert(2, "SE of gap to best")
    for n, _ in sel["ranking"]:
        m = methods.get(n, {})  # scored by CV, final fit skipped (--time-budget): CV scores, no test numbers
        mv = sel.get("scores", {}).get(n) or m.get("valid", {})
        tci = ci.get(n) or {}
        rows.append(
            [
                n,
                number(mv.get("macro_f1")),
                number(mv.get("accuracy")),
                number(mv.get("balanced_accuracy")),
                *[interval(m.get(k), tci.get(k)) for k in ("accuracy", "macro_f1", "balanced_accuracy")],
                "✓" if n == chosen else "",
            ]
        )
        if cvsel:
            rows[-1].insert(2, number(cvsel["methods"][n]["se"]))
    any_ci = next(iter(ci.values()), None)
    md += [
        markdown_table(rows),
        "",
        f"Rows in order of the {protocol} score. "
        + (
            f"Intervals: percentile bootstrap over test images ({any_ci['n_boot']} resamples, seed {any_ci['seed']}). "
            if any_ci
            else ""
        )
        + selection_caveat(metrics, tag),
        "",
    ]

    tuned = {n: m["tuning"] for n, m in methods.items() if m.get("tuning")}
    if tuned:
        md += tuned_section(tuned, cvsel, sel["metric"], tag, protocol)

    if metrics.get("mcnemar"):
        rows = [["comparison", "only the first right", "only the second right", "p-value", "test"]]
        rows += [
            [
                k,
                str(t["b"]),
                str(t["c"]),
                p_value(t["p_value"]),
                "exact binomial" if t["method"] == "exact" else "chi-square, continuity-corrected",
            ]
            for k, t in metrics["mcnemar"].items()
        ]
        md += [
            "### McNemar's test (test set)",
            "",
            "Paired correctness of the selected method against each of the seed's procedures on the same test images.",
            "",
            markdown_table(rows),
            "",
        ]

    rc = metrics.get("recall_changes")
    if rc:
        moved = [r for r in rc["classes"] if r["change"] != 0]
        rows = [["class", "support", f"{rc['baseline']} recall", f"{rc['method']} recall", "change"]]
        rows += [
            [
                f"{r['index']} {r['class']}",
                str(r["support"]),
                number(r["baseline_recall"]),
                number(r["recall"]),
                f"{r['change']:+.3f}",
            ]
            for r in moved[:10]
        ]
        md += [
            "### Per-class recall: largest changes",
            "",
            f"Against **{rc['baseline']}**, the seed procedure better on validation. Classes with a handful of "
            "test images move macro-F1 most; their recalls are a few images each."
            + ("" if moved else " No class recall changed."),
            "",
        ]
        if moved:
            md += [markdown_table(rows), ""]

    eff = metrics.get("data_efficiency")
    if eff:
        rows = [["images per class (at most)", "training images", f"valid {METRIC_NAMES[eff['metric']]}", "draws"]]
        rows += [
            [
                str(p["k"]),
                str(p["n_train"]),
                number(p["score"]) if p["score"] is not None else f"failed ({_short(p.get('error', ''))})",
                str(len(p["scores"])),
            ]
            for p in eff["points"]
        ]
        md += [
            "### Data efficiency",
            "",
            f"**{eff['method']}** with its chosen hyperparameters fixed, trained on at "
            f"most k images per class (fewer where a class has fewer), sampled with seed {eff['seed']}; points "
            f"below the full training set average {eff['repeats']} draw{'s' if eff['repeats'] != 1 else ''}; "
            "the full training set's point is the fitted model itself. Scored on validation.",
            "",
            markdown_table(rows),
            "",
        ]
    md += [f"![{t}]({f})" for t, f in figs] + ([""] if figs else [])
    return md


def _short(text: str, width: int = 120) -> str:
    """One line of at most `width` characters, cut at a word with an ellipsis (a table cell)."""
    return textwrap.shorten(" ".join(text.split()), width, placeholder=" …")


def leakage_section(leak: dict, max_listed: int = 10) -> list[str]:
    """The report's "Leakage check" section as markdown lines (metrics.json's `leakage`, from evaluation/leakage.py)."""
    md = [
        "## Leakage check",
        "",
        (
            f"Exact duplicates: same file content (hash). Near-duplicates: not exact, but the cosine similarity of the "
            f"backbone features to the nearest image of the other split is at least {leak['threshold']:g}."
        ),
        "",
    ]
    sweep = sorted({t for c in leak["comparisons"].values() for t in c["near_at"]}, key=float)
    rows = [["images", "compared with", "exact", f"near (>= {leak['threshold']:g})", *[f">= {t}" for t in sweep]]]
    for name, c in leak["comparisons"].items():
        q, r = name.split("-")
        rows.append(
            [
                f"{q} ({c['n_query']})",
                f"{r} ({c['n_reference']})",
                str(c["exact"]),
                str(c["near"]),
                *[str(c["near_at"].get(t, "")) for t in sweep],
            ]
        )
    md += [markdown_table(rows), ""]
    if leak["warning"]:
        md += [f"**Warning:** {leak['warning']}", ""]
        listed = [p for c in leak["comparisons"].values() for p in c["pairs"]][:max_listed]
        md += [f"- {p['kind']} ({p['similarity']:.3f}): `{p['query']}` ~ `{p['reference']}`" for p in listed] + [""]
    else:
        md += ["No exact or near-duplicates between the splits.", ""]
    return md
