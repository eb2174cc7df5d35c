"""Benchmark: cold extraction and the default study on photos of many megapixels, decoded reduced or in full.

Run by hand, not in CI:
    uv run python benchmarks/large_photos.py [--data ../shared/data/imagewoof10] [--scale 8] [--work DIR] [--tag NAME]

A phone photo is 8-12 megapixels; the shared datasets are 150-500 px wide, so their images never decode reduced.
This makes a large copy of a dataset (every image upscaled `--scale` times, bicubic, JPEG quality 90: imagewoof10's
320 px short side becomes 2560 px, ~9 megapixels), then runs the default `transferlab run` on it twice in one
process, each with a fresh feature cache: with large JPEGs decoded at reduced DCT scale (`data.images.load_rgb`'s
`reduce_to`, the default) and with every image decoded in full (the previous behaviour, by patching extraction's
`resize_target` to None). It prints and saves per variant: cold extraction seconds and images/s, the selected
method and its test accuracy / macro-F1, every method's test macro-F1, and the largest difference between the two
variants' features (cosine); then fine-tuning's data loading (one core, the default training transform), reduced
and in full. Upscaled images are smooth, so the two decodes give near-identical features here; on
real photos the reduced decode averages detail the full decode's resize would also filter out.
Writes benchmarks/results/large_photos[_TAG].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

import transferlab.features.extract as extract
from transferlab.features.backbones import load_backbone
from transferlab.study import StudyConfig, run_study

RESULTS = Path(__file__).parent / "results"


def _upscale(job: tuple[str, str, int]) -> None:
    src, dst, scale = job
    with Image.open(src) as im:
        im = im.convert("RGB")
        im.resize((im.width * scale, im.height * scale), Image.BICUBIC).save(dst, quality=90)


def make_large_copy(data: Path, work: Path, scale: int) -> Path:
    """`data`'s folder tree with every image upscaled `scale` times (kept when already made)."""
    out = work / f"{data.name}_x{scale}"
    jobs = []
    for src in sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        dst = (out / src.relative_to(data)).with_suffix(".jpg")
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((str(src), str(dst), scale))
    if jobs:
        t0 = time.perf_counter()
        with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(_upscale, jobs, chunksize=16))
        print(f"made {len(jobs)} images x{scale} in {time.perf_counter() - t0:.0f} s under {out}", flush=True)
    return out


def study(large: Path, out: Path, cache: Path, reduced: bool) -> tuple[dict, object]:
    """The default run on `large` with a fresh cache, then its features read back (warm) for the comparison."""
    original = extract.resize_target
    if not reduced:
        extract.resize_target = lambda transform: None  # every image decoded in full, as before
    try:
        m = run_study(StudyConfig(data=str(large), out=str(out), cache_dir=str(cache), progress=False))
        bb = load_backbone(m["backbone"], input_size=tuple(m["input_size"]))
        paths = sorted(str(p) for p in large.rglob("*.jpg"))
        return m, extract.extract_features(paths, bb, cache_dir=cache, progress=False)
    finally:
        extract.resize_target = original


def training_loading(large: Path, input_size, n: int = 64) -> dict:
    """Fine-tuning's data loading on one core: ms per image of `LabelledImages` with the default training transform
    (random crop, flip, colour), large JPEGs decoded reduced (`decode_target`) or in full; median of 3 passes."""
    import statistics

    import torch

    from transferlab.finetune.module import LabelledImages, train_transform

    bb = load_backbone("tf_efficientnet_lite0", input_size=tuple(input_size))
    paths = sorted(str(p) for p in large.rglob("*.jpg"))[:: max(1, len(list(large.rglob("*.jpg"))) // n)][:n]
    out = {}
    torch.set_num_threads(1)
    for variant in ("reduced", "full"):
        ds = LabelledImages(paths, [0] * len(paths), train_transform(bb))
        if variant == "full":
            ds.reduce_to = None
        passes = []
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            passes.append((time.perf_counter() - t0) / len(ds) * 1000)
        out[variant] = {"ms_per_image": statistics.median(passes), "reduce_to": ds.reduce_to}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "imagewoof10"))
    ap.add_argument("--scale", type=int, default=8)
    ap.add_argument("--work", default=None, help="where the large copy is made (kept; default: a temporary folder)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    data = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        large = make_large_copy(data, work, args.scale)
        with Image.open(next(large.rglob("*.jpg"))) as im:
            example = im.size
        rows, features = {}, {}
        for variant, reduced in (("reduced", True), ("full", False)):
            m, features[variant] = study(large, Path(tmp) / variant, Path(tmp) / f"cache_{variant}", reduced)
            cold = m["extract"].get("cold_seconds") or m["extract"]["seconds"]
            n = m["n_train"] + m["n_valid"] + m["n_test"]
            chosen = m["selected"]
            rows[variant] = {
                "cold_extract_seconds": cold,
                "images": n,
                "images_per_second": n / cold,
                "input_size": m["input_size"],
                "selected": chosen,
                "test": {k: m["methods"][chosen][k] for k in ("accuracy", "macro_f1", "balanced_accuracy")},
                "macro_f1": {name: r["macro_f1"] for name, r in m["methods"].items()},
                "timings": m["timings"],
            }
            print(json.dumps({variant: rows[variant]}, indent=1), flush=True)
        loading = training_loading(large, rows["reduced"]["input_size"])
        print(json.dumps({"fine-tuning data loading": loading}), flush=True)
        a, b = features["reduced"], features["full"]
        assert a.paths == b.paths
        cos = (a.features * b.features).sum(1) / np.linalg.norm(a.features, axis=1) / np.linalg.norm(b.features, axis=1)
        out = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "data": str(data),
            "scale": args.scale,
            "example_size": example,
            "rows": rows,
            "feature_cosine": {"min": float(cos.min()), "median": float(np.median(cos))},
            "finetune_loading": loading,
            "speedup": rows["full"]["cold_extract_seconds"] / rows["reduced"]["cold_extract_seconds"],
        }
    print(
        f"cold extraction: reduced {rows['reduced']['images_per_second']:.1f} img/s, full "
        f"{rows['full']['images_per_second']:.1f} img/s ({out['speedup']:.2f}x); feature cosine min {cos.min():.5f}"
    )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"large_photos{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
