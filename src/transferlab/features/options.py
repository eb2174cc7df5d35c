"""What a user chooses about extraction (precision, runtime) and the error it raises, importable without torch: the
command line's parser and its error handling need them before any model is loaded (`features.extract` uses them)."""

from __future__ import annotations

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RUNTIMES = ("auto", "torch", "onnxruntime")


class ExtractionError(RuntimeError):
    """Extraction cannot go on (e.g. --strict and an unreadable image)."""
