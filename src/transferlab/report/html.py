"""HTML report: one self-contained `report.html` per run, built from the files the run wrote.

It renders `report.md` (so every section there appears, tables made sortable, PNGs embedded as
base64), puts a headline (each method's test numbers, the one selected, the findings)
on top, and adds what markdown cannot show: per method the most confident mistakes and, per class,
a few correctly classified test images, as JPEG thumbnails read from `methods/<method>/predictions.csv`
(written here too). The page scaffolding (`page`, `table`, CSS and JS from assets/) also serves
`transferlab compare`. No network, no external assets: the file opens from disk.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
from importlib.resources import files
from pathlib import Path

import numpy as np

from ..data.images import ImageError, load_rgb
from . import layout
from .format import number, seconds
from .markdown import findings
from .sections import METRIC_NAMES, selection_column

MAX_MISTAKES = 24  # thumbnails per method
EXAMPLES_PER_CLASS = 3
THUMB_BOX = (200, 150)  # the largest a thumbnail may be, width x height
PREDICTION_COLUMNS = ["path", "true", "predicted", "p_predicted", "p_true", "correct"]


def write_predictions(path: Path, split, result: dict, classes: list[str]) -> Path:
    """methods/<method>/predictions.csv: one row per test image (path, true and predicted class, their probabilities)."""
    pred = np.asarray(result["test_pred"], dtype=np.int64)
    proba = result.get("test_proba")
    rows = np.arange(len(pred))
    p_pred = proba[rows, pred] if proba is not None else [None] * len(pred)
    p_true = proba[rows, split.y] if proba is not None else [None] * len(pred)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PREDICTION_COLUMNS)
        for p, t, k, pp, pt in zip(split.paths, split.y, pred, p_pred, p_true):
            w.writerow(
                [
                    os.path.abspath(p),
                    classes[t],
                    classes[k],
                    "" if pp is None else f"{pp:.6f}",
                    "" if pt is None else f"{pt:.6f}",
                    int(t == k),
                ]
            )
    return path


def read_predictions(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("p_predicted", "p_true"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else math.nan
        r["correct"] = r.get("correct") == "1"
    return rows


# ---------------------------------------------------------------- embedding


def data_uri(path: Path) -> str | None:
    """A file as a `data:` URI (PNG, JPEG, SVG, GIF, WebP by extension), or None when unreadable."""
    mime = {
        ".png": "image/png",
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".svg": "image/svg+xml",
        ".gif": "image/gif",
        ".webp": "image/webp",
    }.get(Path(path).suffix.lower())
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    return f"data:{mime or 'application/octet-stream'};base64,{base64.b64encode(data).decode()}"


def thumbnail_uri(path, box=THUMB_BOX, quality: int = 80) -> str | None:
    """A small JPEG of an image file as a `data:` URI (aspect kept, within `box`), or None when unreadable."""
    try:
        img = load_rgb(path, reduce_to=box)  # a photo of many megapixels decodes at 1/8 scale or so
    except ImageError:
        return None
    img.thumbnail(box)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=True)
    return f"data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}"


# ---------------------------------------------------------------- page scaffolding


def _asset(name: str) -> str:
    return (files(__package__) / "assets" / name).read_text(encoding="utf-8")


CSS = _asset("report.css")  # package data, shipped in the wheel
JS = _asset("report.js")  # sortable tables, click-to-zoom figures, image-load counters for the browser test


def page(title: str, body: str) -> str:
    """A complete HTML document with the report's CSS and scripts inlined."""
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>\n{CSS}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n"
        f"<script>\n{JS}</script>\n</body>\n</html>\n"
    )


def table(rows: list[list], *, sortable: bool = True, pinned: int = 0) -> str:
    """An HTML table; rows[0] is the header, the last `pinned` rows stay at the bottom when sorting."""
    head, body = rows[0], rows[1:]
    cls = ' class="sortable"' if sortable else ""
    out = [
        f'<div class="table-wrap"><table{cls}>',
        "<thead><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in head) + "</tr></thead><tbody>",
    ]
    for i, r in enumerate(body):
        cls = ' class="pinned"' if pinned and i >= len(body) - pinned else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


# ---------------------------------------------------------------- report.md -> HTML


def markdown_html(text: str, folder: Path) -> str:
    """report.md as HTML: tables sortable and scrollable, images embedded (`data:` URIs), headings anchored."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    rules = md.renderer.rules

    def image(tokens, idx, options, env):
        tok = tokens[idx]
        alt = html.escape(tok.content)
        src = tok.attrGet("src") or ""
        uri = None if re.match(r"^[a-z]+:", src) else data_uri(folder / src)
        if uri is None:
            return f'<span class="note">[figure not available: {alt}]</span>'
        return f'<span class="fig"><img src="{uri}" alt="{alt}" title="click to zoom"><span class="cap">{alt}</span></span>'

    def table_open(tokens, idx, options, env):
        return '<div class="table-wrap"><table class="sortable">\n'

    def table_close(tokens, idx, options, env):
        return "</table></div>\n"

    def heading_open(tokens, idx, options, env):
        title = tokens[idx + 1].content if idx + 1 < len(tokens) else ""
        return f'<{tokens[idx].tag} id="{_slug(title)}">'

    def link_open(tokens, idx, options, env):  # links to other local files cannot follow the page: show them as text
        href = tokens[idx].attrGet("href") or ""
        return '<a href="' + html.escape(href) + '">' if href.startswith("#") else "<span>"

    def link_close(tokens, idx, options, env):
        opener = next((t for t in reversed(tokens[:idx]) if t.type == "link_open"), None)
        return "</a>" if opener is not None and (opener.attrGet("href") or "").startswith("#") else "</span>"

    rules.update(
        image=image,
        table_open=table_open,
        table_close=table_close,
        heading_open=heading_open,
        link_open=link_open,
        link_close=link_close,
    )
    return md.render(text)


def _split_sections(md_text: str) -> tuple[str, list[tuple[str, str]]]:
    """report.md as (title, [(level-2 heading, its markdown including the heading line)])."""
    title, sections, current = "", [], None
    for line in md_text.splitlines():
        if line.startswith("# ") and not title:
            title = line[2:].strip()
            continue
        if line.startswith("## "):
            current = [line[3:].strip(), [line]]
            sections.append(current)
        elif current is not None:
            current[1].append(line)
    return title, [(h, "\n".join(lines)) for h, lines in sections]


# ---------------------------------------------------------------- headline and galleries


def selected(metrics: dict) -> tuple[str | None, str, str]:
    """(the method the study selected, the metric it was selected on, the protocol), as metrics.json records them:
    the one best method everything on the page names; None when nothing was selected (no validation data)."""
    sel = metrics.get("selection") or {}
    return metrics.get("selected"), sel.get("metric", "macro_f1"), sel.get("protocol", "validation split")


def _inline_md(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


BIG = ' class="big"'


def headline(metrics: dict) -> str:
    methods = metrics["methods"]
    best, metric, protocol = selected(metrics)
    chosen_on, scores = selection_column(metrics)  # a baseline CV did not score has none (not its valid score)
    label = METRIC_NAMES.get(metric, metric)
    cards = []
    for name, m in methods.items():
        rows = [
            ("test accuracy", number(m.get("accuracy")), True),
            ("test macro-F1", number(m.get("macro_f1")), True),
            ("balanced accuracy", number(m.get("balanced_accuracy")), False),
            (f"selection: {chosen_on}", number(scores[name]), False),
            ("train", seconds(m.get("train_seconds")), False),
        ]
        dl = "".join(f"<dt>{k}</dt><dd{BIG if big else ''}>{v}</dd>" for k, v, big in rows)
        badge = '<span class="badge">selected</span>' if name == best else ""
        cards.append(
            f'<div class="card{" best" if name == best else ""}"><h3>{html.escape(name)}{badge}</h3><dl>{dl}</dl></div>'
        )
    items = "".join(f"<li>{_inline_md(line)}</li>" for line in findings(metrics, metrics["classes"]))
    note = (
        (
            f'<p class="note">“Selected” is the study\'s choice, by {html.escape(label)} on the '
            f"{html.escape(protocol)} (the “selection” row); test numbers are shown for every method and were not "
            f"used to choose.</p>"
        )
        if best
        else ""
    )
    return f'<div class="cards">{"".join(cards)}</div>{note}<ul class="findings">{items}</ul>'


def _thumb(row: dict, lines: list[str]) -> str:
    uri = thumbnail_uri(row["path"])
    name = html.escape(Path(row["path"]).name)
    img = f'<img src="{uri}" alt="{name}" loading="eager">' if uri else '<div class="missing">image not readable</div>'
    return (
        f'<div class="thumb" title="{html.escape(row["path"])}">{img}{"".join(lines)}<div class="f">{name}</div></div>'
    )


def mistakes_section(predictions: dict[str, list[dict]], limit: int = MAX_MISTAKES) -> str:
    parts = [
        '<h2 id="mistakes">Most confident mistakes (test set)</h2>',
        '<p class="note">Misclassified test images, most confident first (probability the method gave its '
        "predicted class). Green: the true class and its probability; red: the prediction and its probability."
        + (
            " The SVM's probabilities are its one-vs-rest decision values, temperature-scaled; on a tie of votes its"
            " prediction may not be its most probable class."
            if "svm" in predictions
            else ""
        )
        + "</p>",
    ]
    for method, rows in predictions.items():
        wrong = [r for r in rows if not r["correct"]]
        wrong.sort(key=lambda r: -(r["p_predicted"] if not math.isnan(r["p_predicted"]) else -1))
        parts.append(
            f'<h3 id="mistakes-{_slug(method)}">{html.escape(method)}: {len(wrong)} of {len(rows)} test '
            f"images wrong{f', the {limit} most confident shown' if len(wrong) > limit else ''}</h3>"
        )
        if not wrong:
            parts.append("<p>No mistakes on the test set.</p>")
            continue
        cards = [
            _thumb(
                r,
                [
                    f'<div class="t">true: <b>{html.escape(r["true"])}</b> ({number(r["p_true"], 2)})</div>',
                    f'<div class="p">predicted: <b>{html.escape(r["predicted"])}</b> '
                    f"({number(r['p_predicted'], 2)})</div>",
                ],
            )
            for r in wrong[:limit]
        ]
        parts.append(f'<div class="gallery">{"".join(cards)}</div>')
    return "\n".join(parts)


def examples_section(method: str, rows: list[dict], classes: list[str], per_class: int = EXAMPLES_PER_CLASS) -> str:
    parts = [
        f'<h2 id="examples">Correctly classified examples per class ({html.escape(method)}, test set)</h2>',
        f'<p class="note">Up to {per_class} test images per class that {html.escape(method)} classified '
        "correctly, most confident first, with the probability of the true class.</p>",
    ]
    for i, c in enumerate(classes):
        mine = [r for r in rows if r["true"] == c]
        right = sorted(
            (r for r in mine if r["correct"]), key=lambda r: -(r["p_true"] if not math.isnan(r["p_true"]) else -1)
        )
        label = (
            f'<div class="name">{i} {html.escape(c)}<small>{len(right)} of {len(mine)} correct</small></div>'
            if mine
            else f'<div class="name">{i} {html.escape(c)}<small>not in the test set</small></div>'
        )
        if right:
            body = "".join(_thumb(r, [f'<div class="t">p = {number(r["p_true"], 2)}</div>']) for r in right[:per_class])
            body = f'<div class="gallery">{body}</div>'
        else:
            body = '<div class="note">no correctly classified test image</div>' if mine else ""
        parts.append(f'<div class="classrow">{label}{body}</div>')
    return "\n".join(parts)


# ---------------------------------------------------------------- the page

SKIP_SECTIONS = ("Findings",)  # shown in the headline instead


def render_html(out: Path) -> str:
    out = Path(out)
    metrics = json.loads((out / "metrics.json").read_text())
    md_text = (out / "report.md").read_text() if (out / "report.md").exists() else ""
    title, sections = _split_sections(md_text)
    predictions = {
        m: read_predictions(layout.method_dir(out, m) / layout.PREDICTIONS)
        for m in metrics["methods"]
        if (layout.method_dir(out, m) / layout.PREDICTIONS).exists()
    }
    data_name = Path(str(metrics.get("config", {}).get("data", out.name))).name
    ex = metrics.get("extract", {})
    sub = (
        f"{html.escape(metrics['backbone'])} ({html.escape(str(metrics.get('weights')))}) · input "
        f"{'x'.join(map(str, metrics['input_size']))} · {metrics['n_train']} train / {metrics['n_valid']} valid / "
        f"{metrics['n_test']} test images · {len(metrics['classes'])} classes · seed {metrics['seed']} · "
        f"{html.escape(str(ex.get('precision')))} on {html.escape(str(ex.get('device')))}"
    )
    body_sections = [(h, markdown_html(text, out)) for h, text in sections if h not in SKIP_SECTIONS]
    extra = []
    if predictions:
        extra.append(("Most confident mistakes", "mistakes", mistakes_section(predictions)))
        best = selected(metrics)[0]
        chosen = best if best in predictions else next(iter(predictions))
        extra.append(
            ("Correct examples", "examples", examples_section(chosen, predictions[chosen], metrics["classes"]))
        )
    # galleries go after the results and per-class tables, before timings and plots
    anchor = next(
        (i for i, (h, _) in enumerate(body_sections) if h.lower().startswith(("timing", "plot"))), len(body_sections)
    )
    toc = (
        [(h, _slug(h)) for h, _ in body_sections[:anchor]]
        + [(t, s) for t, s, _ in extra]
        + [(h, _slug(h)) for h, _ in body_sections[anchor:]]
    )
    nav = '<nav class="toc">' + "".join(f'<a href="#{s}">{html.escape(t)}</a>' for t, s in toc) + "</nav>"
    html_parts = [
        f"<h1>{html.escape(title or f'transferlab study: {data_name}')}</h1>",
        f'<p class="sub">{sub}</p>',
        headline(metrics),
        nav,
    ]
    html_parts += (
        [h for _, h in body_sections[:anchor]] + [e for _, _, e in extra] + [h for _, h in body_sections[anchor:]]
    )
    return page(title or f"transferlab: {data_name}", "\n".join(html_parts))


def write_html(out: Path) -> Path:
    """Write DIR/report.html from DIR/metrics.json, report.md, the PNGs and the prediction CSVs."""
    path = Path(out) / "report.html"
    path.write_text(render_html(out), encoding="utf-8")
    return path
