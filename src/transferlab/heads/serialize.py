"""How a fitted head is written to a folder and read back without executing code.

transferlab's own heads (their learned state is arrays and plain values) go to `head.safetensors`, with the
plain values and the constructor's hyperparameters returned as a JSON-safe `info` dict for the caller to keep
(a bundle's config.json, the head cache's meta.json). Any other estimator (scikit-learn's, Pipelines) goes to
`head.skops`, read back by `skops.io` with an allowlist: classes defined in modules under `TRUSTED_ROOTS` (not
merely reachable from one), never functions, never pickle. Used by model bundles (`model.bundle`) and the head cache (`heads.cache`).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from .. import __version__

HEAD_FILES = {"safetensors": "head.safetensors", "skops": "head.skops"}
# Module roots whose classes a head.skops may contain (and only classes, never functions).
TRUSTED_ROOTS = ("sklearn", "transferlab")


class HeadFormatError(ValueError):
    """A head that cannot be saved or loaded safely; the message says why."""


def jsonable(value):
    """Hyperparameters for config.json: plain values as they are, anything else by its repr."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str, type(None))) for v in value):
        return list(value)
    return repr(value)


def describe_params(estimator) -> dict:
    """Every hyperparameter (nested ones of Pipelines too), JSON-safe."""
    try:
        params = estimator.get_params(deep=True)
    except Exception:
        return {}
    return {k: jsonable(v) for k, v in sorted(params.items())}


def _is_plain(v) -> bool:
    if isinstance(v, (bool, int, float, str, type(None))):
        return True
    if isinstance(v, (list, tuple)):
        return all(_is_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_plain(x) for k, x in v.items())
    return False


def _array_state(estimator) -> tuple[dict[str, np.ndarray], dict] | None:
    """A transferlab head's learned state as (numeric arrays, plain JSON values), or None if it holds objects
    or private attributes (`_name`, e.g. a scikit-learn subclass's fitted internals), which would be lost."""
    arrays, plain = {}, {}
    for key, value in vars(estimator).items():
        if key.startswith("_") and not key.startswith("__"):
            return None
        if not key.endswith("_"):
            continue
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            arrays[key] = np.ascontiguousarray(value)
        elif isinstance(value, np.ndarray) and value.dtype.kind == "U":
            plain[key] = {"__ndarray__": value.tolist(), "dtype": "str"}
        elif isinstance(value, np.generic):
            plain[key] = value.item()
        elif _is_plain(value):
            plain[key] = value
        else:
            return None
    return arrays, plain


def _head_class(module: str, name: str):
    """A transferlab estimator class named in config.json; anything else is refused."""
    if module.split(".")[0] != "transferlab":
        raise HeadFormatError(f"head class {module}.{name} is not a transferlab head; refused")
    from sklearn.base import BaseEstimator

    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise HeadFormatError(
            f"head class {module}.{name} does not exist in this transferlab version ({__version__})"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, BaseEstimator)):
        raise HeadFormatError(f"{module}.{name} is not an estimator class; refused")
    return cls


def _under_trusted_root(module: str) -> bool:
    return any(module == root or module.startswith(root + ".") for root in TRUSTED_ROOTS)


def _trusted(types: list[str]) -> list[str]:
    """The types skops does not trust by itself that are still safe here: classes *defined* under TRUSTED_ROOTS.

    The name alone is not enough: `sklearn.pipeline.islice` or `sklearn.base.defaultdict` resolve, through a
    module under `sklearn`, to classes defined elsewhere (a module's imports are its attributes), so the class
    the name resolves to must itself be a class whose `__module__` is under a trusted root."""
    ok, bad = [], []
    for t in types:
        module, _, name = t.rpartition(".")
        cls = None
        if _under_trusted_root(module):
            try:
                cls = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                cls = None
        trusted = isinstance(cls, type) and _under_trusted_root(getattr(cls, "__module__", None) or "")
        (ok if trusted else bad).append(t)
    if bad:
        raise HeadFormatError(
            f"head.skops contains types that are not allowed: {', '.join(bad)} "
            f"(only classes defined in scikit-learn and transferlab load); refused"
        )
    return ok


def save_head(estimator, directory: Path) -> dict:
    state = _array_state(estimator) if type(estimator).__module__.startswith("transferlab.") else None
    info = {
        "class": type(estimator).__name__,
        "module": type(estimator).__module__,
        "params": describe_params(estimator),
    }
    if state is not None:
        from safetensors.numpy import save_file

        arrays, plain = state
        save_file(arrays, str(directory / HEAD_FILES["safetensors"]))
        info.update(
            format="safetensors",
            file=HEAD_FILES["safetensors"],
            state=plain,
            init={k: v for k, v in estimator.get_params(deep=False).items() if _is_plain(v)},
        )
        return info
    import skops.io as sio

    path = directory / HEAD_FILES["skops"]
    try:
        sio.dump(estimator, path)
    except Exception as exc:
        raise HeadFormatError(
            f"cannot save head {type(estimator).__name__} with skops ({type(exc).__name__}: {exc})"
        ) from None
    _trusted(sio.get_untrusted_types(file=path))  # refuse now what load would refuse later
    info.update(format="skops", file=HEAD_FILES["skops"])
    return info


def load_head(info: dict, directory: Path):
    fmt = info.get("format")
    if fmt == "safetensors":
        from safetensors.numpy import load_file

        cls = _head_class(info["module"], info["class"])
        est = cls(**info.get("init", {}))
        state = {**load_file(str(directory / HEAD_FILES["safetensors"])), **info.get("state", {})}
        for key, value in state.items():
            if not key.endswith("_") or key.startswith("_"):
                raise HeadFormatError(f"head state {key!r} is not a learned attribute (name_); refused")
            if isinstance(value, dict) and "__ndarray__" in value:
                value = np.array(value["__ndarray__"], dtype=str)
            setattr(est, key, value)
        return est
    if fmt == "skops":
        import skops.io as sio

        path = directory / HEAD_FILES["skops"]
        try:
            return sio.load(path, trusted=_trusted(sio.get_untrusted_types(file=path)))
        except HeadFormatError:
            raise
        except Exception as exc:
            raise HeadFormatError(f"{path} could not be read by skops ({type(exc).__name__}: {exc})") from None
    raise HeadFormatError(f"unknown head format {fmt!r} in config.json (known: {', '.join(HEAD_FILES)})")
