"""The seed study's two heads, registered as the methods `softmax` and `svm`.

`softmax` is the seed's Model 1 (a linear softmax layer, Adam lr 1e-4, ReduceLROnPlateau on the
training loss with PyTorch's defaults, 50 epochs); `svm` is its Model 2 (`SVC(kernel="rbf")`).
Because they train on cached features, the softmax head costs seconds instead of re-running the
backbone every epoch; `fit_linear_softmax` is the one loop used both on features and through a
frozen backbone, which is how tests prove the two give the same head.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from threadpoolctl import threadpool_limits
from torch import nn

from .inputs import eval_set_inputs, fit_inputs, predict_inputs
from .paths import KERNEL_MAX_ROWS, FoldPath, rbf_fold
from .probes import KernelSVMHead
from .registry import register
from .views import ViewAugmented


class _Plateau:
    """`torch.optim.lr_scheduler.ReduceLROnPlateau` at its defaults (mode "min", factor 0.1, patience 10, relative
    threshold 1e-4, no cooldown, min_lr 0, eps 1e-8) on a plain learning rate `lr` (tested step for step against
    it). The scheduler needs an optimizer object, and building any `torch.optim` optimizer imports torch._dynamo
    (`add_param_group` is wrapped by it): 1-2 s of every run on the 2-core benchmark machine, about as long as the
    50 epochs on 2,700 images; `fit_linear_softmax` has no optimizer object (`_Adam`)."""

    factor, patience, threshold, eps = 0.1, 10, 1e-4, 1e-8

    def __init__(self, lr: float):
        self.lr, self.best, self.bad_epochs = float(lr), math.inf, 0

    def step(self, metric: float) -> None:
        if float(metric) < self.best * (1.0 - self.threshold):
            self.best, self.bad_epochs = float(metric), 0
        else:
            self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            new = max(self.lr * self.factor, 0.0)
            if self.lr - new > self.eps:
                self.lr = new
            self.bad_epochs = 0


class _Adam:
    """`torch.optim.Adam`'s update at its defaults (no amsgrad, L2 `weight_decay` added to the gradient), on float32
    NumPy arrays in place: each step the formula of torch's single-tensor implementation, in the same order."""

    def __init__(self, params: list[np.ndarray], weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.weight_decay, self.betas, self.eps = params, weight_decay, betas, eps
        self.m = [np.zeros_like(q) for q in params]
        self.v = [np.zeros_like(q) for q in params]
        self.t = 0

    def step(self, grads: list[np.ndarray], lr: float) -> None:
        b1, b2 = self.betas
        self.t += 1
        step_size = lr / (1 - b1**self.t)
        bc2_sqrt = (1 - b2**self.t) ** 0.5
        for q, g, m, v in zip(self.params, grads, self.m, self.v):
            if self.weight_decay:
                g = g + np.float32(self.weight_decay) * q
            m += np.float32(1 - b1) * (g - m)  # exp_avg.lerp_(grad, 1 - beta1)
            v *= np.float32(b2)
            v += np.float32(1 - b2) * g * g  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = np.sqrt(v) / np.float32(bc2_sqrt) + np.float32(self.eps)
            q -= np.float32(step_size) * (m / denom)  # param.addcdiv_(exp_avg, denom, value=-step_size)


def _nll(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's cross-entropy -log softmax(z)[y], and softmax(z)."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=1, keepdims=True)
    return np.log(total[:, 0]) - z[np.arange(len(y)), y], e / total


def _cross_entropy(z: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> tuple[float, np.ndarray]:
    """`nn.CrossEntropyLoss(weight=w)` (mean reduction: the class-weighted mean) of logits z for labels y, and its
    gradient with respect to z."""
    nll, g = _nll(z, y)
    g[np.arange(len(y)), y] -= 1
    wi = np.ones(len(y), np.float32) if w is None else w[y]
    norm = wi.sum()
    g *= (wi / norm)[:, None]
    return float((wi * nll).sum() / norm), g


def fit_linear_softmax(
    linear: nn.Linear,
    inputs,
    targets,
    *,
    embed=None,
    epochs: int = 50,
    lr: float = 1e-4,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    class_weight=None,
    seed: int = 0,
    valid: tuple | None = None,
) -> dict[str, list[float]]:
    """Train `linear` with the seed's recipe on features, or through a frozen network: `embed(batch)` maps a batch of
    inputs to their features (default: the inputs are features).

    The loop of `torch.optim.Adam` + `ReduceLROnPlateau` + `nn.CrossEntropyLoss(weight=class_weight)` over mini-batches
    of `torch.randperm(generator=seeded)`, its gradient written out (a linear layer's: no autograd) and every step
    on float32 NumPy arrays: on the seed's batches of 32, torch spent ~0.35 ms a step dispatching a dozen small
    operators (forward, autograd, Adam's update), 3-4x the arithmetic (tests compare it with torch's loop: the same
    weights to float32 rounding). Returns the per-epoch history: epoch, train_loss, train_acc (over the epoch's
    mini-batches), valid_loss, valid_acc (after the epoch, NaN without validation data) and lr (used in the epoch).
    """

    def features(x) -> np.ndarray:
        if embed is not None:
            with torch.no_grad():
                x = embed(x)
        return np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)

    W = linear.weight.detach().numpy().astype(np.float32, copy=True)
    b = linear.bias.detach().numpy().astype(np.float32, copy=True)
    y = np.asarray(targets.numpy() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64)
    w = None if class_weight is None else np.asarray(class_weight, dtype=np.float32)
    X = features(inputs) if embed is None else None  # through a network: embedded batch by batch
    vX = vy = None
    if valid is not None and len(valid[1]):
        vX, vy = features(valid[0]), np.asarray(valid[1], dtype=np.int64)
    gen = torch.Generator().manual_seed(seed)
    adam, sched = _Adam([W, b], weight_decay), _Plateau(lr)
    n = len(y)
    history: dict[str, list[float]] = {
        k: [] for k in ("epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "lr")
    }
    for epoch in range(1, epochs + 1):
        history["lr"].append(sched.lr)
        total_loss, correct = 0.0, 0
        order = torch.randperm(n, generator=gen)
        Xe = X[order.numpy()] if X is not None else None  # one gather per epoch; batches are then views
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb = Xe[start : start + batch_size] if Xe is not None else features(inputs[idx])
            yb = y[idx.numpy()]
            z = xb @ W.T + b
            loss, g = _cross_entropy(z, yb, w)
            adam.step([g.T @ xb, g.sum(axis=0)], sched.lr)
            total_loss += loss * len(yb)
            correct += int((z.argmax(axis=1) == yb).sum())
        train_loss = total_loss / n
        sched.step(train_loss)
        history["epoch"].append(epoch)
        history["train_loss"].append(train_loss)
        history["train_acc"].append(correct / n)
        vloss = vacc = math.nan
        if vX is not None:
            vz = vX @ W.T + b
            nll = _nll(vz, vy)[0]  # nn.CrossEntropyLoss(weight=w, reduction="sum") / images
            vloss = float((nll if w is None else w[vy] * nll).sum()) / len(vy)
            vacc = float((vz.argmax(axis=1) == vy).mean())
        history["valid_loss"].append(vloss)
        history["valid_acc"].append(vacc)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(W))
        linear.bias.copy_(torch.from_numpy(b))
    return history


def _seeded_linear(d: int, k: int, seed: int) -> nn.Linear:
    """`nn.Linear(d, k)` initialised as after `torch.manual_seed(seed)` (PyTorch's default init), from a generator of
    its own: fits running side by side in threads (`evaluation.threads`) do not draw from each other's stream."""
    linear = torch.nn.utils.skip_init(nn.Linear, d, k)  # its constructor would draw from the global stream
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=gen)  # nn.Linear.reset_parameters
        bound = 1 / math.sqrt(d) if d > 0 else 0
        nn.init.uniform_(linear.bias, -bound, bound, generator=gen)
    return linear


def balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """scikit-learn's 'balanced' rule: n_samples / (n_classes * count)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = len(y) / (present.sum() * counts[present])
    return w


class SoftmaxHead(ClassifierMixin, BaseEstimator):
    """A linear softmax layer trained with Adam + ReduceLROnPlateau (the seed's Model 1).

    `class_weight`: None, "balanced" (scikit-learn's rule) or a dict {label: weight} (classes it omits weigh 1),
    weighting the cross-entropy. `logit_adjust` (tau) subtracts tau * log(class prior) from the logits at
    prediction time (Menon et al., 2021), which favours rare classes. `history_` holds the per-epoch curves
    when `fit` is given validation data through `eval_set`. Labels may be any sortable values (`classes_`);
    `decision_function` gives the (adjusted) logits, or for two classes, as scikit-learn's binary classifiers
    do, one score per image: logit(classes_[1]) - logit(classes_[0]).
    """

    def __init__(
        self,
        epochs: int = 50,
        lr: float = 1e-4,
        batch_size: int = 32,
        weight_decay: float = 0.0,
        class_weight: str | dict | None = None,
        logit_adjust: float = 0.0,
        seed: int = 0,
    ):
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.class_weight = class_weight
        self.logit_adjust = logit_adjust
        self.seed = seed

    def _class_weights(self, y_idx: np.ndarray) -> np.ndarray | None:
        k = len(self.classes_)
        if self.class_weight is None:
            return None
        if isinstance(self.class_weight, str) and self.class_weight == "balanced":
            w = balanced_weights(y_idx, k)
        elif isinstance(self.class_weight, dict):
            w = np.array([float(self.class_weight.get(c, 1.0)) for c in self.classes_.tolist()])
        else:
            raise ValueError(
                f"class_weight must be None, 'balanced' or a dict of label -> weight, got {self.class_weight!r}"
            )
        return w.astype(np.float32)

    def fit(self, X, y, eval_set: tuple | None = None):
        X, y = fit_inputs(self, X, y, dtype=np.float32)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        k = len(self.classes_)
        weight = self._class_weights(y_idx)
        linear = _seeded_linear(X.shape[1], k, self.seed)
        valid = None
        eval_set = eval_set_inputs(self, eval_set, dtype=np.float32)
        if eval_set is not None:
            Xv, yv = eval_set
            keep = np.isin(yv, self.classes_)
            valid = (Xv[keep], np.searchsorted(self.classes_, yv[keep]))
        with threadpool_limits(1, user_api="blas"):  # products of 32 rows: more threads only spin
            self.history_ = fit_linear_softmax(
                linear,
                X,
                y_idx,
                epochs=self.epochs,
                lr=self.lr,
                batch_size=self.batch_size,
                weight_decay=self.weight_decay,
                class_weight=weight,
                seed=self.seed,
                valid=valid,
            )
        self.coef_ = linear.weight.detach().numpy().copy()
        self.intercept_ = linear.bias.detach().numpy().copy()
        prior = np.bincount(y_idx, minlength=k) / len(y_idx)
        self.log_prior_ = np.log(np.maximum(prior, 1e-12))
        return self

    def _logits(self, X) -> np.ndarray:
        # float32 features (the cache's) give float32 products, as always; float64 ones are not rounded to float32
        X = predict_inputs(self, X, dtype=(np.float32, np.float64))
        return X @ self.coef_.T + self.intercept_ - self.logit_adjust * self.log_prior_

    def decision_function(self, X):
        z = self._logits(X)
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict_proba(self, X):
        return softmax(self._logits(X), axis=1)

    def predict(self, X):
        z = self._logits(X)  # NotFittedError before fit
        return self.classes_[z.argmax(axis=1)]


def seed_svm(seed: int = 0):
    """The seed's Model 2: an RBF SVM with scikit-learn's defaults, `SVC(kernel="rbf", gamma="scale", C=1)`,
    with probabilities by temperature scaling (`heads.pairwise`).

    Fitted as `KernelSVMHead` fits: the same libsvm model on a kernel matrix computed with BLAS (gamma="scale" is
    gamma_scale=1, no class weights, no standardisation), ~5x faster than libsvm computing kernel rows itself
    (measured: 3100 x 1280 boats16 features, with the five extra fits of the Platt scaling it then had, 14.8 s -> see the tests for
    the equality with `SVC`). Predictions are SVC's own, exactly as with `probability=False`; the probabilities are
    only used for ranking and reports.
    """
    return KernelSVMHead(C=1.0, gamma_scale=1.0, class_weight=None, probability=True, seed=seed)


def _maybe_views(est, flip_train: bool):
    return ViewAugmented(est) if flip_train else est


@register(
    "softmax",
    kind="seed",
    exportable=True,
    class_weights=False,
    cost="seconds",
    default=True,  # a baseline of the default run, not a candidate: 50 epochs x every fold would cost more than
    # all the candidates together, and on cached features it has never come within the SE of the best
    description="the seed's Model 1: a linear softmax layer, Adam (lr 1e-4), mini-batches of 32, "
    "ReduceLROnPlateau on the training loss, 50 epochs",
)
def seed_softmax(*, seed: int = 0, epochs: int = 50, flip_train: bool = False, **_):
    return _maybe_views(SoftmaxHead(epochs=epochs, seed=seed), flip_train)


@register(
    "svm",
    kind="seed",
    exportable=False,
    class_weights=False,
    cost="seconds",
    default=True,
    cv=FoldPath(
        [{}],
        partial(rbf_fold, standardise=False, class_weight=None),
        False,
        lambda seed, epochs: seed_svm(seed),
        max_rows=KERNEL_MAX_ROWS,
        temperature_param="temperature",
    ),
    description="the seed's Model 2: SVC(kernel=\"rbf\") with scikit-learn's defaults",
)
def seed_svm_method(*, seed: int = 0, flip_train: bool = False, **_):
    return _maybe_views(seed_svm(seed), flip_train)
