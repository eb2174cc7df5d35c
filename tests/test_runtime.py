"""The ONNX Runtime path for the frozen backbone: parity with torch, fallback, cache keys across runtimes."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from transferlab.data.datasets import discover
from transferlab.features import runtime as R
from transferlab.features.backbones import load_backbone
from transferlab.features.extract import (
    ImageFiles,
    TensorBatches,
    collate,
    extract_features,
    resize_target,
    resolve_runtime,
)

from .conftest import make_photo


def _paths(folder, n=8):
    return [s.path for s in discover(folder, valid_fraction=0).samples][:n]


def _both(paths, bb, tmp_path):
    ort = extract_features(paths, bb, cache_dir=tmp_path / "ort", progress=False, runtime="onnxruntime")
    pt = extract_features(
        paths, bb, cache_dir=tmp_path / "torch", progress=False, runtime="torch", precision="fp32", num_workers=0
    )
    return ort, pt


@pytest.mark.parametrize("view", ["plain", "hflip"])
def test_lane_batches_are_bit_identical_to_the_torch_path(small_folder, tiny_backbone, tmp_path, view):
    """The ONNX Runtime lanes prepare images in place on a reused buffer; every value must equal timm's
    transform + collate (the DataLoader path), unreadable files must be reported the same way, and a
    smaller batch after a larger one must not carry stale rows."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths = _paths(small_folder, 7)
    paths.insert(3, str(broken))
    paths.insert(5, str(make_photo(tmp_path / "large.jpg", size=(400, 300))))  # decoded reduced (1/4) on both paths
    batches = TensorBatches(paths, tiny_backbone.transform(), view)
    files = ImageFiles(paths, tiny_backbone.transform(), view)
    for idx in (range(0, 6), range(6, 8), range(2, 5)):
        x, ok, failed = batches(idx)
        ref, ref_ok, ref_failed = collate([files[i] for i in idx])
        assert torch.equal(x, ref) and ok == ref_ok and failed == ref_failed
    assert batches(range(3, 4)) == (None, [], [(3, files[3][2])])


def test_extraction_decodes_a_large_jpeg_reduced_to_twice_the_input_size(tiny_backbone, tmp_path):
    """The backbone takes 40 x 32 (width x height): a 400 x 300 JPEG is decoded at 1/4 (100 x 75, at least twice
    the input) before timm's resize, on the torch path as on the ONNX Runtime lanes (bit-identical above)."""
    from transferlab.data.images import load_rgb

    photo = str(make_photo(tmp_path / "large.jpg", size=(400, 300)))
    transform = tiny_backbone.transform()
    assert resize_target(transform) == (40, 32)
    x = ImageFiles([photo], transform, "plain")[0][0]
    assert torch.equal(x, transform(load_rgb(photo, reduce_to=(40, 32))))
    assert not torch.equal(x, transform(load_rgb(photo)))  # not the full decode
    assert load_rgb(photo, reduce_to=(40, 32)).size == (100, 75)


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_resnet"])
def test_onnxruntime_features_match_torch_fp32(small_folder, tmp_path, arch):
    torch.manual_seed(0)
    bb = load_backbone(arch, weights="random", input_size=(32, 40))
    paths = _paths(small_folder)
    ort, pt = _both(paths, bb, tmp_path)
    assert (ort.runtime, ort.precision, pt.runtime) == ("onnxruntime", "fp32", "torch")
    assert ort.paths == pt.paths == paths
    np.testing.assert_allclose(ort.features, pt.features, rtol=1e-4, atol=1e-5)
    # the graph is exported once, beside the features, with its parity recorded
    graphs = list((tmp_path / "ort" / "onnx").glob("*.onnx"))
    assert len(graphs) == 1
    meta = json.loads(graphs[0].with_suffix(".json").read_text())
    assert meta["parity"] <= meta["tolerance"] == R.PARITY_TOLERANCE and meta["versions"]["onnxruntime"]
    mtime = graphs[0].stat().st_mtime_ns
    again = extract_features(paths, bb, cache_dir=tmp_path / "ort", progress=False, runtime="onnxruntime", view="hflip")
    assert again.computed == len(paths) and graphs[0].stat().st_mtime_ns == mtime  # not exported again


def test_export_failure_falls_back_to_torch_with_one_line(small_folder, tiny_backbone, tmp_path, monkeypatch, capsys):
    def broken(*a, **k):
        raise R.RuntimeUnavailable("ONNX export failed (RuntimeError: unsupported op)")

    monkeypatch.setattr(R, "export_backbone_onnx", broken)
    paths = _paths(small_folder, 4)
    ex = extract_features(paths, tiny_backbone, cache_dir=tmp_path / "c", progress=False, num_workers=0)
    assert ex.runtime == "torch" and len(ex.paths) == 4
    again = extract_features(
        paths, tiny_backbone, cache_dir=tmp_path / "c", progress=False, num_workers=0, view="hflip"
    )
    assert again.runtime == "torch"
    lines = [line for line in capsys.readouterr().err.splitlines() if "onnxruntime" in line]
    assert lines == [
        f"transferlab: onnxruntime unavailable for {tiny_backbone.name}: ONNX export failed "
        f"(RuntimeError: unsupported op); using torch"
    ]


def test_real_export_error_is_caught(small_folder, tiny_backbone, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise RuntimeError("Exporting the operator 'aten::weird' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", boom)
    ex = extract_features(
        _paths(small_folder, 3), tiny_backbone, cache_dir=tmp_path / "c", progress=False, num_workers=0
    )
    assert ex.runtime == "torch"
    err = capsys.readouterr().err
    assert "onnxruntime unavailable" in err and "aten::weird" in err and "using torch" in err
    assert not list((tmp_path / "c" / "onnx").glob("*.onnx")) and not list((tmp_path / "c" / "onnx").glob(".*tmp"))


def test_cache_written_by_one_runtime_is_read_by_the_other_when_parity_holds(small_folder, tiny_backbone, tmp_path):
    paths = _paths(small_folder)
    cache = tmp_path / "c"
    ort = extract_features(paths, tiny_backbone, cache_dir=cache, progress=False, runtime="onnxruntime")
    pt = extract_features(paths, tiny_backbone, cache_dir=cache, progress=False, runtime="torch", precision="fp32")
    assert ort.computed == len(paths) and pt.from_cache == len(paths) and pt.computed == 0
    np.testing.assert_array_equal(ort.features, pt.features)
    # and the other way round: torch fp32 first, ONNX Runtime reads it
    cache2 = tmp_path / "c2"
    extract_features(
        paths, tiny_backbone, cache_dir=cache2, progress=False, runtime="torch", precision="fp32", num_workers=0
    )
    assert extract_features(
        paths, tiny_backbone, cache_dir=cache2, progress=False, runtime="onnxruntime"
    ).from_cache == len(paths)
    # a bf16 torch feature is another feature (precision is in the key)
    bf16 = extract_features(
        paths[:2], tiny_backbone, cache_dir=cache, progress=False, runtime="torch", precision="bf16", num_workers=0
    )
    assert bf16.computed == 2
    meta = json.loads(next(cache.glob(f"features/{tiny_backbone.cache_key('fp32')}/backbone.json")).read_text())
    assert "runtime" not in meta and meta["written_by"]["onnxruntime"]["shares_torch_fp32_key"] is True


def test_runtime_gets_its_own_key_when_parity_fails(small_folder, tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "parity", lambda *a, **k: 0.5)
    paths = _paths(small_folder, 4)
    cache = tmp_path / "c"
    ort = extract_features(paths, tiny_backbone, cache_dir=cache, progress=False, runtime="onnxruntime")
    pt = extract_features(
        paths, tiny_backbone, cache_dir=cache, progress=False, runtime="torch", precision="fp32", num_workers=0
    )
    assert ort.runtime == "onnxruntime" and ort.computed == 4 and pt.computed == 4 and pt.from_cache == 0
    key = tiny_backbone.cache_key("fp32", runtime="onnxruntime")
    assert key != tiny_backbone.cache_key("fp32")
    meta = json.loads((cache / "features" / key / "backbone.json").read_text())
    assert meta["runtime"] == "onnxruntime" and meta["written_by"]["onnxruntime"]["parity_max_abs"] == 0.5


def test_auto_runtime_choice_and_explicit_conflicts():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_runtime("auto", cpu, "auto") == "onnxruntime"
    assert resolve_runtime("auto", cpu, "fp32") == "onnxruntime"
    assert resolve_runtime("auto", cpu, "bf16") == "torch"  # asked for bf16 by name: torch autocast
    assert resolve_runtime("auto", cuda, "auto") == "torch"
    assert resolve_runtime("torch", cpu, "auto") == "torch"
    with pytest.raises(ValueError, match="CPU"):
        resolve_runtime("onnxruntime", cuda, "auto")
    with pytest.raises(ValueError, match="fp32"):
        resolve_runtime("onnxruntime", cpu, "bf16")
    with pytest.raises(ValueError, match="runtime must be"):
        resolve_runtime("tensorrt", cpu, "auto")


def test_conflicting_runtime_flags_are_one_error_line_not_a_traceback(small_folder, tmp_path, capsys):
    from transferlab.cli import main

    argv = ["run", str(small_folder), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main([*argv, "--runtime", "onnxruntime", "--precision", "bf16"]) == 2
    assert "transferlab: error: ONNX Runtime runs fp32 graphs, not bf16" in capsys.readouterr().err


def test_threads_are_restored_and_never_oversubscribed(small_folder, tiny_backbone, tmp_path, monkeypatch):
    seen = []
    real = R.OrtBackbone.__call__

    def spy(self, batch):
        if threading.current_thread().name.startswith("ort-lane"):  # not the parity check at export
            seen.append((self.threads, torch.get_num_threads()))
        return real(self, batch)

    monkeypatch.setattr(R.OrtBackbone, "__call__", spy)
    before = torch.get_num_threads()
    extract_features(_paths(small_folder), tiny_backbone, cache_dir=tmp_path / "c", progress=False, batch_size=2)
    assert torch.get_num_threads() == before
    # lanes (one per core) x 1 ORT thread each, torch held at 1 meanwhile
    assert len(seen) == 4 and all(t == (1, 1) for t in seen)
