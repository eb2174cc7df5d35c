"""The progress bars stay readable on narrow terminals: only the description gives way, never the numbers."""

from __future__ import annotations

import io
import re

import pytest
import rich
from rich.console import Console

from transferlab.features.extract import extract_features
from transferlab.study import _progress

COUNT_TIMES = re.compile(r"\d+/\d+ +\d+:\d\d:\d\d +(-:--:--|\d+:\d\d:\d\d)$")  # count, elapsed, ETA, whole


@pytest.fixture
def screen(monkeypatch):
    """rich's global console (the one every bar writes to by default), `width` columns wide, not a terminal (as
    in a CI log); returns a function that gives what was written."""

    def make(width: int):
        out = io.StringIO()
        monkeypatch.setattr(rich, "_console", Console(file=out, width=width, force_terminal=False))
        return out.getvalue

    return make


@pytest.mark.parametrize("width", [60, 80, 100])
def test_the_study_bar_shows_count_elapsed_and_eta_whole_at_any_width(screen, width):
    written = screen(width)
    with _progress(True) as bar:
        bar.add_task("selection: 3 x 5-fold stratified CV on train + valid", total=105, completed=40)
        bar.add_task("heads: svm_tuned (+ softmax, svm alongside)", total=6, completed=2)
    lines = [ln.rstrip() for ln in written().splitlines() if ln.strip()]
    assert len(lines) == 2, lines  # one line per task: nothing wrapped
    assert all(len(ln) <= width for ln in lines), lines
    assert all(COUNT_TIMES.search(ln) for ln in lines), lines
    assert "40/105" in lines[0] and "2/6" in lines[1]
    assert lines[0].split()[1] == "selection:"  # the description is cut at its end, not dropped


def test_the_extraction_bar_shows_count_and_rate_whole_at_60_columns(screen, small_folder, tiny_backbone, cache_dir):
    written = screen(60)
    paths = sorted(small_folder.rglob("*.png"))[:6]
    extract_features(paths, tiny_backbone, cache_dir=cache_dir, progress=True, num_workers=0, description="features")
    (line,) = [ln.rstrip() for ln in written().splitlines() if ln.strip()]
    assert len(line) <= 60
    assert re.search(rf"{len(paths)}/{len(paths)} +\d+\.\d img/s +\d+:\d\d:\d\d$", line), line


def test_the_summary_prints_the_stage_times_on_one_line(monkeypatch, capsys):
    from transferlab.report.writer import console_summary

    monkeypatch.setenv("COLUMNS", "80")
    stages = {"extract": 2.18, "heads": 9.66, "analysis": 0.91, "report": 3.1, "total": 15.86}
    metric = {"accuracy": 0.7, "macro_f1": 0.6, "balanced_accuracy": 0.6, "train_seconds": 1.0, "predict_seconds": 0.1}
    console_summary({"backbone": "b", "input_size": [128, 128], "methods": {"lda": metric}, "timings": stages})
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("time:")]
    assert line.endswith("total 15.86 s"), line


def _terminal():
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=True, width=100)


def test_a_command_shows_what_it_does_while_it_starts_and_gives_way_to_the_first_bar():
    # `transferlab run` showed nothing for ~6 s (imports, reading the folder, loading the backbone) before its
    # first bar; now a spinner line says what it is doing, and the first progress bar replaces it.
    from transferlab import progress as prog

    console = _terminal()
    prog.starting("starting: loading torch", console=console)
    prog.starting("starting: reading data")  # the same line, new text
    assert prog._startup["status"].status == "starting: reading data"
    with prog.progress(console=console) as bar:  # rich allows one live display: a bar after a spinner raised
        bar.add_task("features", total=1)
    assert "status" not in prog._startup
    prog.starting("quiet", enabled=False)
    assert "status" not in prog._startup


def test_a_user_error_while_starting_takes_the_spinner_away(tmp_path, monkeypatch, capsys):
    from transferlab import progress as prog
    from transferlab.cli import main

    console = _terminal()
    monkeypatch.setattr(prog, "get_console", lambda: console)
    assert main(["run", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "status" not in prog._startup and "error" in capsys.readouterr().err
    assert "starting: " in console.file.getvalue()  # (the spinner was shown)


def test_the_processes_started_for_other_devices_show_no_spinner(tmp_path, monkeypatch):
    # Lightning re-runs the command once per extra device, on the same terminal: each showed its own spinner.
    from transferlab import progress as prog
    from transferlab.cli import main

    console = _terminal()
    monkeypatch.setattr(prog, "get_console", lambda: console)
    monkeypatch.setenv("LOCAL_RANK", "1")  # set by the launcher; the process then joins the group as rank 1
    monkeypatch.setattr("transferlab.features.distributed.rank", lambda: 1)
    assert main(["run", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "starting: " not in console.file.getvalue()


def test_a_study_that_fails_while_starting_leaves_no_spinner_from_python(tmp_path, monkeypatch):
    # transferlab.run("missing") in a terminal REPL: the "reading ..." spinner went on spinning after the error.
    import transferlab
    from transferlab import progress as prog
    from transferlab.data.datasets import DatasetError

    console = _terminal()
    monkeypatch.setattr(prog, "get_console", lambda: console)
    with pytest.raises(DatasetError):
        transferlab.run(tmp_path / "missing", out=tmp_path / "out")
    assert "starting: reading" in console.file.getvalue() and "status" not in prog._startup
