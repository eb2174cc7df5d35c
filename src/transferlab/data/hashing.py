"""Content hashes of image files, and the split scores drawn from them.

`content_hash` keys the feature cache (features/cache.py) and the duplicate check; `split_score` ranks
images for the dataset splits (datasets.py), so that an image's split follows its bytes, not its name
or position.
"""

from __future__ import annotations

import hashlib

HASH_BYTES = 16


def content_hash(path) -> bytes:
    """Hash of the file's bytes: the same picture under another name hits the cache."""
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def split_score(key: bytes, salt: str) -> int:
    """A uniform score in [0, 2**256) from a content hash and a salt: int(SHA-256(key || salt)).

    Divided by 2**256 it is a uniform u in [0, 1); the same bytes and salt always give the same score.
    """
    return int.from_bytes(hashlib.sha256(key + salt.encode()).digest(), "big")
