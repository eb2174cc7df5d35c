"""Warning filters that hold inside a block, safe across threads.

`warnings.catch_warnings()` saves the process-wide filter list on entry and puts it back on exit. Two such blocks
in threads at once (heads fitted side by side, images decoded in a pool) interleave: the first to exit removes
the second's filter while it still runs (its warnings reach the user: seen with scikit-learn 1.9's `SVC(probability
=True)` FutureWarning, printed once per fit running beside another), and the last to exit can put back a list
that still holds the first's filter, which then stays for the rest of the program.

`warning_filter(action, category, message)` installs one filter per (action, category, message) when the first
block enters and removes that same filter when the last one exits, under a lock. While it is held the filter
applies to every thread of the process. transferlab leaves no filter of its own behind.
"""

from __future__ import annotations

import contextlib
import re
import threading
import warnings

_LOCK = threading.Lock()
_HELD: dict[tuple, list] = {}  # (action, category, message) -> [holders, the filter entry installed]


@contextlib.contextmanager
def warning_filter(action: str, category: type[Warning] = Warning, message: str = ""):
    """Apply `action` ("ignore", "error", ...) to warnings of `category` whose message starts with `message`
    (plain text, not a pattern) while the block runs."""
    key = (action, category, message)
    with _LOCK:
        held = _HELD.get(key)
        if held is None:
            warnings.filterwarnings(action, message=re.escape(message), category=category)
            held = _HELD[key] = [0, warnings.filters[0]]
        held[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            held[0] -= 1
            if held[0] == 0:
                del _HELD[key]
                with contextlib.suppress(ValueError):  # someone reset the filters meanwhile
                    warnings.filters.remove(held[1])
                mutated = getattr(warnings, "_filters_mutated", None)
                if mutated is not None:  # clears the per-module caches of which warnings were shown
                    mutated()


def quiet_decoding():
    """What decoding a folder of photos must not print once per photo: Pillow's "Corrupt EXIF data" UserWarning
    (a camera's malformed EXIF block; the pixels are read all the same). Held around a study, an extraction or a
    prediction."""
    return warning_filter("ignore", UserWarning, "Corrupt EXIF data")
