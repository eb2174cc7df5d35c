"""The registry of methods: a name resolves to how to build it and what the rest of transferlab must know.

In the spirit of timm's model registry: `@register(name, kind=..., ...)` on a builder function is the one
place a method is declared. The CLI's choices, `--methods all`, selection, config files, bundles and export
read `METHODS` (through `get`, `names`, `resolve_methods`, `make_head`) and list nothing again.

Kinds: "seed" (the seed study's fixed recipes), "tuned" (a `ValidationSearch` over a small grid, `heads.tuned`),
"ensemble" (a vote of tuned heads, `heads.ensemble`), "end-to-end" (trained on images, not cached features:
`finetune`, which has no feature-head builder here; the study hands it to `transferlab.finetune`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("seed", "tuned", "ensemble", "end-to-end")


@dataclass(frozen=True)
class MethodInfo:
    """What one method is. `build(seed=, epochs=, scoring=, cv=, flip_train=)` returns a fresh, unfitted
    scikit-learn estimator (None for end-to-end methods); `exportable`: its bundle exports to one ONNX graph;
    `class_weights`: it counters class imbalance (balanced weights or priors); `cost`: rough fitting time on
    cached features of a few thousand images ("seconds", "minutes"; "hours" for end-to-end on a CPU);
    `in_all`: part of `--methods all`; `cv`: how `evaluation.crossval` cross-validates it on features (a
    `heads.paths.FoldPath`, or an `EnsemblePath` naming the members whose probabilities it averages; None: it is
    not a candidate of the default selection); `default`: part of the default run (`--methods auto`)."""

    name: str
    kind: str
    build: Callable[..., object] | None
    description: str
    exportable: bool
    class_weights: bool
    cost: str
    in_all: bool = True
    cv: object | None = None
    default: bool = False


METHODS: dict[str, MethodInfo] = {}


def register(
    name: str,
    *,
    kind: str,
    description: str,
    exportable: bool,
    class_weights: bool,
    cost: str,
    in_all: bool = True,
    cv=None,
    default: bool = False,
):
    """Decorator: declare the builder of method `name` (see `MethodInfo`)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got '{kind}'")

    def deco(build):
        if name in METHODS:
            raise ValueError(f"method '{name}' is registered twice")
        METHODS[name] = MethodInfo(name, kind, build, description, exportable, class_weights, cost, in_all, cv, default)
        return build

    return deco


register(
    "finetune",
    kind="end-to-end",
    exportable=True,
    class_weights=True,
    cost="hours",
    in_all=False,
    description="end-to-end fine-tuning of the backbone's last stages with a softmax head (Lightning); "
    "trained on images, see transferlab.finetune",
)(None)


def names(kind: str | None = None) -> list[str]:
    """Registered method names, seed methods first, then tuned, ensemble, end-to-end (each in declaration order)."""
    ordered = sorted(METHODS.values(), key=lambda m: KINDS.index(m.kind))
    return [m.name for m in ordered if kind is None or m.kind == kind]


def get(name: str) -> MethodInfo:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}' (known: {', '.join(names())})") from None


def resolve_methods(methods) -> list[str]:
    """Method names with "all" expanded to every method in `--methods all` and "auto" to the default run's
    (the seed's two and the default candidates), in order, without repeats; an unknown name is an error naming
    the known ones."""
    out: list[str] = []
    groups = {"all": [n for n in names() if METHODS[n].in_all], "auto": [n for n in names() if METHODS[n].default]}
    for m in methods:
        for name in groups.get(m, (m,)):
            get(name)
            if name not in out:
                out.append(name)
    return out


def make_head(
    name: str, *, seed: int = 0, epochs: int = 50, scoring: str = "macro_f1", cv: int = 0, flip_train: bool = False
):
    """A fresh, unfitted estimator for a method trained on cached features.

    `scoring`: the metric tuned heads pick their hyperparameters by; `cv` >= 2 tunes by cv-fold CV over
    train + valid (the ensemble is then nested); `flip_train`: rows hold plain and flipped features side by
    side and the head trains on both views (`heads.views.ViewAugmented`).
    """
    info = get(name)
    if info.build is None:
        raise ValueError(f"method '{name}' is trained {info.kind}, not on cached features")
    return info.build(seed=seed, epochs=epochs, scoring=scoring, cv=cv, flip_train=flip_train)
