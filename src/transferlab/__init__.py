"""transferlab: transfer learning for image classification."""

# Import order, for speed: skops.io (the format of the head cache and bundles), on its first import, finds each of
# scipy.special's ~260 ufuncs by scanning sys.modules in import order. Loaded before torch's ~2000 modules,
# scipy.special is found within the first few hundred: 0.2-0.3 s instead of 0.8-1.9 s, once per run.
import scipy.special  # noqa: F401, E402

__version__ = "0.1.0"


def run(data, out="runs/study", **settings) -> dict:
    """`transferlab run DATA --out OUT` from Python: `settings` are `transferlab.study.StudyConfig`'s fields
    (methods, input_size, time_budget, preset, cache_dir, progress, ...). Writes the run folder and returns what
    metrics.json holds; `transferlab.load(out)` then loads the selected model."""
    from .study import StudyConfig, run_study

    return run_study(StudyConfig(data=str(data), out=str(out), **settings))


def load(path, **kwargs):
    """Load a saved model bundle (see `transferlab.bundle.load`): `transferlab.load(DIR).predict(images)`."""
    from .model.bundle import load as _load

    return _load(path, **kwargs)
