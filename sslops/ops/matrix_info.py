r"""Custom ops of the matrix-information family: Matrix-SSL, matrix cross-entropy (and their convergence guard).

One direction of Matrix-SSL (conventions §4), rows L2-normalised, J the centring by column means,
c_k = (-1)^{k+1}/k, n = ``order``:

.. math::

    U &= -\lambda \textstyle\sum_{k\le n} c_k\,\mathrm{tr}(X_u^k), \qquad X_u = p_c^\top z_c/N + (\mu-1)I \\
    A &= -\textstyle\sum_{k\le n} c_k\,\mathrm{tr}(P\,X_a^k), \qquad P = p_c^\top p_c/N + \mu I,\;
         X_a = z_c^\top z_c/N + (\mu-1)I \\
    \mathcal L &= U + \gamma A

p is the target branch (a teacher's output, detached in training), z the online branch.
Only traces of powers are needed, never log Q: tr(X^k) = Σ (X^a ∘ (X^b)ᵀ) with a + b = k,
and tr(P X^k) = Σ (A_{k-1} ∘ X_aᵀ) along the chain A_j = A_{j-1} X_a. Order 4 takes, with the
C++ kernels, four K×K products in the forward (X_u², A_1, A_2 and the symmetric X_a², which
stands in for A_3: tr(P X_a⁴) = Σ A_2 ∘ X_a²; the Triton kernels run the chain to A_3) and in
the backward three when both inputs need a gradient, two when only z does; the backward
uses the power-sum formula d tr(P X^k)/dX = Σ_j (X^j)ᵀ Pᵀ (X^{k-1-j})ᵀ regrouped by Horner's
rule (see ``csrc/cpu/matrix_info_impl.h``), not autograd through the chain. The covariances
come from one pass over the rows (normalise, centre) and block GEMMs, their gradients from
two GEMMs per input that needs one (on the CPU blocked over rows, no N×2K buffer).

Ops:

* ``sslops::matrix_info_ssl_forward(p, z, lambd, mu, gamma, order, backend)`` →
  (loss, Xu, P, Xa, saved): loss fp32 (fp64 for fp64); X_u, P, X_a as above (Sp, Sz
  symmetrised), and the products the forward made, stacked ((h-1)+(n-1), K, K), h = ⌈n/2⌉
  (each backend's own layout, read only by its own backward), all saved for the backward
  (small: K×K, while the N×K normalised rows are recomputed).
* ``sslops::matrix_info_ssl_backward(grad, p, z, Xu, P, Xa, saved, ..., need_p, need_z)`` →
  (dp, dz) in the inputs' dtype; a gradient that is not needed comes back as an empty (0,)
  tensor (no N×K of zeros: in training only z needs one).

Matrix cross-entropy (:func:`sslops.matrix_cross_entropy`, ``method="taylor"``), P and Q
general K×K, X = Q - I:

.. math::

    \mathcal L = -\textstyle\sum_{k\le n} c_k\,\mathrm{tr}(P X^k) + \mathrm{tr}\,Q,\qquad
    \partial\mathcal L/\partial P = -f(X)^\top,\quad
    \partial\mathcal L/\partial Q = -G^\top + I

with f(X) = Σ_k c_k X^k and G = Σ_{m<n} X^m D_m, D_m = Σ_{j≤n-1-m} c_{m+j+1} A_j (the chain
A_j = P X^j; Horner in X). Forward n - 1 K×K products (each traced, never log Q),
backward about 2(n - 1); saved X and A_1..A_{n-1}.

* ``sslops::matrix_info_mce_forward(p, q, order, backend)`` → (loss, X, saved): loss fp32
  (fp64 for fp64), X = Q - I and the chain stacked ((n-1, K, K)) in the same dtype.
* ``sslops::matrix_info_mce_backward(grad, p, X, saved, order, need_p, need_q, backend)`` →
  (dp, dq) in the inputs' dtype (zeros for an input that needs none).

Backends: ``"cpu"`` and ``"cuda"`` call the C++ ops ``matrix_ssl_fwd_cxx``/``_bwd_cxx``
(``matrix_mce_fwd_cxx``/``_bwd_cxx`` for MCE)
(the device picks the kernel), ``"triton"`` the launchers of
``sslops.triton_kernels.matrix_info``. The guard (``sslops.matrix_guard``) runs on the
returned X_u and X_a (= Q - I for both logarithms; X for MCE), so it costs no extra product.
"""

from typing import Tuple

import torch
from torch import Tensor

from .. import _autocast, _backend, _extension, matrix_guard
from ._first_order import first_order_only

__all__ = ["matrix_ssl", "guard_matrices", "matrix_cross_entropy"]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _saved_count(order):
    return ((order + 1) // 2 - 1) + (order - 1)


def _impl(backend):
    if backend == "triton":
        from ..triton_kernels import matrix_info as tk

        return tk.ssl_forward, tk.ssl_backward
    return torch.ops.sslops.matrix_ssl_fwd_cxx, torch.ops.sslops.matrix_ssl_bwd_cxx


@torch.library.custom_op("sslops::matrix_info_ssl_forward", mutates_args=())
@_autocast.disabled
def _ssl_forward(
    p: Tensor, z: Tensor, lambd: float, mu: float, gamma: float, order: int, backend: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    fwd, _ = _impl(backend)
    return tuple(fwd(p, z, lambd, mu, gamma, order))


@_ssl_forward.register_fake
def _(p, z, lambd, mu, gamma, order, backend):
    acc = _acc(p.dtype)
    k = p.shape[1]
    kk = lambda: p.new_empty((k, k), dtype=acc)  # noqa: E731
    return p.new_empty((), dtype=acc), kk(), kk(), kk(), p.new_empty((_saved_count(order), k, k), dtype=acc)


@torch.library.custom_op("sslops::matrix_info_ssl_backward", mutates_args=())
@_autocast.disabled
def _ssl_backward(
    grad: Tensor,
    p: Tensor,
    z: Tensor,
    xu: Tensor,
    pa: Tensor,
    xa: Tensor,
    saved: Tensor,
    lambd: float,
    mu: float,
    gamma: float,
    order: int,
    need_p: bool,
    need_z: bool,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    _, bwd = _impl(backend)
    gp, gz = bwd(grad, p, z, xu, pa, xa, saved, lambd, mu, gamma, order, need_p, need_z)
    return gp, gz


@_ssl_backward.register_fake
def _(grad, p, z, xu, pa, xa, saved, lambd, mu, gamma, order, need_p, need_z, backend):
    def grad_of(x, needed):  # a gradient nobody asked for is an empty (0,) tensor: no N×K of zeros
        return torch.empty_like(x, memory_format=torch.contiguous_format) if needed else x.new_empty((0,))

    return grad_of(p, need_p), grad_of(z, need_z)


def _setup_context(ctx, inputs, output):
    p, z, lambd, mu, gamma, order, backend = inputs
    _, xu, pa, xa, saved = output
    ctx.save_for_backward(p, z, xu, pa, xa, saved)
    ctx.params = (lambd, mu, gamma, order, backend)
    ctx.mark_non_differentiable(xu, pa, xa, saved)
    ctx.set_materialize_grads(False)  # else autograd hands the backward zero K×K gradients for all of them


def _backward(ctx, g_loss, g_xu, g_pa, g_xa, g_saved):
    first_order_only("matrix_ssl_loss")
    if g_loss is None:
        return (None,) * 7
    p, z, xu, pa, xa, saved = ctx.saved_tensors
    lambd, mu, gamma, order, backend = ctx.params
    need_p, need_z = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gp, gz = _ssl_backward(g_loss, p, z, xu, pa, xa, saved, lambd, mu, gamma, order, need_p, need_z, backend)
    return (gp if need_p else None), (gz if need_z else None), None, None, None, None, None


_ssl_forward.register_autograd(_backward, setup_context=_setup_context)


def guard_matrices(xu, xa):
    """The (X = Q - I, what, argument, hint) list the convergence guard checks for Matrix-SSL."""
    hint = " (with L2-normalised rows, mu = 1 keeps the spectral radius at or below 1)"
    return [
        (xu, "the uniformity term's Q = pᵀJz/N + mu·I", "mu", hint),
        (xa, "the alignment term's Q = zᵀJz/N + mu·I", "mu", hint),
    ]


def matrix_ssl(p, z, *, lambd, mu, gamma, order, backend, check="off"):
    """Matrix-SSL loss on ``backend`` ("cpu", "cuda" or "triton"), guarded by ``check``."""
    loss, xu, _, xa, _ = _ssl_forward(p, z, float(lambd), float(mu), float(gamma), int(order), backend)
    return matrix_guard.guard(loss, guard_matrices(xu, xa), check, "matrix_ssl_loss")


def _kernel(backend):
    def run(p, z, *, lambd, mu, gamma, order, check="off"):
        return matrix_ssl(p, z, lambd=lambd, mu=mu, gamma=gamma, order=order, backend=backend, check=check)

    run.__name__ = f"matrix_ssl_{backend}"
    return run


_impls = {"triton": _kernel("triton"), "cuda": _kernel("cuda")}
if _extension.LOADED:
    _impls["cpu"] = _kernel("cpu")
_backend.register_kernels("matrix_ssl", _impls, cuda_verified=False, triton_verified=False)  # neither has run on a GPU yet


# ----------------------------------------------------------------------------- matrix cross-entropy


def _mce_impl(backend):
    if backend == "triton":
        from ..triton_kernels import matrix_info as tk

        return tk.mce_forward, tk.mce_backward
    return torch.ops.sslops.matrix_mce_fwd_cxx, torch.ops.sslops.matrix_mce_bwd_cxx


@torch.library.custom_op("sslops::matrix_info_mce_forward", mutates_args=())
@_autocast.disabled
def _mce_forward(p: Tensor, q: Tensor, order: int, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    fwd, _ = _mce_impl(backend)
    return tuple(fwd(p, q, order))


@_mce_forward.register_fake
def _(p, q, order, backend):
    acc = _acc(p.dtype)
    k = p.shape[0]
    return p.new_empty((), dtype=acc), p.new_empty((k, k), dtype=acc), p.new_empty((order - 1, k, k), dtype=acc)


@torch.library.custom_op("sslops::matrix_info_mce_backward", mutates_args=())
@_autocast.disabled
def _mce_backward(
    grad: Tensor, p: Tensor, x: Tensor, saved: Tensor, order: int, need_p: bool, need_q: bool, backend: str
) -> Tuple[Tensor, Tensor]:
    _, bwd = _mce_impl(backend)
    gp, gq = bwd(grad, p, x, saved, order, need_p, need_q)
    return gp, gq


@_mce_backward.register_fake
def _(grad, p, x, saved, order, need_p, need_q, backend):
    return torch.empty_like(p, memory_format=torch.contiguous_format), torch.empty_like(p, memory_format=torch.contiguous_format)


def _mce_setup_context(ctx, inputs, output):
    p, q, order, backend = inputs
    _, x, saved = output
    ctx.save_for_backward(p, x, saved)
    ctx.params = (order, backend)
    ctx.mark_non_differentiable(x, saved)
    ctx.set_materialize_grads(False)  # else autograd hands the backward zero gradients for X and the chain


def _mce_backward_rule(ctx, g_loss, g_x, g_saved):
    first_order_only("matrix_cross_entropy")
    if g_loss is None:
        return (None,) * 4
    p, x, saved = ctx.saved_tensors
    order, backend = ctx.params
    need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gp, gq = _mce_backward(g_loss, p, x, saved, order, need_p, need_q, backend)
    return (gp if need_p else None), (gq if need_q else None), None, None


_mce_forward.register_autograd(_mce_backward_rule, setup_context=_mce_setup_context)


def matrix_cross_entropy(p, q, *, order, backend, check="off"):
    """Matrix cross-entropy tr(-P log Q + Q), log Q by the series, on ``backend``, guarded by ``check``."""
    loss, x, _ = _mce_forward(p, q, int(order), backend)
    return matrix_guard.guard(loss, matrix_guard.log_series_matrices(x), check, "matrix_cross_entropy")


def _mce_kernel(backend):
    def run(p, q, *, order, check="off"):
        return matrix_cross_entropy(p, q, order=order, backend=backend, check=check)

    run.__name__ = f"matrix_cross_entropy_{backend}"
    return run


_mce_impls = {"triton": _mce_kernel("triton"), "cuda": _mce_kernel("cuda")}
if _extension.LOADED:
    _mce_impls["cpu"] = _mce_kernel("cpu")
_backend.register_kernels("matrix_cross_entropy", _mce_impls, cuda_verified=False, triton_verified=False)  # not run on a GPU yet
