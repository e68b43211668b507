"""pytest plugin of the one-command GPU check (``bash .ci/gpu``); loaded with ``-p gpu_pytest_plugin``
(``.ci`` on ``PYTHONPATH``). Two jobs, neither changes what a test does:

* ``--sslops-plan=FILE``: after collection and ``-m`` deselection, write one line per
  collected test, ``SELECTED <nodeid>`` or ``DESELECTED <nodeid>``, followed by the test's
  markers (``.ci/gpu plan`` prints the GPU set from it; tests/test_gpu_tooling.py checks it).
* the worst error of each test against its reference: every ``torch.testing.assert_close``
  call (``tests.utils.assert_close`` goes through it) and every ``tests.utils.assert_error_within``
  (the 2x rule) is measured as ``max |actual - expected| / max |expected|`` (relative to the
  largest expected entry); the largest value per test is stored as the JUnit property
  ``max_rel_err``, and for the 2x rule the largest kernel error / allowed bound as
  ``rule_ratio`` (<= 1 passes), so the summary can report the worst error per family and
  backend (``.ci/gpu_summary.py``).
"""

import functools
import math
import sys

import pytest

_CURRENT = {"item": None, "worst": None, "ratio": None}


def pytest_addoption(parser):
    parser.addoption("--sslops-plan", default=None, help="write SELECTED/DESELECTED nodeids with markers to this file")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    before = list(items)
    yield
    path = config.getoption("--sslops-plan")
    if not path:
        return
    kept = {id(item) for item in items}
    with open(path, "w") as fh:
        for item in before:
            marks = sorted({m.name for m in item.iter_markers() if m.name not in ("parametrize", "usefixtures", "filterwarnings")})
            fh.write(f"{'SELECTED' if id(item) in kept else 'DESELECTED'} {item.nodeid} {','.join(marks)}\n")


def _rel_err(actual, expected):
    import torch

    if not (isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor)):
        return None
    if actual.shape != expected.shape or actual.numel() == 0 or not (actual.is_floating_point() and expected.is_floating_point()):
        return None
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    scale = float(e.abs().max())
    diff = float((a - e).abs().max())
    if not math.isfinite(diff):
        return math.inf
    return diff / scale if scale > 0 else diff


def _record(actual, expected):
    if _CURRENT["item"] is None:
        return
    try:
        err = _rel_err(actual, expected)
    except Exception:  # noqa: BLE001 - measuring must never change a test's outcome
        return
    if err is not None and (_CURRENT["worst"] is None or err > _CURRENT["worst"]):
        _CURRENT["worst"] = err


def pytest_configure(config):
    import torch.testing

    original = torch.testing.assert_close
    if getattr(original, "_sslops_measured", False):
        return

    @functools.wraps(original)
    def assert_close(actual, expected, *args, **kwargs):
        _record(actual, expected)
        return original(actual, expected, *args, **kwargs)

    assert_close._sslops_measured = True
    torch.testing.assert_close = assert_close


def pytest_sessionstart(session):
    """Measure the 2x-rule helper too, once tests/conftest.py has imported tests.utils (before the
    test modules bind its names)."""
    utils = sys.modules.get("tests.utils")
    original = getattr(utils, "assert_error_within", None)
    if original is None or getattr(original, "_sslops_measured", False):
        return

    @functools.wraps(original)
    def assert_error_within(kernel, naive, exact, *args, **kwargs):
        _record(kernel, exact)
        result = original(kernel, naive, exact, *args, **kwargs)
        try:
            err, _, bound = result
            ratio = err / bound if bound > 0 else (0.0 if err == 0 else math.inf)
            if _CURRENT["item"] is not None and (_CURRENT["ratio"] is None or ratio > _CURRENT["ratio"]):
                _CURRENT["ratio"] = ratio
        except (TypeError, ValueError):
            pass
        return result

    assert_error_within._sslops_measured = True
    utils.assert_error_within = assert_error_within


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _CURRENT.update(item=item, worst=None, ratio=None)
    try:
        yield
    finally:
        if _CURRENT["worst"] is not None:
            item.user_properties.append(("max_rel_err", f"{_CURRENT['worst']:.3e}"))
        if _CURRENT["ratio"] is not None:
            item.user_properties.append(("rule_ratio", f"{_CURRENT['ratio']:.3f}"))
        _CURRENT.update(item=None, worst=None, ratio=None)
