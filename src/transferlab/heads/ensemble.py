"""The `ensemble` method: a soft vote of the tuned heads (`heads.tuned`), nested inside CV under `cv`."""

from __future__ import annotations

import inspect
import time

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted

from ..warning_filters import warning_filter
from .inputs import eval_set_inputs, fit_inputs
from .paths import EnsemblePath
from .registry import register
from .search import ValidationSearch, fixed, score
from .tuned import TUNED, make_tuned

ENSEMBLE_MEMBERS = ("svm_tuned", "logreg", "lda")


def _same_params(a, b) -> bool:
    """The same estimator class with the same hyperparameters, nested ones included (as the head cache keys them)."""
    return type(a) is type(b) and a.__repr__(N_CHAR_MAX=10**9) == b.__repr__(N_CHAR_MAX=10**9)


class SoftVoteEnsemble(ClassifierMixin, BaseEstimator):
    """Soft vote: the mean of the member heads' `predict_proba` (equal weights); predicts its argmax.

    `members` names tuned heads (`TUNED`), each built as `make_tuned(name, seed=, epochs=, scoring=,
    flip_train=)` with `cv=0`: `fit(X, y, eval_set=valid)` tunes every member on the validation split
    exactly as it is tuned alone; without `eval_set` each member tunes on its stratified holdout of (X, y)
    and refits its winner on all of (X, y). An entry may also be a (name, unfitted estimator) pair, which
    is fitted as it is (`fixed` builds such an ensemble: members with their chosen hyperparameters). Every
    member is checked to give probabilities over the same `classes_` (np.unique(y), in that order).

    Honest numbers (`make_ensemble`): under the validation-split protocol the ensemble's validation score is
    its vote on the split its members tuned on, so it is optimistic in the same way as every tuned head's
    (the best point of each member's grid); no ensemble-level choice is made on it (fixed members, equal
    weights). Under `cv`=K the ensemble is wrapped in `ValidationSearch(ensemble, [{}], cv=K)`: each outer
    fold fits a fresh ensemble whose members tune on a holdout of that fold's training part only, so its
    score is pooled out-of-fold predictions of the whole procedure (nested), with no optimism from tuning.

    scikit-learn's `VotingClassifier(voting="soft")` is not used: it label-encodes `y` but would pass
    `eval_set` labels unencoded, and (1.9) routes `eval_set` to members only with global metadata routing.
    After fit: `members_` (fitted), `names_`, `classes_`, `best_params_` (each member's choice, keyed
    "member.param"), `best_valid_` (the vote's scores on `eval_set`, None without), `validation_`,
    `search_seconds_`; `summary()` as a `ValidationSearch`'s, with every member's under "members".
    """

    def __init__(
        self,
        members: tuple = ENSEMBLE_MEMBERS,
        seed: int = 0,
        epochs: int = 50,
        scoring: str = "macro_f1",
        flip_train: bool = False,
    ):
        self.members = members
        self.seed = seed
        self.epochs = epochs
        self.scoring = scoring
        self.flip_train = flip_train

    def _build(self) -> list[tuple[str, object]]:
        out = []
        for m in self.members:
            if isinstance(m, str):
                if m not in TUNED:
                    raise ValueError(f"ensemble member '{m}' is not a tuned head (known: {', '.join(TUNED)})")
                out.append(
                    (
                        m,
                        make_tuned(
                            m,
                            seed=self.seed,
                            epochs=self.epochs,
                            scoring=self.scoring,
                            cv=0,
                            flip_train=self.flip_train,
                        ),
                    )
                )
            else:
                name, est = m
                out.append((str(name), clone(est)))
        names = [n for n, _ in out]
        if not out or len(set(names)) != len(names):
            raise ValueError(f"ensemble members must be distinct and at least one, got {names}")
        return out

    def fit(self, X, y, eval_set: tuple | None = None, prefit: dict | None = None):
        """`prefit`: {member name: estimator already fitted on exactly these X, y and eval_set}, e.g. the study's
        final fit of that method; it is used as it is when its hyperparameters equal the member's (the same
        repr), so a vote of heads the study fitted anyway costs no refit. Anything else is fitted here."""
        t0 = time.perf_counter()
        X, y = fit_inputs(self, X, y)
        eval_set = eval_set_inputs(self, eval_set)
        self.classes_ = np.unique(y)
        members = self._build()
        fitted = []
        self.reused_ = []
        for i, (name, est) in enumerate(members):
            done = (prefit or {}).get(name)
            if done is not None and _same_params(done, est):
                members[i] = (name, done)
                est = done
                self.reused_.append(name)
            else:
                kw = (
                    {"eval_set": eval_set}
                    if eval_set is not None and "eval_set" in inspect.signature(est.fit).parameters
                    else {}
                )
                try:
                    with warning_filter("ignore", ConvergenceWarning):
                        est.fit(X, y, **kw)
                except ValueError as exc:  # e.g. LDA on one image per class: say which member could not fit
                    raise ValueError(f"ensemble member {name}: {exc}") from exc
            if not np.array_equal(np.asarray(est.classes_), self.classes_):
                raise ValueError(
                    f"ensemble member {name} learned classes {list(est.classes_)}, not {list(self.classes_)}"
                )
            if not hasattr(est, "predict_proba"):
                raise AttributeError(
                    f"ensemble member {name} has no predict_proba (e.g. an SVM with "
                    f"probability=False): the vote needs its probabilities"
                )
            p = est.predict_proba(X[:2])
            if p.shape != (min(2, len(X)), len(self.classes_)) or not np.allclose(p.sum(1), 1, atol=1e-4):
                raise ValueError(
                    f"ensemble member {name}: predict_proba gives shape {p.shape} / rows not summing "
                    f"to 1, expected probabilities over {len(self.classes_)} classes"
                )
            fitted.append(est)
        self.names_, self.members_ = [n for n, _ in members], fitted
        self.best_params_ = {
            f"{n}.{k.split('__')[-1]}": v
            for n, m in zip(self.names_, fitted)
            for k, v in getattr(m, "best_params_", {}).items()
        }
        self.validation_ = "; ".join(sorted({getattr(m, "validation_", "fixed hyperparameters") for m in fitted}))
        has_valid = eval_set is not None and len(eval_set[1])
        self.best_valid_ = score(eval_set[1], self.predict(eval_set[0])) if has_valid else None
        self.best_score_ = self.best_valid_[self.scoring] if self.best_valid_ else None
        self.search_seconds_ = time.perf_counter() - t0
        return self

    def fixed(self):
        """This vote with every fitted member fixed at its chosen hyperparameters (with probabilities, which the
        vote needs), unfitted; unfitted, a clone of itself (`heads.search.fixed`)."""
        if not hasattr(self, "members_"):
            return clone(self)
        return clone(self).set_params(
            members=tuple((n, fixed(m, proba=True)) for n, m in zip(self.names_, self.members_))
        )

    def _probas(self, X) -> np.ndarray:
        check_is_fitted(self, "members_")
        out = []
        for name, m in zip(self.names_, self.members_):
            p = np.asarray(m.predict_proba(X), dtype=np.float64)
            if p.shape != (len(p), len(self.classes_)):
                raise ValueError(
                    f"ensemble member {name}: predict_proba has {p.shape[1]} columns, expected {len(self.classes_)}"
                )
            out.append(p)
        return np.stack(out)

    def predict_proba(self, X):
        return self._probas(X).mean(axis=0)

    def predict(self, X):
        p = self.predict_proba(X)  # NotFittedError before fit
        return self.classes_[p.argmax(axis=1)]

    def summary(self) -> dict:
        """What the members chose (the keys of `ValidationSearch.summary`), each member's summary under "members"."""
        check_is_fitted(self, "members_")
        members = {n: m.summary() for n, m in zip(self.names_, self.members_) if hasattr(m, "summary")}
        return {
            "best_params": self.best_params_,
            "valid": self.best_valid_,
            "scoring": self.scoring,
            "validation": self.validation_,
            "grid_points": sum(s["grid_points"] for s in members.values()),
            "failed": sum(s["failed"] for s in members.values()),
            "search_seconds": self.search_seconds_,
            "results": [],
            "members": members,
        }


@register(
    "ensemble",
    kind="ensemble",
    exportable=False,
    class_weights=True,
    cost="minutes",
    default=True,
    cv=EnsemblePath(ENSEMBLE_MEMBERS),
    description="soft vote (mean probabilities) of the tuned heads "
    + ", ".join(ENSEMBLE_MEMBERS)
    + "; nested under --cv",
)
def make_ensemble(
    *,
    seed: int = 0,
    epochs: int = 50,
    scoring: str = "macro_f1",
    cv: int = 0,
    flip_train: bool = False,
    members: tuple = ENSEMBLE_MEMBERS,
    **_,
):
    """The `ensemble` head: a `SoftVoteEnsemble`; with `cv` >= 2 inside a one-point `ValidationSearch`, so
    its CV score is nested (members re-tuned inside every outer fold; see `SoftVoteEnsemble`)."""
    ens = SoftVoteEnsemble(members=members, seed=seed, epochs=epochs, scoring=scoring, flip_train=flip_train)
    return ValidationSearch(ens, [{}], scoring=scoring, cv=cv, seed=seed) if cv and cv >= 2 else ens
