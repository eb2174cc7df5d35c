from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from transferlab.heads import make_head
from transferlab.heads.seed import SoftmaxHead, _Plateau, balanced_weights, fit_linear_softmax


def _blobs(n_per=(40, 20, 6), d=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2.0, (len(n_per), d))
    X = np.concatenate([centers[k] + rng.normal(0, 1.0, (n, d)) for k, n in enumerate(n_per)]).astype(np.float32)
    y = np.concatenate([np.full(n, k) for k, n in enumerate(n_per)])
    return X, y


def test_cached_features_training_equals_training_through_frozen_backbone(tiny_backbone):
    """The seed trained its softmax layer through the frozen network; on cached features it is the same head."""
    torch.manual_seed(0)
    images = torch.randn(24, 3, *tiny_backbone.input_size)
    targets = torch.arange(24) % 3
    backbone = tiny_backbone.model.eval()
    with torch.no_grad():
        feats = backbone(images)

    torch.manual_seed(1)
    head_a = torch.nn.Linear(tiny_backbone.num_features, 3)
    torch.manual_seed(1)
    head_b = torch.nn.Linear(tiny_backbone.num_features, 3)
    hist_a = fit_linear_softmax(head_a, feats, targets, epochs=4, lr=1e-2, batch_size=8, seed=5)
    hist_b = fit_linear_softmax(head_b, images, targets, embed=backbone, epochs=4, lr=1e-2, batch_size=8, seed=5)
    torch.testing.assert_close(head_a.weight, head_b.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head_a.bias, head_b.bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hist_a["train_loss"], hist_b["train_loss"], rtol=1e-5)
    assert not torch.equal(head_a.weight, torch.nn.Linear(tiny_backbone.num_features, 3).weight)
    # BatchNorm statistics of the frozen backbone did not move
    assert all(not m.training for m in backbone.modules())


def test_softmax_head_learns_and_records_history():
    X, y = _blobs()
    head = SoftmaxHead(epochs=30, lr=1e-2, seed=0).fit(X[::2], y[::2], eval_set=(X[1::2], y[1::2]))
    h = head.history_
    assert len(h["epoch"]) == 30 and h["train_loss"][-1] < h["train_loss"][0]
    assert not np.isnan(h["valid_acc"]).any() and h["valid_acc"][-1] > 0.8
    assert (head.predict(X[1::2]) == y[1::2]).mean() > 0.8
    p = head.predict_proba(X)
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-5)
    assert p.shape == (len(X), 3)


def _seed_loop_with_torch_optim(linear, inputs, targets, epochs, lr, batch_size, seed, weight_decay=0.0, weight=None):
    """The seed's loop as it was written with torch.optim.Adam and ReduceLROnPlateau: the reference."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(linear.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    losses, lrs = [], []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        total = 0.0
        for idx in torch.randperm(len(targets), generator=gen).split(batch_size):
            loss = loss_fn(linear(inputs[idx]), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(targets))
        sched.step(losses[-1])
    return losses, lrs


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_softmax_loop_is_torch_optims_adam_and_reduce_lr_on_plateau(weight_decay):
    """The loop on NumPy arrays with its gradient written out is torch's (autograd, `torch.optim.Adam`,
    `ReduceLROnPlateau`) to float32 rounding: the same learning-rate cuts, losses and weights."""
    rng = np.random.default_rng(0)
    X = torch.from_numpy(rng.normal(size=(60, 12)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, 60))  # random labels: the loss plateaus and the lr is cut
    w = torch.tensor([1.0, 2.0, 0.5])
    torch.manual_seed(3)
    ours = torch.nn.Linear(12, 3)
    ref = torch.nn.Linear(12, 3)
    ref.load_state_dict(ours.state_dict())
    init = ours.weight.detach().clone()
    Xv, yv = X[:20] + 0.1, y[:20].flip(0)
    hist = fit_linear_softmax(
        ours, X, y, epochs=60, lr=0.3, batch_size=16, seed=2, weight_decay=weight_decay, class_weight=w, valid=(Xv, yv)
    )
    losses, lrs = _seed_loop_with_torch_optim(ref, X, y, 60, 0.3, 16, 2, weight_decay, w)
    with torch.no_grad():  # the validation loss after the last epoch: torch's weighted sum over the images
        ref_valid = torch.nn.CrossEntropyLoss(weight=w, reduction="sum")(ref(Xv), yv).item() / len(yv)
        ref_acc = (ref(Xv).argmax(1) == yv).float().mean().item()
    assert hist["valid_loss"][-1] == pytest.approx(ref_valid, rel=1e-5), (hist["valid_loss"][-1], ref_valid)
    assert hist["valid_acc"][-1] == pytest.approx(ref_acc), (hist["valid_acc"][-1], ref_acc)
    assert hist["lr"] == lrs and min(lrs) < 0.3 / 10 / 2  # cut at least twice
    np.testing.assert_allclose(hist["train_loss"], losses, rtol=1e-6)
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.bias, ref.bias, rtol=1e-5, atol=1e-6)
    assert (ours.weight - init).abs().max() > 0.1


def test_plateau_rule_is_reduce_lr_on_plateau_at_its_defaults():
    rng = np.random.default_rng(1)
    for trial in range(20):
        metrics = np.round(rng.random(80), 1) if trial % 2 else np.minimum.accumulate(rng.random(80)) * 1.00005
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.7)
        ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
        ours = _Plateau(0.7)
        for m in metrics:
            ref.step(float(m))
            ours.step(float(m))
            assert ours.lr == opt.param_groups[0]["lr"]
    assert ours.lr < 0.7


def test_softmax_fit_does_not_import_torch_dynamo():
    """Building a torch.optim optimizer imports torch._dynamo (2-3 s on 2 cores, more than the seed's 50 epochs)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from transferlab.heads.seed import SoftmaxHead\n"
        "SoftmaxHead(epochs=2).fit(np.random.rand(40, 8).astype(np.float32), np.arange(40) % 3)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_reduce_lr_on_plateau_defaults_cut_lr_by_ten():
    X, y = np.zeros((16, 4), np.float32), np.arange(16) % 2  # nothing to learn: the loss plateaus at log 2
    head = SoftmaxHead(epochs=40, lr=0.5, batch_size=16, seed=0).fit(X, y)
    lrs = head.history_["lr"]
    assert lrs[0] == 0.5 and min(lrs) < 0.5
    assert all(b in (a, pytest.approx(a * 0.1)) for a, b in zip(lrs, lrs[1:]))


def test_same_seed_same_head_other_seed_differs():
    X, y = _blobs()
    a = SoftmaxHead(epochs=3, seed=0).fit(X, y)
    b = SoftmaxHead(epochs=3, seed=0).fit(X, y)
    c = SoftmaxHead(epochs=3, seed=1).fit(X, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    assert not np.array_equal(a.coef_, c.coef_)


def test_softmax_fit_draws_its_init_from_its_own_generator_not_the_global_stream():
    # Heads are fitted side by side in threads (data-efficiency draws, CV folds): a fit that seeded torch's
    # global RNG could interleave with another's draws. The layer starts as after torch.manual_seed(seed).
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 8)).astype(np.float32), np.arange(60) % 3
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    head = SoftmaxHead(epochs=0, seed=5).fit(X, y)
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())  # the global stream is untouched
    torch.manual_seed(5)
    reference = torch.nn.Linear(8, 3)
    np.testing.assert_array_equal(head.coef_, reference.weight.detach().numpy())
    np.testing.assert_array_equal(head.intercept_, reference.bias.detach().numpy())


def test_logit_adjustment_and_balanced_weights_favour_rare_class():
    X, y = _blobs(n_per=(200, 10), d=2, seed=3)
    plain = SoftmaxHead(epochs=20, lr=1e-2, seed=0).fit(X, y)
    adjusted = clone(plain).set_params(logit_adjust=1.0).fit(X, y)
    assert (adjusted.predict(X) == 1).sum() >= (plain.predict(X) == 1).sum()
    w = balanced_weights(y, 2)
    np.testing.assert_allclose(w, [210 / (2 * 200), 210 / (2 * 10)])


def test_heads_are_sklearn_estimators():
    X, y = _blobs()
    for name in ("softmax", "svm"):
        est = make_head(name, seed=0, epochs=5)
        est2 = clone(est)
        assert est2.get_params() == est.get_params()
    search = GridSearchCV(SoftmaxHead(epochs=5), {"lr": [1e-3, 1e-2]}, cv=2, scoring="f1_macro").fit(X, y)
    assert search.best_params_["lr"] in (1e-3, 1e-2)
    svm = make_head("svm", seed=0).fit(X, y)
    assert svm.predict_proba(X).shape == (len(X), 3)
    with pytest.raises(ValueError, match="unknown method"):
        make_head("nope")


def test_svm_fits_in_threads_give_the_models_of_one_thread():
    """liblinear draws from one process-wide generator (as libsvm's Platt scaling did): fits running side by side in
    threads (CV folds, the study's final fits) must give the models they give one at a time; the SVM's probabilities
    (its calibration folds are seeded) too."""
    from concurrent.futures import ThreadPoolExecutor

    from transferlab.heads.probes import KernelSVMHead, LinearSVMHead

    rng = np.random.default_rng(0)
    X = rng.normal(size=(900, 48)).astype(np.float32)
    y = (X[:, 0] + rng.normal(size=900) > 0).astype(int) + (X[:, 1] > 0.5)

    def proba(seed):
        return KernelSVMHead(seed=seed).fit(X, y).predict_proba(X[:40])

    def linear(seed):
        return LinearSVMHead(random_state=seed, max_iter=300).fit(X, y).coef_

    for fit in (proba, linear):
        alone = [fit(s) for s in range(4)]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(fit, range(4)))
        for a, b in zip(alone, together):
            np.testing.assert_array_equal(a, b)
