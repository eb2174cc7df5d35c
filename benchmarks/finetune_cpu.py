"""Fine-tuning benchmark on boats16 with the embedded backbone (issue 5), sized for a small CPU.

Run by hand, not in CI:  uv run python benchmarks/finetune_cpu.py [--data ../shared/data/boats16]
Writes benchmarks/results/finetune_cpu.json and prints a table.

What it does (defaults, about 8-10 minutes on 2 shared CPU cores):
1. One study on a stratified --fraction of boats16's training images (validation carved from it, 10%) and
   the FULL test set, at 120x400 with tf_efficientnet_lite0 (embedded weights): the frozen heads (softmax,
   svm) and `finetune` side by side, all trained on the same images. Fine-tuning: stage 1 = the softmax
   head on cached features; stage 2 = --ft-epochs epochs end to end with the last --unfreeze stages
   trained, AdamW, warmup 0.5 epoch + cosine, augmentation crop,flip,color, fp32 (no native bf16 here).
2. Training throughput of the whole backbone (unfreeze all) on --throughput-images images, one epoch.
3. For reference, the frozen heads on the full training set (cached features, seconds).
On a GPU, pass --device cuda and larger --fraction / --ft-epochs; the JSON records the device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from speed import subset_manifest  # noqa: E402  (stratified CSV manifest of a boats16 share)

from transferlab.data.datasets import discover  # noqa: E402
from transferlab.features.backbones import load_backbone  # noqa: E402
from transferlab.finetune.tuner import FineTuner  # noqa: E402
from transferlab.study import StudyConfig, run_study  # noqa: E402

RESULTS = Path(__file__).parent / "results"
KEYS = ("accuracy", "macro_f1", "balanced_accuracy", "train_seconds", "predict_seconds")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/boats16"))
    ap.add_argument("--fraction", type=float, default=0.25, help="share of the training images for the study")
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--unfreeze", default="2")
    ap.add_argument("--throughput-images", type=int, default=96)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t_all = time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp(prefix="finetune_cpu_"))
    out.mkdir(parents=True, exist_ok=True)
    full = discover(args.data, seed=0)
    n_train = int(round(args.fraction * (len(full.split("train")) + len(full.split("valid")))))
    manifest, _ = subset_manifest(args.data, n_train, 0, out)
    common = dict(
        backbone="tf_efficientnet_lite0",
        input_size=(120, 400),
        seed=0,
        device=args.device,
        progress=False,
        allow_outside=True,
    )

    ft = {"epochs": args.ft_epochs, "unfreeze": args.unfreeze, "warmup_epochs": 0.5, "patience": 0}
    cfg = StudyConfig(
        data=str(manifest), out=str(out / "subset"), methods=["softmax", "svm", "finetune"], finetune=ft, **common
    )
    t0 = time.perf_counter()
    sub = run_study(cfg)
    study_seconds = time.perf_counter() - t0

    # whole-backbone training throughput (no validation, one epoch)
    ds = discover(manifest, seed=0, allow_outside=True)
    paths, y = ds.paths("train")[: args.throughput_images], ds.labels("train")[: args.throughput_images]
    bb = load_backbone("tf_efficientnet_lite0", input_size=(120, 400))
    est = FineTuner(
        epochs=1,
        unfreeze="all",
        out_dir=str(out / "throughput"),
        progress=False,
        head_epochs=5,
        patience=0,
        device=args.device,
    )
    est.fit(paths, y, backbone=bb)
    all_ips = est.images_per_second_

    ref = run_study(StudyConfig(data=args.data, out=str(out / "full"), methods=["softmax", "svm"], **common))

    m = sub["methods"]
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "device": sub["extract"]["device"],
            "precision": sub["extract"]["precision"],
            "torch": torch.__version__,
        },
        "setup": {
            "data": args.data,
            "backbone": "tf_efficientnet_lite0 (embedded)",
            "input_size": [120, 400],
            "train_fraction": args.fraction,
            "n_train": sub["n_train"],
            "n_valid": sub["n_valid"],
            "n_test": sub["n_test"],
            "finetune": {
                **ft,
                "lr": 5e-4,
                "layer_decay": 0.75,
                "batch_size": 32,
                "augment": "crop,flip,color",
                "schedule": "cosine",
            },
        },
        "subset_study": {
            n: {k: m[n][k] for k in KEYS} | ({"valid_macro_f1": m[n]["valid"]["macro_f1"]} if "valid" in m[n] else {})
            for n in m
        },
        "finetune_details": m["finetune"]["details"],
        "train_images_per_second": {
            f"unfreeze {args.unfreeze}": m["finetune"]["details"]["train_images_per_second"],
            "unfreeze all": all_ips,
        },
        "full_train_frozen_heads": {n: {k: ref["methods"][n][k] for k in KEYS} for n in ref["methods"]},
        "seconds": {"subset_study": study_seconds, "total": time.perf_counter() - t_all},
        "report": str(out / "subset" / "report.md"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "finetune_cpu.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"{'method':<22}{'acc':>7}{'macroF1':>9}{'bal.acc':>9}{'train':>10}{'predict':>10}")
    for label, block in (("", result["subset_study"]), (" (full train)", result["full_train_frozen_heads"])):
        for n, r in block.items():
            print(
                f"{n + label:<22}{r['accuracy']:>7.3f}{r['macro_f1']:>9.3f}{r['balanced_accuracy']:>9.3f}"
                f"{r['train_seconds']:>9.1f}s{r['predict_seconds']:>9.1f}s"
            )
    print("training images/s:", {k: round(v, 2) for k, v in result["train_images_per_second"].items()})
    print(f"total {result['seconds']['total']:.0f} s; report {result['report']}")


if __name__ == "__main__":
    main()
