"""Fine-tuning: the whole network trained end to end with PyTorch Lightning, reported like a head.

Stage 1 fits the seed's softmax head (`heads.SoftmaxHead`) on the cached features, in seconds. Stage 2
puts that head on top of a copy of the backbone and trains both on images: all of the backbone or its
last N stages (`unfreeze`, stages as timm's coarse `group_matcher` defines them: stem, blocks, ...),
earlier stages at lower learning rates (lr x layer_decay^distance from the head), AdamW without weight
decay on biases and norms, linear warmup then cosine (or one-cycle, or constant), early stopping and
best/last checkpoints on the validation split, CSV logs (TensorBoard too when installed), mixed
precision, gradient accumulation, resume from the last checkpoint, and DDP over devices and nodes.
In a study (`fit_method`) checkpoints and logs go to the run folder's methods/finetune/.
The Lightning module, stages, augmentation and schedules are in `finetune.module`.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
import warnings
from numbers import Integral, Real
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn
from torch.utils.data import DataLoader

from ..data.images import ImageError
from ..evaluation.metrics import evaluate, full_proba
from ..features import distributed
from ..features.backbones import Backbone, load_backbone
from ..features.extract import (
    ImageFiles,
    collate,
    default_workers,
    extract_features,
    forward_features,
    resolve_device,
    resolve_precision,
)
from ..heads.seed import SoftmaxHead, balanced_weights
from ..report.format import seconds
from ..report.layout import method_dir
from .module import (
    BN_MODES,
    MONITORS,
    SCHEDULES,
    FineTuneModule,
    LabelledImages,
    lightning_precision,
    loggers,
    parse_augment,
    parse_unfreeze,
    train_transform,
)


class _NoAdverts(logging.Filter):
    """Lightning's Trainer logs a tip to install a cloud logging service on every fit: not about this run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_NoAdverts())  # whichever module's logger rank_zero_info uses


class FineTuner(ClassifierMixin, BaseEstimator):
    """End-to-end fine-tuning as a scikit-learn classifier on image paths.

    `fit(paths, y, valid=(paths, y))`; `predict` / `predict_proba` take image paths. After fitting:
    `head_` (stage 1 SoftmaxHead), `model_` (backbone + linear head, best validation checkpoint),
    `history_` (per stage-2 epoch: epoch, train_loss, train_acc, valid_loss, valid_acc, valid_macro_f1,
    lr, train_seconds, images_per_second), `best_checkpoint_`, `last_checkpoint_`, `stage1_seconds_`,
    `stage2_seconds_`, `images_per_second_` (training throughput over all processes).
    """

    # scikit-learn's parameter validation (`check_options`, and `fit` first): the training options' types and
    # ranges, as the CLI's flags check them; a bad one from a config file failed mid-fit, after the extraction
    _parameter_constraints: dict = {
        "unfreeze": [str, Interval(Integral, 0, None, closed="left")],  # then `parse_unfreeze`
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="left")],  # 0: nothing moves (stage 1 as it is)
        "layer_decay": [Interval(Real, 0, 1, closed="right")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "warmup_epochs": [Interval(Real, 0, None, closed="left")],
        "schedule": [StrOptions(set(SCHEDULES))],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "accumulate": [Interval(Integral, 1, None, closed="left")],
        "augment": [str, None],  # then `parse_augment`
        "crop_scale": [Interval(Real, 0, 1, closed="right")],
        "color_jitter": [Interval(Real, 0, None, closed="left")],
        "bn": [StrOptions(set(BN_MODES))],
        "label_smoothing": [Interval(Real, 0, 1, closed="left")],
        "class_weight": [StrOptions({"balanced"}), None],
        "patience": [Interval(Integral, 0, None, closed="left")],
        "monitor": [StrOptions(set(MONITORS))],
        "head_epochs": [Interval(Integral, 1, None, closed="left")],
        "resume": ["boolean"],
    }

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        weights: str | None = None,
        input_size=None,
        unfreeze="all",
        epochs: int = 10,
        lr: float = 5e-4,
        layer_decay: float = 0.75,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        schedule: str = "cosine",
        batch_size: int = 32,
        accumulate: int = 1,
        augment: str = "crop,flip,color",
        crop_scale: float = 0.5,
        color_jitter: float = 0.2,
        bn: str = "train",
        label_smoothing: float = 0.0,
        class_weight: str | None = None,
        patience: int = 5,
        monitor: str = "val_macro_f1",
        head_epochs: int = 50,
        precision: str = "auto",
        device: str = "auto",
        devices="1",
        num_nodes: int = 1,
        strategy: str = "auto",
        num_workers: int | None = None,
        cache_dir: str | None = None,
        out_dir: str = "runs/finetune",
        resume: bool = False,
        progress: bool = True,
        seed: int = 0,
    ):
        self.backbone = backbone
        self.weights = weights
        self.input_size = input_size
        self.unfreeze = unfreeze
        self.epochs = epochs
        self.lr = lr
        self.layer_decay = layer_decay
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.schedule = schedule
        self.batch_size = batch_size
        self.accumulate = accumulate
        self.augment = augment
        self.crop_scale = crop_scale
        self.color_jitter = color_jitter
        self.bn = bn
        self.label_smoothing = label_smoothing
        self.class_weight = class_weight
        self.patience = patience
        self.monitor = monitor
        self.head_epochs = head_epochs
        self.precision = precision
        self.device = device
        self.devices = devices
        self.num_nodes = num_nodes
        self.strategy = strategy
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.out_dir = out_dir
        self.resume = resume
        self.progress = progress
        self.seed = seed

    # -- stage 1
    def _stage1(self, bb: Backbone, paths, y_idx, valid, features):
        if features is None:
            ex = extract_features(
                list(paths) + list(valid[0] if valid else []),
                bb,
                cache_dir=self.cache_dir,
                precision=self.precision,
                device=self.device,
                num_workers=self.num_workers,
                progress=self.progress and distributed.is_main(),
                strict=True,
            )
            X = ex.features
            features = (X[: len(paths)], X[len(paths) :])
        Xtr, Xva = features
        eval_set = (Xva, valid[1]) if valid is not None and len(valid[1]) else None
        return SoftmaxHead(epochs=self.head_epochs, seed=self.seed).fit(Xtr, self.classes_[y_idx], eval_set=eval_set)

    def check_options(self) -> None:
        """Raise ValueError naming the first training option out of its type or range (scikit-learn's
        `InvalidParameterError`), an unknown augmentation or a bad `unfreeze`; cheap, before any work."""
        self._validate_params()
        parse_augment(self.augment)
        parse_unfreeze(self.unfreeze)

    def fit(self, paths, y, *, valid=None, features=None, backbone: Backbone | None = None, callbacks=()):
        """Stage 1 on cached features (`features=(X_train, X_valid)`, extracted here when absent), then stage 2.

        `valid=(paths, y)` drives early stopping and the best checkpoint; `backbone` reuses a loaded one.
        """
        self.check_options()
        paths = list(paths)
        self.classes_, y_idx = np.unique(np.asarray(y), return_inverse=True)
        if valid is not None:
            keep = np.isin(np.asarray(valid[1]), self.classes_)
            valid = ([p for p, k in zip(valid[0], keep) if k], np.asarray(valid[1])[keep])
            if features is not None:
                features = (features[0], np.asarray(features[1])[keep])
        has_valid = valid is not None and len(valid[1]) > 0
        pl.seed_everything(self.seed, workers=True, verbose=False)
        bb = backbone or load_backbone(self.backbone, weights=self.weights, input_size=self.input_size)

        t0 = time.perf_counter()
        self.head_ = self._stage1(bb, paths, y_idx, valid, features)
        self.stage1_seconds_ = time.perf_counter() - t0

        t0 = time.perf_counter()
        k = len(self.classes_)
        head = nn.Linear(bb.num_features, k)
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(self.head_.coef_))
            head.bias.copy_(torch.from_numpy(self.head_.intercept_))
        weight = (
            torch.tensor(balanced_weights(y_idx, k), dtype=torch.float32) if self.class_weight == "balanced" else None
        )
        meta = {"classes": self.classes_.tolist(), "backbone": bb.describe()}
        module = FineTuneModule(
            copy.deepcopy(bb.model).train().requires_grad_(True),
            head,
            unfreeze=self.unfreeze,
            lr=self.lr,
            layer_decay=self.layer_decay,
            weight_decay=self.weight_decay,
            warmup_epochs=self.warmup_epochs,
            schedule=self.schedule,
            bn=self.bn,
            label_smoothing=self.label_smoothing,
            class_weight=weight,
            meta=meta,
        )
        module.train()

        dev = resolve_device(self.device)
        workers = default_workers(dev) if self.num_workers is None else self.num_workers
        loader = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=dev.type == "cuda")
        train_ds = LabelledImages(paths, y_idx, train_transform(bb, self.augment, self.crop_scale, self.color_jitter))
        per_process = math.ceil(len(train_ds) / self._processes())
        train_dl = DataLoader(
            train_ds,
            batch_size=self.batch_size,
            shuffle=True,  # no lone last image (BatchNorm)
            drop_last=per_process > self.batch_size and per_process % self.batch_size == 1,
            **loader,
        )
        val_dl = None
        if has_valid:
            val_ds = LabelledImages(valid[0], np.searchsorted(self.classes_, valid[1]), bb.transform())
            val_dl = DataLoader(val_ds, batch_size=self.batch_size * 2, shuffle=False, **loader)

        trainer, best_cb, last_cb = self._trainer(dev, has_valid, list(callbacks), len(train_dl))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # frozen BatchNorm, on purpose
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*but have no `val_dataloader`.*")
            warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")  # inside Lightning
            warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
            warnings.filterwarnings("ignore", message='.*ckpt_path="last" is set, but there is no last checkpoint.*')
            trainer.fit(module, train_dl, val_dl, ckpt_path="last" if self.resume else None)

        self.best_checkpoint_ = best_cb.best_model_path
        self.last_checkpoint_ = last_cb.best_model_path
        best = None
        if trainer.is_global_zero and self.best_checkpoint_:
            saved = torch.load(self.best_checkpoint_, map_location="cpu", weights_only=True)
            best = (saved["state_dict"], saved["epoch"] + 1)
        best = trainer.strategy.broadcast(best)  # also when only rank 0 sees the checkpoint folder
        if best is not None:
            module.load_state_dict(best[0])
        self.best_epoch_ = best[1] if best is not None else None
        self.history_ = {k: list(v) for k, v in module.history.items()}
        self.model_ = nn.Sequential(module.backbone, module.head).cpu().eval()
        self.transform_ = bb.transform()
        self.n_features_in_ = bb.num_features
        self.stage2_seconds_ = time.perf_counter() - t0
        ips = [v for v in self.history_["images_per_second"] if not math.isnan(v)]
        self.images_per_second_ = float(np.mean(ips)) if ips else math.nan
        self.epochs_run_ = len(self.history_["epoch"])
        return self

    def _processes(self) -> int:
        if distributed.is_distributed():
            return distributed.world_size()
        devices = distributed.parse_devices(self.devices)
        per_node = len(devices) if isinstance(devices, list) else devices if isinstance(devices, int) else 1
        return max(1, per_node) * max(1, int(self.num_nodes))

    def _trainer(self, dev: torch.device, has_valid: bool, callbacks: list, batches: int):
        from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

        out = Path(self.out_dir)
        ckpt_dir = out / "checkpoints"
        if not self.resume and distributed.is_main():  # a fresh run never resumes from stale files
            for stale in ckpt_dir.glob("*.ckpt"):
                stale.unlink()
        distributed.barrier()
        monitor = self.monitor if has_valid else None
        if monitor is not None and monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {', '.join(MONITORS)}, got '{monitor}'")
        # last.ckpt after every epoch (what --resume continues from); best.ckpt when the monitored metric improves
        last = ModelCheckpoint(
            dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False
        )
        best = (
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="best",
                monitor=monitor,
                mode=MONITORS[monitor],
                save_top_k=1,
                enable_version_counter=False,
            )
            if monitor
            else last
        )
        cbs = [*{id(c): c for c in (best, last)}.values(), LearningRateMonitor(logging_interval="step"), *callbacks]
        if monitor is not None and self.patience and self.patience > 0:
            cbs.append(EarlyStopping(monitor=monitor, mode=MONITORS[monitor], patience=self.patience))
        accelerator, index = distributed.lightning_accelerator(self.device)
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=index or distributed.parse_devices(self.devices),
            num_nodes=int(self.num_nodes),
            strategy="ddp" if self.strategy == "auto" and self._processes() > 1 else self.strategy,
            precision=lightning_precision(self.precision, dev),
            max_epochs=int(self.epochs),
            accumulate_grad_batches=int(self.accumulate),
            callbacks=cbs,
            logger=loggers(out),
            default_root_dir=str(out),
            enable_progress_bar=bool(self.progress),
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=max(1, min(50, batches // max(1, int(self.accumulate)))),
            use_distributed_sampler=True,
        )
        return trainer, best, last

    # -- prediction
    def decision_function(self, paths, batch_size: int = 64):
        """Logits for image paths (evaluation transform, the fit's precision, on this process's device)."""
        check_is_fitted(self, "model_")
        paths = list(paths)
        dev = resolve_device(self.device)
        prec = resolve_precision(self.precision, dev)
        model = self.model_.to(dev).to(memory_format=torch.channels_last).eval()
        workers = default_workers(dev) if self.num_workers is None else self.num_workers
        loader = DataLoader(
            ImageFiles(paths, self.transform_, "plain"),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=dev.type == "cuda",
        )
        out = np.zeros((len(paths), len(self.classes_)), dtype=np.float32)
        for x, idx, failed in loader:
            if failed:
                i, reason = failed[0]
                raise ImageError(paths[i], reason)
            out[idx] = forward_features(model, x, dev, prec).numpy()
        self.model_.cpu()
        return out

    def predict_proba(self, paths):
        return softmax(self.decision_function(paths), axis=1)

    def predict(self, paths):
        return self.classes_[self.decision_function(paths).argmax(axis=1)]


# ---------------------------------------------------------------- the study's `finetune` method

FINETUNE_OPTIONS = (
    "unfreeze",
    "epochs",
    "lr",
    "layer_decay",
    "weight_decay",
    "warmup_epochs",
    "schedule",
    "batch_size",
    "accumulate",
    "augment",
    "crop_scale",
    "color_jitter",
    "bn",
    "label_smoothing",
    "class_weight",
    "patience",
    "monitor",
    "resume",
)


def make_finetuner(cfg) -> FineTuner:
    """A FineTuner from a StudyConfig: its backbone, precision, devices, seed; `cfg.finetune` overrides."""
    opts = dict(getattr(cfg, "finetune", None) or {})
    unknown = set(opts) - set(FINETUNE_OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown fine-tuning option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(FINETUNE_OPTIONS))}"
        )
    return FineTuner(
        backbone=cfg.backbone,
        weights=cfg.weights,
        input_size=cfg.input_size,
        head_epochs=cfg.epochs,
        precision=cfg.precision,
        device=cfg.device,
        devices=getattr(cfg, "devices", 1),
        num_nodes=getattr(cfg, "num_nodes", 1),
        strategy=getattr(cfg, "strategy", "auto"),
        num_workers=cfg.num_workers,
        cache_dir=cfg.cache_dir,
        out_dir=str(method_dir(cfg.out, "finetune")),  # checkpoints and logs beside its report files
        progress=cfg.progress,
        seed=cfg.seed,
        **opts,
    )


def fit_method(cfg, splits, classes: list[str], backbone: Backbone) -> dict:
    """The study's result dict for `finetune`: stage 1 on the cached features, stage 2 and scoring on images."""
    tr, va, te = splits["train"], splits["valid"], splits["test"]
    est = make_finetuner(cfg)
    t0 = time.perf_counter()
    est.fit(tr.paths, tr.y, valid=(va.paths, va.y), features=(tr.X, va.X), backbone=backbone)
    out = {"estimator": est, "train_seconds": time.perf_counter() - t0, "tta": False}  # predicts on plain images
    out["train_note"] = (
        f"stage 1 head on cached features {est.stage1_seconds_:.1f} s; stage 2 end to end on images, "
        f"{est.epochs_run_} epochs, {est.images_per_second_:.1f} training images/s "
        f"over {distributed.world_size()} process(es)"
    )
    out["details"] = {
        "stage1_seconds": est.stage1_seconds_,
        "stage2_seconds": est.stage2_seconds_,
        "epochs_run": est.epochs_run_,
        "best_epoch": est.best_epoch_,
        "train_images_per_second": est.images_per_second_,
        "processes": distributed.world_size(),
        "best_checkpoint": est.best_checkpoint_,
        "last_checkpoint": est.last_checkpoint_,
    }
    if len(va.y):
        out["valid"] = evaluate(va.y, est.predict(va.paths), classes)
    if getattr(cfg, "cv", 0) and cfg.cv >= 2:  # selection then compares K-fold scores, like the heads'
        from ..heads.search import score

        t0 = time.perf_counter()
        paths, y = list(tr.paths) + list(va.paths), np.concatenate([tr.y, va.y])
        pred = cross_val_predict(cfg, paths, y, np.concatenate([tr.X, va.X]), backbone)
        out["cv"] = {"k": cfg.cv, "scores": score(y, pred), "seconds": time.perf_counter() - t0}
    if len(te.y):
        t0 = time.perf_counter()
        proba = full_proba(est, te.paths, len(classes))
        out["predict_seconds"] = time.perf_counter() - t0
        pred = proba.argmax(axis=1).astype(np.int64)
        out["test"] = evaluate(te.y, pred, classes, proba=proba)
        out["test_pred"] = pred
        out["test_proba"] = proba
    return out


class OutOfTime(RuntimeError):
    """Fine-tuning's CV would end past its deadline (`cross_val_predict(deadline=)`): `per_fold` (projected
    seconds a fold), `over` (seconds past the deadline), `epochs_seen` (the epochs the projection rests on)."""

    def __init__(self, per_fold: float, over: float, epochs_seen: int, folds: int):
        super().__init__(
            f"{folds} fine-tunings at ~{per_fold:.0f} s each (projected from {epochs_seen} epoch(s)) would have "
            f"ended {over:.0f} s past its deadline"
        )
        self.per_fold, self.over, self.epochs_seen, self.folds = per_fold, over, epochs_seen, folds


class _Pace(pl.Callback):
    """After each training epoch of a CV fold, the fold's pace projects it and the `left` folds after it. With
    `announce`, the first epoch's projection is printed once (how long the CV will take: minutes a fold on a CPU);
    past `deadline` (a `time.perf_counter()` time) the CV stops with OutOfTime, so a fold that could not be used
    does not spend the time the cheaper work after it needs (one epoch, not a whole fold)."""

    def __init__(self, deadline: float | None, left: int, folds: int, announce: bool = False):
        self.deadline, self.left, self.folds, self.announce = deadline, left, folds, announce

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        seen = trainer.current_epoch + 1
        per_fold = (time.perf_counter() - self.t0) / seen * max(int(trainer.max_epochs), seen)
        end = self.t0 + per_fold * (1 + self.left)
        if self.announce and seen == 1 and distributed.is_main():
            self.announce = False
            print(
                f"transferlab: fine-tuning's {self.folds}-fold CV: ~{seconds(end - time.perf_counter())} more "
                f"(~{seconds(per_fold)} a fold, projected from its first epoch)",
                file=sys.stderr,
            )
        if self.deadline is None:
            return
        over = end - self.deadline
        # every process stops if any is late (as EarlyStopping decides), so none waits alone in a collective
        if trainer.strategy.reduce_boolean_decision(bool(over > 0), all=False):
            raise OutOfTime(per_fold, max(over, 0.0), seen, self.folds)


def cross_val_predict(
    cfg, paths, y, X, backbone: Backbone, folds=None, on_fold=None, deadline: float | None = None
) -> np.ndarray:
    """Out-of-fold predictions of fine-tuning under `cfg.cv`-fold CV: the heads' folds (`selection.cv_folds`).

    Each fold runs both stages from the pretrained backbone on its training share (stage 1 on the cached
    features `X`) for exactly `epochs` epochs: with no validation data there is no early stopping and the
    last epoch is kept. `folds` limits the run to those fold indices (others stay -1); `on_fold(i, pred)` is
    called after each, e.g. to save progress. Fold checkpoints are deleted; their CSV logs are kept in
    OUT/methods/finetune/cv/fold<i>. After the first fold's first epoch its pace projects the CV's time, printed
    once. `deadline` (a `time.perf_counter()` time): after every epoch the pace so far projects the folds left, and
    past it the CV stops with OutOfTime (the stopped fold's checkpoints deleted).
    """
    from ..heads.search import cv_folds

    y = np.asarray(y)
    pred = np.full(len(y), -1, dtype=y.dtype)
    splits = cv_folds(y, int(cfg.cv), cfg.seed)
    todo = [i for i in range(len(splits)) if folds is None or i in folds]
    for i, (a, b) in enumerate(splits):
        if i not in todo:
            continue
        out = method_dir(cfg.out, "finetune") / "cv" / f"fold{i}"
        est = make_finetuner(cfg).set_params(out_dir=str(out), resume=False)
        left = len(todo) - todo.index(i) - 1
        callbacks = [_Pace(deadline, left, len(todo), announce=i == todo[0])]
        try:
            est.fit([paths[j] for j in a], y[a], features=(X[a], X[:0]), backbone=backbone, callbacks=callbacks)
        except OutOfTime:
            if distributed.is_main():
                for ckpt in out.rglob("*.ckpt"):
                    ckpt.unlink(missing_ok=True)
            raise
        pred[b] = est.predict([paths[j] for j in b])
        for ckpt in (est.best_checkpoint_, est.last_checkpoint_):
            if ckpt and distributed.is_main():
                Path(ckpt).unlink(missing_ok=True)
        if on_fold is not None:
            on_fold(i, pred)
    return pred
