r"""Collapse and alignment diagnostics, exact, streaming and distributed (README "Monitoring collapse").

Functions (pure PyTorch, float64 results on the input's device):

- :func:`rankme`: RankMe, the entropy-effective rank of the singular values of z;
- :func:`effective_rank`: Roy & Vetterli's effective rank of any matrix;
- :func:`lidar`: LiDAR, the effective rank of the LDA matrix of augmented views;
- :func:`std_of_l2_normalized`: SimSiam's collapse check (mean std of row-normalised z);
- :func:`alignment`: reconstruction vs. perception, the alignment(k) curve;
- :func:`effective_dimension`: d_λ = tr(Σ(Σ + λI)⁻¹) of a feature map;
- :func:`redundancy`: the low-rank redundancy ε_s of features beyond the labels;

and the streaming :class:`RankMe`, :class:`EffectiveRank`, :class:`LiDAR` (torchmetrics
``Metric`` s: ``update`` / ``compute`` / ``reset``, synchronised across ranks), which need
the optional extra ``pip install "sslops[metrics]"`` (torchmetrics); everything else needs
only torch.

How they are computed. The singular values σ of an (N, K) matrix are the square roots of
the eigenvalues of its smaller Gram matrix, ZᵀZ (K×K) or ZZᵀ (N×N when N < K): never an
SVD of a tall matrix, never an N×N matrix when N > K. The Gram matrix is summed over blocks
of rows: each block is shifted by its own mean (in the product dtype), multiplied in
float32 for fp16/bf16/fp32 inputs or float64 for float64 inputs (scaled by a power of two
first, so no product overflows or underflows), and added in float64 together with the
exact float64 correction for the shift:

    ZᵀZ = Σ_b [ (Z_b - 1c_bᵀ)ᵀ(Z_b - 1c_bᵀ) + c_b s_bᵀ + s_b c_bᵀ - n_b c_b c_bᵀ ],
    s_b = Z_bᵀ1,     centred: ZᵀZ - s sᵀ/N  (s = Σ_b s_b)

so centring stays accurate when the column means are far larger than the spread, and
memory above the input is O(K²) plus one block of rows. The eigenvalues are taken in float64
(``eigvalsh``) and those at or below the rounding level of the sums are set to 0, so that
rounding noise of a rank-deficient input is not read as small singular values:

    floor = Σ_b u·tr(block product) + d·2⁻⁵³·(tr within + |tr between|)

(u the unit roundoff of the product dtype, 2⁻²⁴ or 2⁻⁵³; d the Gram size). With fp32
products this resolves singular values down to about √(u·tr ZcᵀZc / λ_max)·σ_max (Zc the
block-centred rows): for a spectrum falling by 10⁴ over 512 directions, RankMe of fp32 input
is then about 1 % below the float64 SVD's; pass float64 input for float64 resolution.

Inputs: (N, K) floating tensors, any layout; ``torch.autocast`` is switched off inside
(its fp16/bf16 products would break the rounding analysis above). Bad arguments raise ``ValueError`` or
``TypeError`` naming the argument (docs/conventions.md §6); a NaN or Inf input gives a NaN
result (never a linear-algebra error); ``sslops.set_debug(True)`` raises on it instead.
MPS has no float64: inputs on MPS are copied to the CPU and the result is a CPU tensor.
"""

import math
import numbers
from typing import NamedTuple

import torch

from . import _validation as V
from ._autocast import disabled

__all__ = [
    "rankme",
    "effective_rank",
    "lidar",
    "std_of_l2_normalized",
    "alignment",
    "effective_dimension",
    "redundancy",
]  # and RankMe, EffectiveRank, LiDAR (loaded on first use: they need torchmetrics)

F64 = torch.float64
# Elements of one block of rows multiplied at once (4 MB in fp32; at least K rows, see
# _row_blocks): bounds the memory above the input without changing the result.
_BLOCK_ELEMENTS = 1 << 20
_STREAMING = ("RankMe", "EffectiveRank", "LiDAR")


# ----------------------------------------------------------------------------- the Gram route


def product_dtype(dtype):
    """The dtype of the block products: float64 for float64 inputs, float32 otherwise."""
    return F64 if dtype == F64 else torch.float32


def unit_roundoff(dtype):
    """u of the product dtype of ``dtype`` inputs: 2⁻⁵³ for float64, 2⁻²⁴ otherwise."""
    return 2.0**-53 if product_dtype(dtype) == F64 else 2.0**-24


U64 = 2.0**-53


def _computable(t):
    """MPS has no float64: such inputs are computed on the CPU."""
    return t.cpu() if t is not None and t.device.type == "mps" else t


def _row_blocks(n, k, product=True):
    """[(start, stop)] over n rows of width k: about _BLOCK_ELEMENTS elements; with
    ``product`` (blocks multiplied into a K×K sum) at least 2k rows, so that a block costs
    about the memory of one K×K float64 sum and the float64 addition of its K×K product
    stays small against the product itself."""
    step = max(1, _BLOCK_ELEMENTS // max(k, 1), 2 * k if product else 1)
    return [(start, min(n, start + step)) for start in range(0, n, step)]


def _power_of_two_scale(t):
    """(scale, back²): scale = 2^-e (t's dtype) brings max|t| into [0.5, 1); back² = 2^2e in
    float64 undoes it on a product. Exact; e is clamped so that the scale stays finite."""
    low, high = torch.aminmax(t)
    _, exponent = torch.frexp(torch.maximum(high, -low))
    exponent = exponent.clamp(-120, 120)
    one = torch.ones((), dtype=t.dtype, device=t.device)
    back = torch.ldexp(torch.ones((), dtype=F64, device=t.device), exponent)
    return torch.ldexp(one, -exponent), back * back


def add_block_gram(acc, c, back2):
    """acc (float64) += cᵀc · back², the product in c's dtype (one pass over acc)."""
    return acc.addcmul_(c.T @ c, back2)


def block_gram(c, owned=False):
    """cᵀc in float64 for a block ``c`` in the product dtype.

    The block is scaled by an exact power of two first (its largest entry into [0.5, 1)),
    so no product overflows or underflows whatever the scale of the input; NaN or Inf in
    ``c`` gives non-finite entries. ``owned``: ``c`` is a temporary, scaled in place.
    """
    scale, back2 = _power_of_two_scale(c)
    c = c.mul_(scale) if owned else c * scale
    return add_block_gram(torch.zeros(c.shape[1], c.shape[1], dtype=F64, device=c.device), c, back2)


class Moments(NamedTuple):
    """Float64 sums over rows x_i (K,) from which the Gram matrix and its centring follow.

    ``within + between`` = Σ_i x_i x_iᵀ: ``within`` sums the block products of the shifted
    rows, ``between`` their exact float64 correction (module docstring); ``total`` = Σ_i
    x_i; ``noise`` = Σ_blocks u·tr(block product), the rounding scale of ``within`` (u of
    the product dtype). Field-wise sums of Moments of several row sets are the Moments
    of their union: the streaming metrics keep these as their state.
    """

    count: torch.Tensor
    total: torch.Tensor
    within: torch.Tensor
    between: torch.Tensor
    noise: torch.Tensor

    def gram(self, center=False):
        """Σ x xᵀ (K, K), or with ``center`` the scatter Σ (x − x̄)(x − x̄)ᵀ."""
        gram = self.within + self.between
        if center:
            gram.sub_(torch.outer(self.total / self.count.clamp_min(1.0), self.total))
        return gram

    def floor(self):
        """The rounding level of :meth:`gram` (eigenvalues below it are not resolved)."""
        d = self.within.shape[0]
        return self.noise + d * U64 * (self.within.diagonal().sum() + self.between.diagonal().sum().abs())


def row_moments(x):
    """The :class:`Moments` of the rows of ``x`` (N, K), over blocks of rows (no host sync).

    The block and K×K buffers are allocated once per call and reused (fresh large
    allocations cost page faults on every block).
    """
    n, k = x.shape
    pdt = product_dtype(x.dtype)
    blocks = _row_blocks(n, k)
    device = x.device
    total = torch.zeros(k, dtype=F64, device=device)
    within = torch.zeros(k, k, dtype=F64, device=device)
    between = torch.zeros(k, k, dtype=F64, device=device)
    widest = max(stop - start for start, stop in blocks)
    shifted_buffer = torch.empty(widest, k, dtype=pdt, device=device)
    cast_buffer = torch.empty(widest, k, dtype=pdt, device=device) if x.dtype != pdt else None
    product = torch.empty(k, k, dtype=pdt, device=device)
    product64 = product if pdt == F64 else torch.empty(k, k, dtype=F64, device=device)
    for start, stop in blocks:
        rows = stop - start
        block = x[start:stop] if cast_buffer is None else cast_buffer[:rows].copy_(x[start:stop])
        scale, back2 = _power_of_two_scale(block)
        shift = block.mean(dim=0)
        shifted = torch.addcmul(-(shift * scale), block, scale, out=shifted_buffer[:rows])  # (block − shift)·scale
        c = shift.to(F64)
        # Σ rows = n·c + Σ (rows − c): the small shifted values summed in the product dtype
        # (a float64 sum of the block would copy it whole)
        s = rows * c + shifted.sum(dim=0).to(F64) / scale.to(F64)
        torch.mm(shifted.T, shifted, out=product)
        if product64 is not product:
            product64.copy_(product)
        within.addcmul_(product64, back2)
        between.addmm_(torch.stack([c, s, c], dim=1), torch.stack([s, c, -rows * c]))  # c sᵀ + s cᵀ − n c cᵀ
        total += s
    count = torch.full((), float(n), dtype=F64, device=device)
    return Moments(count, total, within, between, unit_roundoff(x.dtype) * within.diagonal().sum())


def _wide_gram(x, center):
    """(x xᵀ (N, N) float64, its rounding level) for N < K, over blocks of columns."""
    n, k = x.shape
    pdt = product_dtype(x.dtype)
    mean = x.sum(dim=0, dtype=F64) / n if center else None
    gram = torch.zeros(n, n, dtype=F64, device=x.device)
    for start, stop in _row_blocks(k, n):
        cols = x[:, start:stop]
        if center:
            cols = cols.to(F64) - mean[start:stop]
        gram += block_gram(cols.to(pdt).T, owned=center or x.dtype != pdt)
    trace = gram.diagonal().sum()
    return gram, (unit_roundoff(x.dtype) + n * U64) * trace


def small_gram(x, center=False):
    """(the smaller Gram matrix of ``x`` (N, K) in float64, its rounding level).

    xᵀx (K×K) when N ≥ K, else x xᵀ (N×N); with ``center``, of the column-centred x. Its
    nonzero eigenvalues are the squared singular values of x (of the centred x).
    """
    n, k = x.shape
    if n < k:
        return _wide_gram(x, center)
    moments = row_moments(x)
    return moments.gram(center), moments.floor()


def _finite_or_ones(m):
    """(m, or all ones if m holds NaN/Inf; a 0-dim "was finite" flag): no host sync."""
    ok = torch.isfinite(m.sum())  # NaN and ±Inf entries all reach the sum (one pass)
    return torch.where(ok, m, torch.ones((), dtype=m.dtype, device=m.device)), ok


def gram_eigenvalues(gram, floor):
    """Eigenvalues of a symmetric float64 matrix, descending, those ≤ ``floor`` set to 0.

    ``floor`` (a float or 0-dim tensor) is the rounding level of ``gram``
    (:meth:`Moments.floor`). Returns ``(eigenvalues, finite)``: a non-finite ``gram`` gives
    dummy values and ``finite`` False, for the caller to turn into NaN (never a
    linear-algebra error; no host sync).
    """
    safe, finite = _finite_or_ones(gram)
    w = torch.linalg.eigvalsh(safe).flip(0)
    return torch.where(w > floor, w, torch.zeros_like(w)), finite


def entropy_rank(values, eps, count=None):
    """exp(H(p)), p_k = v_k/‖v‖₁ + eps, over the first ``count`` of the descending ``values``.

    ``count`` (a 0-dim tensor or int; default all) is how many entries take part (RankMe's
    k ≤ min(N, K)); the rest must be 0 and are left out. A zero ``values`` gives
    exp(-count·eps·log eps) (1 at eps = 0). No host sync.
    """
    m = values.shape[0]
    total = values.sum().clamp_min(torch.finfo(F64).tiny)
    p = values / total + eps
    if count is not None:
        keep = torch.arange(m, device=values.device) < count
        p = torch.where(keep, p, torch.zeros_like(p))
    return torch.exp(-torch.special.xlogy(p, p).sum())


def _nan_unless(finite, value):
    return torch.where(finite, value, torch.full_like(value, float("nan")))


def singular_value_rank(gram, floor, count, eps):
    """The entropy rank of the singular values √λ(gram) (RankMe, effective rank): no sync."""
    w, finite = gram_eigenvalues(gram, floor)
    return _nan_unless(finite, entropy_rank(w.sqrt(), eps, count))


# ----------------------------------------------------------------------------- checks


def _check_eps(eps, name="eps"):
    V.check_real(name, eps)
    if eps < 0:
        raise ValueError(f"{name} must be >= 0, got {eps}")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")


def _check_int(name, value, low, why=""):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}{why}, got {value}")


def check_groups(groups, n, device):
    """``groups`` (N,) integer ids on z's device."""
    if not isinstance(groups, torch.Tensor):
        raise TypeError(f"groups must be a torch.Tensor of integer source ids, got {type(groups).__name__}")
    if groups.dtype not in V.INDEX_DTYPES:
        raise TypeError(f"groups must have an integer dtype, got {groups.dtype}")
    if groups.dim() != 1 or groups.shape[0] != n:
        raise ValueError(f"groups must have shape ({n},) (one source id per row of z), got {tuple(groups.shape)}")
    if groups.device != device:
        raise ValueError(f"groups must be on the same device as z ({device}), got {groups.device}")


# ----------------------------------------------------------------------------- RankMe, effective rank


@disabled  # autocast would turn the products into fp16/bf16 ones
def rankme(z, *, eps=1e-7, center=False):
    r"""RankMe of embeddings ``z`` (Garrido, Balestriero, Najman & LeCun, ICML 2023).

    .. math::

        p_k = \frac{\sigma_k(z)}{\lVert\sigma(z)\rVert_1} + \epsilon,\qquad
        \mathrm{RankMe}(z) = \exp\Big(-\sum_{k \le \min(N, K)} p_k \log p_k\Big)

    the exponential of the entropy of the normalised singular values: about r for r equal
    nonzero singular values (three among eight give 3.0000243 at eps = 1e-7, exactly 3 at
    eps = 0), K for isotropic embeddings, near 1 for collapsed ones. Uncentred, as in the
    paper; ``center=True`` subtracts the column means first. The paper's eps is 1e-7;
    stable-pretraining's RankMe callback uses 1e-5 (``rankme(z, eps=1e-5)`` gives its
    number, up to its SVD's rounding). reptrix's "RankMe" takes the PCA spectrum, σ² of the
    centred z: it is ``effective_rank(torch.cov(z.T), eps=1e-7)`` (K ≤ 2048), a smaller
    number (see :func:`effective_rank`), not RankMe.

    Cost: σ² are the eigenvalues of the smaller Gram matrix (module docstring): one pass
    of N·K² multiply-adds in float32 (float64 for float64 input) and one min(N, K)²
    ``eigvalsh``; memory O(K²) above the input. For every batch of a training run, the
    streaming :class:`RankMe` gives the value over all rows seen.

    Args:
        z: (N, K) embeddings, fp16/bf16/fp32/fp64, N ≥ 1 (N ≥ 2 with ``center``).
        eps: ε ≥ 0 added to every normalised singular value.
        center: subtract the column means first.
    Returns:
        0-dim float64 tensor on z's device (CPU for MPS inputs); NaN if z holds NaN/Inf.
    Raises:
        TypeError, ValueError: naming the argument (not 2-D, N < 2 with ``center``, eps < 0).
    """
    V.check_embedding("z", z, min_rows=2 if center else 1, why_rows=" (center=True subtracts the mean of the rows)")
    _check_eps(eps)
    _check_bool("center", center)
    z = _computable(z)
    n, k = z.shape
    return singular_value_rank(*small_gram(z, center), min(n, k), float(eps))


@disabled
def effective_rank(a, *, eps=0.0):
    r"""Effective rank of any matrix (Roy & Vetterli, EUSIPCO 2007).

    .. math::

        p_k = \frac{\sigma_k(A)}{\lVert\sigma(A)\rVert_1} + \epsilon,\qquad
        \mathrm{erank}(A) = \exp\Big(-\sum_k p_k \log p_k\Big)

    over the min(M, N) singular values of A (the same entropy as :func:`rankme`, with
    ε = 0 by default). For a positive semi-definite A the singular values are its
    eigenvalues, so erank(A) = exp(VNE(A / tr A)), VNE(P) = −tr(P log P) the von Neumann
    entropy (the quantity Matrix-SSL, arXiv 2305.17326, tracks).

    The trap: the effective rank of a covariance matrix weights the directions of z by σ²,
    not σ, so it is smaller::

        effective_rank(torch.cov(z.T)) <= rankme(z, center=True, eps=0)

    (equality only when the nonzero singular values are equal); reptrix's "RankMe" is the
    left-hand side. A square A is decomposed by ``torch.linalg.svdvals`` in float64; a
    rectangular one through its smaller Gram matrix (module docstring).

    Args:
        a: (M, N) matrix, fp16/bf16/fp32/fp64.
        eps: ε ≥ 0.
    Returns:
        0-dim float64 tensor on a's device (CPU for MPS); NaN if a holds NaN/Inf.
    """
    V.check_embedding("a", a)
    _check_eps(eps)
    a = _computable(a)
    m, n = a.shape
    if m != n:
        return singular_value_rank(*small_gram(a), min(m, n), float(eps))
    safe, finite = _finite_or_ones(a.to(F64))
    return _nan_unless(finite, entropy_rank(torch.linalg.svdvals(safe), float(eps)))


# ----------------------------------------------------------------------------- LiDAR


def group_sums(z, groups):
    """Per-source sums without a host sync: ``(slot, counts, sums)``.

    ``slot`` (N,) maps each row to a source slot in [0, N) (sources numbered in the order
    of their ids); ``counts`` (N,) and ``sums`` (N, K) float64 are zero for unused slots.
    """
    n, k = z.shape
    order = torch.argsort(groups, stable=True)
    ids = groups[order]
    new = torch.ones(n, dtype=torch.int64, device=z.device)
    new[1:] = (ids[1:] != ids[:-1]).to(torch.int64)
    slot = torch.empty(n, dtype=torch.int64, device=z.device)
    slot[order] = torch.cumsum(new, 0) - 1
    counts = torch.zeros(n, dtype=F64, device=z.device).index_add_(0, slot, torch.ones(n, dtype=F64, device=z.device))
    sums = torch.zeros(n, k, dtype=F64, device=z.device)
    for start, stop in _row_blocks(n, k, product=False):
        sums.index_add_(0, slot[start:stop], z[start:stop].to(F64))
    return slot, counts, sums


def lidar_moments(z, groups):
    """The float64 sums LiDAR is computed from, for whole groups (no host sync).

    Returns a dict: ``rows`` (N), ``sources`` (n), ``singletons`` (sources with one row),
    ``residual`` = Σ_i Σ_j (z_ij − μ_i)(z_ij − μ_i)ᵀ, and the :func:`row_moments` of the
    source means μ_i (``mean_total``, ``mean_within``, ``mean_between``). Sums of several
    calls add up (the streaming :class:`LiDAR` state).
    """
    n, k = z.shape
    pdt = product_dtype(z.dtype)
    slot, counts, sums = group_sums(z, groups)
    used = counts > 0
    means = sums / counts.clamp_min(1.0).unsqueeze(1)
    residual = torch.zeros(k, k, dtype=F64, device=z.device)
    for start, stop in _row_blocks(n, k):
        residual += block_gram((z[start:stop].to(F64) - means[slot[start:stop]]).to(pdt), owned=True)
    sources = used.sum().to(F64)
    # moments of the source means (float64 rows; unused slots are zero rows, taken out exactly)
    mean_total = means.sum(dim=0)
    shift = mean_total / sources.clamp_min(1.0)
    centred = torch.where(used.unsqueeze(1), means - shift, torch.zeros_like(means))
    cs = torch.outer(shift, mean_total)
    return {
        "rows": torch.full((), float(n), dtype=F64, device=z.device),
        "sources": sources,
        "singletons": (counts == 1).sum().to(F64),
        "residual": residual,
        "mean_total": mean_total,
        "mean_within": centred.T @ centred,
        "mean_between": cs + cs.T - sources * torch.outer(shift, shift),
    }


def lidar_from_moments(m, delta, eps):
    r"""LiDAR from :func:`lidar_moments` sums (no host sync; see :func:`check_lidar_moments`)."""
    k = m["residual"].shape[0]
    n = m["sources"]
    eye = torch.eye(k, dtype=F64, device=n.device)
    sigma_w = m["residual"] / (m["rows"] - n).clamp_min(1.0) + delta * eye
    between = m["mean_within"] + m["mean_between"] - torch.outer(m["mean_total"], m["mean_total"]) / n.clamp_min(1.0)
    sigma_b = between / (n - 1.0).clamp_min(1.0)
    sigma_w, finite_w = _finite_or_ones(sigma_w)
    sigma_b, finite_b = _finite_or_ones(sigma_b)
    # Σ_w^{-1/2} from its eigendecomposition (eigenvalues clamped at δ: Σ_w - δI is PSD)
    w, v = torch.linalg.eigh(sigma_w)
    root = v * w.clamp_min(delta).rsqrt()
    lda = root.T @ sigma_b @ root  # similar to Σ_w^{-1/2} Σ_b Σ_w^{-1/2}: the same eigenvalues
    # Σ_b is exact float64 (from float64 means), and congruence keeps its null space:
    # the LDA eigenvalues are resolved to float64 rounding.
    lam, finite = gram_eigenvalues((lda + lda.T) / 2, k * U64 * lda.diagonal().sum().abs())
    return _nan_unless(finite & finite_w & finite_b, entropy_rank(lam, eps))


def check_lidar_moments(m, where):
    """The data-dependent LiDAR checks (one host sync): a source with one view, < 2 sources."""
    singletons, sources = (int(v) for v in torch.stack([m["singletons"], m["sources"]]).tolist())
    if singletons:
        raise ValueError(
            f"groups: {singletons} source(s) have a single view in {where}; LiDAR needs at least two "
            "views of every source, all in the same update (and on the same rank)")
    if sources < 2:
        raise ValueError(f"groups: LiDAR needs at least two sources (distinct group ids), got {sources} in {where}")


@disabled
def lidar(z, groups, *, delta=1e-4, eps=1e-8):
    r"""LiDAR of augmented embeddings (Thilak et al., "LiDAR: Sensing linear probing performance
    in joint embedding SSL architectures", ICLR 2024).

    Row i of ``z`` is a view of source ``groups[i]`` (n sources, q_i ≥ 2 views each, rows in
    any order); μ_i is the mean of source i's views and μ the mean of the μ_i:

    .. math::

        \Sigma_b = \frac{1}{n-1}\sum_i (\mu_i-\mu)(\mu_i-\mu)^\top,\qquad
        \Sigma_w = \frac{1}{\sum_i (q_i - 1)}\sum_i\sum_j (z_{ij}-\mu_i)(z_{ij}-\mu_i)^\top + \delta I

        \lambda = \mathrm{eig}(\Sigma_w^{-1/2}\Sigma_b\Sigma_w^{-1/2}),\quad
        p_k = \lambda_k/\lVert\lambda\rVert_1 + \epsilon,\quad
        \mathrm{LiDAR} = \exp\Big(-\sum_k p_k\log p_k\Big)

    With q views of every source, Σ_i (q_i − 1) = n(q − 1), the paper's normalisation. The
    value does not depend on the scale of Σ_b. ε follows RankMe's convention (added after
    normalising); stable-pretraining's LiDAR callback normalises (λ + ε)/Σ(λ + ε) instead
    (the same number at ε = 0) and forms its groups from contiguous rows.

    Args:
        z: (N, K) embeddings, fp16/bf16/fp32/fp64.
        groups: (N,) integer source id of each row (any integers, any order).
        delta: δ > 0 added to the within-source covariance.
        eps: ε ≥ 0.
    Returns:
        0-dim float64 tensor on z's device (CPU for MPS); NaN if z holds NaN/Inf.
    Raises:
        TypeError, ValueError: naming the argument: z not (N, K), groups not (N,) integers on
        z's device, a source with a single view, fewer than two sources, δ ≤ 0, ε < 0.
    """
    V.check_embedding("z", z, min_rows=4, why_rows=" (LiDAR needs two sources of two views at least)")
    check_groups(groups, z.shape[0], z.device)
    V.check_positive("delta", delta)
    _check_eps(eps)
    z, groups = _computable(z), _computable(groups)
    m = lidar_moments(z, groups)
    check_lidar_moments(m, "z")
    return lidar_from_moments(m, float(delta), float(eps))


# ----------------------------------------------------------------------------- SimSiam's check


@disabled
def std_of_l2_normalized(z):
    r"""Mean over features of the std of the L2-normalised rows (SimSiam, Chen & He, CVPR 2021).

    .. math::

        \hat z_i = z_i / \max(\lVert z_i\rVert_2, 10^{-12}),\qquad
        s = \frac1K\sum_k \mathrm{std}_{\text{unbiased}}(\hat z_{\cdot k})

    about 1/√K for healthy (zero-mean isotropic) embeddings, 0 for embeddings collapsed
    to one direction. The same number as lightly's ``lightly.utils.debug.std_of_l2_normalized``
    (``torch.std(F.normalize(z, dim=1), dim=0).mean()``), computed in float64 over blocks of
    rows (two passes: the mean, then the squared deviations).

    Args:
        z: (N, K) embeddings, fp16/bf16/fp32/fp64, N ≥ 2.
    Returns:
        0-dim float64 tensor on z's device (CPU for MPS); NaN if z holds NaN/Inf.
    """
    V.check_embedding("z", z, min_rows=2, why_rows=" (an unbiased std needs two rows)")
    z = _computable(z)
    n, k = z.shape
    blocks = _row_blocks(n, k, product=False)

    def normalized(start, stop):
        return torch.nn.functional.normalize(z[start:stop].to(F64), dim=1)

    mean = sum(normalized(a, b).sum(dim=0) for a, b in blocks) / n
    square = sum(((normalized(a, b) - mean) ** 2).sum(dim=0) for a, b in blocks)
    return (square / (n - 1)).sqrt().mean()


# ----------------------------------------------------------------------------- alignment


def _targets(y, n, device):
    """y as ("ids", inverse (N,), C) for integer class ids, or ("dense", y (N, C), C)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor: (N,) integer class ids or (N, C) targets, got {type(y).__name__}")
    if y.device != device:
        raise ValueError(f"y must be on the same device as the data ({device}), got {y.device}")
    if y.dim() == 1 and y.dtype in V.INDEX_DTYPES:
        if y.shape[0] != n:
            raise ValueError(f"y must have shape ({n},) (one class id per row), got {tuple(y.shape)}")
        classes, inverse = torch.unique(y, return_inverse=True)
        return "ids", inverse, classes.shape[0]
    if y.dim() == 2 and y.dtype in V.FLOAT_DTYPES:
        if y.shape[0] != n or y.shape[1] < 1:
            raise ValueError(f"y must have shape ({n}, C) with C >= 1 (one target row per row), got {tuple(y.shape)}")
        return "dense", y, y.shape[1]
    raise TypeError(f"y must be (N,) integer class ids or (N, C) floating targets, got a {y.dim()}-D tensor of dtype {y.dtype}")


def target_products(y, x, shift=None):
    """(Yᵀ(x − 1·shiftᵀ) (C, D), YᵀY (C, C)) in float64, over blocks of rows; Y = one-hot(y) for ids."""
    kind, t, c = _targets(y, x.shape[0], x.device)
    n, d = x.shape
    yx = torch.zeros(c, d, dtype=F64, device=x.device)
    for start, stop in _row_blocks(n, d, product=False):
        rows = x[start:stop].to(F64)
        if shift is not None:
            rows = rows - shift
        if kind == "ids":
            yx.index_add_(0, t[start:stop], rows)
        else:
            yx += t[start:stop].to(F64).T @ rows
    if kind == "ids":
        yy = torch.diag(torch.zeros(c, dtype=F64, device=x.device).index_add_(0, t, torch.ones(n, dtype=F64, device=x.device)))
    else:
        yy = t.to(F64).T @ t.to(F64)
    return yx, yy


def ordered_orthonormal(w, thresholds, block=64):
    """Gram–Schmidt of the columns of ``w`` (r, D') in their order, dependent ones dropped.

    Returns ``(q (r, D'), kept (D',) bool)``: column j of q is the unit vector that column j
    adds to the span of the earlier ones, or zero when what it adds is no longer than
    ``thresholds[j]``. Blocks of columns are projected against the accepted ones twice
    (CGS2), then orthonormalised one by one inside the block (again twice).
    """
    r, m = w.shape
    q = torch.zeros_like(w)
    kept = torch.zeros(m, dtype=torch.bool, device=w.device)
    basis = w.new_zeros(r, 0)
    for start in range(0, m, block):
        if basis.shape[1] >= r:
            break  # the span is full: every later direction adds nothing
        cols = w[:, start:start + block].clone()
        for _ in range(2):
            cols -= basis @ (basis.T @ cols)
        local = w.new_zeros(r, cols.shape[1])
        found = 0
        for j in range(cols.shape[1]):
            v = cols[:, j]
            for _ in range(2):
                v = v - local[:, :found] @ (local[:, :found].T @ v)
            length = torch.linalg.vector_norm(v)
            if basis.shape[1] + found < r and float(length) > thresholds[start + j]:
                local[:, found] = v / length
                q[:, start + j] = local[:, found]
                kept[start + j] = True
                found += 1
        basis = torch.cat([basis, local[:, :found]], dim=1)
    return q, kept


@disabled
def alignment(x, y, k=None, *, directions=None, squared=True):
    r"""Alignment of reconstruction with perception (Balestriero & LeCun, "Learning by
    reconstruction produces uninformative features for perception", ICML 2024).

    x (N, D) data rows, centred per feature inside; Y the (N, C) targets: one-hot class
    indicators for integer ``y`` (not centred), or ``y`` itself when floating. The encoder's
    directions v_1, v_2, … (``directions`` (D, D'), columns in order; default the principal
    directions of x, by descending variance) give q_1, q_2, …, the columns of x·directions
    orthonormalised in order (Gram–Schmidt; a direction adding nothing new, e.g. one in the
    null space of x, contributes 0). Then

    .. math::

        a_j = \lVert Y Y^\top q_j\rVert^2,\qquad
        \mathrm{alignment}(k) = \frac{\sum_{j \le k} a_j}{\lVert Y Y^\top P_x\rVert_F^2}

    with P_x the projector on the column space of x (the denominator sums a_j over a
    complete basis of it, whatever ``directions`` are given): the share of the label
    energy that the first k directions capture. Nondecreasing; 1 at k = rank(x) for the
    principal directions (centred scikit-learn digits have rank 61 of 64; their
    square-root curve is about 50, 65, 83, 93, 98 % at k = 2, 4, 8, 16, 32).
    ``squared=False`` returns the square root, the quantity the paper's figures plot (×100).

    Computed through D×D and C×D products only, never an N×N matrix (N = 70000, D = 3072
    runs on a CPU): with xᵀx = UΛUᵀ (rank r) and A = Yᵀx U_r Λ_r^{-1/2}, the orthonormal
    basis x U_r Λ_r^{-1/2} of the column space gives M = Aᵀ(YᵀY)A, a_j = w_jᵀ M w_j for the
    coordinates w_j of q_j in that basis, and the denominator tr M. Rank: eigenvalues of xᵀx
    above D·u·λ_max (u of the product dtype, module docstring).

    Args:
        x: (N, D) data, fp16/bf16/fp32/fp64, N ≥ 2.
        y: (N,) integer class ids or (N, C) floating targets, on x's device.
        k: None for the whole curve, or an int in [1, k_max] for alignment(k) alone.
        directions: (D, D') encoder directions in order, on x's device; default the
            principal directions of x.
        squared: False for the square root.
    Returns:
        float64 on x's device (CPU for MPS): the curve (k_max,), entry k − 1 = alignment(k),
        k_max = D' for given directions, rank(x) by default; or its entry k − 1 (0-dim).
        NaN (of length D', or min(N − 1, D) by default) if x or y holds NaN/Inf.
    Raises:
        TypeError, ValueError: naming the argument (shapes, devices, k out of range, x of
        rank 0, targets with nothing in the column space of x, e.g. a single class).
    """
    V.check_embedding("x", x, min_rows=2, why_rows=" (x is centred per feature)")
    n, d = x.shape
    _targets(y, n, x.device)
    _check_bool("squared", squared)
    if directions is not None:
        V.check_embedding("directions", directions)
        if directions.shape[0] != d:
            raise ValueError(f"directions must have shape ({d}, D') (one column per direction in the {d}-dim data space), got {tuple(directions.shape)}")
        if directions.device != x.device:
            raise ValueError(f"directions must be on the same device as x ({x.device}), got {directions.device}")
    if k is not None:
        k_limit = directions.shape[1] if directions is not None else min(n - 1, d)
        _check_int("k", k, 1)
        if k > k_limit:
            raise ValueError(f"k must be in [1, {k_limit}] (the number of directions), got {k}")
    x, y = _computable(x), _computable(y)
    directions = _computable(directions)

    moments = row_moments(x)
    mean = moments.total / n
    scatter = moments.gram(center=True)
    yx, yy = target_products(y, x, shift=mean)
    finite = bool(torch.isfinite(scatter).all() and torch.isfinite(yx).all() and torch.isfinite(yy).all()
                  and (directions is None or torch.isfinite(directions).all()))
    if not finite:
        length = directions.shape[1] if directions is not None else min(n - 1, d)
        curve = torch.full((length,), float("nan"), dtype=F64, device=x.device)
        return curve if k is None else curve[k - 1]
    lam, vec = torch.linalg.eigh(scatter)
    lam, vec = lam.flip(0), vec.flip(1)
    rank = int((lam > moments.floor()).sum())
    if k is not None and directions is None and k > rank:
        raise ValueError(f"k must be in [1, {rank}] (rank(x) = {rank}, the number of principal directions), got {k}")
    if rank == 0:
        raise ValueError("x has rank 0 after centring (every row is the same): alignment is undefined")
    lam_r, u_r = lam[:rank], vec[:, :rank]
    a = (yx @ u_r) * lam_r.rsqrt()  # Yᵀ q_basis (C, r)
    m = a.T @ yy @ a  # (r, r): a_j = w_jᵀ M w_j
    denominator = m.diagonal().sum()
    if float(denominator) <= d * unit_roundoff(x.dtype) * float(torch.linalg.matrix_norm(yy)) ** 2:
        raise ValueError("y has no component in the column space of the centred x (a single class?): "
                         "alignment is 0/0, undefined")
    if directions is None:
        energy = m.diagonal()
    else:
        w = (u_r.T @ directions.to(F64)) * lam_r.sqrt().unsqueeze(1)  # coordinates of x·v_j in the basis
        # what a direction adds counts if longer than √u·‖x‖₂·‖v_j‖ (null-space and repeated
        # directions add only rounding)
        lengths = torch.linalg.vector_norm(directions.to(F64), dim=0) * lam[0].sqrt()
        q, _ = ordered_orthonormal(w, (lengths * math.sqrt(unit_roundoff(x.dtype))).tolist())
        energy = ((m @ q) * q).sum(dim=0)
    curve = torch.cumsum(energy, 0) / denominator.clamp_min(torch.finfo(F64).tiny)
    curve = curve.clamp_min(0.0)  # a_j >= 0: only rounding can make the first entries negative
    if not squared:
        curve = curve.sqrt()
    return curve if k is None else curve[k - 1]


# ----------------------------------------------------------------------------- 2402.06884


@disabled
def effective_dimension(features, lam):
    r"""Effective dimension of a feature map at ridge ``lam`` (arXiv 2402.06884).

    .. math::

        d_\lambda = \sum_j \frac{\lambda_j}{\lambda_j + \mathrm{lam}}
        = \mathrm{tr}\big(\Sigma(\Sigma + \mathrm{lam}\,I)^{-1}\big),\qquad
        \Sigma = \psi^\top\psi / n

    λ_j the eigenvalues of the uncentred second-moment matrix Σ of the features ψ (n, d),
    taken from the smaller Gram matrix (module docstring). d_λ counts the directions ridge
    regression at ``lam`` can use: it tends to rank(ψ) as lam → 0 and to 0 as lam → ∞.

    Args:
        features: (n, d) features ψ, fp16/bf16/fp32/fp64.
        lam: ridge λ > 0.
    Returns:
        0-dim float64 tensor on features' device (CPU for MPS); NaN if features hold NaN/Inf.
    """
    V.check_embedding("features", features)
    V.check_positive("lam", lam)
    features = _computable(features)
    n = features.shape[0]
    w, finite = gram_eigenvalues(*small_gram(features))
    w = w / n
    return _nan_unless(finite, (w / (w + float(lam))).sum())


@disabled
def redundancy(features, y, s):
    r"""Low-rank redundancy ε_s of features beyond the labels (arXiv 2402.06884), from data.

    Regress the features ψ (n, d) on the targets Y (one-hot labels for integer ``y``, or
    ``y`` itself when floating) by least squares, A = (YᵀY)⁺Yᵀψ; the residual R = ψ − YA is
    the part of ψ the labels do not explain (for one-hot labels: ψ minus its class means).
    Then

    .. math::

        \epsilon_s = \sum_{j > s} \lambda_j(R^\top R / n)

    (eigenvalues descending): the error of the best rank-s approximation of R/√n
    (Eckart–Young). ε_s = 0 exactly when the label-free part of ψ has rank ≤ s (eigenvalues
    at the rounding level count as 0, module docstring). Two passes over ψ (YᵀY and Yᵀψ,
    then Rᵀ R), memory O(d² + C·d).

    Args:
        features: (n, d) features ψ, fp16/bf16/fp32/fp64.
        y: (n,) integer class ids or (n, C) floating targets, on features' device.
        s: the rank s ≥ 0.
    Returns:
        0-dim float64 tensor on features' device (CPU for MPS); NaN if an input holds NaN/Inf.
    """
    V.check_embedding("features", features)
    n, d = features.shape
    _targets(y, n, features.device)
    _check_int("s", s, 0)
    features, y = _computable(features), _computable(y)
    kind, t, _ = _targets(y, n, features.device)
    yx, yy = target_products(y, features)
    coef = torch.linalg.pinv(_finite_or_ones(yy)[0], hermitian=True) @ yx  # (C, d)
    pdt = product_dtype(features.dtype)
    gram = torch.zeros(d, d, dtype=F64, device=features.device)
    for start, stop in _row_blocks(n, d):
        if kind == "ids":
            fitted = coef[t[start:stop]]
        else:
            fitted = t[start:stop].to(F64) @ coef
        gram += block_gram((features[start:stop].to(F64) - fitted).to(pdt), owned=True)
    finite = torch.isfinite(yy).all() & torch.isfinite(yx).all()
    floor = (unit_roundoff(features.dtype) + d * U64) * gram.diagonal().sum()
    w, finite_gram = gram_eigenvalues(gram / n, floor / n)
    return _nan_unless(finite & finite_gram, w[s:].sum())


# ----------------------------------------------------------------------------- streaming forms


def __getattr__(name):
    """The streaming metrics load torchmetrics on first use (an optional dependency)."""
    if name in _STREAMING:
        from . import _streaming  # raises an ImportError naming the extra when torchmetrics is missing

        return getattr(_streaming, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
