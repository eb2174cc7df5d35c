"""Feature cache: pooled features stored on disk, keyed by backbone and image content.

Layout: `<cache_dir>/<backbone cache key>/chunk-<id>.safetensors`, each chunk holding `keys`
(image content hashes, 16 bytes each) and `features` (float32), with a SHA-256 of both in its
metadata. Chunks are written to a temporary name, fsynced and renamed, so a killed extraction leaves
only whole chunks behind and a rerun resumes from them. Writers never touch each other's files, so
runs sharing one cache directory need no coordination. A chunk that fails its checksum is moved
aside with a warning and its images are recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ..data.hashing import HASH_BYTES, content_hash  # noqa: F401  (content_hash: the cache key, re-exported)


def default_cache_dir() -> Path:
    env = os.environ.get("TRANSFERLAB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "transferlab"


def _checksum(keys: np.ndarray, feats: np.ndarray) -> str:
    return hashlib.sha256(keys.tobytes() + feats.tobytes()).hexdigest()


class FeatureCache:
    """All chunks of one backbone cache key; `get` looks features up by content hash."""

    def __init__(self, cache_dir, key: str, meta: dict | None = None):
        self.dir = Path(cache_dir) / "features" / key
        self.dir.mkdir(parents=True, exist_ok=True)
        if meta is not None and not (self.dir / "backbone.json").exists():
            self._atomic_write(self.dir / "backbone.json", json.dumps(meta, indent=2).encode())
        self._index: dict[bytes, np.ndarray] = {}
        self._seconds: dict[bytes, float] = {}
        self.refresh()

    def refresh(self) -> None:
        """Read every whole chunk (also ones another process wrote since)."""
        for chunk in sorted(self.dir.glob("chunk-*.safetensors")):
            try:
                data = load_file(str(chunk))
                keys, feats = data["keys"], data["features"]
                with safe_open(str(chunk), "np") as f:
                    meta = f.metadata() or {}
                if meta.get("sha256") != _checksum(keys, feats):
                    raise ValueError("checksum mismatch")
            except Exception as exc:
                try:
                    os.replace(chunk, chunk.with_suffix(".corrupt"))
                except FileNotFoundError:  # another run sharing this cache moved it aside first
                    continue
                warnings.warn(f"feature cache chunk {chunk} is corrupt ({exc}); moved aside, its images will be recomputed")
                continue
            per_image = float(meta.get("seconds", "nan")) / max(1, len(keys))
            for k, v in zip(keys, feats):
                self._index[k.tobytes()] = v
                self._seconds[k.tobytes()] = per_image

    def __len__(self) -> int:
        return len(self._index)

    def get(self, key: bytes) -> np.ndarray | None:
        return self._index.get(key)

    def compute_seconds(self, key: bytes) -> float:
        """Wall time spent computing this image's features when its chunk was written (NaN if unknown)."""
        return self._seconds.get(key, float("nan"))

    def put(self, keys: list[bytes], feats: np.ndarray, seconds: float = float("nan")) -> Path:
        """Write one chunk atomically and index it; `seconds` is the time it took to compute."""
        karr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), HASH_BYTES).copy()
        farr = np.ascontiguousarray(feats, dtype=np.float32)
        path = self.dir / f"chunk-{uuid.uuid4().hex}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({"keys": karr, "features": farr}, str(tmp), metadata={"sha256": _checksum(karr, farr), "seconds": repr(float(seconds))})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for k, v in zip(keys, farr):
            self._index[k] = v
            self._seconds[k] = seconds / max(1, len(keys))
        return path

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
