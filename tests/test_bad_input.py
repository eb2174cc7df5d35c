"""Bad input is a clear error naming the file and line, or a listed skip, never silent (issue 18, bug 6)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from transferlab.cli import build_parser
from transferlab.data.datasets import DatasetError, discover
from transferlab.data.images import IMAGE_EXTENSIONS, load_rgb

from .conftest import make_image, make_imagefolder


# --- CSV manifests ------------------------------------------------------------------------------

def _manifest(tmp_path: Path, rows: list[str]) -> Path:
    make_imagefolder(tmp_path / "imgs", {"all": {"a": 4, "b": 4}})
    (tmp_path / "m.csv").write_text("\n".join(["path,label,split", *rows]) + "\n")
    return tmp_path / "m.csv"


def _rows(n=3) -> list[str]:
    return [f"imgs/all/{c}/{i:03d}.png,{c},train" for c in ("a", "b") for i in range(n)]


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

@pytest.mark.parametrize("argv", [
    ["run", "d", "--epochs", "-3"], ["run", "d", "--epochs", "0"], ["run", "d", "--cv", "1"],
    ["run", "d", "--batch-size", "-8"], ["run", "d", "--valid-fraction", "1.5"], ["run", "d", "--test-fraction", "-0.1"],
    ["run", "d", "--valid-fraction", "nan"], ["run", "d", "--seed", "-1"], ["run", "d", "--workers", "-2"],
    ["run", "d", "--ft-epochs", "0"], ["run", "d", "--ft-lr", "-0.001"], ["run", "d", "--accumulate", "0"],
    ["run", "d", "--crop-scale", "0"], ["run", "d", "--label-smoothing", "1"], ["run", "d", "--patience", "-1"],
    ["run", "d", "--layer-decay", "0"], ["run", "d", "--num-nodes", "0"], ["finetune", "d", "--epochs", "-3"],
    ["extract", "d", "--chunk-size", "0"], ["predict", "b", "x.jpg", "--top-k", "0"], ["demo", "--seed", "-5"],
    ["export", "b", "--onnx", "m.onnx", "--opset", "0"], ["run", "d", "--epochs", "three"],
])
def test_nonsensical_numbers_are_argparse_errors_naming_the_value(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    flag, value = argv[-2:]
    assert f"argument {flag}" in err and value in err, err


def test_sensible_numbers_still_parse():
    a = build_parser().parse_args(["run", "d", "--epochs", "1", "--cv", "0", "--valid-fraction", "0",
                                   "--test-fraction", "0.3", "--seed", "7", "--workers", "0", "--label-smoothing", "0.1"])
    assert (a.epochs, a.cv, a.valid_fraction, a.test_fraction, a.seed, a.workers) == (1, 0, 0.0, 0.3, 7, 0)
    assert build_parser().parse_args(["run", "d", "--cv", "5"]).cv == 5


def test_config_file_numbers_get_the_same_checks(tmp_path, capsys):
    from transferlab.cli import main
    (tmp_path / "c.yaml").write_text(f"data: {tmp_path}\nepochs: -3\n")
    assert main(["run", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "epochs must be a positive integer, got -3" in capsys.readouterr().err


