"""Independent fits on the cores: a pool of threads, each task with its share of BLAS, OpenMP and torch threads.

libsvm, BLAS and torch release the GIL, so threads run fits side by side without starting processes or copying
the features. While tasks run, each gets cores // n_jobs threads of every pool: one each on 2 cores, which is
also faster per task there, since idle multi-threaded pools (NumPy's and SciPy's OpenBLAS, torch's OpenMP) spin
against each other between small products. `evaluation.crossval` runs its folds this way, `evaluation.selection`
its data-efficiency fits.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch
from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits


def default_jobs(n_tasks: int) -> int:
    """One thread per core, at most one per task."""
    return max(1, min(os.cpu_count() or 1, n_tasks))


@contextmanager
def thread_budget(n_jobs: int):
    """Each of `n_jobs` concurrent tasks gets cores // n_jobs BLAS, OpenMP and torch threads (restored after)."""
    if n_jobs <= 1:
        yield
        return
    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            yield
    finally:
        torch.set_num_threads(before)


def _timed(fn, args, kw):
    t0 = time.perf_counter()
    return fn(*args, **kw), time.perf_counter() - t0


def thread_map(tasks: list, n_jobs: int):
    """(result, seconds) of each (fn, args, kwargs) task, in order, as they finish: in `n_jobs` threads, or
    in-process for one. Run it inside `thread_budget(n_jobs)`."""
    if n_jobs <= 1 or not tasks:  # (joblib warns that "0 tasks" were cancelled when given none)
        return (_timed(*t) for t in tasks)
    return Parallel(n_jobs=n_jobs, backend="threading", return_as="generator")(delayed(_timed)(*t) for t in tasks)
