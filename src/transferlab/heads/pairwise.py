"""An SVM's one-vs-one decision values: their one-vs-rest shape, and probabilities made from it.

libsvm trains one binary SVM per pair of classes; scikit-learn's `SVC` predicts by their votes. `ovr_decision` gives
its one-vs-rest values (votes plus confidences in (-1/3, 1/3): their argmax is its prediction). Probabilities are
their softmax at a temperature T fitted on held-out rows (`fit_temperature`, one parameter: temperature scaling,
Guo et al. 2017), so the most probable class is the predicted one (but on a tie of votes, which libsvm breaks by
class order and the values by their confidences). This replaces libsvm's Platt scaling
(`SVC(probability=True)`, deprecated in scikit-learn 1.9), which fits five extra SVMs per model:
`heads.probes.KernelSVMHead` fits T on out-of-fold values of its own folds, `evaluation.crossval` on the other folds'
values of its repeated CV (no fit at all). On the four benchmark sets the ensemble's CV macro-F1 with it was
0.885 / 0.932 / 0.836 (intel_scenes6 / brain_mri4 / boats16) against 0.888 / 0.927 / 0.835 with Platt scaling;
the softmax of pairwise decision sums, tried too, gave 0.886 / 0.924 / 0.826.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
from scipy.special import log_softmax, softmax


def _pairs(n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n_classes, 1)  # pair p = (i[p], j[p]), in libsvm's order; positive values favour i


def ovr_decision(ovo: np.ndarray, n_classes: int) -> np.ndarray:
    """SVC's one-vs-rest shaped decision values (votes plus confidences in (-1/3, 1/3)) from its one-vs-one ones,
    bit for bit (scikit-learn's `_ovr_decision_function`, which loops over the n(n-1)/2 pairs in Python: 0.24 s of
    a 0.47 s `decision_function` at 101 classes). Each class's confidences are summed in scikit-learn's order
    (a sequential cumulative sum), so the values, not only their argmax, are the same."""
    pairs = np.ascontiguousarray(np.asarray(ovo, dtype=np.float64).T)  # (pairs, images): whole rows gathered
    i, j = _pairs(n_classes)
    out = np.empty((pairs.shape[1], n_classes))
    for c in range(n_classes):
        as_i, as_j = np.flatnonzero(i == c), np.flatnonzero(j == c)  # k increasing in each; the j-pairs come first
        votes = (pairs[as_i] >= 0).sum(axis=0) + (pairs[as_j] < 0).sum(axis=0)
        terms = np.concatenate([-pairs[as_j], pairs[as_i]])
        conf = np.cumsum(terms, axis=0)[-1]
        out[:, c] = votes + conf / (3 * (np.abs(conf) + 1))
    return out


def per_class(decision: np.ndarray) -> np.ndarray:
    """SVC's decision values with one column per class (float64). A binary SVM's single value f (positive: the
    second class) becomes (-f/2, f/2), whose softmax is the sigmoid of f, as `ovr_decision`'s columns are for more
    classes."""
    decision = np.asarray(decision, dtype=np.float64)
    return np.stack([-decision, decision], axis=1) / 2 if decision.ndim == 1 else decision


def tempered(values: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(values / temperature) over each row; -inf columns (classes absent from the fit) get 0."""
    return softmax(np.asarray(values, dtype=np.float64) / temperature, axis=1)


def fit_temperature(values: np.ndarray, y_idx: np.ndarray) -> float:
    """The T in [1e-3, 1e3] minimising the log-loss of `tempered(values, T)` on rows with labels `y_idx` (column
    indices), plus (log T)^2 / 2: a standard normal prior on log T, which keeps T near 1 when a handful of rows
    are all predicted right (their log-loss alone falls forever as T shrinks) and weighs nothing next to hundreds.
    Rows whose true class has no finite column (absent from their fit part) are left out; none left: 1."""
    values = np.asarray(values, dtype=np.float64)
    y_idx = np.asarray(y_idx)
    rows = np.flatnonzero(np.isfinite(values[np.arange(len(y_idx)), y_idx]))
    if not len(rows):
        return 1.0
    s, y = values[rows], y_idx[rows]

    def loss(log_t: float) -> float:
        return -float(np.sum(log_softmax(s / np.exp(log_t), axis=1)[np.arange(len(y)), y])) + 0.5 * log_t**2

    res = scipy.optimize.minimize_scalar(loss, bounds=(np.log(1e-3), np.log(1e3)), method="bounded")
    return float(np.exp(res.x))
