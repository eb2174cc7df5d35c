"""Feature cache: pooled features stored on disk, keyed by backbone and image content.

Layout: `<cache_dir>/features/<backbone cache key>/{backbone.json, chunk-<id>.safetensors}`, each chunk
holding `keys` (image content hashes, 16 bytes each) and `features` (float32), with a SHA-256 of both
and the seconds they took to compute in its metadata. Chunks are written to a temporary name, fsynced
and renamed, so a killed extraction leaves only whole chunks behind and a rerun resumes from them.
Writers never touch each other's files, so runs sharing one cache directory need no coordination.

Opening a cache reads no features: an index maps each content hash to its chunk and row, built from the
chunks' small `keys` tensors and kept once per process and folder; a refresh reads only chunks it has
not indexed yet (written since, e.g. by another run) and forgets chunks gone from the folder. A lookup
(`get_many`) reads only the chunks holding the requested keys and keeps only the requested rows. A
chunk's SHA-256 is checked the first time this process reads its features (later reads take just the
rows asked for); a chunk that fails is moved aside with a warning, its keys leave the index, and its
images are recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
import warnings
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ..data.hashing import HASH_BYTES, content_hash  # noqa: F401  (content_hash: the cache key, re-exported)


def default_cache_dir() -> Path:
    env = os.environ.get("TRANSFERLAB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "transferlab"


def _checksum(keys: np.ndarray, feats: np.ndarray) -> str:
    """SHA-256 of the keys' bytes followed by the features' bytes (hashed in place, not copied)."""
    h = hashlib.sha256()
    for a in (keys, feats):
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return h.hexdigest()


def _read_keys(path: Path) -> tuple[np.ndarray, dict]:
    """A chunk's keys and metadata, without reading its features."""
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
        keys = f.get_tensor("keys")
        rows = f.get_slice("features").get_shape()[0]
    if keys.ndim != 2 or keys.shape[1] != HASH_BYTES or len(keys) != rows:
        raise ValueError(f"keys of shape {keys.shape} for {rows} feature rows")
    return keys, meta


def _read_chunk(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """A chunk's keys, features and metadata, whole."""
    with safe_open(str(path), "np") as f:
        return f.get_tensor("keys"), f.get_tensor("features"), f.metadata() or {}


class _Index:
    """Which chunk and row holds each key, for one cache folder; shared by the process's FeatureCaches."""

    def __init__(self):
        self.lock = threading.RLock()
        self.where: dict[bytes, tuple[str, int]] = {}
        self.keys: dict[str, list[bytes]] = {}  # chunk name -> its keys (to forget them with the chunk)
        self.seconds: dict[str, float] = {}  # chunk name -> compute seconds per image
        self.verified: set[str] = set()  # chunks whose SHA-256 this process has checked

    def add(self, name: str, keys: list[bytes], seconds_per_image: float) -> None:
        self.keys[name] = keys
        self.seconds[name] = seconds_per_image
        for row, k in enumerate(keys):
            self.where[k] = (name, row)

    def forget(self, name: str) -> None:
        for k in self.keys.pop(name, ()):
            if self.where.get(k, (None,))[0] == name:
                del self.where[k]
        self.seconds.pop(name, None)
        self.verified.discard(name)


_INDEXES: dict[str, _Index] = {}
_INDEXES_LOCK = threading.Lock()


def _index_for(folder: Path) -> _Index:
    with _INDEXES_LOCK:
        return _INDEXES.setdefault(str(folder.resolve()), _Index())


class FeatureCache:
    """The chunks of one backbone cache key; `get_many` looks features up by content hash."""

    def __init__(self, cache_dir, key: str, meta: dict | None = None):
        self.dir = Path(cache_dir) / "features" / key
        self.dir.mkdir(parents=True, exist_ok=True)
        if meta is not None and not (self.dir / "backbone.json").exists():
            self._atomic_write(self.dir / "backbone.json", json.dumps(meta, indent=2).encode())
        self._index = _index_for(self.dir)
        self._held: dict[bytes, np.ndarray] = {}  # features this cache returned or wrote: what was asked for
        self.refresh()

    def note_runtime(self, runtime: str, detail: dict | None = None) -> None:
        """Record in backbone.json that `runtime` wrote features here (`written_by`, with e.g. its parity)."""
        path = self.dir / "backbone.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            meta = {}
        by = meta.get("written_by") or {}
        entry = {"runtime": runtime, **(detail or {})}
        if by.get(runtime) == entry:
            return
        by[runtime] = entry
        meta["written_by"] = by
        self._atomic_write(path, json.dumps(meta, indent=2).encode())

    def refresh(self) -> None:
        """Index chunks not indexed yet (also ones another process wrote since); forget chunks gone."""
        names = {p.name for p in self.dir.glob("chunk-*.safetensors")}
        idx = self._index
        with idx.lock:
            for gone in set(idx.keys) - names:
                idx.forget(gone)
            for name in sorted(names - set(idx.keys)):
                try:
                    keys, meta = _read_keys(self.dir / name)
                except Exception as exc:
                    self._set_aside(self.dir / name, exc)
                    continue
                idx.add(name, [k.tobytes() for k in keys], float(meta.get("seconds", "nan")) / max(1, len(keys)))

    def __len__(self) -> int:
        return len(self._index.where)

    def __contains__(self, key: bytes) -> bool:
        """Indexed (its chunk is checked when its features are read)."""
        return key in self._held or key in self._index.where

    def get(self, key: bytes) -> np.ndarray | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys) -> dict[bytes, np.ndarray]:
        """Features of the `keys` the cache has, read from only the chunks that hold them."""
        out: dict[bytes, np.ndarray] = {}
        wanted: dict[str, dict[bytes, int]] = {}
        for k in keys:
            if k in self._held:
                out[k] = self._held[k]
            elif (at := self._index.where.get(k)) is not None:
                wanted.setdefault(at[0], {})[k] = at[1]
        for name, rows in wanted.items():
            feats = self._read_rows(name, list(rows.values()))
            if feats is not None:
                for k, v in zip(rows, feats):
                    out[k] = self._held[k] = v
        return out

    def _read_rows(self, name: str, rows: list[int]) -> np.ndarray | None:
        """Rows of one chunk's features; the whole chunk is read and checked the first time (None if it fails)."""
        path = self.dir / name
        try:
            if name not in self._index.verified:
                keys, feats, meta = _read_chunk(path)
                if meta.get("sha256") != _checksum(keys, feats):
                    raise ValueError("checksum mismatch")
                self._index.verified.add(name)
                return feats[rows]
            with safe_open(str(path), "np") as f:
                if len(rows) * 8 >= f.get_slice("features").get_shape()[0]:
                    return f.get_tensor("features")[rows]
                part = f.get_slice("features")
                return np.stack([part[r] for r in rows])
        except Exception as exc:
            with self._index.lock:
                self._index.forget(name)
            self._set_aside(path, exc)
            return None

    def compute_seconds(self, key: bytes) -> float:
        """Wall time spent computing this image's features when its chunk was written (NaN if unknown)."""
        at = self._index.where.get(key)
        return self._index.seconds.get(at[0], float("nan")) if at else float("nan")

    def put(self, keys: list[bytes], feats: np.ndarray, seconds: float = float("nan")) -> Path:
        """Write one chunk atomically, index it and hold its features; `seconds` is the time it took to compute."""
        karr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), HASH_BYTES).copy()
        farr = np.ascontiguousarray(feats, dtype=np.float32)
        path = self.dir / f"chunk-{uuid.uuid4().hex}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(
            {"keys": karr, "features": farr},
            str(tmp),
            metadata={"sha256": _checksum(karr, farr), "seconds": repr(float(seconds))},
        )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with self._index.lock:
            self._index.add(path.name, list(keys), seconds / max(1, len(keys)))
        self._held.update(zip(keys, farr))
        return path

    @staticmethod
    def _set_aside(chunk: Path, exc: Exception) -> None:
        try:
            os.replace(chunk, chunk.with_suffix(".corrupt"))
        except FileNotFoundError:  # another run sharing this cache moved it aside first
            return
        warnings.warn(f"feature cache chunk {chunk} is corrupt ({exc}); moved aside, its images will be recomputed")

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
