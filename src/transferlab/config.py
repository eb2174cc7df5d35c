"""The study's settings (`StudyConfig`) and its configuration files: the resolved `config.yaml` a run writes, read back by `run --config FILE`.

The file holds what defines the study: data, backbone, weights, input size, precision (as resolved,
e.g. `auto` -> `fp32`), seed, the methods with their hyperparameters, the split fractions and the rest
of `StudyConfig`. Where a run writes (`out`) and whether it shows progress are not part of it. Flags
given on the command line override the file's values.
"""

from __future__ import annotations

import argparse
import inspect
import os
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache
from pathlib import Path

import numpy as np
import yaml

from .features.backbones import DEFAULT_BACKBONE, BackboneError, parse_size

NOT_SAVED = ("out", "progress", "params")  # params are saved under `methods`
GOVERNED = ("seed", "random_state", "epochs", "scoring", "flip_train")  # set from top-level keys (--seed, --epochs,
# --select-metric, --flip-train)
# A tuned head's search settings (cv, holdout, grid, ...): the study's protocol, set by top-level keys (--cv) or by
# transferlab itself, never a head's hyperparameter: neither written under `methods` nor taken from there.


@cache
def protocol_keys() -> tuple[str, ...]:
    """The tuned heads' search settings (`heads.search.ValidationSearch`'s parameters less GOVERNED); imported when
    first needed, so that the command line parses its arguments without scikit-learn and torch loaded."""
    from .heads.search import ValidationSearch

    return tuple(sorted(set(inspect.signature(ValidationSearch).parameters) - set(GOVERNED)))


FIRST = ("data", "backbone", "weights", "input_size", "precision", "seed", "methods", "epochs")
DEST_TO_FIELD = {"workers": "num_workers", "no_progress": "progress"}


@dataclass
class StudyConfig:
    data: str
    out: str = "runs/study"
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    methods: list[str] = field(default_factory=lambda: ["auto"])  # auto: the seed's two + the default candidates
    epochs: int = 50
    seed: int = 0
    input_size: tuple[int, int] | str | None = None  # None: aspect-aware (features.input_size); "auto": by CV
    precision: str = "auto"
    device: str = "auto"
    runtime: str = "auto"  # frozen backbone: auto (ONNX Runtime on CPU, torch on CUDA/MPS), torch, onnxruntime
    batch_size: int | None = None  # None: chosen per runtime for throughput
    num_workers: int | None = None
    cache_dir: str | None = None
    valid_fraction: float = 0.1
    test_fraction: float = 0.2
    strict: bool = False
    allow_outside: bool = False
    progress: bool = True
    devices: int | str = 1  # processes per node (DDP through Lightning); extraction shards across them
    num_nodes: int = 1
    strategy: str = "auto"
    finetune: dict = field(default_factory=dict)  # FineTuner options for the `finetune` method
    params: dict = field(default_factory=dict)  # per-head hyperparameters set on top of make_head's (config.yaml)
    tta: bool = False  # features = mean of the image's and its horizontal flip's (both cached)
    select_metric: str = "macro_f1"  # validation metric that tunes heads and selects the method
    data_efficiency: bool = True  # the selected head's validation curve over images per class
    cv: int = 0  # >= 2: tune and select by k-fold CV over train + valid instead of the validation split
    # how the method is chosen: "repeated-cv" (evaluation.crossval), "validation" (the validation split),
    # "kfold" (--cv K); "auto": repeated-cv for the default methods (`auto`), else validation or kfold
    selection: str = "auto"
    flip_train: bool = False  # heads also train on each training image's flipped features (predict on the mean)
    dup_threshold: float = 0.95  # leakage check: cosine similarity above which images count as near-duplicates
    preset: str = "quick"  # quick: frozen-feature heads (the default run); best: adds `finetune`, on the same folds
    time_budget: float | None = None  # seconds of wall time for the run (evaluation.budget); None: unlimited

    def __post_init__(self):  # paths as text with "~" expanded (config files, the Python API), sizes as (h, w)
        for name in ("data", "out", "cache_dir", "weights"):  # "~/runs" in a config file: the home folder's runs
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)):
                setattr(self, name, os.path.expanduser(str(value)))
        self.input_size = input_size_of(self.input_size)


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message says why."""


def input_size_of(size):
    """An input size as given on the command line, in a config file or to `StudyConfig`: "224x288", 224 (a
    square), [224, 288], "auto" or None, as (height, width), "auto" or None; anything else names the value."""
    if size is None or (isinstance(size, str) and size.lower() == "auto"):
        return size if size is None else "auto"
    ok = isinstance(size, (str, int)) and not isinstance(size, bool)
    ok = ok or (isinstance(size, (list, tuple)) and len(size) == 2 and all(type(v) is int for v in size))
    if not ok:
        raise ConfigError(f"input_size must be [height, width], HxW, a side or auto, got {size!r}")
    return parse_size(size if isinstance(size, (str, int)) else f"{size[0]}x{size[1]}")


# What each preset adds to the default run (`--methods auto`): quick, its frozen-feature heads only; best,
# end-to-end fine-tuning too, scored by the same repeated CV (on its first repeat's folds) and chosen only if better.
PRESETS = {"quick": (), "best": ("finetune",)}


def with_preset(methods: list[str], preset: str) -> list[str]:
    """`methods` with what `preset` adds (to the default run; an explicit method list gets it too)."""
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got '{preset}'")
    return list(methods) + [m for m in PRESETS[preset] if m not in methods]


SELECTIONS = ("auto", "repeated-cv", "validation", "kfold")


def resolve_selection(cfg: StudyConfig) -> str:
    """The selection protocol `cfg` asks for, "auto" resolved (call before `methods` is resolved: "auto" among
    the methods means the default run, which selects by repeated CV)."""
    if cfg.selection not in SELECTIONS:
        raise ConfigError(f"selection must be one of {', '.join(SELECTIONS)}, got '{cfg.selection}'")
    kfold = bool(cfg.cv and cfg.cv >= 2)
    if cfg.input_size == "auto":
        chosen = cfg.selection if cfg.selection != "auto" else ("repeated-cv" if not kfold else "")
        if chosen != "repeated-cv":
            raise ConfigError("--input-size auto chooses by the default repeated CV: drop --cv, --selection")
        return "repeated-cv"
    if cfg.selection == "auto":
        if kfold:
            return "kfold"
        return "repeated-cv" if "auto" in cfg.methods else "validation"
    if cfg.selection == "repeated-cv" and kfold:
        raise ConfigError("selection repeated-cv chooses its own folds: drop --cv")
    if cfg.selection == "kfold" and not kfold:
        raise ConfigError("selection kfold needs --cv K (K >= 2)")
    return cfg.selection


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


def head_params(estimator) -> dict:
    """An estimator's scalar hyperparameters, less those that top-level keys set (seed, epochs)."""
    return {
        k: _plain(v)
        for k, v in estimator.get_params(deep=False).items()
        if k not in GOVERNED + protocol_keys() and isinstance(_plain(v), (bool, int, float, str, type(None)))
    }


def resolved(cfg, backbone, extract: dict, results: dict) -> dict:
    """The run's configuration as written to config.yaml: paths absolute, input size and precision as used."""
    from .heads import registry

    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k not in NOT_SAVED}
    d["data"] = str(Path(cfg.data).expanduser().resolve())
    if cfg.weights not in (None, "random"):
        d["weights"] = str(Path(cfg.weights).expanduser().resolve())
    d["input_size"] = [int(v) for v in backbone.input_size]
    d["precision"] = extract.get("precision", cfg.precision)
    d["runtime"] = extract.get("runtime", cfg.runtime)
    d["methods"] = {
        n: head_params(results[n]["estimator"]) if registry.get(n).build is not None and n in results else {}
        for n in cfg.methods
    }
    return {**{k: d[k] for k in FIRST if k in d}, **{k: v for k, v in d.items() if k not in FIRST}}


def dump(config: dict) -> str:
    head = (
        "# transferlab study configuration, written by `transferlab run`.\n"
        "# Rerun it with `transferlab run --config config.yaml [--out DIR]`; flags given there override these values.\n"
        "# methods: each head with its hyperparameters (set on the estimator before fitting).\n"
    )
    return head + yaml.dump(config, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


class _Dumper(yaml.SafeDumper):
    """Safe YAML with short lists of scalars on one line (input_size: [120, 400])."""


def _list(dumper, data):
    flow = len(data) <= 8 and all(isinstance(v, (int, float, str, bool)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _list)


def write(path: Path, cfg, backbone, extract: dict, results: dict) -> Path:
    path = Path(path)
    path.write_text(dump(resolved(cfg, backbone, extract, results)))
    return path


def load(path) -> dict:
    """A config file as StudyConfig keyword arguments (`methods` may be a list, a comma string or a mapping)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(raw).__name__}")
    known = {f.name for f in fields(StudyConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kw = dict(raw)
    methods = kw.get("methods")
    if isinstance(methods, dict):
        kw["methods"] = list(methods)
        bad = [n for n, p in methods.items() if p is not None and not isinstance(p, dict)]
        if bad:
            raise ConfigError(f"{path}: methods.{bad[0]} must be a mapping of hyperparameters")
        protocol = sorted({f"methods.{n}.{k}" for n, p in methods.items() for k in (p or {}) if k in protocol_keys()})
        if protocol:  # written by transferlab before 0.2: the study's top-level keys (cv) decide these
            warnings.warn(
                f"{path}: ignoring {', '.join(protocol)}: the study's protocol is set by top-level keys "
                f"(cv), not per method"
            )
        kw["params"] = {
            **kw.get("params", {}),
            **{n: {k: v for k, v in p.items() if k not in protocol_keys()} for n, p in methods.items() if p},
        }
    elif isinstance(methods, str):
        kw["methods"] = [m.strip() for m in methods.split(",") if m.strip()]
    elif methods is not None and not isinstance(methods, list):
        raise ConfigError(f"{path}: methods must be a list or a mapping of method -> hyperparameters")
    if "input_size" in kw:
        try:
            kw["input_size"] = input_size_of(kw["input_size"])
        except (BackboneError, ConfigError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if kw.get("data") is not None:
        kw["data"] = str(kw["data"])
    return kw


def given_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The argparse destinations the user actually gave in `argv` (defaults suppressed, subcommands included)."""

    def suppress(p):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    suppress(sub)
            elif not isinstance(action, argparse._HelpAction):
                action.default = argparse.SUPPRESS

    suppress(parser)
    return set(vars(parser.parse_args(argv)))


def merge(file_kw: dict, cli, given: set[str]):
    """The file's values, then every setting given on the command line (`given`: argparse dests) on top."""
    names = {f.name for f in fields(StudyConfig)}
    explicit = {DEST_TO_FIELD.get(d, d) for d in given} & names
    kw = {k: v for k, v in file_kw.items() if k not in explicit}
    for name in names - explicit:  # nested options (e.g. --ft-epochs -> finetune.epochs) override key by key
        base, flags = kw.get(name), getattr(cli, name)
        if isinstance(base, dict) and isinstance(flags, dict):
            keys = {k for d in given for k in (d, d.removeprefix("ft_")) if k in flags}
            kw[name] = {**base, **{k: flags[k] for k in keys}}
    cfg = replace(cli, **kw)
    if not cfg.data:
        raise ConfigError("no data: give DATA on the command line or `data:` in the config file")
    return cfg
