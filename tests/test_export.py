"""ONNX export: backbone + head as one graph, run in onnxruntime, equal to transferlab's probabilities."""

from __future__ import annotations

import inspect
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import transferlab
from transferlab.cli import main
from transferlab.data.datasets import discover
from transferlab.features.extract import extract_features
from transferlab.heads import make_head
from transferlab.heads.seed import SoftmaxHead, seed_svm
from transferlab.heads.tuned import TUNED
from transferlab.model.bundle import save_bundle
from transferlab.model.export import ExportError, export_onnx, preprocess

from .conftest import make_photo


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_backbone):
    from .conftest import make_imagefolder

    root = make_imagefolder(
        tmp_path_factory.mktemp("export") / "data",
        {
            "train": {"ant": 10, "bee": 8, "cat": 6},
            "valid": {"ant": 3, "bee": 3, "cat": 3},
            "test": {"ant": 3, "bee": 3, "cat": 2},
        },
    )
    ds = discover(root)
    cache = root.parent / "cache"
    feats = {
        s: extract_features(ds.paths(s), tiny_backbone, cache_dir=cache, progress=False, precision="fp32").features
        for s in ("train", "valid")
    }
    return {
        "ds": ds,
        "cache": cache,
        "X": feats["train"],
        "y": ds.labels("train"),
        "Xv": feats["valid"],
        "yv": ds.labels("valid"),
    }


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("head", ["softmax", "logreg", "linear_svm", "lda"])
def test_onnx_matches_transferlab_probabilities(data, tiny_backbone, tmp_path, head):
    if head == "softmax":
        est = SoftmaxHead(epochs=5, logit_adjust=1.0).fit(data["X"], data["y"])  # adjustment folded into the bias
    elif head == "logreg":  # a tuned head's pipeline: FeatureTransform(pca_whiten) + LogisticRegression
        est = (
            TUNED["logreg"]
            .build(0, 5)
            .set_params(features__kind="pca_whiten", features__n_components=8, clf__C=0.1)
            .fit(data["X"], data["y"])
        )
    else:  # a validation search, saved as the model it chose
        est = make_head(head).fit(data["X"], data["y"], eval_set=(data["Xv"], data["yv"]))
    bundle = save_bundle(tmp_path / head, est, tiny_backbone, data["ds"].classes, method=head)
    out = export_onnx(bundle, tmp_path / f"{head}.onnx")
    onnx.checker.check_model(onnx.load(str(out)))
    sess = _session(out)
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == data["ds"].classes and json.loads(meta["input_size"]) == [32, 40]
    assert json.loads(meta["mean"]) == list(tiny_backbone.mean) and meta["interpolation"] == tiny_backbone.interpolation
    paths = data["ds"].paths("test")
    x = preprocess(paths, meta)  # from the metadata alone
    assert x.shape == (len(paths), 3, 32, 40)
    got = sess.run(["probabilities"], {"image": x})[0]
    model = transferlab.load(bundle, cache_dir=data["cache"], precision="fp32")
    np.testing.assert_allclose(got, model.predict_proba(paths), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_reference_preprocessing_decodes_a_large_jpeg_as_extraction_does(tiny_backbone, tmp_path):
    """The exported graph's reference preprocessing (metadata alone) gives the pixels extraction gives, also for a
    JPEG large enough to decode reduced."""
    from transferlab.features.extract import ImageFiles

    photo = str(make_photo(tmp_path / "large.jpg", size=(400, 300)))
    bb = tiny_backbone
    meta = {
        "input_size": json.dumps(list(bb.input_size)),
        "mean": json.dumps(list(bb.mean)),
        "std": json.dumps(list(bb.std)),
        "interpolation": bb.interpolation,
    }
    expected = ImageFiles([photo], bb.transform(), "plain")[0][0].numpy()
    np.testing.assert_allclose(preprocess([photo], meta)[0], expected, atol=1e-5)


def test_export_refuses_non_linear_heads(data, tiny_backbone, tmp_path, capsys):
    bundle = save_bundle(tmp_path / "svm", seed_svm().fit(data["X"], data["y"]), tiny_backbone, data["ds"].classes)
    with pytest.raises(ExportError, match="KernelSVMHead is not a linear softmax head"):
        export_onnx(bundle, tmp_path / "svm.onnx")
    assert main(["export", str(bundle), "--onnx", str(tmp_path / "svm.onnx")]) == 2
    assert "transferlab predict" in capsys.readouterr().err
    assert not (tmp_path / "svm.onnx").exists()


def test_export_cli(data, tiny_backbone, tmp_path, capsys):
    est = SoftmaxHead(epochs=3).fit(data["X"], data["y"])
    bundle = save_bundle(tmp_path / "b", est, tiny_backbone, data["ds"].classes)
    assert main(["export", str(bundle), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert "ONNX:" in capsys.readouterr().out
    sess = _session(tmp_path / "m.onnx")
    assert [i.name for i in sess.get_inputs()] == ["image"] and [o.name for o in sess.get_outputs()] == [
        "probabilities"
    ]
    x = np.zeros((5, 3, 32, 40), np.float32)  # the batch axis is dynamic
    assert sess.run(None, {"image": x})[0].shape == (5, 3)
    (tmp_path / "dir").mkdir()  # --onnx an existing folder: was IsADirectoryError after tracing
    assert main(["export", str(bundle), "--onnx", str(tmp_path / "dir")]) == 0
    assert f"ONNX: {tmp_path / 'dir' / 'model.onnx'}" in capsys.readouterr().out
    assert _session(tmp_path / "dir" / "model.onnx").run(None, {"image": x})[0].shape == (5, 3)


@pytest.mark.parametrize("flag", ["tta", "flip_train"])
def test_study_bundle_and_onnx_agree_under_flip_features(tmp_path, flag):
    """Issue 18, bug 3: under --tta / --flip-train the study scores heads on the mean of plain and flipped features;
    the bundle, its ONNX graph (which ignored the flag) and a fine-tuned model (which predicts on plain images while
    its bundle was marked tta) must all give the study's own test probabilities."""
    import csv

    from transferlab.report import layout
    from transferlab.study import StudyConfig, run_study

    from .conftest import make_imagefolder

    root = make_imagefolder(
        tmp_path / "data",
        {
            "train": {"ant": 10, "bee": 8, "cat": 6},
            "valid": {"ant": 3, "bee": 3, "cat": 3},
            "test": {"ant": 3, "bee": 3, "cat": 2},
        },
    )
    cache = tmp_path / "cache"
    cfg = StudyConfig(
        data=str(root),
        out=str(tmp_path / "run"),
        backbone="test_efficientnet",
        weights="random",
        input_size=(32, 40),
        methods=["softmax", "lda", "finetune"],
        epochs=5,
        precision="fp32",
        num_workers=0,
        progress=False,
        data_efficiency=False,
        cache_dir=str(cache),
        **{flag: True},
        finetune={"epochs": 1, "batch_size": 8, "augment": "none", "patience": 0},
    )
    metrics = run_study(cfg)
    run = tmp_path / "run"
    for method in ("softmax", "lda", "finetune"):
        bundle = run / metrics["methods"][method]["bundle"]
        assert json.loads((bundle / "config.json").read_text())["tta"] is (method != "finetune")
        pred_csv = layout.method_dir(run, method) / layout.PREDICTIONS
        rows = list(csv.DictReader(pred_csv.open()))
        paths = [r["path"] for r in rows]
        model = transferlab.load(bundle, cache_dir=cache, precision="fp32")
        proba = model.predict_proba(paths)
        classes = model.classes
        np.testing.assert_allclose(proba.max(axis=1), [float(r["p_predicted"]) for r in rows], atol=1e-4)
        assert [classes[i] for i in proba.argmax(axis=1)] == [r["predicted"] for r in rows]
        out = export_onnx(bundle, tmp_path / f"{flag}-{method}.onnx")
        sess = _session(out)
        meta = sess.get_modelmeta().custom_metadata_map
        assert json.loads(meta["tta"]) is (method != "finetune")
        got = sess.run(["probabilities"], {"image": preprocess(paths, meta)})[0]
        np.testing.assert_allclose(got, proba, atol=1e-4, rtol=0)


def test_registry_export_flags_are_what_export_does(data, tiny_backbone, tmp_path):
    """Each registered feature head is exportable exactly when the registry says so: fitted and saved under its
    method name, export succeeds for the `exportable` ones and is refused, naming the method, for the others."""
    from transferlab.heads import registry

    for name in registry.names():
        info = registry.get(name)
        if info.build is None:
            continue
        est = make_head(name, epochs=3)
        kw = {"eval_set": (data["Xv"], data["yv"])} if "eval_set" in inspect.signature(est.fit).parameters else {}
        est.fit(data["X"], data["y"], **kw)
        bundle = save_bundle(tmp_path / name, est, tiny_backbone, data["ds"].classes, method=name)
        assert json.loads((bundle / "config.json").read_text())["kind"] == info.kind
        if info.exportable:
            export_onnx(bundle, tmp_path / f"{name}.onnx")
        else:
            with pytest.raises(ExportError, match=f"method {name} "):
                export_onnx(bundle, tmp_path / f"{name}.onnx")
