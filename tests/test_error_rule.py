"""flash-attention's error rule for every kernel: at most 2× naive PyTorch's error.

For each (loss, backend, dtype) the kernel's loss and its gradients are compared with the
float64 reference on the same rounded inputs, and naive PyTorch (``sslops.reference``, which
computes in the dtype it is given) on the same tensors sets the bar:
``tests.utils.assert_kernel_within_rule``. The column-moment kernels (no gradient) are held
to the same rule on (mean, m2[, Σ(z − other)²]).

One body, three lanes, by the ``device`` fixture and the backend:

* GPU lane (``triton``, ``cuda`` on CUDA tensors): N = 4097 with K = 129 and K = 1000 (MCE:
  K × K, K = 129 and 1000), shapes that straddle every tile and split the column statistics
  into ~17 row chunks (256 rows each on a 132-SM GPU), in fp32, bf16, fp16 and fp64: the
  mirrored stores of symmetric off-diagonal tiles, multi-tile pipelining and the multi-chunk
  row merge in every dtype.
* interpreter lane (``triton`` under TRITON_INTERPRET=1): N = 37, K = 40 (the interpreter's
  16-wide tiles: 3 × 3), the covariance statistics forced into 16-row chunks (16 + 16 + 5).
* default lane (``cpu``): N = 1025 (five 256-row blocks of the CPU column sums), K = 17 and 129.
"""

import pytest
import torch

import sslops
from sslops import reference
from tests.test_infonce import relation
from tests.test_matrix_info import _mce_inputs
from tests.test_vicreg import _two_view_inputs
from tests.utils import INTERPRET, assert_error_within, assert_kernel_within_rule, randn

CPU = pytest.param("cpu", marks=pytest.mark.skipif(not sslops._extension.LOADED, reason="sslops._C not built"))
TRITON = pytest.param("triton", marks=pytest.mark.triton)
CUDA = pytest.param("cuda", marks=pytest.mark.gpu)
BACKENDS = [CPU, TRITON, CUDA]
DTYPES = [pytest.param(d, id=str(d)[6:]) for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]


def _shapes(backend, device):
    """(N, K) of the lane: GPU, interpreter or C++ CPU (module docstring)."""
    if torch.device(device).type == "cuda":
        return [(4097, 129), (4097, 1000)]
    if backend == "triton":
        return [(37, 40)]
    return [(1025, 17), (1025, 129)]


def _runnable(loss, backend, device):
    if backend not in sslops.kernel_backends(loss, device):
        pytest.skip(f"no {backend} kernel for {loss} runs on {device} here")


@pytest.fixture
def row_chunks(monkeypatch):
    """Under the interpreter, Triton's column statistics in 16-row chunks (on a GPU the grid
    already splits N = 4097 into chunks)."""
    if INTERPRET:
        from sslops.triton_kernels import covariance as tc

        monkeypatch.setattr(tc, "_ROW_CHUNK", 16)


# ----------------------------------------------------------------------------- the losses

def _views(n, k, dtype, device, seed):
    return _two_view_inputs(n, k, dtype, device, seed)


def _one(n, k, dtype, device, seed):
    return (randn(n, k, dtype, device, seed=seed, scale=0.8, shift=-0.3),)


def _matrix_pair(n, k, dtype, device, seed):
    p = randn(n, k, torch.float64, seed=seed)
    z = randn(n, k, torch.float64, seed=seed + 1) + 0.5 * p
    return p.to(device=device, dtype=dtype), z.to(device=device, dtype=dtype)


def _mce(n, k, dtype, device, seed):
    return _mce_inputs(k, dtype, device, seed)


def _labels(n, device):
    """Three views of each of ⌈N/3⌉ samples (multi-view SimCLR; the last sample may have fewer)."""
    return relation("views3", n, device=device)["labels"]


# name: (sslops loss id, inputs(n, k, dtype, device, seed), kernel(backend, n, device) -> fn, naive(n, device) -> fn)
CASES = {
    "vicreg": ("vicreg", _views,
               lambda b, n, d: lambda x, y: sslops.vicreg_loss(x, y, backend=b),
               lambda n, d: reference.vicreg_loss),
    "vicreg_relation": ("vicreg_relation", _one,
                        lambda b, n, d: lambda z: sslops.vicreg_relation_loss(z, labels=_labels(n, d), backend=b),
                        lambda n, d: lambda z: reference.vicreg_relation_loss(z, labels=_labels(n, d))),
    "barlow_twins": ("barlow_twins", _views,
                     lambda b, n, d: lambda x, y: sslops.barlow_twins_loss(x, y, backend=b),
                     lambda n, d: reference.barlow_twins_loss),
    "info_nce": ("info_nce", _one,
                 lambda b, n, d: lambda z: sslops.info_nce_loss(z, labels=_labels(n, d), temperature=0.1, backend=b),
                 lambda n, d: lambda z: reference.info_nce_loss(z, labels=_labels(n, d), temperature=0.1)),
    "nt_xent": ("info_nce", _views,
                lambda b, n, d: lambda x, y: sslops.nt_xent_loss(x, y, temperature=0.2, backend=b),
                lambda n, d: lambda x, y: reference.nt_xent_loss(x, y, temperature=0.2)),
    "matrix_ssl": ("matrix_ssl", _matrix_pair,
                   lambda b, n, d: lambda p, z: sslops.matrix_ssl_loss(p, z, lambd=0.7, gamma=1.3, backend=b, check="off"),
                   lambda n, d: lambda p, z: reference.matrix_ssl_loss(p, z, lambd=0.7, gamma=1.3)),
    "matrix_cross_entropy": ("matrix_cross_entropy", _mce,
                             lambda b, n, d: lambda p, q: sslops.matrix_cross_entropy(p, q, backend=b, check="off"),
                             lambda n, d: reference.matrix_cross_entropy),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_and_gradients_within_2x_of_naive(backend, dtype, name, device, row_chunks):
    loss, inputs, kernel, naive = CASES[name]
    _runnable(loss, backend, device)
    for n, k in _shapes(backend, device):
        tensors = inputs(n, k, dtype, device, seed=n + 7 * k)
        assert_kernel_within_rule(kernel(backend, n, device), naive(n, device), tensors, grad_out=1.3,
                                  what=f"{name} {backend} {tuple(tensors[0].shape)} {dtype}")


# ----------------------------------------------------------------------------- column moments


def _column_kernel(backend):
    """(z, other) -> (mean, m2, sq or None) of the backend's column-statistics kernel."""
    if backend == "triton":
        from sslops.triton_kernels import covariance as tc

        return tc._col_stats
    if backend == "cuda" and not sslops._extension.BUILT_WITH_CUDA:
        pytest.skip("sslops._C was built without CUDA kernels")
    return lambda z, other: (*torch.ops.sslops.column_moments_cxx(z), None)


def _naive_moments(z, other):
    mean = z.mean(0)
    return mean, ((z - mean) ** 2).sum(0), ((z - other) ** 2).sum(0)


@pytest.mark.parametrize("shift", [0.0, 1e3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_column_moments_within_2x_of_naive(backend, dtype, shift, device, row_chunks):
    """(mean, m2) and the fused Σ(z − other)² against float64, columns with |mean| ≫ std too."""
    _runnable("vicreg", backend, device)
    stats = _column_kernel(backend)
    for n, k in _shapes(backend, device):
        z = randn(n, k, dtype, device, seed=n + k, scale=2.0, shift=shift)
        other = randn(n, k, dtype, device, seed=n + k + 1, scale=2.0, shift=shift)
        got = stats(z, other)
        naive = _naive_moments(z, other)
        exact = _naive_moments(z.double(), other.double())
        for what, g, nv, ex in zip(("mean", "m2", "sq"), got, naive, exact):
            if g is not None:
                assert_error_within(g, nv, ex, what=f"column {what} {backend} {n}x{k} {dtype} shift {shift:g}")
