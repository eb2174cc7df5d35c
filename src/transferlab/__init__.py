"""transferlab: transfer learning for image classification."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a saved model bundle (see `transferlab.bundle.load`): `transferlab.load(DIR).predict(images)`."""
    from .model.bundle import load as _load

    return _load(path, **kwargs)
