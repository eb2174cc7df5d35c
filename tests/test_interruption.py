"""Real processes: SIGKILL mid-extraction resumes from whole chunks, Ctrl-C stops cleanly with a resume
hint, two runs share one cache at the same time, and a hard error is one line with exit code 2."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from transferlab.features.cache import _checksum

from .conftest import make_imagefolder
from .test_reliability import TINY, cli

pytestmark = pytest.mark.slow

# `python -m transferlab.cli ARGS`, with each batch slowed down (so a signal lands mid-extraction) and,
# with GO_FILE set, a start barrier (so two processes really run at the same time).
WRAPPER = """
import os, sys, time
import transferlab.features.extract as F
from transferlab.cli import main
delay, real = float(os.environ.get("SLOW_BATCH", "0")), F.forward_features
def slow(*a, **k):
    time.sleep(delay)
    return real(*a, **k)
F.forward_features = slow
import transferlab.features.runtime as R
ort_call = R.OrtBackbone.__call__
def slow_ort(self, batch):
    time.sleep(delay)
    return ort_call(self, batch)
R.OrtBackbone.__call__ = slow_ort
go = os.environ.get("GO_FILE")
if go:
    open(f"{go}.ready-{os.getpid()}", "w").close()
    while not os.path.exists(go):
        time.sleep(0.01)
sys.exit(main(sys.argv[1:]))
"""


def _start(tmp: Path, args, *, slow: float = 0.0, go: Path | None = None, **kw) -> subprocess.Popen:
    script = tmp / "wrapper.py"
    script.write_text(WRAPPER)
    env = {**os.environ, "SLOW_BATCH": str(slow), **({"GO_FILE": str(go)} if go else {})}
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        cwd=tmp,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def _chunks(cache: Path) -> list[Path]:
    return sorted(cache.glob("features/*/chunk-*.safetensors"))


def _wait_for_chunks(proc: subprocess.Popen, cache: Path, n: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while len(_chunks(cache)) < n:
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() < end, "no chunk written in time"
        time.sleep(0.02)


def _assert_chunks_intact(cache: Path) -> int:
    """Every chunk passes its SHA-256; nothing was quarantined. Returns the number of cached features."""
    n = 0
    for chunk in _chunks(cache):
        data = load_file(str(chunk))
        with safe_open(str(chunk), "np") as f:
            assert f.metadata()["sha256"] == _checksum(data["keys"], data["features"]), chunk
        n += len(data["keys"])
    assert not list(cache.rglob("*.corrupt"))
    return n


def _counts(stdout: str) -> tuple[int, int]:
    m = re.search(r"\((\d+) computed, (\d+) from cache", stdout)
    assert m, stdout
    return int(m.group(1)), int(m.group(2))


@pytest.fixture
def forty(tmp_path) -> Path:
    return make_imagefolder(tmp_path / "data", {"train": {"a": 16, "b": 14}, "test": {"a": 5, "b": 5}})


def _extract_args(data: Path, cache: Path, *extra):
    return [
        "extract",
        data,
        "--cache-dir",
        cache,
        "--batch-size",
        2,
        "--chunk-size",
        2,
        *[a if a != "1" else "0" for a in TINY],
        *extra,
    ]


def test_sigkill_mid_extraction_resumes_from_intact_chunks(tmp_path, forty):
    cache = tmp_path / "cache"
    proc = _start(tmp_path, _extract_args(forty, cache), slow=0.15)
    _wait_for_chunks(proc, cache, 2)
    proc.kill()  # SIGKILL: no handler, no flush, no cleanup
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    cached = _assert_chunks_intact(cache)
    assert 4 <= cached < 40

    rc, out, err = cli(*_extract_args(forty, cache, "--save", tmp_path / "resumed.npz"))
    computed, from_cache = _counts(out)
    assert rc == 0 and from_cache == cached and computed == 40 - cached, out + err
    assert _assert_chunks_intact(cache) == 40

    rc, out, _ = cli(*_extract_args(forty, tmp_path / "fresh", "--save", tmp_path / "fresh.npz"))
    assert rc == 0 and _counts(out) == (40, 0)
    resumed, fresh = np.load(tmp_path / "resumed.npz"), np.load(tmp_path / "fresh.npz")
    assert resumed["paths"].tolist() == fresh["paths"].tolist()
    np.testing.assert_allclose(resumed["features"], fresh["features"], rtol=1e-5, atol=1e-6)


def _terminal_sigint() -> None:
    """In the child before exec: SIGINT's default action, unblocked, as an interactive shell starts a command."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_cleanly_with_resume_hint(tmp_path, forty):
    cache = tmp_path / "cache"
    args = [a if a != "0" else "1" for a in _extract_args(forty, cache)]  # one DataLoader worker, as by default
    # 0.5 s per batch of 2: 20 batches take >= 5 s even over two ONNX Runtime lanes, so the signal sent after the
    # first chunk lands mid-extraction on a fast or a loaded machine (at 0.15 s a busy CI machine once finished first)
    # The child starts with SIGINT as a terminal gives it: default action, unblocked. A signal ignored or blocked in
    # the parent would be inherited (a full CI run once had the child finish with exit 0, the signal never seen).
    parent = f"parent: SIGINT handler {signal.getsignal(signal.SIGINT)}, blocked {signal.pthread_sigmask(signal.SIG_BLOCK, [])}"
    proc = _start(tmp_path, args, slow=0.5, start_new_session=True, preexec_fn=_terminal_sigint)
    _wait_for_chunks(proc, cache, 1)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"{err}\n{parent}"
    assert "interrupted" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err + out
    kept = _assert_chunks_intact(cache)
    rc, out, _ = cli(*_extract_args(forty, cache))
    assert rc == 0 and _counts(out) == (40 - kept, kept) and kept >= 2


def test_two_runs_share_one_cache_at_the_same_time(tmp_path, forty):
    cache, go = tmp_path / "cache", tmp_path / "go"
    procs = [
        _start(tmp_path, _extract_args(forty, cache, "--save", tmp_path / f"run{i}.npz"), slow=0.1, go=go)
        for i in range(2)
    ]
    end = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready-*"))) < 2:  # both imported and waiting: start them together
        assert time.monotonic() < end and all(p.poll() is None for p in procs)
        time.sleep(0.02)
    go.touch()
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    computed = [_counts(out)[0] for out, _ in results]
    assert min(computed) > 0 and sum(computed) >= 40  # they really overlapped: both were still computing
    a, b = np.load(tmp_path / "run0.npz"), np.load(tmp_path / "run1.npz")
    assert a["paths"].tolist() == b["paths"].tolist()
    np.testing.assert_allclose(a["features"], b["features"], rtol=1e-6, atol=1e-7)
    assert _assert_chunks_intact(cache) >= 40
    assert not [
        p for p in cache.rglob("*") if p.is_file() and p.suffix not in (".safetensors", ".json", ".lock", ".onnx")
    ]
    rc, out, _ = cli(*_extract_args(forty, cache, "--save", tmp_path / "third.npz"))
    assert rc == 0 and _counts(out) == (0, 40)
    np.testing.assert_allclose(np.load(tmp_path / "third.npz")["features"], a["features"], rtol=1e-6, atol=1e-7)


def test_hard_error_in_a_real_process_is_one_line_and_exit_2(tmp_path):
    data = make_imagefolder(tmp_path / "one", {"train": {"only": 3}})
    proc = subprocess.run(
        [sys.executable, "-m", "transferlab.cli", "extract", str(data), "--cache-dir", str(tmp_path / "c"), *TINY],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"transferlab: error: {data} has a single class (only): a classifier needs at least two"
    ]
    assert "Traceback" not in proc.stdout + proc.stderr
