"""Command line: `transferlab run | demo | extract`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .backbones import DEFAULT_BACKBONE, EMBEDDED, BackboneError, parse_size
from .cache import default_cache_dir
from .datasets import DatasetError
from .features import PRECISIONS, ExtractionError

USER_ERRORS = (DatasetError, BackboneError, ExtractionError, FileExistsError, FileNotFoundError)


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help=f"timm model name, e.g. resnet50.tv_in1k (default {DEFAULT_BACKBONE}; offline: {', '.join(EMBEDDED)})")
    p.add_argument("--weights", help="local weights file (.safetensors or .pth, loaded without pickle), or 'random'")
    p.add_argument("--input-size", help="HxW fed to the backbone, e.g. 120x400 (default: the model's pretrained size)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="autocast precision (auto: bf16 where native)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="DataLoader decoding workers (default: by device)")
    p.add_argument("--cache-dir", default=None, help=f"feature cache (default {default_cache_dir()}, or $TRANSFERLAB_CACHE)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--valid-fraction", type=float, default=0.1, help="carved from train when there is no valid/")
    p.add_argument("--test-fraction", type=float, default=0.2, help="for a root of class folders with no splits")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of skipping it")
    p.add_argument("--allow-outside", action="store_true", help="let a CSV manifest name files outside its folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the frozen-backbone study: extract (cached), train heads, evaluate, report")
    run.add_argument("data", help="ImageFolder root, root of class folders, or CSV manifest")
    run.add_argument("--out", default="runs/study", help="report folder")
    run.add_argument("--methods", default="softmax,svm", help="comma-separated heads")
    run.add_argument("--epochs", type=int, default=50, help="softmax head epochs")
    _add_backbone_args(run)
    _add_data_args(run)

    demo = sub.add_parser("demo", help="build the offline demo data set and run the study on it")
    demo.add_argument("--out", default="demo_run", help="folder for the demo data and its report")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")

    ext = sub.add_parser("extract", help="extract (and cache) features only; optionally save them as .npz")
    ext.add_argument("data")
    ext.add_argument("--save", help="write features, labels, paths and splits to this .npz file")
    _add_backbone_args(ext)
    _add_data_args(ext)
    return parser


def _study_config(args, **over):
    from .study import StudyConfig
    return StudyConfig(
        data=args.data, out=args.out, backbone=args.backbone, weights=args.weights,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()], epochs=args.epochs, seed=args.seed,
        input_size=parse_size(args.input_size), precision=args.precision, device=args.device,
        batch_size=args.batch_size, num_workers=args.workers, cache_dir=args.cache_dir,
        valid_fraction=args.valid_fraction, test_fraction=args.test_fraction, strict=args.strict,
        allow_outside=args.allow_outside, progress=not args.no_progress, **over)


def cmd_run(args) -> int:
    from .heads import HEADS
    from .report import console_summary
    from .study import run_study
    cfg = _study_config(args)
    unknown = [m for m in cfg.methods if m not in HEADS]
    if unknown:
        raise DatasetError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(HEADS)}")
    metrics = run_study(cfg)
    console_summary(metrics)
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return 0


def cmd_demo(args) -> int:
    from .demo import build_demo_dataset
    from .report import console_summary
    from .study import StudyConfig, run_study
    out = Path(args.out)
    data = build_demo_dataset(out / f"data-seed{args.seed}", seed=args.seed)
    print(f"demo data: {data}")
    cfg = StudyConfig(data=str(data), out=str(out / "report"), seed=args.seed, input_size=(128, 128),
                      progress=not args.no_progress)
    metrics = run_study(cfg)
    console_summary(metrics)
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return 0


def cmd_extract(args) -> int:
    import numpy as np

    from .backbones import load_backbone
    from .datasets import discover
    from .features import extract_features
    ds = discover(args.data, seed=args.seed, valid_fraction=args.valid_fraction, test_fraction=args.test_fraction,
                  allow_outside=args.allow_outside)
    bb = load_backbone(args.backbone, weights=args.weights, input_size=parse_size(args.input_size))
    paths = [s.path for s in ds.samples]
    ex = extract_features(paths, bb, cache_dir=args.cache_dir, precision=args.precision, device=args.device,
                          batch_size=args.batch_size, num_workers=args.workers, strict=args.strict,
                          progress=not args.no_progress)
    print(f"{len(ex.paths)} images -> {ex.features.shape[1]}-d features in {ex.seconds:.1f} s "
          f"({ex.computed} computed, {ex.from_cache} from cache, {ex.images_per_second:.1f} images/s, {ex.precision})")
    for s in ex.skipped:
        print(f"skipped {s['path']}: {s['reason']}")
    if args.save:
        by_path = {s.path: s for s in ds.samples}
        np.savez(args.save, features=ex.features, labels=np.array([by_path[p].label for p in ex.paths]),
                 paths=np.array(ex.paths), splits=np.array([by_path[p].split for p in ex.paths]),
                 classes=np.array(ds.classes))
        print(f"saved {args.save}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, "demo": cmd_demo, "extract": cmd_extract}[args.command]
    try:
        return handler(args)
    except USER_ERRORS as exc:
        print(f"transferlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ntransferlab: interrupted. Features finished so far are kept in the cache; "
              "rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
