"""Predict: a bundle applied to image files and folders (`transferlab predict BUNDLE IMAGES... --out preds.csv`).

Folders are searched recursively. Features go through the feature cache, so images the same backbone
already saw (e.g. during `transferlab run`) skip the forward pass. The CSV has `path, predicted,
probability` (the head's own prediction and its probability), then `top1, top1_probability, ...` with
`--top-k K`, and `label` when the images are labelled by class folders. Labels come from the first folder
under a given folder (`test/Gondola/x.jpg` given `test/`), or the image's own folder for a given file or an image
directly in a given folder (`test/Gondola/` given), when that name is one of the bundle's classes.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.datasets import list_images
from ..report.layout import output_file
from .bundle import BundleError, Model


@dataclass
class Predictions:
    paths: list[str]
    proba: np.ndarray
    predicted: np.ndarray
    labels: list[str | None]
    classes: list[str]
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    computed: int = 0
    from_cache: int = 0

    @property
    def images_per_second(self) -> float:
        return len(self.paths) / self.seconds if self.seconds > 0 else float("nan")


def collect_images(inputs, classes: list[str]) -> list[tuple[str, str | None]]:
    """(path, label or None) for every image file given or found (recursively) under a given folder, and every row
    of a CSV manifest given (its test rows where it marks some, else all; labelled by the manifest)."""
    from ..data.datasets import read_manifest

    known = set(classes)
    found: list[tuple[str, str | None]] = []
    for item in inputs:
        item = Path(item).expanduser()
        if item.is_file() and item.suffix.lower() in (".csv", ".tsv"):
            rows, _ = read_manifest(item, allow_outside=True)  # the user names these images here: no data set root
            test = [r for r in rows if r[2] == "test"]
            found += [(path, label if label in known else None) for path, label, _, _ in test or rows]
        elif item.is_dir():
            for p in list_images(item):
                parts = p.relative_to(item).parts  # an image directly in the folder given: that folder is its own
                first = parts[0] if len(parts) > 1 else item.resolve().name
                found.append((str(p), first if first in known else None))
        elif item.is_file():
            found.append((str(item), item.parent.name if item.parent.name in known else None))
        else:
            raise FileNotFoundError(f"no such image or folder: {item}")
    seen, unique = set(), []
    for path, label in found:
        if path not in seen:
            seen.add(path)
            unique.append((path, label))
    return unique


def predict_paths(model: Model, inputs, *, progress: bool = True) -> Predictions:
    """Predict every image under `inputs` (files and folders); unreadable images are skipped and listed."""
    start = time.perf_counter()
    items = collect_images(inputs, model.classes)
    if not items:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, inputs))}")
    ex = model.extract([p for p, _ in items], progress=progress, strict=False, description="predict")
    label_of = dict(items)
    proba = model.proba_from_features(ex.features) if len(ex.paths) else np.zeros((0, len(model.classes)))
    pred = model.predict_indices_from_features(ex.features) if len(ex.paths) else np.zeros(0, dtype=np.int64)
    return Predictions(
        paths=ex.paths,
        proba=proba,
        predicted=pred,
        labels=[label_of[p] for p in ex.paths],
        classes=model.classes,
        skipped=ex.skipped,
        seconds=time.perf_counter() - start,
        computed=ex.computed,
        from_cache=ex.from_cache,
    )


def csv_path(out) -> Path:
    """Where `--out` puts the predictions: the file named, or predictions.csv in a folder (`layout.output_file`)."""
    return output_file(out, "predictions.csv")


def write_csv(preds: Predictions, out, *, top_k: int = 1, with_labels: bool = False) -> Path:
    """One row per image: path, predicted, probability, [top1, top1_probability, ...], [label]. `out` is the CSV
    file, or a folder to write predictions.csv into."""
    out = csv_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    k = max(0, min(top_k, len(preds.classes))) if top_k > 1 else 0
    header = ["path", "predicted", "probability"]
    header += [c for i in range(1, k + 1) for c in (f"top{i}", f"top{i}_probability")]
    header += ["label"] if with_labels else []
    order = np.argsort(-preds.proba, axis=1, kind="stable")[:, :k]
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, path in enumerate(preds.paths):
            c = int(preds.predicted[i])
            row = [path, preds.classes[c], f"{preds.proba[i, c]:.6f}"]
            for j in order[i]:
                row += [preds.classes[j], f"{preds.proba[i, j]:.6f}"]
            if with_labels:
                row.append(preds.labels[i] or "")
            w.writerow(row)
    return out


def evaluate_predictions(preds: Predictions) -> dict:
    """Metrics of labelled predictions (evaluation.evaluate); every image must have a class folder."""
    from ..evaluation.metrics import evaluate

    unlabelled = [p for p, lab in zip(preds.paths, preds.labels) if lab is None]
    if unlabelled:
        from difflib import get_close_matches

        folded = {c.casefold(): c for c in preds.classes}

        def named(folder: str) -> str:  # a misspelt class folder: the class it is closest to
            close = get_close_matches(Path(folder).name.casefold(), list(folded), n=1)
            return folder + (f" (class {folded[close[0]]}?)" if close else "")

        folders = sorted({str(Path(p).parent) for p in unlabelled})
        n = len(unlabelled)
        raise BundleError(
            f"--evaluate needs every image in a folder named after one of the bundle's classes; "
            f"{n} {'are' if n != 1 else 'is'} not (e.g. in {', '.join(map(named, folders[:3]))}); classes: "
            f"{', '.join(preds.classes)}"
        )
    index = {c: i for i, c in enumerate(preds.classes)}
    y = np.array([index[lab] for lab in preds.labels], dtype=np.int64)
    return evaluate(y, preds.predicted, preds.classes, proba=preds.proba)
