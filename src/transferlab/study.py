"""The study: dataset -> cached features -> heads -> evaluation -> report (`transferlab run`).

Every method is fitted on train, watched on valid, and scored on test once at the end. The
defaults reproduce the seed's study (softmax head vs RBF SVM) on the embedded backbone.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import report
from .backbones import DEFAULT_BACKBONE, load_backbone
from .datasets import discover
from .evaluation import evaluate
from .features import extract_features
from .heads import make_head


@dataclass
class StudyConfig:
    data: str
    out: str = "runs/study"
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    methods: list[str] = field(default_factory=lambda: ["softmax", "svm"])
    epochs: int = 50
    seed: int = 0
    input_size: tuple[int, int] | None = None
    precision: str = "auto"
    device: str = "auto"
    batch_size: int = 64
    num_workers: int | None = None
    cache_dir: str | None = None
    valid_fraction: float = 0.1
    test_fraction: float = 0.2
    strict: bool = False
    allow_outside: bool = False
    progress: bool = True


@dataclass
class SplitFeatures:
    X: np.ndarray
    y: np.ndarray
    paths: list[str]


def _seed_everything(seed: int) -> None:
    from lightning.pytorch import seed_everything
    seed_everything(seed, workers=True, verbose=False)


def extract_splits(cfg: StudyConfig, ds, bb) -> tuple[dict[str, SplitFeatures], dict]:
    """Features of every split in one pass; then a second, fully cached pass to time the warm path."""
    all_paths = [s.path for s in ds.samples]
    kw = dict(cache_dir=cfg.cache_dir, precision=cfg.precision, device=cfg.device, batch_size=cfg.batch_size,
              num_workers=cfg.num_workers, strict=cfg.strict)
    first = extract_features(all_paths, bb, progress=cfg.progress, **kw)
    warm = extract_features(all_paths, bb, progress=False, **kw)
    row = {p: i for i, p in enumerate(first.paths)}
    splits = {}
    for name in ("train", "valid", "test"):
        samples = [s for s in ds.split(name) if s.path in row]
        splits[name] = SplitFeatures(X=first.features[[row[s.path] for s in samples]].reshape(len(samples), -1),
                                     y=np.array([s.label for s in samples], dtype=np.int64),
                                     paths=[s.path for s in samples])
    info = {"seconds": first.seconds, "images": len(all_paths), "computed": first.computed,
            "from_cache": first.from_cache, "cached_seconds": warm.seconds, "cold_seconds": first.cold_seconds,
            "images_per_second": first.images_per_second, "precision": first.precision, "device": first.device,
            "skipped": first.skipped}
    return splits, info


def fit_method(name: str, cfg: StudyConfig, splits: dict[str, SplitFeatures], classes: list[str]) -> dict:
    """Fit one head on train, score it on valid and test; returns metrics and the fitted estimator."""
    tr, va, te = splits["train"], splits["valid"], splits["test"]
    est = make_head(name, seed=cfg.seed, epochs=cfg.epochs)
    t0 = time.perf_counter()
    if "eval_set" in inspect.signature(est.fit).parameters:
        est.fit(tr.X, tr.y, eval_set=(va.X, va.y))
    else:
        est.fit(tr.X, tr.y)
    train_seconds = time.perf_counter() - t0
    out = {"estimator": est, "train_seconds": train_seconds}
    if len(va.y):
        out["valid"] = evaluate(va.y, est.predict(va.X), classes)
    if len(te.y):
        t0 = time.perf_counter()
        pred = np.asarray(est.predict(te.X), dtype=np.int64)
        proba = _full_proba(est, te.X, len(classes))
        out["predict_seconds"] = time.perf_counter() - t0
        out["test"] = evaluate(te.y, pred, classes, proba=proba)
        out["test_pred"] = pred
    return out


def _full_proba(est, X, n_classes: int) -> np.ndarray:
    """predict_proba over all classes (an estimator only knows the classes it saw)."""
    p = est.predict_proba(X)
    full = np.zeros((len(X), n_classes), dtype=np.float64)
    full[:, np.asarray(est.classes_, dtype=int)] = p
    return full


def run_study(cfg: StudyConfig) -> dict:
    """Run the whole study and write DIR/report.md, DIR/metrics.json and the plots; returns the metrics."""
    out = Path(cfg.out)
    _seed_everything(cfg.seed)
    ds = discover(cfg.data, seed=cfg.seed, valid_fraction=cfg.valid_fraction, test_fraction=cfg.test_fraction,
                  allow_outside=cfg.allow_outside)
    bb = load_backbone(cfg.backbone, weights=cfg.weights, input_size=cfg.input_size)
    splits, extract_info = extract_splits(cfg, ds, bb)
    if len(np.unique(splits["train"].y)) < 2:
        from .datasets import DatasetError
        raise DatasetError(f"fewer than two classes have readable training images in {cfg.data}")
    results = {}
    for name in cfg.methods:
        _seed_everything(cfg.seed)
        results[name] = fit_method(name, cfg, splits, ds.classes)
    out.mkdir(parents=True, exist_ok=True)
    metrics = report.write(out, cfg=asdict(cfg), dataset=ds, backbone=bb, splits=splits,
                           extract=extract_info, results=results)
    return metrics
