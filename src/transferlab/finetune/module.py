"""The Lightning side of fine-tuning: which backbone stages train, the training augmentation, the learning-rate
schedule and `FineTuneModule` (one training/validation step, layer-wise learning rates, BatchNorm handling).

BatchNorm: stages that stay frozen keep their BatchNorm layers in eval mode, so their running
statistics never move (stage 1 never runs the backbone at all); trained stages update theirs, unless
`bn="frozen"` keeps every BatchNorm in eval mode (affine parameters still train).

Augmentation (training only, `augment="crop,flip,color"` or "none"): a random resized crop whose aspect
ratio follows each image's own (x3/4..4/3), squashed to the input size exactly as evaluation squashes
the whole image, so wide boats stay wide; horizontal flip; colour jitter. Evaluation uses the
backbone's plain transform.
"""

from __future__ import annotations

import importlib.util
import math
import random
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms as T

from ..data.images import load_rgb
from ..evaluation.metrics import evaluate
from ..features import distributed
from ..features.backbones import Backbone
from ..features.extract import resize_target, resolve_precision

AUGMENTATIONS = ("crop", "flip", "color")
SCHEDULES = ("cosine", "onecycle", "constant")
BN_MODES = ("train", "frozen")
MONITORS = {"val_macro_f1": "max", "val_loss": "min", "val_acc": "max"}
LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
HISTORY_KEYS = (
    "epoch",
    "train_loss",
    "train_acc",
    "valid_loss",
    "valid_acc",
    "valid_macro_f1",
    "lr",
    "train_seconds",
    "images_per_second",
)


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


def module_stage(name: str, module: nn.Module, stage_of: dict[str, int]) -> int | None:
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
        raise ValueError(
            f"unknown augmentation(s) {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)} or none"
        )
    return parts


def train_transform(backbone: Backbone, augment="crop,flip,color", crop_scale: float = 0.5, color_jitter: float = 0.2):
    """Training-time transform; with no augmentation it is the backbone's evaluation transform."""
    parts = parse_augment(augment)
    if not parts:
        return backbone.transform()
    from timm.data.transforms import str_to_interp_mode

    interp = str_to_interp_mode(backbone.interpolation)
    steps = [
        AspectRandomResizedCrop(backbone.input_size, scale=(crop_scale, 1.0), interpolation=interp)
        if "crop" in parts
        else T.Resize(backbone.input_size, interpolation=interp, antialias=True)
    ]
    if "flip" in parts:
        steps.append(T.RandomHorizontalFlip())
    if "color" in parts and color_jitter > 0:
        steps.append(T.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    steps += [T.ToTensor(), T.Normalize(backbone.mean, backbone.std)]
    return T.Compose(steps)


def decode_target(transform) -> tuple[int, int] | None:
    """What `load_rgb(reduce_to=)` may reduce a large JPEG to before `transform`: for a random crop
    (`AspectRandomResizedCrop`), the output size divided by the smallest share of the image's width and height a crop
    can take (sqrt(scale * ratio) and sqrt(scale / ratio) at the range ends), so even the smallest crop keeps
    `REDUCE_MARGIN` pixels per output pixel, as the whole image does at evaluation; otherwise extraction's rule
    (`resize_target`: the evaluation transform's fixed size); None: decode in full."""
    first = next(iter(getattr(transform, "transforms", ())), None)
    if isinstance(first, AspectRandomResizedCrop):
        h, w = first.size
        smallest = min(first.scale)
        share_w, share_h = math.sqrt(smallest * min(first.ratio)), math.sqrt(smallest / max(first.ratio))
        return math.ceil(w / min(share_w, 1.0)), math.ceil(h / min(share_h, 1.0))
    return resize_target(transform)


class LabelledImages(Dataset):
    """(image tensor, label, index) for image paths; `images.load_rgb` decodes, large JPEGs at reduced scale as far as
    `transform` allows (`decode_target`)."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = list(paths), np.asarray(labels, dtype=np.int64), transform
        self.reduce_to = decode_target(transform)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(load_rgb(self.paths[i], self.reduce_to)), int(self.labels[i]), i


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

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Linear,
        *,
        unfreeze="all",
        lr: float = 5e-4,
        layer_decay: float = 0.75,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        schedule: str = "cosine",
        bn: str = "train",
        label_smoothing: float = 0.0,
        class_weight: torch.Tensor | None = None,
        meta: dict | None = None,
    ):
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
            name
            for name, m in backbone.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (bn == "frozen" or (module_stage(name, m, self.stage_of) or 0) < self.first_trained)
        )
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
            g = groups.setdefault(
                (stage, decay),
                {
                    "params": [],
                    "name": f"{'head' if stage == self.n_stages else f'stage{stage}'}{'' if decay else '_no_decay'}",
                    "lr": self.lr * self.layer_decay ** (self.n_stages - stage),
                    "weight_decay": self.weight_decay if decay else 0.0,
                },
            )
            g["params"].append(p)
        return [groups[k] for k in sorted(groups)]

    def configure_optimizers(self):
        groups = self.param_groups()
        opt = torch.optim.AdamW(groups, lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = total / max(1, self.trainer.max_epochs or 1)
        warmup = min(total - 1, int(round(self.warmup_epochs * per_epoch)))
        if self.schedule == "onecycle":
            pct = max(0.01, min(0.5, warmup / total)) if warmup else 0.3
            if abs(pct * total - 1) < 1e-9:  # a one-step warm-up: OneCycleLR's rising phase would end at step 0 and
                pct = 2 / total if total > 2 else 0.75  # divide by its zero length (seen: 1 epoch of 2 batches)
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=[g["lr"] for g in groups], total_steps=total, pct_start=pct, cycle_momentum=False
            )
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
        self._sums += torch.stack(
            [
                loss.detach().double() * len(y),
                (logits.argmax(1) == y).sum().double(),
                torch.tensor(len(y), dtype=torch.float64, device=self.device),
            ]
        )
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
        self._pending = {
            "epoch": self.current_epoch + 1,
            "train_loss": float(sums[0]) / n,
            "train_acc": float(sums[1]) / n,
            "lr": float(np.mean(self._lrs)) if self._lrs else math.nan,
            "train_seconds": seconds,
            "images_per_second": float(sums[2]) / seconds if seconds > 0 else math.nan,
        }

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

    # -- checkpoints carry the curves, the random state and what is needed to use the model
    def on_save_checkpoint(self, checkpoint):
        checkpoint["transferlab"] = {"history": self.history, "rng": rng_states(), **self.meta}

    def on_load_checkpoint(self, checkpoint):
        saved = checkpoint.get("transferlab", {})
        if "history" in saved:
            self.history = {k: list(saved["history"].get(k, [])) for k in HISTORY_KEYS}
        if "rng" in saved:  # resume draws the same shuffles (and dropout) as an uninterrupted run
            set_rng_states(saved["rng"])


def rng_states() -> dict:
    """torch, CUDA, NumPy and Python random states, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------- the estimator


def loggers(out_dir: Path):
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
