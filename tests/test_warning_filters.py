"""Warning filters held in threads: none lost while a block runs, none left behind after."""

import threading
import warnings

import numpy as np
import pytest

from transferlab.heads.probes import KernelSVMHead
from transferlab.warning_filters import warning_filter

MESSAGE = "The `probability` parameter was deprecated"


def _interleaved(block):
    """Thread A enters `block()`, B enters, A exits, then B warns and exits: the schedule that loses B's filter
    when each block saves and restores the process's filter list. Returns the warnings that reached the outside."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with block():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        a_in.wait(5)
        with block():
            b_in.set()
            a_out.wait(5)
            warnings.warn(MESSAGE + " in 1.9", FutureWarning, stacklevel=1)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        threads = [threading.Thread(target=a), threading.Thread(target=b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        after = list(warnings.filters)
    return [w for w in seen if issubclass(w.category, FutureWarning)], before, after


def _catch_warnings_block():
    class Block:
        def __enter__(self):
            self.cm = warnings.catch_warnings()
            self.cm.__enter__()
            warnings.filterwarnings("ignore", message=MESSAGE, category=FutureWarning)

        def __exit__(self, *exc):
            return self.cm.__exit__(*exc)

    return Block()


def test_catch_warnings_in_threads_loses_a_filter():
    # why warning_filter exists: the same schedule with catch_warnings lets B's warning through
    leaked, _, _ = _interleaved(_catch_warnings_block)
    assert len(leaked) == 1


def test_filter_holds_while_any_thread_is_inside_and_is_removed_after():
    leaked, before, after = _interleaved(lambda: warning_filter("ignore", FutureWarning, MESSAGE))
    assert leaked == []
    assert after == before  # nothing left behind


def test_filter_matches_message_prefix_as_plain_text_and_category_only():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with warning_filter("ignore", FutureWarning, "a (b)"):
            warnings.warn("a (b) c", FutureWarning, stacklevel=1)  # ignored: prefix, parentheses taken literally
            warnings.warn("a b c", FutureWarning, stacklevel=1)  # not the prefix
            warnings.warn("a (b) c", UserWarning, stacklevel=1)  # another category
        warnings.warn("a (b) c", FutureWarning, stacklevel=1)  # after the block
    assert [(str(w.message), w.category) for w in seen] == [
        ("a b c", FutureWarning),
        ("a (b) c", UserWarning),
        ("a (b) c", FutureWarning),
    ]


def test_error_action_raises_inside_the_block_only():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserWarning, match="boom"), warning_filter("error", UserWarning):
            warnings.warn("boom", UserWarning, stacklevel=1)
        warnings.warn("boom", UserWarning, stacklevel=1)  # ignored again


def test_svm_fits_in_threads_print_no_deprecation_and_leave_filters_as_they_were():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 8)).astype(np.float32)
    y = np.repeat(np.arange(3), 20)

    def fit():
        for _ in range(3):
            KernelSVMHead(probability=True).fit(X, y)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        threads = [threading.Thread(target=fit) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        after = list(warnings.filters)
    assert [w for w in seen if MESSAGE in str(w.message)] == []
    assert after == before


def test_data_efficiency_with_one_image_per_class_warns_nothing():
    # 60 classes, k = 1: scikit-learn's "could represent a regression problem" guess reached the user's terminal
    from transferlab.evaluation.selection import data_efficiency
    from transferlab.heads.registry import make_head

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(60), 3)
    X = (rng.normal(size=(60, 16))[y] + rng.normal(size=(180, 16)) * 0.1).astype(np.float32)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        curve = data_efficiency(make_head("svm"), X, y, X, y, ks=(1, 2), repeats=1)
    assert [p["k"] for p in curve["points"]] == [1, 2, 3]
    assert [str(w.message)[:60] for w in seen] == []
