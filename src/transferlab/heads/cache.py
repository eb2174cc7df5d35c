"""Fitted heads, cached like features: a rerun of a study over cached features refits nothing it has fitted.

A head's fit is a pure function of its hyperparameters, the seed, the features and labels it trains and
validates on, the library versions and transferlab's own code; the key is a SHA-256 of exactly those (the
code enters as a digest of the package's source files, so editing a head's code, even without a version
bump, never reuses fits made by the old code). The fitted estimator is
stored as a bundle stores heads (`heads.serialize`: safetensors for transferlab's own heads, skops with
the allowlist for scikit-learn ones; no pickle), next to `meta.json` (method, key inputs, fit seconds).
Entries are written to a temporary folder and renamed into place, so a crash never leaves half an entry;
an entry that fails to load is set aside with a warning and the head is fitted again.

Results computed from a fitted head alone (the data-efficiency curve) are kept beside it as JSON
(`extra`/`put_extra`), keyed by the head and the computation's own arguments.

A method's cross-validation outcome (`evaluation.crossval`: every grid point's out-of-fold scores on every fold)
is cached the same way (`scores`/`put_scores`, key `cv_key`: the method, its grid, the seed, the folds, the
features and labels of train + valid, the versions and the code), so a rerun over cached features, or one that adds
a method, cross-validates only what it has not before.

Layout: `<cache root>/heads/<key>/{meta.json, head.safetensors | head.skops, <name>.json}`, and
`<cache root>/heads/cv/<key>.safetensors` (the scores; their fitting seconds in its metadata).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from functools import cache
from pathlib import Path

import numpy as np

from .. import __version__
from ..features.cache import default_cache_dir
from .serialize import load_head, save_head


def _digest_arrays(h, *arrays) -> None:
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())


@cache
def code_fingerprint(package_dir: str = str(Path(__file__).parent.parent)) -> str:
    """SHA-256 of the package's Python sources (names and contents, in sorted order)."""
    h = hashlib.sha256()
    for path in sorted(Path(package_dir).rglob("*.py")):
        h.update(path.relative_to(package_dir).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def _key(fields: dict, arrays: tuple) -> str:
    """SHA-256 (first 24 hex digits) of `fields`, the library versions, the code and the arrays' bytes."""
    import sklearn
    import torch

    versions = [__version__, sklearn.__version__, torch.__version__, np.__version__]
    h = hashlib.sha256()
    h.update(json.dumps({**fields, "versions": versions, "code": code_fingerprint()}, sort_keys=True).encode())
    _digest_arrays(h, *arrays)
    return h.hexdigest()[:24]


def head_key(name: str, estimator, seed: int, arrays: tuple) -> str:
    """The key of a fitted head: the method, every hyperparameter, the seed, the data, the versions and the code."""
    return _key({"method": name, "seed": seed, "estimator": estimator.__repr__(N_CHAR_MAX=10**9)}, arrays)


def data_digest(*arrays) -> str:
    """SHA-256 of arrays' dtypes, shapes and bytes: computed once for inputs that many keys share."""
    h = hashlib.sha256()
    _digest_arrays(h, *arrays)
    return h.hexdigest()


def cv_key(name: str, points: list[dict], seed: int, epochs: int, data: str) -> str:
    """The key of a method's CV outcome: the method, its grid points, the seed, the epochs (the softmax heads'), the
    `data_digest` of its inputs (features, labels, the folds' indices, the views), the versions and the code."""
    return _key({"cv": name, "points": repr(points), "seed": seed, "epochs": epochs, "data": data}, ())


# A CV outcome larger than this is not cached (points x repeats x images x classes float32: 256 MiB is e.g. 9
# points of 50,000 images and 150 classes); it is recomputed instead of filling the disk.
MAX_SCORES_BYTES = 256 * 2**20


class HeadCache:
    """`get(key)` -> (estimator, meta) or None; `put(key, estimator, meta)` stores a fitted head."""

    def __init__(self, root=None):
        self.dir = Path(root or default_cache_dir()) / "heads"

    def has(self, key: str) -> bool:
        """Whether head `key` is stored (without loading it)."""
        return (self.dir / key / "meta.json").is_file()

    def get(self, key: str):
        entry = self.dir / key
        meta_path = entry / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            return load_head(meta["head"], entry), meta
        except Exception as exc:  # damaged or from an incompatible version: set aside, fit again
            warnings.warn(
                f"cached head {entry} could not be loaded ({type(exc).__name__}: {exc}); fitting it again", stacklevel=2
            )
            shutil.rmtree(entry, ignore_errors=True)
            return None

    def put(self, key: str, estimator, meta: dict) -> bool:
        """Store a fitted head; False (with a warning) if it cannot be stored safely. Never raises."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.dir))
            try:
                info = save_head(estimator, tmp)
                (tmp / "meta.json").write_text(json.dumps({**meta, "head": info}, indent=2, default=str))
                os.rename(tmp, self.dir / key)
            except OSError:  # another run stored the same key first: theirs is as good as ours
                shutil.rmtree(tmp, ignore_errors=True)
                return (self.dir / key / "meta.json").is_file()
            except Exception:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        except Exception as exc:
            warnings.warn(f"fitted head not cached ({type(exc).__name__}: {exc})", stacklevel=2)
            return False
        return True

    def scores(self, key: str) -> tuple[np.ndarray, float] | None:
        """A cached CV outcome: (the scores array, the seconds its folds took to fit), or None."""
        from safetensors import SafetensorError, safe_open

        path = self.dir / "cv" / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="numpy") as f:
                return f.get_tensor("scores"), float((f.metadata() or {})["seconds"])
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            warnings.warn(f"cached CV scores {path} could not be read ({exc}); computing them again", stacklevel=2)
            path.unlink(missing_ok=True)
            return None

    def put_scores(self, key: str, scores: np.ndarray, seconds: float) -> None:
        """Store a CV outcome (atomically; skipped above MAX_SCORES_BYTES). Never raises: a failure only warns."""
        if scores.nbytes > MAX_SCORES_BYTES:
            return
        from safetensors.numpy import save_file

        folder = self.dir / "cv"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".safetensors", dir=folder)
            os.close(fd)
            try:
                save_file({"scores": np.ascontiguousarray(scores)}, tmp, metadata={"seconds": repr(float(seconds))})
                os.replace(tmp, folder / f"{key}.safetensors")
            finally:
                Path(tmp).unlink(missing_ok=True)
        except Exception as exc:  # a full disk, a read-only cache: the run goes on without it
            warnings.warn(f"CV scores not cached ({type(exc).__name__}: {exc})", stacklevel=2)

    def extra(self, key: str, name: str):
        """A JSON result stored beside head `key` (None if absent or unreadable)."""
        try:
            return json.loads((self.dir / key / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None

    def memo(self, key: str | None, name: str, compute):
        """`compute()`'s JSON result stored beside head `key`: read if there, else computed and stored."""
        value = self.extra(key, name) if key else None
        if value is None:
            value = compute()
            if key:
                self.put_extra(key, name, value)
        return value

    def put_extra(self, key: str, name: str, value) -> None:
        """Store a JSON result beside head `key` (atomically; silently skipped if the head is not cached)."""
        entry = self.dir / key
        if not entry.is_dir():
            return
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=entry)
            with os.fdopen(fd, "w") as f:
                json.dump(value, f, default=str)
            os.replace(tmp, entry / f"{name}.json")
        except OSError as exc:
            warnings.warn(f"could not cache {name} beside {entry} ({exc})", stacklevel=2)
