r"""Closed-form optima of the losses in sslops, from the source papers (float64, exact).

What the papers prove about the losses this library computes, as functions you can call on
your own relation G or data x:

=================================  ==========================================================
:func:`vicreg_optimum`             the minimiser of VICReg's quadratic relaxation over G
                                   (Balestriero & LeCun, NeurIPS 2022, arXiv 2205.11508)
:func:`linear_vicreg_optimum`      the same for a linear encoder Z = xW (locality-preserving
                                   projections)
:func:`infonce_optimum`            InfoNCE / SupCon over balanced classes: a regular simplex
:func:`reconstruction_optimum`     the linear auto-encoder with a supervised head (Theorem 1 of
                                   Balestriero & LeCun, ICML 2024, arXiv 2402.11337)
:func:`denoising_optimum`          the linear denoising auto-encoder under Gaussian noise or
                                   patch masking (Theorem 3 of the same paper)
:func:`laplacian`,                 L = diag(G·1) − G and the connected components of G
:func:`n_components`
:func:`vicreg_quadratic_loss`      the objective :func:`vicreg_optimum` minimises, to check it
=================================  ==========================================================

Conventions (every function):

* **Row notation.** Data x is (N, D), one sample per row; embeddings z are (N, k). x is
  centred per column inside (the optima are invariant to a shift of x, and an encoder's
  offset is free).
* **A relation G** is given as exactly one of ``labels=`` (N,) integers, G_ij =
  [labels_i = labels_j] for i ≠ j; ``pairs=`` (2, P) integer indices with ``num_rows=`` N
  (symmetric: a pair given once counts both ways, duplicates once, self-pairs dropped: the
  same G as :func:`sslops.info_nce_loss` and :func:`sslops.vicreg_relation_loss`); or ``G=``
  a dense symmetric non-negative (N, N) weight matrix (its diagonal is ignored: a self-loop
  does not change L). The optima eigendecompose a dense N×N matrix, so N ≤ 8192
  (:data:`MAX_ROWS`; above it a ``ValueError`` says so).
* **Laplacian spectrum.** L = diag(G·1) − G. Its eigenvectors orthogonal to the constant
  vector, eigenvalues ascending λ_1 ≤ λ_2 ≤ … (λ_1..λ_{c−1} are 0 for a G with c connected
  components), are what the relation optima are built from. For a regular G (two views,
  balanced classes) they are G's top eigenvectors.
* **Inverses of covariances** are taken on the range of x (a pseudo-inverse in the
  eigenbasis of xᵀx: null directions such as always-blank pixels are dropped; an eigenvalue
  counts as zero below ``max(N, D)·eps·λ_max``).
* Everything is computed in float64 on the CPU; results are float64 CPU tensors in
  NamedTuples (scalars are Python numbers). Bad input raises ``ValueError``/``TypeError``
  naming the argument.
"""

import math
import numbers
from typing import NamedTuple

import torch

from . import reference

__all__ = [
    "MAX_ROWS",
    "laplacian",
    "n_components",
    "vicreg_quadratic_loss",
    "vicreg_optimum",
    "linear_vicreg_optimum",
    "infonce_optimum",
    "reconstruction_optimum",
    "denoising_optimum",
    "VICRegOptimum",
    "LinearVICRegOptimum",
    "InfoNCEOptimum",
    "ReconstructionOptimum",
    "DenoisingOptimum",
]

MAX_ROWS = 8192
"""The largest N of a dense relation (an N×N float64 matrix is 512 MiB at N = 8192)."""

_F64 = torch.float64


# ----------------------------------------------------------------------------- results


class VICRegOptimum(NamedTuple):
    """Result of :func:`vicreg_optimum`."""

    embedding: torch.Tensor
    """(N, k) Z* = U diag(s): centred, columns orthogonal, ordered by the eigenvalue they use."""
    variances: torch.Tensor
    """(k,) the diagonal of Cov(Z*) = s²/(N − 1) (Cov(Z*) is diagonal)."""
    rank: int
    """#{j ≤ k : variances_j > 0} = #{j ≤ k : λ_j < βN/(γ(N − 1))}."""
    eigenvalues: torch.Tensor
    """(k,) λ_1..λ_k, the Laplacian eigenvalues (ascending) the columns are built from."""
    loss: float
    """L_q(Z*), the minimum of :func:`vicreg_quadratic_loss`."""


class LinearVICRegOptimum(NamedTuple):
    """Result of :func:`linear_vicreg_optimum`."""

    weight: torch.Tensor
    """(D, k) W*: the encoder is Z = (x − mean x) W*."""
    embedding: torch.Tensor
    """(N, k) (x − mean x) W*."""
    variances: torch.Tensor
    """(k,) the diagonal of Cov(Z) = max(0, 1 − μ_j/(2β)) (Cov(Z) is diagonal)."""
    rank: int
    """#{j ≤ k : μ_j < 2β}."""
    eigenvalues: torch.Tensor
    """(k,) μ_1..μ_k, the smallest eigenvalues of E (ascending)."""
    loss: float
    """L_q(xW*), the minimum over linear encoders."""


class InfoNCEOptimum(NamedTuple):
    """Result of :func:`infonce_optimum`."""

    embedding: torch.Tensor
    """(N, k) unit rows: each row the vector of its class."""
    class_vectors: torch.Tensor
    """(C, k) the regular simplex, in the order of the sorted distinct labels."""
    rank: int
    """C − 1."""
    singular_values: torch.Tensor
    """(C − 1,) all equal to sqrt(N/(C − 1))."""


class ReconstructionOptimum(NamedTuple):
    """Result of :func:`reconstruction_optimum` (V, W, Z of the theorem, then the spectrum)."""

    encoder: torch.Tensor
    """(D, k) V, normalised so that Vᵀ xᵀx V = I (columns ordered by eigenvalue, descending)."""
    head: torch.Tensor
    """(k, C) W = Vᵀxᵀy, the least-squares supervised head on the codes xV."""
    decoder: torch.Tensor
    """(k, D) Z = Vᵀxᵀx, the least-squares decoder of x from the codes xV."""
    eigenvalues: torch.Tensor
    """(k,) the top generalised eigenvalues, descending."""
    loss: float
    """‖y − xVW‖² + lam·‖x − xVZ‖² at the optimum (x centred)."""


class DenoisingOptimum(NamedTuple):
    """Result of :func:`denoising_optimum`."""

    encoder: torch.Tensor
    """(D, k) V, normalised so that Vᵀ G V = I (columns ordered by eigenvalue, descending)."""
    decoder: torch.Tensor
    """(k, D) Z = (VᵀGV)⁻¹ VᵀSᵀx = VᵀSᵀx, the optimal decoder."""
    eigenvalues: torch.Tensor
    """(k,) the top generalised eigenvalues, descending."""
    loss: float
    """E‖x − x'VZ‖² at the optimum (x centred, expectation over the corruption)."""


# ----------------------------------------------------------------------------- input checks


def _check_int(name, value, lo, hi=None, why=""):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {span}{why}, got {value}")
    return value


def _check_number(name, value, *, positive=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    return value


def _as_data(name, x, min_rows=2):
    """x as a centred float64 (N, D) CPU matrix; a real 2-D tensor with N >= min_rows, finite."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must hold real numbers, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D) (2-D), got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows or x.shape[1] < 1:
        raise ValueError(f"{name} must have at least {min_rows} rows and one column, got shape {tuple(x.shape)}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"{name} has {x.shape[0]} rows; the dense closed forms take at most {MAX_ROWS} (sslops.spectral.MAX_ROWS)")
    x = x.detach().to(device="cpu", dtype=_F64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or Inf values")
    return x - x.mean(dim=0)


def _check_index_tensor(name, t, shape_text):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers {shape_text}, got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")


def _relation(labels, pairs, num_rows, G, *, n=None):
    """The relation as a dense symmetric float64 (N, N) weight matrix with a zero diagonal.

    ``n``, when given, is the number of rows the relation must have (the rows of x or z);
    ``num_rows`` is then not needed for ``pairs``.
    """
    given = [name for name, value in (("labels", labels), ("pairs", pairs), ("G", G)) if value is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of labels= (N,), pairs= (2, P) with num_rows=, or G= (N, N); got " + (" and ".join(given) if given else "none"))
    if num_rows is not None:
        num_rows = _check_int("num_rows", num_rows, 2)
        if n is not None and num_rows != n:
            raise ValueError(f"num_rows must equal the number of rows of the data ({n}), got {num_rows}")
    if labels is not None:
        _check_index_tensor("labels", labels, "(N,)")
        if labels.dim() != 1:
            raise ValueError(f"labels must have shape (N,), got {tuple(labels.shape)}")
        rows = labels.shape[0]
        if n is not None and rows != n:
            raise ValueError(f"labels must have one entry per row ({n}), got shape {tuple(labels.shape)}")
        if num_rows is not None and rows != num_rows:
            raise ValueError(f"labels has {rows} entries but num_rows = {num_rows}")
        _check_rows(rows, "labels")
        return reference.relation_matrix(rows, labels=labels.cpu()).to(_F64)
    if pairs is not None:
        _check_index_tensor("pairs", pairs, "(2, P)")
        if pairs.dim() != 2 or pairs.shape[0] != 2:
            raise ValueError(f"pairs must have shape (2, P) (row indices, column indices), got {tuple(pairs.shape)}")
        rows = n if n is not None else num_rows
        if rows is None:
            raise ValueError("pairs= needs num_rows= (the number of rows N of the relation)")
        _check_rows(rows, "num_rows")
        pairs = pairs.cpu().long()
        if pairs.numel():
            lo, hi = int(pairs.min()), int(pairs.max())
            if lo < 0 or hi >= rows:
                raise ValueError(f"pairs must hold indices in [0, {rows}), found {lo if lo < 0 else hi}")
        return reference.relation_matrix(rows, pairs=pairs).to(_F64)
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a torch.Tensor (N, N), got {type(G).__name__}")
    if G.is_complex():
        raise TypeError(f"G must hold real weights, got {G.dtype}")
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be a square (N, N) matrix, got shape {tuple(G.shape)}")
    rows = G.shape[0]
    if n is not None and rows != n:
        raise ValueError(f"G must be ({n}, {n}) (one row per data row), got shape {tuple(G.shape)}")
    if num_rows is not None and rows != num_rows:
        raise ValueError(f"G is {rows}×{rows} but num_rows = {num_rows}")
    _check_rows(rows, "G")
    g = G.detach().to(device="cpu", dtype=_F64)
    if not bool(torch.isfinite(g).all()):
        raise ValueError("G holds NaN or Inf values")
    if bool((g < 0).any()):
        raise ValueError(f"G must be non-negative (a weight per pair), found {float(g.min())}")
    scale = float(g.abs().max()) if g.numel() else 0.0
    asym = float((g - g.T).abs().max()) if g.numel() else 0.0
    if asym > 1e-10 * max(scale, 1e-300):
        raise ValueError(f"G must be symmetric, found |G - Gᵀ| up to {asym:.3g} (max |G| = {scale:.3g})")
    g = (g + g.T) / 2
    g.fill_diagonal_(0.0)
    return g


def _check_rows(rows, name):
    if rows < 2:
        raise ValueError(f"the relation needs at least 2 rows, got N = {rows} (from {name})")
    if rows > MAX_ROWS:
        raise ValueError(f"the relation has N = {rows} rows (from {name}); the dense closed forms take at most {MAX_ROWS} (sslops.spectral.MAX_ROWS)")


# ----------------------------------------------------------------------------- linear algebra


def _laplacian_of(g):
    return torch.diag(g.sum(dim=1)) - g


def _laplacian_eigh(g):
    """Eigenpairs of L orthogonal to the constant vector: (N − 1,) ascending, (N, N − 1).

    The constant direction is moved to the top of the spectrum by adding c·11ᵀ/N with c above
    every eigenvalue of L (λ_max ≤ 2·max degree), so that the N − 1 smallest eigenvectors of
    the shifted matrix are exactly L's orthogonal to 1, even when 0 is a multiple eigenvalue.
    """
    n = g.shape[0]
    lap = _laplacian_of(g)
    shift = 2.0 * float(g.sum(dim=1).max()) + 1.0
    values, vectors = torch.linalg.eigh(lap + shift / n)
    return values[:-1].clamp_min(0.0), vectors[:, :-1]


def _range_eigh(gram, rows):
    """Eigenpairs of a PSD (D, D) Gram matrix on its range: (r,) descending, (D, r)."""
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0), vectors.flip(1)
    top = float(values[0]) if values.numel() else 0.0
    keep = values > max(rows, gram.shape[0]) * torch.finfo(_F64).eps * top
    if top <= 0:
        keep = torch.zeros_like(keep)
    return values[keep], vectors[:, keep]


def _top_generalised(a, b, rows, k, what):
    """Top-k generalised eigenpairs of (a, b), b PSD, on the range of b.

    Returns (k,) eigenvalues descending and (D, k) vectors V with Vᵀ b V = I.
    """
    bv, be = _range_eigh(b, rows)
    if k > bv.numel():
        raise ValueError(f"k must be <= {bv.numel()} (the rank of {what}), got {k}")
    whiten = be / bv.sqrt()
    m = whiten.T @ a @ whiten
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    return values, whiten @ vectors


# ----------------------------------------------------------------------------- relations


def laplacian(*, labels=None, pairs=None, num_rows=None, G=None):
    r"""The graph Laplacian L = diag(G·1) − G of a relation, dense float64 (N, N).

    G from ``labels=``, ``pairs=`` with ``num_rows=``, or a dense weight matrix ``G=`` (see
    :mod:`sslops.spectral`). L is symmetric positive semi-definite, L·1 = 0, and
    Σ_ij G_ij ‖z_i − z_j‖² = 2 tr(zᵀLz) for any (N, k) z.

    Raises:
        ValueError: not exactly one relation; labels of the wrong shape; pairs out of range
            or without ``num_rows``; G not square, not symmetric, negative or non-finite;
            N < 2 or N > 8192.
        TypeError: a relation that is not a tensor of the right kind.
    """
    return _laplacian_of(_relation(labels, pairs, num_rows, G))


def n_components(*, labels=None, pairs=None, num_rows=None, G=None):
    r"""The number of connected components of G (an isolated row is a component of its own).

    L has eigenvalue 0 with multiplicity n_components; one of those eigenvectors is the
    constant vector, so G gives n_components − 1 zero eigenvalues orthogonal to it (the
    rank :func:`vicreg_optimum` falls to at large γ). With ``labels`` it is the number of
    distinct labels; with ``pairs`` or ``G`` (edges where G_ij > 0) it is found by label
    propagation with pointer jumping. Same arguments and errors as :func:`laplacian`.
    """
    g = _relation(labels, pairs, num_rows, G)
    if labels is not None:
        return int(torch.unique(labels).numel())
    rows, cols = torch.nonzero(g > 0, as_tuple=True)
    comp = torch.arange(g.shape[0])
    while True:
        low = torch.minimum(comp[rows], comp[cols])
        new = comp.scatter_reduce(0, rows, low, reduce="amin")
        while True:  # pointer jumping: every row points at the smallest id it has reached
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, comp):
            return int(torch.unique(comp).numel())
        comp = new


def vicreg_quadratic_loss(z, *, labels=None, pairs=None, G=None, beta=1.0, gamma=1.0):
    r"""The quadratic relaxation of VICReg over G that :func:`vicreg_optimum` minimises.

    .. math::

        L_q(Z) = \beta\,\lVert \mathrm{Cov}(Z) - I_k \rVert_F^2
                 + \frac{\gamma}{N}\sum_{ij} G_{ij}\,\lVert z_i - z_j\rVert^2

    with Cov the unbiased (N − 1) covariance of the N rows. Differentiable in ``z`` (computed
    in float64; the result is a 0-d float64 tensor on z's device), so it can be handed to an
    optimiser. G as in :mod:`sslops.spectral` (``pairs`` index rows of z).

    Args:
        z: (N, k) embeddings, N >= 2.
        labels, pairs, G: the relation (exactly one).
        beta: β > 0; gamma: γ >= 0.
    """
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise TypeError(f"z must be a floating torch.Tensor (N, k), got {type(z).__name__ if not isinstance(z, torch.Tensor) else z.dtype}")
    if z.dim() != 2 or z.shape[0] < 2 or z.shape[1] < 1:
        raise ValueError(f"z must have shape (N, k) with N >= 2, k >= 1, got {tuple(z.shape)}")
    beta = _check_number("beta", beta, positive=True)
    gamma = _check_number("gamma", gamma)
    lap = _laplacian_of(_relation(labels, pairs, None, G, n=z.shape[0])).to(z.device)
    n, k = z.shape
    z = z.to(_F64)
    zc = z - z.mean(dim=0)
    cov = zc.T @ zc / (n - 1)
    eye = torch.eye(k, dtype=_F64, device=z.device)
    return beta * ((cov - eye) ** 2).sum() + (2.0 * gamma / n) * (zc * (lap @ zc)).sum()


# ----------------------------------------------------------------------------- VICReg


def vicreg_optimum(k, *, labels=None, pairs=None, num_rows=None, G=None, beta=1.0, gamma=1.0):
    r"""The exact minimiser of VICReg's quadratic (spectral) relaxation over a relation G.

    Balestriero & LeCun, "Contrastive and non-contrastive self-supervised learning recover
    global and local spectral embedding methods" (NeurIPS 2022, arXiv 2205.11508): over free
    embeddings Z (N, k), with Cov unbiased,

    .. math::

        L_q(Z) = \beta\,\lVert \mathrm{Cov}(Z) - I_k \rVert_F^2
                 + \frac{\gamma}{N}\sum_{ij} G_{ij}\,\lVert z_i - z_j\rVert^2
               = \beta\,\lVert \mathrm{Cov}(Z) - I_k \rVert_F^2 + \frac{2\gamma}{N}\,\mathrm{tr}(Z^\top L Z)

    is minimised by

    .. math::

        Z^* = U\,\mathrm{diag}(s)\,R + \mathbf 1 c^\top,\qquad
        s_j^2 = (N-1)\,\max\!\Big(0,\ 1 - \frac{\gamma (N-1)\lambda_j}{\beta N}\Big)

    for any rotation R (k×k) and offset c, with U the k Laplacian eigenvectors orthogonal to
    1 of the smallest eigenvalues λ_1 ≤ … ≤ λ_k (this returns R = I, c = 0). Proof sketch: for
    a fixed Cov(Z) with eigenvalues t_1 ≥ … ≥ t_k, tr(ZᵀLZ) is smallest, (N − 1)Σ t_j λ_j, when
    Z's principal directions are L's bottom eigenvectors (Ky Fan); the problem then splits
    into k scalar problems β(t − 1)² + (2γ(N − 1)/N)λ_j t. Hence

        rank Z* = #{ j ≤ k : λ_j < βN / (γ(N − 1)) }:

    full rank k for small γ/β, down to min(k, n_components(G) − 1) for large γ/β (the zero
    eigenvalues of a disconnected G: each component collapses to a point).

    **This is the quadratic relaxation, not the hinge loss** of :func:`sslops.vicreg_relation_loss`:
    there the variance term is a hinge relu(1 − std) (it does not push variances down to
    1) and the diagonal of Cov is not in the covariance term. The terms map as follows:
    with the library's normalisation (α·var + β·cov + γ·inv, docs/conventions.md §1: cov divided by K, inv
    the mean over nnz(G) ordered pairs and K features), the paper's unnormalised weights are
    α_paper = α/K, β_paper = β/K, γ_paper = γ·N/(nnz(G)·K), where γ_paper multiplies
    (1/N)Σ G_ij‖z_i − z_j‖² as here; so ``vicreg_optimum(beta=β/K, gamma=γ·N/(nnz·K))``
    is the relaxation at a :func:`sslops.vicreg_relation_loss` setting.

    Args:
        k: embedding width, 1 <= k <= N − 1.
        labels, pairs (+ num_rows), G: the relation (exactly one; see :mod:`sslops.spectral`).
        beta: β > 0, the weight of ‖Cov − I‖²; gamma: γ >= 0, the weight of the invariance.
    Returns:
        :class:`VICRegOptimum` (embedding, variances, rank, eigenvalues, loss), float64.
    Raises:
        ValueError / TypeError: a bad relation (see :func:`laplacian`), k out of range,
            β <= 0 or γ < 0.
    """
    g = _relation(labels, pairs, num_rows, G)
    n = g.shape[0]
    k = _check_int("k", k, 1, n - 1, why=" (at most N − 1 directions are orthogonal to the constant vector)")
    beta = _check_number("beta", beta, positive=True)
    gamma = _check_number("gamma", gamma)
    lam, vectors = _laplacian_eigh(g)
    lam, vectors = lam[:k], vectors[:, :k]
    variances = (1.0 - gamma * (n - 1) * lam / (beta * n)).clamp_min(0.0)
    embedding = vectors * ((n - 1) * variances).sqrt()
    loss = beta * float(((variances - 1.0) ** 2).sum()) + (2.0 * gamma * (n - 1) / n) * float((lam * variances).sum())
    return VICRegOptimum(embedding, variances, int((variances > 0).sum()), lam, loss)


def linear_vicreg_optimum(x, k, *, labels=None, pairs=None, G=None, beta=1.0, gamma=1.0):
    r"""VICReg's quadratic relaxation over G for a linear encoder Z = xW (locality-preserving projections).

    Minimises L_q(xW) of :func:`vicreg_quadratic_loss` over W (D, k). With x centred,
    Σ_x = xᵀx/(N − 1) and Σ_x^{-1/2} its pseudo-inverse square root on the range of x,

    .. math::

        E = \Sigma_x^{-1/2}\,\frac{2\gamma}{N}\,x^\top L x\,\Sigma_x^{-1/2},\quad
        E q_j = \mu_j q_j\ (\mu \text{ ascending}),\qquad
        W^* = \Sigma_x^{-1/2}\,[q_1 \dots q_k]\,\mathrm{diag}\Big(\sqrt{\max(0,\,1 - \mu_j/(2\beta))}\Big)

    (substituting W = Σ_x^{-1/2}V turns L_q into β‖VᵀV − I‖² + tr(VᵀEV), solved as in
    :func:`vicreg_optimum`). Cov(xW*) is diagonal with entries max(0, 1 − μ_j/(2β)); its rank is
    #{j : μ_j < 2β}. At small γ every variance is near 1 (whitened PCA of any k directions);
    as γ grows the encoder keeps the directions along which G's neighbours are close. W* has
    no component in the null space of x (the minimal-norm minimiser). Source: the linear case
    of Balestriero & LeCun 2022 (arXiv 2205.11508); He & Niyogi's locality-preserving
    projections are the same eigenproblem.

    Args:
        x: (N, D) data, N >= 2 (any real dtype; centred inside).
        k: 1 <= k <= rank of the centred x.
        labels, pairs, G: the relation over the N rows of x (exactly one; ``pairs`` index rows of x).
        beta: β > 0; gamma: γ >= 0.
    Returns:
        :class:`LinearVICRegOptimum` (weight, embedding, variances, rank, eigenvalues, loss).
    Raises:
        ValueError / TypeError: bad x (not 2-D, non-finite, over 8192 rows), a bad relation,
            k out of range, β <= 0 or γ < 0.
    """
    xc = _as_data("x", x)
    n = xc.shape[0]
    g = _relation(labels, pairs, None, G, n=n)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    beta = _check_number("beta", beta, positive=True)
    gamma = _check_number("gamma", gamma)
    values, vectors = _range_eigh(xc.T @ xc / (n - 1), n)
    k = _check_int("k", k, 1, values.numel(), why=f" (the rank of the centred x is {values.numel()})")
    inv_sqrt = vectors / values.sqrt()  # Σ_x^{-1/2} on the range, (D, r)
    white = xc @ inv_sqrt  # whitened data (N, r)
    e = (2.0 * gamma / n) * (white.T @ (_laplacian_of(g) @ white))
    mu, q = torch.linalg.eigh((e + e.T) / 2)
    mu, q = mu[:k], q[:, :k]
    variances = (1.0 - mu / (2.0 * beta)).clamp_min(0.0)
    weight = inv_sqrt @ q * variances.sqrt()
    loss = beta * float(((variances - 1.0) ** 2).sum()) + float((mu * variances).sum())
    return LinearVICRegOptimum(weight, xc @ weight, variances, int((variances > 0).sum()), mu, loss)


# ----------------------------------------------------------------------------- InfoNCE


def infonce_optimum(labels, k):
    r"""The minimiser of InfoNCE / SupCon over balanced classes: a regular simplex.

    For N rows in C classes of N/C rows each, with k >= C − 1 dimensions, SupCon's L_out
    (and InfoNCE with the class relation, :func:`sslops.info_nce_loss` with ``labels=``) on
    the unit sphere is minimised, at any temperature, by putting every row of class c at
    one unit vector v_c, the v_c forming a regular simplex centred at 0 (Graf et al., ICML
    2021, "Dissecting supervised contrastive learning"; the neural-collapse geometry):

        ⟨v_c, v_c⟩ = 1,  ⟨v_c, v_d⟩ = −1/(C − 1) (c ≠ d),  Σ_c v_c = 0.

    The embedding has rank C − 1 and every nonzero singular value is sqrt(N/(C − 1))
    (ZᵀZ = (N/C)·VᵀV and VVᵀ = (C/(C − 1))(I − 11ᵀ/C)). Unlike the quadratic VICReg of
    :func:`vicreg_optimum` at small γ, which keeps all k directions, InfoNCE over a C-class G
    uses exactly C − 1. The simplex here lies in the first C − 1 coordinates (any rotation
    is optimal too).

    Args:
        labels: (N,) integer class ids, every class the same size, at least 2 classes.
        k: embedding width, k >= C − 1.
    Returns:
        :class:`InfoNCEOptimum` (embedding, class_vectors, rank, singular_values), float64.
    Raises:
        ValueError / TypeError: labels not a 1-D integer tensor, fewer than 2 classes,
            unequal class sizes, k < C − 1.
    """
    _check_index_tensor("labels", labels, "(N,)")
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape (N,), got {tuple(labels.shape)}")
    classes, index, counts = torch.unique(labels.cpu(), return_inverse=True, return_counts=True)
    c = classes.numel()
    if c < 2:
        raise ValueError(f"labels must hold at least 2 classes, got {c}")
    if bool((counts != counts[0]).any()):
        raise ValueError(f"labels must be balanced (every class the same size), got class sizes {counts.tolist()}")
    k = _check_int("k", k, max(c - 1, 1), why=f" (C − 1 = {c - 1} for {c} classes)")
    n = labels.shape[0]
    # The centred one-hot vertices e_c − 1/C, unit-normed, in an orthonormal basis of 1^⊥:
    # the C − 1 eigenvectors of the centring matrix with eigenvalue 1.
    centring = torch.eye(c, dtype=_F64) - 1.0 / c
    basis = torch.linalg.eigh(centring).eigenvectors[:, 1:]  # (C, C − 1), orthogonal to 1
    simplex = centring @ basis / math.sqrt(1.0 - 1.0 / c)
    vectors = torch.zeros(c, k, dtype=_F64)
    vectors[:, : c - 1] = simplex
    singular = torch.full((c - 1,), math.sqrt(n / (c - 1)), dtype=_F64)
    return InfoNCEOptimum(vectors[index], vectors, c - 1, singular)


# ----------------------------------------------------------------------------- reconstruction


def _targets(y, n):
    """y as a float64 (N, C) matrix: class ids (N,) one-hot (not centred), or (N, C) targets."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor: (N,) class ids or (N, C) targets, got {type(y).__name__}")
    if y.dim() == 1:
        _check_index_tensor("y", y, "(N,)")
        if y.shape[0] != n:
            raise ValueError(f"y must have one entry per row of x ({n}), got shape {tuple(y.shape)}")
        _, index = torch.unique(y.cpu(), return_inverse=True)
        return torch.nn.functional.one_hot(index).to(_F64)
    if y.dim() != 2 or y.shape[0] != n or y.shape[1] < 1:
        raise ValueError(f"y must have shape ({n},) or ({n}, C), got {tuple(y.shape)}")
    if y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"y targets must be real numbers, got {y.dtype}")
    y = y.detach().to(device="cpu", dtype=_F64)
    if not bool(torch.isfinite(y).all()):
        raise ValueError("y holds NaN or Inf values")
    return y


def reconstruction_optimum(x, y, k, *, lam):
    r"""The linear auto-encoder with a supervised head: Theorem 1 of Balestriero & LeCun 2024.

    "Learning by reconstruction produces uninformative features for perception" (ICML 2024,
    arXiv 2402.11337), in row notation: x (N, D) centred, y (N, C). The minimiser of

    .. math::

        \lVert y - xVW \rVert_F^2 + \lambda\,\lVert x - xVZ \rVert_F^2
        \quad\text{over } V\ (D\times k),\ W\ (k\times C),\ Z\ (k\times D)

    has span(V) = the top-k generalised eigenvectors of (xᵀ(yyᵀ + λxxᵀ)x, xᵀx): for fixed V
    the best W and Z are least-squares fits on the codes xV, leaving
    ‖y‖² + λ‖x‖² − tr(P_{xV}(yyᵀ + λxxᵀ)), a generalised Rayleigh quotient. λ → ∞ gives PCA
    (pure reconstruction), λ = 0 the supervised subspace (at most C directions carry
    signal). V is returned with Vᵀxᵀx V = I, so W = Vᵀxᵀy and Z = Vᵀxᵀx. The inverse of
    xᵀx is taken on the range of x. Feed ``encoder`` to
    :func:`sslops.metrics.alignment` (``directions=``) to see how much of y it captures.

    Args:
        x: (N, D) data (centred inside), N >= 2.
        y: (N,) class ids (one-hot, not centred) or (N, C) real targets.
        k: 1 <= k <= rank of the centred x.
        lam: λ >= 0, the weight of reconstruction (keyword).
    Returns:
        :class:`ReconstructionOptimum` (encoder V, head W, decoder Z, eigenvalues, loss).
    Raises:
        ValueError / TypeError: bad x or y (shape, dtype, non-finite), k out of range, λ < 0.
    """
    xc = _as_data("x", x)
    n = xc.shape[0]
    yt = _targets(y, n)
    lam = _check_number("lam", lam)
    _check_int("k", k, 1)
    gram = xc.T @ xc
    xy = xc.T @ yt
    values, v = _top_generalised(xy @ xy.T + lam * gram @ gram, gram, n, int(k), "the centred x")
    loss = float((yt**2).sum()) + lam * float((xc**2).sum()) - float(values.sum())
    return ReconstructionOptimum(v, v.T @ xy, v.T @ gram, values, loss)


def _same_patch(image_shape, patch, d):
    """(D, D) bool: pixels i, j in the same patch×patch block (all channels), D = prod(image_shape)."""
    if isinstance(image_shape, torch.Size):
        image_shape = tuple(image_shape)
    if not isinstance(image_shape, (tuple, list)) or len(image_shape) not in (2, 3):
        raise ValueError(f"image_shape must be (H, W) or (C, H, W), got {image_shape!r}")
    dims = [_check_int("image_shape", s, 1) for s in image_shape]
    if math.prod(dims) != d:
        raise ValueError(f"image_shape {tuple(dims)} has {math.prod(dims)} pixels, but x has D = {d} columns")
    channels, height, width = ([1] + dims)[-3:]
    if height % patch or width % patch:
        raise ValueError(f"patch = {patch} must tile the image: H = {height} and W = {width} must be multiples of it")
    rows = torch.arange(height).div(patch, rounding_mode="floor")
    cols = torch.arange(width).div(patch, rounding_mode="floor")
    block = (rows[:, None] * (width // patch) + cols[None, :]).reshape(-1).repeat(channels)
    return block[:, None] == block[None, :]


def denoising_optimum(x, k, *, noise_std=None, mask_prob=None, patch=None, image_shape=None):
    r"""The linear denoising auto-encoder: Theorem 3 of Balestriero & LeCun 2024 (arXiv 2402.11337).

    Row notation: x (N, D) centred, x' a random corruption of x. The minimiser of
    E‖x − x'VZ‖²_F over V (D×k), Z (k×D) has span(V) = the top-k generalised eigenvectors of

    .. math::

        (S^\top x\,x^\top S,\ G),\qquad S = \mathbb E[x'] \ (N\times D),\quad
        G = \mathbb E[x'^\top x'] \ (D\times D)

    (for fixed V the best Z is (VᵀGV)⁻¹VᵀSᵀx, leaving ‖x‖² − tr((VᵀGV)⁻¹VᵀSᵀxxᵀSV)). The
    corruptions, exactly one of:

    * **Gaussian noise** (``noise_std`` = σ): x' = x + σ·ε, S = x, G = xᵀx + Nσ²I. The
      generalised eigenvectors are the principal directions, in the same order
      (eigenvalues e²/(e + Nσ²), increasing in e): the alignment of the encoder with any
      labels is exactly that of PCA.
    * **Masking** (``mask_prob`` = p in [0, 1), ``patch`` = P, default 1): non-overlapping
      P×P blocks of pixels (all channels of a block together) are zeroed independently
      with probability p, no rescaling: S = (1 − p)x and
      G = (1 − p)²xᵀx + p(1 − p)·blockdiag_P(xᵀx), where blockdiag_P keeps the entries
      of pixels in the same block. The extra term penalises directions whose variance sits
      on few pixels (per-pixel noise), which is how masking helps perception.

    G's inverse is taken on its range. Feed ``encoder`` to
    :func:`sslops.metrics.alignment` (``directions=``).

    Args:
        x: (N, D) data (centred inside), N >= 2; for masking with P > 1 the columns are the
            pixels of ``image_shape`` in row-major (C, H, W) order.
        k: 1 <= k <= rank of the centred x.
        noise_std: σ >= 0, or
        mask_prob: p in [0, 1), with
        patch: the block side P >= 1 (default 1, pixel masking) and
        image_shape: (H, W) or (C, H, W), needed when P > 1; P must divide H and W. Give it
            for C > 1 channels also at P = 1, so that a pixel's channels drop together;
            without it every column of x drops on its own.
    Returns:
        :class:`DenoisingOptimum` (encoder V, decoder Z, eigenvalues, loss).
    Raises:
        ValueError / TypeError: not exactly one of noise_std / mask_prob, p outside [0, 1),
            a patch that does not tile the image, a shape that does not match D, bad x,
            k out of range.
    """
    xc = _as_data("x", x)
    n, d = xc.shape
    if (noise_std is None) == (mask_prob is None):
        raise ValueError("give exactly one of noise_std= (Gaussian noise) or mask_prob= (masking); got " + ("both" if noise_std is not None else "neither"))
    gram = xc.T @ xc
    if noise_std is not None:
        if patch is not None or image_shape is not None:
            raise ValueError("patch= and image_shape= go with mask_prob=, not with noise_std=")
        sigma = _check_number("noise_std", noise_std)
        keep = 1.0
        cov = gram + n * sigma**2 * torch.eye(d, dtype=_F64)
    else:
        if isinstance(mask_prob, bool) or not isinstance(mask_prob, numbers.Real):
            raise TypeError(f"mask_prob must be a real number, got {type(mask_prob).__name__}")
        p = float(mask_prob)
        if not (0.0 <= p < 1.0):
            raise ValueError(f"mask_prob must be in [0, 1) (the probability of dropping a patch), got {mask_prob}")
        patch = 1 if patch is None else _check_int("patch", patch, 1)
        if patch > 1 and image_shape is None:
            raise ValueError(f"patch = {patch} needs image_shape= (H, W) or (C, H, W) to know which pixels form a block")
        same = _same_patch(image_shape, patch, d) if image_shape is not None else torch.eye(d, dtype=torch.bool)
        keep = 1.0 - p
        cov = keep**2 * gram + p * keep * torch.where(same, gram, torch.zeros_like(gram))
    _check_int("k", k, 1)
    rank = _range_eigh(gram, n)[0].numel()
    _check_int("k", k, 1, rank, why=f" (the rank of the centred x is {rank})")
    a = keep**2 * gram @ gram  # Sᵀx xᵀS
    values, v = _top_generalised(a, cov, n, int(k), "E[x'ᵀx']")
    loss = float((xc**2).sum()) - float(values.sum())
    return DenoisingOptimum(v, keep * v.T @ gram, values, loss)
