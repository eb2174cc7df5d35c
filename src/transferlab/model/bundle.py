"""Bundles: a trained method saved as a folder that loads without executing code.

A bundle directory holds exactly these files, nothing else:

- `config.json`: backbone name, weights source and SHA-256 digest (of the state dict), preprocessing, input size,
  class names, head type and hyperparameters, library versions, and the SHA-256 of every other file;
- `head.safetensors` for transferlab's own heads (e.g. `SoftmaxHead`): their learned arrays, with the small
  non-array state in config.json; or `head.skops` for scikit-learn heads (SVC, Pipelines, ...), read with
  `skops.io` and an explicit allowlist of classes, never pickle or joblib;
- optionally `backbone.safetensors`: the backbone's weights when they cannot be had again by name (fine-tuned,
  random-init, or `embed_backbone=True`).

`load(DIR)` (also `transferlab.load`) returns a `Model` that predicts from image paths or PIL images. It refuses,
naming the reason, a bundle with an unexpected file, a file whose digest differs from config.json, a head class
outside the allowlist, or backbone weights that are missing or whose digest differs from the one trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from .. import __version__
from ..features.backbones import Backbone, BackboneError, load_backbone, state_dict_digest
from ..heads import registry
from ..heads.serialize import HEAD_FILES, HeadFormatError, jsonable, load_head, save_head

FORMAT = "transferlab-bundle"
FORMAT_VERSION = 1
CONFIG = "config.json"
BACKBONE_FILE = "backbone.safetensors"
ALLOWED_FILES = frozenset({CONFIG, BACKBONE_FILE, *HEAD_FILES.values()})


class BundleError(BackboneError):
    """A bundle that cannot be saved or loaded safely; the message says why and what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def class_columns(estimator, classes: list[str]) -> np.ndarray:
    """For each column of estimator.predict_proba, its index in `classes` (labels are indices or names)."""
    seen = np.asarray(estimator.classes_)
    if seen.dtype.kind in "iu":
        cols = seen.astype(np.int64)
        if cols.size and (cols.min() < 0 or cols.max() >= len(classes)):
            raise BundleError(f"head labels {cols.tolist()} fall outside the {len(classes)} classes")
        return cols
    index = {c: i for i, c in enumerate(classes)}
    missing = [str(c) for c in seen if str(c) not in index]
    if missing:
        raise BundleError(f"head labels {missing} are not among the classes {classes}")
    return np.array([index[str(c)] for c in seen], dtype=np.int64)


def unwrap(estimator, backbone: Backbone) -> tuple[object, Backbone, bool, dict]:
    """What a bundle stores for a fitted method: (head, backbone, fine_tuned, notes).

    A validation search (`best_estimator_`) is saved as the model it chose; a fine-tuned model (`model_` =
    Sequential(backbone, Linear), e.g. `finetune.FineTuner`) as its trained backbone plus a `SoftmaxHead`
    holding the Linear layer, so it predicts the same probabilities from that backbone's features.
    """
    from torch import nn

    notes: dict = {}
    if hasattr(estimator, "best_estimator_"):
        summary = {
            "best_params": getattr(estimator, "best_params_", None),
            "valid": getattr(estimator, "best_valid_", None),
            "scoring": getattr(estimator, "scoring", None),
        }
        notes["search"] = json.loads(json.dumps(summary, default=jsonable))
        return estimator.best_estimator_, backbone, False, notes
    model = getattr(estimator, "model_", None)
    if isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[1], nn.Linear):
        from ..heads.seed import SoftmaxHead

        linear = model[1]
        head = SoftmaxHead(logit_adjust=0.0)
        head.coef_ = linear.weight.detach().cpu().float().numpy().copy()
        head.intercept_ = linear.bias.detach().cpu().float().numpy().copy()
        head.log_prior_ = np.zeros(len(head.intercept_))
        head.classes_ = np.asarray(estimator.classes_)
        head.n_features_in_ = head.coef_.shape[1]
        body = model[0].cpu().eval()
        tuned = dataclasses.replace(backbone, model=body, weights_digest=state_dict_digest(body))
        notes["fine_tuned_from"] = {"weights": backbone.weights, "weights_digest": backbone.weights_digest}
        return head, tuned, True, notes
    return estimator, backbone, False, notes


# ---- saving -----------------------------------------------------------------------------------------------


def library_versions() -> dict:
    import platform

    import safetensors
    import sklearn
    import skops
    import timm
    import torch

    return {
        "transferlab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "skops": skops.__version__,
    }


def save_bundle(
    directory,
    estimator,
    backbone: Backbone,
    classes: list[str],
    *,
    method: str | None = None,
    precision: str | None = None,
    tta: bool = False,
    fine_tuned: bool = False,
    embed_backbone: bool | None = None,
    extra: dict | None = None,
) -> Path:
    """Write `estimator` (fitted on `backbone`'s features) and how to rebuild the backbone as a bundle folder.

    The backbone's weights are stored in the bundle (backbone.safetensors) when `fine_tuned`, when they are
    random-init (they cannot be recreated), or when `embed_backbone` is true; otherwise config.json records
    where they come from (embedded package, hub name, or local file path) and their digest. `tta` records
    that the head was trained on mean(plain, flipped) features. An existing bundle at `directory` is replaced whole.
    """
    directory = Path(directory)
    classes = [str(c) for c in classes]
    estimator, backbone, tuned, notes = unwrap(estimator, backbone)
    fine_tuned = fine_tuned or tuned
    extra = {**notes, **(extra or {})}
    class_columns(estimator, classes)  # labels must map onto classes
    if embed_backbone is None:
        embed_backbone = fine_tuned or backbone.weights == "random"
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        try:
            head = save_head(estimator, tmp)
        except HeadFormatError as exc:
            raise BundleError(str(exc)) from None
        bb = {
            "name": backbone.name,
            "weights": backbone.weights,
            "weights_digest": backbone.weights_digest,
            "num_features": backbone.num_features,
            "fine_tuned": bool(fine_tuned),
            "embedded": bool(embed_backbone),
        }
        if backbone.weights.startswith("file:") and backbone.extra.get("weights_path"):
            bb["weights_path"] = str(backbone.extra["weights_path"])
        if embed_backbone:
            from safetensors.torch import save_file

            state = {k: v.detach().cpu().contiguous().clone() for k, v in backbone.model.state_dict().items()}
            save_file(state, str(tmp / BACKBONE_FILE))
            bb["weights_digest"] = state_dict_digest(backbone.model)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": method or head["class"],
            "kind": registry.METHODS[method].kind if method in registry.METHODS else None,  # seed/tuned/...
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "classes": classes,
            "backbone": bb,
            "preprocessing": backbone.preprocessing(),
            "precision": precision,
            "tta": bool(tta),
            "head": head,
            "files": files,
            "versions": library_versions(),
            "extra": extra or {},
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, default=jsonable) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


# ---- loading ----------------------------------------------------------------------------------------------


def resolve(directory) -> Path:
    """The bundle folder `directory` names: itself, or for a run folder (RUN or RUN/models, written by `transferlab
    run`) the bundle of the method the run selected (metrics.json's `selected`, the report's starred method)."""
    d = Path(directory)
    if (d / CONFIG).is_file():
        return d
    run = d if (d / "metrics.json").is_file() else d.parent if d.name == "models" else None
    if run is None or not (run / "metrics.json").is_file():
        return d
    try:
        selected = json.loads((run / "metrics.json").read_text()).get("selected")
    except (OSError, ValueError, AttributeError):
        return d
    saved = (
        sorted(p.name for p in (run / "models").iterdir() if (p / CONFIG).is_file())
        if (run / "models").is_dir()
        else []
    )
    if selected in saved:
        return run / "models" / selected
    raise BundleError(
        f"{d} is a run folder whose selected method ({selected}) has no saved model; pass one of its bundles, "
        f"{run / 'models'}/<method> ({', '.join(saved) or 'none saved'})"
    )


def read_config(directory) -> dict:
    """config.json of a bundle, after checking that the folder holds only expected, untampered files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"bundle not found: {directory} is not a folder (a bundle is a folder with config.json)")
    unexpected = sorted(p.name for p in directory.iterdir() if p.name not in ALLOWED_FILES or not p.is_file())
    if unexpected:
        raise BundleError(
            f"bundle {directory} contains unexpected file(s): {', '.join(unexpected)} "
            f"(a bundle holds only {', '.join(sorted(ALLOWED_FILES))}); refused"
        )
    if not (directory / CONFIG).is_file():
        raise BundleError(f"bundle {directory} has no {CONFIG}")
    try:
        config = json.loads((directory / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{directory / CONFIG} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise BundleError(f"{directory / CONFIG} is not a transferlab bundle config")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(
            f"bundle format {config['format_version']} is newer than this transferlab "
            f"({__version__}, format {FORMAT_VERSION}); upgrade transferlab"
        )
    files = config.get("files", {})
    present = {p.name for p in directory.iterdir()} - {CONFIG}
    for name in sorted(present | set(files)):
        if name not in files:
            raise BundleError(f"bundle {directory}: {name} is not listed in {CONFIG}; refused")
        if name not in present:
            raise BundleError(f"bundle {directory}: {name} is missing")
        if _sha256(directory / name) != files[name]:
            raise BundleError(
                f"bundle {directory}: {name} does not match the digest recorded in {CONFIG} "
                f"(the file was changed or replaced); refused"
            )
    if config.get("head", {}).get("file") not in present:
        raise BundleError(f"bundle {directory}: the head file named in {CONFIG} is missing")
    return config


def _rebuild_backbone(config: dict, directory: Path, weights=None) -> Backbone:
    bb, pre = config["backbone"], config["preprocessing"]
    size = tuple(pre["input_size"])
    source = bb["weights"]
    try:
        if bb.get("embedded"):
            from safetensors.torch import load_file

            backbone = load_backbone(bb["name"], weights="random", input_size=size)
            try:
                backbone.model.load_state_dict(load_file(str(directory / BACKBONE_FILE)))
            except RuntimeError as exc:
                raise BundleError(f"{directory / BACKBONE_FILE} does not fit {bb['name']}: {str(exc)[:300]}") from None
            got = f"{BACKBONE_FILE} in the bundle"
        elif weights is not None or source.startswith("file:"):
            path = Path(weights or bb.get("weights_path") or source.removeprefix("file:")).expanduser()
            if not path.is_file():
                raise BundleError(
                    f"backbone weights for this bundle are missing: {path} not found (the bundle was "
                    f"trained with {source}, digest {bb['weights_digest'][:16]}…); pass the file "
                    f"with weights=PATH (CLI: --weights PATH)"
                )
            backbone = load_backbone(bb["name"], weights=path, input_size=size)
            got = str(path)
        elif source == "random":
            raise BundleError(
                "this bundle's backbone was random-init and its weights were not stored; it cannot be rebuilt"
            )
        else:
            backbone = load_backbone(bb["name"], input_size=size)
            got = backbone.weights
    except BundleError:
        raise
    except BackboneError as exc:
        raise BundleError(f"backbone weights for this bundle are missing ({source}): {exc}") from None
    digest = state_dict_digest(backbone.model)
    if digest != bb["weights_digest"]:
        raise BundleError(
            f"backbone weights digest differs: the bundle was trained on {bb['name']} weights "
            f"{source} with digest {bb['weights_digest'][:16]}…, but {got} gives {digest[:16]}…; "
            f"predictions would be meaningless, refused"
        )
    return dataclasses.replace(
        backbone,
        weights=source,
        weights_digest=digest,
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        interpolation=pre["interpolation"],
        input_size=size,
    )


def load(
    directory,
    *,
    weights=None,
    device: str = "auto",
    precision: str = "auto",
    cache_dir=None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    runtime: str = "auto",
) -> Model:
    """Load a bundle folder as a `Model`; `weights=PATH` points a `file:` bundle at its backbone weights. A run
    folder (RUN or RUN/models) loads the bundle of the run's selected method (`resolve`)."""
    directory = resolve(directory)
    config = read_config(directory)
    try:
        estimator = load_head(config["head"], directory)
    except HeadFormatError as exc:
        raise BundleError(str(exc)) from None
    backbone = _rebuild_backbone(config, directory, weights)
    return Model(
        config=config,
        estimator=estimator,
        backbone=backbone,
        path=directory,
        device=device,
        precision=precision,
        cache_dir=cache_dir,
        batch_size=batch_size,
        num_workers=num_workers,
        runtime=runtime,
    )


def image_list(images) -> list:
    """What `Model` predicts on, as a list of paths and PIL images: a path, a PIL image, a numpy array (one
    H x W or H x W x C uint8 RGB image, or a stack N x H x W x C), or a list of any of these."""
    from PIL import Image

    if isinstance(images, np.ndarray):
        one = images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 3, 4))
        images = [images] if one else list(images)
    elif isinstance(images, (str, Path, Image.Image)):
        images = [images]
    else:
        images = list(images)
    return [_array_image(x) if isinstance(x, np.ndarray) else x for x in images]


def _array_image(a: np.ndarray):
    from PIL import Image

    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3, 4))):
        raise ValueError(
            f"an image array must be uint8, H x W or H x W x 3 (RGB; 1 or 4 channels too), got {a.dtype} {a.shape}"
        )
    return Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a)


class Model:
    """A loaded bundle: backbone + head, predicting from image paths, PIL images or uint8 RGB arrays.

    `predict` returns class names, `predict_proba` an (n, n_classes) array over `classes` (the bundle's
    order). Features of image files go through the feature cache (`cache_dir`, default the usual one), so
    images the same backbone already saw skip the forward pass; `cache_dir=False` computes without caching.
    """

    def __init__(
        self,
        *,
        config: dict,
        estimator,
        backbone: Backbone,
        path: Path | None = None,
        device: str = "auto",
        precision: str = "auto",
        cache_dir=None,
        batch_size: int | None = None,
        num_workers: int | None = None,
        runtime: str = "auto",
    ):
        self.config, self.estimator, self.backbone, self.path = config, estimator, backbone, path
        self.classes: list[str] = list(config["classes"])
        self.device, self.precision, self.cache_dir = device, precision, cache_dir
        self.batch_size, self.num_workers, self.runtime = batch_size, num_workers, runtime
        self.tta = bool(config.get("tta", False))
        self._columns = class_columns(estimator, self.classes)

    def __repr__(self) -> str:
        return (
            f"Model({self.config.get('method')}: {self.backbone.name} {'x'.join(map(str, self.backbone.input_size))} "
            f"+ {type(self.estimator).__name__}, {len(self.classes)} classes)"
        )

    # features --------------------------------------------------------------------------------------------
    def extract(self, images, *, progress: bool = False, strict: bool = True, description: str = "features"):
        """Features of `images` (paths or PIL images) as an Extraction; unreadable paths raise when strict.

        With the bundle's `tta`, features are the mean of the image's and its horizontal flip's, as in training.
        """
        from ..warning_filters import quiet_decoding

        with quiet_decoding():
            return self._extract(images, progress=progress, strict=strict, description=description)

    def _extract(self, images, *, progress: bool, strict: bool, description: str):
        import contextlib

        from PIL import Image

        from ..features.extract import Extraction, extract_features

        images = image_list(images)
        if not images:
            return Extraction(features=np.zeros((0, self.backbone.num_features), dtype=np.float32), paths=[])
        paths = [str(x) for x in images if not isinstance(x, Image.Image)]
        pil_rows = [i for i, x in enumerate(images) if isinstance(x, Image.Image)]
        kw = dict(
            precision=self.precision,
            device=self.device,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            progress=progress,
            strict=strict,
            runtime=self.runtime,
            graph_dir=self._graph_dir,
        )
        ex = None
        if paths:
            nocache = tempfile.TemporaryDirectory(prefix="transferlab-nocache-") if self.cache_dir is False else None
            with nocache or contextlib.nullcontext(self.cache_dir) as cache_dir:
                ex = extract_features(paths, self.backbone, cache_dir=cache_dir, description=description, **kw)
                if self.tta and ex.paths:
                    flip = extract_features(
                        ex.paths,
                        self.backbone,
                        cache_dir=cache_dir,
                        view="hflip",
                        description=f"{description} (flipped)",
                        **kw,
                    )
                    at = {p: i for i, p in enumerate(flip.paths)}
                    ex.features = (ex.features + flip.features[[at[p] for p in ex.paths]]) / 2
                    ex.seconds += flip.seconds
            if ex.skipped and (strict or pil_rows):
                from ..data.images import ImageError

                first = ex.skipped[0]
                raise ImageError(first["path"], first["reason"])
        if not pil_rows:
            return ex
        pil = self._pil_features([images[i] for i in pil_rows])
        if ex is None:
            return Extraction(features=pil, paths=[f"<image {i}>" for i in pil_rows], computed=len(pil_rows))
        feats = np.zeros((len(images), pil.shape[1]), dtype=np.float32)
        feats[pil_rows] = pil
        taken = set(pil_rows)
        feats[[i for i in range(len(images)) if i not in taken]] = ex.features
        ex.features = feats
        ex.paths = [f"<image {i}>" if isinstance(x, Image.Image) else str(x) for i, x in enumerate(images)]
        ex.computed += len(pil_rows)
        return ex

    @property
    def _graph_dir(self):
        """Where the exported ONNX graph is kept: the feature cache, or the usual one when features are not
        cached (cache_dir=False), so `predict --no-cache` does not export the graph again on every call."""
        from ..features.cache import default_cache_dir

        return self.cache_dir or default_cache_dir()

    def _pil_features(self, images) -> np.ndarray:
        """Features of in-memory images, through the same runtime as files (ONNX Runtime on CPU where it runs,
        one call at a time with all cores as its threads, torch's and BLAS's held at one meanwhile)."""
        import contextlib

        import torch

        from ..data.images import to_rgb
        from ..features import runtime as ort_runtime
        from ..features.extract import TORCH_BATCH_SIZE, forward_features, plan_features, resolve_device

        dev = resolve_device(self.device)
        plan = plan_features(self.backbone, self._graph_dir, self.runtime, dev, self.precision)
        transform = self.backbone.transform()
        if plan.runtime == "onnxruntime":
            session = plan.prepared.session(threads=ort_runtime.cores())
            run = session
        else:
            model = self.backbone.model.to(dev).to(memory_format=torch.channels_last).eval()
            run = lambda x: forward_features(model, x, dev, plan.precision).numpy()  # noqa: E731
        size = self.batch_size or (ort_runtime.ORT_BATCH_SIZE if plan.runtime == "onnxruntime" else TORCH_BATCH_SIZE)
        out = []
        for start in range(0, len(images), size):
            batch = torch.stack([transform(to_rgb(im)) for im in images[start : start + size]])
            with ort_runtime.cpu_threads(1) if plan.runtime == "onnxruntime" else contextlib.nullcontext():
                feats = run(batch)
                if self.tta:
                    feats = (feats + run(torch.flip(batch, dims=[-1]))) / 2
            out.append(np.asarray(feats, dtype=np.float32))
        return np.concatenate(out)

    def features(self, images) -> np.ndarray:
        """The backbone's pooled features of `images`, one row per image."""
        return self.extract(images).features

    # head --------------------------------------------------------------------------------------------------
    def proba_from_features(self, X) -> np.ndarray:
        """Probabilities over all bundle classes (classes the head never saw get 0)."""
        if len(X) == 0:  # no image: scikit-learn refuses an empty array
            return np.zeros((0, len(self.classes)), dtype=np.float64)
        p = np.asarray(self.estimator.predict_proba(X), dtype=np.float64)
        full = np.zeros((len(p), len(self.classes)), dtype=np.float64)
        full[:, self._columns] = p
        return full

    def predict_indices_from_features(self, X) -> np.ndarray:
        """The head's own predictions (e.g. SVC's vote, not the argmax of its probabilities: they differ on ties of votes) as indices."""
        if len(X) == 0:
            return np.zeros(0, dtype=np.int64)
        pred = np.asarray(self.estimator.predict(X))
        seen = np.asarray(self.estimator.classes_)
        return self._columns[np.searchsorted(seen, pred)] if len(pred) else np.zeros(0, dtype=np.int64)

    def predict_proba(self, images) -> np.ndarray:
        """(n, n_classes) probabilities for image paths, PIL images and/or arrays (`image_list`)."""
        return self.proba_from_features(self.features(images))

    def predict(self, images) -> np.ndarray:
        """Predicted class names for image paths, PIL images and/or arrays (`image_list`)."""
        idx = self.predict_indices_from_features(self.features(images))
        return np.array(self.classes, dtype=object)[idx]


def save_study_bundles(
    models_dir,
    results: dict,
    backbone: Backbone,
    classes: list[str],
    *,
    precision: str | None = None,
    extra: dict | None = None,
) -> dict[str, str]:
    """One bundle per fitted method under `models_dir/<method>/`; sets results[m]["bundle"]. Each result says
    whether its method predicts on the mean of plain and flipped features (`tta`, set by whoever fitted it), and
    its bundle does the same. A method that cannot be saved gets results[m]["bundle_error"] and a warning instead
    of stopping the study."""
    import warnings

    saved = {}
    for name, res in results.items():
        info = {
            **(extra or {}),
            "valid": {
                k: res["valid"][k] for k in ("accuracy", "macro_f1", "balanced_accuracy") if k in res.get("valid", {})
            },
        }
        try:
            path = save_bundle(
                Path(models_dir) / name,
                res["estimator"],
                backbone,
                classes,
                method=name,
                precision=precision,
                tta=bool(res.get("tta")),
                extra=info,
            )
        except (BundleError, ValueError, TypeError, OSError) as exc:
            warnings.warn(f"method {name}: model bundle not saved ({exc})")
            res["bundle_error"] = str(exc)
            continue
        res["bundle"] = f"{Path(models_dir).name}/{name}"
        saved[name] = str(path)
    return saved
