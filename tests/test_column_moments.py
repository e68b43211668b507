"""The C++ column-statistics op against float64 torch, odd shapes, every dtype, opcheck."""

import pytest
import torch

import sslops
from tests.utils import assert_error_within, noncontiguous, randn

pytestmark = pytest.mark.skipif(not sslops._extension.LOADED, reason="sslops._C not built")


@pytest.mark.parametrize("n,k", [(1, 1), (2, 3), (97, 129), (1025, 3), (5, 200)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64(n, k, dtype):
    z = randn(n, k, dtype, seed=n * 1000 + k, scale=2.0, shift=10.0)  # |mean| >> std: catches one-pass cancellation
    mean, m2 = torch.ops.sslops.column_moments_cxx(z)
    assert mean.dtype == m2.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    exact = z.double()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(mean.double(), exact.mean(0), rtol=tol, atol=tol)
    torch.testing.assert_close(m2.double(), ((exact - exact.mean(0)) ** 2).sum(0), rtol=tol * 10, atol=tol * 10)


def test_noncontiguous():
    z = randn(33, 17, seed=3)
    for a, b in zip(torch.ops.sslops.column_moments_cxx(noncontiguous(z)), torch.ops.sslops.column_moments_cxx(z)):
        torch.testing.assert_close(a, b)


def test_opcheck():
    torch.library.opcheck(torch.ops.sslops.column_moments_cxx.default, (randn(9, 5, seed=4),))


def test_bad_rank_is_an_error_not_a_crash():
    with pytest.raises(RuntimeError, match="must be 2-D"):
        torch.ops.sslops.column_moments_cxx(torch.randn(3))


# ----------------------------------------------------------------------------- Triton, rows split into chunks


def _triton_cov():
    pytest.importorskip("triton")
    from sslops.triton_kernels import covariance as tc

    return tc


def _exact(z):
    x = z.double()
    mu = x.mean(0)
    return mu, ((x - mu) ** 2).sum(0)


@pytest.mark.triton
@pytest.mark.parametrize("chunk", [16, 10, 5, 37])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_triton_col_stats_row_chunks(monkeypatch, chunk, dtype, device):
    """N = 37 rows in chunks of 16 (16+16+5), 10 (not a multiple of the row block), 5, 37 (one):
    the per-chunk (mean, m2, sq) merged by Chan's formula against float64, |mean| >> std."""
    tc = _triton_cov()
    monkeypatch.setattr(tc, "_ROW_CHUNK", chunk)
    z = randn(37, 40, dtype, device, seed=chunk, scale=2.0, shift=1e3 if dtype != torch.bfloat16 else 10.0)
    other = randn(37, 40, dtype, device, seed=chunk + 1, scale=2.0, shift=1e3 if dtype != torch.bfloat16 else 10.0)
    mean, m2, sq = tc._col_stats(z, other)
    mu, exact_m2 = _exact(z)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(mean.double(), mu, rtol=tol, atol=0.0)
    torch.testing.assert_close(m2.double(), exact_m2, rtol=tol * 10, atol=0.0)  # no cancellation at |mean|/std = 500
    torch.testing.assert_close(sq.double(), ((z.double() - other.double()) ** 2).sum(0), rtol=tol * 10, atol=0.0)
    mean1, m21, sq1 = tc._col_stats(z)
    assert sq1 is None and torch.equal(mean1, mean) and torch.equal(m21, m2)


@pytest.mark.triton
def test_triton_col_stats_chunks_nan_and_bit_identical_reruns(monkeypatch, device):
    tc = _triton_cov()
    monkeypatch.setattr(tc, "_ROW_CHUNK", 16)
    z = randn(37, 19, torch.float32, device, seed=11)
    other = randn(37, 19, torch.float32, device, seed=12)
    first = tc._col_stats(z, other)
    for again in (tc._col_stats(z, other), tc._col_stats(z.clone(), other.clone())):
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    z[20, 3] = float("nan")  # row 20: the second of three chunks
    other[36, 7] = float("nan")  # the last, short chunk: reaches sq only
    mean, m2, sq = tc._col_stats(z, other)
    assert torch.isnan(mean[3]) and torch.isnan(m2[3]) and torch.isnan(sq[3]) and torch.isnan(sq[7])
    keep = torch.ones(19, dtype=torch.bool, device=device)
    keep[3] = False
    mu, exact_m2 = _exact(z[:, keep])
    torch.testing.assert_close(mean[keep].double(), mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m2[keep].double(), exact_m2, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(sq[keep & (torch.arange(19, device=device) != 7)]).all()


def test_triton_row_chunk_sizing(monkeypatch):
    """On a GPU the grid fills ~4 programs per SM: K = 256 (4 column blocks of 64), N = 65536 →
    chunks of 512 rows, 128 chunks, 512 programs; small N stays one chunk."""
    tc = _triton_cov()
    monkeypatch.setattr(tc, "interpreting_triton", lambda: False)
    monkeypatch.setattr(tc, "_ROW_CHUNK", None)
    cpu = torch.device("cpu")  # no device to query: 132 SMs (an H100)
    assert tc._row_chunks(65536, 4, 64, cpu) == (512, 128)
    assert tc._row_chunks(300, 4, 64, cpu) == (256, 2)
    assert tc._row_chunks(256, 4, 64, cpu) == (256, 1)
    assert tc._row_chunks(65536, 600, 64, cpu) == (65536, 1)  # the columns alone fill the GPU
    chunk, chunks = tc._row_chunks(2 ** 21 + 3, 17, 64, cpu)
    assert chunk % 64 == 0 and (chunks - 1) * chunk < 2 ** 21 + 3 <= chunks * chunk and 17 * chunks <= 4 * 132


# ----------------------------------------------------------------------------- fp32 precision at large N and |mean| (issue 12.2)


@pytest.mark.parametrize("n,shift", [(32768, 0.0), (256, 1e5), (32768, 1e5)])
def test_fp32_error_within_2x_of_naive_at_large_n_and_mean(n, shift):
    """One running fp32 total per column made m2's error grow with N (32768 rows) and with
    |mean|/std (every column shifted by 1e5, std 1); blocked sums after subtracting a sample
    row keep it within 2× plain fp32 PyTorch's (tests.utils.assert_error_within)."""
    z = randn(n, 128, torch.float32, seed=n, shift=shift)
    mean, m2 = torch.ops.sslops.column_moments_cxx(z)
    naive_mean = z.mean(0)
    x = z.double()
    exact_mean = x.mean(0)
    assert_error_within(mean, naive_mean, exact_mean, what="mean")
    assert_error_within(m2, ((z - naive_mean) ** 2).sum(0), ((x - exact_mean) ** 2).sum(0), what="m2")
