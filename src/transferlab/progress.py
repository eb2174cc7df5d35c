"""The progress display of every long stage (rich): extraction, heads, analysis, report; and, before the first of
them, a transient spinner line saying what a command is doing while it starts (`starting`): importing torch and
timm, reading the data folder and loading the backbone took ~6 s with nothing on screen.

Rich shrinks every column of a bar that is wider than the terminal, the numbers included: on an 80-column
terminal (or a CI log, which rich renders 80 wide) a study's bar read "105/…  0:00:…  -:--:…", no count and no
ETA. Here only the description gives way (cut with an ellipsis) and the bar is shorter on narrow screens, so the
count, elapsed time and ETA always show whole.
"""

from __future__ import annotations

from contextlib import contextmanager

from rich import get_console
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn
from rich.table import Column

STATS_WIDTH = 34  # room kept for a spinner and the columns after the bar: "1234/1234", a rate or a time, an ETA


_startup: dict = {}  # the spinner `starting` shows, until `started` or the first progress bar


def starting(text: str, enabled: bool = True, console: Console | None = None) -> None:
    """Show `text` on a transient spinner line (or change the one shown): what a command does before its first
    progress bar. Only on a terminal; `progress()` and `started()` take it away."""
    if not enabled:
        return
    if "status" in _startup:
        _startup["status"].update(text)
        return
    console = console or get_console()
    if not console.is_terminal:
        return
    status = console.status(text)
    status.start()
    _startup["status"] = status


def started() -> None:
    """Take the `starting` spinner away (nothing if none is shown)."""
    status = _startup.pop("status", None)
    if status is not None:
        status.stop()


def progress(*stats: ProgressColumn, enabled: bool = True, spinner: bool = False, console: Console | None = None):
    """A `rich.progress.Progress`: [spinner] description, bar, then `stats` (counts, times) never cut. The description
    column is at most as wide as what the terminal leaves (read once, here); `console`: rich's own by default. A
    `starting` spinner is taken away first (rich shows one live display at a time)."""
    started()
    console = console or get_console()  # the one a Progress writes to by default
    bar = 30 if console.width >= 110 else 10
    text = Column(no_wrap=True, overflow="ellipsis", max_width=max(12, console.width - bar - STATS_WIDTH))
    columns = [SpinnerColumn()] if spinner else []
    columns += [TextColumn("[bold]{task.description}", table_column=text), BarColumn(bar_width=bar), *stats]
    return Progress(*columns, disable=not enabled, transient=False, console=console)


@contextmanager
def paused(bar: Progress):
    """`bar`'s live display stopped for the block and started again after it, below what the block printed: for
    a block that shows a rich display of its own. Lightning's RichProgressBar (fine-tuning) clears whatever live
    display it finds on rich's console when it starts, so a study's display left running under it fails when it
    stops ("pop from empty list"), after all the run's work."""
    if not bar.live.is_started:
        yield
        return
    bar.stop()
    try:
        yield
    finally:
        bar.start()
