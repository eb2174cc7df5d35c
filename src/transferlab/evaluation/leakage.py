"""Leakage check: the same picture, or almost the same, on both sides of a split.

Exact duplicates are found by content hash (the feature cache's), near-duplicates by the cosine
similarity of the cached features: each evaluation image (valid, test) is matched to its nearest
reference image (train, and valid for test), in blocks so memory stays bounded. Frames cut from one
video are the typical source of near-duplicates, and they make test scores optimistic. This module
computes (metrics.json's `leakage`); report/sections.py renders the report's "Leakage check" section.
"""

from __future__ import annotations

import numpy as np

from ..data.hashing import content_hash

COMPARISONS = (("test", "train"), ("valid", "train"), ("test", "valid"))
SWEEP = (0.9, 0.95, 0.98)


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def nearest(query: np.ndarray, reference: np.ndarray, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the cosine similarity to its nearest reference row and that row's index.

    Works on `block` x `block` tiles, so memory is O(block² + rows), never O(query x reference).
    """
    q, r = _unit(query), _unit(reference)
    best = np.full(len(q), -np.inf, dtype=np.float32)
    arg = np.zeros(len(q), dtype=np.int64)
    for i in range(0, len(q), block):
        qb = q[i : i + block]
        for j in range(0, len(r), block):
            sims = qb @ r[j : j + block].T
            k = sims.argmax(axis=1)
            v = sims[np.arange(len(qb)), k]
            better = v > best[i : i + block]
            best[i : i + block][better] = v[better]
            arg[i : i + block][better] = k[better] + j
    return best, arg


def compare(
    query_paths,
    query_X,
    ref_paths,
    ref_X,
    *,
    threshold: float = 0.95,
    max_pairs: int = 20,
    hashes: dict | None = None,
    block: int = 2048,
) -> dict:
    """Exact (same bytes) and near (cosine >= threshold, not exact) duplicates of query images in the reference set."""
    hashes = {} if hashes is None else hashes
    for p in list(query_paths) + list(ref_paths):
        if p not in hashes:
            hashes[p] = content_hash(p)
    ref_by_hash: dict[bytes, int] = {}
    for j, p in enumerate(ref_paths):
        ref_by_hash.setdefault(hashes[p], j)
    best, arg = (
        nearest(query_X, ref_X, block=block) if len(query_paths) and len(ref_paths) else (np.zeros(0), np.zeros(0, int))
    )
    q, r = _unit(query_X) if len(query_paths) else None, _unit(ref_X) if len(ref_paths) else None
    exact, near = [], []
    for i, p in enumerate(query_paths):
        j = ref_by_hash.get(hashes[p])
        if j is not None:
            exact.append({"query": p, "reference": ref_paths[j], "similarity": float(q[i] @ r[j]), "kind": "exact"})
        elif best[i] >= threshold:
            near.append({"query": p, "reference": ref_paths[int(arg[i])], "similarity": float(best[i]), "kind": "near"})
    not_exact = np.array([hashes[p] not in ref_by_hash for p in query_paths], dtype=bool)
    sweep = sorted(set(SWEEP) | {threshold})
    near.sort(key=lambda d: -d["similarity"])
    return {
        "n_query": len(query_paths),
        "n_reference": len(ref_paths),
        "exact": len(exact),
        "near": len(near),
        "near_at": {f"{t:g}": int(((best >= t) & not_exact).sum()) for t in sweep},
        "pairs": (exact + near)[:max_pairs],
    }


def check(splits: dict, *, threshold: float = 0.95, max_pairs: int = 20, block: int = 2048) -> dict:
    """Leakage between the splits of a study (`splits[name]` has `.X` and `.paths`, and may have `.hashes`, the
    files' content hashes, as the extraction computed them: those files are not read again); `warning` is None
    when clean."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"duplicate threshold must be in (0, 1], got {threshold}")
    hashes: dict[str, bytes] = {}
    for split in splits.values():
        if getattr(split, "hashes", None) is not None:
            hashes.update(zip(split.paths, split.hashes))
    out = {"threshold": threshold, "comparisons": {}}
    for query, ref in COMPARISONS:
        a, b = splits.get(query), splits.get(ref)
        if a is None or b is None or not len(a.paths) or not len(b.paths):
            continue
        out["comparisons"][f"{query}-{ref}"] = compare(
            a.paths, a.X, b.paths, b.X, threshold=threshold, max_pairs=max_pairs, hashes=hashes, block=block
        )
    found = [(name, c) for name, c in out["comparisons"].items() if c["exact"] or c["near"]]
    out["exact"] = sum(c["exact"] for c in out["comparisons"].values())
    out["near"] = sum(c["near"] for c in out["comparisons"].values())
    out["warning"] = None
    if found:
        parts = [
            f"{c['exact']} exact and {c['near']} near-duplicate {name.split('-')[0]} images of "
            f"{name.split('-')[1]} images"
            for name, c in found
        ]
        out["warning"] = (
            f"possible leakage between splits (cosine >= {threshold:g} for near-duplicates): "
            f"{'; '.join(parts)}. Scores on those splits may be optimistic."
        )
    return out
