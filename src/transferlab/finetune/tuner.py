"""Fine-tuning: the whole network trained end to end with PyTorch Lightning, reported like a head.

Stage 1 fits the seed's softmax head (`heads.SoftmaxHead`) on the cached features, in seconds. Stage 2
puts that head on top of a copy of the backbone and trains both on images: all of the backbone or its
last N stages (`unfreeze`, stages as timm's coarse `group_matcher` defines them: stem, blocks, ...),
earlier stages at lower learning rates (lr x layer_decay^distance from the head), AdamW without weight
decay on biases and norms, linear warmup then cosine (or one-cycle, or constant), early stopping and
best/last checkpoints on the validation split, CSV logs (TensorBoard too when installed), mixed
precision, gradient accumulation, resume from the last checkpoint, and DDP over devices and nodes.
In a study (`fit_method`) checkpoints and logs go to the run folder's methods/finetune/.

BatchNorm: stages that stay frozen keep their BatchNorm layers in eval mode, so their running
statistics never move (stage 1 never runs the backbone at all); trained stages update theirs, unless
`bn="frozen"` keeps every BatchNorm in eval mode (affine parameters still train).

Augmentation (training only, `augment="crop,flip,color"` or "none"): a random resized crop whose aspect
ratio follows each image's own (x3/4..4/3), squashed to the input size exactly as evaluation squashes
the whole image, so wide boats stay wide; horizontal flip; colour jitter. Evaluation uses the
backbone's plain transform.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from ..features import distributed
from ..features.backbones import Backbone, load_backbone
from ..evaluation.metrics import evaluate, full_proba
from ..features.extract import ImageFiles, collate, default_workers, extract_features, forward_features, resolve_device, resolve_precision
from ..heads.seed import SoftmaxHead, balanced_weights
from ..report.layout import method_dir
from ..data.images import ImageError, load_rgb

AUGMENTATIONS = ("crop", "flip", "color")
SCHEDULES = ("cosine", "onecycle", "constant")
BN_MODES = ("train", "frozen")
MONITORS = {"val_macro_f1": "max", "val_loss": "min", "val_acc": "max"}
LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "valid_macro_f1", "lr",
                "train_seconds", "images_per_second")


# ---------------------------------------------------------------- stages, freezing, BatchNorm

def stage_groups(model: nn.Module) -> dict[str, int]:
    """Parameter and buffer name -> stage index (0 = stem), from timm's coarse group matcher.

    Models without a group matcher are one stage.
    """
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    if not hasattr(model, "group_matcher"):
        return {n: 0 for n in names}
    from timm.models._manipulate import group_with_matcher
    groups = group_with_matcher(((n, None) for n in names), model.group_matcher(coarse=True))
    return {n: stage for stage, members in groups.items() for n in members}


def parse_unfreeze(value) -> int | str:
    """'all' or a number of last stages (0: head only)."""
    if str(value).lower() == "all":
        return "all"
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"unfreeze must be 'all' or a number of last stages, got {value!r}") from None
    if n < 0:
        raise ValueError(f"unfreeze must be >= 0, got {n}")
    return n


def _module_stage(name: str, module: nn.Module, stage_of: dict[str, int]) -> int | None:
    for pname, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        full = f"{name}.{pname}" if name else pname
        if full in stage_of:
            return stage_of[full]
    return None


# ---------------------------------------------------------------- data

class AspectRandomResizedCrop(T.RandomResizedCrop):
    """RandomResizedCrop whose aspect-ratio range is relative to each image's own aspect ratio.

    The crop is then resized (squashed) to `size` like the evaluation transform squashes the whole
    image, so an 800x240 boat is cropped as a wide strip, never as a square.
    """

    def __init__(self, size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), interpolation=T.InterpolationMode.BICUBIC):
        super().__init__(size, scale=scale, ratio=ratio, interpolation=interpolation, antialias=True)

    def forward(self, img):
        w, h = T.functional.get_image_size(img)
        aspect = w / h
        i, j, ch, cw = self.get_params(img, self.scale, (aspect * self.ratio[0], aspect * self.ratio[1]))
        return T.functional.resized_crop(img, i, j, ch, cw, self.size, self.interpolation, antialias=True)


def parse_augment(text) -> tuple[str, ...]:
    if text is None or str(text).strip().lower() in ("", "none", "off"):
        return ()
    parts = tuple(p.strip().lower() for p in str(text).split(",") if p.strip())
    unknown = [p for p in parts if p not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)} or none")
    return parts


def train_transform(backbone: Backbone, augment="crop,flip,color", crop_scale: float = 0.5,
                    color_jitter: float = 0.2):
    """Training-time transform; with no augmentation it is the backbone's evaluation transform."""
    parts = parse_augment(augment)
    if not parts:
        return backbone.transform()
    from timm.data.transforms import str_to_interp_mode
    interp = str_to_interp_mode(backbone.interpolation)
    steps = [AspectRandomResizedCrop(backbone.input_size, scale=(crop_scale, 1.0), interpolation=interp)
             if "crop" in parts else T.Resize(backbone.input_size, interpolation=interp, antialias=True)]
    if "flip" in parts:
        steps.append(T.RandomHorizontalFlip())
    if "color" in parts and color_jitter > 0:
        steps.append(T.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    steps += [T.ToTensor(), T.Normalize(backbone.mean, backbone.std)]
    return T.Compose(steps)


class LabelledImages(Dataset):
    """(image tensor, label, index) for image paths; `images.load_rgb` decodes."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = list(paths), np.asarray(labels, dtype=np.int64), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(load_rgb(self.paths[i])), int(self.labels[i]), i


# ---------------------------------------------------------------- the LightningModule

def lr_lambda(schedule: str, total_steps: int, warmup_steps: int, min_ratio: float = 0.01):
    """Multiplier of each group's base lr at optimizer step s: linear warmup, then cosine or constant."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class FineTuneModule(pl.LightningModule):
    """A timm backbone (pooled features) + a linear head, trained with frozen/unfrozen stages."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, *, unfreeze="all", lr: float = 5e-4,
                 layer_decay: float = 0.75, weight_decay: float = 0.05, warmup_epochs: float = 1.0,
                 schedule: str = "cosine", bn: str = "train", label_smoothing: float = 0.0,
                 class_weight: torch.Tensor | None = None, meta: dict | None = None):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got '{schedule}'")
        if bn not in BN_MODES:
            raise ValueError(f"bn must be one of {', '.join(BN_MODES)}, got '{bn}'")
        self.backbone, self.head = backbone, head
        self.lr, self.layer_decay, self.weight_decay = lr, layer_decay, weight_decay
        self.warmup_epochs, self.schedule, self.label_smoothing = warmup_epochs, schedule, label_smoothing
        self.meta = dict(meta or {})
        self.register_buffer("class_weight", class_weight)
        self.stage_of = stage_groups(backbone)
        self.n_stages = max(self.stage_of.values(), default=0) + 1
        n_open = self.n_stages if parse_unfreeze(unfreeze) == "all" else min(parse_unfreeze(unfreeze), self.n_stages)
        self.first_trained = self.n_stages - n_open  # stages >= this one train
        for name, p in backbone.named_parameters():
            p.requires_grad_(self.stage_of.get(name, self.n_stages - 1) >= self.first_trained)
        head.requires_grad_(True)
        self.frozen_bn = sorted(
            name for name, m in backbone.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (bn == "frozen" or (_module_stage(name, m, self.stage_of) or 0) < self.first_trained))
        self.history: dict[str, list[float]] = {k: [] for k in HISTORY_KEYS}
        self._val: list[tuple[torch.Tensor, ...]] = []
        self._pending: dict | None = None
        self.backbone.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True):
        """Train mode everywhere except the BatchNorm layers of frozen stages (statistics stay fixed)."""
        super().train(mode)
        frozen = set(getattr(self, "frozen_bn", ()))
        if mode and frozen:
            for name, m in self.backbone.named_modules():
                if name in frozen:
                    m.eval()
        return self

    def forward(self, x):
        return self.head(self.backbone(x.contiguous(memory_format=torch.channels_last)))

    # -- optimisation
    def param_groups(self) -> list[dict]:
        """AdamW groups: the head at lr, stage s at lr * layer_decay^(n_stages - s); no weight decay on 1-d params."""
        groups: dict[tuple[int, bool], dict] = {}
        named = [(n, p, self.stage_of.get(n, self.n_stages - 1)) for n, p in self.backbone.named_parameters()]
        named += [(f"head.{n}", p, self.n_stages) for n, p in self.head.named_parameters()]
        for name, p, stage in named:
            if not p.requires_grad:
                continue
            decay = p.ndim > 1
            g = groups.setdefault((stage, decay), {
                "params": [], "name": f"{'head' if stage == self.n_stages else f'stage{stage}'}{'' if decay else '_no_decay'}",
                "lr": self.lr * self.layer_decay ** (self.n_stages - stage),
                "weight_decay": self.weight_decay if decay else 0.0})
            g["params"].append(p)
        return [groups[k] for k in sorted(groups)]

    def configure_optimizers(self):
        groups = self.param_groups()
        opt = torch.optim.AdamW(groups, lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = total / max(1, self.trainer.max_epochs or 1)
        warmup = min(total - 1, int(round(self.warmup_epochs * per_epoch)))
        if self.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=total,
                                                        pct_start=max(0.01, min(0.5, warmup / total)) if warmup else 0.3,
                                                        cycle_momentum=False)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.schedule, total, warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- training
    def on_train_epoch_start(self):
        self._epoch_start = time.perf_counter()
        self._sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self._lrs: list[float] = []
        self._train_seconds = None

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, weight=self.class_weight, label_smoothing=self.label_smoothing)
        self._sums += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                                   torch.tensor(len(y), dtype=torch.float64, device=self.device)])
        self._lrs.append(self.trainer.optimizers[0].param_groups[-1]["lr"])
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def _close_training_part(self) -> None:
        """Training numbers of the epoch (summed over processes); the row waits for validation."""
        if self._pending is not None:
            return
        seconds = self._train_seconds or (time.perf_counter() - self._epoch_start)
        sums = self.trainer.strategy.reduce(self._sums.clone(), reduce_op="sum")
        n = max(1.0, float(sums[2]))
        self._pending = {"epoch": self.current_epoch + 1, "train_loss": float(sums[0]) / n,
                         "train_acc": float(sums[1]) / n, "lr": float(np.mean(self._lrs)) if self._lrs else math.nan,
                         "train_seconds": seconds, "images_per_second": float(sums[2]) / seconds if seconds > 0 else math.nan}

    def _append_row(self, valid: dict) -> None:
        row = {**self._pending, **valid}
        for k in HISTORY_KEYS:
            self.history[k].append(row.get(k, math.nan))
        self._pending = None

    def on_train_epoch_end(self):
        if not self.history["epoch"] or self.history["epoch"][-1] != self.current_epoch + 1:  # no validation ran
            self._close_training_part()
            self._append_row({})

    # -- validation
    def on_validation_epoch_start(self):
        self._val = []
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking and hasattr(self, "_epoch_start"):
            self._train_seconds = time.perf_counter() - self._epoch_start

    def validation_step(self, batch, batch_idx):
        x, y, idx = batch
        logits = self(x).float()
        self._val.append((idx, logits.argmax(1), y, F.cross_entropy(logits, y, reduction="none")))

    def on_validation_epoch_end(self):
        if not self._val:
            return
        idx, pred, y, loss = (torch.cat(t) for t in zip(*self._val))
        self._val = []
        if distributed.is_distributed():  # DistributedSampler pads with repeats: gather, keep each image once
            idx, pred, y, loss = (self.all_gather(t).reshape(-1) for t in (idx, pred, y, loss))
        idx, pred, y, loss = (t.cpu().numpy() for t in (idx, pred, y, loss))
        _, first = np.unique(idx, return_index=True)
        pred, y, loss = pred[first], y[first], loss[first]
        k = self.head.out_features
        m = evaluate(y, pred, [str(c) for c in range(k)])
        valid = {"valid_loss": float(loss.mean()), "valid_acc": m["accuracy"], "valid_macro_f1": m["macro_f1"]}
        self.log("val_loss", valid["valid_loss"], prog_bar=False, sync_dist=False)
        self.log("val_acc", valid["valid_acc"], prog_bar=False, sync_dist=False)
        self.log("val_macro_f1", valid["valid_macro_f1"], prog_bar=True, sync_dist=False)
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self._close_training_part()
            self._append_row(valid)

    # -- checkpoints carry the curves and what is needed to use the model
    def on_save_checkpoint(self, checkpoint):
        checkpoint["transferlab"] = {"history": self.history, **self.meta}

    def on_load_checkpoint(self, checkpoint):
        saved = checkpoint.get("transferlab", {})
        if "history" in saved:
            self.history = {k: list(saved["history"].get(k, [])) for k in HISTORY_KEYS}


# ---------------------------------------------------------------- the estimator

def _loggers(out_dir: Path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    loggers = [CSVLogger(save_dir=str(out_dir), name="logs")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(save_dir=str(out_dir), name="tensorboard"))
    return loggers


def lightning_precision(precision: str, device: torch.device) -> str:
    prec = resolve_precision(precision, device)
    if prec == "fp16" and device.type == "cpu":
        warnings.warn("fp16 autocast is not supported for training on CPU; using bf16-mixed")
        prec = "bf16"
    return LIGHTNING_PRECISION[prec]


class FineTuner(ClassifierMixin, BaseEstimator):
    """End-to-end fine-tuning as a scikit-learn classifier on image paths.

    `fit(paths, y, valid=(paths, y))`; `predict` / `predict_proba` take image paths. After fitting:
    `head_` (stage 1 SoftmaxHead), `model_` (backbone + linear head, best validation checkpoint),
    `history_` (per stage-2 epoch: epoch, train_loss, train_acc, valid_loss, valid_acc, valid_macro_f1,
    lr, train_seconds, images_per_second), `best_checkpoint_`, `last_checkpoint_`, `stage1_seconds_`,
    `stage2_seconds_`, `images_per_second_` (training throughput over all processes).
    """

    def __init__(self, backbone: str = "tf_efficientnet_lite0", weights: str | None = None, input_size=None,
                 unfreeze="all", epochs: int = 10, lr: float = 5e-4, layer_decay: float = 0.75,
                 weight_decay: float = 0.05, warmup_epochs: float = 1.0, schedule: str = "cosine",
                 batch_size: int = 32, accumulate: int = 1, augment: str = "crop,flip,color",
                 crop_scale: float = 0.5, color_jitter: float = 0.2, bn: str = "train", label_smoothing: float = 0.0,
                 class_weight: str | None = None, patience: int = 5, monitor: str = "val_macro_f1",
                 head_epochs: int = 50, precision: str = "auto", device: str = "auto", devices="1",
                 num_nodes: int = 1, strategy: str = "auto", num_workers: int | None = None,
                 cache_dir: str | None = None, out_dir: str = "runs/finetune", resume: bool = False,
                 progress: bool = True, seed: int = 0):
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
            ex = extract_features(list(paths) + list(valid[0] if valid else []), bb, cache_dir=self.cache_dir,
                                  precision=self.precision, device=self.device, num_workers=self.num_workers,
                                  progress=self.progress and distributed.is_main(), strict=True)
            X = ex.features
            features = (X[:len(paths)], X[len(paths):])
        Xtr, Xva = features
        eval_set = (Xva, valid[1]) if valid is not None and len(valid[1]) else None
        return SoftmaxHead(epochs=self.head_epochs, seed=self.seed).fit(Xtr, self.classes_[y_idx], eval_set=eval_set)

    def fit(self, paths, y, *, valid=None, features=None, backbone: Backbone | None = None, callbacks=()):
        """Stage 1 on cached features (`features=(X_train, X_valid)`, extracted here when absent), then stage 2.

        `valid=(paths, y)` drives early stopping and the best checkpoint; `backbone` reuses a loaded one.
        """
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
        weight = (torch.tensor(balanced_weights(y_idx, k), dtype=torch.float32)
                  if self.class_weight == "balanced" else None)
        meta = {"classes": self.classes_.tolist(), "backbone": bb.describe()}
        module = FineTuneModule(copy.deepcopy(bb.model).train().requires_grad_(True), head, unfreeze=self.unfreeze,
                                lr=self.lr, layer_decay=self.layer_decay, weight_decay=self.weight_decay,
                                warmup_epochs=self.warmup_epochs, schedule=self.schedule, bn=self.bn,
                                label_smoothing=self.label_smoothing, class_weight=weight, meta=meta)
        module.train()

        dev = resolve_device(self.device)
        workers = default_workers(dev) if self.num_workers is None else self.num_workers
        loader = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=dev.type == "cuda")
        train_ds = LabelledImages(paths, y_idx, train_transform(bb, self.augment, self.crop_scale, self.color_jitter))
        per_process = math.ceil(len(train_ds) / self._processes())
        train_dl = DataLoader(train_ds, batch_size=self.batch_size, shuffle=True,  # no lone last image (BatchNorm)
                              drop_last=per_process > self.batch_size and per_process % self.batch_size == 1, **loader)
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
            warnings.filterwarnings("ignore", message=".*ckpt_path=\"last\" is set, but there is no last checkpoint.*")
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
        last = ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
        best = (ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode=MONITORS[monitor], save_top_k=1,
                                enable_version_counter=False) if monitor else last)
        cbs = [*{id(c): c for c in (best, last)}.values(), LearningRateMonitor(logging_interval="step"), *callbacks]
        if monitor is not None and self.patience and self.patience > 0:
            cbs.append(EarlyStopping(monitor=monitor, mode=MONITORS[monitor], patience=self.patience))
        accelerator, index = distributed.lightning_accelerator(self.device)
        trainer = pl.Trainer(
            accelerator=accelerator, devices=index or distributed.parse_devices(self.devices),
            num_nodes=int(self.num_nodes),
            strategy="ddp" if self.strategy == "auto" and self._processes() > 1 else self.strategy, precision=lightning_precision(self.precision, dev),
            max_epochs=int(self.epochs), accumulate_grad_batches=int(self.accumulate), callbacks=cbs,
            logger=_loggers(out), default_root_dir=str(out), enable_progress_bar=bool(self.progress),
            enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=max(1, min(50, batches // max(1, int(self.accumulate)))),
            use_distributed_sampler=True)
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
        loader = DataLoader(ImageFiles(paths, self.transform_, "plain"), batch_size=batch_size, num_workers=workers,
                            collate_fn=collate, pin_memory=dev.type == "cuda")
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

FINETUNE_OPTIONS = ("unfreeze", "epochs", "lr", "layer_decay", "weight_decay", "warmup_epochs", "schedule",
                    "batch_size", "accumulate", "augment", "crop_scale", "color_jitter", "bn", "label_smoothing",
                    "class_weight", "patience", "monitor", "resume")


def make_finetuner(cfg) -> FineTuner:
    """A FineTuner from a StudyConfig: its backbone, precision, devices, seed; `cfg.finetune` overrides."""
    opts = dict(getattr(cfg, "finetune", None) or {})
    unknown = set(opts) - set(FINETUNE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown fine-tuning option(s) {', '.join(sorted(unknown))}")
    return FineTuner(backbone=cfg.backbone, weights=cfg.weights, input_size=cfg.input_size, head_epochs=cfg.epochs,
                     precision=cfg.precision, device=cfg.device, devices=getattr(cfg, "devices", 1),
                     num_nodes=getattr(cfg, "num_nodes", 1), strategy=getattr(cfg, "strategy", "auto"),
                     num_workers=cfg.num_workers, cache_dir=cfg.cache_dir,
                     out_dir=str(method_dir(cfg.out, "finetune")),  # checkpoints and logs beside its report files
                     progress=cfg.progress, seed=cfg.seed, **opts)


def fit_method(cfg, splits, classes: list[str], backbone: Backbone) -> dict:
    """The study's result dict for `finetune`: stage 1 on the cached features, stage 2 and scoring on images."""
    tr, va, te = splits["train"], splits["valid"], splits["test"]
    est = make_finetuner(cfg)
    t0 = time.perf_counter()
    est.fit(tr.paths, tr.y, valid=(va.paths, va.y), features=(tr.X, va.X), backbone=backbone)
    out = {"estimator": est, "train_seconds": time.perf_counter() - t0, "tta": False}  # predicts on plain images
    out["train_note"] = (f"stage 1 head on cached features {est.stage1_seconds_:.1f} s; stage 2 end to end on images, "
                         f"{est.epochs_run_} epochs, {est.images_per_second_:.1f} training images/s "
                         f"over {distributed.world_size()} process(es)")
    out["details"] = {"stage1_seconds": est.stage1_seconds_, "stage2_seconds": est.stage2_seconds_,
                      "epochs_run": est.epochs_run_, "best_epoch": est.best_epoch_,
                      "train_images_per_second": est.images_per_second_, "processes": distributed.world_size(),
                      "best_checkpoint": est.best_checkpoint_, "last_checkpoint": est.last_checkpoint_}
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


def cross_val_predict(cfg, paths, y, X, backbone: Backbone, folds=None, on_fold=None) -> np.ndarray:
    """Out-of-fold predictions of fine-tuning under `cfg.cv`-fold CV: the heads' folds (`selection.cv_folds`).

    Each fold runs both stages from the pretrained backbone on its training share (stage 1 on the cached
    features `X`) for exactly `epochs` epochs: with no validation data there is no early stopping and the
    last epoch is kept. `folds` limits the run to those fold indices (others stay -1); `on_fold(i, pred)` is
    called after each, e.g. to save progress. Fold checkpoints are deleted; their CSV logs are kept in
    OUT/methods/finetune/cv/fold<i>.
    """
    from ..heads.search import cv_folds
    y = np.asarray(y)
    pred = np.full(len(y), -1, dtype=y.dtype)
    for i, (a, b) in enumerate(cv_folds(y, int(cfg.cv), cfg.seed)):
        if folds is not None and i not in folds:
            continue
        est = make_finetuner(cfg).set_params(out_dir=str(method_dir(cfg.out, "finetune") / "cv" / f"fold{i}"),
                                             resume=False)
        est.fit([paths[j] for j in a], y[a], features=(X[a], X[:0]), backbone=backbone)
        pred[b] = est.predict([paths[j] for j in b])
        for ckpt in (est.best_checkpoint_, est.last_checkpoint_):
            if ckpt and distributed.is_main():
                Path(ckpt).unlink(missing_ok=True)
        if on_fold is not None:
            on_fold(i, pred)
    return pred
