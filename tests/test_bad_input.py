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


