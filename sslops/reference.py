r"""Pure-PyTorch reference math for every sslops loss (SPEC.md, executable form).

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
    r"""VICReg, two-view form (SPEC §1).

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
    - ``pairs`` (2, P) int64 row/col indices (or a pair of 1-D index tensors): symmetric by
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
    r"""VICReg, relation form (SPEC §1; Balestriero & LeCun 2022, spectral view of VICReg).

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
    r"""Barlow Twins (SPEC §2).

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


# ----------------------------------------------------------------------------- InfoNCE


def info_nce_rows(z, labels=None, pairs=None, temperature=0.1, row_start=0, row_end=None):
    r"""Per-anchor InfoNCE terms for anchors ``row_start <= i < row_end`` against all N rows.

    ::

        s_ij = ⟨ẑ_i, ẑ_j⟩,  ẑ = z / max(‖z‖, 1e-12)    (torch.nn.functional.normalize)
        ℓ_i  = logsumexp_{a≠i}(s_ia/τ) - (1/|P(i)|) Σ_{p∈P(i)} s_ip/τ
        ℓ_i  = 0 when P(i) is empty

    Returns ``(ℓ, count)``: ℓ has one entry per window row, in z's dtype; ``count`` is
    |P(i)| for the same rows as floats, in z's dtype promoted to at least float32 (so the
    counts stay exact integers for bf16/fp16 inputs). The diagonal is excluded from the
    logsumexp by masking it with -inf; G never contains it, so the positive sum uses the
    unmasked logits. This row window is what the distributed path computes per rank: local
    anchors against every gathered candidate.
    """
    n = z.shape[0]
    row_end = n if row_end is None else row_end
    g = relation_matrix(n, labels=labels, pairs=pairs, device=z.device)[row_start:row_end]
    zn = F.normalize(z, dim=1)
    logits = zn[row_start:row_end] @ zn.T / temperature           # (rows, N)
    anchor = torch.arange(row_start, row_end, device=z.device)
    is_self = anchor[:, None] == torch.arange(n, device=z.device)[None, :]
    logits = logits.masked_fill(is_self, float("-inf"))
    count = g.sum(dim=1)
    # The logits are taken relative to their row's largest x_im, and Σ_a exp(x_ia - x_im) is
    # summed over the other candidates first, with the maximum's own term (exactly 1) added
    # last: one rounding near 1 instead of one per candidate. The weight of the dominant logit
    # and its gradient p - 1 then keep an error of a few ulp of 1 (pytorch-metric-learning's
    # order). Through logsumexp, p = exp(x - lse) with lse rounded to the ulp of |s/τ| (14 at
    # τ = 0.07): NT-Xent gradients 3× (lightly's log_softmax order: 2.5×) farther from float64
    # for close positives. The shift carries no gradient (ℓ does not depend on it).
    top = logits.detach().argmax(dim=1, keepdim=True)
    row_max = logits.detach().gather(1, top)
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)  # a row without candidates (N = 1)
    shifted = logits - row_max                                    # 0 at the maximum
    others = torch.exp(shifted.scatter(1, top, float("-inf"))).sum(dim=1)
    total = torch.exp(shifted.gather(1, top).squeeze(1)) + others  # Σ_{a≠i} exp(x_ia - x_im)
    log_sum = torch.log(torch.where(count > 0, total, 1.0))      # (rows without positives add 0)
    positive_sum = torch.where(g, shifted, 0.0).sum(dim=1)
    positive_mean = positive_sum / count.to(z.dtype).clamp(min=1)
    loss = torch.where(count > 0, log_sum - positive_mean, 0.0)
    return loss, count.to(torch.promote_types(z.dtype, torch.float32))


def info_nce_loss(z, labels=None, pairs=None, temperature=0.1):
    r"""InfoNCE over a positive relation G: SupCon's L_out (SPEC §3).

    ::

        loss = Σ_i ℓ_i / max(#{i : |P(i)| ≥ 1}, 1)         ℓ_i from :func:`info_nce_rows`

    Every row is a negative for every other row; an anchor without positives adds nothing
    but still serves as a negative. If no anchor has a positive the loss is 0 with zero
    gradient (computed with a clamp, not a host-side branch). Cosine similarity uses
    ``F.normalize``'s row normalisation, i.e. the norm is clamped below at 1e-12.

    ``labels`` with sample ids gives multi-view SimCLR (any number of views); class ids give
    SupCon (Khosla et al. 2020, L_out). ``pairs`` gives an arbitrary symmetric G.
    solo-learn (all positives in one numerator) and pytorch-metric-learning (other positives
    removed from the denominator) compute different losses once an anchor has more than
    one positive; see :func:`nt_xent_loss`.
    """
    loss_rows, count = info_nce_rows(z, labels=labels, pairs=pairs, temperature=temperature)
    anchors = (count > 0).sum().to(loss_rows.dtype)
    return loss_rows.sum() / anchors.clamp(min=1)


def nt_xent_loss(z_a, z_b, temperature=0.5):
    r"""SimCLR's NT-Xent over 2N anchors (Chen et al. 2020).

    ``info_nce_loss(cat([z_a, z_b]), labels=arange(N).repeat(2), temperature)``: each row's
    one positive is the other view of its sample; the other 2N - 2 rows are negatives.
    Equals lightly's ``NTXentLoss`` (default τ = 0.5). solo-learn's ``simclr_loss_func``
    puts all positives in one numerator and pytorch-metric-learning's ``NTXentLoss`` drops
    the other positives from each denominator: those are different losses, which coincide
    with this one only while every anchor has exactly one positive (plain two-view SimCLR)
    and part from it as soon as an anchor has several (more views, SupCon labels).
    """
    n = z_a.shape[0]
    labels = torch.arange(n, device=z_a.device).repeat(2)
    return info_nce_loss(torch.cat([z_a, z_b]), labels=labels, temperature=temperature)


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
    r"""One direction of Matrix-SSL: ``U(p, z) + gamma·A(p, z)`` (SPEC §4).

    Rows of p (online branch) and z (target branch) are L2-normalised, then centred by
    subtracting column means (pᵀJz = pcᵀzc since J is a symmetric projection)::

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
    r"""The value of :func:`matrix_ssl_loss`, computed the way the paper's released code does.

    A benchmark baseline, not a recommended implementation: it builds the N×N centring
    matrix ``J = I - 11ᵀ/N``, forms ``pᵀ J z`` through it, multiplies out every Taylor power
    (Q - I)^k as a full K×K matrix, and takes the trace of the full K×K product ``-P·log Q``.
    Rows are L2-normalised inside each of the two terms, as the released loss function does.
    """
    n, k = p.shape
    j = _eye(n, p) - torch.ones(n, n, dtype=p.dtype, device=p.device) / n
    eye = _eye(k, p)

    def series_log(q):
        x = q - eye
        power = x
        out = torch.zeros_like(q)
        for i in range(1, order + 1):
            out = out + power * ((-1.0) ** (i + 1) / i)
            power = power @ x
        return out

    def term(p, z, correlation):
        p = F.normalize(p, dim=1)
        z = F.normalize(z, dim=1)
        if correlation:
            big_p = lambd * eye
            big_q = p.T @ j @ z / n + mu * eye
        else:
            big_p = p.T @ j @ p / n + mu * eye
            big_q = z.T @ j @ z / n + mu * eye
        return torch.trace(-big_p @ series_log(big_q))

    return term(p, z, True) + gamma * term(p, z, False)
