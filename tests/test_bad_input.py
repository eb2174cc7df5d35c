"""Bad input is a clear error naming the file and line, or a listed skip, never silent (issue 18, bug 6)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image, features

from transferlab.cli import METHODS_HELP, build_parser
from transferlab.data.datasets import DatasetError, DatasetWarning, discover
from transferlab.data.images import IMAGE_EXTENSIONS, load_rgb

from .conftest import make_imagefolder, tiny_study

# --- CSV manifests ------------------------------------------------------------------------------


def _manifest(tmp_path: Path, rows: list[str]) -> Path:
    make_imagefolder(tmp_path / "imgs", {"all": {"a": 4, "b": 4}})
    (tmp_path / "m.csv").write_text("\n".join(["path,label,split", *rows]) + "\n")
    return tmp_path / "m.csv"


def _rows(n=3) -> list[str]:
    return [f"imgs/all/{c}/{i:03d}.png,{c},train" for c in ("a", "b") for i in range(n)]


def test_csv_header_names_its_columns_in_any_order(tmp_path):
    """A header other than `path,...` (e.g. `filename,class`) was read as an image row: a class "class" of one
    unreadable image "filename", or, with the columns swapped, every path taken for a label."""
    make_imagefolder(tmp_path / "imgs", {"all": {"a": 4, "b": 4}})
    rows = [(f"imgs/all/{c}/{i:03d}.png", c, "test" if i == 3 else "train") for c in ("a", "b") for i in range(4)]
    for header, cell in [
        ("filename,class", lambda p, c, s: f"{p},{c}"),
        ("Label,Image_Path,Split", lambda p, c, s: f"{c},{p},{s}"),
        ("image,category,width", lambda p, c, s: f"{p},{c},640"),  # a column of its own, not a split
    ]:
        m = tmp_path / "m.csv"
        m.write_text("\n".join([header, *(cell(*r) for r in rows)]) + "\n")
        ds = discover(m, valid_fraction=0)
        assert ds.classes == ["a", "b"], header
        assert sorted(Path(x.path).name for x in ds.samples) == sorted(Path(p).name for p, _, _ in rows)
        want = 2 if "Split" in header else 0
        assert len(ds.split("test")) == want, header
    m.write_text("name,kind\n" + "\n".join(f"{p},{c}" for p, c, _ in rows) + "\n")
    with pytest.raises(DatasetError, match=r"m\.csv:1: 'name,kind' is not an image row and not a header"):
        discover(m)


def test_csv_separated_by_semicolons_or_tabs_is_read(tmp_path):
    """A spreadsheet's CSV in a comma-decimal locale (';') or a TSV was one cell per row: 'expected path,label'."""
    make_imagefolder(tmp_path / "imgs", {"all": {"a": 3, "b": 3}})
    for sep, name in ((";", "m.csv"), ("\t", "m.tsv")):
        rows = [f"imgs/all/{c}/{i:03d}.png{sep}{c}" for c in "ab" for i in range(3)]
        (tmp_path / name).write_text("\ufeff" + "\n".join([f"filename{sep}label", *rows]) + "\n")  # with a BOM
        ds = discover(tmp_path / name, valid_fraction=0)
        assert ds.classes == ["a", "b"] and len(ds.samples) == 6 and all(Path(x.path).is_file() for x in ds.samples)


def test_classes_written_two_ways_are_named_in_a_warning(tmp_path):
    """'Cat' in one row and 'cat' in another (or golden_retriever beside 'Golden Retriever') were two classes,
    silently: the model split one class in two."""
    make_imagefolder(tmp_path / "imgs", {"all": {"a": 3, "b": 3, "c": 3}})
    names = {"a": "Golden Retriever", "b": "golden_retriever", "c": "beagle"}
    m = tmp_path / "m.csv"
    m.write_text("\n".join(f"imgs/all/{c}/{i:03d}.png,{names[c]}" for c in "abc" for i in range(3)) + "\n")
    with pytest.warns(DatasetWarning, match=r"'Golden Retriever' and 'golden_retriever' differ only in case"):
        ds = discover(m, valid_fraction=0)
    assert len(ds.classes) == 3 and any("differ only" in n for n in ds.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)  # distinct names: no word
        discover(make_imagefolder(tmp_path / "f", {"train": {"cat": 2, "cats": 2, "dog": 2}}))


def test_a_class_with_training_images_only_is_named_in_a_warning(tmp_path):
    """A class of one image stays in train: no test or validation image measures it, and nothing said so."""
    root = make_imagefolder(tmp_path / "d", {"all": {"a": 6, "b": 6, "lily": 1}}) / "all"
    with pytest.warns(DatasetWarning, match=r"class 'lily' \(1\) has training images only, no test or validation"):
        ds = discover(root)
    assert ds.counts()["train"]["lily"] == 1 and any("'lily'" in n for n in ds.notes)


def test_csv_written_on_windows_reads_its_backslash_paths(tmp_path):
    make_imagefolder(tmp_path / "imgs", {"all": {"a": 3, "b": 3}})
    m = tmp_path / "m.csv"
    m.write_text("\n".join(f"imgs\\all\\{c}\\{i:03d}.png,{c}" for c in "ab" for i in range(3)) + "\n")
    ds = discover(m, valid_fraction=0)
    assert all(Path(x.path).is_file() for x in ds.samples) and len(ds.samples) == 6


def test_csv_empty_label_names_file_and_line(tmp_path):
    m = _manifest(tmp_path, _rows() + ["imgs/all/a/003.png, ,train"])
    with pytest.raises(DatasetError, match=r"m\.csv:8: empty label"):
        discover(m)


def test_csv_path_listed_twice_with_another_split_or_label_names_both_lines(tmp_path):
    for clash in ("imgs/all/a/000.png,a,valid", "imgs/all/a/000.png,b,train", "imgs/all/./a/000.png,a,test"):
        m = _manifest(tmp_path, _rows() + [clash])
        with pytest.raises(DatasetError, match=r"m\.csv.*imgs/all/(\./)?a/000\.png.*lines? 2 .*8") as err:
            discover(m)
        assert "listed twice" in str(err.value)


def test_csv_exact_repeat_is_read_once_with_a_note(tmp_path):
    m = _manifest(tmp_path, _rows() + ["imgs/all/a/000.png,a,train", "imgs/all/b/001.png,b,train"])
    ds = discover(m, valid_fraction=0)
    assert len(ds.samples) == 6 and len({s.path for s in ds.samples}) == 6
    assert [n for n in ds.notes if "lines 8, 9" in n and "read once" in n]


# --- command-line numbers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "d", "--epochs", "-3"],
        ["run", "d", "--epochs", "0"],
        ["run", "d", "--cv", "1"],
        ["run", "d", "--batch-size", "-8"],
        ["run", "d", "--valid-fraction", "1.5"],
        ["run", "d", "--test-fraction", "-0.1"],
        ["run", "d", "--valid-fraction", "nan"],
        ["run", "d", "--seed", "-1"],
        ["run", "d", "--workers", "-2"],
        ["run", "d", "--ft-epochs", "0"],
        ["run", "d", "--ft-lr", "-0.001"],
        ["run", "d", "--accumulate", "0"],
        ["run", "d", "--crop-scale", "0"],
        ["run", "d", "--label-smoothing", "1"],
        ["run", "d", "--patience", "-1"],
        ["run", "d", "--layer-decay", "0"],
        ["run", "d", "--num-nodes", "0"],
        ["finetune", "d", "--epochs", "-3"],
        ["extract", "d", "--chunk-size", "0"],
        ["predict", "b", "x.jpg", "--top-k", "0"],
        ["demo", "--seed", "-5"],
        ["export", "b", "--onnx", "m.onnx", "--opset", "0"],
        ["run", "d", "--epochs", "three"],
    ],
)
def test_nonsensical_numbers_are_argparse_errors_naming_the_value(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    flag, value = argv[-2:]
    assert f"argument {flag}" in err and value in err, err


def test_sensible_numbers_still_parse():
    a = build_parser().parse_args(
        [
            "run",
            "d",
            "--epochs",
            "1",
            "--cv",
            "0",
            "--valid-fraction",
            "0",
            "--test-fraction",
            "0.3",
            "--seed",
            "7",
            "--workers",
            "0",
            "--label-smoothing",
            "0.1",
        ]
    )
    assert (a.epochs, a.cv, a.valid_fraction, a.test_fraction, a.seed, a.workers) == (1, 0, 0.0, 0.3, 7, 0)
    assert build_parser().parse_args(["run", "d", "--cv", "5"]).cv == 5


def test_config_file_numbers_get_the_same_checks(tmp_path, capsys):
    from transferlab.cli import main

    (tmp_path / "c.yaml").write_text(f"data: {tmp_path}\nepochs: -3\n")
    assert main(["run", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "epochs must be a positive integer, got -3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setting, said",
    [
        ("select_metric: f1", "select_metric must be one of macro_f1, accuracy, balanced_accuracy, got 'f1'"),
        ("runtime: tensorrt", "runtime must be one of auto, torch, onnxruntime, got 'tensorrt'"),
        ("finetune: {schedule: linear}", "finetune.schedule must be one of cosine, onecycle, constant, got 'linear'"),
        ("finetune: {bn: none}", "finetune.bn must be one of train, frozen, got 'none'"),
        ("finetune: {class_weight: inverse}", "finetune.class_weight must be one of balanced, got 'inverse'"),
    ],
)
def test_config_file_choices_get_the_same_checks_as_their_flags(tmp_path, capsys, setting, said):
    # each failed in a ValueError traceback, the fine-tuning ones after the whole extraction
    from transferlab.cli import main

    data = tmp_path / "data"
    (tmp_path / "c.yaml").write_text(f"data: {data}\n{setting}\n")
    assert main(["run", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert f"transferlab: error: {tmp_path / 'c.yaml'}: {said}" in capsys.readouterr().err


# --- files that are not read --------------------------------------------------------------------


def test_a_run_folder_inside_the_data_folder_is_refused_before_anything_is_written(tmp_path, capsys):
    """`--out DATA/results` made the next run over DATA read its own report's plots as a class "results"."""
    from transferlab.cli import main
    from transferlab.study import StudyConfig, run_study

    data = make_imagefolder(tmp_path / "data", {"train": {"ant": 4, "bee": 4}})
    for out in (data / "results", data):
        assert main(["run", str(data), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"transferlab: error: --out {out} is inside the data folder {data}" in err
    assert sorted(p.name for p in data.iterdir()) == ["train"]  # nothing written there
    with pytest.raises(DatasetError, match="inside the data folder"):
        run_study(StudyConfig(data=str(data), out=str(data / "sub" / "run")))
    assert sorted(p.name for p in data.iterdir()) == ["train"]


def test_unknown_extension_and_no_extension_are_listed_as_skipped(tmp_path):
    root = make_imagefolder(tmp_path / "d", {"train": {"a": 4, "b": 4}})
    (root / "train" / "a" / "notes.txt").write_text("shot on a sunny day")
    shutil.copy(root / "train" / "b" / "000.png", root / "train" / "b" / "IMG_0001")  # an image without extension
    (root / "train" / "a" / ".DS_Store").write_bytes(b"junk")  # OS junk stays silent
    (root / "train" / "a" / "Thumbs.db").write_bytes(b"junk")
    with pytest.warns(DatasetWarning, match="2 files"):
        ds = discover(root)
    assert {Path(s["path"]).name: s["reason"] for s in ds.skipped} == {
        "notes.txt": "not an image extension (.txt)",
        "IMG_0001": "no file extension (rename it with its image type's extension to use it)",
    }
    notes = "\n".join(ds.notes)
    assert "notes.txt" in notes and "IMG_0001" in notes and ".DS_Store" not in notes and "Thumbs.db" not in notes


@pytest.mark.skipif(not features.check_module("avif"), reason="this Pillow has no AVIF support")
def test_avif_is_read_where_pillow_has_it(tmp_path):
    root = make_imagefolder(tmp_path / "d", {"train": {"a": 3, "b": 3}})
    Image.new("RGB", (16, 12), (10, 200, 30)).save(root / "train" / "a" / "phone.avif")
    ds = discover(root, valid_fraction=0)
    assert any(p.endswith("phone.avif") for p in ds.paths("train")) and not ds.skipped
    assert load_rgb(root / "train" / "a" / "phone.avif").size == (16, 12)


def test_heic_without_the_extra_is_listed_with_what_to_install(tmp_path):
    if ".heic" in IMAGE_EXTENSIONS:
        pytest.skip("pillow-heif is installed: HEIC is read (test_heic_with_the_extra_is_read)")
    root = make_imagefolder(tmp_path / "d", {"train": {"a": 4, "b": 4}})
    for name in ("IMG_1.HEIC", "IMG_2.heif"):
        (root / "train" / "a" / name).write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.warns(DatasetWarning, match=r"transferlab\[heic\]"):
        ds = discover(root)
    assert sorted(Path(s["path"]).name for s in ds.skipped) == ["IMG_1.HEIC", "IMG_2.heif"]
    assert all(s["reason"] == "HEIC/HEIF needs the heic extra: pip install 'transferlab[heic]'" for s in ds.skipped)
    # named in a CSV manifest, extraction skips it with the same reason
    with pytest.raises(Exception, match=r"transferlab\[heic\]"):
        load_rgb(root / "train" / "a" / "IMG_1.HEIC")


def test_heic_with_the_extra_is_read(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    root = make_imagefolder(tmp_path / "d", {"train": {"a": 3, "b": 3}})
    pillow_heif.from_pillow(Image.new("RGB", (16, 12), (10, 200, 30))).save(root / "train" / "a" / "IMG_1.heic")
    ds = discover(root, valid_fraction=0)
    assert any(p.endswith("IMG_1.heic") for p in ds.paths("train")) and not ds.skipped
    assert load_rgb(root / "train" / "a" / "IMG_1.heic").size == (16, 12)


def test_class_folder_of_only_skipped_files_says_why_it_is_ignored(tmp_path):
    root = make_imagefolder(tmp_path / "d", {"train": {"a": 4, "b": 4}})
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / "scan.pdf").write_bytes(b"%PDF-1.4")
    with pytest.warns(DatasetWarning):
        ds = discover(root)
    assert ds.classes == ["a", "b"]
    assert [n for n in ds.notes if "train/c" in n and "no images" in n and "1 file skipped" in n]


# --- a training class that extraction cannot read -----------------------------------------------


def test_training_class_with_no_readable_image_warns_and_is_reported(tmp_path, cache_dir):
    from transferlab.study import run_study

    root = make_imagefolder(
        tmp_path / "d", {"train": {"ant": 8, "bee": 8, "cat": 6}, "test": {"ant": 3, "bee": 3, "cat": 2}}
    )
    for p in (root / "train" / "cat").iterdir():
        p.write_bytes(b"not a picture")
    cfg = tiny_study(root, tmp_path / "run", cache_dir, methods=["softmax", "svm"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = run_study(cfg)
    ours = [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)]
    assert len(ours) == 1 and "'cat'" in ours[0] and "6 training images" in ours[0] and "unreadable" in ours[0], ours
    assert metrics["classes"] == ["ant", "bee", "cat"]  # still a class: its test images are scored ...
    for name in ("softmax", "svm"):  # ... and the model cannot predict it
        assert metrics["methods"][name]["per_class"]["cat"]["recall"] == 0.0
    assert any("'cat'" in n and "cannot predict" in n for n in metrics["notes"])
    assert "cannot predict" in (Path(cfg.out) / "report.md").read_text()


def test_images_extraction_cannot_read_are_named_on_screen_not_only_in_the_report(tmp_path, cache_dir):
    """A truncated JPEG was skipped and listed in report.md's notes only: the terminal said nothing."""
    from transferlab.study import run_study

    root = make_imagefolder(tmp_path / "d", {"train": {"ant": 8, "bee": 8}, "test": {"ant": 3, "bee": 3}})
    good = next((root / "train" / "bee").iterdir())
    Image.open(good).convert("RGB").save(root / "train" / "bee" / "whole.jpg")
    (root / "train" / "bee" / "cut.jpg").write_bytes((root / "train" / "bee" / "whole.jpg").read_bytes()[:300])
    cfg = tiny_study(root, tmp_path / "run", cache_dir, methods=["svm"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = run_study(cfg)
    ours = [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)]
    assert len(ours) == 1 and "1 image could not be read and was skipped" in ours[0] and "cut.jpg" in ours[0], ours
    assert [Path(s["path"]).name for s in metrics["skipped"]] == ["cut.jpg"]
    assert "1 unreadable image skipped:" in (Path(cfg.out) / "report.md").read_text()


def test_photos_with_a_corrupt_exif_block_are_read_without_a_warning_each(tmp_path, cache_dir):
    """Pillow printed "UserWarning: Corrupt EXIF data" for every such photo (twice: header and decode), a wall of
    warnings for a camera's folder, though the pixels are read all the same."""
    import transferlab
    from transferlab.study import run_study

    root = make_imagefolder(tmp_path / "d", {"train": {"a": 6, "b": 6}, "test": {"a": 2, "b": 2}})
    bad_exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\xff\xff"
    for p in list(root.rglob("*.png")):
        Image.open(p).convert("RGB").save(p.with_suffix(".jpg"), exif=bad_exif)
        p.unlink()
    with pytest.warns(UserWarning, match="Corrupt EXIF"):  # what Pillow does on its own
        Image.open(next(root.rglob("*.jpg"))).getexif()
    cfg = tiny_study(root, tmp_path / "run", cache_dir, methods=["svm"], data_efficiency=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = run_study(cfg)
        model = transferlab.load(Path(cfg.out) / "models" / "svm", cache_dir=False)
        assert len(model.predict(sorted(map(str, root.rglob("*.jpg"))))) == 16
    assert metrics["n_train"] + metrics["n_valid"] + metrics["n_test"] == 16 and not metrics["skipped"]
    assert not [str(w.message) for w in caught if "EXIF" in str(w.message)]


def _in_fresh_process(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_argument_errors_and_compare_answer_without_loading_torch(tmp_path):
    # `transferlab run --bogus` (and --help, and compare) imported timm, torch and scikit-learn first: 5 s here
    # before a one-line error. The parser and the error now need neither.
    check = "import sys; heavy = sorted(m for m in ('torch', 'timm', 'sklearn') if m in sys.modules); print(heavy)"
    r = _in_fresh_process(
        "from transferlab.cli import main\ntry:\n    main(['run', 'data', '--bogus'])\nexcept SystemExit as e:\n"
        f"    assert e.code == 2\n{check}"
    )
    assert "unrecognized arguments: --bogus" in r.stderr and r.stdout.strip() == "[]", (r.stdout, r.stderr)
    metrics = tmp_path / "run" / "metrics.json"
    metrics.parent.mkdir()
    metrics.write_text('{"methods": {}, "selected": null, "backbone": "x", "input_size": [8, 8], "n_train": 0}')
    r = _in_fresh_process(f"from transferlab.cli import main\nmain(['compare', {str(tmp_path / 'run')!r}])\n{check}")
    assert r.stdout.strip().splitlines()[-1] == "[]", (r.stdout, r.stderr)


def test_run_help_still_lists_every_registered_method():
    from transferlab.heads import registry

    text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    flat = " ".join(text.split())
    assert METHODS_HELP not in text
    for kind in registry.KINDS:
        for name in registry.names(kind):
            assert name in flat, name
