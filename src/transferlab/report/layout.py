"""The run folder's layout: where `transferlab run` puts each file under `--out`, in one place.

At the top only what a person opens first (report.html, report.md, metrics.json, config.yaml and a
README.txt saying what is where); each method's files under `methods/<name>/`, its saved model under
`models/<name>/`, and plots about the data rather than a method under `plots/`. Writers and readers
(report.html reads the predictions back) take their paths from here.
"""

from __future__ import annotations

from pathlib import Path

TOP_FILES = ("report.html", "report.md", "metrics.json", "config.yaml", "README.txt")
METHODS, MODELS, PLOTS = "methods", "models", "plots"

# the per-method files, in methods/<name>/
REPORT_TSV = "report.tsv"  # the seed's table layout
PREDICTIONS = "predictions.csv"  # one row per test image
HISTORY = "history.csv"  # per-epoch curves of heads and fine-tuning that record them
CONFUSION = "confusion.png"
LEARNING_CURVES = "learning_curves.png"
LR = "lr.png"

README = f"""\
report.html: the report to open (self-contained); report.md: the same as markdown; metrics.json: every number; config.yaml: reruns this study (transferlab run --config config.yaml).
{METHODS}/<method>/: per method {REPORT_TSV} (the seed's table layout), {PREDICTIONS} (one row per test image), {HISTORY}, {CONFUSION}, {LEARNING_CURVES}, {LR}; fine-tuning also keeps its checkpoints and logs there.
{MODELS}/<method>/: the saved models (transferlab predict, transferlab.load); {PLOTS}/: plots of the data and the selection (class distribution, data efficiency).
"""


def method_dir(out, name: str) -> Path:
    """methods/<name>/ of the run folder `out` (not created)."""
    return Path(out) / METHODS / name


def plot_path(out, filename: str) -> Path:
    """plots/<filename> of the run folder `out` (not created)."""
    return Path(out) / PLOTS / filename


def relative(out, path) -> str:
    """`path` relative to the run folder, with forward slashes: how report.md links to it."""
    return Path(path).relative_to(Path(out)).as_posix()
