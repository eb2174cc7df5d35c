from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferlab.data.datasets import DatasetError, DatasetWarning, discover
from transferlab.data.images import ImageError, load_rgb

from .conftest import make_image, make_imagefolder, make_photo

# --- images -------------------------------------------------------------------------------------


def _save(img: Image.Image, path: Path, fmt=None, **kw) -> Path:
    img.save(path, format=fmt, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "I;16", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    base = Image.new("RGB", (10, 6), (200, 30, 60))
    if mode == "I;16":
        img = Image.fromarray(np.arange(60, dtype=np.uint16).reshape(6, 10) * 1000)
        path, fmt = tmp_path / "x.png", "PNG"
    elif mode == "CMYK":
        img, path, fmt = base.convert("CMYK"), tmp_path / "x.jpg", "JPEG"
    else:
        img, path, fmt = base.convert(mode), tmp_path / "x.png", "PNG"
    out = load_rgb(_save(img, path, fmt))
    assert out.mode == "RGB" and out.size == (10, 6)


def test_sixteen_bit_keeps_dynamic_range(tmp_path):
    arr = np.linspace(0, 65535, 60, dtype=np.uint16).reshape(6, 10)
    out = np.asarray(load_rgb(_save(Image.fromarray(arr), tmp_path / "x.png")))
    assert out.min() == 0 and out.max() == 255


def test_palette_transparency_composited_on_white(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.info["transparency"] = 0
    out = np.asarray(load_rgb(_save(img, tmp_path / "p.png", transparency=0)))
    assert (out == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes())
    assert load_rgb(path).size == (10, 20)


def test_a_large_jpeg_decodes_reduced_to_at_least_twice_the_size_it_is_resized_to(tmp_path):
    photo = make_photo(tmp_path / "photo.jpg")
    assert load_rgb(photo).size == (1600, 1200)  # no target: in full
    assert load_rgb(photo, reduce_to=(200, 150)).size == (400, 300)  # 1/4: still 2x the target
    assert load_rgb(photo, reduce_to=(300, 300)).size == (800, 600)  # 1/2: 1/4 would give 400 x 300 < 600 x 600
    assert load_rgb(photo, reduce_to=(800, 600)).size == (1600, 1200)  # not twice as large: in full
    png = tmp_path / "photo.png"
    Image.open(photo).save(png)
    assert load_rgb(png, reduce_to=(200, 150)).size == (1600, 1200)  # only JPEGs have a reduced decode
    # what the resize to the target makes of it is close to what it makes of the full decode
    full = np.asarray(load_rgb(photo).resize((200, 150), Image.BICUBIC), dtype=np.float64)
    reduced = np.asarray(load_rgb(photo, reduce_to=(200, 150)).resize((200, 150), Image.BICUBIC), dtype=np.float64)
    assert np.abs(full - reduced).mean() < 1.0 and np.abs(full - reduced).max() < 12


def test_a_turned_photo_is_reduced_by_its_upright_size(tmp_path):
    """Stored 1600 x 1200 with orientation 6, the photo is 1200 x 1600 upright; a portrait target of 150 x 200 is
    200 x 150 in the file's own orientation, so 1/4 keeps twice of it (read unturned it would allow only 1/2)."""
    photo = make_photo(tmp_path / "upright.jpg", orientation=6)
    assert load_rgb(photo).size == (1200, 1600)
    assert load_rgb(photo, reduce_to=(150, 200)).size == (300, 400)


def test_gif_first_frame_and_webp_tiff_bmp(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert np.asarray(load_rgb(tmp_path / "a.gif"))[0, 0, 0] > 200
    for ext in ("webp", "tiff", "bmp"):
        _save(Image.new("RGB", (5, 5), (1, 2, 3)), tmp_path / f"a.{ext}")
        assert load_rgb(tmp_path / f"a.{ext}").size == (5, 5)


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"", "empty file"),
        (b"this is text, not an image", "cannot decode"),
    ],
)
def test_unreadable_files_name_path_and_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason) as err:
        load_rgb(path)
    assert str(path) in str(err.value)


def test_truncated_jpeg_is_an_image_error(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, "JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[:200])
    with pytest.raises(ImageError):
        load_rgb(tmp_path / "t.jpg")


def test_png_named_jpg_still_loads(tmp_path):
    path = _save(Image.new("RGB", (3, 3)), tmp_path / "really_png.jpg", "PNG")
    assert load_rgb(path).size == (3, 3)


# --- datasets -----------------------------------------------------------------------------------


def test_imagefolder_classes_from_train_sorted_and_valid_carved(small_folder):
    ds = discover(small_folder, seed=0, valid_fraction=0.25)
    assert ds.classes == ["ant", "bee", "cat"]
    counts = ds.counts()
    assert counts["test"] == {"ant": 4, "bee": 3, "cat": 2}
    assert counts["valid"] == {"ant": 3, "bee": 2, "cat": 1}
    assert {k: counts["train"][k] + counts["valid"][k] for k in ds.classes} == {"ant": 12, "bee": 8, "cat": 5}
    # seeded: the same carve twice, another seed another carve
    assert discover(small_folder, seed=0, valid_fraction=0.25).paths("valid") == ds.paths("valid")
    assert discover(small_folder, seed=1, valid_fraction=0.25).paths("valid") != ds.paths("valid")


def test_test_class_not_in_train_is_named(small_folder):
    make_image(small_folder / "test" / "dog" / "x.png", 0, np.random.default_rng(0))
    with pytest.raises(DatasetError, match="'dog'"):
        discover(small_folder)


def test_train_class_absent_from_test_is_fine(tmp_path):
    root = make_imagefolder(tmp_path / "d", {"train": {"a": 4, "b": 4, "c": 4}, "test": {"a": 2, "b": 2}})
    ds = discover(root)
    assert ds.classes == ["a", "b", "c"] and ds.counts()["test"]["c"] == 0


def test_hidden_files_macosx_and_empty_class_ignored(small_folder):
    (small_folder / "train" / "ant" / ".DS_Store").write_bytes(b"junk")
    (small_folder / "train" / "ant" / "._000.png").write_bytes(b"junk")
    make_image(small_folder / "train" / "__MACOSX" / "ant" / "x.png", 0, np.random.default_rng(0))
    (small_folder / "train" / "empty").mkdir()
    ds = discover(small_folder)
    assert ds.classes == ["ant", "bee", "cat"]
    assert not any(".DS_Store" in p or "__MACOSX" in p or "/._" in p for p in ds.paths("train") + ds.paths("valid"))
    assert any("empty" in n and "no images" in n for n in ds.notes)


def test_flat_class_folders_are_split_stratified(tmp_path):
    root = tmp_path / "flat"
    make_imagefolder(tmp_path, {"flat": {"x": 20, "y": 10}})
    ds = discover(root, seed=3, test_fraction=0.2, valid_fraction=0.1)
    c = ds.counts()
    assert c["test"] == {"x": 4, "y": 2}
    assert sum(c["valid"].values()) >= 2 and min(c["train"].values()) > 0
    assert sum(sum(v.values()) for v in c.values()) == 30


def test_csv_manifest_with_splits_and_escape_refused(tmp_path):
    make_imagefolder(tmp_path / "imgs", {"all": {"a": 3, "b": 3}})
    lines = ["path,label,split"]
    for cls in ("a", "b"):
        lines += [
            f"imgs/all/{cls}/000.png,{cls},train",
            f"imgs/all/{cls}/001.png,{cls},train",
            f"imgs/all/{cls}/002.png,{cls},test",
        ]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    ds = discover(tmp_path / "m.csv")
    assert ds.classes == ["a", "b"] and ds.counts()["test"] == {"a": 1, "b": 1}
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "evil.csv").write_text("../imgs/all/a/000.png,a\n../imgs/all/b/000.png,b\n")
    with pytest.raises(DatasetError, match="outside"):
        discover(tmp_path / "sub" / "evil.csv")
    assert len(discover(tmp_path / "sub" / "evil.csv", allow_outside=True, valid_fraction=0).classes) == 2


@pytest.mark.parametrize("case", ["missing", "empty", "single", "not_csv", "zip"])
def test_hard_errors_are_clear(tmp_path, case):
    if case == "missing":
        target, match = tmp_path / "nope", "not found"
    elif case == "empty":
        (tmp_path / "e" / "train" / "a").mkdir(parents=True)
        target, match = tmp_path / "e", "no training images"
    elif case == "single":
        target, match = make_imagefolder(tmp_path / "s", {"train": {"only": 3}}), "single class"
    elif case == "zip":
        (tmp_path / "flowers.zip").write_bytes(b"PK\x03\x04")
        target, match = tmp_path / "flowers.zip", "not a CSV manifest .*: unpack the archive and point at the folder"
    else:
        (tmp_path / "x.txt").write_text("hi")
        target, match = tmp_path / "x.txt", "not a CSV manifest \\(path,label\\[,split\\]\\)$"
    with pytest.raises(DatasetError, match=match):
        discover(target)


def test_one_class_holding_the_class_folders_names_the_folder_to_point_at(tmp_path):
    """A data set unzipped into a folder of its name (data/flowers/<class>/, beside __MACOSX/) was "a single class
    (flowers)" with no word of the classes one level down."""
    make_imagefolder(tmp_path / "data", {"flowers": {"daisy": 2, "rose": 2, "tulip": 1}})
    (tmp_path / "data" / "__MACOSX" / "flowers").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"single class \(flowers\).*holds folders of images \(daisy, rose, tulip\)"):
        discover(tmp_path / "data")
    with pytest.raises(DatasetError, match=r"single class \(only\): a classifier needs at least two$"):
        discover(make_imagefolder(tmp_path / "s", {"train": {"only": 3}}))  # no hint where there is nothing below


def test_unlabelled_test_images_beside_train_classes_are_named_not_silently_ignored(tmp_path):
    """A competition's layout (train/<class>/, test/*.jpg unlabelled): the test images were passed over without a
    word, and the report had no test split."""
    root = make_imagefolder(tmp_path / "k", {"train": {"a": 4, "b": 4}})
    make_imagefolder(tmp_path / "loose", {"x": {"y": 3}})
    for p in (tmp_path / "loose" / "x" / "y").iterdir():
        (root / "test").mkdir(exist_ok=True)
        p.rename(root / "test" / p.name)
    with pytest.warns(DatasetWarning, match=r"test holds 3 images outside class folders .*transferlab predict RUN"):
        ds = discover(root)
    assert not ds.split("test") and any("unlabelled" in n for n in ds.notes)


def test_discover_never_writes_in_dataset(small_folder):
    before = {p: p.stat().st_mtime_ns for p in small_folder.rglob("*")}
    discover(small_folder)
    assert {p: p.stat().st_mtime_ns for p in small_folder.rglob("*")} == before
    assert os.access(small_folder, os.R_OK)


def test_a_class_folder_named_train_is_a_class_and_loose_split_folders_are_refused(tmp_path):
    """A root of class folders whose classes include "train" (a scenes set's trains) was taken for a train/ split
    and failed with "no training images found"; train/ and test/ of loose images are refused, not learned as two
    classes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "scenes"
    for c, name in enumerate(("street", "train")):
        for i in range(5):
            make_image(root / name / f"{i}.png", c, rng)
    ds = discover(root)
    assert ds.classes == ["street", "train"] and ds.layout == "class-folders"
    assert sum(len(ds.split(s)) for s in ("train", "valid", "test")) == 10
    loose = tmp_path / "loose"
    for split in ("train", "test"):
        for i in range(3):
            make_image(loose / split / f"{i}.png", 0, rng)
    with pytest.raises(
        DatasetError, match=r"train holds images but no class folders, beside the split folder\(s\) test"
    ):
        discover(loose)
    assert discover(make_imagefolder(tmp_path / "splits", {"train": {"a": 3, "b": 3}})).layout == "imagefolder"
