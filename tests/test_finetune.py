"""Fine-tuning end to end: loss falls, BatchNorm of frozen stages stays put, resume, augmentation, and DDP.

Tiny random-init timm models on generated images; the DDP test runs the real CLI in two CPU processes
(gloo) started like torchrun starts them, and compares their feature cache with a single-process run.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.data.datasets import discover
from transferlab.features.backbones import load_backbone
from transferlab.finetune.module import (
    AspectRandomResizedCrop,
    FineTuneModule,
    LabelledImages,
    decode_target,
    stage_groups,
    train_transform,
)
from transferlab.finetune.tuner import FineTuner

from .conftest import make_imagefolder, make_photo

FAST = dict(batch_size=8, num_workers=0, progress=False, head_epochs=5, warmup_epochs=0.5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_imagefolder(
        tmp_path_factory.mktemp("ft") / "data",
        {
            "train": {"ant": 14, "bee": 12, "cat": 10},
            "valid": {"ant": 3, "bee": 3, "cat": 3},
            "test": {"ant": 3, "bee": 2, "cat": 2},
        },
    )
    return discover(root, seed=0)


def _fit(ds, out, arch="test_efficientnet", callbacks=(), **kw):
    torch.manual_seed(0)
    bb = load_backbone(arch, weights="random", input_size=(32, 40))
    est = FineTuner(out_dir=str(out), **{**FAST, **kw})
    est.fit(
        ds.paths("train"),
        ds.labels("train"),
        valid=(ds.paths("valid"), ds.labels("valid")),
        backbone=bb,
        callbacks=list(callbacks),
    )
    return est, bb


@pytest.mark.parametrize("batch_size", [18, 12, 36])  # 2, 3 and 1 steps: one-step warm-ups and a one-step run
def test_onecycle_with_a_one_step_warmup_trains(data, tmp_path, batch_size):
    """--schedule onecycle with 1 epoch of 2 batches: the one-step warm-up ended OneCycleLR's rising phase at step 0
    and it divided by the phase's zero length (ZeroDivisionError in the first step)."""
    est, _ = _fit(data, tmp_path, schedule="onecycle", epochs=1, warmup_epochs=1.0, batch_size=batch_size)
    assert est.epochs_run_ == 1 and all(np.isfinite(est.history_["train_loss"]))


def test_an_unknown_augmentation_is_refused_before_extraction(small_folder, tmp_path, capsys):
    from transferlab.cli import main

    argv = ["finetune", str(small_folder), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")]
    assert main([*argv, "--augment", "strong", "--no-progress"]) == 2
    assert "transferlab: error: fine-tuning: unknown augmentation(s) strong" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # nothing extracted first


@pytest.mark.parametrize(
    "line, says",
    [
        ("epochs: x", "The 'epochs' parameter of FineTuner must be an int in the range [1, inf). Got 'x'"),
        ("lr: -1.0", "The 'lr' parameter of FineTuner must be a float in the range [0.0, inf). Got -1.0"),
        ("batch_size: -4", "The 'batch_size' parameter of FineTuner must be an int in the range [1, inf). Got -4"),
        (
            "label_smoothing: 1.0",
            "The 'label_smoothing' parameter of FineTuner must be a float in the range [0.0, 1.0)",
        ),
        ("unfreeze: some", "unfreeze must be 'all' or a number of last stages, got 'some'"),
        ("nonsense: 1", "unknown fine-tuning option(s) nonsense; known: accumulate, augment,"),
    ],
)
def test_a_config_files_fine_tuning_options_are_checked_before_extraction(small_folder, tmp_path, capsys, line, says):
    """Each failed in the fine-tuning's fit, a traceback after the extraction (and the heads)."""
    from transferlab.cli import main

    f = tmp_path / "c.yaml"
    f.write_text(f"data: {small_folder}\nmethods: [svm, finetune]\nfinetune: {{{line}}}\n")
    argv = ["run", "--config", str(f), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")]
    assert main([*argv, "--no-progress"]) == 2
    assert f"transferlab: error: fine-tuning: {says}" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # nothing extracted first


def test_tiny_model_fine_tunes_and_its_loss_falls(data, tmp_path):
    est, _ = _fit(data, tmp_path, epochs=4, lr=3e-3, augment="none", patience=0)
    hist = est.history_
    assert hist["epoch"] == [1, 2, 3, 4]
    assert hist["train_loss"][-1] < 0.7 * hist["train_loss"][0]
    assert all(np.isfinite(hist[k]).all() for k in ("valid_loss", "valid_acc", "valid_macro_f1", "lr"))
    proba = est.predict_proba(data.paths("test"))
    assert proba.shape == (7, 3) and np.allclose(proba.sum(1), 1)
    assert set(est.predict(data.paths("test"))) <= {0, 1, 2}
    assert Path(est.best_checkpoint_).name == "best.ckpt" and Path(est.last_checkpoint_).name == "last.ckpt"
    assert 1 <= est.best_epoch_ <= 4 and est.images_per_second_ > 0
    metrics = list((tmp_path / "logs").glob("version_*/metrics.csv"))
    assert metrics and "val_macro_f1" in metrics[0].read_text().splitlines()[0]


def test_stage1_head_initialises_stage2(data, tmp_path):
    """With nothing trainable in stage 2 (head frozen by lr 0), the model is the backbone + stage-1 head."""
    # fp32: the direct forward below is fp32 (on a CPU with AMX, precision="auto" would pick bf16)
    est, bb = _fit(data, tmp_path, epochs=1, lr=0.0, unfreeze=0, augment="none", patience=0, precision="fp32")
    feats = bb.model.eval()(torch.stack([bb.transform()(Image.open(p).convert("RGB")) for p in data.paths("test")]))
    np.testing.assert_allclose(
        est.decision_function(data.paths("test")),
        est.head_.decision_function(feats.detach().numpy()),
        rtol=1e-4,
        atol=1e-4,
    )


def test_frozen_stages_keep_their_batchnorm_statistics(data, tmp_path):
    est, bb = _fit(data, tmp_path / "a", arch="test_resnet", epochs=1, unfreeze=1, lr=1e-2, patience=0)
    before, after = bb.model.state_dict(), est.model_[0].state_dict()
    stage_of = stage_groups(bb.model)
    last = max(stage_of.values())
    moved = {k: not torch.equal(before[k], after[k]) for k in before if "num_batches" not in k}
    frozen = [k for k in moved if stage_of[k] < last]
    assert frozen and not any(moved[k] for k in frozen)  # weights and running stats of stem..layer3
    assert any(moved[k] for k in moved if stage_of[k] == last and "running_mean" in k)
    assert any(moved[k] for k in moved if stage_of[k] == last and k.endswith("weight"))

    est, bb = _fit(data, tmp_path / "b", arch="test_resnet", epochs=1, unfreeze="all", bn="frozen", lr=1e-2, patience=0)
    before, after = bb.model.state_dict(), est.model_[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running_" in k)
    assert not all(torch.equal(before[k], after[k]) for k in before if k.endswith("conv1.weight"))


def test_unfreeze_and_layerwise_learning_rates(tiny_backbone):
    model = tiny_backbone.model
    n = max(stage_groups(model).values()) + 1
    module = FineTuneModule(
        load_backbone("test_efficientnet", weights="random").model,
        torch.nn.Linear(model.num_features, 3),
        unfreeze=2,
        lr=1e-3,
        layer_decay=0.5,
    )
    groups = module.param_groups()
    assert {g["name"].split("_")[0] for g in groups} == {f"stage{n - 2}", f"stage{n - 1}", "head"}
    lr = {g["name"]: g["lr"] for g in groups}
    assert lr["head"] == pytest.approx(1e-3) and lr[f"stage{n - 1}"] == pytest.approx(1e-3 * 0.5)
    assert lr[f"stage{n - 2}"] == pytest.approx(1e-3 * 0.25)
    assert all(g["weight_decay"] == 0 for g in groups if g["name"].endswith("no_decay"))
    trainable = {k for k, p in module.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(module.stage_of[k] >= n - 2 for k in trainable)
    module.train()
    bn = [m for name, m in module.backbone.named_modules() if name in set(module.frozen_bn)]
    assert bn and not any(m.training for m in bn) and module.backbone.training


def test_augmentation_keeps_wide_images_wide_and_is_training_only(monkeypatch, tiny_backbone):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 400, 3), dtype=np.uint8))
    boxes = []
    real = AspectRandomResizedCrop.get_params
    monkeypatch.setattr(
        AspectRandomResizedCrop,
        "get_params",
        staticmethod(lambda im, scale, ratio: boxes.append(real(im, scale, ratio)) or boxes[-1]),
    )
    t = train_transform(tiny_backbone, "crop,flip,color", crop_scale=0.3)
    outs = [t(img) for _ in range(40)]
    assert all(o.shape == (3, 32, 40) for o in outs)
    aspects = np.array([w / h for _, _, h, w in boxes])
    assert aspects.min() > 400 / 120 * 0.7 and aspects.max() < 400 / 120 * 1.4  # wide stays wide
    assert len({(h, w) for _, _, h, w in boxes}) > 5
    plain = train_transform(tiny_backbone, "none")
    assert torch.equal(plain(img), tiny_backbone.transform()(img))


def test_training_decodes_a_large_jpeg_reduced_only_as_far_as_its_smallest_crop_allows(tiny_backbone, tmp_path):
    """The input is 40 x 32 (width x height). Crops of at least 0.5 of the area, aspect within 3/4..4/3 of the image's,
    take at least sqrt(0.375) of its width and height: the decode keeps 2x the output over that share (66 x 53,
    doubled), so a 1600 x 1200 photo decodes at 1/8 (200 x 150); evaluation needs only 80 x 64 (1/16 is not a scale:
    1/8 too). With crops down to 0.02 of the area (0.12 of a side) 1/2 is the most it may reduce."""
    from transferlab.data.images import load_rgb

    photo = str(make_photo(tmp_path / "large.jpg", size=(1600, 1200)))
    train = train_transform(tiny_backbone, "crop,flip,color", crop_scale=0.5)
    assert decode_target(train) == (66, 53)
    assert decode_target(tiny_backbone.transform()) == (40, 32)
    assert decode_target(train_transform(tiny_backbone, "none")) == (40, 32)
    small_crops = train_transform(tiny_backbone, "crop", crop_scale=0.02)
    assert load_rgb(photo, decode_target(small_crops)).size == (800, 600)
    ds = LabelledImages([photo], [0], train)
    assert load_rgb(photo, ds.reduce_to).size == (200, 150)
    torch.manual_seed(0)
    x = ds[0][0]
    torch.manual_seed(0)
    assert torch.equal(x, train(load_rgb(photo, (66, 53))))


def test_resume_continues_from_the_checkpoint_epoch(data, tmp_path):
    import lightning.pytorch as pl

    class Interrupt(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                raise RuntimeError("interrupted")

    class FirstEpoch(pl.Callback):
        seen = []

        def on_train_epoch_start(self, trainer, module):
            self.seen.append(trainer.current_epoch)

    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(data, tmp_path, epochs=3, patience=0, callbacks=[Interrupt()])
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and saved["transferlab"]["history"]["epoch"] == [1]

    first = FirstEpoch()
    est, _ = _fit(data, tmp_path, epochs=3, patience=0, resume=True, callbacks=[first])
    assert first.seen == [1, 2]
    assert est.history_["epoch"] == [1, 2, 3]
    assert est.history_["train_loss"][0] == saved["transferlab"]["history"]["train_loss"][0]
    assert torch.load(est.last_checkpoint_, map_location="cpu", weights_only=True)["epoch"] == 2


def test_resumed_fine_tune_ends_like_an_uninterrupted_one(data, tmp_path):
    """Interrupted after epoch 1 of 3 and resumed: same weights, curves and predictions as 3 epochs in one go.

    Deterministic setup (no augmentation, no loader workers, fp32, fixed seeds); the shuffle order of
    epochs 2 and 3 comes from the global RNG, so it must be restored with the checkpoint, and so must the
    optimizer and the per-step schedule.
    """
    import lightning.pytorch as pl

    class Interrupt(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                raise RuntimeError("interrupted")

    kw = dict(epochs=3, lr=3e-3, patience=0, augment="none", precision="fp32")
    whole, _ = _fit(data, tmp_path / "whole", **kw)
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(data, tmp_path / "parts", callbacks=[Interrupt()], **kw)
    resumed, _ = _fit(data, tmp_path / "parts", resume=True, **kw)

    assert resumed.history_["epoch"] == whole.history_["epoch"] == [1, 2, 3]
    for k in ("train_loss", "train_acc", "valid_loss", "valid_acc", "lr"):
        np.testing.assert_allclose(resumed.history_[k], whole.history_[k], rtol=1e-5, atol=1e-7, err_msg=k)
    last = [torch.load(e.last_checkpoint_, map_location="cpu", weights_only=True) for e in (whole, resumed)]
    assert last[0]["epoch"] == last[1]["epoch"] == 2
    assert last[0]["state_dict"].keys() == last[1]["state_dict"].keys()
    for k, v in last[0]["state_dict"].items():
        torch.testing.assert_close(last[1]["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert resumed.best_epoch_ == whole.best_epoch_
    np.testing.assert_allclose(
        resumed.decision_function(data.paths("test")), whole.decision_function(data.paths("test")), rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------- DDP: 2 CPU processes, gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, argv: list[str], local_base: str, paths: list[str]):
    """One process as torchrun starts it: environment, then the real CLI."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        GROUP_RANK="0",
        ROLE_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_RUN_ID="transferlab-test",
    )
    torch.set_num_threads(1)
    from transferlab.cli import main
    from transferlab.features import distributed
    from transferlab.features.extract import extract_features

    assert distributed.launch(devices=str(world), strategy="ddp") == world
    # a node-local cache folder per process: the processes exchange what the others computed
    from lightning.pytorch import seed_everything

    seed_everything(0, verbose=False)
    bb = load_backbone("test_efficientnet", weights="random", input_size=(32, 40))
    ex = extract_features(paths, bb, cache_dir=f"{local_base}/rank{rank}", progress=False, num_workers=0)
    assert ex.features.shape[0] == len(paths) and ex.computed == len(paths)
    assert main(argv) == 0


def _read_cache(cache: Path) -> dict[str, dict[bytes, np.ndarray]]:
    from safetensors.numpy import load_file

    out = {}
    for key_dir in (cache / "features").iterdir():
        feats = {}
        for chunk in key_dir.glob("chunk-*.safetensors"):
            d = load_file(str(chunk))
            feats.update({k.tobytes(): f for k, f in zip(d["keys"], d["features"])})
        out[key_dir.name] = feats
    return out


@pytest.mark.slow
def test_ddp_two_cpu_processes_extract_and_fine_tune_like_one(data, tmp_path):
    import torch.multiprocessing as mp
    from lightning.pytorch import seed_everything

    from transferlab.features.extract import extract_features

    root = str(Path(data.root))
    paths = [s.path for s in data.samples]
    shared = tmp_path / "cache-ddp"
    argv = [
        "run",
        root,
        "--methods",
        "softmax,finetune",
        "--backbone",
        "test_efficientnet",
        "--weights",
        "random",
        "--input-size",
        "32x40",
        "--epochs",
        "5",
        "--ft-epochs",
        "2",
        "--ft-batch-size",
        "6",
        "--workers",
        "0",
        "--cache-dir",
        str(shared),
        "--out",
        str(tmp_path / "report"),
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--no-progress",
    ]
    ctx = mp.start_processes(
        _ddp_worker,
        args=(2, _free_port(), argv, str(tmp_path / "local"), paths),
        nprocs=2,
        join=False,
        start_method="spawn",  # fork would copy a parent whose thread pools (OpenMP, ONNX Runtime) hold locks
    )
    deadline = time.time() + 900  # a guard against a hung process group, not a speed limit (a loaded CPU is slow)
    try:
        while not ctx.join(timeout=1):
            assert time.time() < deadline, "DDP processes did not finish"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()

    seed_everything(0, verbose=False)
    bb = load_backbone("test_efficientnet", weights="random", input_size=(32, 40))
    single = extract_features(paths, bb, cache_dir=tmp_path / "cache-one", progress=False, num_workers=0)
    one, ddp = _read_cache(tmp_path / "cache-one"), _read_cache(shared)
    assert set(one) == set(ddp) and len(one) == 1  # same backbone cache key
    (key,) = one
    assert set(one[key]) == set(ddp[key]) and len(one[key]) == len(paths)
    for k in one[key]:
        np.testing.assert_allclose(ddp[key][k], one[key][k], rtol=1e-5, atol=1e-6)
    for r in (0, 1):  # node-local caches were completed by exchange
        local = _read_cache(tmp_path / "local" / f"rank{r}")
        assert set(local[key]) == set(one[key])
    assert single.computed == len(paths)

    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    ft = metrics["methods"]["finetune"]
    assert ft["details"]["processes"] == 2 and ft["details"]["epochs_run"] == 2 and ft["accuracy"] is not None
    assert metrics["extract"]["computed"] == len(paths)  # counted over both processes' shares
    assert (tmp_path / "report" / "methods" / "finetune" / "checkpoints" / "last.ckpt").exists()


def test_loss_flags_reach_the_fine_tuner():
    from transferlab.cli import _study_config, build_parser
    from transferlab.finetune.tuner import make_finetuner

    argv = ["run", "data", "--methods", "finetune", "--ft-class-weight", "balanced", "--label-smoothing", "0.1"]
    est = make_finetuner(_study_config(build_parser().parse_args(argv)))
    assert est.class_weight == "balanced" and est.label_smoothing == pytest.approx(0.1)
    plain = make_finetuner(_study_config(build_parser().parse_args(["run", "data", "--methods", "finetune"])))
    assert plain.class_weight is None and plain.label_smoothing == 0.0


def _cv_config(data, tmp_path, ft_epochs: int = 1, **kw):
    """A study config for fine-tuning's CV on the module's tiny image folder (random tiny backbone)."""
    from transferlab.study import StudyConfig

    return StudyConfig(
        data=str(data.root),
        out=str(tmp_path / "run"),
        backbone="test_efficientnet",
        weights="random",
        input_size=(32, 40),
        cv=2,
        num_workers=0,
        progress=False,
        finetune={"epochs": ft_epochs, "batch_size": 8, "augment": "none", "patience": 0},
        **kw,
    )


def _cv_inputs(data):
    """Train + valid paths, labels 0..k-1 and the backbone, as the study hands them to `cross_val_predict`."""
    y = np.concatenate([data.labels("train"), data.labels("valid")])
    y = np.searchsorted(np.unique(y), y)
    return (
        data.paths("train") + data.paths("valid"),
        y,
        load_backbone("test_efficientnet", weights="random", input_size=(32, 40)),
    )


def test_cv_scores_fine_tuning_on_the_heads_folds_and_selection_uses_them(data, tmp_path):
    from transferlab.finetune.tuner import cross_val_predict
    from transferlab.heads.search import cv_folds
    from transferlab.study import run_study

    cfg = _cv_config(data, tmp_path, methods=["softmax", "finetune"], epochs=5, data_efficiency=False)
    m = run_study(cfg)
    sel = m["selection"]
    assert sel["protocol"] == "2-fold CV on train + valid" and sel["left_out"] == []
    ft_cv = m["methods"]["finetune"]["cv"]
    assert ft_cv["k"] == 2 and ft_cv["seconds"] > 0
    assert sel["scores"]["finetune"] == ft_cv["scores"]  # its own K-fold score, not its validation split's
    assert sel["scores"]["finetune"] != m["methods"]["finetune"]["valid"]
    assert not list((tmp_path / "run" / "methods" / "finetune" / "cv").rglob("*.ckpt"))  # fold checkpoints removed
    assert (tmp_path / "run" / "methods" / "finetune" / "checkpoints" / "best.ckpt").exists()  # the final model's kept

    # one fold at a time: its held-out images get predictions, the rest stay -1; the folds are the heads'
    paths, y, bb = _cv_inputs(data)
    seen = []
    pred = cross_val_predict(
        cfg,
        paths,
        y,
        np.zeros((len(y), bb.num_features), np.float32),
        bb,
        folds=[1],
        on_fold=lambda i, p: seen.append((i, (p >= 0).sum())),
    )
    held_out = cv_folds(y, 2, 0)[1][1]
    assert seen == [(1, len(held_out))]
    assert (pred[held_out] >= 0).all() and (np.delete(pred, held_out) == -1).all()
    assert "finetune: 2-fold CV" in (tmp_path / "run" / "report.md").read_text()


def test_cv_past_its_deadline_stops_after_one_epoch_not_a_fold(data, tmp_path, capsys):
    """Under --time-budget, fine-tuning's CV projected its cost only after a whole fold: on a CPU the first fold
    (4 minutes on the demo's 612 images) spent a 4-minute budget, and every other final fit was skipped. Each
    epoch now projects the fold and the folds left, and the CV stops at the first epoch that overshoots."""
    import time

    from transferlab.finetune.tuner import OutOfTime, cross_val_predict

    cfg = _cv_config(data, tmp_path, ft_epochs=4)
    paths, y, bb = _cv_inputs(data)
    X = np.zeros((len(y), bb.num_features), np.float32)
    with pytest.raises(OutOfTime) as err:
        cross_val_predict(cfg, paths, y, X, bb, deadline=time.perf_counter() + 1e-3)
    assert err.value.epochs_seen == 1 and err.value.folds == 2 and err.value.over > 0 and err.value.per_fold > 0
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # the stopped fold leaves no checkpoint
    capsys.readouterr()
    seen = []
    pred = cross_val_predict(
        cfg, paths, y, X, bb, on_fold=lambda i, p: seen.append(i), deadline=time.perf_counter() + 3600
    )
    assert seen == [0, 1] and (pred >= 0).all()  # a deadline far enough changes nothing
    # how long the CV will take, said once, after the first fold's first epoch
    assert capsys.readouterr().err.count("transferlab: fine-tuning's 2-fold CV: ~") == 1


def _ddp_fit_worker(rank: int, world: int, port: int, root: str, out: str, kw: dict):
    """One torchrun-like process fitting a FineTuner under DDP; saves what it ended with to out/rank<r>.pt."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        GROUP_RANK="0",
        ROLE_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_RUN_ID="transferlab-test",
    )
    torch.set_num_threads(1)
    from transferlab.features import distributed

    assert distributed.launch(devices=str(world), strategy="ddp") == world
    ds = discover(root, seed=0)
    est, _ = _fit(ds, Path(out) / "ft", devices=str(world), strategy="ddp", **kw)
    torch.save(
        {
            "state": est.model_.state_dict(),
            "history": est.history_,
            "best_epoch": est.best_epoch_,
            "valid_logits": est.decision_function(ds.paths("valid")),
            "test_logits": est.decision_function(ds.paths("test")),
        },
        Path(out) / f"rank{rank}.pt",
    )


@pytest.mark.slow
def test_ddp_two_processes_train_like_one_process_with_the_whole_batch(data, tmp_path):
    """2 processes x batch 18 against 1 process x batch 36, on the 36 training images: one full-batch step per
    epoch, so the sampler's order (DistributedSampler vs RandomSampler) does not matter and DDP's averaged
    gradient is the gradient of the mean loss over all 36 images. BatchNorm statistics would be per
    process (18 vs 36 images), so bn="frozen" keeps them out; no augmentation, fp32.

    Guaranteed by DDP and checked exactly: both processes end with identical weights and curves. Checked
    against one process within a tolerance: only the order of float sums differs (the all-reduce adds two
    halves), ~1e-7 here; AdamW divides by sqrt(v), which can amplify it for near-zero gradients, so weights are
    compared at atol 1e-5 and logits at 1e-4 (observed: 2e-7 and 4e-9 on a CPU).
    The validation numbers of the DDP run count each of the 9 validation images once (DistributedSampler pads
    9 to 10 with a repeat): they equal the loss and accuracy of the final model's own predictions.
    """
    import torch.multiprocessing as mp
    import torch.nn.functional as F

    assert len(data.paths("train")) == 36 and len(data.paths("valid")) == 9
    kw = dict(
        epochs=2,
        lr=1e-3,
        patience=0,
        augment="none",
        bn="frozen",
        precision="fp32",
        warmup_epochs=0,
        monitor="val_loss",
    )
    ctx = mp.start_processes(
        _ddp_fit_worker,
        args=(2, _free_port(), str(data.root), str(tmp_path / "ddp"), {**kw, "batch_size": 18}),
        nprocs=2,
        join=False,
        start_method="spawn",  # fork would copy a parent whose thread pools (OpenMP, ONNX Runtime) hold locks
    )
    deadline = time.time() + 900  # a guard against a hung process group, not a speed limit
    try:
        while not ctx.join(timeout=1):
            assert time.time() < deadline, "DDP processes did not finish"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for k, v in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][k], v), k
    assert ranks[0]["history"]["train_loss"] == ranks[1]["history"]["train_loss"]
    assert ranks[0]["history"]["valid_loss"] == ranks[1]["history"]["valid_loss"]

    one, _ = _fit(data, tmp_path / "one", batch_size=36, **kw)
    ddp = ranks[0]
    np.testing.assert_allclose(ddp["history"]["train_loss"], one.history_["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(ddp["history"]["valid_loss"], one.history_["valid_loss"], rtol=1e-4)
    for k, v in one.model_.state_dict().items():
        torch.testing.assert_close(ddp["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    np.testing.assert_allclose(ddp["test_logits"], one.decision_function(data.paths("test")), atol=1e-4)

    # each validation image counted once: the best epoch's numbers are those of the model fit() kept
    assert ddp["best_epoch"] == one.best_epoch_
    best = ddp["best_epoch"] - 1
    y = torch.as_tensor(np.searchsorted(one.classes_, data.labels("valid")))
    logits = torch.as_tensor(ddp["valid_logits"])
    assert ddp["history"]["valid_loss"][best] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert ddp["history"]["valid_acc"][best] == pytest.approx(float((logits.argmax(1) == y).float().mean()))


def test_lightnings_advert_for_a_logging_service_is_not_shown():
    """Every fit printed "💡 Tip: For seamless cloud logging ... try installing litlogger" on the user's screen."""
    import logging

    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    import transferlab.finetune.tuner  # noqa: F401  (installs the filter)

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler, loggers = Keep(), [logging.getLogger("lightning.pytorch"), logging.getLogger("lightning.fabric")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing litlogger")
        rank_zero_info("GPU available: False, used: False")
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    assert seen == ["GPU available: False, used: False"]
