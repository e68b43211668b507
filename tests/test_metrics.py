"""sslops.metrics against independent forms: exact values, SVDs, N×N formulas, peers' math.

* exact values: RankMe's check value (3.0000243), the effective rank of r equal singular
  values, erank(A) = exp(VNE(A / tr A)), MCE = MKL + VNE + tr P;
* the Gram route against float64 SVDs (rank-deficient inputs included, several blocks of
  rows forced), invariances (scale, rotations, transposition);
* peers' formulas written out from their documented math: lightly's std_of_l2_normalized,
  stable-pretraining's RankMe (eps 1e-5) and LiDAR (contiguous groups, (λ+ε)/Σ(λ+ε));
* alignment, effective dimension and redundancy against dense float64 formulas (N×N
  matrices, explicit least squares) on small inputs;
* the streaming metrics over uneven batches = the one-shot functions, with no host sync in
  ``update``; gloo W = 2, 3 with uneven batches = one process on the concatenation;
* the diagnostics on synthetic embeddings (simplex: RankMe ≈ LiDAR ≈ 3; isotropic: ≈ K);
* input checks naming the argument, NaN/Inf → NaN, no torchmetrics → a clear ImportError.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import sslops
from sslops import metrics as M

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _orthonormal(n, k, seed):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=_gen(seed), dtype=F64))
    return q


def _with_singular_values(n, k, s, seed=0):
    """An (n, k) matrix with the given singular values (len min(n, k)), random bases."""
    m = min(n, k)
    return _orthonormal(n, m, seed) @ torch.diag(torch.as_tensor(s, dtype=F64)) @ _orthonormal(k, m, seed + 1).T


def _entropy_rank(values, eps):
    p = values / values.sum() + eps
    return torch.exp(-torch.special.xlogy(p, p).sum())


def _svd_rankme(z, eps=1e-7, center=False):
    """RankMe from an SVD in float64 (the definition)."""
    z = z.to(F64)
    if center:
        z = z - z.mean(dim=0)
    return _entropy_rank(torch.linalg.svdvals(z), eps)


@pytest.fixture
def small_blocks(monkeypatch):
    """Force many row blocks (a handful of rows each) through the Gram route."""
    monkeypatch.setattr(M, "_BLOCK_ELEMENTS", 64)


def _close(actual, expected, rtol, atol=0.0, what=""):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64).cpu(), torch.as_tensor(expected, dtype=F64).cpu(),
                               rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- exact values


@pytest.mark.parametrize("shape", [(20, 8), (8, 20), (8, 8)])
def test_rankme_check_value(shape):
    z = _with_singular_values(*shape, [2.5, 2.5, 2.5, 0, 0, 0, 0, 0])
    _close(M.rankme(z), 3.0000243, rtol=1e-7, what="eps = 1e-7")
    _close(M.rankme(z, eps=0.0), 3.0, rtol=1e-12, what="eps = 0")
    assert M.rankme(z).dtype == F64 and M.rankme(z).shape == ()


@pytest.mark.parametrize("r", [1, 3, 7])
def test_effective_rank_of_r_equal_entries(r):
    diag = torch.diag(torch.tensor([1.7] * r + [0.0] * (9 - r), dtype=F64))
    _close(M.effective_rank(diag), r, rtol=1e-12, what="square")
    tall = torch.cat([diag, torch.zeros(5, 9, dtype=F64)])
    _close(M.effective_rank(tall), r, rtol=1e-12, what="rectangular")


def _vne(p):
    return -torch.trace(p @ sslops.matrix_log(p, method="eigh"))


def _spd(k, seed, floor=0.05):
    a = torch.randn(k, k, generator=_gen(seed), dtype=F64)
    return a @ a.T / k + floor * torch.eye(k, dtype=F64)


@pytest.mark.parametrize("k", [1, 6, 33])
def test_effective_rank_is_exp_von_neumann_entropy(k):
    a = _spd(k, seed=k)
    _close(M.effective_rank(a), torch.exp(_vne(a / torch.trace(a))), rtol=1e-10)


def test_matrix_cross_entropy_is_kl_plus_entropy_plus_trace():
    for seed in range(3):
        p, q = _spd(7, seed), _spd(7, seed + 10)
        log_p, log_q = sslops.matrix_log(p, method="eigh"), sslops.matrix_log(q, method="eigh")
        mkl = torch.trace(p @ log_p - p @ log_q - p + q)
        mce = sslops.matrix_cross_entropy(p, q, method="eigh")
        _close(mce, mkl + _vne(p) + torch.trace(p), rtol=1e-10, what=f"seed {seed}")


def test_effective_rank_of_covariance_is_below_centred_rankme():
    """The docstring's trap: the covariance weights by σ², so its effective rank is smaller."""
    z = torch.randn(300, 12, generator=_gen(3), dtype=F64) * torch.linspace(0.1, 3.0, 12, dtype=F64) + 4.0
    cov_rank = M.effective_rank(torch.cov(z.T))
    assert cov_rank < M.rankme(z, center=True, eps=0.0) - 0.5
    _close(cov_rank, _entropy_rank(torch.linalg.eigvalsh(torch.cov(z.T)).clamp_min(0), 0.0), rtol=1e-10)


# ----------------------------------------------------------------------------- the Gram route


RANKME_SHAPES = [(1, 1), (1, 5), (2, 3), (97, 13), (13, 97), (129, 129), (1025, 7), (3, 1)]


@pytest.mark.parametrize("shape", RANKME_SHAPES)
@pytest.mark.parametrize("center", [False, True])
def test_rankme_matches_float64_svd(shape, center, small_blocks):
    n, k = shape
    if center and n < 2:
        pytest.skip("center needs two rows")
    g = _gen(n * 1000 + k)
    z = torch.randn(n, k, generator=g, dtype=F64) * torch.logspace(-1, 0.5, k, dtype=F64) + 0.7
    for eps in (1e-7, 1e-5, 0.0):
        _close(M.rankme(z, eps=eps, center=center), _svd_rankme(z, eps, center), rtol=1e-6, what=f"eps {eps}")


@pytest.mark.parametrize("shape,rank", [((500, 64), 5), ((40, 300), 3), ((64, 64), 1), ((257, 31), 30)])
@pytest.mark.parametrize("center", [False, True])
def test_rankme_rank_deficient_matches_svd(shape, rank, center, small_blocks):
    """Exact zeros stay zero: the Gram route's eigenvalues are clamped at its rounding level."""
    n, k = shape
    g = _gen(rank)
    z = torch.randn(n, rank, generator=g, dtype=F64) @ torch.randn(rank, k, generator=g, dtype=F64) + 3.0
    reference = _svd_rankme(z, center=center)
    _close(M.rankme(z, center=center), reference, rtol=1e-6, what="float64")
    # fp32 input: products in fp32, compared with the float64 SVD of the same fp32 values
    z32 = z.float()
    _close(M.rankme(z32, center=center), _svd_rankme(z32, center=center), rtol=2e-4, what="float32")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rankme_low_precision_inputs(dtype):
    z = torch.randn(301, 17, generator=_gen(5)).to(dtype)
    _close(M.rankme(z), _svd_rankme(z), rtol=1e-5)


def test_rankme_invariances():
    g = _gen(11)
    z = torch.randn(200, 24, generator=g, dtype=F64) * torch.logspace(-1, 0, 24, dtype=F64)
    value = M.rankme(z)
    for scale in (1e-30, 1e-5, 3.0, 1e30):
        _close(M.rankme(z * scale), value, rtol=1e-9, what=f"scale {scale}")
    for scale in (1e-25, 1e25):  # fp32 squares would under/overflow without the block scaling
        _close(M.rankme((z * scale).float()), M.rankme(z.float()), rtol=1e-6, what=f"fp32 scale {scale}")
    _close(M.rankme(z @ _orthonormal(24, 24, 1)), value, rtol=1e-9, what="rotation of the features")
    _close(M.rankme(_orthonormal(200, 200, 2) @ z), value, rtol=1e-9, what="rotation of the rows")
    _close(M.rankme(z.T), value, rtol=1e-9, what="transposition")
    _close(M.rankme(z.T.contiguous().T), value, rtol=1e-12, what="strided layout")


def test_effective_rank_matches_svd(small_blocks):
    for shape in [(9, 9), (50, 7), (7, 50)]:
        a = torch.randn(*shape, generator=_gen(shape[0]), dtype=F64)
        for eps in (0.0, 1e-3):
            _close(M.effective_rank(a, eps=eps), _entropy_rank(torch.linalg.svdvals(a), eps), rtol=1e-8, what=f"{shape}")


# ----------------------------------------------------------------------------- peers


def lightly_std_of_l2_normalized(z):
    """lightly.utils.debug.std_of_l2_normalized as documented."""
    z_norm = torch.nn.functional.normalize(z, dim=1)
    return torch.std(z_norm, dim=0).mean()


def stable_pretraining_rankme(embeddings):
    """stable-pretraining's RankMe callback: svdvals, p = s/Σs + 1e-5, uncentred."""
    s = torch.linalg.svdvals(embeddings)
    p = s / torch.sum(s) + 1e-5
    return torch.exp(-torch.sum(p * torch.log(p)))


def stable_pretraining_lidar(embeddings, samples_per_class, delta=1e-4, epsilon=1e-8):
    """stable-pretraining's LiDAR callback: contiguous groups, p = (λ+ε)/Σ(λ+ε)."""
    n, d = embeddings.shape
    x = embeddings.view(n // samples_per_class, samples_per_class, d)
    n_classes = x.shape[0]
    class_means = x.mean(dim=1)
    centered_means = class_means - class_means.mean(dim=0)
    s_b = centered_means.T @ centered_means / (n_classes - 1)
    centered = (x - class_means.unsqueeze(1)).reshape(-1, d)
    s_w = centered.T @ centered / (n_classes * (samples_per_class - 1)) + delta * torch.eye(d, dtype=x.dtype)
    w, v = torch.linalg.eigh(s_w)
    root = (v * w.clamp(min=epsilon).rsqrt()) @ v.T
    lam = torch.linalg.eigvalsh(root @ s_b @ root).clamp(min=0.0)
    p = (lam + epsilon) / (lam + epsilon).sum()
    return torch.exp(-(p * torch.log(p)).sum())


def reptrix_rankme(z):
    """reptrix's get_rankme: the PCA explained-variance ratios (eigenvalues of the covariance / their
    sum), then p = e/‖e‖₁ + 1e-7 and exp of the entropy."""
    eigen = torch.linalg.eigvalsh(torch.cov(z.T)).flip(0).clamp_min(0)
    eigen = eigen / eigen.sum()
    p = eigen / eigen.abs().sum() + 1e-7
    return torch.exp(-(p * torch.log(p)).sum())


def test_reptrix_rankme_is_effective_rank_of_the_covariance():
    z = torch.randn(400, 30, generator=_gen(6), dtype=F64) * torch.logspace(-1, 0, 30, dtype=F64) + 1.0
    _close(M.effective_rank(torch.cov(z.T), eps=1e-7), reptrix_rankme(z), rtol=1e-10)
    assert reptrix_rankme(z) < M.rankme(z, center=True) - 1.0


def test_std_of_l2_normalized_matches_lightly(small_blocks):
    for shape in [(2, 1), (97, 13), (1025, 3)]:
        z = torch.randn(*shape, generator=_gen(shape[0]), dtype=F64) + 0.3
        _close(M.std_of_l2_normalized(z), lightly_std_of_l2_normalized(z), rtol=1e-12, what=str(shape))
        z32 = z.float()
        _close(M.std_of_l2_normalized(z32), lightly_std_of_l2_normalized(z32.double()), rtol=1e-12, what="fp32 values")
    k = 64
    healthy = M.std_of_l2_normalized(torch.randn(4000, k, generator=_gen(1), dtype=F64))
    assert abs(healthy * math.sqrt(k) - 1) < 0.02
    collapsed = torch.randn(1, k, dtype=F64).expand(100, k) * torch.rand(100, 1, generator=_gen(2), dtype=F64)
    assert M.std_of_l2_normalized(collapsed) < 1e-12


def test_rankme_matches_stable_pretraining():
    z = torch.randn(300, 40, generator=_gen(7), dtype=F64) * torch.logspace(-2, 0, 40, dtype=F64)
    _close(M.rankme(z, eps=1e-5), stable_pretraining_rankme(z), rtol=1e-10)


def test_lidar_matches_stable_pretraining():
    n, q, k = 30, 5, 12
    g = _gen(8)
    sources = torch.randn(n, 1, k, generator=g, dtype=F64) * torch.linspace(0.2, 2.0, k, dtype=F64)
    views = (sources + 0.5 * torch.randn(n, q, k, generator=g, dtype=F64)).reshape(n * q, k)
    contiguous = torch.arange(n).repeat_interleave(q)
    # at eps = 0 both normalisations agree exactly
    _close(M.lidar(views, contiguous, eps=0.0), stable_pretraining_lidar(views, q, epsilon=0.0), rtol=1e-10)
    for delta in (1e-4, 1e-2):
        ours = M.lidar(views, contiguous, delta=delta, eps=1e-8)
        _close(ours, stable_pretraining_lidar(views, q, delta=delta, epsilon=1e-8), rtol=1e-6, what=f"delta {delta}")
    # any order of rows, any integer ids: the same sources give the same value
    perm = torch.randperm(n * q, generator=g)
    _close(M.lidar(views[perm], 1000 - 7 * contiguous[perm]), M.lidar(views, contiguous), rtol=1e-10, what="shuffled")


# ----------------------------------------------------------------------------- LiDAR


def _lidar_dense(z, groups, delta, eps):
    """LiDAR from the definition, dense float64, one source at a time."""
    ids = torch.unique(groups)
    means = torch.stack([z[groups == i].mean(dim=0) for i in ids])
    mu = means.mean(dim=0)
    sigma_b = (means - mu).T @ (means - mu) / (len(ids) - 1)
    residual = sum((z[groups == i] - means[j]).T @ (z[groups == i] - means[j]) for j, i in enumerate(ids))
    dof = sum(int((groups == i).sum()) - 1 for i in ids)
    sigma_w = residual / dof + delta * torch.eye(z.shape[1], dtype=F64)
    w, v = torch.linalg.eigh(sigma_w)
    root = (v * w.rsqrt()) @ v.T
    lam = torch.linalg.eigvalsh(root @ sigma_b @ root).clamp_min(0)
    return _entropy_rank(lam, eps)


def test_lidar_matches_definition_with_uneven_views(small_blocks):
    g = _gen(9)
    sizes = [2, 5, 3, 3, 7, 2, 4]
    groups = torch.cat([torch.full((s,), 10 * i) for i, s in enumerate(sizes)])
    z = torch.randn(len(groups), 6, generator=g, dtype=F64) + groups.unsqueeze(1).to(F64) / 30
    for delta, eps in ((1e-4, 1e-8), (0.5, 0.0)):
        _close(M.lidar(z, groups, delta=delta, eps=eps), _lidar_dense(z, groups, delta, eps), rtol=1e-9)


def test_lidar_does_not_depend_on_the_scale_of_between():
    g = _gen(10)
    n, q, k = 25, 4, 9
    means = torch.randn(n, 1, k, generator=g, dtype=F64)
    noise = torch.randn(n, q, k, generator=g, dtype=F64)
    noise = noise - noise.mean(dim=1, keepdim=True)  # Σ_w fixed, Σ_b = c²·Σ_b(means)
    groups = torch.arange(n).repeat_interleave(q)
    values = [M.lidar((c * means + noise).reshape(-1, k), groups) for c in (0.1, 1.0, 10.0)]
    for v in values[1:]:
        _close(v, values[0], rtol=1e-9)


# ----------------------------------------------------------------------------- alignment


def _alignment_dense(x, y_onehot, directions=None):
    """alignment(k) with N×N matrices: Q by SVD / QR of the centred x, Y Yᵀ explicit."""
    xc = x - x.mean(dim=0)
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    rank = int((s > s[0] * 1e-10).sum())
    basis = u[:, :rank]
    yyt = y_onehot @ y_onehot.T
    total = torch.linalg.matrix_norm(yyt @ basis) ** 2
    if directions is None:
        q = basis
    else:
        q, r = torch.linalg.qr(xc @ directions)
        q = q * torch.sign(torch.diagonal(r))
    return torch.cumsum(torch.linalg.vector_norm(yyt @ q, dim=0) ** 2, 0) / total


def _classification_data(n, d, classes, seed, null_columns=0):
    g = _gen(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, d, generator=g, dtype=F64)
    x = centres[y] + torch.randn(n, d, generator=g, dtype=F64) @ torch.randn(d, d, generator=g, dtype=F64)
    if null_columns:
        x[:, :null_columns] = 5.0  # constant pixels: centred, they are the null space of x
    return x, y


def test_alignment_matches_dense_formula(small_blocks):
    x, y = _classification_data(150, 12, 4, seed=1, null_columns=2)
    onehot = torch.nn.functional.one_hot(y).to(F64)
    curve = M.alignment(x, y)
    assert curve.shape == (10,)  # rank(x) = 12 - 2 constant columns
    _close(curve, _alignment_dense(x, onehot), rtol=1e-9, atol=1e-12)
    _close(M.alignment(x, onehot), curve, rtol=1e-10, atol=1e-12, what="(N, C) targets")
    _close(M.alignment(x, y, squared=False), curve.sqrt(), rtol=1e-12, what="squared=False")
    _close(M.alignment(x, y, 4), curve[3], rtol=1e-12, what="k = 4")
    assert torch.all(curve[1:] >= curve[:-1] - 1e-12), "nondecreasing"
    _close(curve[-1], 1.0, rtol=1e-12, what="1 at k = rank(x)")


def test_alignment_with_directions(small_blocks):
    x, y = _classification_data(120, 10, 3, seed=2, null_columns=1)
    onehot = torch.nn.functional.one_hot(y).to(F64)
    directions = torch.randn(10, 6, generator=_gen(3), dtype=F64)
    directions[0, :] = 0.0  # no component along the constant column
    _close(M.alignment(x, y, directions=directions), _alignment_dense(x, onehot, directions), rtol=1e-9, atol=1e-12)
    # a direction in the null space of x (the constant column) and a repeated one add nothing
    e = torch.eye(10, dtype=F64)
    with_dropped = torch.stack([e[3], e[0], e[5], e[3] + 0 * e[4], e[7]], dim=1)
    curve = M.alignment(x, y, directions=with_dropped)
    kept = M.alignment(x, y, directions=torch.stack([e[3], e[5], e[7]], dim=1))
    _close(curve, torch.stack([kept[0], kept[0], kept[1], kept[1], kept[2]]), rtol=1e-10, atol=1e-14)
    # every coordinate axis, in order: complete, so it ends at 1
    _close(M.alignment(x, y, directions=e)[-1], 1.0, rtol=1e-10)


def test_alignment_digits_curve():
    """Balestriero & LeCun's Figure: scikit-learn's digits, about 50/65/83/93/98 % at k = 2..32."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x, y = torch.tensor(digits.data, dtype=F64), torch.tensor(digits.target)
    curve = M.alignment(x, y, squared=False)
    assert curve.shape == (61,)  # centred digits: rank 61 of 64
    for k, percent in zip((2, 4, 8, 16, 32), (50, 65, 83, 93, 98)):
        assert abs(100 * float(curve[k - 1]) - percent) < 1.5, (k, float(curve[k - 1]))


def test_alignment_needs_no_n_by_n_matrix():
    """N = 20000 rows: one N×N float64 matrix would be 3.2 GB; the peak stays at a few copies of x."""
    from benchmarks.common import peak_bytes_cpu

    x, y = _classification_data(20000, 16, 5, seed=4)
    peak = peak_bytes_cpu(lambda: M.alignment(x, y))
    assert 0 < peak < 4 * x.numel() * 8, peak


# ----------------------------------------------------------------------------- 2402.06884


def test_effective_dimension(small_blocks):
    g = _gen(12)
    for n, d, rank in ((80, 10, 4), (6, 30, 5)):
        psi = torch.randn(n, rank, generator=g, dtype=F64) @ torch.randn(rank, d, generator=g, dtype=F64)
        sigma = psi.T @ psi / n
        for lam in (0.3, 2.0):
            direct = torch.trace(sigma @ torch.linalg.inv(sigma + lam * torch.eye(d, dtype=F64)))
            _close(M.effective_dimension(psi, lam), direct, rtol=1e-10, what=f"lam {lam}")
        _close(M.effective_dimension(psi, 1e-12), rank, rtol=1e-6, what="lam -> 0: rank")
        assert M.effective_dimension(psi, 1e12) < 1e-6


def test_redundancy(small_blocks):
    g = _gen(13)
    n, d, classes, s = 200, 12, 3, 4
    y = torch.randint(0, classes, (n,), generator=g)
    label_part = torch.randn(classes, d, generator=g, dtype=F64)[y]
    free_part = torch.randn(n, s, generator=g, dtype=F64) @ torch.randn(s, d, generator=g, dtype=F64)
    psi = label_part + free_part
    onehot = torch.nn.functional.one_hot(y).to(F64)
    coef = torch.linalg.lstsq(onehot, psi).solution
    residual = psi - onehot @ coef
    lam = torch.linalg.eigvalsh(residual.T @ residual / n).flip(0)
    for t in range(d + 2):
        expected = lam[t:].clamp_min(0).sum() if t < s else 0.0
        _close(M.redundancy(psi, y, t), expected, rtol=1e-8, atol=1e-12, what=f"s = {t}")
    assert M.redundancy(psi, y, s - 1) > 1e-3
    _close(M.redundancy(psi, onehot, 2), M.redundancy(psi, y, 2), rtol=1e-9, what="(N, C) targets")
    # general targets: least squares on Y itself
    targets = torch.randn(n, 2, generator=g, dtype=F64)
    coef = torch.linalg.lstsq(targets, psi).solution
    residual = psi - targets @ coef
    lam = torch.linalg.eigvalsh(residual.T @ residual / n).flip(0)
    _close(M.redundancy(psi, targets, 3), lam[3:].sum(), rtol=1e-8)


# ----------------------------------------------------------------------------- synthetic embeddings


def _simplex_embedding(per_class, k, noise, seed):
    """4 classes at the vertices of a regular simplex (centred: rank 3), plus small noise."""
    g = _gen(seed)
    vertices = torch.eye(4, dtype=F64) - 0.25
    basis = _orthonormal(k, 4, seed)
    labels = torch.arange(4).repeat_interleave(per_class)
    z = vertices[labels] @ basis.T + noise * torch.randn(4 * per_class, k, generator=g, dtype=F64)
    return z, labels


def test_simplex_embedding_has_rankme_and_lidar_near_three():
    z, labels = _simplex_embedding(250, 32, noise=1e-4, seed=14)
    assert abs(float(M.rankme(z)) - 3) < 0.1
    assert abs(float(M.lidar(z, labels)) - 3) < 0.05
    assert float(M.rankme(torch.randn(4096, 32, generator=_gen(15), dtype=F64))) > 0.95 * 32


# ----------------------------------------------------------------------------- input checks


def _expect(exc, needle, fn, *args, **kw):
    with pytest.raises(exc, match=needle):
        fn(*args, **kw)


def test_bad_inputs_name_the_argument():
    z = torch.randn(10, 4, dtype=F64)
    groups = torch.arange(5).repeat_interleave(2)
    _expect(ValueError, "z must have shape", M.rankme, torch.randn(10))
    _expect(TypeError, "z must be float", M.rankme, torch.ones(3, 3, dtype=torch.int64))
    _expect(TypeError, "z must be a torch.Tensor", M.rankme, [[1.0]])
    _expect(ValueError, "eps must be >= 0", M.rankme, z, eps=-1e-3)
    _expect(ValueError, "z needs at least 2 rows", M.rankme, z[:1], center=True)
    _expect(TypeError, "center must be True or False", M.rankme, z, center=1)
    _expect(ValueError, "eps must be >= 0", M.effective_rank, z, eps=-1.0)
    _expect(ValueError, "groups must have shape", M.lidar, z, groups[:-1])
    _expect(TypeError, "groups must have an integer dtype", M.lidar, z, groups.to(F64))
    _expect(ValueError, "single view", M.lidar, z, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 5]))
    _expect(ValueError, "at least two sources", M.lidar, z, torch.zeros(10, dtype=torch.int64))
    _expect(ValueError, "delta must be a finite number > 0", M.lidar, z, groups, delta=0.0)
    _expect(ValueError, "eps must be >= 0", M.lidar, z, groups, eps=-1.0)
    _expect(ValueError, "z needs at least 2 rows", M.std_of_l2_normalized, z[:1])
    _expect(ValueError, "lam must be a finite number > 0", M.effective_dimension, z, 0.0)
    _expect(ValueError, "lam must be a finite number > 0", M.effective_dimension, z, -1.0)
    labels = torch.randint(0, 3, (10,))
    _expect(ValueError, "s must be >= 0", M.redundancy, z, labels, -1)
    _expect(TypeError, "s must be an int", M.redundancy, z, labels, 1.5)
    _expect(ValueError, "y must have shape", M.redundancy, z, labels[:-1], 1)
    _expect(ValueError, "k must be >= 1", M.alignment, z, labels, 0)
    _expect(ValueError, r"k must be in \[1, 4\]", M.alignment, z, labels, 5)
    _expect(ValueError, r"rank\(x\) = 2", M.alignment, z[:, :2] @ torch.randn(2, 4, dtype=F64), labels, 3)
    _expect(ValueError, "directions must have shape", M.alignment, z, labels, directions=torch.randn(3, 2, dtype=F64))
    _expect(ValueError, r"k must be in \[1, 2\]", M.alignment, z, labels, 3, directions=torch.randn(4, 2, dtype=F64))
    _expect(ValueError, "y must have shape", M.alignment, z, labels[:-1])
    _expect(TypeError, "y must be", M.alignment, z, torch.randn(10, 2, 2))
    _expect(ValueError, "single class", M.alignment, z, torch.full((10,), 3))
    _expect(ValueError, "rank 0", M.alignment, torch.ones(10, 4, dtype=F64), labels)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan(bad):
    z = torch.randn(40, 6, generator=_gen(16), dtype=F64)
    z[3, 2] = bad
    groups = torch.arange(20).repeat_interleave(2)
    labels = torch.randint(0, 3, (40,), generator=_gen(17))
    for name, value in [("rankme", M.rankme(z)), ("rankme wide", M.rankme(z.T)), ("rankme centred", M.rankme(z, center=True)),
                        ("effective_rank", M.effective_rank(z)), ("effective_rank square", M.effective_rank(z[:6])),
                        ("lidar", M.lidar(z, groups)), ("std", M.std_of_l2_normalized(z)),
                        ("effective_dimension", M.effective_dimension(z, 0.1)), ("redundancy", M.redundancy(z, labels, 1)),
                        ("rankme fp32", M.rankme(z.float()))]:
        assert torch.isnan(value).all(), name
    curve = M.alignment(z, labels)
    assert curve.shape == (6,) and torch.isnan(curve).all()
    assert torch.isnan(M.alignment(z, labels, 2)).all()
    sslops.set_debug(True)
    try:
        _expect(ValueError, "z holds NaN or Inf", M.rankme, z)
    finally:
        sslops.set_debug(False)


def test_zero_matrix_is_rank_one_not_nan():
    zero = torch.zeros(5, 3, dtype=F64)
    _close(M.rankme(zero, eps=0.0), 1.0, rtol=0)
    _close(M.rankme(torch.ones(5, 3, dtype=F64), center=True, eps=0.0), 1.0, rtol=0, what="collapsed to a constant")


# ----------------------------------------------------------------------------- streaming


def _batches(z, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(z[start:start + s])
        start += s
    assert start == z.shape[0]
    return out


def _no_host_sync():
    """The repository's host-sync detector (tests/test_host_sync.py): fails on any op that would
    make a GPU run wait (item/bool/tolist, value-dependent shapes, tensors from host data)."""
    from tests.test_host_sync import SyncDetector

    return SyncDetector()


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_streaming_rankme_and_effective_rank_equal_one_shot(dtype, small_blocks):
    pytest.importorskip("torchmetrics")
    g = _gen(18)
    k = 9
    z = (torch.randn(61, k, generator=g, dtype=F64) * torch.logspace(-1, 0, k, dtype=F64) + 2.0).to(dtype)
    sizes = [1, 7, 20, 3, 30]
    tol = 1e-9 if dtype == F64 else 1e-5
    one_shot = {
        "rankme": (lambda: M.RankMe(k), lambda x: M.rankme(x)),
        "rankme centred eps 1e-5": (lambda: M.RankMe(k, center=True, eps=1e-5), lambda x: M.rankme(x, center=True, eps=1e-5)),
        "erank": (lambda: M.EffectiveRank(k), lambda x: M.effective_rank(x)),
        "erank covariance": (lambda: M.EffectiveRank(k, covariance=True), lambda x: M.effective_rank(torch.cov(x.to(F64).T))),
    }
    for name, (make, function) in one_shot.items():
        metric = make()
        for batch in _batches(z, sizes):
            with _no_host_sync():
                metric.update(batch)
        _close(metric.compute(), function(z), rtol=tol, what=name)
        metric.reset()
        with pytest.warns(UserWarning, match="called before the ``update``"):  # torchmetrics' own warning
            assert torch.isnan(metric.compute()), f"{name}: NaN before any update"
        _close(metric(z[:20]), function(z[:20]), rtol=tol, what=f"{name}: forward returns the batch value")
    # fewer rows than features: only min(N, K) singular values take part
    few = M.RankMe(k)
    few.update(z[:2])
    few.update(z[2:4])
    _close(few.compute(), M.rankme(z[:4]), rtol=tol, what="N < K")


def test_streaming_lidar_equals_one_shot(small_blocks):
    pytest.importorskip("torchmetrics")
    g = _gen(19)
    n, q, k = 40, 3, 7
    groups = torch.arange(n).repeat_interleave(q)
    z = torch.randn(n, 1, k, generator=g, dtype=F64).expand(n, q, k).reshape(-1, k) + 0.4 * torch.randn(n * q, k, generator=g, dtype=F64)
    metric = M.LiDAR(k)
    start = 0
    for sources in (2, 11, 5, 22):  # whole sources per update, ids restarting at 0 each time
        rows = sources * q
        batch = z[start:start + rows]
        local_ids = groups[start:start + rows] - groups[start]
        perm = torch.randperm(rows, generator=g)
        with _no_host_sync():
            metric.update(batch[perm], local_ids[perm])
        start += rows
    _close(metric.compute(), M.lidar(z, groups), rtol=1e-9)
    metric.update(z[:4], torch.tensor([0, 0, 1, 2]))  # source 1 and 2: a single view each
    _expect(ValueError, "single view", metric.compute)


def test_streaming_checks():
    pytest.importorskip("torchmetrics")
    _expect(TypeError, "num_features must be an int", M.RankMe, 3.0)
    _expect(ValueError, "num_features must be >= 1", M.RankMe, 0)
    _expect(ValueError, "eps must be >= 0", M.RankMe, 3, eps=-1.0)
    _expect(ValueError, "delta must be a finite number > 0", M.LiDAR, 3, delta=0.0)
    metric = M.RankMe(3)
    _expect(ValueError, "z must have 3 columns", metric.update, torch.randn(5, 4))
    _expect(ValueError, "groups must have shape", M.LiDAR(3).update, torch.randn(4, 3), torch.zeros(3, dtype=torch.int64))
    centred = M.RankMe(3, center=True)
    centred.update(torch.randn(1, 3))
    _expect(ValueError, "two rows", centred.compute)
    nan = M.RankMe(3)
    nan.update(torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, 2.0]]))
    assert torch.isnan(nan.compute())


def test_streaming_metrics_without_torchmetrics(tmp_path):
    """`import sslops` and the functions work without torchmetrics; the classes say what to install."""
    from tests.test_packaging import BLOCK_IMPORTS, run_python

    out = run_python(BLOCK_IMPORTS.replace("NAMES", repr(["torchmetrics"])) + """
    import torch, sslops
    print(float(sslops.metrics.rankme(torch.eye(3))))
    try:
        sslops.metrics.RankMe
    except ImportError as exc:
        print("ImportError:", exc)
    """, tmp_path)
    assert out.splitlines()[0].startswith("3.0"), out
    assert "ImportError:" in out and 'pip install "sslops[metrics]"' in out, out


# ----------------------------------------------------------------------------- distributed


DIST_K = 5
DIST_SIZES = {2: [7, 3], 3: [5, 1, 9]}  # rows per rank (sources of 1, ... views for LiDAR below)


def _dist_data(world):
    g = _gen(20 + world)
    n = sum(DIST_SIZES[world])
    z = torch.randn(n, DIST_K, generator=g, dtype=F64) * torch.linspace(0.3, 2.0, DIST_K, dtype=F64) + 1.5
    return z


def _check_streaming_distributed(rank, world):
    z = _dist_data(world)
    sizes = DIST_SIZES[world]
    start = sum(sizes[:rank])
    mine = z[start:start + sizes[rank]]
    rankme, centred, erank = M.RankMe(DIST_K), M.RankMe(DIST_K, center=True), M.EffectiveRank(DIST_K, covariance=True)
    for metric in (rankme, centred, erank):
        for piece in torch.split(mine, 2):  # uneven batches on every rank
            metric.update(piece)
    _close(rankme.compute(), M.rankme(z), rtol=1e-9, what=f"rank {rank}/{world} RankMe")
    _close(centred.compute(), M.rankme(z, center=True), rtol=1e-9, what=f"rank {rank}/{world} RankMe centred")
    _close(erank.compute(), M.effective_rank(torch.cov(z.T)), rtol=1e-9, what=f"rank {rank}/{world} EffectiveRank")
    # LiDAR: rank r holds sources of r + 2 views each, ids local to each rank
    q = rank + 2
    g = _gen(40)
    all_views, all_groups = [], []
    for r in range(world):
        sources = torch.randn(3 + r, 1, DIST_K, generator=g, dtype=F64)
        views = (sources + 0.3 * torch.randn(3 + r, r + 2, DIST_K, generator=g, dtype=F64)).reshape(-1, DIST_K)
        all_views.append(views)
        all_groups.append(torch.arange(3 + r).repeat_interleave(r + 2) + 100 * r)
    lidar = M.LiDAR(DIST_K)
    lidar.update(all_views[rank], all_groups[rank] - 100 * rank)
    assert q == rank + 2
    _close(lidar.compute(), M.lidar(torch.cat(all_views), torch.cat(all_groups)), rtol=1e-9, what=f"rank {rank}/{world} LiDAR")


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_streaming_metrics_distributed(world, monkeypatch):
    pytest.importorskip("torchmetrics")
    from tests.test_distributed import _spawn

    _spawn(world, _check_streaming_distributed, monkeypatch)


# ----------------------------------------------------------------------------- examples, devices


def test_monitoring_example_runs():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "monitor_collapse.py"), "--steps", "3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"^step +3 \|", out.stdout, re.M) and "RankMe*" in out.stdout, out.stdout


def test_monitoring_example_lightning():
    pytest.importorskip("torchmetrics")
    try:
        import lightning  # noqa: F401
    except ImportError:
        pytest.importorskip("pytorch_lightning")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "monitor_collapse.py"), "--steps", "3", "--lightning"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "rankme" in out.stdout.lower(), out.stdout


@pytest.mark.gpu
def test_metrics_run_on_cuda_tensors():
    z = torch.randn(300, 20, generator=_gen(21), dtype=F64) * torch.logspace(-1, 0, 20, dtype=F64)
    groups = torch.arange(100).repeat_interleave(3)
    labels = torch.randint(0, 4, (300,), generator=_gen(22))
    for dtype in (F64, torch.float32):
        zc = z.to("cuda", dtype)
        pairs = [(M.rankme(zc), M.rankme(z.to(dtype))), (M.rankme(zc.T, center=True), M.rankme(z.to(dtype).T, center=True)),
                 (M.lidar(zc, groups.cuda()), M.lidar(z.to(dtype), groups)),
                 (M.std_of_l2_normalized(zc), M.std_of_l2_normalized(z.to(dtype))),
                 (M.effective_dimension(zc, 0.5), M.effective_dimension(z.to(dtype), 0.5)),
                 (M.redundancy(zc, labels.cuda(), 3), M.redundancy(z.to(dtype), labels, 3)),
                 (M.alignment(zc, labels.cuda()), M.alignment(z.to(dtype), labels))]
        for got, want in pairs:
            assert got.device.type == "cuda"
            _close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-9)
    pytest.importorskip("torchmetrics")
    rankme, lidar = M.RankMe(20).cuda(), M.LiDAR(20).cuda()
    pieces = list(zip(torch.split(z.cuda(), 75), torch.split(groups.cuda(), 75)))
    torch.cuda.set_sync_debug_mode("error")  # update must not synchronise with the host
    try:
        for piece, ids in pieces:
            rankme.update(piece)
            lidar.update(piece, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _close(rankme.compute(), M.rankme(z), rtol=1e-9)
    _close(lidar.compute(), M.lidar(z, groups), rtol=1e-9)


def test_benchmark_cases_run_forward_only():
    """bench_metrics' providers agree with each other; the N×N route is skipped, with why, when too big."""
    from benchmarks import bench_metrics, common

    for case in (bench_metrics.rankme_case(300, 20), bench_metrics.alignment_case(400, 40)):
        rows = {r["provider"]: r for r in common.run_case(case, torch.device("cpu"), with_compile=False, min_run_time=0.01)}
        assert rows["sslops"]["status"] == "ok" and rows["naive"]["status"] == "ok", rows
        assert rows["sslops"]["rel_diff_vs_naive"] < 1e-3, rows["sslops"]  # naive: fp32 SVD / N×N eigh
    big = bench_metrics.alignment_case(70000, 3072)
    assert "naive" in big.skip_providers and not big.backward
    assert [p for p in common.providers(big, torch.device("cpu"), False) if p[0] == "naive"][0][1] is None


@pytest.mark.parametrize("offset", [1e3, 1e5])
def test_centred_rankme_of_fp32_rows_far_from_the_origin(offset, small_blocks):
    """Each block is shifted by its own mean: centring stays accurate when |mean| ≫ spread."""
    z = (torch.randn(2000, 12, generator=_gen(23), dtype=F64) * torch.logspace(-1, 0, 12, dtype=F64) + offset).float()
    _close(M.rankme(z, center=True), _svd_rankme(z.double(), center=True), rtol=1e-4)
    metric = pytest.importorskip("sslops._streaming").RankMe(12, center=True)
    for piece in torch.split(z, 333):
        metric.update(piece)
    _close(metric.compute(), _svd_rankme(z.double(), center=True), rtol=1e-4, what="streaming")


def test_autocast_stays_outside():
    """Inside torch.autocast (bf16 on CPU) the products stay fp32/fp64: the same numbers."""
    z = torch.randn(300, 24, generator=_gen(24)) * torch.logspace(-1, 0, 24) + 2.0
    groups = torch.arange(100).repeat_interleave(3)
    labels = torch.randint(0, 4, (300,), generator=_gen(25))
    calls = {
        "rankme": lambda: M.rankme(z, center=True), "rankme wide": lambda: M.rankme(z[:20]),
        "effective_rank": lambda: M.effective_rank(z), "lidar": lambda: M.lidar(z, groups),
        "std": lambda: M.std_of_l2_normalized(z), "alignment": lambda: M.alignment(z, labels),
        "effective_dimension": lambda: M.effective_dimension(z, 0.5), "redundancy": lambda: M.redundancy(z, labels, 3),
    }
    outside = {name: call() for name, call in calls.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name, call in calls.items():
            torch.testing.assert_close(call(), outside[name], rtol=0, atol=0, msg=name)
    if pytest.importorskip("torchmetrics"):
        metric = M.RankMe(24)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            metric.update(z)
            torch.testing.assert_close(metric.compute(), M.rankme(z), rtol=1e-12, atol=0)
