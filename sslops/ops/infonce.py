r"""Blockwise InfoNCE over a sparse relation G: custom ops, fake and autograd registrations.

Two custom ops carry the loss through ``torch.library`` (so ``opcheck``,
``torch.compile(fullgraph=True)`` and autocast see them):

* ``sslops::info_nce_fwd(z, labels, crow, col, temperature, row_start, row_end, backend)
  -> (loss_rows, pos_count, lse)``: per-anchor ℓ_i, |P(i)| and the row LSE for the anchors
  ``row_start <= i < row_end`` against all M rows of ``z``, kept split as a (2, B) tensor:
  the row maximum m_i = max_{j≠i} x_ij and log Σ_{j≠i} exp(x_ij − m_i). One rounded fp32 LSE
  (its ulp is that of |s/τ|) made the softmax weight of a dominant positive, and its gradient
  p − 1, several times farther from float64 than lightly's or pytorch-metric-learning's;
* ``sslops::info_nce_bwd(grad_rows, z, labels, crow, col, pos_count, lse, temperature,
  row_start, row_end, backend) -> dz``: the gradient for all M rows (anchor terms for the
  window, candidate terms for every row), recomputing the similarity tiles from the LSE.

G comes as ``labels`` (compared tile by tile inside the kernels) or as a CSR built once per
call from ``pairs`` by :func:`pairs_to_csr` with plain torch ops (static shapes, no host
sync): both directions, sorted; duplicates and self-pairs stay in place with column −1,
which every kernel skips.

:func:`info_nce_rows` is the differentiable row-window entry point shared with
:mod:`sslops.distributed`; the registered ``"info_nce"`` kernels divide its sum by the
number of anchors with a positive (clamped at 1, so a batch without positives gives 0 and
zero gradients, without a host sync).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend, _extension

__all__ = ["info_nce_rows", "pairs_to_csr"]


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def pairs_to_csr(pairs, m: int) -> Tuple[Tensor, Tensor]:
    """Symmetric CSR (crow (M+1,), col (2P,)) of ``pairs``; col = −1 marks a duplicate or self-pair.

    Static shapes and torch ops only: no host sync, traceable by ``torch.compile``.
    """
    rows = pairs[0].to(torch.int64)
    cols = pairs[1].to(torch.int64)
    key = torch.cat([rows * m + cols, cols * m + rows])
    key, _ = torch.sort(key)
    r = torch.div(key, m, rounding_mode="floor")
    c = key - r * m
    dup = torch.zeros_like(key, dtype=torch.bool)
    dup[1:] = key[1:] == key[:-1]
    col = torch.where(dup | (r == c), torch.full_like(c, -1), c)
    bounds = torch.arange(m + 1, device=key.device, dtype=torch.int64) * m
    crow = torch.searchsorted(key, bounds)
    return crow, col


# ----------------------------------------------------------------------------- forward op


@torch.library.custom_op("sslops::info_nce_fwd", mutates_args=())
def info_nce_fwd(z: Tensor, labels: Optional[Tensor], crow: Optional[Tensor], col: Optional[Tensor],
                 temperature: float, row_start: int, row_end: int, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    if backend in ("cpu", "cuda"):
        return torch.ops.sslops.info_nce_fwd_cxx(z, labels, crow, col, temperature, row_start, row_end)
    if backend == "triton":
        from ..triton_kernels import infonce as tk

        return tk.info_nce_forward(z, labels, crow, col, temperature, row_start, row_end)
    raise ValueError(f"info_nce_fwd: unknown backend {backend!r}")


@info_nce_fwd.register_fake
def _(z, labels, crow, col, temperature, row_start, row_end, backend):
    b = row_end - row_start
    acc = _acc_dtype(z.dtype)
    return z.new_empty((b,), dtype=acc), z.new_empty((b,), dtype=acc), z.new_empty((2, b), dtype=acc)


# ----------------------------------------------------------------------------- backward op


@torch.library.custom_op("sslops::info_nce_bwd", mutates_args=())
def info_nce_bwd(grad_rows: Tensor, z: Tensor, labels: Optional[Tensor], crow: Optional[Tensor], col: Optional[Tensor],
                 pos_count: Tensor, lse: Tensor, temperature: float, row_start: int, row_end: int, backend: str) -> Tensor:
    if backend in ("cpu", "cuda"):
        return torch.ops.sslops.info_nce_bwd_cxx(grad_rows, z, labels, crow, col, pos_count, lse, temperature,
                                                 row_start, row_end)
    if backend == "triton":
        from ..triton_kernels import infonce as tk

        return tk.info_nce_backward(grad_rows, z, labels, crow, col, pos_count, lse, temperature, row_start, row_end)
    raise ValueError(f"info_nce_bwd: unknown backend {backend!r}")


@info_nce_bwd.register_fake
def _(grad_rows, z, labels, crow, col, pos_count, lse, temperature, row_start, row_end, backend):
    return torch.empty(z.shape, dtype=z.dtype, device=z.device)


def _setup_context(ctx, inputs, output):
    z, labels, crow, col, temperature, row_start, row_end, backend = inputs
    _, pos_count, lse = output
    ctx.save_for_backward(z, labels, crow, col, pos_count, lse)
    ctx.params = (temperature, row_start, row_end, backend)


def _backward(ctx, grad_rows, grad_count, grad_lse):
    z, labels, crow, col, pos_count, lse = ctx.saved_tensors
    temperature, row_start, row_end, backend = ctx.params
    dz = None
    if ctx.needs_input_grad[0]:
        if grad_rows is None:
            grad_rows = torch.zeros_like(pos_count)
        dz = info_nce_bwd(grad_rows, z, labels, crow, col, pos_count, lse, temperature, row_start, row_end, backend)
    return dz, None, None, None, None, None, None, None


info_nce_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- entry points


def info_nce_rows(z, labels, pairs, temperature, row_start, row_end, backend):
    """Per-anchor ℓ_i and |P(i)| for anchors ``[row_start, row_end)`` of ``z`` against all its rows.

    Same semantics as :func:`sslops.reference.info_nce_rows`; returns ``(loss_rows,
    pos_count)`` in fp32 (fp64 for fp64), ``pos_count`` without gradient. ``backend`` is a
    concrete kernel backend: ``"cpu"``, ``"triton"`` or ``"cuda"``. The gradient reaches
    every row of ``z`` (anchor terms for the window, candidate terms for all rows).
    """
    m = z.shape[0]
    if (labels is None) == (pairs is None):
        raise ValueError("info_nce_rows: give exactly one of labels or pairs")
    crow = col = None
    if pairs is not None:
        crow, col = pairs_to_csr(pairs, m)
    elif labels.dtype != torch.int64:
        labels = labels.to(torch.int64)
    loss_rows, pos_count, _ = info_nce_fwd(z, labels, crow, col, float(temperature), int(row_start), int(row_end), backend)
    return loss_rows, pos_count.detach()


def _loss_fn(backend):
    def info_nce(z, labels, pairs, *, temperature):
        loss_rows, pos_count = info_nce_rows(z, labels, pairs, temperature, 0, z.shape[0], backend)
        anchors = (pos_count > 0).sum().to(loss_rows.dtype)
        return loss_rows.sum() / anchors.clamp(min=1)

    info_nce.__name__ = f"info_nce_{backend}"
    return info_nce


_impls = {"triton": _loss_fn("triton"), "cuda": _loss_fn("cuda")}
if _extension.LOADED:
    _impls["cpu"] = _loss_fn("cpu")
_backend.register_kernels("info_nce", _impls, cuda_verified=False)
