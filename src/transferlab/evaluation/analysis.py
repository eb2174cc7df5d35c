"""Analysis of a study's methods: pick one on validation, then the statistics a reviewer asks for on test.

Order matters and is the point: `analyse` first selects the method (validation scores only) and the
baseline it is compared with (the seed procedure better on validation), draws the data-efficiency
curve (train + valid only), and only then reads test predictions for bootstrap intervals, McNemar's
test and per-class recall changes. Its results go to metrics.json (`selected`, `selection`, `ci`,
`mcnemar`, `data_efficiency`, `recall_changes`) and to a section of report.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..report import plots
from .metrics import bootstrap_ci, mcnemar
from ..report.format import interval, markdown_table, number, p_value
from ..heads.seed import HEADS, SEED_METHODS
from ..heads.search import ValidationSearch, _fixed, cross_val_scores, data_efficiency, select_method

METRIC_NAMES = {"macro_f1": "macro-F1", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy"}


def _fit_X(split):
    return getattr(split, "fit_X", split.X)


def _memo(cache, result: dict, name: str, compute):
    """compute(), kept beside the method's fitted head in `cache` (`head_cache.HeadCache`) when there is one."""
    return compute() if cache is None else cache.memo(result.get("head_key"), name, compute)


def selection_scores(results: dict, splits: dict, cv: int = 0, seed: int = 0,
                     cache=None) -> tuple[dict, str, list[str]]:
    """Each method's validation scores under the protocol, the protocol's name, and methods left out.

    cv < 2: the validation split. cv >= 2: pooled out-of-fold scores of k-fold CV over train + valid
    (a tuned head's are those of its chosen grid point; `finetune` brings its own; other heads are
    cross-validated here).
    """
    tr, va = splits["train"], splits["valid"]
    if cv < 2:
        return {n: r["valid"] for n, r in results.items() if r.get("valid")}, "validation split", []
    X, y = np.concatenate([_fit_X(tr), _fit_X(va)]), np.concatenate([tr.y, va.y])
    scores, left_out = {}, []
    for n, r in results.items():
        est = r["estimator"]
        if isinstance(est, ValidationSearch) and est.cv == cv:
            scores[n] = est.best_valid_
        elif (r.get("cv") or {}).get("k") == cv:  # fine-tuning cross-validated itself (`finetune.fit_method`)
            scores[n] = r["cv"]["scores"]
        elif n in HEADS:  # cached beside the fitted head (`head_cache`), like the head itself
            scores[n] = _memo(cache, r, f"cv{cv}-{seed}", lambda: cross_val_scores(_fixed(est), X, y, cv, seed))
        else:
            left_out.append(n)
    return scores, f"{cv}-fold CV on train + valid", left_out


def analyse(results: dict, splits: dict, classes: list[str], *, metric: str = "macro_f1", seed: int = 0,
            n_boot: int = 1000, efficiency: bool = True, cv: int = 0, cache=None) -> dict:
    """Selection (validation), data efficiency (train/valid), then test statistics; see the module doc."""
    scores, protocol, left_out = selection_scores(results, splits, cv, seed, cache)
    if not scores:
        return {"selected": None, "selection": {"metric": metric, "note": "no validation split: nothing selected"}}
    selection = select_method(scores, metric)
    chosen = selection["method"]
    seeds = [m for m in SEED_METHODS if m in scores]
    baseline = select_method({m: scores[m] for m in seeds}, metric)["method"] if seeds else None
    selection.update(baseline=baseline, protocol=protocol, scores=scores, left_out=left_out)
    out = {"selected": chosen, "selection": selection}
    tr, va = splits["train"], splits["valid"]
    if efficiency and chosen in HEADS:  # a function of the fitted head and train/valid: cached beside the head
        curve = _memo(cache, results[chosen], f"data_efficiency-{metric}-{seed}", lambda: data_efficiency(
            results[chosen]["estimator"], _fit_X(tr), tr.y, va.X, va.y, metric=metric, seed=seed))
        out["data_efficiency"] = {"method": chosen, **curve}

    te = splits["test"]  # test labels are read from here on, after everything above is fixed
    if len(te.y):
        out["ci"] = {n: {"n_boot": n_boot, "seed": seed,
                         **bootstrap_ci(te.y, r["test_pred"], len(classes), n_boot, seed)}
                     for n, r in results.items() if r.get("test_pred") is not None}
        out["mcnemar"] = {f"{chosen} vs {m}": {"a": chosen, "b": m, **mcnemar(te.y, results[chosen]["test_pred"],
                                                                              results[m]["test_pred"])}
                          for m in SEED_METHODS if m in results and m != chosen
                          and results[m].get("test_pred") is not None and results[chosen].get("test_pred") is not None}
        if baseline and baseline != chosen and "test" in results[chosen] and "test" in results[baseline]:
            out["recall_changes"] = {"method": chosen, "baseline": baseline,
                                     "classes": recall_changes(results[chosen]["test"], results[baseline]["test"])}
    return out


def recall_changes(test: dict, base: dict) -> list[dict]:
    """Per test class: recall of the method and of the baseline, largest absolute change first."""
    rows = [{"class": c, "index": pc["index"], "support": pc["support"], "recall": pc["recall"],
             "baseline_recall": base["per_class"][c]["recall"], "change": pc["recall"] - base["per_class"][c]["recall"]}
            for c, pc in test["per_class"].items()]
    return sorted(rows, key=lambda r: (-abs(r["change"]), r["index"]))


def figures(out: Path, metrics: dict) -> list[tuple[str, str]]:
    eff = metrics.get("data_efficiency")
    if not eff:
        return []
    pts = [(p["k"], p["score"]) for p in eff["points"] if p["score"] is not None]
    label = METRIC_NAMES.get(eff["metric"], eff["metric"])
    p = plots.plot_data_efficiency({eff["method"]: pts}, Path(out) / "data_efficiency.png",
                                   ylabel=f"validation {label}",
                                   title=f"{eff['method']}: validation {label} vs training images per class")
    return [("Data efficiency of the selected method", p.name)]


def _features_note(cfg: dict) -> str:
    if cfg.get("flip_train"):
        return (" Every head trained on each training image and its horizontal flip as two samples and predicts on "
                "the mean of both views' features (`--flip-train`).")
    if cfg.get("tta"):
        return " Features: the mean of each image's and its horizontal flip's (`--tta`)."
    return ""


def _caveat(metrics: dict, tag: str) -> str:
    counts = metrics.get("counts", {}).get("valid", {})
    rare = min((c for c in counts.values() if c), default=None)
    if tag == "valid":
        return ("The validation split is small" + (f" (its rarest class has {rare} image{'s' * (rare != 1)})"
                                                    if rare is not None else "")
                + ", so validation scores are noisy, and a tuned head's score is the best of its grid, which "
                  "flatters it a little.")
    return ("CV scores pool out-of-fold predictions of every train + valid image, so rare classes weigh in with "
            "all their images; a tuned head's score is still the best of its grid, which flatters it a little. "
            "The `valid` numbers elsewhere in this report are the final models' (fitted on train) on the "
            "validation split.")


def markdown(metrics: dict, figs: list[tuple[str, str]]) -> list[str]:
    """The report section 'Selection and statistics' as markdown lines (empty when nothing was selected)."""
    chosen = metrics.get("selected")
    if not chosen:
        return []
    sel, methods, ci = metrics["selection"], metrics["methods"], metrics.get("ci", {})
    name = METRIC_NAMES[sel["metric"]]
    v = sel["valid"]
    protocol = sel.get("protocol", "validation split")
    how = ("each grid point fitted on train, scored on the validation split" if protocol == "validation split"
           else f"each grid point scored by {protocol} (pooled out-of-fold predictions), the chosen one then "
                "fitted on train")
    md = ["## Selection and statistics", "",
          f"Selected: **{chosen}**, the best {name} on the {protocol} of {len(sel['ranking'])} methods "
          f"(macro-F1 {v['macro_f1']:.3f}, accuracy {v['accuracy']:.3f}, balanced accuracy "
          f"{v['balanced_accuracy']:.3f}; ties broken by the other two, then by order). Tuned heads chose their "
          f"hyperparameters the same way: {how}. Test labels "
          "played no part; test numbers below were computed once, after selection."
          + (f" Not candidates (no score under this protocol): {', '.join(sel['left_out'])}."
             if sel.get("left_out") else "")
          + _features_note(metrics.get("config", {})), ""]
    tag = "valid" if protocol == "validation split" else "CV"
    rows = [["method", f"{tag} macro-F1", f"{tag} acc.", f"{tag} bal. acc.", "test accuracy [95% CI]",
             "test macro-F1 [95% CI]", "test bal. acc. [95% CI]", "selected"]]
    for n, _ in sel["ranking"]:
        m = methods[n]
        mv = sel.get("scores", {}).get(n) or m.get("valid", {})
        tci = ci.get(n) or {}
        rows.append([n, number(mv.get("macro_f1")), number(mv.get("accuracy")), number(mv.get("balanced_accuracy")),
                     *[interval(m.get(k), tci.get(k)) for k in ("accuracy", "macro_f1", "balanced_accuracy")],
                     "✓" if n == chosen else ""])
    any_ci = next(iter(ci.values()), None)
    md += [markdown_table(rows), "", f"Rows in order of the {protocol} score. " + (
        f"Intervals: percentile bootstrap over test images ({any_ci['n_boot']} resamples, seed {any_ci['seed']}). "
        if any_ci else "") + _caveat(metrics, tag), ""]

    tuned = {n: m["tuning"] for n, m in methods.items() if m.get("tuning")}
    if tuned:
        rows = [["method", "chosen hyperparameters", f"{tag} {name}", "grid points", "search"]]
        rows += [[n, ", ".join(f"{k.split('__')[-1]}={val}"
                               for k, val in (t["best_params"] or t.get("inner", {}).get("best_params", {})).items()),
                  number(t["valid"][sel["metric"]]),
                  str(t["grid_points"]) + (f" ({t['failed']} failed)" if t["failed"] else ""),
                  f"{t['search_seconds']:.1f} s"] for n, t in tuned.items()]
        md += ["### Tuned hyperparameters", "", markdown_table(rows), ""]

    if metrics.get("mcnemar"):
        rows = [["comparison", "only the first right", "only the second right", "p-value", "test"]]
        rows += [[k, str(t["b"]), str(t["c"]), p_value(t["p_value"]), "exact binomial" if t["method"] == "exact"
                  else "chi-square, continuity-corrected"] for k, t in metrics["mcnemar"].items()]
        md += ["### McNemar's test (test set)", "", "Paired correctness of the selected method against each of the "
               "seed's procedures on the same test images.", "", markdown_table(rows), ""]

    rc = metrics.get("recall_changes")
    if rc:
        moved = [r for r in rc["classes"] if r["change"] != 0]
        rows = [["class", "support", f"{rc['baseline']} recall", f"{rc['method']} recall", "change"]]
        rows += [[f"{r['index']} {r['class']}", str(r["support"]), number(r["baseline_recall"]), number(r["recall"]),
                  f"{r['change']:+.3f}"] for r in moved[:10]]
        md += ["### Per-class recall: largest changes", "",
               f"Against **{rc['baseline']}**, the seed procedure better on validation. Classes with a handful of "
               "test images move macro-F1 most; their recalls are a few images each."
               + ("" if moved else " No class recall changed."), ""]
        if moved:
            md += [markdown_table(rows), ""]

    eff = metrics.get("data_efficiency")
    if eff:
        rows = [["images per class (at most)", "training images", f"valid {METRIC_NAMES[eff['metric']]}", "draws"]]
        rows += [[str(p["k"]), str(p["n_train"]),
                  number(p["score"]) if p["score"] is not None else f"failed ({p.get('error', '')[:60]})",
                  str(len(p["scores"]))] for p in eff["points"]]
        md += ["### Data efficiency", "", f"**{eff['method']}** with its chosen hyperparameters fixed, trained on at "
               f"most k images per class (fewer where a class has fewer), sampled with seed {eff['seed']}; points "
               f"below the full training set average {eff['repeats']} draws. Scored on validation.", "",
               markdown_table(rows), ""]
    md += [f"![{t}]({f})" for t, f in figs] + ([""] if figs else [])
    return md
