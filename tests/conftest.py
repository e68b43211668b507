"""Test lanes and shared fixtures.

Lanes (markers, see pyproject.toml): the default run; ``-m triton`` with
``TRITON_INTERPRET=1`` set before Python starts (CPU tensors, tiny shapes); the CUDA
compile check (``cuda_compile``, nvcc on every csrc/cuda/*.cu); ``-m gpu`` on a CUDA
machine; ``distributed`` (gloo on 127.0.0.1).

Every kernel test takes its tensors' device from the ``device`` fixture (CUDA when a device
is present, CPU otherwise, under the interpreter, and for the C++ ``cpu`` backend), so one
test body serves every lane. Tests that put tensors on that device, or are parametrized over
the ``triton``/``cuda`` backends, get the ``cuda_tensors`` marker automatically: the GPU run
selects ``-m "(gpu or triton or cuda_tensors) and not triton_aot and not cuda_compile and not
distributed"``.
"""

import os

import pytest
import torch

from tests.utils import device_for

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _version_tuple(text):
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def pytest_configure(config):
    if not INTERPRET:
        return
    try:
        import numpy
        import triton
    except ImportError as exc:
        pytest.exit(f"TRITON_INTERPRET=1 but the interpreter lane cannot run: {exc}", returncode=3)
    # triton <= 3.6's interpreter fails on every kernel with a runtime-bounded loop when
    # numpy >= 2.3, while loop-free kernels still pass: a half-broken lane looks green.
    if _version_tuple(triton.__version__) < (3, 7) and _version_tuple(numpy.__version__) >= (2, 3):
        pytest.exit(
            f"triton {triton.__version__}'s interpreter is broken with numpy {numpy.__version__} "
            "(runtime-bounded loops fail); use triton >= 3.7 or numpy < 2.3",
            returncode=3,
        )


def _backend_param(item):
    """The ``backend`` a test is parametrized with, or None."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("backend") if callspec is not None else None


@pytest.fixture
def device(request):
    """The device of the test's tensors: :func:`tests.utils.device_for` its ``backend`` parameter
    (CPU for the C++ ``cpu`` backend and under TRITON_INTERPRET=1, else CUDA when present)."""
    return device_for(_backend_param(request.node))


def _uses_cuda_tensors(item):
    """Would this test put tensors on a CUDA device on a GPU machine? (A test parametrized over
    an argument named ``device`` chooses its device itself and is not counted.)"""
    backend = _backend_param(item)
    if backend in ("triton", "cuda"):
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "device" in callspec.params:
        return False
    return "device" in getattr(item, "fixturenames", ()) and backend != "cpu"


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if _uses_cuda_tensors(item):
            item.add_marker(pytest.mark.cuda_tensors)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))
        if "triton" in item.keywords and not (has_cuda or INTERPRET):
            item.add_marker(pytest.mark.skip(reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (the interpreter lane)"))

