r"""The blockwise contrastive pass: custom ops, fake and autograd registrations, the losses on it.

One pair of custom ops carries every contrastive loss of sslops through ``torch.library``
(so ``opcheck``, ``torch.compile(fullgraph=True)`` and autocast see them): InfoNCE over a
relation (SimCLR, SupCon; conventions §3), with extra negatives, DCL/DCLW and a learnable
temperature, CLIP and SigLIP (conventions §3b):

* ``sslops::contrastive_fwd(x, y, negatives, labels_x, labels_y, crow, col, scale, bias,
  x_start, x_end, y_start, y_end, flags, sigma, backend) -> (diff_x, aux_x, diff_y, aux_y)``:
  per anchor row, (B, 3) and (B, 4) statistics. Square form (``y`` None): anchors rows [x_start, x_end)
  of x against x's own rows (G from labels or a CSR) and the ``negatives``. Two-set form:
  rows of x against y and, with ``BIDIR``, rows of y against x (CLIP's two directions).
  Softmax forms: diff = [lse_i, Σ_{P(i)} s, Σ_{P(i)} s·e^{s/σ}], aux = [|P(i)|, Σ_{D(i)} p·s,
  Σ_{P(i)} e^{s/σ}, lo_i]; SigLIP: diff = [Σ_j softplus(−y_ij x_ij), 0, 0], aux = [|P(i)|,
  Σ_j h_ij s_ij, Σ_j h_ij, 0] with h = ∂softplus(−y x)/∂x. ``lo_i`` is lse_i's rounding
  residual: the kernel's m_i + log Σ exp(t·s − m_i) (m_i the row max) equals lse_i + lo_i
  exactly.
* ``sslops::contrastive_bwd(grad_x, grad_y, ..., diff_x, diff_y, aux_x, aux_y, ...) -> (dx, dy,
  dnegatives)``: the gradients of the rows from those of the diff columns, recomputing the
  similarity tiles. The softmax weights are exp((t·s − lse_i) − lo_i): lse_i ≈ 1/τ is rounded
  to its ulp (1e-6 at τ = 0.07), and weights formed from the rounded value alone lose that
  much relative precision, which a dominant positive's gradient p − 1 magnifies (NT-Xent's
  fp32 gradients were 3-4× farther from float64 than lightly's cross-entropy form). With the
  residual, t·s − lse_i is exact near the row maximum and the weights are as accurate as
  naive fp32 PyTorch's (as :func:`sslops.reference.info_nce_rows`' split log-sum-exp).

The autograd formula also returns the gradients of ``scale`` and ``bias`` (0-d tensors: a
learnable temperature, logit scale or bias) from the saved per-row statistics alone:
∂lse_i/∂t = Σ_j p_ij s_ij (aux column 1), ∂Σ_j softplus/∂t = Σ_j h_ij s_ij and ∂/∂b = Σ_j h_ij.
``pse``'s gradient is taken with its weight e^{s/σ} held constant: DCLW's weights are detached.

The losses are plain torch arithmetic on those rows (below): InfoNCE's
ℓ_i = lse_i − t·Σ_P w s/|P(i)| over :func:`sslops.reference.anchor_mask`, CLIP's two
directions, SigLIP's sum. Kernels: ``csrc/cpu/infonce.cpp``, ``triton_kernels/infonce.py``,
``csrc/cuda/infonce.cu`` (one file per backend; their headers give the FLOPs and bytes).

A CSR for ``pairs`` is built once per call by :func:`pairs_to_csr` with plain torch ops
(static shapes, no host sync): both directions, columns sorted within each row; duplicates
and self-pairs stay in place and every kernel skips an entry equal to its predecessor in
the row or to the row itself.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _autocast, _backend, _extension, reference
from ._first_order import first_order_only

__all__ = ["info_nce_rows", "pairs_to_csr", "contrastive_fwd", "contrastive_bwd"]

# flags of the custom ops (csrc/cpu/infonce_common.h holds the same values)
SIGMOID, NO_INBATCH, DECOUPLED, WEIGHTED, NO_NORMALIZE, BIDIR = 1, 2, 4, 8, 16, 32


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def pairs_to_csr(pairs, m: int) -> Tuple[Tensor, Tensor]:
    """Symmetric CSR (crow (M+1,), col (2P,)) of ``pairs``, columns sorted within each row.

    Duplicates and self-pairs stay in place: kernels skip an entry equal to its predecessor
    in the row or to the row itself. Static shapes and torch ops only: no host sync,
    traceable by ``torch.compile``.
    """
    rows = pairs[0].to(torch.int64)
    cols = pairs[1].to(torch.int64)
    key, _ = torch.sort(torch.cat([rows * m + cols, cols * m + rows]))
    r = torch.div(key, m, rounding_mode="floor")
    col = key - r * m
    crow = torch.searchsorted(key, torch.arange(m + 1, device=key.device, dtype=torch.int64) * m)
    return crow, col


# ----------------------------------------------------------------------------- forward op


@torch.library.custom_op("sslops::contrastive_fwd", mutates_args=())
@_autocast.disabled
def contrastive_fwd(x: Tensor, y: Optional[Tensor], negatives: Optional[Tensor], labels_x: Optional[Tensor],
                    labels_y: Optional[Tensor], crow: Optional[Tensor], col: Optional[Tensor], scale: Tensor, bias: Tensor,
                    x_start: int, x_end: int, y_start: int, y_end: int, flags: int, sigma: float,
                    backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (x, y, negatives, labels_x, labels_y, crow, col, scale, bias, x_start, x_end, y_start, y_end, flags, sigma)
    if backend in ("cpu", "cuda"):
        return torch.ops.sslops.contrastive_fwd_cxx(*args)
    if backend == "triton":
        from ..triton_kernels import infonce as tk

        return tk.contrastive_forward(*args)
    raise ValueError(f"contrastive_fwd: unknown backend {backend!r}")


@contrastive_fwd.register_fake
def _(x, y, negatives, labels_x, labels_y, crow, col, scale, bias, x_start, x_end, y_start, y_end, flags, sigma, backend):
    acc = _acc_dtype(x.dtype)
    bx = x_end - x_start
    by = y_end - y_start if (y is not None and flags & BIDIR) else 0
    return tuple(x.new_empty((b, c), dtype=acc) for b, c in ((bx, 3), (bx, 4), (by, 3), (by, 4)))


# ----------------------------------------------------------------------------- backward op


@torch.library.custom_op("sslops::contrastive_bwd", mutates_args=())
@_autocast.disabled
def contrastive_bwd(grad_x: Tensor, grad_y: Tensor, x: Tensor, y: Optional[Tensor], negatives: Optional[Tensor],
                    labels_x: Optional[Tensor], labels_y: Optional[Tensor], crow: Optional[Tensor], col: Optional[Tensor],
                    diff_x: Tensor, diff_y: Tensor, aux_x: Tensor, aux_y: Tensor, scale: Tensor, bias: Tensor,
                    x_start: int, x_end: int, y_start: int, y_end: int, flags: int, sigma: float, need_x: bool,
                    need_y: bool, need_negatives: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    args = (grad_x, grad_y, x, y, negatives, labels_x, labels_y, crow, col, diff_x, diff_y, aux_x, aux_y, scale, bias,
            x_start, x_end, y_start, y_end, flags, sigma, need_x, need_y, need_negatives)
    if backend in ("cpu", "cuda"):
        return torch.ops.sslops.contrastive_bwd_cxx(*args)
    if backend == "triton":
        from ..triton_kernels import infonce as tk

        return tk.contrastive_backward(*args)
    raise ValueError(f"contrastive_bwd: unknown backend {backend!r}")


@contrastive_bwd.register_fake
def _(grad_x, grad_y, x, y, negatives, labels_x, labels_y, crow, col, diff_x, diff_y, aux_x, aux_y, scale, bias, x_start,
      x_end, y_start, y_end, flags, sigma, need_x, need_y, need_negatives, backend):
    k = x.shape[1]
    ny = y.shape[0] if (y is not None and need_y) else 0
    nq = negatives.shape[0] if (negatives is not None and need_negatives) else 0
    return (x.new_empty((x.shape[0] if need_x else 0, k)), x.new_empty((ny, k)), x.new_empty((nq, k)))


def _setup_context(ctx, inputs, output):
    x, y, negatives, labels_x, labels_y, crow, col, scale, bias, x_start, x_end, y_start, y_end, flags, sigma, backend = inputs
    diff_x, aux_x, diff_y, aux_y = output
    ctx.mark_non_differentiable(aux_x, aux_y)
    ctx.save_for_backward(x, y, negatives, labels_x, labels_y, crow, col, scale, bias, diff_x, aux_x, diff_y, aux_y)
    ctx.params = (x_start, x_end, y_start, y_end, flags, sigma, backend)
    ctx.set_materialize_grads(False)  # no zero gradients for the statistics (the backward takes None)


def _scale_bias_grads(grad, aux, sigmoid):
    """(∂L/∂t, ∂L/∂b) of one set's rows from the saved statistics (zero-gradient rows skipped)."""
    if grad.shape[0] == 0:
        zero = grad.new_zeros(())
        return zero, zero
    a = grad[:, 0]
    live = a != 0  # rows left out of the loss may hold non-finite statistics
    if sigmoid:
        return torch.where(live, a * aux[:, 1], 0.0).sum(), torch.where(live, a * aux[:, 2], 0.0).sum()
    return torch.where(live, a * aux[:, 1], 0.0).sum(), grad.new_zeros(())


def _backward(ctx, grad_diff_x, grad_aux_x, grad_diff_y, grad_aux_y):
    first_order_only("info_nce_loss/nt_xent_loss/clip_loss/siglip_loss")  # the op serves all four
    x, y, negatives, labels_x, labels_y, crow, col, scale, bias, diff_x, aux_x, diff_y, aux_y = ctx.saved_tensors
    x_start, x_end, y_start, y_end, flags, sigma, backend = ctx.params
    need = ctx.needs_input_grad
    grad_x = torch.zeros_like(diff_x) if grad_diff_x is None else grad_diff_x
    grad_y = torch.zeros_like(diff_y) if grad_diff_y is None else grad_diff_y
    dx = dy = dneg = dscale = dbias = None
    if need[0] or need[1] or need[2]:
        gx, gy, gq = contrastive_bwd(grad_x, grad_y, x, y, negatives, labels_x, labels_y, crow, col, diff_x, diff_y,
                                     aux_x, aux_y, scale, bias, x_start, x_end, y_start, y_end, flags, sigma, need[0],
                                     need[1] and y is not None, need[2] and negatives is not None, backend)
        dx = gx if need[0] else None
        dy = gy if need[1] and y is not None else None
        dneg = gq if need[2] and negatives is not None else None
    if need[7] or need[8]:
        sigmoid = bool(flags & SIGMOID)
        tx, bx = _scale_bias_grads(grad_x, aux_x, sigmoid)
        ty, by = _scale_bias_grads(grad_y, aux_y, sigmoid)
        dscale = (tx + ty).to(scale.dtype) if need[7] else None
        dbias = (bx + by).to(bias.dtype) if need[8] else None
    return dx, dy, dneg, None, None, None, None, dscale, dbias, None, None, None, None, None, None, None


contrastive_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- the losses on the op


def _as_scalar(value, acc, device):
    """A float or 0-d tensor hyperparameter as a 0-d tensor of the compute dtype (tensors keep their graph)."""
    if isinstance(value, Tensor):
        return value.to(dtype=acc)
    return torch.full((), float(value), dtype=acc, device=device)


def _inverse(temperature, acc, device):
    if isinstance(temperature, Tensor):
        return 1.0 / temperature.to(dtype=acc)
    return torch.full((), 1.0 / float(temperature), dtype=acc, device=device)


def _int64(labels):
    return None if labels is None else labels.to(torch.int64)


def info_nce_rows(z, labels, pairs, temperature, row_start, row_end, backend, *, negatives=None, in_batch_negatives=True,
                  decoupled=False, weight_totals=None):
    """Per-anchor ℓ_i and |P(i)| for anchors ``[row_start, row_end)`` of ``z`` against its rows and ``negatives``.

    Same semantics as :func:`sslops.reference.info_nce_rows`; returns ``(loss_rows, pos_count)``
    in fp32 (fp64 for fp64), ``pos_count`` without gradient. ``backend`` is a concrete kernel
    backend: ``"cpu"``, ``"triton"`` or ``"cuda"``. The gradient reaches every row of ``z``
    (anchor terms for the window, candidate terms for all rows), the negatives when they
    require grad, and a tensor ``temperature``. For DCLW, the weights' normaliser (Σ e^{s/σ}
    and |E| over the loss's anchors) is the window's own; ``weight_totals(pe_sum, count_sum)``
    may replace it by the global one (the distributed path all-reduces it).
    """
    m = z.shape[0]
    if (labels is None) == (pairs is None):
        raise ValueError("info_nce_rows: give exactly one of labels or pairs")
    crow = col = None
    if pairs is not None:
        crow, col = pairs_to_csr(pairs, m)
    labels = _int64(labels)
    acc = _acc_dtype(z.dtype)
    scale = _inverse(temperature, acc, z.device)
    zero = z.new_zeros((), dtype=acc)
    weighted = decoupled == "weighted"
    flags = (0 if in_batch_negatives else NO_INBATCH) | (DECOUPLED if decoupled else 0) | (WEIGHTED if weighted else 0)
    diff, aux, _, _ = contrastive_fwd(z, None, negatives, labels, None, crow, col, scale, zero, int(row_start),
                                      int(row_end), 0, 0, flags, reference.DCLW_SIGMA, backend)
    count = aux[:, 0]
    n_neg = 0 if negatives is None else negatives.shape[0]
    valid = reference.anchor_mask(count, m, n_neg, in_batch_negatives, decoupled)
    positive = diff[:, 1]
    if weighted:
        pe_sum, count_sum = aux[:, 2].sum(), count.sum()
        if weight_totals is not None:
            pe_sum, count_sum = weight_totals(pe_sum, count_sum)
        positive = 2.0 * positive - (count_sum / pe_sum) * diff[:, 2]
    loss_rows = torch.where(valid, diff[:, 0] - scale * positive / count.clamp(min=1), 0.0)
    return loss_rows, count


def _mean_over_anchors(loss_rows, count, n_batch, negatives, in_batch_negatives, decoupled):
    n_neg = 0 if negatives is None else negatives.shape[0]
    anchors = reference.anchor_mask(count, n_batch, n_neg, in_batch_negatives, decoupled).sum().to(loss_rows.dtype)
    return loss_rows.sum() / anchors.clamp(min=1)


def _info_nce_fn(backend):
    def info_nce(z, labels, pairs, *, temperature, negatives=None, in_batch_negatives=True, decoupled=False):
        n = z.shape[0]
        rows, count = info_nce_rows(z, labels, pairs, temperature, 0, n, backend, negatives=negatives,
                                    in_batch_negatives=in_batch_negatives, decoupled=decoupled)
        return _mean_over_anchors(rows, count, n, negatives, in_batch_negatives, decoupled)

    info_nce.__name__ = f"info_nce_{backend}"
    return info_nce


def _nt_xent_fn(backend):
    def nt_xent(z_a, z_b, *, temperature, negatives=None, in_batch_negatives=True, decoupled=False):
        n = z_a.shape[0]
        labels = torch.arange(n, device=z_a.device).repeat(2)
        end = 2 * n if in_batch_negatives else n  # MoCo / memory bank: the anchors are z_a's rows
        rows, count = info_nce_rows(torch.cat([z_a, z_b]), labels, None, temperature, 0, end, backend, negatives=negatives,
                                    in_batch_negatives=in_batch_negatives, decoupled=decoupled)
        return _mean_over_anchors(rows, count, 2 * n, negatives, in_batch_negatives, decoupled)

    nt_xent.__name__ = f"nt_xent_{backend}"
    return nt_xent


def clip_rows(z_a, z_b, logit_scale, labels, normalize, row_start, row_end, backend):
    """CLIP's per-anchor terms (ℓᵃ, ℓᵇ) for rows ``[row_start, row_end)`` of both sets against all rows of the other.

    Same semantics as :func:`sslops.reference.clip_rows`; fp32 (fp64 for fp64).
    """
    acc = _acc_dtype(z_a.dtype)
    labels = torch.arange(z_a.shape[0], device=z_a.device) if labels is None else labels.to(torch.int64)
    scale = _as_scalar(logit_scale, acc, z_a.device)
    flags = BIDIR | (0 if normalize else NO_NORMALIZE)
    diff_a, aux_a, diff_b, aux_b = contrastive_fwd(z_a, z_b, None, labels, labels, None, None, scale,
                                                   z_a.new_zeros((), dtype=acc), int(row_start), int(row_end),
                                                   int(row_start), int(row_end), flags, reference.DCLW_SIGMA, backend)
    loss_a = diff_a[:, 0] - scale * diff_a[:, 1] / aux_a[:, 0]
    loss_b = diff_b[:, 0] - scale * diff_b[:, 1] / aux_b[:, 0]
    return loss_a, loss_b


def siglip_rows(z_a, z_b, logit_scale, logit_bias, labels_a, labels_b, normalize, backend):
    """SigLIP's per-row sums Σ_j softplus(−y_ij x_ij) for every row of ``z_a`` against all rows of ``z_b``.

    ``labels_a``/``labels_b`` give the relation (y = +1 on equal labels); fp32 (fp64 for fp64).
    """
    acc = _acc_dtype(z_a.dtype)
    flags = SIGMOID | (0 if normalize else NO_NORMALIZE)
    diff, _, _, _ = contrastive_fwd(z_a, z_b, None, labels_a.to(torch.int64), labels_b.to(torch.int64), None, None,
                                    _as_scalar(logit_scale, acc, z_a.device), _as_scalar(logit_bias, acc, z_a.device),
                                    0, z_a.shape[0], 0, 0, flags, reference.DCLW_SIGMA, backend)
    return diff[:, 0]


def _clip_fn(backend):
    def clip(z_a, z_b, *, logit_scale, labels=None, normalize=True):
        loss_a, loss_b = clip_rows(z_a, z_b, logit_scale, labels, normalize, 0, z_a.shape[0], backend)
        return 0.5 * (loss_a.mean() + loss_b.mean())

    clip.__name__ = f"clip_{backend}"
    return clip


def _siglip_fn(backend):
    def siglip(z_a, z_b, *, logit_scale, logit_bias, labels=None, normalize=True):
        n = z_a.shape[0]
        ids = torch.arange(n, device=z_a.device) if labels is None else labels
        return siglip_rows(z_a, z_b, logit_scale, logit_bias, ids, ids, normalize, backend).sum() / n

    siglip.__name__ = f"siglip_{backend}"
    return siglip


for _loss, _make in (("info_nce", _info_nce_fn), ("nt_xent", _nt_xent_fn), ("clip", _clip_fn), ("siglip", _siglip_fn)):
    _impls = {"triton": _make("triton"), "cuda": _make("cuda")}
    if _extension.LOADED:
        _impls["cpu"] = _make("cpu")
    _backend.register_kernels(_loss, _impls, cuda_verified=False)
