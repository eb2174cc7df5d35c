"""Small formatters every report shares: numbers, durations, p-values, intervals and markdown tables.

report.md, report.html, the terminal summary and `transferlab compare` all print numbers through these
functions, so a value reads the same everywhere ("–" where there is none).
"""

from __future__ import annotations

import math
import numbers

MISSING = "–"


def _missing(v) -> bool:
    return v is None or (isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) and math.isnan(v))


def number(v, digits: int = 3) -> str:
    """A real number to `digits` decimals; integers and strings as they are; "–" for None or NaN."""
    if _missing(v):
        return MISSING
    if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):
        return f"{v:.{digits}f}"
    return str(v)


def seconds(s) -> str:
    """A duration: "12.34 s" under two minutes, else "3m 20s"; "–" for None or NaN."""
    if _missing(s):
        return MISSING
    return f"{s:.2f} s" if s < 120 else f"{int(s // 60)}m {s % 60:.0f}s"


def p_value(p: float) -> str:
    """A p-value: two significant digits below 0.001, else three decimals."""
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def interval(v, ci: list | tuple | None, digits: int = 3) -> str:
    """A value with its interval, "0.812 [0.770, 0.850]"; the value alone without one; "–" without a value."""
    if _missing(v):
        return MISSING
    if not ci:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _is_number(cell: str) -> bool:
    try:
        float(cell.replace(",", "").rstrip("%"))
        return True
    except ValueError:
        return False


def markdown_table(rows: list[list[str]]) -> str:
    """A GitHub markdown table; the first row is the header, numeric columns are right-aligned."""
    width = max(len(r) for r in rows)
    cells = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] + [""] * (width - len(r)) for r in rows]
    header, body = cells[0], cells[1:]
    align = []
    for j in range(width):
        column = [r[j] for r in body if r[j] not in ("", MISSING, "-")]
        align.append("---:" if column and all(_is_number(c) for c in column) else "---")
    lines = [header, align, *body]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)
