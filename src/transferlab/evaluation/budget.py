"""`--time-budget`: a wall-clock limit for a whole run, spent in order of expected cost, with what was skipped.

After AutoGluon's `time_limit`: the run does what it must (extraction, the selected method, the report) and
orders the rest by expected cost, cheapest first, so that a short budget still gives a selection among the
cheap candidates rather than half of an expensive one. What did not fit is skipped and said: metrics.json's
`budget` lists each skipped item with why, the report's notes too. A budget is not a hard stop: work already
started finishes, and a projection can be wrong; the run reports the time it took.

Shares: the cross-validated selection may run until `CV_SHARE` of the time left after extraction is spent; the
rest is kept for the final fits, the data-efficiency curve and the report.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

CV_SHARE = 0.7
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text) -> float:
    """Seconds from "90", "90s", "10m", "1.5h" (a number alone is seconds); a clear error otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|min|h)?\s*", str(text).lower())
        if not m:
            raise ValueError(f"a time budget is a duration like 90s, 10m or 1.5h, got {text!r}")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or ""]
    if not seconds > 0:
        raise ValueError(f"a time budget must be positive, got {text!r}")
    return seconds


@dataclass
class TimeBudget:
    """`seconds` of wall time from `start` (None: unlimited); `skipped`: what was left out, and why."""

    seconds: float | None
    start: float = field(default_factory=time.perf_counter)
    skipped: list[dict] = field(default_factory=list)

    @property
    def deadline(self) -> float | None:
        return None if self.seconds is None else self.start + self.seconds

    def left(self) -> float:
        """Seconds left (inf without a budget; negative once overrun)."""
        return float("inf") if self.seconds is None else self.deadline - time.perf_counter()

    def until(self, share: float) -> float | None:
        """A deadline `share` of the way through the time left now (None without a budget)."""
        if self.seconds is None:
            return None
        return time.perf_counter() + max(self.left(), 0.0) * share

    def fits(self, expected: float) -> bool:
        return expected <= self.left()

    def short(self, expected: float, what: str) -> str:
        """Why `what`, expected to take `expected` seconds, does not fit: the seconds it would need and those left,
        or by how much the budget is already spent."""
        left = self.left()
        if left <= 0:
            return f"the time budget was spent ({-left:.0f} s over) before {what}"
        return f"{what} (~{expected:.0f} s expected) did not fit the {left:.0f} s left of the time budget"

    def skip(self, what: str, why: str) -> str:
        self.skipped.append({"what": what, "why": why})
        return f"{what} skipped: {why}"

    def summary(self) -> dict | None:
        """metrics.json's `budget` (None without one)."""
        if self.seconds is None:
            return None
        return {"seconds": self.seconds, "skipped": self.skipped, "cv_share": CV_SHARE}
