"""Runtime: the frozen backbone's forward pass through ONNX Runtime on CPU, and the CPU thread budget.

This module owns (1) exporting a backbone's pooled-feature forward to ONNX once per feature cache key
(`prepare`: `<cache>/onnx/<torch fp32 key>.onnx`, written atomically, with `<key>.json` beside it recording
the parity with torch, the tolerance and the versions), (2) the ONNX Runtime session (`OrtBackbone`,
kept once per process, graph file and thread count), (3) extraction "lanes" (`ort_batches`) and (4) the
thread budget (`cpu_threads`), so torch, ONNX Runtime and BLAS threads together never exceed the cores.

Parity decides what an ONNX Runtime feature is: the max abs difference to torch fp32 on a fixed, seeded
probe batch. At or under PARITY_TOLERANCE the features share torch fp32's cache key; above it they get
their own key (`Backbone.cache_key(..., runtime="onnxruntime")`). Any failure (export, loading, a missing
onnxruntime) raises RuntimeUnavailable with the reason, and the caller falls back to torch.

How extraction uses the cores (measured on 2 cores, benchmarks/speed.py row 7): not "decoder workers + one
multi-threaded ORT call" but lanes: `workers` threads (= the cores), each taking a whole batch through
decode -> resize -> normalise -> a single-threaded `session.run`. PIL and ORT release the GIL, so lanes run in
parallel, nothing spins, and the busy threads never exceed the lanes. Decoding of one batch overlaps the
forward pass of another.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ONNX_OPSET = 17
PARITY_TOLERANCE = 1e-4
ORT_BATCH_SIZE = 16  # per lane; the fastest raw forward on the benchmark machine (2 lanes x 1 thread, bs 16)


class RuntimeUnavailable(RuntimeError):
    """ONNX Runtime cannot run this backbone; the message says why (the caller falls back to torch)."""


def cores() -> int:
    """CPUs this process may use (affinity-aware, so containers and taskset are respected)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextlib.contextmanager
def cpu_threads(n: int):
    """Limit torch's intra-op threads and BLAS/OpenMP pools (threadpoolctl) to `n` for the block, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        try:
            from threadpoolctl import threadpool_limits

            limits = threadpool_limits(limits=max(1, n))
        except Exception:  # threadpoolctl missing or a pool it cannot control: torch's limit still holds
            limits = contextlib.nullcontext()
        with limits:
            yield
    finally:
        torch.set_num_threads(before)


# export ---------------------------------------------------------------------------------------------------
def trace_onnx(module, input_size, path, *, output: str, opset: int = ONNX_OPSET) -> None:
    """`module` (input `image`, float32 NCHW at `input_size`) traced to ONNX at `path` with a dynamic batch axis and
    one output named `output`; the one exporter call behind the backbone graphs here and `model.export`'s bundles."""
    import torch

    h, w = input_size
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) needs no onnxscript (not a dependency) and handles timm's models.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(1, 3, h, w),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=[output],
            dynamic_axes={"image": {0: "batch"}, output: {0: "batch"}},
        )


def export_backbone_onnx(model, input_size, path, opset: int = ONNX_OPSET) -> Path:
    """Write `model`'s pooled-feature forward as ONNX at `path`: input `image` float32 (batch, 3, h, w), output
    `features` float32 (batch, d), batch axis dynamic. Written to a temporary file beside `path` and renamed, so
    a killed run never leaves a half graph. Raises RuntimeUnavailable with the reason on any failure."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    h, w = input_size
    try:
        with torch.inference_mode(False), torch.no_grad():
            trace_onnx(model.float().cpu().eval(), (h, w), tmp, output="features", opset=opset)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0][:300]
        raise RuntimeUnavailable(f"ONNX export failed ({type(exc).__name__}: {first})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


# session --------------------------------------------------------------------------------------------------
class OrtBackbone:
    """An ONNX Runtime CPU session over an exported backbone: `self(batch NCHW float32) -> features`.

    `threads` is ORT's intra-op thread count for one call: 1 for extraction lanes, the cores for one batch
    with nothing else running. `session.run` is thread-safe, so one OrtBackbone serves all lanes.
    """

    def __init__(self, path, threads: int = 1):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = max(1, int(threads))
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # Spinning workers burn the cores the decoders need; waking costs little next to a conv layer.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise RuntimeUnavailable(
                f"ONNX Runtime cannot load {Path(path).name} ({type(exc).__name__}: {str(exc)[:300]})"
            ) from None
        self.path, self.threads = Path(path), so.intra_op_num_threads
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch) -> np.ndarray:
        if hasattr(batch, "numpy"):
            batch = batch.numpy()
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


_SESSIONS: dict[tuple[str, int, float], OrtBackbone] = {}
_SESSIONS_LOCK = threading.Lock()


def session_for(path, threads: int) -> OrtBackbone:
    """One session per graph file (and its mtime) and thread count in this process."""
    path = Path(path)
    key = (str(path.resolve()), int(threads), path.stat().st_mtime)
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            _SESSIONS[key] = OrtBackbone(path, threads=threads)
        return _SESSIONS[key]


def parity(model, session: OrtBackbone, input_size, n: int = 4, seed: int = 0) -> float:
    """Max |torch fp32 - ORT| over the features of a fixed, seeded probe batch (N(0,1) pixels, as after
    Normalize)."""
    import torch

    h, w = input_size
    x = np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)
    with torch.inference_mode():
        want = model.float().cpu().eval()(torch.from_numpy(x)).float().numpy()
    return float(np.abs(session(x) - want).max())


def versions() -> dict:
    import onnxruntime
    import torch

    return {"onnxruntime": onnxruntime.__version__, "torch": str(torch.__version__)}


class Prepared:
    """An exported backbone: `meta` (input size, parity, tolerance, versions), `shares_key` (parity within the
    tolerance: ORT features are torch fp32's) and `session(threads)`."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta

    @property
    def shares_key(self) -> bool:
        return self.meta["parity"] <= self.meta["tolerance"]

    def session(self, threads: int = 1) -> OrtBackbone:
        return session_for(self.path, threads)


_FAILED: dict[str, str] = {}  # graph path -> why it failed in this process (not retried, warned once)


def prepare(model, input_size, folder, key: str, tolerance: float = PARITY_TOLERANCE) -> Prepared:
    """The backbone exported once into `folder/<key>.onnx` (reused after) with parity recorded in `<key>.json`;
    parity is rechecked when onnxruntime's or torch's version changed. Raises RuntimeUnavailable with the
    reason when ONNX Runtime cannot be used."""
    where = str(Path(folder) / key)
    if where in _FAILED:
        raise RuntimeUnavailable(_FAILED[where])
    try:
        return _prepare(model, input_size, Path(folder), key, tolerance)
    except RuntimeUnavailable as exc:
        _FAILED[where] = str(exc)
        raise


def _prepare(model, input_size, folder: Path, key: str, tolerance: float) -> Prepared:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise RuntimeUnavailable("onnxruntime is not installed (pip install onnxruntime)") from None
    onnx_path, meta_path = folder / f"{key}.onnx", folder / f"{key}.json"
    meta = None
    if onnx_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
    fresh = meta is None or meta.get("input_size") != list(input_size)
    if fresh:
        t0 = time.perf_counter()
        export_backbone_onnx(model, input_size, onnx_path)
        meta = {
            "input_size": list(input_size),
            "opset": ONNX_OPSET,
            "export_seconds": round(time.perf_counter() - t0, 2),
        }
    if fresh or meta.get("versions") != versions() or meta.get("tolerance") != tolerance or "parity" not in meta:
        session = session_for(onnx_path, 1)
        meta.update(
            parity=parity(model, session, input_size),
            tolerance=tolerance,
            versions=versions(),
            probe={"images": 4, "seed": 0, "pixels": "N(0,1), as after Normalize"},
        )
        tmp = meta_path.with_name(f".{meta_path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, meta_path)
    return Prepared(onnx_path, meta)


# extraction ---------------------------------------------------------------------------------------------------
def ort_batches(n: int, make_batch, session: OrtBackbone, batch_size: int, workers: int):
    """Yield, in order, `(features, ok, failed)` per batch of `range(n)`: `make_batch(indices)` gives
    `(x or None, ok, failed)` (decode + transform, as the DataLoader's collate does) and `session` runs `x`.

    `workers` lanes each take a whole batch through both steps; at most `workers` + 1 batches are in flight,
    so memory stays flat. Use a session with 1 intra-op thread and hold the caller's threads at 1
    (`cpu_threads(1)`), so busy threads never exceed `workers`.
    """

    def one(start):
        x, ok, failed = make_batch(range(start, min(start + batch_size, n)))
        return (session(x) if x is not None else None), ok, failed

    starts = iter(range(0, n, batch_size))
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ort-lane") as pool:
        pending = deque(pool.submit(one, s) for _, s in zip(range(workers + 1), starts))
        try:
            while pending:
                result = pending.popleft().result()
                for s in starts:
                    pending.append(pool.submit(one, s))
                    break
                yield result
        finally:
            for f in pending:  # stopped early (Ctrl-C, --strict): drop what has not started
                f.cancel()
