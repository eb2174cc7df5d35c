"""Heads: classifiers fitted on cached features, each a scikit-learn estimator, and the registry of methods.

`registry` declares every method (name -> builder and what the rest of transferlab must know); `seed` holds
the seed study's two recipes, `probes` the estimators the tuned heads are built from, `tuned` their grids,
`search` the validation/CV search that tunes them, `ensemble` the soft vote, `views` flip-augmented training,
`inputs` how every head checks its inputs (as scikit-learn's own classifiers do: each head passes
`sklearn.utils.estimator_checks`, see tests/test_sklearn_compliance.py), `serialize` how a fitted head is stored
without pickle, `cache` the on-disk cache of fitted heads.

Importing this package registers every method.
"""

from . import ensemble, seed, tuned  # noqa: F401  (registration)
from .registry import METHODS, get, make_head, names, resolve_methods  # noqa: F401
