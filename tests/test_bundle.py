"""Bundles: save -> load gives identical predictions for every head type; predict CLI; tampering refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import transferlab
from transferlab.cli import main
from transferlab.data.datasets import discover
from transferlab.features.extract import extract_features
from transferlab.heads import make_head
from transferlab.heads.seed import SoftmaxHead, seed_svm
from transferlab.model.bundle import BundleError, save_bundle

from .conftest import make_imagefolder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone):
    """Features of a small labelled folder and the data to fit heads on."""
    root = make_imagefolder(
        tmp_path_factory.mktemp("bundle") / "data",
        {"train": {"ant": 12, "bee": 8, "cat": 5}, "test": {"ant": 4, "bee": 3, "cat": 2}},
    )
    cache = root.parent / "cache"
    ds = discover(root)
    X = extract_features(ds.paths("train"), tiny_backbone, cache_dir=cache, progress=False).features
    Xv = extract_features(ds.paths("valid"), tiny_backbone, cache_dir=cache, progress=False).features
    Xt = extract_features(ds.paths("test"), tiny_backbone, cache_dir=cache, progress=False).features
    return {
        "root": root,
        "cache": cache,
        "ds": ds,
        "X": X,
        "y": ds.labels("train"),
        "Xv": Xv,
        "yv": ds.labels("valid"),
        "Xt": Xt,
    }


def _fit(name, t):
    if name == "softmax":
        return SoftmaxHead(epochs=5, logit_adjust=0.5).fit(t["X"], t["y"])
    if name == "svm":
        return seed_svm().fit(t["X"], t["y"])
    if name == "pipeline":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=200)).fit(t["X"], t["y"])
    est = make_head(name, epochs=5)  # a tuned head: a validation search over transferlab/sklearn pipelines
    return est.fit(t["X"], t["y"], eval_set=(t["Xv"], t["yv"]))


@pytest.mark.parametrize("name", ["softmax", "svm", "pipeline", "knn", "svm_tuned", "softmax_tuned"])
def test_roundtrip_identical_predictions(trained, tiny_backbone, tmp_path, name):
    est = _fit(name, trained)
    bundle = save_bundle(tmp_path / name, est, tiny_backbone, trained["ds"].classes, method=name)
    files = sorted(p.name for p in bundle.iterdir())
    assert "config.json" in files and not any(f.endswith((".pkl", ".joblib", ".pickle")) for f in files)
    assert ("head.safetensors" if name == "softmax" else "head.skops") in files
    model = transferlab.load(bundle, cache_dir=trained["cache"])
    test_paths = trained["ds"].paths("test")
    proba = model.predict_proba(test_paths)
    np.testing.assert_array_equal(proba, est.predict_proba(trained["Xt"]))
    classes = np.array(trained["ds"].classes)
    np.testing.assert_array_equal(model.predict(test_paths), classes[est.predict(trained["Xt"])])
    # PIL images give the same answer (decoded here, not through the cache)
    pil = [Image.open(p) for p in test_paths[:3]]
    np.testing.assert_allclose(model.predict_proba(pil), proba[:3], atol=1e-5)
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["classes"] == trained["ds"].classes
    assert cfg["backbone"]["name"] == "test_efficientnet" and cfg["preprocessing"]["input_size"] == [32, 40]
    assert cfg["head"]["params"] and cfg["versions"]["torch"]


def test_softmax_state_is_arrays_and_config(trained, tiny_backbone, tmp_path):
    from safetensors.numpy import load_file

    est = _fit("softmax", trained)
    bundle = save_bundle(tmp_path / "sm", est, tiny_backbone, trained["ds"].classes)
    arrays = load_file(str(bundle / "head.safetensors"))
    assert set(arrays) >= {"coef_", "intercept_", "log_prior_", "classes_"}
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["head"]["init"]["logit_adjust"] == 0.5 and cfg["backbone"]["embedded"]  # random-init: stored


def test_file_weights_recorded_and_required(trained, tiny_backbone, tmp_path):
    from safetensors.torch import save_file

    from transferlab.features.backbones import load_backbone

    wfile = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}, str(wfile))
    bb = load_backbone("test_efficientnet", weights=wfile, input_size=(32, 40))
    est = _fit("softmax", trained)
    bundle = save_bundle(tmp_path / "b", est, bb, trained["ds"].classes)
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["backbone"]["weights_path"] == str(wfile.resolve()) and not cfg["backbone"]["embedded"]
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "head.safetensors"]
    model = transferlab.load(bundle, cache_dir=trained["cache"])
    np.testing.assert_array_equal(model.predict_proba(trained["ds"].paths("test")), est.predict_proba(trained["Xt"]))
    moved = tmp_path / "elsewhere.safetensors"
    wfile.rename(moved)
    with pytest.raises(BundleError, match="weights for this bundle are missing.*--weights"):
        transferlab.load(bundle)
    assert transferlab.load(bundle, weights=moved).classes == trained["ds"].classes
    other = load_backbone("test_efficientnet", weights="random", input_size=(32, 40))
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(BundleError, match="digest differs"):
        transferlab.load(bundle, weights=tmp_path / "other.safetensors")


def test_tampered_bundles_refused(trained, tiny_backbone, tmp_path):
    est = _fit("softmax", trained)
    classes = trained["ds"].classes
    bundle = save_bundle(tmp_path / "digest", est, tiny_backbone, classes)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["backbone"]["weights_digest"] = "0" * 64
    (bundle / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="digest differs.*refused"):
        transferlab.load(bundle)

    bundle = save_bundle(tmp_path / "evil", est, tiny_backbone, classes)
    (bundle / "evil.pkl").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(BundleError, match=r"unexpected file\(s\): evil\.pkl"):
        transferlab.load(bundle)

    bundle = save_bundle(tmp_path / "head", est, tiny_backbone, classes)
    with open(bundle / "head.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")
    with pytest.raises(BundleError, match="head.safetensors does not match the digest"):
        transferlab.load(bundle)

    bundle = save_bundle(tmp_path / "swap", seed_svm().fit(trained["X"], trained["y"]), tiny_backbone, classes)
    (bundle / "head.skops").unlink()
    with pytest.raises(BundleError, match="head.skops is missing"):
        transferlab.load(bundle)

    with pytest.raises(BundleError, match="not found"):
        transferlab.load(tmp_path / "nope")


def test_skops_head_with_untrusted_type_refused(trained, tiny_backbone, tmp_path, monkeypatch):
    """A head.skops naming a class outside scikit-learn/transferlab is refused before anything loads."""
    import skops.io as sio

    from transferlab.model import bundle as bundle_mod

    est = _fit("svm", trained)
    path = save_bundle(tmp_path / "b", est, tiny_backbone, trained["ds"].classes)
    monkeypatch.setattr(sio, "get_untrusted_types", lambda **kw: ["os.system", "sklearn.svm.SVC"])
    with pytest.raises(BundleError, match="not allowed: os.system"):
        bundle_mod.load(path)


def test_fine_tuned_model_saved_with_its_backbone(trained, tiny_backbone, tmp_path):
    """A fitted model_ = Sequential(backbone, Linear) (finetune.FineTuner) becomes backbone.safetensors + head."""
    import copy

    import torch
    from torch import nn

    body = copy.deepcopy(tiny_backbone.model)
    with torch.no_grad():
        for p in body.parameters():
            p.add_(0.01)

    class Tuned:  # the attributes FineTuner has after fit
        classes_ = np.arange(3)
        model_ = nn.Sequential(body, nn.Linear(tiny_backbone.num_features, 3)).eval()

    bundle = save_bundle(tmp_path / "ft", Tuned(), tiny_backbone, trained["ds"].classes, method="finetune")
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["backbone"]["fine_tuned"] and (bundle / "backbone.safetensors").is_file()
    assert cfg["backbone"]["weights_digest"] != tiny_backbone.weights_digest
    model = transferlab.load(bundle, cache_dir=trained["cache"], precision="fp32")
    img = trained["ds"].paths("test")[:4]
    with torch.no_grad():
        x = torch.stack([model.backbone.transform()(Image.open(p).convert("RGB")) for p in img])
        want = torch.softmax(Tuned.model_(x), dim=1).numpy()
    np.testing.assert_allclose(model.predict_proba(img), want, atol=1e-5)


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_cli_folder_csv_topk_and_evaluate(trained, tiny_backbone, tmp_path, capsys):
    est = _fit("softmax", trained)
    bundle = save_bundle(tmp_path / "b", est, tiny_backbone, trained["ds"].classes)
    test_dir = trained["root"] / "test"
    out = tmp_path / "preds.csv"
    args = [
        "predict",
        str(bundle),
        str(test_dir),
        "--out",
        str(out),
        "--top-k",
        "3",
        "--cache-dir",
        str(tmp_path / "c"),
        "--no-progress",
        "--workers",
        "0",
    ]
    assert main(args + ["--evaluate"]) == 0
    printed = capsys.readouterr().out
    assert "9 through the backbone" in printed and "macro avg" in printed and "accuracy" in printed
    rows = _rows(out)
    assert list(rows[0]) == [
        "path",
        "predicted",
        "probability",
        "top1",
        "top1_probability",
        "top2",
        "top2_probability",
        "top3",
        "top3_probability",
        "label",
    ]
    assert len(rows) == 9 and {r["label"] for r in rows} == {"ant", "bee", "cat"}
    model = transferlab.load(bundle, cache_dir=False)
    proba = model.predict_proba([r["path"] for r in rows])
    for r, p in zip(rows, proba):
        assert r["predicted"] == r["top1"] == model.classes[int(p.argmax())]
        assert float(r["probability"]) == pytest.approx(p.max(), abs=1e-6)
        assert float(r["top1_probability"]) >= float(r["top2_probability"]) >= float(r["top3_probability"])
    # second run: every image comes from the cache
    assert main(args) == 0
    assert "0 through the backbone, 9 from cache" in capsys.readouterr().out
    assert _rows(out)[0].keys() >= {"path", "predicted", "probability"}
    # one class folder given: its images are that class (it was refused: "269 are not (e.g. in test/glioma)")
    args[2] = str(test_dir / "ant")
    assert main(args + ["--evaluate"]) == 0
    assert {r["label"] for r in _rows(out)} == {"ant"} and "macro avg" in capsys.readouterr().out
    # a CSV manifest (a data set given as one cannot be evaluated by folder): its test rows, labelled by it; it was
    # "cannot decode" for the .csv itself
    root = trained["root"]
    test_rows = [f"{p.relative_to(root)},{p.parent.name},test" for p in sorted(test_dir.rglob("*.png"))]
    train_rows = [f"{p.relative_to(root)},{p.parent.name},train" for p in sorted((root / "train").rglob("*.png"))]
    (root / "m.csv").write_text("\n".join(["path,label,split", *train_rows[:4], *test_rows]) + "\n")
    args[2] = str(root / "m.csv")
    assert main(args + ["--evaluate"]) == 0
    assert "on 9 images" in capsys.readouterr().out
    assert sorted((Path(r["path"]).name, r["label"]) for r in _rows(out)) == sorted(
        (Path(p.split(",")[0]).name, p.split(",")[1]) for p in test_rows
    )
    (root / "m.csv").write_text("\n".join(["filename,class", *(r.rsplit(",", 1)[0] for r in train_rows[:4])]) + "\n")
    assert main(args) == 0 and len(_rows(out)) == 4  # no split column: every row


def test_predict_cli_refusals(trained, tiny_backbone, tmp_path, capsys):
    bundle = save_bundle(tmp_path / "b", _fit("softmax", trained), tiny_backbone, trained["ds"].classes)
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.open(trained["ds"].paths("test")[0]).save(loose / "x.png")
    (loose / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "p.csv"
    base = ["predict", str(bundle), str(loose), "--out", str(out), "--no-progress", "--no-cache", "--workers", "0"]
    assert main(base) == 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err and len(_rows(out)) == 1
    assert main(base + ["--evaluate"]) == 2
    assert "folder named after one of the bundle's classes; 1 is not (e.g. in " in capsys.readouterr().err
    folder = tmp_path / "outdir"  # --out an existing folder: was IsADirectoryError after the predictions
    folder.mkdir()
    assert main([*base[:4], str(folder), *base[5:]]) == 0
    assert len(_rows(folder / "predictions.csv")) == 1 and f"-> {folder / 'predictions.csv'}" in capsys.readouterr().out
    misspelt = tmp_path / "labelled" / "Bees"
    misspelt.mkdir(parents=True)
    Image.open(trained["ds"].paths("test")[0]).save(misspelt / "y.png")
    assert main([*base[:2], str(misspelt.parent), *base[3:], "--evaluate"]) == 2
    assert f"1 is not (e.g. in {misspelt} (class bee?))" in capsys.readouterr().err  # the class it is closest to
    (bundle / "notes.txt").write_text("hi")
    assert main(base) == 2
    assert "unexpected file(s): notes.txt" in capsys.readouterr().err


def test_study_saves_bundles(tmp_path, small_folder, capsys):
    from transferlab.study import StudyConfig, run_study

    cfg = StudyConfig(
        data=str(small_folder),
        out=str(tmp_path / "run"),
        backbone="test_efficientnet",
        weights="random",
        input_size=(32, 40),
        epochs=3,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
        data_efficiency=False,
        methods=["softmax", "svm"],
    )
    metrics = run_study(cfg)
    run = Path(cfg.out)
    assert sorted(p.name for p in (run / "models").iterdir()) == ["softmax", "svm"]
    assert "## Trained models" in (run / "report.md").read_text()
    assert metrics["methods"]["svm"]["bundle"] == "models/svm"
    test_paths = [str(p) for p in sorted((small_folder / "test").rglob("*.png"))]
    labels = [Path(p).parent.name for p in test_paths]
    for name in ("softmax", "svm"):
        model = transferlab.load(run / "models" / name, cache_dir=cfg.cache_dir)
        pred = model.predict(test_paths)  # the study's own test predictions, from the saved bundle
        assert np.mean(pred == np.array(labels)) == pytest.approx(metrics["methods"][name]["accuracy"])
    # the run folder (or its models/) stands for the selected method's bundle: it was "unexpected file(s)"
    for given in (run, run / "models"):
        assert transferlab.load(given).path == run / "models" / metrics["selected"]
    assert main(["predict", str(run), test_paths[0], "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 0
    assert f"model: {run / 'models' / metrics['selected']} (the selected method" in capsys.readouterr().err
    shutil.rmtree(run / "models" / metrics["selected"])
    with pytest.raises(
        BundleError, match=rf"selected method \({metrics['selected']}\) has no saved model.*\((softmax|svm)\)"
    ):
        transferlab.load(run)


def test_no_cache_keeps_the_exported_graph_and_no_features(trained, tiny_backbone, tmp_path, monkeypatch):
    """cache_dir=False (`predict --no-cache`) caches no feature, but the ONNX graph is exported once into the
    usual cache and reused: it used to be exported into the throwaway folder on every call."""
    from transferlab.features import runtime as R

    usual = tmp_path / "usual-cache"
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(usual))
    exports = []
    real = R.export_backbone_onnx
    monkeypatch.setattr(R, "export_backbone_onnx", lambda *a, **k: exports.append(1) or real(*a, **k))
    bundle = save_bundle(tmp_path / "b", _fit("softmax", trained), tiny_backbone, trained["ds"].classes)
    paths = trained["ds"].paths("test")[:3]
    model = transferlab.load(bundle, cache_dir=False)
    first = model.predict_proba(paths)
    ex = model.extract(paths)
    assert ex.runtime == "onnxruntime" and ex.computed == 3 and ex.from_cache == 0
    np.testing.assert_allclose(model.predict_proba(paths), first, atol=1e-6)
    assert len(exports) == 1 and len(list((usual / "onnx").glob("*.onnx"))) == 1
    assert sorted(p.name for p in usual.iterdir()) == ["onnx"]  # no feature folder


def test_arrays_and_empty_input_predict_like_files(trained, tiny_backbone, tmp_path):
    """A uint8 RGB array (what numpy / OpenCV-converted code holds) was an ImageError printing the whole array;
    `predict([])` was an AttributeError."""
    est = _fit("svm", trained)
    model = transferlab.load(save_bundle(tmp_path / "b", est, tiny_backbone, trained["ds"].classes), cache_dir=False)
    paths = trained["ds"].paths("test")[:3]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    want = model.predict_proba(paths)
    np.testing.assert_allclose(model.predict_proba(arrays[0]), want[:1], atol=1e-6)  # one image
    np.testing.assert_allclose(model.predict_proba(np.stack(arrays)), want, atol=1e-6)  # N x H x W x 3
    np.testing.assert_allclose(model.predict_proba([arrays[0], paths[1]]), want[:2], atol=1e-6)
    k = len(trained["ds"].classes)
    assert model.predict_proba([]).shape == (0, k) and model.predict([]).shape == (0,)
    with pytest.raises(ValueError, match=r"must be uint8, H x W or H x W x 3 .* got float32 \(32, 40, 3\)"):
        model.predict(np.zeros((32, 40, 3), dtype=np.float32))


def test_predict_says_what_it_does_while_it_works_and_leaves_the_terminal_clean(
    trained, tiny_backbone, tmp_path, monkeypatch
):
    # The start-up spinner said "loading torch and timm" through the whole prediction.
    import io

    from rich.console import Console

    from transferlab import progress as prog

    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    monkeypatch.setattr(prog, "get_console", lambda: console)
    bundle = save_bundle(tmp_path / "b", _fit("softmax", trained), tiny_backbone, trained["ds"].classes)
    args = ["predict", str(bundle), str(trained["root"] / "test"), "--out", str(tmp_path / "p.csv")]
    assert main([*args, "--cache-dir", str(tmp_path / "c"), "--workers", "0"]) == 0
    assert "status" not in prog._startup
    assert "predicting with b" in console.file.getvalue()
