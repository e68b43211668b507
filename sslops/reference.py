r"""Pure-PyTorch reference math for every sslops loss (docs/conventions.md, in executable form).

This module is three things at once: the oracle every backend is tested against, the
fallback backend, and the "naive PyTorch" baseline of the benchmarks. It is written the way
a careful user would write these losses: plain tensor ops, dense matrices where they make
the code obvious, no custom kernels, no host syncs (no ``.item()``, no data-dependent
shapes), and no upcasting: it computes in whatever dtype it is given (float64 in, float64
math; bf16 in, bf16 math, which is what "naive PyTorch in the input dtype" means).

It validates nothing except the one argument clash in :func:`relation_matrix`; checking
shapes, dtypes and values is ``sslops._validation``'s job. It imports only ``torch`` and
nothing from sslops, so that it can be loaded on its own.

Notation: ``z``, ``z_a``, ``z_b`` have shape (N, K): N rows, K features. ``G`` is the N×N
positive relation (symmetric, zero diagonal). ``Zc = Z - mean(Z, 0)`` is the column-centred
matrix.

VICReg (two views)::

    inv  = mean over N·K of (z_a - z_b)²
    std  = sqrt(var_unbiased(z, 0) + eps)
    var  = mean_k relu(1 - std(z_a)_k) / 2 + mean_k relu(1 - std(z_b)_k) / 2
    C(z) = Zcᵀ Zc / (N - 1)
    cov  = Σ_{j≠k} C(z_a)_jk² / K + Σ_{j≠k} C(z_b)_jk² / K
    loss = sim_coeff·inv + std_coeff·var + cov_coeff·cov

VICReg (relation form, one matrix z and a relation G)::

    var  = mean_k relu(1 - sqrt(C(z)_kk + eps))
    cov  = Σ_{j≠k} C(z)_jk² / K
    inv  = Σ_ij G_ij ‖z_i - z_j‖² / (nnz(G)·K)          (0 when nnz(G) = 0)
    loss = α·var + β·cov + γ·inv

Barlow Twins::

    bn(z) = Zc / sqrt(var_biased(z, 0) + eps)
    c     = bn(z_a)ᵀ bn(z_b) / N
    loss  = Σ_k (c_kk - 1)² + λ Σ_{j≠k} c_jk²

InfoNCE over G (SupCon L_out; SimCLR NT-Xent when G pairs two views)::

    s_ij = ⟨z_i, z_j⟩ / (max(‖z_i‖, 1e-12)·max(‖z_j‖, 1e-12)),   P(i) = {j : G_ij = 1}
    ℓ_i  = logsumexp_{a≠i}(s_ia/τ) - (1/|P(i)|) Σ_{p∈P(i)} s_ip/τ      (ℓ_i = 0 if P(i) = ∅)
    loss = Σ_i ℓ_i / max(#{i : |P(i)| ≥ 1}, 1)

The contrastive family beyond one set (conventions §3b): extra ``negatives`` rows in every
anchor's logsumexp (a MoCo queue, a memory bank), the decoupled loss (positives leave the
denominator; DCLW weights), CLIP (two sets, cross-entropy both ways) and SigLIP::

    CLIP:    T = t·cos(a_i, b_j),   loss = ½ [mean_i CE(T_i·, P(i)) + mean_j CE(T_·j, P(j))]
    SigLIP:  loss = (1/N) Σ_ij softplus(−y_ij (t·cos(a_i, b_j) + b)),   y_ij = ±1

Matrix cross-entropy and Matrix-SSL::

    log Q ≈ Σ_{k=1..n} (-1)^{k+1} (Q - I)^k / k           (converges iff ρ(Q - I) < 1)
    MCE(P, Q) = tr(-P log Q + Q)
    U(p, z) = -tr(λI · log(pᵀJz/N + μI))
    A(p, z) = -tr((pᵀJp/N + μI) · log(zᵀJz/N + μI))
    matrix_ssl_loss(p, z) = U(p, z) + γ·A(p, z)        (rows of p and z L2-normalised first)
"""

import torch
import torch.nn.functional as F

__all__ = [
    "vicreg_loss",
    "vicreg_relation_loss",
    "relation_matrix",
    "barlow_twins_loss",
    "info_nce_loss",
    "info_nce_rows",
    "nt_xent_loss",
    "anchor_mask",
    "dclw_pair_weights",
    "clip_rows",
    "clip_loss",
    "siglip_rows",
    "siglip_loss",
    "matrix_log",
    "matrix_cross_entropy",
    "matrix_ssl_loss",
    "released_matrix_ssl_loss",
]

# Elements of the (rows, N, K) difference block materialised at once by the relation-form
# invariance term; bounds its memory without changing the result.
_PAIR_BLOCK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------- helpers


def _eye(k, like):
    return torch.eye(k, dtype=like.dtype, device=like.device)


def _trace(m):
    """Trace over the last two dims (works with a leading batch dim)."""
    return m.diagonal(dim1=-2, dim2=-1).sum(-1)


def _off_diagonal_square_sum(c):
    """Σ_{j≠k} c_jk², by zeroing the diagonal (no ‖c‖² - Σ c_kk² cancellation)."""
    diag = torch.eye(c.shape[-1], dtype=torch.bool, device=c.device)
    return torch.where(diag, 0.0, c).pow(2).sum()


def _covariance(z):
    """Unbiased K×K covariance of the rows of z: Zcᵀ Zc / (N - 1)."""
    zc = z - z.mean(dim=0)
    return zc.T @ zc / (z.shape[0] - 1)


def _std_hinge(variance, eps):
    """mean_k relu(1 - sqrt(variance_k + eps))."""
    return F.relu(1.0 - torch.sqrt(variance + eps)).mean()


def _relation_square_distance_sum(z, g):
    """Σ_ij g_ij ‖z_i - z_j‖² from the differences themselves.

    The Laplacian identity 2·Σ_i deg_i‖z_i‖² - 2⟨z, Gz⟩ is cheaper but cancels badly when
    the paired rows are close (late in training), so this takes the differences directly,
    a block of rows at a time to bound memory. Loop bounds come from shapes only: no sync.
    """
    n, k = z.shape
    rows_per_block = max(1, _PAIR_BLOCK_ELEMENTS // max(1, n * k))
    total = z.new_zeros(())
    for r0 in range(0, n, rows_per_block):
        r1 = min(n, r0 + rows_per_block)
        sq_dist = (z[r0:r1, None, :] - z[None, :, :]).pow(2).sum(dim=-1)  # (r1-r0, N)
        total = total + torch.where(g[r0:r1], sq_dist, 0.0).sum()
    return total


# ----------------------------------------------------------------------------- VICReg


def vicreg_loss(z_a, z_b, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4):
    r"""VICReg, two-view form (conventions §1).

    ::

        inv  = mean((z_a - z_b)²)                                over N·K
        var  = mean_k relu(1 - sqrt(var_unb(z_a)_k + eps)) / 2 + (same for z_b) / 2
        cov  = Σ_{j≠k} C(z_a)_jk² / K + Σ_{j≠k} C(z_b)_jk² / K,  C(z) = Zcᵀ Zc / (N - 1)
        loss = sim_coeff·inv + std_coeff·var + cov_coeff·cov

    Matches facebookresearch/vicreg ``main_vicreg.py`` (Bardes, Ponce, LeCun 2022), and
    with it lightly's ``VICRegLoss`` and stable-pretraining. solo-learn's ``vicreg_loss_func``
    leaves the variance term unhalved: its number is this one with ``std_coeff=50``.
    """
    k = z_a.shape[1]
    inv = (z_a - z_b).pow(2).mean()
    var = (_std_hinge(torch.var(z_a, dim=0), eps) / 2
           + _std_hinge(torch.var(z_b, dim=0), eps) / 2)
    cov = (_off_diagonal_square_sum(_covariance(z_a)) / k
           + _off_diagonal_square_sum(_covariance(z_b)) / k)
    return sim_coeff * inv + std_coeff * var + cov_coeff * cov


def relation_matrix(n, labels=None, pairs=None, device=None):
    r"""Dense bool (n, n) positive relation G (zero diagonal, symmetric).

    - ``labels`` (n,) ints: ``G_ij = [labels_i == labels_j]`` for i ≠ j.
    - ``pairs`` (2, P) int64 (or int32) row/col indices (or a pair of 1-D index tensors): symmetric by
      definition, so a pair given once counts both ways; a duplicated pair counts once;
      self-pairs (i, i) are dropped.

    Exactly one of ``labels``/``pairs`` must be given (``ValueError`` otherwise; this is the
    only check in the module). ``device`` defaults to the device of the index tensor.
    This dense form is the reference's; the kernels never build it.
    """
    if (labels is None) == (pairs is None):
        raise ValueError("relation_matrix: give exactly one of labels= or pairs=")
    if labels is not None:
        device = labels.device if device is None else device
        labels = labels.to(device)
        g = labels[:, None] == labels[None, :]
    else:
        device = pairs[0].device if device is None else device
        rows = pairs[0].to(device=device, dtype=torch.long)
        cols = pairs[1].to(device=device, dtype=torch.long)
        g = torch.zeros(n, n, dtype=torch.bool, device=device)
        g[rows, cols] = True
        g[cols, rows] = True
    return g & ~torch.eye(n, dtype=torch.bool, device=device)


def vicreg_relation_loss(z, labels=None, pairs=None, alpha=25.0, beta=1.0, gamma=25.0,
                         eps=1e-4):
    r"""VICReg, relation form (conventions §1; Balestriero & LeCun 2022, spectral view of VICReg).

    ::

        C    = Zcᵀ Zc / (N - 1)                                unbiased, all N rows
        var  = mean_k relu(1 - sqrt(C_kk + eps))
        cov  = Σ_{j≠k} C_jk² / K
        inv  = Σ_ij G_ij ‖z_i - z_j‖² / (nnz(G)·K)             mean over ordered positive pairs
        loss = alpha·var + beta·cov + gamma·inv

    G comes from ``labels`` or ``pairs`` as in :func:`relation_matrix`. When G has no
    positive pair at all the invariance term is 0 (the sum is 0 and it is divided by
    ``clamp(nnz, min=1)``, so no host sync is needed to decide it).

    With ``z = cat([z_a, z_b])`` and G pairing row i with row i + N, ``inv`` is exactly the
    two-view MSE of :func:`vicreg_loss`; ``var`` and ``cov`` then use one covariance of the
    stacked rows where the two-view form uses one per view, so the totals differ.
    """
    n, k = z.shape
    g = relation_matrix(n, labels=labels, pairs=pairs, device=z.device)
    c = _covariance(z)
    var = _std_hinge(c.diagonal(), eps)
    cov = _off_diagonal_square_sum(c) / k
    nnz = g.sum().to(z.dtype)
    inv = _relation_square_distance_sum(z, g) / (nnz.clamp(min=1) * k)
    return alpha * var + beta * cov + gamma * inv


# ----------------------------------------------------------------------------- Barlow Twins


def barlow_twins_loss(z_a, z_b, lambd=0.0051, eps=1e-5):
    r"""Barlow Twins (conventions §2).

    ::

        bn(z) = (z - mean(z, 0)) / sqrt(var_biased(z, 0) + eps)      each view separately
        c     = bn(z_a)ᵀ bn(z_b) / N
        loss  = Σ_k (c_kk - 1)² + lambd·Σ_{j≠k} c_jk²

    Matches facebookresearch/barlowtwins ``main.py`` (Zbontar et al. 2021), whose ``bn`` is
    a ``BatchNorm1d(affine=False)`` in training mode: biased batch variance, eps 1e-5.
    lightly's ``BarlowTwinsLoss`` is the same with ``lambd=5e-3``.
    """
    n = z_a.shape[0]

    def bn(z):
        zc = z - z.mean(dim=0)
        return zc / torch.sqrt(torch.var(z, dim=0, correction=0) + eps)

    c = bn(z_a).T @ bn(z_b) / n
    on_diag = (c.diagonal() - 1).pow(2).sum()
    return on_diag + lambd * _off_diagonal_square_sum(c)


# ----------------------------------------------------------------------------- InfoNCE and the contrastive family

DCLW_SIGMA = 0.5  # σ of DCLW's weights (lightly's DCLWLoss default)


def anchor_mask(count, n_batch, n_negatives=0, in_batch_negatives=True, decoupled=False):
    r"""Which anchors enter the mean, from their positive counts |P(i)| alone (no host sync).

    An anchor needs a positive; under ``decoupled`` it also needs a candidate left in its
    denominator: an extra negative (``n_negatives`` > 0), or, with in-batch negatives, an
    in-batch row that is neither itself nor a positive (|P(i)| < ``n_batch`` − 1).
    """
    has_positive = count > 0
    if not decoupled or n_negatives > 0:
        return has_positive
    if not in_batch_negatives:
        return torch.zeros_like(has_positive)
    return has_positive & (count < n_batch - 1)


def dclw_pair_weights(z, g, sigma=DCLW_SIGMA, totals=None):
    r"""DCLW's weight of every ordered positive pair: ``w_ip = 2 − |E|·softmax_E(s_ip/σ)``.

    E = {(i, p) : g_ip} is the set of ordered positive pairs of the loss's anchors (``g`` a
    bool (N, N) mask), s the cosine similarity; the softmax runs over all of E and the weights
    are detached, as lightly's ``negative_mises_fisher_weights`` (which, for two views and
    N pairs, is ``2 − N·softmax``: over the 2N ordered pairs each similarity appears twice,
    and 2N·softmax_2N = N·softmax_N). Entries outside E are meaningless. Written as
    ``2 − |E|·e^{s/σ}/Σ_E e^{s/σ}`` (|s| ≤ 1: no overflow); ``totals(Σ_E e^{s/σ}, |E|)`` may
    replace the two sums (by the global batch's, under ``gather=True``).
    """
    zn = F.normalize(z.detach(), dim=1)
    e = torch.where(g, torch.exp(zn @ zn.T / sigma), 0.0)
    z_sum, count = e.sum(), g.sum().to(z.dtype)
    if totals is not None:
        z_sum, count = totals(z_sum, count)
    return 2.0 - count * e / z_sum


def _split_logsumexp(x):
    r"""``(m, l)`` with logsumexp over dim 1 = m + l: m the row maximum (detached), l = log Σ exp(x − m).

    The maximum's own term (exactly 1) is added after the others' sum: one rounding near 1
    instead of one per candidate. Autograd then gives softmax weights exp(x − m)/Σ whose error
    is a few ulp of 1, where ``torch.logsumexp``'s backward forms exp(x − lse) from the lse
    rounded to the ulp of |x| (1e-6 at |s/τ| ≈ 14, τ = 0.07): NT-Xent's fp32 gradients for
    close views were 2.5-3× farther from float64 than lightly's cross-entropy form and
    pytorch-metric-learning's (the gradient of a dominant positive is p − 1). The shift carries
    no gradient: the sum does not depend on it.
    """
    top = x.detach().argmax(dim=1, keepdim=True)
    m = x.detach().gather(1, top)
    m = m.masked_fill(m.isinf(), 0.0)  # a row of −inf only (no candidate): no shift
    shifted = x - m
    others = torch.exp(shifted.scatter(1, top, float("-inf"))).sum(dim=1)
    return m.squeeze(1), torch.log(torch.exp(shifted.gather(1, top).squeeze(1)) + others)


def info_nce_rows(z, labels=None, pairs=None, temperature=0.1, row_start=0, row_end=None, *, negatives=None,
                  in_batch_negatives=True, decoupled=False, weight_rows=None, weight_totals=None):
    r"""Per-anchor InfoNCE terms for anchors ``row_start <= i < row_end`` of ``z`` (conventions §3, §3b).

    ::

        s_ij = ⟨ẑ_i, ẑ_j⟩,  ẑ = z / max(‖z‖, 1e-12)    (torch.nn.functional.normalize)
        D(i) = {a ≠ i} ∪ Q                       in-batch rows and the extra negatives Q
             = {a ≠ i, a ∉ P(i)} ∪ Q             decoupled (DCL)
             = P(i) ∪ Q                          in_batch_negatives=False
             = Q                                 both
        ℓ_i  = logsumexp_{a∈D(i)}(s_ia/τ) − (1/|P(i)|) Σ_{p∈P(i)} w_ip·s_ip/τ
        ℓ_i  = 0 for anchors outside :func:`anchor_mask` (no positive, or an empty D(i))

    ``negatives`` (M, K) rows are candidates of every anchor, never anchors, never positives.
    ``w_ip`` = 1, or DCLW's :func:`dclw_pair_weights` with ``decoupled="weighted"``, taken over
    the positive pairs of the anchors ``weight_rows`` = (start, end) (default all N rows),
    their two sums replaced by ``weight_totals(sum, count)`` when given (a distributed total).

    Returns ``(ℓ, count)``: ℓ has one entry per window row, in z's dtype; ``count`` is
    |P(i)| for the same rows as floats, in z's dtype promoted to at least float32 (so the
    counts stay exact integers for bf16/fp16 inputs). This row window is what the
    distributed path computes per rank: local anchors against every gathered candidate.
    """
    n = z.shape[0]
    row_end = n if row_end is None else row_end
    g_all = relation_matrix(n, labels=labels, pairs=pairs, device=z.device)
    g = g_all[row_start:row_end]
    zn = F.normalize(z, dim=1)
    logits = zn[row_start:row_end] @ zn.T / temperature           # (rows, N)
    anchor = torch.arange(row_start, row_end, device=z.device)
    is_self = anchor[:, None] == torch.arange(n, device=z.device)[None, :]
    if decoupled:
        keep = ~is_self & ~g if in_batch_negatives else torch.zeros_like(g)
    else:
        keep = ~is_self if in_batch_negatives else g
    candidates = logits.masked_fill(~keep, float("-inf"))
    m = 0 if negatives is None else negatives.shape[0]
    if m:
        candidates = torch.cat([candidates, zn[row_start:row_end] @ F.normalize(negatives, dim=1).T / temperature], 1)
    count = g.sum(dim=1)
    valid = anchor_mask(count, n, m, in_batch_negatives, decoupled)
    # rows left out of the mean get finite stand-ins: an all −inf logsumexp would put NaN in the gradient
    row_max, log_sum = _split_logsumexp(torch.where(valid[:, None], candidates, 0.0))
    if decoupled == "weighted":
        lo, hi = (0, n) if weight_rows is None else weight_rows
        in_loss = torch.zeros_like(g_all)
        in_loss[lo:hi] = g_all[lo:hi]
        logits = dclw_pair_weights(z, in_loss, totals=weight_totals)[row_start:row_end] * logits
    positive_mean = torch.where(g, logits, 0.0).sum(dim=1) / count.to(z.dtype).clamp(min=1)
    loss = torch.where(valid, (row_max - positive_mean) + log_sum, 0.0)  # lse = row_max + log_sum
    return loss, count.to(torch.promote_types(z.dtype, torch.float32))


def info_nce_loss(z, labels=None, pairs=None, temperature=0.1, *, negatives=None, in_batch_negatives=True,
                  decoupled=False):
    r"""InfoNCE over a positive relation G: SupCon's L_out (conventions §3), with §3b's options.

    ::

        loss = Σ_i ℓ_i / max(#anchors in the mean, 1)         ℓ_i from :func:`info_nce_rows`

    Every row is a negative for every other row; an anchor without positives adds nothing
    but still serves as a negative. If no anchor has a positive the loss is 0 with zero
    gradient (computed with a clamp, not a host-side branch). Cosine similarity uses
    ``F.normalize``'s row normalisation, i.e. the norm is clamped below at 1e-12.

    ``labels`` with sample ids gives multi-view SimCLR (any number of views); class ids give
    SupCon (Khosla et al. 2020, L_out). ``pairs`` gives an arbitrary symmetric G.
    solo-learn (all positives in one numerator) and pytorch-metric-learning (other positives
    removed from the denominator) compute different losses once an anchor has more than
    one positive; see :func:`nt_xent_loss`. ``negatives``, ``in_batch_negatives`` and
    ``decoupled`` as in :func:`info_nce_rows`.
    """
    loss_rows, count = info_nce_rows(z, labels=labels, pairs=pairs, temperature=temperature, negatives=negatives,
                                     in_batch_negatives=in_batch_negatives, decoupled=decoupled)
    m = 0 if negatives is None else negatives.shape[0]
    anchors = anchor_mask(count, z.shape[0], m, in_batch_negatives, decoupled).sum().to(loss_rows.dtype)
    return loss_rows.sum() / anchors.clamp(min=1)


def nt_xent_loss(z_a, z_b, temperature=0.5, *, negatives=None, in_batch_negatives=True, decoupled=False):
    r"""SimCLR's NT-Xent over 2N anchors (Chen et al. 2020), with §3b's options.

    ``info_nce_loss(cat([z_a, z_b]), labels=arange(N).repeat(2), temperature)``: each row's
    one positive is the other view of its sample; the other 2N - 2 rows are negatives.
    Equals lightly's ``NTXentLoss`` (default τ = 0.5). solo-learn's ``simclr_loss_func``
    puts all positives in one numerator and pytorch-metric-learning's ``NTXentLoss`` drops
    the other positives from each denominator: those are different losses, which coincide
    with this one only while every anchor has exactly one positive (plain two-view SimCLR)
    and part from it as soon as an anchor has several (more views, SupCon labels).

    With ``in_batch_negatives=False`` the anchors are the N rows of ``z_a`` only and anchor
    i's candidates are z_b[i] and the ``negatives``: MoCo's InfoNCE and lightly's
    ``NTXentLoss(memory_bank_size=M)``. ``decoupled=True`` is DCL (Yeh et al. 2022) as the
    paper's Eq. 6 and its authors' code compute it (one logsumexp over both views'
    negatives), ``"weighted"`` DCLW with lightly's weights.
    """
    n = z_a.shape[0]
    labels = torch.arange(n, device=z_a.device).repeat(2)
    z = torch.cat([z_a, z_b])
    if in_batch_negatives:
        return info_nce_loss(z, labels=labels, temperature=temperature, negatives=negatives, decoupled=decoupled)
    loss_rows, count = info_nce_rows(z, labels=labels, temperature=temperature, row_start=0, row_end=n,
                                     negatives=negatives, in_batch_negatives=False, decoupled=decoupled,
                                     weight_rows=(0, n))
    m = 0 if negatives is None else negatives.shape[0]
    anchors = anchor_mask(count, 2 * n, m, False, decoupled).sum().to(loss_rows.dtype)
    return loss_rows.sum() / anchors.clamp(min=1)


def _two_set_relation(n_a, n_b, labels, row_start, row_end, device):
    """(rows, N_b) bool: b_j is a positive of a_i (i in the window): same label, or j = i without labels."""
    if labels is None:
        rows = torch.arange(row_start, row_end, device=device)
        return rows[:, None] == torch.arange(n_b, device=device)[None, :]
    return labels[row_start:row_end, None] == labels[None, :]


def clip_rows(z_a, z_b, logit_scale, labels=None, normalize=True, row_start=0, row_end=None):
    r"""CLIP's per-anchor terms for rows ``row_start <= i < row_end`` of both sets (conventions §3b).

    ::

        T_ij  = t·⟨â_i, b̂_j⟩                    â, b̂ row-normalised (or as given, normalize=False)
        ℓᵃ_i  = logsumexp_j T_ij − (1/|P(i)|) Σ_{j∈P(i)} T_ij      image i against every text
        ℓᵇ_j  = logsumexp_i T_ij − (1/|P(j)|) Σ_{i∈P(j)} T_ij      text j against every image

    P(i) = {j : labels_j = labels_i} (or {i} without labels). Returns ``(ℓᵃ, ℓᵇ)`` for the window.
    """
    n = z_a.shape[0]
    row_end = n if row_end is None else row_end
    a = F.normalize(z_a, dim=1) if normalize else z_a
    b = F.normalize(z_b, dim=1) if normalize else z_b

    def rows(x, y):
        logits = logit_scale * (x[row_start:row_end] @ y.T)
        g = _two_set_relation(n, n, labels, row_start, row_end, z_a.device)
        positive_mean = torch.where(g, logits, 0.0).sum(dim=1) / g.sum(dim=1).to(logits.dtype)
        return torch.logsumexp(logits, dim=1) - positive_mean

    return rows(a, b), rows(b, a)


def clip_loss(z_a, z_b, logit_scale, labels=None, normalize=True):
    r"""CLIP's symmetric cross-entropy (Radford et al. 2021; open_clip ``ClipLoss``).

    ::

        loss = ½ [ mean_i ℓᵃ_i + mean_j ℓᵇ_j ]          ℓ from :func:`clip_rows`

    ``logit_scale`` t is the exponentiated scale (a float or a 0-d tensor), as open_clip
    passes it. Without labels this is open_clip's ``ClipLoss`` (its features are normalised
    by the model; here ``normalize=True`` does it inside, which leaves the value unchanged).
    """
    loss_a, loss_b = clip_rows(z_a, z_b, logit_scale, labels=labels, normalize=normalize)
    return 0.5 * (loss_a.mean() + loss_b.mean())


def siglip_rows(z_a, z_b, logit_scale, logit_bias, labels=None, normalize=True, row_offset=0):
    r"""SigLIP's per-row sums for the rows of ``z_a`` against all rows of ``z_b`` (conventions §3b).

    ::

        x_ij = t·⟨â_i, b̂_j⟩ + b,   y_ij = +1 if j ∈ P(i) else −1
        r_i  = Σ_j −log σ(y_ij·x_ij) = Σ_j softplus(−y_ij·x_ij)

    The rows of ``z_a`` are rows ``row_offset, row_offset + 1, …`` of the full set a (a rank's
    local rows under ``gather=True``); ``labels`` (N_b,) hold one label per pair (a_i, b_i),
    so a's row i has the label ``labels[row_offset + i]``; without labels P(i) = {row_offset + i}.
    """
    n_a, n_b = z_a.shape[0], z_b.shape[0]
    a = F.normalize(z_a, dim=1) if normalize else z_a
    b = F.normalize(z_b, dim=1) if normalize else z_b
    logits = logit_scale * (a @ b.T) + logit_bias
    g = _two_set_relation(n_b, n_b, labels, row_offset, row_offset + n_a, z_a.device)
    y = torch.where(g, 1.0, -1.0).to(logits.dtype)
    return -F.logsigmoid(y * logits).sum(dim=1)


def siglip_loss(z_a, z_b, logit_scale, logit_bias, labels=None, normalize=True):
    r"""SigLIP's sigmoid loss (Zhai et al. 2023; open_clip ``SigLipLoss``, big_vision).

    ::

        loss = (1/N) Σ_i r_i                 r_i from :func:`siglip_rows`

    The sum over all N² pairs divided by the number of rows of ``z_a``, as open_clip
    (``-logsigmoid(labels * logits).sum() / N``); t and b are the exponentiated scale and the
    bias (SigLIP initialises log t = log 10, b = −10).
    """
    return siglip_rows(z_a, z_b, logit_scale, logit_bias, labels=labels, normalize=normalize).sum() / z_a.shape[0]


# ----------------------------------------------------------------------------- Matrix-SSL


def matrix_log(q, order=4, method="taylor"):
    r"""Matrix logarithm of q (K×K, or a batch (..., K, K)).

    - ``"taylor"``: ``Σ_{k=1..order} (-1)^{k+1} (Q - I)^k / k``, the series Matrix-SSL
      trains with. It converges only when the spectral radius of Q - I is below 1; nothing
      here checks that (the public op does).
    - ``"eigh"``: the exact logarithm of a symmetric positive-definite Q,
      ``V diag(log w) Vᵀ`` from ``torch.linalg.eigh``. Q is symmetrised as (Q + Qᵀ)/2 first
      (eigh reads one triangle only, and symmetrising makes the gradient symmetric); a
      non-positive eigenvalue gives -inf/NaN entries.
    """
    if method == "taylor":
        x = q - _eye(q.shape[-1], q)
        out = torch.zeros_like(q)
        power = x
        for k in range(1, order + 1):
            out = out + ((-1) ** (k + 1) / k) * power
            if k < order:
                power = power @ x
        return out
    if method == "eigh":
        w, v = torch.linalg.eigh((q + q.transpose(-2, -1)) / 2)
        return (v * torch.log(w).unsqueeze(-2)) @ v.transpose(-2, -1)
    raise ValueError(f"matrix_log: method must be 'taylor' or 'eigh', got {method!r}")


def matrix_cross_entropy(p, q, order=4, method="taylor"):
    r"""Matrix cross-entropy ``MCE(P, Q) = tr(-P log Q + Q)`` (Zhang et al., arXiv 2305.17326).

    The full definition, +tr(Q) included; ``log Q`` as in :func:`matrix_log`. The Matrix-SSL
    loss (:func:`matrix_ssl_loss`) follows the paper's released code, which drops +tr(Q).
    """
    log_q = matrix_log(q, order=order, method=method)
    return -_trace(p @ log_q) + _trace(q)


def matrix_ssl_loss(p, z, lambd=1.0, mu=1.0, gamma=1.0, order=4):
    r"""One direction of Matrix-SSL: ``U(p, z) + gamma·A(p, z)`` (conventions §4; arXiv 2305.17326).

    p is the target branch (the teacher's output, detached in the released training code), z
    the online branch (the predictor's output: the gradient flows through log Q(z)). Rows of
    both are L2-normalised, then centred by subtracting column means (pᵀJz = pcᵀzc since J
    is a symmetric projection)::

        U(p, z) = -tr(lambd·I · log(pcᵀ zc / N + mu·I)) = -lambd·tr(log(...))
        A(p, z) = -tr((pcᵀ pc / N + mu·I) · log(zcᵀ zc / N + mu·I))

    with log by the Taylor series of ``order`` (:func:`matrix_log`). As in the released code
    (and unlike :func:`matrix_cross_entropy`) the +tr(Q) term is dropped. The symmetric
    two-view loss the paper trains is::

        loss = 0.5 * (matrix_ssl_loss(p2, z1) + matrix_ssl_loss(p1, z2))

    with lambd = mu = gamma = 1 (the released command line; the code's own argparse
    defaults are 0.5). The trace of a product is taken as Σ_ij A_ij B_ji, without forming
    the product.
    """
    n, k = p.shape
    p = F.normalize(p, dim=1)
    z = F.normalize(z, dim=1)
    pc = p - p.mean(dim=0)
    zc = z - z.mean(dim=0)
    eye = _eye(k, p)
    uniformity = -lambd * _trace(matrix_log(pc.T @ zc / n + mu * eye, order=order))
    p_align = pc.T @ pc / n + mu * eye
    log_q_align = matrix_log(zc.T @ zc / n + mu * eye, order=order)
    alignment = -(p_align * log_q_align.T).sum()
    return uniformity + gamma * alignment


def released_matrix_ssl_loss(p, z, lambd=1.0, mu=1.0, gamma=1.0, order=4):
    r"""The value of :func:`matrix_ssl_loss`, computed with the operations of the paper's released code.

    A benchmark baseline, not a recommended implementation. Written from the loss of the
    released training script (github.com/yifanzhang-pro/Matrix-SSL, ``main_pretrain.py``:
    ``mce_loss_func``, ``matrix_log``, ``centering_matrix``), one direction, for one process
    (its ``gather_from_all`` is the identity there). The operations, in its order:

    * two calls of the loss function, the uniformity one (``correlation=True``) and the
      alignment one (``correlation=False``, weighted by γ); each L2-normalises p and z and
      builds its own N×N centring matrix ``J = I - (1_N 1_Nᵀ)/N`` (the outer product by a
      matrix product);
    * uniformity: P = λI, Q = (1/N)·(pᵀ J z) + μI; alignment: P = (1/N)·(pᵀ J p) + μI,
      Q = (1/N)·(zᵀ J z) + μI, each product left to right through J (an N×N×K product first);
    * the series: X = Q - I, then for k = 1..n the partial sum gains ±X^k/k and X^k is
      multiplied by X once more (n K×K products, the last one unused);
    * the loss term ``trace(-P @ log Q)``: a full K×K product and its trace.
    """
    n, k = p.shape

    def centering_matrix(m):
        return _eye(m, p) - (torch.ones(m, 1, dtype=p.dtype, device=p.device) @ torch.ones(1, m, dtype=p.dtype, device=p.device)) * (1.0 / m)

    def series_log(q):
        x = q - _eye(q.shape[0], q)
        cur = x
        res = torch.zeros_like(x)
        for i in range(1, order + 1):
            res = res + cur * (1.0 / i) if i % 2 == 1 else res - cur * (1.0 / i)
            cur = cur @ x
        return res

    def term(p, z, correlation):
        p = F.normalize(p)
        z = F.normalize(z)
        j = centering_matrix(n)
        if correlation:
            big_p = lambd * _eye(k, p)
            big_q = (1.0 / n) * (p.T @ j @ z) + mu * _eye(k, p)
        else:
            big_p = (1.0 / n) * (p.T @ j @ p) + mu * _eye(k, p)
            big_q = (1.0 / n) * (z.T @ j @ z) + mu * _eye(k, p)
        return torch.trace(-big_p @ series_log(big_q))

    return term(p, z, True) + gamma * term(p, z, False)
