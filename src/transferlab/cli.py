"""Command line: `transferlab run | demo | extract | compare | predict | export`."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import uuid
import warnings
from pathlib import Path

from .config import ConfigError
from .data.datasets import DatasetError, DatasetWarning
from .features.backbones import DEFAULT_BACKBONE, EMBEDDED, BackboneError, parse_size
from .features.cache import default_cache_dir
from .features.options import PRECISIONS, RUNTIMES, ExtractionError
from .progress import started, starting


class OutputError(OSError):
    """The report folder cannot be written (found before any extraction, not after)."""


USER_ERRORS = (
    DatasetError,
    BackboneError,
    ExtractionError,
    FileExistsError,
    FileNotFoundError,
    ConfigError,
    OutputError,
    PermissionError,
    NotADirectoryError,
)


def _check_writable(folder, what: str = "the report folder") -> None:
    """Fail now, not after minutes of extraction, when the report (or cache) folder cannot be written."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write {what} {path}: it is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".transferlab-write-check-{uuid.uuid4().hex}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {exc.strerror or exc}") from None


def _check_cache(cache_dir) -> None:
    """`--cache-dir` (or the default) must be a folder that can be written: it was a traceback-like
    "[Errno 20] Not a directory: 'afile/onnx'" when it named a file."""
    from .features.cache import default_cache_dir

    if cache_dir is False:
        return
    path = Path(cache_dir or default_cache_dir())
    what = "the feature cache folder (--cache-dir)"
    if path.is_dir():
        _check_writable(path, what)
        return
    above = next(p for p in [path, *path.parents] if p.exists())  # not created here: the first feature does that
    if not above.is_dir():
        where = "it" if above == path else str(above)
        raise OutputError(f"cannot write {what} {path}: {where} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {path}: {above} is not writable")


def _similarity(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a cosine similarity in (0, 1], got {text}")
    return value


def _number(convert, ok, what: str):
    """An argparse `type=`: `convert` the text, then refuse it unless `ok(value)`, naming the value given."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what
    return parse


_positive_int = _number(int, lambda n: n >= 1, "a positive integer")


def _duration(text: str) -> float:
    from .evaluation.budget import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_count = _number(int, lambda n: n >= 0, "an integer >= 0")
_seed = _number(int, lambda n: 0 <= n < 2**32, "a seed in [0, 2**32)")
_folds = _number(int, lambda n: n == 0 or n >= 2, "0 (off) or a number of folds >= 2")
_fraction = _number(float, lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)")  # 0: no such split
_share = _number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
_positive = _number(float, lambda v: 0.0 < v < math.inf, "a positive number")
_non_negative = _number(float, lambda v: 0.0 <= v < math.inf, "a number >= 0")
CONFIG_NUMBERS = {
    "epochs": _positive_int,
    "seed": _seed,
    "batch_size": _positive_int,
    "num_workers": _count,
    "valid_fraction": _fraction,
    "test_fraction": _fraction,
    "cv": _folds,
    "num_nodes": _positive_int,
    "dup_threshold": _similarity,
}  # the same checks for a config file's values


def _check_numbers(cfg, source) -> None:
    """A config file's numbers pass the checks their flags have (`--epochs -3` and `epochs: -3` alike)."""
    for name, check in CONFIG_NUMBERS.items():
        value = getattr(cfg, name)
        if value is None and name in ("num_workers", "batch_size"):
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (check in (_positive_int, _count, _seed, _folds) and not isinstance(value, int))
        ):
            raise ConfigError(f"{source}: {name} must be a number, got {value!r}")
        try:
            check(str(value))
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{source}: {name} {exc}") from None


def _devices(text: str) -> str:
    """--devices: Lightning's forms, checked before any work ('many' was Lightning's TypeError traceback)."""
    t = str(text).strip()
    if not re.fullmatch(r"auto|-1|[1-9]\d*|(\d+\s*,\s*)+\d*", t):
        raise argparse.ArgumentTypeError(f"must be auto, a number of devices, -1 (all) or ids like 0,1, got {text!r}")
    return t


CONFIG_BOOLS = ("strict", "allow_outside", "progress", "tta", "data_efficiency", "flip_train")
CONFIG_TEXTS = ("data", "out", "backbone", "weights", "cache_dir", "precision", "device", "runtime", "strategy")
CONFIG_TEXTS += ("select_metric", "selection", "preset")


def _check_types(cfg, source) -> None:
    """A config file's switches, names and mappings have the types their flags give (`tta: yes_please` was taken
    for true, `weights: 12` and `finetune: 3` were tracebacks), and its heads' hyperparameters exist and have
    their defaults' kinds (`methods: {svm: {C: big}}` failed in the fit, after extraction)."""
    for name in CONFIG_BOOLS:
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{source}: {name} must be true or false, got {getattr(cfg, name)!r}")
    for name in CONFIG_TEXTS:
        value = getattr(cfg, name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{source}: {name} must be text, got {value!r}")
    try:
        _devices(cfg.devices)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"{source}: devices {exc}") from None
    for name in ("finetune", "params"):
        if not isinstance(getattr(cfg, name), dict):
            raise ConfigError(f"{source}: {name} must be a mapping of settings, got {getattr(cfg, name)!r}")
    _check_params(cfg.params, source)


def _same_kind(value, default) -> bool:
    if default is None or isinstance(default, (tuple, list, dict)):
        return True  # e.g. class_weight: None or "balanced"; scikit-learn checks it in the fit
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return value is None or isinstance(value, type(default))


def _check_params(params: dict, source) -> None:
    """Each head's hyperparameters (`methods: {svm: {C: 2}}`): a known method, known names, the defaults' kinds."""
    from .heads.registry import get, make_head

    for name, given in params.items():
        try:
            info = get(name)
        except ValueError as exc:
            raise ConfigError(f"{source}: methods: {exc}") from None
        if not isinstance(given, dict):
            raise ConfigError(f"{source}: methods.{name} must be a mapping of hyperparameters, got {given!r}")
        if info.build is None:  # fine-tuning's settings are under `finetune`
            continue
        defaults = make_head(name).get_params(deep=False)
        for key, value in given.items():
            if key not in defaults:
                raise ConfigError(
                    f"{source}: methods.{name}.{key} is not a hyperparameter of {name} "
                    f"(known: {', '.join(sorted(defaults))})"
                )
            if not _same_kind(value, defaults[key]):
                kind = "true or false" if isinstance(defaults[key], bool) else f"a {type(defaults[key]).__name__}"
                raise ConfigError(
                    f"{source}: methods.{name}.{key} must be {kind} like its default {defaults[key]!r}, got {value!r}"
                )


def _check_choices(cfg, source) -> None:
    """A config file's named choices pass the checks their flags have (`--schedule linear` and `schedule: linear`
    alike), against the `run` flag's own choices, before any work: a bad one failed in a traceback after extraction."""
    from .config import DEST_TO_FIELD

    run = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    ft = cfg.finetune or {}
    for action in run._actions:
        if not action.choices:
            continue
        field = DEST_TO_FIELD.get(action.dest, action.dest)
        if hasattr(cfg, field):
            name, value = field, getattr(cfg, field)
        else:  # a fine-tuning flag: finetune.<dest>, or without its "ft_" (config.merge's rule)
            key = next((k for k in (action.dest, action.dest.removeprefix("ft_")) if k in ft), None)
            if key is None:
                continue
            name, value = f"finetune.{key}", ft[key]
        if value is not None and value not in action.choices:
            raise ConfigError(f"{source}: {name} must be one of {', '.join(map(str, action.choices))}, got {value!r}")


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        help=f"timm model name, e.g. resnet50.tv_in1k (default {DEFAULT_BACKBONE}; offline: {', '.join(EMBEDDED)})",
    )
    p.add_argument("--weights", help="local weights file (.safetensors or .pth, loaded without pickle), or 'random'")
    p.add_argument(
        "--input-size",
        help="HxW fed to the backbone, e.g. 224x224 (default: the training images' median aspect at the model's "
        "pretrained scale, e.g. 224x736 for 800x240 images); run: 'auto' also tries the pretrained square and "
        "keeps the size with the better repeated-CV score",
    )
    _add_runtime_args(p)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    """How features are computed and cached (extraction and prediction alike)."""
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="precision (auto: fp32 with ONNX Runtime, else bf16/fp16 autocast where native)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument(
        "--runtime",
        default="auto",
        choices=RUNTIMES,
        help="frozen backbone's runtime (auto: ONNX Runtime fp32 on CPU, torch on CUDA/MPS; "
        "falls back to torch where the backbone does not export)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="images per forward pass (default: per runtime, 16 per ONNX Runtime lane, 64 for torch)",
    )
    p.add_argument("--workers", type=_count, default=None, help="DataLoader decoding workers (default: by device)")
    p.add_argument(
        "--cache-dir", default=None, help=f"feature cache (default {default_cache_dir()}, or $TRANSFERLAB_CACHE)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="heads, fine-tuning and the validation carve (the test split of class folders ignores it)",
    )
    p.add_argument(
        "--valid-fraction",
        type=_fraction,
        default=0.1,
        help="carved from train when there is no valid/ (0: no validation split)",
    )
    p.add_argument(
        "--test-fraction",
        type=_fraction,
        default=0.2,
        help="for a root of class folders with no splits (0: no test split)",
    )
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of skipping it")
    p.add_argument("--allow-outside", action="store_true", help="let a CSV manifest name files outside its folder")


def _add_scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--devices", type=_devices, default="1", help="processes per node through Lightning, e.g. 4 GPUs (default 1)"
    )
    p.add_argument(
        "--num-nodes", type=_positive_int, default=1, help="nodes (launch with torchrun or SLURM: see docs/finetune.md)"
    )
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp (auto: ddp when several processes)")


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning (method 'finetune')")
    g.add_argument(
        "--unfreeze", default="all", help="backbone stages trained in stage 2: all, or the last N (0: head only)"
    )
    g.add_argument("--ft-epochs", type=_positive_int, default=10, help="stage 2 epochs (early stopping may end sooner)")
    g.add_argument(
        "--ft-lr", type=_positive, default=5e-4, help="AdamW learning rate of the head; stages below get less"
    )
    g.add_argument("--layer-decay", type=_share, default=0.75, help="lr factor per stage further from the head")
    g.add_argument("--ft-weight-decay", type=_non_negative, default=0.05)
    g.add_argument("--warmup-epochs", type=_non_negative, default=1.0, help="linear warmup, then the schedule")
    g.add_argument("--schedule", default="cosine", choices=("cosine", "onecycle", "constant"))
    g.add_argument("--ft-batch-size", type=_positive_int, default=32, help="images per step and process")
    g.add_argument("--accumulate", type=_positive_int, default=1, help="gradient accumulation steps")
    g.add_argument(
        "--augment", default="crop,flip,color", help="training augmentation: any of crop,flip,color, or none"
    )
    g.add_argument(
        "--crop-scale", type=_share, default=0.5, help="smallest crop area fraction of the random resized crop"
    )
    g.add_argument(
        "--color-jitter", type=_non_negative, default=0.2, help="brightness/contrast/saturation jitter strength"
    )
    g.add_argument(
        "--bn",
        default="train",
        choices=("train", "frozen"),
        help="BatchNorm statistics of trained stages: train (update) or frozen (frozen stages never update)",
    )
    g.add_argument(
        "--ft-class-weight",
        default=None,
        choices=("balanced",),
        help="stage 2 loss weights: balanced (inverse class frequency); default unweighted",
    )
    g.add_argument("--label-smoothing", type=_fraction, default=0.0, help="stage 2 cross-entropy label smoothing")
    g.add_argument("--patience", type=_count, default=5, help="early stopping patience in epochs (0: off)")
    g.add_argument(
        "--monitor",
        default="val_macro_f1",
        choices=("val_macro_f1", "val_loss", "val_acc"),
        help="validation metric for early stopping and the best checkpoint",
    )
    g.add_argument(
        "--resume", action="store_true", help="continue stage 2 from OUT/methods/finetune/checkpoints/last.ckpt"
    )
    _add_scale_args(p)


def _finetune_options(args) -> dict:
    """StudyConfig fields for fine-tuning and scale-out (empty for parsers without those flags)."""
    if not hasattr(args, "ft_epochs"):
        return {}
    return {
        "devices": args.devices,
        "num_nodes": args.num_nodes,
        "strategy": args.strategy,
        "finetune": {
            "unfreeze": args.unfreeze,
            "epochs": args.ft_epochs,
            "lr": args.ft_lr,
            "layer_decay": args.layer_decay,
            "weight_decay": args.ft_weight_decay,
            "warmup_epochs": args.warmup_epochs,
            "schedule": args.schedule,
            "batch_size": args.ft_batch_size,
            "accumulate": args.accumulate,
            "augment": args.augment,
            "crop_scale": args.crop_scale,
            "color_jitter": args.color_jitter,
            "bn": args.bn,
            "class_weight": args.ft_class_weight,
            "label_smoothing": args.label_smoothing,
            "patience": args.patience,
            "monitor": args.monitor,
            "resume": args.resume,
        },
    }


def _launch(args) -> None:
    """Start or join the processes that --devices/--num-nodes/--strategy ask for (no-op for one)."""
    from .features.distributed import launch

    launch(device=args.device, devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy)


def _add_selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--select-metric",
        default="macro_f1",
        choices=("macro_f1", "accuracy", "balanced_accuracy"),
        help="validation metric that tunes the heads' grids and selects the method (default macro_f1)",
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="features = mean of the image's and its horizontal flip's (flipped features cached too)",
    )
    p.add_argument(
        "--flip-train",
        action="store_true",
        help="heads also train on each training image's flipped features and predict on the mean of "
        "both views (flipped features cached too)",
    )
    p.add_argument(
        "--cv",
        type=_folds,
        default=0,
        metavar="K",
        help="tune and select by K-fold stratified CV over train + valid (pooled out-of-fold scores) "
        "instead of the validation split; final models are still fitted on train (default 0: off)",
    )
    p.add_argument(
        "--preset",
        choices=("quick", "best"),
        default="quick",
        help="quick (default): heads on the frozen features; best: also end-to-end fine-tuning (`finetune`), "
        "scored by the same CV on its first repeat's folds (hours on a CPU: see --time-budget)",
    )
    p.add_argument(
        "--time-budget",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="wall time for the run, e.g. 90s, 10m, 1.5h: after extraction, work runs cheapest first and what "
        "would not fit is skipped and listed in the report (default: no limit)",
    )
    p.add_argument(
        "--selection",
        choices=("auto", "repeated-cv", "validation", "kfold"),
        default="auto",
        help="how the method is chosen: repeated-cv (repeated stratified K-fold on train + valid, honest tuned "
        "scores, the best CV score wins), validation (the validation split), kfold (--cv K); auto: repeated-cv for "
        "--methods auto, else validation (kfold with --cv)",
    )
    p.add_argument(
        "--no-data-efficiency",
        dest="data_efficiency",
        action="store_false",
        help="skip the selected head's data-efficiency curve",
    )


def _methods_help() -> str:
    from .heads import registry

    by_kind = [f"{kind}: {','.join(registry.names(kind))}" for kind in registry.KINDS if registry.names(kind)]
    return "; ".join(by_kind) + "; 'all' is every method but end-to-end ones"


METHODS_HELP = "{the registered methods}"  # filled in only when help is shown: the registry imports torch (~3 s)


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, with the method list read from the registry when a help text is printed, not when the parser is
    built: an argument error or `compare` does not wait for torch and scikit-learn to load."""

    def _get_help_string(self, action) -> str:
        text = super()._get_help_string(action) or ""
        return text.replace(METHODS_HELP, _methods_help()) if METHODS_HELP in text else text


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help (its subcommands' too: they are made of its class) uses `_HelpFormatter`."""

    def __init__(self, *args, formatter_class=_HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="transferlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the frozen-backbone study: extract (cached), train heads, evaluate, report")
    run.add_argument("data", nargs="?", help="ImageFolder root, root of class folders, or CSV manifest")
    run.add_argument(
        "--config", help="a run's config.yaml (or your own YAML): rerun that study; flags given here override it"
    )
    run.add_argument("--out", default="runs/study", help="report folder")
    run.add_argument(
        "--methods",
        default="auto",
        help="comma-separated methods, 'auto' (the default: the seed's two as baselines and the candidates, "
        "chosen by repeated CV) or 'all' (" + METHODS_HELP + ")",
    )
    run.add_argument("--epochs", type=_positive_int, default=50, help="softmax head epochs")
    _add_selection_args(run)
    run.add_argument(
        "--dup-threshold",
        type=_similarity,
        default=0.95,
        help="leakage check: feature cosine similarity counted as a near-duplicate across splits",
    )
    _add_backbone_args(run)
    _add_data_args(run)
    _add_finetune_args(run)

    ft = sub.add_parser(
        "finetune",
        help="fine-tune end to end (stage 1: softmax head on cached features), "
        "reported beside the frozen softmax head; same options as run",
    )
    ft.add_argument("data", help="ImageFolder root, root of class folders, or CSV manifest")
    ft.add_argument(
        "--out", default="runs/finetune", help="report folder (checkpoints and logs in OUT/methods/finetune)"
    )
    ft.add_argument("--methods", default="softmax,finetune", help="comma-separated methods")
    ft.add_argument("--epochs", type=_positive_int, default=50, help="softmax head epochs (stage 1)")
    _add_backbone_args(ft)
    _add_data_args(ft)
    _add_finetune_args(ft)

    demo = sub.add_parser("demo", help="build the offline demo data set and run the study on it")
    demo.add_argument("--out", default="demo_run", help="folder for the demo data and its report")
    demo.add_argument("--seed", type=_seed, default=0)
    demo.add_argument("--no-progress", action="store_true")

    ext = sub.add_parser("extract", help="extract (and cache) features only; optionally save them as .npz")
    ext.add_argument("data")
    ext.add_argument("--save", help="write features, labels, paths and splits to this .npz file")
    ext.add_argument(
        "--chunk-size", type=_positive_int, default=512, help="images per cache chunk (work kept if interrupted)"
    )
    _add_backbone_args(ext)
    _add_data_args(ext)
    _add_scale_args(ext)

    cmp = sub.add_parser("compare", help="one table across runs (e.g. backbones or input sizes on the same data)")
    cmp.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="folders written by `transferlab run`, or a folder of them"
    )
    cmp.add_argument("--out", help="also write compare.md and compare.html into this folder")

    pred = sub.add_parser("predict", help="apply a saved model bundle (RUN/models/METHOD) to images and folders")
    pred.add_argument(
        "bundle", help="bundle folder, e.g. runs/study/models/softmax, or a run folder (its selected method's)"
    )
    pred.add_argument("images", nargs="+", help="image files and folders (searched recursively)")
    pred.add_argument(
        "--out",
        default="predictions.csv",
        help="CSV (or a folder, for FOLDER/predictions.csv): path, predicted, probability[, top-k][, label]",
    )
    pred.add_argument("--top-k", type=_positive_int, default=1, help="also write the K most probable classes")
    pred.add_argument(
        "--evaluate",
        action="store_true",
        help="images are in folders named after classes: print the classification report",
    )
    _add_bundle_args(pred)
    _add_runtime_args(pred)
    pred.add_argument("--no-cache", action="store_true", help="compute every image's features, cache nothing")

    exp = sub.add_parser("export", help="export a bundle's backbone + head as one ONNX graph")
    exp.add_argument(
        "bundle", help="bundle folder, e.g. runs/study/models/softmax, or a run folder (its selected method's)"
    )
    exp.add_argument("--onnx", required=True, metavar="FILE", help="ONNX file to write")
    exp.add_argument("--opset", type=_positive_int, default=17)
    _add_bundle_args(exp)
    return parser


def _add_bundle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        help="backbone weights file for a bundle trained on local weights "
        "(default: the path recorded in the bundle); its digest must match",
    )


def _study_config(args, **over):
    from .config import StudyConfig

    return StudyConfig(
        data=args.data,
        out=args.out,
        backbone=args.backbone,
        weights=args.weights,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        epochs=args.epochs,
        seed=args.seed,
        input_size="auto" if str(args.input_size).lower() == "auto" else parse_size(args.input_size),
        precision=args.precision,
        device=args.device,
        runtime=args.runtime,
        batch_size=args.batch_size,
        num_workers=args.workers,
        cache_dir=args.cache_dir,
        valid_fraction=args.valid_fraction,
        test_fraction=args.test_fraction,
        strict=args.strict,
        allow_outside=args.allow_outside,
        progress=not args.no_progress,
        **_finetune_options(args),
        **{
            k: getattr(args, k)
            for k in (
                "tta",
                "flip_train",
                "cv",
                "selection",
                "select_metric",
                "data_efficiency",
                "dup_threshold",
                "preset",
                "time_budget",
            )
            if hasattr(args, k)
        },
        **over,
    )


def _shows_progress(args) -> bool:
    """Whether this process shows progress before a study starts: not with --no-progress, and not in the processes
    Lightning or torchrun start for the other devices (they run this same command: one spinner each on one
    terminal), which set RANK / LOCAL_RANK."""
    return not args.no_progress and all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK"))


def cmd_run(args) -> int:
    starting("starting: loading torch, timm and scikit-learn", enabled=_shows_progress(args))
    from .report.writer import console_summary
    from .study import check_out_outside_data, run_study

    cfg = _study_config(args)
    if getattr(args, "config", None):  # the file's values, then the flags actually given
        from .config import given_dests, load, merge

        cfg = merge(load(args.config), cfg, given_dests(build_parser(), args.argv))
        _check_numbers(cfg, args.config)
        _check_types(cfg, args.config)
        _check_choices(cfg, args.config)
    elif not cfg.data:
        raise DatasetError("give DATA (a folder of images or a CSV manifest), or --config FILE")
    from .config import ConfigError, resolve_selection, with_preset
    from .evaluation.budget import parse_duration
    from .heads.registry import resolve_methods

    try:
        cfg.methods = with_preset(cfg.methods, cfg.preset)
        cfg.selection = resolve_selection(cfg)  # before "auto" among the methods is expanded
        cfg.methods = resolve_methods(cfg.methods)  # "all": every method in --methods all
        if cfg.time_budget is not None:
            cfg.time_budget = parse_duration(cfg.time_budget)  # a config file may say "10m"
    except (ValueError, ConfigError) as exc:
        raise DatasetError(str(exc)) from None
    check_out_outside_data(cfg.out, cfg.data)  # before _check_writable creates it
    _check_writable(cfg.out)
    _check_cache(cfg.cache_dir)
    _launch(cfg)  # --devices/--num-nodes/--strategy (also from a config file)
    metrics = run_study(cfg)
    if metrics is None:  # not global rank 0: rank 0 reports
        return 0
    console_summary(metrics)
    if (metrics.get("leakage") or {}).get("warning"):
        print(f"transferlab: warning: {metrics['leakage']['warning']}", file=sys.stderr)
    print(f"report: {Path(cfg.out) / 'report.md'} and {Path(cfg.out) / 'report.html'}")
    return 0


def cmd_compare(args) -> int:
    from .report.compare import compare, print_table

    table = compare(args.runs, out=args.out)
    print_table(table)
    if args.out:
        print(f"compare: {Path(args.out) / 'compare.md'} and {Path(args.out) / 'compare.html'}")
    return 0


def cmd_demo(args) -> int:
    starting("starting: loading torch and timm", enabled=_shows_progress(args))
    from .config import StudyConfig
    from .data.demo import build_demo_dataset
    from .report.writer import console_summary
    from .study import run_study

    out = Path(args.out)
    data = build_demo_dataset(out / f"data-seed{args.seed}", seed=args.seed)
    print(f"demo data: {data}")
    cfg = StudyConfig(
        data=str(data), out=str(out / "report"), seed=args.seed, input_size=(128, 128), progress=not args.no_progress
    )
    metrics = run_study(cfg)
    console_summary(metrics)
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return 0


def cmd_extract(args) -> int:
    starting("starting: loading torch and timm", enabled=_shows_progress(args))
    import numpy as np

    from .data.datasets import discover
    from .features.backbones import load_backbone
    from .features.distributed import is_main
    from .features.extract import extract_features
    from .warning_filters import quiet_decoding

    _check_cache(args.cache_dir)
    _launch(args)
    ds = discover(
        args.data,
        seed=args.seed,
        valid_fraction=args.valid_fraction,
        test_fraction=args.test_fraction,
        allow_outside=args.allow_outside,
    )
    import torch

    torch.manual_seed(args.seed)  # --weights random: the same network as `run --seed N`, so reruns resume
    bb = load_backbone(args.backbone, weights=args.weights, input_size=parse_size(args.input_size))
    paths = [s.path for s in ds.samples]
    with quiet_decoding():
        ex = extract_features(
            paths,
            bb,
            cache_dir=args.cache_dir,
            precision=args.precision,
            device=args.device,
            batch_size=args.batch_size,
            num_workers=args.workers,
            strict=args.strict,
            progress=not args.no_progress,
            chunk_size=args.chunk_size,
            runtime=args.runtime,
        )
    if not is_main():
        return 0
    print(
        f"{len(ex.paths)} images -> {ex.features.shape[1]}-d features in {ex.seconds:.1f} s "
        f"({ex.computed} computed, {ex.from_cache} from cache, {ex.images_per_second:.1f} images/s, {ex.precision}, {ex.runtime})"
    )
    for s in ds.skipped + ex.skipped:
        print(f"skipped {s['path']}: {s['reason']}")
    if args.save:
        by_path = {s.path: s for s in ds.samples}
        from .report.layout import output_file

        save = output_file(args.save, "features.npz")  # a folder given: features.npz in it
        save = save if save.suffix == ".npz" else save.with_name(save.name + ".npz")  # what np.savez writes
        save.parent.mkdir(parents=True, exist_ok=True)  # as predict's --out
        np.savez(
            save,
            features=ex.features,
            labels=np.array([by_path[p].label for p in ex.paths]),
            paths=np.array(ex.paths),
            splits=np.array([by_path[p].split for p in ex.paths]),
            classes=np.array(ds.classes),
        )
        print(f"saved {save}")
    return 0


def cmd_predict(args) -> int:
    starting("starting: loading torch and timm", enabled=_shows_progress(args))
    from .evaluation.metrics import format_report
    from .model.bundle import load
    from .model.predict import csv_path, evaluate_predictions, predict_paths, write_csv

    _check_cache(args.cache_dir)  # --no-cache still keeps the backbone's ONNX graph there
    _check_writable(csv_path(args.out).parent, "the predictions' folder")  # before the images, not after
    model = load(
        args.bundle,
        weights=args.weights,
        device=args.device,
        precision=args.precision,
        runtime=args.runtime,
        cache_dir=False if args.no_cache else args.cache_dir,
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    starting(f"predicting with {model.path.name}", enabled=_shows_progress(args))
    if model.path != Path(args.bundle):
        print(f"model: {model.path} (the selected method of the run in {args.bundle})", file=sys.stderr)
    preds = predict_paths(model, args.images, progress=not args.no_progress)
    started()
    out = write_csv(preds, args.out, top_k=args.top_k, with_labels=args.evaluate)
    for s in preds.skipped:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    print(
        f"{len(preds.paths)} images predicted in {preds.seconds:.1f} s ({preds.images_per_second:.1f} images/s; "
        f"{preds.computed} through the backbone, {preds.from_cache} from cache) -> {out}"
    )
    if args.evaluate:
        metrics = evaluate_predictions(preds)
        print(
            f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, "
            f"balanced accuracy {metrics['balanced_accuracy']:.3f} on {metrics['n']} images"
        )
        print(format_report(metrics, model.classes))
    return 0


def cmd_export(args) -> int:
    from .model.bundle import resolve
    from .model.export import export_onnx

    bundle = resolve(args.bundle)
    if bundle != Path(args.bundle):
        print(f"model: {bundle} (the selected method of the run in {args.bundle})", file=sys.stderr)
    out = export_onnx(bundle, args.onnx, weights=args.weights, opset=args.opset)
    print(f"ONNX: {out} (input 'image' float32 NCHW, preprocessing in its metadata; output 'probabilities')")
    return 0


def _format_warning(message, category, filename, lineno, line=None, _default=warnings.formatwarning):
    """Data warnings (files skipped, a class that cannot be learned) as one `transferlab: warning:` line."""
    if issubclass(category, DatasetWarning):
        return f"transferlab: warning: {message}\n"
    return _default(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # which flags were given (run --config)
    handler = {
        "run": cmd_run,
        "finetune": cmd_run,
        "demo": cmd_demo,
        "extract": cmd_extract,
        "compare": cmd_compare,
        "predict": cmd_predict,
        "export": cmd_export,
    }[args.command]
    try:
        return handler(args)
    except USER_ERRORS as exc:
        started()
        print(f"transferlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        started()
        print(
            "\ntransferlab: interrupted. Features, cross-validated methods and fitted heads finished so far are kept "
            "in the cache; rerun the same command to resume.",
            file=sys.stderr,
        )
        return 130
    finally:
        started()


if __name__ == "__main__":
    sys.exit(main())
