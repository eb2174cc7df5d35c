"""Feature cache: opening a large cache and looking up a few keys (issue 18, bug 5), before and after the index.

Run by hand, not in CI:
    git show 847a675:src/transferlab/features/cache.py > /tmp/cache_old.py   # the cache before the index
    uv run python benchmarks/cache_index.py --old /tmp/cache_old.py

Fills a cache folder with --chunks synthetic chunks (--rows keys x --dim float32 features each, as
`FeatureCache.put` writes them; the format did not change), reads every file once so both versions start
from a warm page cache, then, in a fresh Python process per repeat and version (so nothing is kept in
memory between repeats):
- open: `FeatureCache(dir, key)`;
- lookup random: --lookups keys drawn at random over the whole cache (`get` one by one before,
  `get_many` after);
- lookup one chunk: --lookups keys that all sit in one chunk;
- peak RSS of the process.
After the index, the same process then opens the folder a second time (the process's index is kept:
only new chunks would be read) and looks up another --lookups random keys.
Medians over --repeats. Writes benchmarks/results/cache_index.json and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
KEY = "bench"


def _keys(chunk: int, rows: int) -> list[bytes]:
    return [chunk.to_bytes(4, "little") + row.to_bytes(4, "little") + bytes(8) for row in range(rows)]


def fill(folder: Path, chunks: int, rows: int, dim: int) -> None:
    from transferlab.features.cache import FeatureCache

    rng = np.random.default_rng(0)
    cache = FeatureCache(folder, KEY)
    for c in range(chunks):
        cache.put(_keys(c, rows), rng.standard_normal((rows, dim), dtype=np.float32), seconds=1.0)
        cache._held.clear()  # the writer keeps nothing: only the files matter here


def child(impl: str, folder: Path, chunks: int, rows: int, lookups: int, seed: int) -> dict:
    """One measurement in this (fresh) process."""
    if impl == "new":
        from transferlab.features import cache as module
    else:
        spec = importlib.util.spec_from_file_location("cache_old", impl)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    rng = np.random.default_rng(seed)
    flat = rng.choice(chunks * rows, size=2 * lookups, replace=False)
    spread = [_keys(int(i) // rows, rows)[int(i) % rows] for i in flat]
    one = _keys(int(rng.integers(chunks)), rows)[:lookups]

    def lookup(cache, keys):
        t = time.perf_counter()
        got = cache.get_many(keys) if hasattr(cache, "get_many") else {k: cache.get(k) for k in keys}
        assert len(got) == len(keys) and all(v is not None for v in got.values())
        return time.perf_counter() - t

    t = time.perf_counter()
    cache = module.FeatureCache(folder, KEY)
    out = {"open_s": time.perf_counter() - t}
    assert len(cache) == chunks * rows
    out["lookup_random_s"] = lookup(cache, spread[:lookups])
    out["lookup_one_chunk_s"] = lookup(cache, one)
    if impl == "new":
        t = time.perf_counter()
        again = module.FeatureCache(folder, KEY)
        out["reopen_s"] = time.perf_counter() - t
        out["reopen_lookup_random_s"] = lookup(again, spread[lookups:])
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def measure(impl: str, folder: Path, args) -> dict:
    runs = []
    for r in range(args.repeats):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            impl,
            "--dir",
            str(folder),
            "--chunks",
            str(args.chunks),
            "--rows",
            str(args.rows),
            "--lookups",
            str(args.lookups),
            "--seed",
            str(r),
        ]
        runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    return {k: statistics.median(run[k] for run in runs) for k in runs[0]} | {"runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--lookups", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--old", help="the cache module before the index (a cache.py file) to time beside it")
    ap.add_argument("--tmp", help="where to make the temporary cache folder (filled, then removed)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.dir), args.chunks, args.rows, args.lookups, args.seed)))
        return

    with tempfile.TemporaryDirectory(prefix="cache-index-", dir=args.tmp) as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        fill(folder, args.chunks, args.rows, args.dim)
        size = sum(p.stat().st_size for p in folder.rglob("chunk-*"))
        print(
            f"filled {args.chunks} chunks x {args.rows} keys x {args.dim} floats ({size / 2**20:.0f} MiB) "
            f"in {time.perf_counter() - t:.1f} s"
        )
        for p in folder.rglob("chunk-*"):  # warm page cache for both versions alike
            p.read_bytes()
        results = {"new": measure("new", folder, args)}
        if args.old:
            results = {"old": measure(args.old, folder, args), **results}

    rows = [
        ("open the cache", "open_s"),
        (f"look up {args.lookups} random keys", "lookup_random_s"),
        (f"look up {args.lookups} keys of one chunk", "lookup_one_chunk_s"),
        ("open again in the same process", "reopen_s"),
        (f"look up {args.lookups} other random keys there", "reopen_lookup_random_s"),
        ("peak RSS (MiB)", "peak_rss_mib"),
    ]
    print(f"\n{'':44}" + "".join(f"{name:>12}" for name in results))
    for label, key in rows:
        print(f"{label:44}" + "".join(f"{r[key]:12.3f}" if key in r else f"{'-':>12}" for r in results.values()))
    for name, r in results.items():
        print(f"{name}: open + {args.lookups} random lookups = {r['open_s'] + r['lookup_random_s']:.3f} s")

    out = {
        "config": {
            "chunks": args.chunks,
            "rows": args.rows,
            "dim": args.dim,
            "lookups": args.lookups,
            "repeats": args.repeats,
            "cache_mib": round(size / 2**20, 1),
            "old": args.old,
        },
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cache_index.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'cache_index.json'}")


if __name__ == "__main__":
    main()
