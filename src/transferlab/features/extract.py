"""Features: the frozen backbone's pooled penultimate activations ("CNN codes"), extracted once.

Images are hashed, looked up in the cache, and only the missing ones are decoded and passed through the
backbone in batches: on a CPU (single process) through ONNX Runtime in lanes that decode and run a batch
each (features/runtime.py), else through torch with DataLoader workers (channels_last, bf16/fp16 autocast
where the device does it natively). `resolve_runtime` says which; a backbone ONNX Runtime cannot run falls
back to torch with one line saying why. New features are written to the cache in chunks as they come, so memory stays flat and an
interrupted run resumes. Unreadable images are skipped and returned with their reason. The decoding
dataset `ImageFiles` and its batcher `collate` are shared with fine-tuning, which predicts the same way;
`TensorBatches` gives the ONNX Runtime lanes the same batches, bit for bit, prepared in place.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.progress import MofNCompleteColumn, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset

from ..data.hashing import content_hash
from ..data.images import ImageError, load_rgb
from ..progress import progress as progress_bar
from . import distributed
from . import runtime as ort_runtime
from .backbones import Backbone
from .cache import FeatureCache, default_cache_dir
from .options import PRECISIONS, RUNTIMES, ExtractionError

VIEWS = ("plain", "hflip")
TORCH_BATCH_SIZE = 64


class SettingsError(ExtractionError, ValueError):
    """Extraction settings that do not go together (e.g. --runtime onnxruntime with --precision bf16)."""


@dataclass
class Extraction:
    features: np.ndarray
    paths: list[str]
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    computed: int = 0
    from_cache: int = 0
    precision: str = "fp32"
    device: str = "cpu"
    cold_seconds: float = float("nan")
    runtime: str = "torch"
    hashes: dict[str, bytes] = field(default_factory=dict)  # each path's content hash: its feature cache key

    @property
    def images_per_second(self) -> float:
        return (self.computed + self.from_cache) / self.seconds if self.seconds > 0 else float("nan")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device `device` names ("auto": CUDA, else MPS, else CPU); ExtractionError, naming the value, for
    one this machine does not have (torch's own error came as a traceback from deep inside the first forward)."""
    if device != "auto":
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ExtractionError(f"--device {device!r} is not a device (e.g. auto, cpu, cuda, cuda:1, mps)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ExtractionError(f"--device {device}: this machine has no CUDA device; use --device cpu or auto")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ExtractionError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if dev.type == "mps" and not _mps_available():
            raise ExtractionError(f"--device {device}: MPS is not available here; use --device cpu or auto")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' picks bf16 where the hardware runs it natively, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and _cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def resolve_runtime(runtime: str, device: torch.device, precision: str) -> str:
    """'auto' picks ONNX Runtime (fp32) on a CPU in a single process unless bf16/fp16 is asked for by name, and
    torch on CUDA/MPS (autocast) or under torch.distributed. With --precision auto on a bf16-capable CPU it
    still picks ONNX Runtime fp32: measured faster than torch bf16 autocast there (benchmarks/speed.py row 7)."""
    if runtime not in RUNTIMES:
        raise SettingsError(f"runtime must be one of {', '.join(RUNTIMES)}, got '{runtime}'")
    if precision not in PRECISIONS:
        raise SettingsError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if runtime == "torch":
        return "torch"
    if device.type != "cpu":
        if runtime == "onnxruntime":
            raise SettingsError(
                f"--runtime onnxruntime runs on the CPU, not {device.type}; use --device cpu or --runtime auto"
            )
        return "torch"
    if precision in ("bf16", "fp16"):
        if runtime == "onnxruntime":
            raise SettingsError(f"ONNX Runtime runs fp32 graphs, not {precision}; use --precision fp32 or auto")
        return "torch"
    if distributed.is_distributed():
        return "torch"
    return "onnxruntime"


@dataclass
class Plan:
    """How features are computed: runtime, precision, the feature cache key, and the exported graph (ORT)."""

    runtime: str
    precision: str
    key: str
    prepared: object = None

    def describe(self) -> dict:
        if self.prepared is None:
            return {}
        meta = self.prepared.meta
        return {
            "parity_max_abs": meta["parity"],
            "tolerance": meta["tolerance"],
            "versions": meta["versions"],
            "shares_torch_fp32_key": self.prepared.shares_key,
        }


_WARNED: set[str] = set()


def plan_features(
    backbone: Backbone, cache_dir, runtime: str, device: torch.device, precision: str, view: str = "plain"
) -> Plan:
    """Resolve runtime and precision and the cache key. ONNX Runtime features share torch fp32's key when
    their parity (max abs difference on a fixed probe batch, checked when the graph is built) is within the
    tolerance; otherwise the runtime is part of the key. Any ONNX Runtime failure -> torch, said once."""
    rt = resolve_runtime(runtime, device, precision)
    if rt == "onnxruntime":
        folder = Path(cache_dir or default_cache_dir()) / "onnx"
        graph_key = backbone.cache_key("fp32", "plain")  # the graph does not depend on the view
        try:
            prepared = ort_runtime.prepare(backbone.model, backbone.input_size, folder, graph_key)
            return Plan(
                "onnxruntime",
                "fp32",
                backbone.cache_key("fp32", view, "torch" if prepared.shares_key else "onnxruntime"),
                prepared,
            )
        except ort_runtime.RuntimeUnavailable as exc:
            said = str(folder / graph_key)
            if said not in _WARNED:
                _WARNED.add(said)
                print(f"transferlab: onnxruntime unavailable for {backbone.name}: {exc}; using torch", file=sys.stderr)
    if runtime == "auto" and precision == "auto" and device.type == "cpu":
        # auto on a CPU means fp32 features whichever runtime computes them (torch under DDP or as the fallback
        # too), so they share a cache folder; torch fp32 also extracted faster than bf16 here (speed.py row 7)
        precision = "fp32"
    prec = resolve_precision(precision, device)
    return Plan("torch", prec, backbone.cache_key(prec, view))


def resize_target(transform) -> tuple[int, int] | None:
    """(width, height) that `transform` (a torchvision Compose, as timm builds it) resizes every image to first, or
    None when its first resize keeps the aspect (one side given) or there is none: what `load_rgb(reduce_to=)` needs."""
    from torchvision.transforms import Resize

    for step in getattr(transform, "transforms", ()):
        if isinstance(step, Resize):
            size = step.size
            return (int(size[1]), int(size[0])) if isinstance(size, (tuple, list)) and len(size) == 2 else None
    return None


def _read(path, prepare, reduce_to=None):
    """`(prepare(decoded RGB image), "")`, or `(None, why)`: an unreadable file or an image the transform fails on
    is skipped with its reason, never fatal to the run. `reduce_to`: `load_rgb`'s (large JPEGs decode reduced)."""
    try:
        return prepare(load_rgb(path, reduce_to)), ""
    except ImageError as exc:
        return None, exc.reason
    except Exception as exc:
        return None, f"cannot preprocess ({type(exc).__name__}: {exc})"


class ImageFiles(Dataset):
    """Image files as (tensor after `transform`, flipped for view "hflip", index, "") or (None, index, reason)."""

    def __init__(self, paths, transform, view):
        self.paths, self.transform, self.view = paths, transform, view
        self.reduce_to = resize_target(transform)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        x, reason = _read(self.paths[i], self.transform, self.reduce_to)
        if x is not None and self.view == "hflip":
            x = torch.flip(x, dims=[-1])
        return x, i, reason


class TensorBatches:
    """Image files by index -> `(float batch or None, ok indices, [(index, reason)])`, as `collate` over
    `ImageFiles` gives them and bit-identical to it, for the ONNX Runtime lanes.

    timm's eval transform runs its PIL steps per image (resize, crop); its last two steps (to-tensor and
    normalise: `x.float().div(255).sub(mean).div(std)`) run in place on one batch buffer per thread that is
    reused batch after batch. A fresh 2 MiB tensor per 240x800 image costs its page faults: on the benchmark
    machine to-tensor + normalise + stack took 6.4 ms per image on one core, in place 1.5 ms.
    A buffer is reused only by the thread that filled it, after its batch went through the session."""

    def __init__(self, paths, transform, view):
        from torchvision.transforms import Normalize, ToTensor

        *pil, to_tensor, normalize = transform.transforms
        if not (isinstance(to_tensor, ToTensor) and isinstance(normalize, Normalize)):  # timm's MaybeToTensor too
            raise TypeError(f"expected a transform ending in ToTensor, Normalize; got {transform}")
        self.paths, self.view = paths, view
        self.pil = pil
        self.reduce_to = resize_target(transform)
        self.mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(normalize.std, dtype=torch.float32).view(-1, 1, 1)
        self.local = threading.local()

    def _pixels(self, img) -> np.ndarray:
        for step in self.pil:
            img = step(img)
        if self.view == "hflip":  # flipping the pixels before the per-pixel arithmetic is the same as after
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(img)

    def __call__(self, indices):
        ok, failed, rows = [], [], []
        for i in indices:
            pixels, reason = _read(self.paths[i], self._pixels, self.reduce_to)
            if pixels is None:
                failed.append((i, reason))
            else:
                rows.append(pixels)
                ok.append(i)
        if not rows:
            return None, ok, failed
        h, w, c = rows[0].shape
        buf = getattr(self.local, "buf", None)
        if buf is None or buf.shape[0] < len(rows) or buf.shape[1:] != (c, h, w):
            buf = self.local.buf = torch.empty((len(indices), c, h, w))  # rows <= indices
        x = buf[: len(rows)]
        for row, pixels in zip(x, rows):
            np.copyto(row.numpy(), pixels.transpose(2, 0, 1))  # uint8 HWC -> float CHW, exact
        x.div_(255).sub_(self.mean).div_(self.std)
        return x, ok, failed


def collate(batch):
    """ImageFiles items as (stacked tensor or None, indices of the readable ones, [(index, reason)] of the rest)."""
    ok = [b for b in batch if b[0] is not None]
    x = torch.stack([b[0] for b in ok]) if ok else None
    return x, [b[1] for b in ok], [(b[1], b[2]) for b in batch if b[0] is None]


def default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    return min(8, cores) if device.type == "cuda" else max(1, min(4, cores // 2))


def forward_features(model: torch.nn.Module, x: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """Pooled features of a preprocessed batch, in float32 on the CPU."""
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return model(x).float().cpu()


def extract_features(
    paths: list[str],
    backbone: Backbone,
    *,
    cache_dir=None,
    precision: str = "auto",
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    chunk_size: int = 512,
    view: str = "plain",
    progress: bool = True,
    strict: bool = False,
    description: str = "features",
    runtime: str = "auto",
    graph_dir=None,
) -> Extraction:
    """Features for `paths` (in order, unreadable ones skipped), computing only what the cache lacks.

    `batch_size` None: per runtime (ONNX Runtime lanes ORT_BATCH_SIZE each, torch TORCH_BATCH_SIZE).
    `graph_dir`: the cache folder whose onnx/ keeps the exported graph, if not `cache_dir` (a throwaway
    feature cache still reuses the graph exported before)."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got '{view}'")
    start = time.perf_counter()
    dev = resolve_device(device)
    cache_dir = cache_dir or default_cache_dir()
    plan = plan_features(backbone, graph_dir or cache_dir, runtime, dev, precision, view)
    prec = plan.precision
    runtime_key = "torch" if plan.runtime == "torch" or plan.prepared.shares_key else "onnxruntime"
    cache = FeatureCache(
        cache_dir, plan.key, meta={**backbone.describe(), **backbone.cache_inputs(prec, view, runtime_key)}
    )
    if batch_size is None:
        batch_size = ort_runtime.ORT_BATCH_SIZE if plan.runtime == "onnxruntime" else TORCH_BATCH_SIZE

    skipped: dict[str, str] = {}
    keys: dict[str, bytes] = {}
    for p in paths:
        try:
            keys[p] = content_hash(p)
        except OSError as exc:
            skipped[p] = f"cannot read ({exc.strerror or exc})"
    found = cache.get_many(dict.fromkeys(keys.values()))  # reads (and checks) only the chunks holding these images
    todo: dict[bytes, str] = {}
    for p, k in keys.items():
        if k not in found and k not in todo:
            todo[k] = p
    from_cache = sum(1 for k in keys.values() if k in found)

    # Under torch.distributed each process computes its share of rank 0's list, then all caches are completed.
    todo = distributed.agree(todo)
    mine = distributed.shard(list(todo.items()))
    if mine:
        _compute(
            cache,
            mine,
            backbone,
            dev,
            prec,
            batch_size,
            default_workers(dev) if num_workers is None else num_workers,
            chunk_size,
            view,
            progress and distributed.is_main(),
            strict,
            skipped,
            description,
            plan,
        )
        cache.note_runtime(plan.runtime, {"precision": prec, **plan.describe()})
    distributed.gather_cache(cache, [k for k, p in mine if p not in skipped], skipped)
    failed = {keys[p]: r for p, r in skipped.items() if p in keys}  # e.g. several zero-byte files: one hash
    skipped.update({p: failed[k] for p, k in keys.items() if k in failed and p not in skipped})

    kept = [p for p in paths if p in keys and p not in skipped]
    got = cache.get_many(dict.fromkeys(keys[p] for p in kept))  # held already: found above or computed here
    lost = [p for p in kept if keys[p] not in got]
    if lost:  # only if a chunk another process wrote turned out corrupt after it was exchanged
        raise ExtractionError(
            f"features of {len(lost)} images (e.g. {lost[0]}) vanished from the cache during "
            f"this run; rerun to compute them"
        )
    cold = float(sum(cache.compute_seconds(k) for k in got))
    feats = np.stack([got[keys[p]] for p in kept]) if kept else np.zeros((0, backbone.num_features), np.float32)
    return Extraction(
        features=feats,
        paths=kept,
        skipped=[{"path": p, "reason": r} for p, r in skipped.items()],
        seconds=time.perf_counter() - start,
        computed=len(todo) - sum(1 for p in todo.values() if p in skipped),
        from_cache=from_cache,
        precision=prec,
        device=str(dev),
        cold_seconds=cold,
        runtime=plan.runtime,
        hashes={p: keys[p] for p in kept},
    )


def _torch_batches(paths, backbone, dev, prec, batch_size, num_workers, view):
    """(features as numpy or None, ok indices, failed) per batch: DataLoader workers decode, torch runs."""
    model = backbone.model.to(dev).to(memory_format=torch.channels_last).eval()
    loader = DataLoader(
        ImageFiles(paths, backbone.transform(), view),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
    for x, idx, failed in loader:
        yield (forward_features(model, x, dev, prec).numpy() if x is not None else None), idx, failed


def _ort_batches(paths, backbone, prepared, batch_size, view):
    """The same per batch through ONNX Runtime: one lane per core, each decoding a batch and running it with a
    single-threaded session while torch (the transform) and BLAS are held at one thread, so the busy threads
    never exceed the cores."""
    lanes = ort_runtime.cores()
    session = prepared.session(threads=1)
    with ort_runtime.cpu_threads(1):
        yield from ort_runtime.ort_batches(
            len(paths), TensorBatches(paths, backbone.transform(), view), session, batch_size, lanes
        )


def _compute(
    cache,
    todo,
    backbone,
    dev,
    prec,
    batch_size,
    num_workers,
    chunk_size,
    view,
    progress,
    strict,
    skipped,
    description,
    plan=None,
):
    todo_keys = [k for k, _ in todo]
    todo_paths = [p for _, p in todo]
    if plan is not None and plan.runtime == "onnxruntime":
        batches = _ort_batches(todo_paths, backbone, plan.prepared, batch_size, view)
    else:
        batches = _torch_batches(todo_paths, backbone, dev, prec, batch_size, num_workers, view)
    pending_keys: list[bytes] = []
    pending: list[np.ndarray] = []

    last = [time.perf_counter()]

    def flush():
        if pending_keys:
            now = time.perf_counter()
            cache.put(list(pending_keys), np.concatenate(pending), seconds=now - last[0])
            last[0] = now
            pending_keys.clear()
            pending.clear()

    t0 = time.perf_counter()
    done = 0
    stats = MofNCompleteColumn(), TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn()
    with progress_bar(*stats, enabled=progress) as bar:
        task = bar.add_task(description, total=len(todo_paths), rate="-")
        try:
            for feats, idx, failed in batches:
                for i, reason in failed:
                    if strict:
                        raise ExtractionError(f"{todo_paths[i]}: {reason} (--strict)")
                    skipped[todo_paths[i]] = reason
                if feats is not None:
                    pending.append(np.asarray(feats, dtype=np.float32))
                    pending_keys.extend(todo_keys[i] for i in idx)
                if len(pending_keys) >= chunk_size:
                    flush()
                done += len(idx) + len(failed)
                bar.update(task, advance=len(idx) + len(failed), rate=f"{done / (time.perf_counter() - t0):.1f}")
        finally:
            try:
                batches.close()  # stop the lanes / DataLoader workers before the last chunk is written
            finally:
                flush()  # keep every finished batch, also on Ctrl-C or an error
