"""Export: a bundle's backbone + head as one ONNX graph (`transferlab export BUNDLE --onnx model.onnx`).

The graph takes `image`, float32 NCHW (batch, 3, H, W) at the bundle's input size, already preprocessed
(RGB, whole image resized to W x H without crop, scaled to [0, 1], minus mean, divided by std: all written in
the model's metadata_props), and returns `probabilities` (batch, n_classes) in the bundle's class order.

Heads that are linear maps followed by softmax export exactly: `SoftmaxHead` (its logit adjustment folded into
the bias), `LogisticRegression`, `probes.LinearSVMHead` and `probes.ShrinkageLDAHead`, each optionally behind `StandardScaler`, `Normalizer`
(l2), `PCA` and `probes.FeatureTransform` steps of a Pipeline (tuned heads are exported as the model they chose).
Other heads (SVC, k-NN, ...) are refused with a message; use `transferlab.load(...)` for them.
Every converted head is checked against the estimator's own `predict_proba` before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..features.runtime import ONNX_OPSET, trace_onnx
from ..heads import registry
from ..heads.probes import FeatureTransform, LinearSVMHead, ShrinkageLDAHead
from ..heads.views import ViewAugmented
from ..report.layout import output_file
from .bundle import BundleError, Model, class_columns, load


class ExportError(BundleError):
    """A bundle that cannot be exported as asked; the message says why."""


class _Affine(nn.Module):
    """x -> (x - shift) @ matrix (+ bias), i.e. a fixed Linear layer."""

    def __init__(self, matrix: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.linear = nn.Linear(matrix.shape[0], matrix.shape[1])
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(matrix.T, dtype=torch.float32))
            self.linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))

    def forward(self, x):
        return self.linear(x)


class _L2Normalize(nn.Module):
    def forward(self, x):
        norm = torch.sqrt((x * x).sum(dim=1, keepdim=True))
        return x / torch.clamp(norm, min=1e-12)  # all-zero rows stay zero, as in scikit-learn


class _Softmax(nn.Module):
    """Softmax over the head's classes, scattered into the bundle's full class list (unseen classes get 0)."""

    def __init__(self, columns: np.ndarray, n_classes: int):
        super().__init__()
        scatter = np.zeros((len(columns), n_classes), dtype=np.float32)
        scatter[np.arange(len(columns)), columns] = 1.0
        self.register_buffer("scatter", torch.from_numpy(scatter))

    def forward(self, logits):
        return torch.softmax(logits, dim=1) @ self.scatter


def _affine_step(step) -> tuple[np.ndarray, np.ndarray] | str:
    """A preprocessing step as (matrix, bias) with y = x @ matrix + bias, 'l2' for Normalizer, or raise."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import Normalizer, StandardScaler

    if isinstance(step, StandardScaler):
        d = step.n_features_in_
        mean = step.mean_ if step.mean_ is not None else np.zeros(d)
        scale = step.scale_ if step.scale_ is not None else np.ones(d)
        return np.diag(1.0 / scale), -mean / scale
    if isinstance(step, Normalizer) and step.norm == "l2":
        return "l2"
    if isinstance(step, FeatureTransform):
        if step.kind == "standard":
            return _affine_step(step.scaler_)
        if step.kind == "pca_whiten":
            return _affine_step(step.pca_)
        if step.kind == "l2":
            return "l2"
        d = step.n_features_in_
        return np.eye(d), np.zeros(d)
    if isinstance(step, PCA):
        matrix = step.components_.T.copy()
        if step.whiten:
            matrix /= np.sqrt(step.explained_variance_)
        return matrix, -step.mean_ @ matrix
    raise ExportError(
        f"pipeline step {type(step).__name__} has no exact ONNX conversion "
        f"(supported: StandardScaler, Normalizer(norm='l2'), PCA, FeatureTransform)"
    )


def _linear_logits(est) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, bias) of a linear softmax classifier: logits = x @ matrix + bias."""
    from sklearn.linear_model import LogisticRegression

    from ..heads.seed import SoftmaxHead

    if (
        isinstance(est, SoftmaxHead)
        and type(est).predict_proba is SoftmaxHead.predict_proba
        and type(est).decision_function is SoftmaxHead.decision_function
    ):
        bias = est.intercept_ - est.logit_adjust * est.log_prior_
        return est.coef_.T.astype(np.float64), bias.astype(np.float64)
    if isinstance(est, (LinearSVMHead, ShrinkageLDAHead)):
        coef, intercept = est.coef_, est.intercept_  # predict_proba = softmax (binary: sigmoid) of the decision values
        if coef.shape[0] == 1:
            coef, intercept = np.vstack([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
        return coef.T.astype(np.float64), intercept.astype(np.float64)
    if hasattr(est, "members_"):  # selection.SoftVoteEnsemble: a mean of several heads' probabilities
        raise ExportError(
            f"head {type(est).__name__} averages the probabilities of {', '.join(est.names_)}; a mean "
            f"of softmaxes (and an RBF SVM's probabilities) has no exact linear ONNX graph here. Use "
            f"transferlab.load(BUNDLE).predict_proba or `transferlab predict` for this head"
        )
    if isinstance(est, LogisticRegression):
        coef, intercept = est.coef_, est.intercept_
        if coef.shape[0] == 1:  # binary: p = sigmoid(z) = softmax([0, z])
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
        return coef.T.astype(np.float64), intercept.astype(np.float64)
    raise ExportError(
        f"head {type(est).__name__} is not a linear softmax head, so it has no exact ONNX graph here; "
        f"export supports SoftmaxHead, LogisticRegression, LinearSVMHead and ShrinkageLDAHead (optionally after "
        f"StandardScaler/Normalizer/PCA/FeatureTransform). Use transferlab.load(BUNDLE).predict_proba "
        f"or `transferlab predict` for this head"
    )


def head_module(estimator, classes: list[str]) -> nn.Module:
    """The head as a torch module: features -> probabilities over `classes`, equal to its predict_proba."""
    from sklearn.pipeline import Pipeline

    estimator = getattr(estimator, "best_estimator_", estimator)  # a validation search: the model it chose
    if isinstance(estimator, ViewAugmented):  # trained on both views; a bundle hands it the views' mean, as here
        estimator = estimator.estimator_
    steps = (
        [s for _, s in estimator.steps if s not in (None, "passthrough")]
        if isinstance(estimator, Pipeline)
        else [estimator]
    )
    *pre, final = steps
    layers: list[nn.Module] = []
    matrix = None
    for step in pre:
        conv = _affine_step(step)
        if isinstance(conv, str):
            if matrix is not None:
                layers.append(_Affine(*matrix))
                matrix = None
            layers.append(_L2Normalize())
        else:
            matrix = conv if matrix is None else (matrix[0] @ conv[0], matrix[1] @ conv[0] + conv[1])
    w, b = _linear_logits(final)
    if matrix is not None:  # fold the affine preprocessing into the classifier
        w, b = matrix[0] @ w, matrix[1] @ w + b
    layers += [_Affine(w, b), _Softmax(class_columns(estimator, classes), len(classes))]
    return nn.Sequential(*layers).eval()


def _check_head(module: nn.Module, model: Model, n_features: int, tol: float = 1e-4) -> None:
    rng = np.random.default_rng(0)
    X = np.abs(rng.normal(0, 1, (64, n_features))).astype(np.float32)  # pooled post-activation features are >= 0
    with torch.no_grad():
        got = module(torch.from_numpy(X)).numpy()
    want = model.proba_from_features(X)
    err = float(np.abs(got - want).max())
    if err > tol:
        raise ExportError(
            f"the converted head differs from {type(model.estimator).__name__}.predict_proba by {err:.2e}; not exported"
        )


class _Full(nn.Module):
    """Image -> probabilities; with `tta` the features are the mean of the image's and its horizontal flip's, as the
    bundle's own predictions are (`Model.extract`)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, tta: bool = False):
        super().__init__()
        self.backbone, self.head, self.tta = backbone, head, tta

    def forward(self, image):
        feats = self.backbone(image)
        if self.tta:
            feats = (feats + self.backbone(torch.flip(image, dims=[-1]))) / 2
        return self.head(feats)


def metadata(model: Model) -> dict[str, str]:
    """What a consumer of the ONNX file needs: preprocessing, classes, provenance (all strings)."""
    cfg, pre = model.config, model.config["preprocessing"]
    h, w = pre["input_size"]
    return {
        "transferlab.format": "transferlab-onnx/1",
        "input": f"image: float32 NCHW (batch, 3, {h}, {w}), RGB",
        "output": f"probabilities: float32 (batch, {len(model.classes)}), columns in class_names order",
        "preprocessing": (
            f"decode to RGB (EXIF orientation applied, alpha composited on white); resize the whole image "
            f"to width {w} x height {h} with no crop ({pre['interpolation']}, PIL); scale to [0, 1]; "
            f"subtract mean and divide by std per channel; HWC -> CHW"
        ),
        "input_size": json.dumps([h, w]),
        "mean": json.dumps(pre["mean"]),
        "std": json.dumps(pre["std"]),
        "interpolation": pre["interpolation"],
        "resize": pre.get("resize", "whole image, no crop"),
        "class_names": json.dumps(model.classes),
        "backbone": cfg["backbone"]["name"],
        "backbone_weights": cfg["backbone"]["weights"],
        "backbone_weights_digest": cfg["backbone"]["weights_digest"],
        "head": type(model.estimator).__name__,
        "method": str(cfg.get("method")),
        "tta": json.dumps(model.tta),  # the graph averages the image's and its flip's features inside
        "transferlab_version": cfg.get("versions", {}).get("transferlab", ""),
    }


def export_onnx(bundle, out, *, weights=None, opset: int = ONNX_OPSET) -> Path:
    """Write backbone + head of `bundle` (a folder or a loaded Model) as one ONNX graph at `out` (a file, or a
    folder for out/model.onnx); returns the file written."""
    import onnx

    model = bundle if isinstance(bundle, Model) else load(bundle, weights=weights, device="cpu", precision="fp32")
    info = registry.METHODS.get(model.config.get("method"))
    if info is not None and not info.exportable:  # the registry says so before any graph is traced
        raise ExportError(
            f"method {info.name} ({info.description}) has no exact ONNX graph here; use transferlab.load(BUNDLE)."
            f"predict_proba or `transferlab predict` for this head"
        )
    head = head_module(model.estimator, model.classes)
    _check_head(head, model, model.backbone.num_features)
    full = _Full(model.backbone.model.float().cpu().eval(), head, tta=model.tta).eval()
    out = output_file(out, "model.onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    trace_onnx(full, model.backbone.input_size, out, output="probabilities", opset=opset)
    proto = onnx.load(str(out))
    for key, value in metadata(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = (
        f"transferlab {model.config.get('method')}: {model.backbone.name} + {type(model.estimator).__name__}"
    )
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return out


def preprocess(images, meta: dict[str, str]) -> np.ndarray:
    """Reference preprocessing from the ONNX metadata alone: paths or PIL images -> NCHW float32 batch."""
    from PIL import Image

    from ..data.images import load_rgb, to_rgb

    h, w = json.loads(meta["input_size"])
    mean = np.array(json.loads(meta["mean"]), dtype=np.float32)
    std = np.array(json.loads(meta["std"]), dtype=np.float32)
    resample = {
        "bilinear": Image.BILINEAR,
        "bicubic": Image.BICUBIC,
        "nearest": Image.NEAREST,
        "lanczos": Image.LANCZOS,
    }[meta["interpolation"]]
    batch = []
    for im in images:
        im = to_rgb(im) if isinstance(im, Image.Image) else load_rgb(im, reduce_to=(w, h))  # as extraction decodes
        arr = np.asarray(im.resize((w, h), resample), dtype=np.float32) / 255.0
        batch.append(((arr - mean) / std).transpose(2, 0, 1))
    return np.stack(batch).astype(np.float32)
