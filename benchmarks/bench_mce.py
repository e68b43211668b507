"""Matrix-SSL benchmarks: ``matrix_ssl_loss`` with order-4 Taylor logs, against every alternative.

Roles as in the paper's released training code: p (first input) is the target branch, a
teacher's output, detached; z (second input) is the online branch. The ``matrix_ssl`` cases
therefore differentiate z only, as training does; ``matrix_ssl_grad_both`` differentiates both
inputs (the harder case for the kernels: two more K×K products and twice the row GEMMs).

Providers per case (forward + backward, fp32):

* ``sslops-<backend>``: the fused kernels (traces of powers only, power-sum backward),
  with the default convergence guard ``check="raise"`` (its host sync included);
* ``naive``: ``sslops.reference.matrix_ssl_loss``, a careful PyTorch implementation
  (column means instead of an N×N centring matrix, tr(P·log Q) by an elementwise product),
  autograd through the series;
* ``compile``: ``torch.compile`` of that;
* ``released``: ``sslops.reference.released_matrix_ssl_loss``, the operations of the
  paper's released training code (github.com/yifanzhang-pro/Matrix-SSL, ``main_pretrain.py``:
  ``mce_loss_func`` once with ``correlation=True`` and once, times γ, with
  ``correlation=False``; each call normalises the rows, builds its own N×N centring matrix
  and multiplies through it, runs ``order`` Taylor products and takes the trace of a full
  K×K product), autograd;
* ``eigh``: ``matrix_ssl_loss(method="exact")``, the exact alternative: -λ·log det by LU and
  the alignment log by ``eigh`` (no series; autograd). Its ``rel_diff_vs_naive`` column is
  the order-4 series' relative error against the exact log on these inputs.

Sizes: a quick CPU set (the CPU target N=1024, K=512 fp32, online branch only and both
inputs, the target being ≥3.5× faster than ``released`` with the C++ backend on 2 threads
on a quiet machine, at or above the FLOP ratio there: 3.65× with z alone, 3.53× with both,
see ``matrix_ssl_flops``; and K = 128, 256, 512 at N = 1024 for the "vs K" plot); ``--full``
(default on CUDA): K from 256 to 8192 at N = 4096 and N from 512 to 16384 at K = 1024, plus
the GPU target N=4096, K=2048 (≥3× released, ≥1.5× naive, ≥20× eigh).

Matrix cross-entropy MCE(P, Q) = tr(-P log Q + Q) of two K×K matrices (case ``mce``,
order 4, fp32, forward + backward in P and Q): ``sslops-<backend>`` the fused kernels (the
traced chain P·X^j, closed-form gradient; default guard); ``naive`` log Q by explicit
powers, then the full product P·log Q and its trace, autograd
(``sslops.reference.matrix_cross_entropy``); ``chain`` the library's PyTorch-op route
(``backend="reference"``: the chain, traced elementwise, autograd through it). CPU: K = 512
(quick), K in {256, 512, 1024} with ``--full``; CUDA adds K = 2048, 4096.
"""

import math

import torch

import sslops
from sslops import reference

from .common import Case, randn_inputs

LOSSES = ["matrix_ssl", "matrix_ssl_grad_both", "matrix_cross_entropy"]
ORDER = 4
ONLINE = (1,)  # grad_inputs of the training case: z only (p is the detached teacher output)


def _ps_steps(degree, h):
    """K×K products of a degree-``degree`` polynomial by Paterson–Stockmeyer in X^h, powers given
    (Horner steps; a lone top coefficient needs none)."""
    return degree // h - (1 if degree % h == 0 and degree >= h else 0)


def _covariance_flops(n, k):
    """The forward's covariance GEMMs on the CPU: per column panel [c0, c1) of the K features,
    P and Xa from column c0 on and Xu whole (``column_blocks`` in csrc/cpu/matrix_info.cpp:
    128-wide panels from K = 256, halves from K = 128, else one panel)."""
    width = 128 if k >= 256 else ((k + 1) // 2 if k >= 128 else k)
    return sum(2.0 * n * min(width, k - c0) * (2 * (k - c0) + k) for c0 in range(0, k, width))


def matrix_ssl_flops(n, k, order=ORDER, need_p=True):
    """Forward + backward FLOPs of the route sslops takes on the CPU (N×K×K and K×K products only).

    Forward: the covariance GEMMs on the centred rows, on and above the block diagonal of the
    symmetric Sp and Sz only (4.5NK² at K = 512, see ``_covariance_flops``), then K×K
    products (h = ⌈n/2⌉): the h-1 powers of the uniformity matrix and the traced chain
    P·Xa^j, which from order 3 stops at j = n-2 and adds the symmetric Xa² in its place.
    Backward: two N×K×K GEMMs per input that needs a gradient, and K×K products: the
    Paterson–Stockmeyer Horner steps of q(Xu) always, the powers of Xa beyond Xa² and the
    (symmetric) steps of f(Xa) for p, the Horner steps of R for z. A symmetric product
    (from K = 128) computes 3/4 of a full one; order 4 counts 3.75 products forward and
    2 (z alone) or 2.75 (both) backward.
    """
    h = (order + 1) // 2
    sym = 0.75 if k >= 128 else 1.0
    short_chain = order >= 3
    fwd_products = (h - 1) + (order - 2 + sym if short_chain else order - 1)
    bwd_products = _ps_steps(order - 1, h) + (order - 1) // 2
    if need_p:
        bwd_products += sym * ((h - 1) - (1 if short_chain and h >= 2 else 0) + _ps_steps(order, h))
    bwd_gemm = 4.0 * (2 if need_p else 1)
    return _covariance_flops(n, k) + bwd_gemm * n * k * k + 2.0 * k**3 * (fwd_products + bwd_products)


def mce_case(n, k, dtype=torch.float32, *, compile=True, note="", both=False):
    """Matrix-SSL at (N, K); z alone requires grad (training), or both inputs with ``both``."""
    return Case(
        loss="matrix_ssl",
        name="matrix_ssl_grad_both" if both else "matrix_ssl",
        shape={"N": n, "K": k},
        dtype=dtype,
        make_inputs=randn_inputs((n, k), (n, k), dtype=dtype),
        sslops_fn=lambda p, z, backend: sslops.matrix_ssl_loss(p, z, order=ORDER, backend=backend),
        naive_fn=lambda p, z: reference.matrix_ssl_loss(p, z, order=ORDER),
        extra={
            "released": lambda p, z: reference.released_matrix_ssl_loss(p, z, order=ORDER),
            "eigh": lambda p, z: sslops.matrix_ssl_loss(p, z, method="exact"),
        },
        flops=matrix_ssl_flops(n, k, need_p=both),
        compile=compile,
        note=note,
        grad_inputs=None if both else ONLINE,
    )


def lowrank_inputs(n, k, rank, dtype, seed=0, noise=0.1):
    """p, z sharing a rank-``rank`` signal plus noise: Q - I has eigenvalues near 1/rank, so
    the order-4 series is visibly off from the exact log (the ``eigh`` row's rel. diff)."""

    def make(device):
        g = torch.Generator(device="cpu").manual_seed(seed)
        base = torch.randn(n, rank, generator=g) @ torch.randn(rank, k, generator=g)
        p = base + noise * torch.randn(n, k, generator=g)
        z = base + noise * torch.randn(n, k, generator=g)
        return p.to(device=device, dtype=dtype), z.to(device=device, dtype=dtype)

    return make


def lowrank_case(n, k, rank, dtype=torch.float32, *, compile=False):
    case = mce_case(n, k, dtype, compile=compile, note=f"p, z = shared rank-{rank} signal + 0.1 noise (series error visible)")
    case.make_inputs = lowrank_inputs(n, k, rank, dtype)
    case.name = f"matrix_ssl_rank{rank}"
    return case


def mce_pq_flops(k, order=ORDER):
    """Forward + backward FLOPs of the fused MCE route: n-1 products forward; backward
    h-1 powers + the Paterson–Stockmeyer Horner steps for P, n-1 Horner steps for Q."""
    h = (order + 1) // 2
    products = (order - 1) + (h - 1) + _ps_steps(order, h) + (order - 1)
    return 2.0 * k**3 * products


def mce_pq_inputs(k, dtype, seed=0):
    """P: normal / √K; Q = I + X, X normal scaled to ‖X‖_F = 0.9 (non-symmetric). As for
    Matrix-SSL's matrices at μ = 1, the guard's certified bound (‖X‖_F < 1) settles
    convergence without power iterations, so the rows time the kernels (the GEMMs do
    not depend on the values)."""

    def make(device):
        g = torch.Generator(device="cpu").manual_seed(seed)
        p = torch.randn(k, k, generator=g) / math.sqrt(k)
        x = torch.randn(k, k, generator=g)
        q = torch.eye(k) + 0.9 * x / torch.linalg.vector_norm(x)
        return p.to(device=device, dtype=dtype), q.to(device=device, dtype=dtype)

    return make


def mce_pq_case(k, dtype=torch.float32, *, compile=False, note=""):
    return Case(
        loss="matrix_cross_entropy",
        name="mce",
        shape={"N": k, "K": k},  # P and Q are K×K: N (rows) = K
        dtype=dtype,
        make_inputs=mce_pq_inputs(k, dtype),
        sslops_fn=lambda p, q, backend: sslops.matrix_cross_entropy(p, q, order=ORDER, backend=backend),
        naive_fn=lambda p, q: reference.matrix_cross_entropy(p, q, order=ORDER),
        extra={"chain": lambda p, q: sslops.matrix_cross_entropy(p, q, order=ORDER, backend="reference")},
        flops=mce_pq_flops(k),
        compile=compile,
        note=note,
    )


def cases(device, full):
    on_cpu = torch.device(device).type == "cpu"
    if not full:
        return [
            # compile costs ~30 s per case on this CPU: only at the target size there
            mce_case(1024, 128, compile=not on_cpu),
            mce_case(1024, 256, compile=not on_cpu),
            mce_case(1024, 512, note="CPU target case (z alone requires grad, as in training)"),
            mce_case(1024, 512, compile=not on_cpu, both=True, note="CPU target case, both inputs require grad"),
            lowrank_case(512, 256, 4),
            mce_pq_case(512),
        ]
    out = [mce_case(4096, k) for k in (256, 512, 1024, 4096, 8192)]
    out.append(mce_case(4096, 2048, note="GPU target case"))
    out += [mce_case(n, 1024) for n in (512, 1024, 2048, 8192, 16384)]
    out.append(mce_case(1024, 512, note="CPU target size"))
    out.append(mce_case(1024, 512, both=True, note="CPU target size, both inputs require grad"))
    out += [lowrank_case(4096, 2048, r) for r in (2, 4, 16)]
    out += [mce_pq_case(k, compile=not on_cpu) for k in (256, 512, 1024)]
    if not on_cpu:
        out.append(mce_case(4096, 2048, both=True, note="GPU target size, both inputs require grad"))
        out += [mce_pq_case(k, compile=True) for k in (2048, 4096)]
    return out
