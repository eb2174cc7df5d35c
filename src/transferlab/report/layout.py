"""The run folder's layout: where `transferlab run` puts each file under `--out`, in one place.

At the top only what a person opens first (report.html, report.md, metrics.json, config.yaml and a
README.txt saying what is where); each method's files under `methods/<name>/`, its saved model under
`models/<name>/`, and plots about the data rather than a method under `plots/`. Writers and readers
(report.html reads the predictions back) take their paths from here.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

TOP_FILES = ("report.html", "report.md", "metrics.json", "config.yaml", "README.txt")
METHODS, MODELS, PLOTS = "methods", "models", "plots"
EARLIER = "earlier"  # earlier/<stamp>/: what an earlier run left here for methods a later one did not fit

# the per-method files, in methods/<name>/
REPORT_TSV = "report.tsv"  # the seed's table layout
PREDICTIONS = "predictions.csv"  # one row per test image
HISTORY = "history.csv"  # per-epoch curves of heads and fine-tuning that record them
CONFUSION = "confusion.png"
LEARNING_CURVES = "learning_curves.png"
LR = "lr.png"

README = f"""\
report.html: the report to open (self-contained); report.md: the same as markdown; metrics.json: every number; config.yaml: reruns this study (transferlab run --config config.yaml).
{METHODS}/<method>/: per method {REPORT_TSV} (the seed's table layout), {PREDICTIONS} (one row per test image), {HISTORY}, {CONFUSION} (above 40 classes: the selected method's only), {LEARNING_CURVES}, {LR}; fine-tuning also keeps its checkpoints and logs there.
{MODELS}/<method>/: the saved models (transferlab predict, transferlab.load); {PLOTS}/: plots of the data and the selection (class distribution, data efficiency); {EARLIER}/<time>/ (after a rerun here): an earlier run's methods/ and models/ entries for methods the later run did not fit, moved aside whole.
"""


# how each top file of a run folder begins, to tell transferlab's own from a user's file of the same name
SIGNATURES = {
    "report.html": "<title>transferlab",
    "report.md": "# transferlab",
    "metrics.json": '"backbone"',
    "config.yaml": "# transferlab",
    "README.txt": "report.html:",
}


def foreign_files(out) -> list[str]:
    """The files in `out` a run would overwrite that transferlab did not write (a user's README.txt or config.yaml
    in a folder given as --out), by how its own begin (`SIGNATURES`)."""
    found = []
    for name, mark in SIGNATURES.items():
        path = Path(out) / name
        if path.is_file():
            try:
                head = path.read_bytes()[:2048].decode("utf-8", errors="replace")
            except OSError:
                head = ""
            if mark not in head:
                found.append(name)
    return found


def output_file(out, default_name: str) -> Path:
    """The file an `--out`/`--onnx` names: itself, or `default_name` inside it when it is a folder (one that exists,
    or a name ending in a slash); writing to the folder itself was an IsADirectoryError after all the work."""
    path = Path(out)
    return path / default_name if path.is_dir() or str(out).endswith(("/", "\\")) else path


def method_dir(out, name: str) -> Path:
    """methods/<name>/ of the run folder `out` (not created)."""
    return Path(out) / METHODS / name


def plot_path(out, filename: str) -> Path:
    """plots/<filename> of the run folder `out` (not created)."""
    return Path(out) / PLOTS / filename


def relative(out, path) -> str:
    """`path` relative to the run folder, with forward slashes: how report.md links to it."""
    return Path(path).relative_to(Path(out)).as_posix()


def set_aside(out, keep, since: float) -> tuple[Path, list[str]] | None:
    """What an earlier run left in the run folder `out` for methods this run did not produce: each `methods/<m>/`
    and `models/<m>/` with m not in `keep` and nothing in it written since `since` (a `time.time()`), moved to
    `earlier/<stamp>/` under the same names. models/ then holds only the models this run's report describes (a
    stale bundle still predicts, for a study no file here speaks of any more); nothing is deleted (it may be
    hours of fine-tuning). Returns the folder and the methods moved, or None when there were none."""
    out = Path(out)
    stale = [
        d
        for kind in (METHODS, MODELS)
        if (out / kind).is_dir()
        for d in sorted((out / kind).iterdir())
        if d.is_dir() and d.name not in keep and max(p.stat().st_mtime for p in [d, *d.rglob("*")]) < since
    ]
    if not stale:
        return None
    folder = out / EARLIER / time.strftime("%Y%m%d-%H%M%S", time.localtime(since))
    for d in stale:
        target = folder / d.parent.name / d.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(d), str(target))
    return folder, sorted({d.name for d in stale})


def remove_unlinked_plots(out) -> list[str]:
    """Delete the images in plots/ that report.md does not show: an earlier run's figure this run did not draw (its
    data-efficiency curve after a rerun with --no-data-efficiency), which nothing links any more. Plots are drawn
    from metrics.json, so nothing computed is lost. Returns the names removed."""
    out = Path(out)
    folder, md = out / PLOTS, out / "report.md"
    if not folder.is_dir() or not md.exists():
        return []
    linked = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text(encoding="utf-8")))
    stale = [p for p in sorted(folder.glob("*.png")) if relative(out, p) not in linked]
    for p in stale:
        p.unlink()
    return [p.name for p in stale]
