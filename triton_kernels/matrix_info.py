r"""Triton kernels of Matrix-SSL: row normalisation, K×K products with a fused trace epilogue.

Same decomposition as the C++ kernels (``csrc/cpu/matrix_info_impl.h``), c_k = (-1)^{k+1}/k:

    pc, zc = rows / max(‖row‖, 1e-12), minus column means        (_normalize_rows_kernel)
    C = pcᵀzc/N, Sp = pcᵀpc/N, Sz = zcᵀzc/N                       (cuBLAS: two GEMMs on [pc | zc])
    Xu = C + (μ-1)I, P = Sp + μI, Xa = Sz + (μ-1)I
    U = -λ Σ_k c_k tr(Xu^k),  tr(Xu^k) = tr(Xu^a Xu^b), a + b = k  (Xu^2 by _mm_trace_kernel, its
                                                                   epilogue tracing Xu^2·Xu = tr Xu^3)
    A = -Σ_k c_k tr(P Xa^k):  A_j = A_{j-1} Xa by _mm_trace_kernel, whose epilogue reduces
                              Σ_ij (A_j)_ij (Xa)_ji = tr(P Xa^{j+1}) while the tile is in registers
    loss = U + γA

Gradient (no autograd through the chain; see the C++ header for the derivation):
dU/dXu = -λ q(Xu)ᵀ with q(X) = Σ_{j<n} (-1)^j X^j, dA/dP = -f(Xa), dA/dXa = -(R + Rᵀ) with
R = Σ_j Xa^j D_j (Horner), then [dpc | dzc] = [pc | zc]·M/N (one cuBLAS GEMM) and the row-wise
normalisation backward (_normalize_backward_kernel); [dpc | dzc] by four cuBLAS GEMMs, no
2K×2K block matrix.

On a GPU the K×K products default to cuBLAS with the trace as a separate Triton reduction
(``set_gpu_mm("triton")`` selects the fused kernel; see ``_GPU_MM``).

Saved: Xu, P, Xa and the forward's products (Xu^2..Xu^h, A_1..A_{n-1}), K×K each; rows are
recomputed. Per call, order 4: forward 6NK² + 8K³ flops (+2K² per fused trace), backward
8NK² + 8K³; bytes ~ 4NK·(dtype + 2·4) + 12·4K² (fp32 accumulators).

Matrix cross-entropy MCE(P, Q) = tr(-P log Q + Q), P and Q general K×K, X = Q - I
(``mce_forward``/``mce_backward``, same math as ``mce_forward``/``mce_backward`` in the C++
header): L = -Σ_k c_k tr(P X^k) + tr Q with tr(P X^k) = Σ_ij (A_{k-1})_ij X_ji along the
chain A_j = A_{j-1} X (_mm_trace_kernel traces each product in its epilogue; tr(P X) by
_trace_dot_kernel). Gradient dL/dP = -f(X)ᵀ, f = Σ_k c_k X^k (Paterson–Stockmeyer, ``_poly``),
dL/dQ = -Gᵀ + I, G = Σ_m X^m D_m, D_m = Σ_j c_{m+j+1} A_j (Horner in X). Saved: X and
A_1..A_{n-1}. Order 4: 3 K×K products forward, 2 (P) + 3 (Q) backward.

Launchers allocate outputs, pick block sizes, launch; no autograd, no host syncs (the
per-tile trace partials are summed on the device in a fixed order: deterministic).
"""

import torch
import triton
import triton.language as tl

_NORM_EPS = 1e-12


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _precision(dtype):
    if dtype != torch.float32:
        return "ieee"
    if torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@triton.jit
def _normalize_rows_kernel(x_ptr, w_ptr, K, stride_xn, stride_xk, ld_w, col0, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xn
    w_row = w_ptr + row * ld_w + col0
    ss = tl.zeros([BLOCK_K], dtype=w_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_row + cols * stride_xk, mask=cols < K, other=0.0).to(w_ptr.dtype.element_ty)
        ss += v * v
    nrm = tl.sqrt(tl.sum(ss, axis=0))
    inv = 1.0 / tl.maximum(nrm, 1e-12)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_row + cols * stride_xk, mask=cols < K, other=0.0).to(w_ptr.dtype.element_ty)
        tl.store(w_row + cols, v * inv, mask=cols < K)


@triton.jit
def _normalize_backward_kernel(x_ptr, g_ptr, dx_ptr, K, stride_xn, stride_xk, ld_g, col0, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xn
    g_row = g_ptr + row * ld_g + col0
    d_row = dx_ptr + row * K
    ss = tl.zeros([BLOCK_K], dtype=g_ptr.dtype.element_ty)
    dot = tl.zeros([BLOCK_K], dtype=g_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        m = cols < K
        v = tl.load(x_row + cols * stride_xk, mask=m, other=0.0).to(g_ptr.dtype.element_ty)
        g = tl.load(g_row + cols, mask=m, other=0.0)
        ss += v * v
        dot += v * g
    nrm = tl.sqrt(tl.sum(ss, axis=0))
    big = nrm > 1e-12
    inv = tl.where(big, 1.0 / tl.maximum(nrm, 1e-12), 1e12)
    proj = tl.where(big, tl.sum(dot, axis=0) * inv * inv, 0.0)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        m = cols < K
        v = tl.load(x_row + cols * stride_xk, mask=m, other=0.0).to(g_ptr.dtype.element_ty)
        g = tl.load(g_row + cols, mask=m, other=0.0)
        tl.store(d_row + cols, ((g - v * proj) * inv).to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _mm_trace_kernel(a_ptr, b_ptr, c_ptr, r_ptr, part_ptr, K, HAS_R: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C = A·B for K×K row-major matrices; with HAS_R, part[tile] = Σ_tile C_ij R_ji."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=c_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < K) & (ks[None, :] < K), other=0.0)
        b = tl.load(b_ptr + ks[:, None] * K + cols[None, :], mask=(ks[:, None] < K) & (cols[None, :] < K), other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
    mask = (rows[:, None] < K) & (cols[None, :] < K)
    tl.store(c_ptr + rows[:, None] * K + cols[None, :], acc, mask=mask)
    if HAS_R:
        rt = tl.load(r_ptr + cols[None, :] * K + rows[:, None], mask=mask, other=0.0)
        part = tl.sum(tl.sum(acc * rt, axis=1), axis=0)
        tl.store(part_ptr + pid_m * tl.num_programs(1) + pid_n, part)


@triton.jit
def _trace_dot_kernel(a_ptr, b_ptr, part_ptr, K, BLOCK: tl.constexpr):
    """part[tile] = Σ_tile A_ij B_ji."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = (pid_n * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = (rows[:, None] < K) & (cols[None, :] < K)
    a = tl.load(a_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0)
    bt = tl.load(b_ptr + cols[None, :] * K + rows[:, None], mask=mask, other=0.0)
    tl.store(part_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(a * bt, axis=1), axis=0))


def _blocks(k, dtype, precision):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of _mm_trace_kernel.

    Spill-free on sm_90 (ptxas of triton 3.6): 128×128×32 tiles with 8 warps on the tensor-core
    path (TF32, bf16/fp16: 4 warps spilled 232 B/thread); IEEE fp32 runs on CUDA cores, where
    128×128 spills at 4 warps (592 B) and worse at 8 (3680 B), so it takes 64×64×32 tiles, 4 warps."""
    if torch.cuda.is_available() and dtype != torch.float64 and k >= 128:
        if dtype == torch.float32 and precision == "ieee":
            return 64, 64, 32, 4
        return 128, 128, 32, 8
    return 32, 32, 16, 4


# Which GEMM the K×K products use on a GPU: "cublas" (torch.mm, then the trace by
# _trace_dot_kernel: an extra 2K² read per product) or "triton" (_mm_trace_kernel, the
# trace fused into the product's epilogue). cuBLAS is the default until the fused kernel
# is autotuned and measured on a GPU; the interpreter lane always runs the fused kernel.
_GPU_MM = "cublas"


def set_gpu_mm(impl):
    """Choose the K×K product on CUDA tensors: ``"cublas"`` (default) or ``"triton"`` (fused trace)."""
    global _GPU_MM
    if impl not in ("cublas", "triton"):
        raise ValueError(f"impl must be 'cublas' or 'triton', got {impl!r}")
    _GPU_MM = impl


def mm_trace(a, b, r=None, out=None):
    """(A·B, tr(A·B·R) or None) for K×K contiguous matrices in fp32/fp64."""
    k = a.shape[0]
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty_like(a) if out is None else out
    if a.is_cuda and _GPU_MM == "cublas":
        torch.mm(a, b, out=out)
        return out, (trace_dot(out, r) if r is not None else None)
    precision = _precision(a.dtype)
    bm, bn, bk, warps = _blocks(k, a.dtype, precision)
    grid = (triton.cdiv(k, bm), triton.cdiv(k, bn))
    part = torch.empty(grid[0] * grid[1], dtype=torch.float64, device=a.device) if r is not None else out
    rr = r.contiguous() if r is not None else a
    _mm_trace_kernel[grid](a, b, out, rr, part, k, HAS_R=r is not None, PRECISION=precision,
                           BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return out, (part.sum().to(a.dtype) if r is not None else None)


def trace_dot(a, b):
    """tr(A·B) = Σ_ij A_ij B_ji without the product (0-dim, A's dtype)."""
    k = a.shape[0]
    a, b = a.contiguous(), b.contiguous()
    block = 64 if a.is_cuda and k >= 256 else 32
    grid = (triton.cdiv(k, block), triton.cdiv(k, block))
    part = torch.empty(grid[0] * grid[1], dtype=torch.float64, device=a.device)
    _trace_dot_kernel[grid](a, b, part, k, BLOCK=block)
    return part.sum().to(a.dtype)


def _normalize_centre(x, w, col0):
    n, k = x.shape
    block = min(1024, triton.next_power_of_2(k))
    _normalize_rows_kernel[(n,)](x, w, k, x.stride(0), x.stride(1), w.stride(0), col0, BLOCK_K=block)
    view = w[:, col0:col0 + k]
    view.sub_(view.mean(dim=0, keepdim=True))


def _normalize_backward(x, g, col0):
    n, k = x.shape
    dx = torch.empty((n, k), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(k))
    _normalize_backward_kernel[(n,)](x, g, dx, k, x.stride(0), x.stride(1), g.stride(0), col0, BLOCK_K=block)
    return dx


def _coeff(k):
    return (1.0 if k % 2 else -1.0) / k


def _eye_add(m, s):
    out = m.clone()
    if s != 0.0:
        out.diagonal().add_(s)
    return out


def _poly(pw, a):
    """Σ_i a_i X^i from pw = [X, ..., X^h] (Paterson–Stockmeyer; mirrors the C++ ``poly``)."""
    h, d = len(pw), len(a) - 1

    def block(start):
        out = torch.zeros_like(pw[0])
        if a[start] != 0.0:
            out.diagonal().fill_(a[start])
        for r in range(1, h):
            if start + r <= d and a[start + r] != 0.0:
                out.add_(pw[r - 1], alpha=a[start + r])
        return out

    b = d // h
    if b * h == d and b > 0:
        acc = block((b - 1) * h).add_(pw[h - 1], alpha=a[d])
        b -= 1
    else:
        acc = block(b * h)
    for bb in range(b - 1, -1, -1):
        acc = block(bb * h).add_(mm_trace(pw[h - 1], acc)[0])
    return acc


def _rows(p, z):
    n, k = p.shape
    w = torch.empty((n, 2 * k), dtype=_acc(p.dtype), device=p.device)
    _normalize_centre(p, w, 0)
    _normalize_centre(z, w, k)
    return w


def ssl_forward(p, z, lambd, mu, gamma, order):
    """(loss, Xu, P, Xa, saved), the same contract as ``torch.ops.sslops.matrix_ssl_fwd_cxx``."""
    n, k = p.shape
    h = (order + 1) // 2
    w = _rows(p, z)
    pc, zc = w[:, :k], w[:, k:]
    both = torch.mm(pc.T, w).mul_(1.0 / n)  # [Sp | C]
    sp = (both[:, :k] + both[:, :k].T).mul_(0.5)
    sz = torch.mm(zc.T, zc)
    sz = (sz + sz.T).mul_(0.5 / n)
    xu = _eye_add(both[:, k:], mu - 1.0).contiguous()
    pa = _eye_add(sp, mu)
    xa = _eye_add(sz, mu - 1.0)
    saved = torch.empty(((h - 1) + (order - 1), k, k), dtype=w.dtype, device=w.device)
    pu = [xu]
    traces = {}
    for i in range(2, h + 1):
        _, t = mm_trace(pu[-1], xu, xu, out=saved[i - 2])  # epilogue: tr(Xu^i · Xu) = tr Xu^{i+1}
        pu.append(saved[i - 2])
        traces[i + 1] = t
    terms = []
    for kk in range(1, order + 1):
        a, b = (kk + 1) // 2, kk // 2
        if b == 0:
            t = pu[0].diagonal().sum()
        elif kk in traces and a == b + 1:
            t = traces[kk]
        else:
            t = trace_dot(pu[a - 1], pu[b - 1])
        terms.append(-lambd * _coeff(kk) * t)
    terms.append(-gamma * _coeff(1) * trace_dot(pa, xa))
    prev = pa
    for kk in range(2, order + 1):
        dst = saved[h - 1 + kk - 2]
        _, t = mm_trace(prev, xa, xa, out=dst)  # A_{kk-1} = A_{kk-2}·Xa, traced against Xa
        prev = dst
        terms.append(-gamma * _coeff(kk) * t)
    loss = torch.stack(terms).sum()
    return loss, xu, pa, xa, saved


def ssl_backward(grad, p, z, xu, pa, xa, saved, lambd, mu, gamma, order, need_p, need_z):
    """(dp, dz), the same contract as ``torch.ops.sslops.matrix_ssl_bwd_cxx``."""
    n, k = p.shape
    h = (order + 1) // 2
    g = grad.to(xu.dtype)
    pu = [xu] + [saved[i - 2] for i in range(2, h + 1)]
    q = _poly(pu, [(-1.0) ** j for j in range(order)])  # dU/dXu = -λ qᵀ
    w = _rows(p, z)
    pc, zc = w[:, :k], w[:, k:]
    scale = g / n  # the incoming gradient stays on the device (no host sync)
    gp = gz = None
    if need_p:
        pa_pw = [xa]
        for _ in range(2, h + 1):
            pa_pw.append(mm_trace(pa_pw[-1], xa)[0])
        f = _poly(pa_pw, [0.0] + [_coeff(kk) for kk in range(1, order + 1)])  # dA/dP = -f(Xa)
        gpc = torch.mm(pc, f).mul_(-2.0 * gamma)
        gpc.addmm_(zc, q, alpha=-lambd)
        gp = _normalize_backward(p, gpc.mul_(scale), 0)
    if need_z:
        chain = [pa] + [saved[h - 1 + l - 1] for l in range(1, order)]
        jmax = (order - 1) // 2
        r = None
        for j in range(jmax, -1, -1):
            dj = chain[j].mul(0.5 * _coeff(2 * j + 1))
            for l in range(j + 1, order - j):
                dj.add_(chain[l], alpha=_coeff(j + l + 1))
            r = dj if j == jmax else dj.add_(mm_trace(xa, r)[0])
        gzc = torch.mm(zc, r + r.T).mul_(-2.0 * gamma)  # dA/dXa = -(R + Rᵀ)
        gzc.addmm_(pc, q.T, alpha=-lambd)
        gz = _normalize_backward(z, gzc.mul_(scale), 0)
    none = p.new_empty((0,))  # the gradient nobody asked for: not allocated (see sslops.ops.matrix_info)
    return (gp if gp is not None else none), (gz if gz is not None else none)


def mce_forward(p, q, order):
    """(loss, X, saved), the same contract as ``torch.ops.sslops.matrix_mce_fwd_cxx``."""
    k = p.shape[0]
    acc = _acc(p.dtype)
    pa = p.to(acc).contiguous()
    qa = q.to(acc)
    x = _eye_add(qa, -1.0).contiguous()
    saved = torch.empty((order - 1, k, k), dtype=acc, device=p.device)
    terms = [qa.diagonal().sum(), -_coeff(1) * trace_dot(pa, x)]
    prev = pa
    for kk in range(2, order + 1):
        _, t = mm_trace(prev, x, x, out=saved[kk - 2])  # A_{kk-1} = A_{kk-2}·X, traced against X
        prev = saved[kk - 2]
        terms.append(-_coeff(kk) * t)
    return torch.stack(terms).sum(), x, saved


def mce_backward(grad, p, x, saved, order, need_p, need_q):
    """(dp, dq), the same contract as ``torch.ops.sslops.matrix_mce_bwd_cxx``."""
    g = grad.to(x.dtype)  # stays on the device (no host sync)
    h = (order + 1) // 2
    out = lambda: torch.zeros(p.shape, dtype=p.dtype, device=p.device)  # noqa: E731
    dp = dq = None
    if need_p:
        pw = [x]
        for _ in range(2, h + 1):
            pw.append(mm_trace(pw[-1], x)[0])
        nf = _poly(pw, [0.0] + [-_coeff(kk) for kk in range(1, order + 1)])  # -f(X)
        dp = (nf.T * g).to(p.dtype).contiguous()
    if need_q:
        chain = [p.to(x.dtype).contiguous()] + [saved[j - 1] for j in range(1, order)]
        r = None
        for m in range(order - 1, -1, -1):  # -G + I: D̃_m = -Σ_j c_{m+j+1} A_j (+ I for m = 0)
            dm = chain[0].mul(-_coeff(m + 1))
            for j in range(1, order - m):
                dm.add_(chain[j], alpha=-_coeff(m + j + 1))
            if m == 0:
                dm.diagonal().add_(1.0)
            r = dm if r is None else dm.add_(mm_trace(x, r)[0])
        dq = (r.T * g).to(p.dtype).contiguous()
    return (dp if dp is not None else out()), (dq if dq is not None else out())
