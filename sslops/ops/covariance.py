r"""Custom ops of the covariance family: VICReg (two views), VICReg's relation form, Barlow Twins.

Each loss is a forward custom op returning the loss plus the (K,) column statistics it
saves, a backward custom op, and ``register_fake``/``register_autograd`` so ``opcheck``,
``torch.compile(fullgraph=True)`` and autocast work. The kernels behind them share one
decomposition (see ``csrc/cpu/covariance.cpp`` and ``triton_kernels/covariance.py``):

* column statistics in one call (mean and centred sum of squares, or batch-norm rstd),
  saved for the backward; VICReg's invariance sum Σ(z_a - z_b)² is taken in the same call,
  in the pass over z_a's columns that computes the means (the view op's ``other``: z_b is
  read once more there, instead of a separate pass re-reading both views);
* the loss needs only scalar reductions of C = ÂᵀB̂ (‖C‖_F², diag C), taken on the
  cheaper side: the K×K product, or the N×N Gram route ‖ÂᵀB̂‖_F² = ⟨ÂÂᵀ, B̂B̂ᵀ⟩ when N is
  the smaller dimension, in forward and backward (``route`` argument: 0 picks by shape,
  1 forces K×K, 2 forces Gram; tests use it to run both at one shape);
* VICReg's invariance MSE is fused into the backward pass that writes dz as well.

The relation form's var/cov terms use the one-view VICReg kernels on z; its invariance
term is the custom op pair ``sslops::relation_invariance_fwd`` / ``_bwd``: device-generic
torch code, accumulation in fp32 (fp64 for fp64), gradient in z's dtype, no N×N matrix, no
host sync, shapes fixed by N, K and P. Every (rows, K) temporary is taken in chunks of at
most ``_RELATION_CHUNK_BYTES`` (64 MB), so none of N×K or P×K size exists besides what is
listed here:

* ``labels``: groups by sort + searchsorted (gid = first sorted position of the label, m =
  group size, a = the row at that position: one sample of each group). Every row is taken
  relative to its group's sample, d_i = z_i - z_a (exact when |z| ≫ its spread: groups centred
  on fp32 means of values near 1e5 lost 60× against the reference's pairwise differences).
  Forward: the group means of d, δ (one (N, K) buffer, row gid; index_add then divide), then
  Σ_{i≠j∈g}‖z_i - z_j‖² = 2m_g Σ_{i∈g}‖d_i - δ_g‖² — centred, so it does not cancel the way
  2mΣ‖z_i‖² - 2‖Σz_i‖² does; nnz = Σ_g m_g(m_g - 1). Saves z, gid, a, m, δ.
  Backward: d/dz_i = 4m_g(d_i - δ_g) (the mean's dependence drops out: Σ_{i∈g}(d_i - δ_g) = 0),
  two gathers per row (z_a, δ), no scatter. Bytes: forward reads z twice and writes/reads μ; backward
  reads z and μ and writes dz — about 3 N×K reads and 2 writes each way. Peak (fp32, forward +
  backward): μ, dz and one chunk, ≤ 3 N×K buffers (the autograd version it replaced: 4).
* ``pairs``: each pair as (min, max), sorted by key i·N + j; the first copy of each distinct
  off-diagonal pair gets w = 1, duplicates (either direction) and self-pairs 0 (O(P log P)).
  total = 2Σ_p w_p‖z_i - z_j‖² (G_ij and G_ji), nnz = 2Σw. Saves z, i, j, w (vectors of P),
  not the gathers. Backward: 4w_p(z_i - z_j) added to row i and subtracted from row j by
  index_add, chunk by chunk, into an (N, K) accumulator in the accumulation dtype. FLOPs 3PK
  forward, 4PK backward; bytes 2PK reads each way plus the (N, K) gradient. index_add is
  sequential on the CPU (bit-reproducible); on CUDA it uses float atomics (run-to-run
  differences of a few ulp) unless ``torch.use_deterministic_algorithms(True)`` selects
  PyTorch's deterministic path.

Triton's fp32 ``tl.dot`` precision: see :func:`set_dot_precision`.

``auto`` (see ``_prefer``): on CUDA the Triton kernels once they are verified on a GPU
(``triton_verified``; until then the reference — the CUDA C++ kernels have not run on a
GPU either: ``cuda_verified=False``); on the CPU the C++ kernels, which were measured faster
than the fp32 reference (naive PyTorch) at every shape class tried, forward + backward, 2
threads, torch.utils.benchmark medians on a shared, loaded 2-core machine (2026-11-22):

    shape (N, K)     dtype  VICReg naive → cpu       Barlow naive → cpu
    512 × 4096       fp32   2131 → 163 ms (13×)      1653 → 171 ms (9.7×)    N < K, Gram route
    2048 × 1024      fp32    379 → 225 ms (1.7×)      219 → 168 ms (1.3×)    K < N
    4096 × 256       fp32     80 → 38 ms  (2.1×)       59 → 28 ms  (2.1×)    K ≪ N
    256 × 256        fp32    9.3 → 4.6 ms (2.0×)      4.9 → 3.2 ms (1.5×)
    64 × 32          fp32    1.3 → 0.9 ms (1.4×)      1.4 → 0.85 ms (1.7×)
    1024 × 2048      bf16  88075 → 316 ms             39752 → 492 ms           (naive bf16 matmul on CPU is slow)

plus the harness runs in ``benchmarks/results/results.jsonl`` (run 20261122T160925Z-2e4568,
load ~2.5: the target case N=512, K=4096 fp32, VICReg 229 ms, 11.3× faster than naive and
6.9× faster than torch.compile of it, 63% of the measured matmul bound; Barlow 237 ms,
6.4× and 3.7×, 61%; K ≪ N (4096 × 256) 3.6× and 3.4×). Where the loss is a
small fraction of a step (tiny N, K) the difference is a fraction of a millisecond either way.
"""

import os
from typing import Optional

import torch

from .. import _autocast, _backend, _extension
from ._first_order import first_order_only

__all__ = ["set_dot_precision", "dot_precision"]

_DOT_PRECISIONS = ("tf32", "ieee")
_dot_precision = None  # None: follow torch.backends.cuda.matmul.allow_tf32 / SSLOPS_DOT_PRECISION


def set_dot_precision(precision):
    """Precision of the Triton kernels' fp32 ``tl.dot`` on the GPU: ``"tf32"``, ``"ieee"`` or ``None``.

    ``None`` (the default) follows ``SSLOPS_DOT_PRECISION`` when set, else PyTorch's own
    switch ``torch.backends.cuda.matmul.allow_tf32`` (False by default, so fp32 inputs get
    IEEE fp32 products, the same as naive PyTorch). ``"tf32"`` uses the tensor cores with
    10-bit mantissas (relative error ~1e-3 on the covariance products, several times faster);
    fp16/bf16 inputs always use the tensor cores at their own precision and fp64 is exact.
    The Triton interpreter (CPU) always computes in IEEE.
    """
    global _dot_precision
    if precision is not None and precision not in _DOT_PRECISIONS:
        raise ValueError(f"precision must be one of {_DOT_PRECISIONS} or None, got {precision!r}")
    _dot_precision = precision


def dot_precision():
    """The fp32 ``tl.dot`` precision the Triton kernels use now (``"tf32"`` or ``"ieee"``)."""
    if _dot_precision is not None:
        return _dot_precision
    env = os.environ.get("SSLOPS_DOT_PRECISION", "").strip().lower()
    if env in _DOT_PRECISIONS:
        return env
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Kernels:
    """The four primitive kernels of one backend, with the C++ ops' signatures."""

    def __init__(self, backend):
        self.backend = backend

    def _mod(self):
        if self.backend == "triton":
            from ..triton_kernels import covariance as tk

            return tk
        return None

    def vicreg_view_forward(self, z, other, eps, route, save):
        tk = self._mod()
        if tk is not None:
            return tk.vicreg_view_forward(z, other, eps, route, save, dot_precision())
        return torch.ops.sslops.vicreg_view_forward_cxx(z, other, eps, route, save)

    def vicreg_view_backward(self, z, other, mean, m2, prod, coef, eps, route):
        tk = self._mod()
        if tk is not None:
            return tk.vicreg_view_backward(z, other, mean, m2, prod, coef, eps, route, dot_precision())
        return torch.ops.sslops.vicreg_view_backward_cxx(z, other, mean, m2, prod, coef, eps, route)

    def barlow_twins_forward(self, z_a, z_b, lambd, eps, route, save):
        tk = self._mod()
        if tk is not None:
            return tk.barlow_twins_forward(z_a, z_b, lambd, eps, route, save, dot_precision())
        return torch.ops.sslops.barlow_twins_forward_cxx(z_a, z_b, lambd, eps, route, save)

    def barlow_twins_backward(self, grad, z_a, z_b, mean_a, rstd_a, mean_b, rstd_b, prod_a, prod_b, lambd, route):
        tk = self._mod()
        args = (grad, z_a, z_b, mean_a, rstd_a, mean_b, rstd_b, prod_a, prod_b, lambd, route)
        if tk is not None:
            return tk.barlow_twins_backward(*args, dot_precision())
        return torch.ops.sslops.barlow_twins_backward_cxx(*args)


def _kernels(backend):
    if backend not in ("cpu", "cuda", "triton"):
        raise ValueError(f"covariance ops: unknown backend {backend!r}")
    return _Kernels(backend)


def vicreg_route(n, k):
    """1 (K×K product) or 2 (N×N Gram), per view: the routes cost 2N²K and 2NK² flops per direction.

    The Gram route gets Σ_{j≠k} C_jk² as ‖ÂÂᵀ‖_F² - Σ_k C_kk², a difference. Since rank C < N,
    ‖C‖_F² ≥ (tr C)²/(N-1), so the off-diagonal part is at least a fraction 1 - (N-1)/K of the
    total (for equal variances): cancellation amplifies rounding by at most K/(K-N+1). Taking
    the Gram route only when 4N < 3K bounds that factor by 4, at a cost of at most 4/3 of the
    cheaper route in the band 3K/4 ≤ N < K. (Barlow's rule below gives the same bound.)
    """
    return 2 if 4 * n < 3 * k else 1


def barlow_route(n, k):
    """1 (K×K) or 2 (Gram). With the products saved by the forward, forward + backward cost
    4N²K + 4N²K (two Grams, then Gb·Â and Ga·B̂) against 2NK² + 4NK² (c, then B̂cᵀ and Âc)."""
    return 2 if 4 * n < 3 * k else 1


def _resolve(route, chooser, z):
    return route if route in (1, 2) else chooser(z.shape[0], z.shape[1])


def _prod_fake(z, route, save):
    n, k = z.shape
    d = (n if route == 2 else k) if save else 0
    return z.new_empty((d, d), dtype=_acc(z.dtype))


def _wants_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _stat_fakes(z):
    k = z.shape[1]
    acc = _acc(z.dtype)
    return z.new_empty((k,), dtype=acc), z.new_empty((k,), dtype=acc)


# ----------------------------------------------------------------------------- VICReg (two views)


@torch.library.custom_op("sslops::vicreg_fwd", mutates_args=())
@_autocast.disabled
def vicreg_fwd(z_a: torch.Tensor, z_b: torch.Tensor, sim_coeff: float, std_coeff: float, cov_coeff: float, eps: float,
               backend: str, route: int, save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                              torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean_a, m2_a, prod_a, mean_b, m2_b, prod_b); prod_* are the products saved for the backward.

    z_a's view call also returns Σ(z_a - z_b)² (terms[2]), taken in its column-mean pass; z_b's has no other (terms[2] = 0).
    """
    kern = _kernels(backend)
    n, k = z_a.shape
    route = _resolve(route, vicreg_route, z_a)
    z_b = z_b.contiguous()  # one copy at most, shared by both calls below
    terms_a, mean_a, m2_a, prod_a = kern.vicreg_view_forward(z_a, z_b, eps, route, save)
    terms_b, mean_b, m2_b, prod_b = kern.vicreg_view_forward(z_b, None, eps, route, save)
    terms = terms_a + terms_b
    loss = terms[2] * (sim_coeff / (n * k)) + terms[0] * (std_coeff / (2 * k)) + terms[1] * (cov_coeff / k)
    return loss, mean_a, m2_a, prod_a, mean_b, m2_b, prod_b


@vicreg_fwd.register_fake
def _(z_a, z_b, sim_coeff, std_coeff, cov_coeff, eps, backend, route, save):
    route = _resolve(route, vicreg_route, z_a)
    mean_a, m2_a = _stat_fakes(z_a)
    mean_b, m2_b = _stat_fakes(z_b)
    return (z_a.new_empty((), dtype=_acc(z_a.dtype)), mean_a, m2_a, _prod_fake(z_a, route, save), mean_b, m2_b,
            _prod_fake(z_b, route, save))


@torch.library.custom_op("sslops::vicreg_bwd", mutates_args=())
@_autocast.disabled
def vicreg_bwd(grad: torch.Tensor, z_a: torch.Tensor, z_b: torch.Tensor, mean_a: torch.Tensor, m2_a: torch.Tensor,
               prod_a: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor, prod_b: torch.Tensor, sim_coeff: float,
               std_coeff: float, cov_coeff: float, eps: float, backend: str, route: int) -> tuple[torch.Tensor, torch.Tensor]:
    kern = _kernels(backend)
    n, k = z_a.shape
    route = _resolve(route, vicreg_route, z_a)
    # the coefficients from the device-side grad times Python floats: a torch.tensor([...],
    # device=...) here would be a host-to-device copy and a stream sync on every backward
    g = grad.to(mean_a.dtype)
    coef = torch.stack([g * (std_coeff / (2 * k)), g * (cov_coeff / k), g * (2 * sim_coeff / (n * k))])
    dz_a = kern.vicreg_view_backward(z_a, z_b, mean_a, m2_a, prod_a, coef, eps, route)
    dz_b = kern.vicreg_view_backward(z_b, z_a, mean_b, m2_b, prod_b, coef, eps, route)
    return dz_a, dz_b


@vicreg_bwd.register_fake
def _(grad, z_a, z_b, mean_a, m2_a, prod_a, mean_b, m2_b, prod_b, sim_coeff, std_coeff, cov_coeff, eps, backend, route):
    return torch.empty_like(z_a, memory_format=torch.contiguous_format), torch.empty_like(z_b, memory_format=torch.contiguous_format)


def _vicreg_setup(ctx, inputs, output):
    z_a, z_b, sim_coeff, std_coeff, cov_coeff, eps, backend, route, save = inputs
    _, mean_a, m2_a, prod_a, mean_b, m2_b, prod_b = output
    ctx.save_for_backward(z_a, z_b, mean_a, m2_a, prod_a, mean_b, m2_b, prod_b)
    ctx.params = (sim_coeff, std_coeff, cov_coeff, eps, backend, route)
    ctx.set_materialize_grads(False)  # no zero K×K gradients for the saved outputs (they are never used)


def _vicreg_backward(ctx, grad, *_unused):
    first_order_only("vicreg_loss")
    if grad is None:
        return (None,) * 9
    z_a, z_b, mean_a, m2_a, prod_a, mean_b, m2_b, prod_b = ctx.saved_tensors
    dz_a, dz_b = vicreg_bwd(grad, z_a, z_b, mean_a, m2_a, prod_a, mean_b, m2_b, prod_b, *ctx.params)
    return dz_a, dz_b, None, None, None, None, None, None, None


vicreg_fwd.register_autograd(_vicreg_backward, setup_context=_vicreg_setup)


# ----------------------------------------------------------------------------- VICReg var/cov on one matrix


@torch.library.custom_op("sslops::vicreg_varcov_fwd", mutates_args=())
@_autocast.disabled
def vicreg_varcov_fwd(z: torch.Tensor, eps: float, backend: str, route: int,
                      save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """terms = [Σ_k relu(1 - sqrt(Cov_kk + eps)), Σ_{j≠k} Cov_jk², 0] (3,), mean (K,), m2 (K,), saved product.

    The view kernel without ``other``: its third term (the invariance sum) is 0 here.
    """
    return tuple(_kernels(backend).vicreg_view_forward(z, None, eps, _resolve(route, vicreg_route, z), save))


@vicreg_varcov_fwd.register_fake
def _(z, eps, backend, route, save):
    mean, m2 = _stat_fakes(z)
    return z.new_empty((3,), dtype=_acc(z.dtype)), mean, m2, _prod_fake(z, _resolve(route, vicreg_route, z), save)


@torch.library.custom_op("sslops::vicreg_varcov_bwd", mutates_args=())
@_autocast.disabled
def vicreg_varcov_bwd(grad_terms: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, prod: torch.Tensor,
                      eps: float, backend: str, route: int) -> torch.Tensor:
    # terms[2] is identically 0 without other: coef[2] = 0 (the kernels ignore it then anyway)
    coef = torch.cat([grad_terms[:2].to(mean.dtype), grad_terms.new_zeros((1,), dtype=mean.dtype)])
    return _kernels(backend).vicreg_view_backward(z, None, mean, m2, prod, coef, eps, _resolve(route, vicreg_route, z))


@vicreg_varcov_bwd.register_fake
def _(grad_terms, z, mean, m2, prod, eps, backend, route):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _varcov_setup(ctx, inputs, output):
    z, eps, backend, route, save = inputs
    _, mean, m2, prod = output
    ctx.save_for_backward(z, mean, m2, prod)
    ctx.params = (eps, backend, route)
    ctx.set_materialize_grads(False)  # no zero K×K gradients for the saved outputs (they are never used)


def _varcov_backward(ctx, grad_terms, *_unused):
    first_order_only("vicreg_relation_loss")
    z, mean, m2, prod = ctx.saved_tensors
    if grad_terms is None:
        return None, None, None, None, None
    return vicreg_varcov_bwd(grad_terms, z, mean, m2, prod, *ctx.params), None, None, None, None


vicreg_varcov_fwd.register_autograd(_varcov_backward, setup_context=_varcov_setup)


# ----------------------------------------------------------------------------- relation-form invariance

# Bytes of one chunk's (rows, K) temporary (a gather of rows or pairs) in the invariance
# ops: no (N, K) or (P, K) gather exists at once beyond the saved group means. Tests shrink
# it to run several chunks.
_RELATION_CHUNK_BYTES = 1 << 26


def _chunk_rows(k, dtype):
    return max(1, _RELATION_CHUNK_BYTES // (max(k, 1) * dtype.itemsize))


def _label_groups(labels, n, acc, device):
    """(gid, anchor, count, m): gid = first sorted position of each row's label (a group id in
    [0, N)), anchor = the row at that position (one sample of the group), count[g] = size of
    group g (indexed by gid), m = count[gid], the group size per row."""
    lab = labels.long()
    ordered = torch.sort(lab, stable=True)
    gid = torch.searchsorted(ordered.values, lab)
    count = torch.zeros(n, dtype=acc, device=device).index_add_(0, gid, torch.ones(n, dtype=acc, device=device))
    return gid, ordered.indices[gid], count, count[gid]


def _from_anchor(z, anchor, s, step, acc):
    """Rows [s, s + step) of z minus their groups' samples z_anchor, in acc: one (rows, K) buffer."""
    d = z.index_select(0, anchor[s:s + step]).to(acc)
    return d.neg_().add_(z[s:s + step])


def _canonical_pairs(pairs, n, acc):
    """(i, j, w) of P entries: each pair as (min, max), sorted by key i·N + j; w = 1 on the first
    copy of each distinct off-diagonal pair, 0 on duplicates and self-pairs."""
    rows = pairs[0].long()
    cols = pairs[1].long()
    key = torch.sort(torch.minimum(rows, cols) * n + torch.maximum(rows, cols)).values
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    i = torch.div(key, n, rounding_mode="floor") if n > 0 else key
    j = key - i * n
    return i, j, (first & (i != j)).to(acc)


@torch.library.custom_op("sslops::relation_invariance_fwd", mutates_args=())
@_autocast.disabled
def relation_invariance_fwd(z: torch.Tensor, labels: Optional[torch.Tensor], pairs: Optional[torch.Tensor]
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, nnz, rows, cols, weight, mean): total = Σ_ij G_ij‖z_i - z_j‖², nnz = nnz(G), plus what the backward reads.

    labels: rows = gid (N,), cols = anchor (N,), weight = m (N,), mean = (N, K) group means of
    z - z_anchor at row gid.
    pairs: rows = i (P,), cols = j (P,), weight = w (P,), mean = empty (0, K).
    """
    n, k = z.shape
    acc = _acc(z.dtype)
    step = _chunk_rows(k, acc)
    total = torch.zeros((), dtype=acc, device=z.device)
    if labels is not None:
        gid, anchor, count, m = _label_groups(labels, n, acc, z.device)
        mean = torch.zeros((n, k), dtype=acc, device=z.device)
        for s in range(0, n, step):
            mean.index_add_(0, gid[s:s + step], _from_anchor(z, anchor, s, step, acc))
        mean.div_(count.clamp(min=1)[:, None])
        for s in range(0, n, step):
            d = _from_anchor(z, anchor, s, step, acc)
            d.sub_(mean.index_select(0, gid[s:s + step]))
            total += torch.dot(d.square_().sum(dim=1), m[s:s + step])
        return total * 2.0, (m - 1.0).sum(), gid, anchor, m, mean
    i, j, w = _canonical_pairs(pairs, n, acc)
    for s in range(0, i.shape[0], step):
        d = z.index_select(0, i[s:s + step]).to(acc)
        d.sub_(z.index_select(0, j[s:s + step]))
        total += torch.dot(d.square_().sum(dim=1), w[s:s + step])
    # each distinct pair stands for G_ij and G_ji
    return total * 2.0, w.sum() * 2.0, i, j, w, z.new_empty((0, k), dtype=acc)


@relation_invariance_fwd.register_fake
def _(z, labels, pairs):
    n, k = z.shape
    acc = _acc(z.dtype)
    scalar = z.new_empty((), dtype=acc)
    if labels is not None:
        gid = z.new_empty((n,), dtype=torch.int64)
        return scalar, scalar.clone(), gid, gid.clone(), z.new_empty((n,), dtype=acc), z.new_empty((n, k), dtype=acc)
    p = pairs.shape[1]
    idx = z.new_empty((p,), dtype=torch.int64)
    return scalar, scalar.clone(), idx, idx.clone(), z.new_empty((p,), dtype=acc), z.new_empty((0, k), dtype=acc)


@torch.library.custom_op("sslops::relation_invariance_bwd", mutates_args=())
@_autocast.disabled
def relation_invariance_bwd(grad: torch.Tensor, z: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, weight: torch.Tensor,
                            mean: torch.Tensor, by_labels: bool) -> torch.Tensor:
    """d total / d z · grad, in z's dtype (see the forward for rows, cols, weight, mean)."""
    n, k = z.shape
    acc = weight.dtype
    step = _chunk_rows(k, acc)
    g = grad.to(acc)
    if by_labels:
        # d/dz_i 2m Σ_{i∈g}‖d_i - δ_g‖² = 4m(d_i - δ_g), d_i = z_i - z_a: the δ terms sum to 0
        # over the group (cols holds the anchors a)
        dz = torch.empty((n, k), dtype=z.dtype, device=z.device)
        scale = weight * (4.0 * g)
        for s in range(0, n, step):
            # δ gathered straight into dz's rows when dz is in the accumulation dtype (one (rows, K)
            # temporary, the anchors' gather, as before the anchors existed)
            d = dz[s:s + step] if dz.dtype == acc else torch.empty((min(step, n - s), k), dtype=acc, device=z.device)
            torch.index_select(mean, 0, rows[s:s + step], out=d)
            d.neg_().add_(_from_anchor(z, cols, s, step, acc)).mul_(scale[s:s + step, None])  # (z_i - z_a) - δ_g
            if d.data_ptr() != dz[s:s + step].data_ptr():
                dz[s:s + step].copy_(d)
        return dz
    # d/dz_i 2w‖z_i - z_j‖² = 4w(z_i - z_j), the negative for z_j; scattered by index_add
    # (sequential on the CPU; on CUDA float atomics unless torch.use_deterministic_algorithms)
    out = torch.zeros((n, k), dtype=acc, device=z.device)
    scale = weight * (4.0 * g)
    for s in range(0, rows.shape[0], step):
        r, c = rows[s:s + step], cols[s:s + step]
        d = z.index_select(0, r).to(acc)
        d.sub_(z.index_select(0, c)).mul_(scale[s:s + step, None])
        out.index_add_(0, r, d)
        out.index_add_(0, c, d, alpha=-1)
    return out if out.dtype == z.dtype else out.to(z.dtype)


@relation_invariance_bwd.register_fake
def _(grad, z, rows, cols, weight, mean, by_labels):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _relation_setup(ctx, inputs, output):
    z, labels, pairs = inputs
    _, nnz, rows, cols, weight, mean = output
    ctx.mark_non_differentiable(nnz, weight, mean)
    ctx.set_materialize_grads(False)  # else autograd hands the backward a zero (N, K) grad for mean
    ctx.save_for_backward(z, rows, cols, weight, mean)
    ctx.by_labels = labels is not None


def _relation_backward(ctx, grad, *_unused):
    first_order_only("vicreg_relation_loss")
    z, rows, cols, weight, mean = ctx.saved_tensors
    if grad is None:
        return None, None, None
    return relation_invariance_bwd(grad, z, rows, cols, weight, mean, ctx.by_labels), None, None


relation_invariance_fwd.register_autograd(_relation_backward, setup_context=_relation_setup)


def _relation_invariance(z, labels, pairs):
    """(Σ_ij G_ij ‖z_i - z_j‖², nnz(G)) in fp32 (fp64 for fp64), O(nnz·K), differentiable, no host sync."""
    return tuple(relation_invariance_fwd(z, labels, pairs)[:2])


# ----------------------------------------------------------------------------- Barlow Twins


@torch.library.custom_op("sslops::barlow_twins_fwd", mutates_args=())
@_autocast.disabled
def barlow_twins_fwd(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float, eps: float, backend: str, route: int,
                     save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]:
    """(loss, mean_a, rstd_a, mean_b, rstd_b, prod_a, prod_b): Gram route (ÂÂᵀ, B̂B̂ᵀ), K×K route (ÂᵀB̂, empty)."""
    return tuple(_kernels(backend).barlow_twins_forward(z_a, z_b, lambd, eps, _resolve(route, barlow_route, z_a), save))


@barlow_twins_fwd.register_fake
def _(z_a, z_b, lambd, eps, backend, route, save):
    route = _resolve(route, barlow_route, z_a)
    mean_a, rstd_a = _stat_fakes(z_a)
    mean_b, rstd_b = _stat_fakes(z_b)
    prod_b = _prod_fake(z_b, route, save and route == 2)
    return z_a.new_empty((), dtype=_acc(z_a.dtype)), mean_a, rstd_a, mean_b, rstd_b, _prod_fake(z_a, route, save), prod_b


@torch.library.custom_op("sslops::barlow_twins_bwd", mutates_args=())
@_autocast.disabled
def barlow_twins_bwd(grad: torch.Tensor, z_a: torch.Tensor, z_b: torch.Tensor, mean_a: torch.Tensor, rstd_a: torch.Tensor,
                     mean_b: torch.Tensor, rstd_b: torch.Tensor, prod_a: torch.Tensor, prod_b: torch.Tensor, lambd: float,
                     backend: str, route: int) -> tuple[torch.Tensor, torch.Tensor]:
    route = _resolve(route, barlow_route, z_a)
    return tuple(_kernels(backend).barlow_twins_backward(grad, z_a, z_b, mean_a, rstd_a, mean_b, rstd_b, prod_a, prod_b, lambd,
                                                         route))


@barlow_twins_bwd.register_fake
def _(grad, z_a, z_b, mean_a, rstd_a, mean_b, rstd_b, prod_a, prod_b, lambd, backend, route):
    return torch.empty_like(z_a, memory_format=torch.contiguous_format), torch.empty_like(z_b, memory_format=torch.contiguous_format)


def _barlow_setup(ctx, inputs, output):
    z_a, z_b, lambd, eps, backend, route, save = inputs
    _, mean_a, rstd_a, mean_b, rstd_b, prod_a, prod_b = output
    ctx.save_for_backward(z_a, z_b, mean_a, rstd_a, mean_b, rstd_b, prod_a, prod_b)
    ctx.params = (lambd, backend, route)
    ctx.set_materialize_grads(False)  # no zero K×K gradients for the saved outputs (they are never used)


def _barlow_backward(ctx, grad, *_unused):
    first_order_only("barlow_twins_loss")
    if grad is None:
        return (None,) * 7
    z_a, z_b, mean_a, rstd_a, mean_b, rstd_b, prod_a, prod_b = ctx.saved_tensors
    dz_a, dz_b = barlow_twins_bwd(grad, z_a, z_b, mean_a, rstd_a, mean_b, rstd_b, prod_a, prod_b, *ctx.params)
    return dz_a, dz_b, None, None, None, None, None


barlow_twins_fwd.register_autograd(_barlow_backward, setup_context=_barlow_setup)


# ----------------------------------------------------------------------------- backend entry points


def _vicreg(backend, route=0):
    def run(z_a, z_b, *, sim_coeff, std_coeff, cov_coeff, eps):
        return vicreg_fwd(z_a, z_b, sim_coeff, std_coeff, cov_coeff, eps, backend, route, _wants_grad(z_a, z_b))[0]

    return run


def _vicreg_relation(backend, route=0):
    def run(z, labels, pairs, *, alpha, beta, gamma, eps):
        k = z.shape[1]
        terms = vicreg_varcov_fwd(z, eps, backend, route, _wants_grad(z))[0]
        total, nnz = _relation_invariance(z, labels, pairs)
        inv = total / (nnz.clamp(min=1) * k)
        return terms[0] * (alpha / k) + terms[1] * (beta / k) + gamma * inv

    return run


def _barlow(backend, route=0):
    def run(z_a, z_b, *, lambd, eps):
        return barlow_twins_fwd(z_a, z_b, lambd, eps, backend, route, _wants_grad(z_a, z_b))[0]

    return run


def _prefer(device, shapes):
    # CPU: the C++ kernels beat the fp32 reference at every benchmarked shape (see module
    # docstring). CUDA: Triton first; _backend drops it (and the CUDA C++ kernels) from auto
    # until a GPU session verifies them (triton_verified / cuda_verified).
    if device.type == "cuda":
        return ["triton"]
    if device.type == "cpu":
        return ["cpu"]
    return []


def _impls(make):
    impls = {"triton": make("triton"), "cuda": make("cuda")}
    if _extension.LOADED:
        impls["cpu"] = make("cpu")
    return impls


_backend.register_kernels("vicreg", _impls(_vicreg), cuda_verified=False, prefer=_prefer)
_backend.register_kernels("vicreg_relation", _impls(_vicreg_relation), cuda_verified=False, prefer=_prefer)
_backend.register_kernels("barlow_twins", _impls(_barlow), cuda_verified=False, prefer=_prefer)
