"""Bad input end to end through the CLI: every odd file either used, or skipped with its path and reason,
hard errors one clear line and exit code 2; plus the leakage check and read-only datasets."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import stat
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferlab.cli import main
from transferlab.evaluation.leakage import check, compare, nearest

from .conftest import make_image, make_imagefolder, tiny_study

TINY = [
    "--backbone",
    "test_efficientnet",
    "--weights",
    "random",
    "--input-size",
    "32x32",
    "--no-progress",
    "--workers",
    "1",
    "--precision",
    "fp32",
]


def cli(*args) -> tuple[int, str, str]:
    """transferlab.cli.main in-process; returns (exit code, stdout, stderr). An exception escaping is a failure."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


# --- generated bad inputs -------------------------------------------------------------------------


def _png_bomb(path: Path, side: int = 20000) -> Path:
    """A real decompression bomb: a valid 1-bit PNG of side x side pixels (4e8 > 2x Pillow's limit), ~50 KB on disk."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + side // 8)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )
    return path


def _rgb(rng, w=48, h=40) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _save(img: Image.Image, path: Path, fmt=None, **kw) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)
    return str(path)


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _link(path: Path, target) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)
    return str(path)


def _case_files(data: Path, outside: Path, rng) -> dict[str, list[tuple]]:
    """Every case of the bad-input matrix planted in one ImageFolder; case -> expected outcomes.

    Outcomes: ("used", path), ("skipped", path, reason), ("ignored", path), ("note", text),
    ("absent", path part), ("leak", path).
    """
    A, B, T = data / "train" / "ant", data / "train" / "bee", data / "test" / "ant"
    jpeg = io.BytesIO()
    _rgb(rng, 64, 64).save(jpeg, "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    pal = Image.new("P", (12, 12), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (3, 3, 9, 9))
    big = Image.merge(
        "RGB",
        [
            Image.linear_gradient("L").resize((6000, 4000)),
            Image.linear_gradient("L").rotate(90).resize((6000, 4000)),
            Image.new("L", (6000, 4000), 90),
        ],
    )
    make_image(outside / "target.png", 1, rng)
    make_image(outside / "extra_ant" / "x.png", 0, rng)
    shutil.copy(A / "000.png", T / "dup_of_train_000.png")
    _link(A / "self", ".")  # folder loops: must not hang, nor count an image twice
    _link(A / "up", "..")
    _link(data / "train" / "zz_loop", "../train")
    (data / "train" / "empty_class").mkdir()
    (data / "test" / "ghost").mkdir()
    return {
        "zero_byte": [("skipped", _write(A / "zero.jpg", b""), "empty file")],
        "truncated_jpeg": [
            ("skipped", _write(A / "truncated.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2]), "cannot decode")
        ],
        "text_named_jpg": [("skipped", _write(A / "text.jpg", b"this is text, not an image\n"), "cannot decode")],
        "png_named_jpg": [("used", _save(_rgb(rng), A / "really_png.jpg", "PNG"))],
        "png_16bit": [
            ("used", _save(Image.fromarray(rng.integers(0, 65535, (40, 48), dtype=np.uint16)), A / "sixteen.png"))
        ],
        "cmyk_jpeg": [("used", _save(_rgb(rng).convert("CMYK"), B / "cmyk.jpg", "JPEG"))],
        "palette_transparency": [("used", _save(pal, B / "palette.png", transparency=0))],
        "la_rgba": [
            ("used", _save(_rgb(rng).convert("LA"), A / "la.png")),
            ("used", _save(_rgb(rng).convert("RGBA"), B / "rgba.png")),
        ],
        "exif_rotated": [("used", _save(_rgb(rng, 60, 30), B / "rotated.jpg", "JPEG", exif=exif.tobytes()))],
        "one_pixel": [("used", _save(Image.new("RGB", (1, 1), (200, 10, 10)), A / "one_pixel.png"))],
        "decompression_bomb": [("skipped", str(_png_bomb(B / "bomb.png")), "too large to decode safely")],
        "very_large_valid": [("used", _save(big, B / "huge_6000x4000.jpg", "JPEG", quality=80))],
        "uppercase_extension": [("used", _save(_rgb(rng), A / "SHOUT.JPG", "JPEG"))],
        "unicode_and_spaces": [("used", _save(_rgb(rng), B / "sous dossier é" / "ünï cødé 画像 1.png"))],
        "symlinked_file": [("used", _link(B / "link.png", outside / "target.png"))],
        "symlinked_folder": [("used", str(Path(_link(A / "linked", outside / "extra_ant")) / "x.png"))],
        "dangling_symlink": [("skipped", _link(B / "dangling.png", outside / "missing.png"), "cannot read")],
        "symlink_loop_file": [("skipped", _link(B / "selfloop.jpg", "selfloop.jpg"), "cannot read")],
        "symlink_loop_dirs": [
            ("absent", "/self/"),
            ("absent", "/up/"),
            ("absent", "zz_loop"),
            ("note", "zz_loop is a symlink back"),
        ],
        "hidden_files": [
            ("ignored", _save(_rgb(rng), A / ".hidden.png")),
            ("ignored", _write(A / ".DS_Store", b"\x00\x00\x00\x01Bud1")),
            ("ignored", _write(A / "._000.png", b"\x00\x05\x16\x07 AppleDouble")),
            ("ignored", _save(_rgb(rng), A / ".thumbs" / "t.png")),
        ],
        "macosx_folder": [
            ("ignored", _save(_rgb(rng), data / "train" / "__MACOSX" / "ant" / "m.png")),
            ("ignored", _save(_rgb(rng), A / "__MACOSX" / "n.png")),
        ],
        "not_an_image_extension": [
            ("absent", _write(A / "notes.txt", b"labels by hand\n")),  # not read, but
            ("note", "notes.txt"),
        ],  # listed with its reason (issue 18), not dropped silently
        "empty_class_folder": [("note", "empty_class"), ("note", "ghost")],
        "same_image_train_and_test": [
            ("used", str(T / "dup_of_train_000.png")),
            ("leak", str(T / "dup_of_train_000.png")),
        ],
    }


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """One study over a dataset holding every soft case of the matrix, then `extract --save` (cached) for the paths used."""
    root = tmp_path_factory.mktemp("matrix")
    data = make_imagefolder(root / "data", {"train": {"ant": 8, "bee": 8}, "test": {"ant": 3, "bee": 3}})
    cases = _case_files(data, root / "outside", np.random.default_rng(7))
    cache = root / "cache"
    rc, _, err = cli("run", data, "--out", root / "out", "--epochs", 2, "--cache-dir", cache, *TINY)
    assert rc == 0, err
    rc2, out2, err2 = cli("extract", data, "--cache-dir", cache, "--save", root / "f.npz", *TINY)
    assert rc2 == 0, err2
    assert "(0 computed, 36 from cache" in out2, out2  # extract --seed 0 builds run's network: all cached
    npz = np.load(root / "f.npz")
    return {
        "cases": cases,
        "metrics": json.loads((root / "out" / "metrics.json").read_text()),
        "report": (root / "out" / "report.md").read_text(),
        "stderr": err,
        "used": set(npz["paths"].tolist()),
        "extract_out": out2,
    }


def test_matrix_run_is_clean(matrix):
    m = matrix["metrics"]
    expected_used = {o[1] for outs in matrix["cases"].values() for o in outs if o[0] == "used"}
    # 8+8 train, 3+3 test, plus every image the matrix expects to be used
    assert m["n_train"] + m["n_valid"] + m["n_test"] == len(matrix["used"]) == 22 + len(expected_used)
    assert m["classes"] == ["ant", "bee"]
    assert "Traceback" not in matrix["stderr"]
    assert len(m["skipped"]) == sum(o[0] == "skipped" for outs in matrix["cases"].values() for o in outs)


CASES = [
    "zero_byte",
    "truncated_jpeg",
    "text_named_jpg",
    "png_named_jpg",
    "png_16bit",
    "cmyk_jpeg",
    "palette_transparency",
    "la_rgba",
    "exif_rotated",
    "one_pixel",
    "decompression_bomb",
    "very_large_valid",
    "uppercase_extension",
    "unicode_and_spaces",
    "symlinked_file",
    "symlinked_folder",
    "dangling_symlink",
    "symlink_loop_file",
    "symlink_loop_dirs",
    "hidden_files",
    "macosx_folder",
    "not_an_image_extension",
    "empty_class_folder",
    "same_image_train_and_test",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_matrix(matrix, case):
    m, report, used = matrix["metrics"], matrix["report"], matrix["used"]
    skipped = {s["path"]: s["reason"] for s in m["skipped"]}
    for outcome in matrix["cases"][case]:
        kind, what = outcome[0], outcome[1]
        if kind == "used":
            assert what in used and what not in skipped
        elif kind == "skipped":
            assert what not in used and outcome[2] in skipped[what]
            assert f"`{what}`: {skipped[what]}" in report  # path and reason in report.md
        elif kind == "ignored":
            assert what not in used and what not in skipped and what not in report
        elif kind == "absent":
            assert not any(what in p for p in list(used) + list(skipped))
        elif kind == "note":
            assert any(what in n for n in m["notes"]) and what in report.split("## Notes")[1]
        elif kind == "leak":
            leak = m["leakage"]["comparisons"]["test-train"]
            assert leak["exact"] == 1 and leak["pairs"][0]["query"] == what
            assert leak["pairs"][0]["reference"].endswith("train/ant/000.png")
            assert "## Leakage check" in report and "**Warning:** possible leakage" in report
            assert "possible leakage" in matrix["stderr"]
    assert set(matrix["cases"]) == set(CASES)


# --- hard errors: one line, exit code 2, nothing half-done ------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _hard_case(case: str, tmp: Path) -> tuple[list, str]:
    """(CLI arguments, expected text of the error) for one hard error."""
    run = ["run", tmp / "d", "--out", tmp / "out", "--epochs", 2, "--cache-dir", tmp / "cache", *TINY]
    if case == "missing_dataset":
        return run, "dataset not found"
    if case == "no_images":
        (tmp / "d" / "train" / "a").mkdir(parents=True)
        (tmp / "d" / "train" / "b").mkdir()
        (tmp / "d" / "train" / "a" / "readme.txt").write_text("no pictures here")
        return run, "no training images"
    if case == "single_class":
        make_imagefolder(tmp / "d", {"train": {"only": 4}, "test": {"only": 1}})
        return run, "single class"
    if case == "test_class_not_in_train":
        make_imagefolder(tmp / "d", {"train": {"a": 3, "b": 3}, "test": {"a": 1, "c": 1}})
        return run, "class 'c'"
    if case == "all_images_of_a_class_unreadable":  # found only after extraction, still one clean line
        make_imagefolder(tmp / "d", {"train": {"a": 4}, "test": {"a": 1}})
        for i in range(3):
            (tmp / "d" / "train" / "b").mkdir(exist_ok=True)
            (tmp / "d" / "train" / "b" / f"{i}.jpg").write_bytes(b"")
        return run, "fewer than two classes have readable training images"
    if case == "csv_path_outside":
        make_imagefolder(tmp / "imgs", {"all": {"a": 3, "b": 3}})
        (tmp / "sub").mkdir()
        (tmp / "sub" / "m.csv").write_text("../imgs/all/a/000.png,a\n../imgs/all/b/000.png,b\n")
        return ["run", tmp / "sub" / "m.csv", *run[2:]], "--allow-outside"
    if case == "out_not_writable":  # found before the extraction, not after it
        make_imagefolder(tmp / "d", {"train": {"a": 3, "b": 3}})
        (tmp / "file").write_text("a file, not a folder")
        return [a if a != tmp / "out" else tmp / "file" / "out" for a in run], "cannot write the report folder"
    if case == "cache_is_a_file":  # was "[Errno 20] Not a directory: '.../onnx'"
        make_imagefolder(tmp / "d", {"train": {"a": 3, "b": 3}})
        (tmp / "cachefile").write_text("a file, not a folder")
        return [a if a != tmp / "cache" else tmp / "cachefile" for a in run], "cachefile: it is a file, not a folder"
    if case == "malicious_pickle_weights":
        make_imagefolder(tmp / "d", {"train": {"a": 3, "b": 3}})
        with open(tmp / "evil.pth", "wb") as f:
            pickle.dump({"conv1.weight": _Payload(str(tmp / "PWNED"))}, f, protocol=2)  # torch.save's protocol
        return [a if a != "random" else tmp / "evil.pth" for a in run], "refused"
    raise AssertionError(case)


HARD = [
    "missing_dataset",
    "no_images",
    "single_class",
    "test_class_not_in_train",
    "all_images_of_a_class_unreadable",
    "csv_path_outside",
    "out_not_writable",
    "cache_is_a_file",
    "malicious_pickle_weights",
]


@pytest.mark.parametrize("case", HARD)
def test_hard_errors_exit_2_with_one_clear_line(tmp_path, case):
    args, text = _hard_case(case, tmp_path)
    rc, out, err = cli(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("transferlab: error: ") and text in lines[0], err
    assert "Traceback" not in err + out
    assert not (tmp_path / "out" / "metrics.json").exists()
    assert not (tmp_path / "PWNED").exists()  # the pickle's code never ran
    if case != "all_images_of_a_class_unreadable":  # every other error comes before any extraction
        assert not list(tmp_path.glob("cache/features/*/chunk-*"))


@pytest.mark.parametrize("reader", ["_read_keys", "_read_chunk"])
def test_corrupt_chunk_moved_aside_by_another_run_meanwhile(tmp_path, monkeypatch, reader):
    """Two runs find the same corrupt chunk: the one that loses the race to quarantine it just goes on,
    whether it was indexing the chunk's keys (on opening) or reading its features (on lookup)."""
    import warnings

    from transferlab.features import cache as C

    chunk = C.FeatureCache(tmp_path / "writer", "k").put([b"\x01" * 16], np.ones((1, 4), np.float32))
    os.replace(chunk, tmp_path / chunk.name)  # written by another process: not in this one's index yet
    chunk = C.FeatureCache(tmp_path, "k").dir / chunk.name
    os.replace(tmp_path / chunk.name, chunk)
    if reader == "_read_keys":
        chunk.write_bytes(b"garbage")
    real = getattr(C, reader)

    def other_run_quarantines_it_first(path):
        os.replace(path, Path(path).with_suffix(".corrupt"))
        return real(path)

    monkeypatch.setattr(C, reader, other_run_quarantines_it_first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the run that moved it aside warned; this one just recomputes
        cache = C.FeatureCache(tmp_path, "k")
        assert cache.get(b"\x01" * 16) is None and len(cache) == 0
    assert chunk.with_suffix(".corrupt").exists() and not chunk.exists()


# --- leakage --------------------------------------------------------------------------------------


class _Split:
    def __init__(self, X, paths):
        self.X, self.paths = np.asarray(X, np.float32), list(paths)


def test_nearest_in_blocks_equals_brute_force():
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(37, 9)), rng.normal(size=(53, 9))
    best, arg = nearest(q, r, block=8)
    qn, rn = q / np.linalg.norm(q, axis=1, keepdims=True), r / np.linalg.norm(r, axis=1, keepdims=True)
    sims = qn @ rn.T
    np.testing.assert_array_equal(arg, sims.argmax(1))
    np.testing.assert_allclose(best, sims.max(1), rtol=1e-5)


def test_leakage_counts_exact_and_near_duplicates(tmp_path):
    rng = np.random.default_rng(1)
    files = [make_image(tmp_path / f"{i}.png", i, rng) for i in range(6)]
    shutil.copy(files[0], tmp_path / "copy.png")  # exact: same bytes, another name
    train_X = np.eye(4, 16)[[0, 1, 2, 3]]
    test_X = np.stack(
        [
            train_X[0],  # copy.png (exact)
            train_X[1] + 0.2 * np.eye(16)[8],  # cosine 0.98: near at 0.95
            np.eye(16)[9] + 0.1 * train_X[2],
        ]
    )  # cosine 0.1: not a duplicate
    splits = {
        "train": _Split(train_X, map(str, files[:4])),
        "test": _Split(test_X, [str(tmp_path / "copy.png"), str(files[4]), str(files[5])]),
    }
    leak = check(splits, threshold=0.95)
    c = leak["comparisons"]["test-train"]
    assert (c["exact"], c["near"]) == (1, 1) and leak["warning"] and "1 exact and 1 near" in leak["warning"]
    assert c["pairs"][0] == {
        "query": str(tmp_path / "copy.png"),
        "reference": str(files[0]),
        "similarity": pytest.approx(1.0),
        "kind": "exact",
    }
    assert c["pairs"][1]["reference"] == str(files[1]) and c["pairs"][1]["similarity"] == pytest.approx(
        0.9806, abs=1e-3
    )
    assert c["near_at"] == {"0.9": 1, "0.95": 1, "0.98": 1}
    assert check(splits, threshold=0.99)["comparisons"]["test-train"]["near"] == 0
    clean = compare([str(files[5])], test_X[2:], list(map(str, files[:4])), train_X, threshold=0.95)
    assert clean["exact"] == clean["near"] == 0 and clean["pairs"] == []
    assert "valid-train" not in leak["comparisons"]  # no valid split given


def test_a_study_checks_leakage_with_the_extractions_hashes_without_reading_the_images_again(
    tmp_path, cache_dir, monkeypatch
):
    """The exact-duplicate check used to read and hash every image once more after the heads (3,840 files on
    brain_mri4; each photo's bytes again on large images): the extraction's content hashes, its feature cache
    keys, are the same hashes. A copy of a training image in test is still found."""
    from transferlab.data.hashing import content_hash
    from transferlab.evaluation import leakage
    from transferlab.study import run_study

    data = make_imagefolder(
        tmp_path / "data", {"train": {"a": 6, "b": 6}, "valid": {"a": 2, "b": 2}, "test": {"a": 2, "b": 2}}
    )
    first = sorted((data / "train" / "a").iterdir())[0]
    shutil.copy(first, data / "test" / "a" / "copy.png")
    read = []
    monkeypatch.setattr(leakage, "content_hash", lambda p: read.append(p) or content_hash(p))
    m = run_study(tiny_study(data, tmp_path / "out", cache_dir))
    assert read == []
    assert m["leakage"]["comparisons"]["test-train"]["exact"] == 1


# --- read-only dataset ----------------------------------------------------------------------------


def _snapshot(root: Path) -> dict:
    """Every entry under root: type, mode, size, mtime and content hash (links by target)."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = (
                os.readlink(p)
                if p.is_symlink()
                else hashlib.sha256(p.read_bytes()).hexdigest()
                if p.is_file()
                else "dir"
            )
            snap[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_size, st.st_mtime_ns, digest)
    st = root.stat()
    snap["."] = (st.st_mode, st.st_mtime_ns)
    return snap


def test_read_only_dataset_is_never_written(tmp_path, small_folder):
    data = tmp_path / "ro"
    shutil.copytree(small_folder, data)
    (data / "train" / "ant" / "broken.jpg").write_bytes(b"not a jpeg")  # skipped, still never touched
    for p in [data, *data.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = _snapshot(data)
    writes = []

    def audit(event, args):  # root ignores chmod, so also watch every write-like call under the dataset
        if event == "open" and args[0] is not None and str(args[0]).startswith(str(data)):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (flags and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                writes.append((event, args))
        elif event in (
            "os.rename",
            "os.remove",
            "os.mkdir",
            "os.chmod",
            "os.utime",
            "os.symlink",
            "os.truncate",
            "shutil.rmtree",
        ) and any(str(a).startswith(str(data)) for a in args if isinstance(a, (str, Path))):
            writes.append((event, args))

    _AUDIT.append(audit)
    try:
        rc, _, err = cli(
            "run",
            data,
            "--out",
            tmp_path / "out",
            "--epochs",
            2,
            "--cache-dir",
            tmp_path / "cache",
            "--methods",
            "svm",
            *[a if a != "1" else "0" for a in TINY],
        )
        after = _snapshot(data)
    finally:
        _AUDIT.remove(audit)
        for p in [data, *data.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert rc == 0, err
    assert writes == []
    assert after == before
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_valid"] + metrics["n_test"] == 34
    assert [s["path"] for s in metrics["skipped"]] == [str(data / "train" / "ant" / "broken.jpg")]


_AUDIT: list = []


def _dispatch(event, args):
    for hook in list(_AUDIT):
        hook(event, args)


sys.addaudithook(_dispatch)  # audit hooks cannot be removed: one dispatcher, hooks added per test


# --- no pickle on load ----------------------------------------------------------------------------


def _calls(text: str, name: str) -> list[str]:
    """The argument text of every `name(...)` call in `text` (parentheses balanced)."""
    found, start = [], text.find(name + "(")
    while start >= 0:
        i, depth = start + len(name) + 1, 1
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        found.append(text[start + len(name) + 1 : i - 1])
        start = text.find(name + "(", i)
    return found


def test_package_never_unpickles():
    """Weights via safetensors or torch.load(weights_only=True); configs JSON/YAML (safe); no pickle, joblib or dill."""
    import transferlab

    offences = []
    for f in sorted(Path(transferlab.__file__).parent.rglob("*.py")):
        text = f.read_text()
        offences += [f"{f.name}: torch.load({a})" for a in _calls(text, "torch.load") if "weights_only=True" not in a]
        offences += [
            f"{f.name}: {w}"
            for w in (
                "pickle.load",
                "joblib.load",
                "allow_pickle=True",
                "yaml.load(",
                "yaml.unsafe_load",
                "import dill",
                "cloudpickle",
                "trusted=True",
                "weights_only=False",
            )
            if w in text
        ]
    assert offences == []
