r"""Triton kernels of the covariance family: VICReg (one view at a time) and Barlow Twins.

Math (z is (N, K); the normalised view is applied on the fly while tiles are loaded, so
no normalised copy of z is ever written):

    VICReg   Â = (z - mean) / sqrt(N - 1)                 C = ÂᵀÂ (unbiased covariance)
             terms = [Σ_k relu(1 - sqrt(C_kk + eps)), Σ_{j≠k} C_jk²]
    Barlow   Â = (z_a - mean_a)·rstd_a / sqrt(N), B̂ likewise, rstd = 1/sqrt(m2/N + eps)
             c = ÂᵀB̂,  loss = Σ_k (c_kk - 1)² + λ Σ_{j≠k} c_jk²

Forward: ``_col_stats_kernel`` (mean, m2: two passes over the rows of a column block;
for VICReg's first view it also sums Σ_n (z_a - z_b)² per column in the mean pass, while
z_a's tile is in registers, so the invariance MSE costs one extra read of z_b and no pass of
its own; the per-column sums are added in float64 in a fixed order), then ``_prod_kernel``
computes tiles of the product and reduces them in registers (the K×K or N×N matrix is never
written):

    K×K route   tile of ÂᵀB̂ (reduction over N), Σ of squares off the diagonal
    Gram route  tiles of ÂÂᵀ and B̂B̂ᵀ (reduction over K), Σ of their product
                (‖ÂᵀB̂‖_F² = ⟨ÂÂᵀ, B̂B̂ᵀ⟩), minus Σ_k C_kk² taken from the O(NK) diagonal

symmetric products (VICReg, and Barlow's Gram route) visit only the upper triangle of
tiles. Each program writes one partial sum; the launcher adds them (no atomics, so the
result is bit-reproducible run to run).

Column reductions (``_col_stats_kernel``, ``_col_dot_kernel``, the batch-norm backward) run on a
grid of (64-column blocks) × (row chunks): the rows are split into chunks of at least 256 so
that ~4 programs per SM are launched (K = 256 alone would give 4 programs for 132 SMs;
``_row_chunks``). With one chunk (small N, or K wide enough to fill the GPU) each is a single
launch over every row, as before. With several, each program writes its chunk's (mean, m2,
sq) — m2 centred on the chunk's own mean — to (chunks, K) buffers and ``_chan_merge_kernel``
merges them in chunk order, mean = Σ n_c·mean_c / N, m2 = Σ [m2_c + n_c·(mean_c - mean)²]
(Chan et al.: centred terms only, no cancellation; a NaN in any chunk reaches the result);
the diagonal's and batch-norm's column sums are per-chunk partials added by ``torch.sum`` over
the chunk axis. No atomics anywhere: reruns are bit-identical.

Backward (gradients derived in csrc/cpu/covariance.cpp): the product the gradient needs
(C = ÂᵀB̂, K×K, or the Grams, N×N: whichever is smaller) is stored in fp32 (fp64 for fp64),
then ``_apply_kernel`` multiplies it by the normalised view and applies the epilogue in
registers: VICReg's whole dz (hinge, diagonal, covariance and the fused invariance term
coef·(z - other)), or Barlow's dÂ, which ``_bn_finish_kernel`` pushes through batch-norm's
backward dz = rstd/sqrt(N)·(dÂ - colmean dÂ - Â·colsum(dÂ ⊙ Â)).

Saved by the op layer: mean and m2 (VICReg) or mean and rstd (Barlow), (K,) each, and,
when gradients are needed, the product the backward multiplies by (the forward kernel
stores its tiles — mirrored for symmetric products — while reducing them; min(N, K)²
elements, never more than an input), so the backward runs the apply product only.

Precision: fp16/bf16 inputs are normalised in fp32 and fed to ``tl.dot`` in the input
dtype (tensor cores) with fp32 accumulation (except fp16's backward product, whose stored
fp32 operand can pass fp16's range: it runs in TF32, the same 10-bit mantissa); fp32 inputs use ``tl.dot`` with
``input_precision`` = "ieee" (exact fp32 products) or "tf32" (tensor cores, 10-bit
mantissa), chosen by :func:`sslops.ops.covariance.set_dot_precision` (default: follow
``torch.backends.cuda.matmul.allow_tf32``, False, i.e. IEEE); fp64 is exact. The
interpreter always computes in IEEE.

Cost per call (one view of VICReg; Barlow's Gram route computes two Grams, its K×K route
one non-symmetric product): forward N·K·min(N, K) flops (half of 2NK·min(N, K), by
symmetry), ~3NK element reads (+ NK of z_b in z_a's call: 7NK for VICReg's two views, one
pass fewer than a separate invariance pass re-reading both; a chunk's second pass mostly hits
L2), the product written (D² = min(N, K)² fp32) when saved, plus 3·chunks·K partials when
the rows are split (chunks ≤ 4·SMs: small next to NK);
backward 2NK·min(N, K) flops for the apply, D² read, NK read twice, NK written (Barlow:
+ an fp32 NK buffer written and read twice).
"""

import functools
import math

import torch
import triton
import triton.language as tl

from sslops._backend import interpreting_triton

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(dtype):
    """(BLOCK_IJ, BLOCK_T, num_warps) of the product kernels."""
    if interpreting_triton():
        return 16, 16, 1
    if dtype == torch.float64:
        return 32, 16, 4
    if dtype in (torch.float16, torch.bfloat16):
        return 128, 32, 8
    return 64, 32, 4


def _apply_blocks(dtype, prec, mz):
    """(BLOCK_R, BLOCK_C, BLOCK_T, num_warps) of _apply_kernel: spill-free on sm_90 (ptxas, triton 3.6).

    The apply keeps the accumulator, the epilogue's tiles and (Gram route, mz) a row block of
    the N×N product live at once: the product kernels' 128×128 tiles spilled 20-40 B/thread
    for fp16/bf16 (128×64 does not), and fp32 "ieee" on the Gram route at 64×64×32, 4 warps
    spilled ~530 B/thread (CUDA-core FMA; 64×64×16 does not)."""
    if interpreting_triton():
        return 16, 16, 16, 1
    if dtype == torch.float64:
        return 32, 32, 16, 4
    if dtype in (torch.float16, torch.bfloat16):
        return 128, 64, 32, 8
    if prec == "ieee" and mz:
        return 64, 64, 16, 4
    return 64, 64, 32, 4


def _dot_t(dtype):
    """tl.dot operand dtype: the input's (tensor cores for fp16/bf16), fp32 for fp32, fp64 for fp64."""
    # 2026-11-22: the interpreter multiplies the raw bit patterns of bfloat16 tl.dot operands
    # (https://github.com/triton-lang/triton/issues/11584, "not supported yet"), so under
    # TRITON_INTERPRET=1 bf16 products are fed as fp32; the GPU lane covers the bf16 dot.
    if dtype == torch.bfloat16 and interpreting_triton():
        return tl.float32
    return _TL_DTYPE[dtype]


def _prec(dtype, precision):
    if dtype != torch.float32 or interpreting_triton():
        return "ieee"
    return precision


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _col_stats_kernel(z, other, pmean, pm2, psq, N, K, CHUNK, HAS_OTHER: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """Statistics of one (row chunk, column block) of z, rows [c·CHUNK, min((c+1)·CHUNK, N)):
    pmean[c, k] = chunk mean, pm2[c, k] = Σ (z - chunk mean)² (two passes over the chunk's rows,
    no Σz² - n·mean² cancellation); with HAS_OTHER the first pass also sums psq[c, k] = Σ (z - other)²
    while z's tile is in registers. With one chunk these are the column mean, m2 and sq.

    Precision (as csrc/cpu/column_reduce.h): the first pass sums in float64 (the mean is then
    exact to its last rounding even when |mean| ≫ std); the second centres on that mean rounded
    to acc_t, u, and also sums v = Σ (z - u), so m2 = Σ (z - u)² - v²/n (Chan, Golub & LeVeque's
    corrected two-pass algorithm). Each tile's sums are in acc_t and the tiles' in float64, so
    the error does not grow with the chunk's length. pmean is float64 when the chunks are merged."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    acc_t = pm2.dtype.element_ty
    r_lo = c * CHUNK
    r_hi = tl.minimum(r_lo + CHUNK, N)
    s = tl.zeros([BLOCK_K], tl.float64)
    e = tl.zeros([BLOCK_K], tl.float64)
    for r0 in range(r_lo, r_hi, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        m = (rows[:, None] < r_hi) & cmask[None, :]
        off = rows[:, None].to(tl.int64) * K + cols[None, :]
        x = tl.load(z + off, mask=m, other=0.0).to(acc_t)
        s += tl.sum(x.to(tl.float64), 0)
        if HAS_OTHER:
            d = x - tl.load(other + off, mask=m, other=0.0).to(acc_t)
            e += tl.sum(d * d, 0).to(tl.float64)
    out = c.to(tl.int64) * K + cols
    if HAS_OTHER:
        tl.store(psq + out, e.to(acc_t), mask=cmask)
    mu = s / (r_hi - r_lo)
    u = mu.to(acc_t)
    v = tl.zeros([BLOCK_K], tl.float64)
    q = tl.zeros([BLOCK_K], tl.float64)
    for r0 in range(r_lo, r_hi, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        m = (rows[:, None] < r_hi) & cmask[None, :]
        x = tl.load(z + rows[:, None].to(tl.int64) * K + cols[None, :], mask=m, other=0.0).to(acc_t)
        d = tl.where(m, x - u[None, :], 0.0)
        v += tl.sum(d, 0).to(tl.float64)
        q += tl.sum(d * d, 0).to(tl.float64)
    tl.store(pmean + out, mu.to(pmean.dtype.element_ty), mask=cmask)
    tl.store(pm2 + out, (q - v * v / (r_hi - r_lo)).to(acc_t), mask=cmask)


@triton.jit
def _chan_merge_kernel(pmean, pm2, psq, mean, m2, sq, N, K, CHUNK, CHUNKS, HAS_OTHER: tl.constexpr, BLOCK_K: tl.constexpr):
    """Merge the per-chunk (count n_c, mean_c, m2_c) of _col_stats_kernel, chunks in index order:
    mean = Σ_c n_c·mean_c / N,  m2 = Σ_c [m2_c + n_c·(mean_c - mean)²]  (Chan et al.'s pairwise
    update applied to all chunks at once: every term is a centred square, no cancellation),
    sq = Σ_c sq_c, in float64 (the chunk means are float64: rounded to fp32 near 1e5 they would
    spoil the n_c·(mean_c - mean)² terms). A NaN in any chunk reaches mean and m2."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    cols64 = cols.to(tl.int64)
    acc_t = mean.dtype.element_ty
    s = tl.zeros([BLOCK_K], tl.float64)
    e = tl.zeros([BLOCK_K], tl.float64)
    for c in range(0, CHUNKS):
        off = c * K + cols64
        s += tl.minimum(CHUNK, N - c * CHUNK) * tl.load(pmean + off, mask=cmask, other=0.0)
        if HAS_OTHER:
            e += tl.load(psq + off, mask=cmask, other=0.0).to(tl.float64)
    mu = s / N
    q = tl.zeros([BLOCK_K], tl.float64)
    for c in range(0, CHUNKS):
        off = c * K + cols64
        d = tl.load(pmean + off, mask=cmask, other=0.0) - mu
        q += tl.load(pm2 + off, mask=cmask, other=0.0).to(tl.float64) + tl.minimum(CHUNK, N - c * CHUNK) * d * d
    tl.store(mean + cols, mu.to(acc_t), mask=cmask)
    tl.store(m2 + cols, q.to(acc_t), mask=cmask)
    if HAS_OTHER:
        tl.store(sq + cols, e.to(acc_t), mask=cmask)


@triton.jit
def _col_dot_kernel(za, ma, sa, zb, mb, sb, out, N, K, CHUNK, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[c, k] = Σ Â_nk B̂_nk over the rows n of chunk c (Barlow's diagonal c_kk, summed over chunks by the launcher)."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    acc_t = out.dtype.element_ty
    mua = tl.load(ma + cols, mask=cmask, other=0.0)
    sca = tl.load(sa + cols, mask=cmask, other=0.0)
    mub = tl.load(mb + cols, mask=cmask, other=0.0)
    scb = tl.load(sb + cols, mask=cmask, other=0.0)
    r_lo = c * CHUNK
    r_hi = tl.minimum(r_lo + CHUNK, N)
    s = tl.zeros([BLOCK_K], tl.float64)  # tiles added in float64: error independent of the chunk's length
    for r0 in range(r_lo, r_hi, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        m = (rows[:, None] < r_hi) & cmask[None, :]
        off = rows[:, None].to(tl.int64) * K + cols[None, :]
        a = (tl.load(za + off, mask=m, other=0.0).to(acc_t) - mua[None, :]) * sca[None, :]
        b = (tl.load(zb + off, mask=m, other=0.0).to(acc_t) - mub[None, :]) * scb[None, :]
        s += tl.sum(tl.where(m, a * b, 0.0), 0).to(tl.float64)
    tl.store(out + c.to(tl.int64) * K + cols, s.to(acc_t), mask=cmask)


@triton.jit
def _load_hat(z, mu, sc, r_idx, c_idx, N, K, STAT_ON_COL: tl.constexpr, acc_t: tl.constexpr):
    """Normalised tile ((z[r, c] - mean) · scale), zero outside the matrix; r_idx/c_idx are
    broadcastable (rows of z, columns of z); stats indexed by the column index."""
    m = (r_idx < N) & (c_idx < K)
    x = tl.load(z + r_idx.to(tl.int64) * K + c_idx, mask=m, other=0.0).to(acc_t)
    mean = tl.load(mu + c_idx, mask=c_idx < K, other=0.0)
    scale = tl.load(sc + c_idx, mask=c_idx < K, other=0.0)
    return tl.where(m, (x - mean) * scale, 0.0)


@triton.jit
def _prod_tile(za, ma, sa, zb, mb, sb, i, j, N, K, GRAM: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
               acc_t: tl.constexpr, dot_t: tl.constexpr, PREC: tl.constexpr):
    """One (BLOCK_I, BLOCK_I) tile of ÂᵀB̂ (K×K, reduction over rows) or ÂB̂ᵀ (N×N, over columns)."""
    acc = tl.zeros([BLOCK_I, BLOCK_I], acc_t)
    T = K if GRAM else N
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        if GRAM:
            u = _load_hat(za, ma, sa, i[:, None], t[None, :], N, K, True, acc_t)  # Â[i, t]
            v = _load_hat(zb, mb, sb, j[None, :], t[:, None], N, K, True, acc_t)  # B̂[j, t]ᵀ
        else:
            u = _load_hat(za, ma, sa, t[None, :], i[:, None], N, K, True, acc_t)  # Â[t, i]ᵀ
            v = _load_hat(zb, mb, sb, t[:, None], j[None, :], N, K, True, acc_t)  # B̂[t, j]
        acc = tl.dot(u.to(dot_t), v.to(dot_t), acc, input_precision=PREC, out_dtype=acc_t)
    return acc


@triton.jit
def _store_tile(out, x, i, j, D, SYM: tl.constexpr, off_diagonal):
    m = (i[:, None] < D) & (j[None, :] < D)
    tl.store(out + i[:, None].to(tl.int64) * D + j[None, :], x, mask=m)
    if SYM:
        if off_diagonal:  # the transposed tile of a symmetric product, written from the same registers
            tl.store(out + j[None, :].to(tl.int64) * D + i[:, None], x, mask=m)


@triton.jit
def _prod_kernel(za, ma, sa, zb, mb, sb, zc, mc, sc, zd, md, sd, partials, prod1, prod2, N, K,
                 GRAM: tl.constexpr, TWO: tl.constexpr, SKIP_DIAG: tl.constexpr, SYM: tl.constexpr, STORE: tl.constexpr,
                 REDUCE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, dot_t: tl.constexpr, PREC: tl.constexpr):
    """X = ÂᵀB̂ or ÂB̂ᵀ tile (and Y from the second pair when TWO).

    REDUCE: partials[pid] = Σ over the tile of X² (X·Y when TWO), the diagonal skipped when
    SKIP_DIAG. STORE: X into prod1 (Y into prod2). SYM: the products are symmetric, so only
    tiles on or above the diagonal run; off-diagonal ones count twice and are stored twice.
    """
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    acc_t = partials.dtype.element_ty
    D = N if GRAM else K
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    j = pid_j * BLOCK_I + tl.arange(0, BLOCK_I)
    part = tl.zeros([BLOCK_I, BLOCK_I], acc_t)
    first_j = pid_i if SYM else 0  # symmetric: tiles on or above the diagonal only
    if pid_j >= first_j:
        x = _prod_tile(za, ma, sa, zb, mb, sb, i, j, N, K, GRAM, BLOCK_I, BLOCK_T, acc_t, dot_t, PREC)
        if STORE:
            _store_tile(prod1, x, i, j, D, SYM, pid_j > pid_i)
        if TWO:
            y = _prod_tile(zc, mc, sc, zd, md, sd, i, j, N, K, GRAM, BLOCK_I, BLOCK_T, acc_t, dot_t, PREC)
            if STORE:
                _store_tile(prod2, y, i, j, D, SYM, pid_j > pid_i)
            part = x * y
        else:
            part = x * x
        if SKIP_DIAG:
            part = tl.where(i[:, None] == j[None, :], 0.0, part)
        if SYM:
            if pid_j > pid_i:
                part = part * 2.0
    if REDUCE:
        tl.store(partials + pid_i * tl.num_programs(1) + pid_j, tl.sum(tl.sum(part, 1), 0))


@triton.jit
def _apply_kernel(z, mz, sz, mat, sm0, sm1, ez, emz, esz, eo, w, coef, out, N, K,
                  MZ: tl.constexpr, EPI: tl.constexpr, HAS_OTHER: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, dot_t: tl.constexpr,
                  PREC: tl.constexpr):
    """acc = Ẑ·M (M K×K) or M·Ẑ (M N×N) for an (N, K) output tile, Ẑ the normalised z, then:

    EPI 0 (VICReg dz): out = Ê·w + coef[0]·acc (+ coef[1]·(e - other)), Ê = (e - mean)·scale.
    EPI 1 (Barlow dÂ):  out = coef[0]·acc + Ê·w          (Ê the other view, normalised)
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    acc_t = out.dtype.element_ty if EPI == 1 else w.dtype.element_ty
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_R, BLOCK_C], acc_t)
    T = N if MZ else K
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        if MZ:
            mm = (r[:, None] < N) & (t[None, :] < N)
            left = tl.load(mat + r[:, None].to(tl.int64) * sm0 + t[None, :].to(tl.int64) * sm1, mask=mm, other=0.0)
            right = _load_hat(z, mz, sz, t[:, None], c[None, :], N, K, True, acc_t)
        else:
            left = _load_hat(z, mz, sz, r[:, None], t[None, :], N, K, True, acc_t)
            mm = (t[:, None] < K) & (c[None, :] < K)
            right = tl.load(mat + t[:, None].to(tl.int64) * sm0 + c[None, :].to(tl.int64) * sm1, mask=mm, other=0.0)
        acc = tl.dot(left.to(dot_t), right.to(dot_t), acc, input_precision=PREC, out_dtype=acc_t)
    m = (r[:, None] < N) & (c[None, :] < K)
    off = r[:, None].to(tl.int64) * K + c[None, :]
    e_hat = _load_hat(ez, emz, esz, r[:, None], c[None, :], N, K, True, acc_t)
    wv = tl.load(w + c, mask=c < K, other=0.0)
    c0 = tl.load(coef)
    val = e_hat * wv[None, :] + c0 * acc
    if EPI == 0:
        if HAS_OTHER:
            c1 = tl.load(coef + 1)
            e = tl.load(ez + off, mask=m, other=0.0).to(acc_t)
            o = tl.load(eo + off, mask=m, other=0.0).to(acc_t)
            val += c1 * (e - o)
    tl.store(out + off, val.to(out.dtype.element_ty), mask=m)


@triton.jit
def _bn_col_sums(d, z, mz, sz, r_lo, r_hi, cols, cmask, N, K, BLOCK_N: tl.constexpr):
    """(Σ d, Σ d ⊙ Ẑ) per column over rows [r_lo, r_hi): the column sums of batch-norm's backward
    (each tile's in acc_t, the tiles' in float64: the error does not grow with the rows)."""
    acc_t = d.dtype.element_ty
    s1 = tl.zeros(cols.shape, tl.float64)
    s2 = tl.zeros(cols.shape, tl.float64)
    for r0 in range(r_lo, r_hi, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        m = (rows[:, None] < r_hi) & cmask[None, :]
        dv = tl.load(d + rows[:, None].to(tl.int64) * K + cols[None, :], mask=m, other=0.0)
        zh = _load_hat(z, mz, sz, rows[:, None], cols[None, :], N, K, True, acc_t)
        s1 += tl.sum(dv, 0).to(tl.float64)
        s2 += tl.sum(dv * zh, 0).to(tl.float64)
    return s1.to(acc_t), s2.to(acc_t)


@triton.jit
def _bn_sums_kernel(d, z, mz, sz, part, N, K, CHUNK, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[0, c, k] = Σ d, part[1, c, k] = Σ d ⊙ Ẑ over the rows of chunk c (the column sums of
    batch-norm's backward, split over row chunks; the launcher adds the chunks in a fixed order)."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    chunks = tl.num_programs(1)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    r_lo = c * CHUNK
    s1, s2 = _bn_col_sums(d, z, mz, sz, r_lo, tl.minimum(r_lo + CHUNK, N), cols, cmask, N, K, BLOCK_N)
    out = c.to(tl.int64) * K + cols
    tl.store(part + out, s1, mask=cmask)
    tl.store(part + chunks.to(tl.int64) * K + out, s2, mask=cmask)


@triton.jit
def _bn_finish_kernel(d, z, mz, sz, sums, out, N, K, CHUNK, SUMS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """out = scale·(d - colmean(d) - Ẑ·colsum(d ⊙ Ẑ)): batch-norm's backward through Ẑ = (z - mean)·scale,
    on rows [c·CHUNK, min((c+1)·CHUNK, N)). SUMS: the column sums Σd, Σd⊙Ẑ are given (sums[0, k],
    sums[1, k], from _bn_sums_kernel); otherwise (one chunk: every row) a first pass computes them."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    acc_t = d.dtype.element_ty
    r_lo = c * CHUNK
    r_hi = tl.minimum(r_lo + CHUNK, N)
    if SUMS:
        s1 = tl.load(sums + cols, mask=cmask, other=0.0)
        s2 = tl.load(sums + K + cols, mask=cmask, other=0.0)
    else:
        s1, s2 = _bn_col_sums(d, z, mz, sz, r_lo, r_hi, cols, cmask, N, K, BLOCK_N)
    s1 = s1 / N
    scale = tl.load(sz + cols, mask=cmask, other=0.0)
    for r0 in range(r_lo, r_hi, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        m = (rows[:, None] < r_hi) & cmask[None, :]
        off = rows[:, None].to(tl.int64) * K + cols[None, :]
        dv = tl.load(d + off, mask=m, other=0.0)
        zh = _load_hat(z, mz, sz, rows[:, None], cols[None, :], N, K, True, acc_t)
        res = scale[None, :] * (dv - s1[None, :] - zh * s2[None, :])
        tl.store(out + off, res.to(out.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------- launchers


def _col_blocks():
    return (16, 16) if interpreting_triton() else (64, 64)


# Rows per chunk of the column reductions (_col_stats_kernel, _bn_finish_kernel): None sizes the
# chunks so the grid fills ~4 programs per SM; an int fixes it (a test hook: tiny inputs in
# several chunks under the interpreter). At least _MIN_CHUNK rows per chunk on a GPU.
_ROW_CHUNK = None
_MIN_CHUNK = 256
_PROGRAMS_PER_SM = 4


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _row_chunks(n, col_blocks, block_n, device):
    """(rows per chunk, number of chunks) of a column reduction over n rows in col_blocks column blocks.

    A grid of col_blocks × chunks programs; chunks = 1 (one program per column block, every row)
    under the interpreter, and whenever the columns alone fill the GPU."""
    if _ROW_CHUNK is not None:
        chunk = max(1, int(_ROW_CHUNK))
    elif interpreting_triton():
        chunk = max(1, n)
    else:
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 132
        want = max(1, _PROGRAMS_PER_SM * sms // col_blocks)
        chunk = max(_MIN_CHUNK, triton.cdiv(n, want))
        chunk = triton.cdiv(chunk, block_n) * block_n
    return chunk, max(1, triton.cdiv(n, chunk))


def _col_stats(z, other=None):
    """(mean, m2, sq): sq_k = Σ_n (z_nk - other_nk)² from the mean pass, or None without ``other``.

    One chunk: _col_stats_kernel writes the results. Several: per-chunk (mean, m2, sq) in
    (chunks, K) buffers, merged by _chan_merge_kernel in chunk order (no atomics: bit-identical
    reruns)."""
    n, k = z.shape
    acc = _acc(z.dtype)
    bn, bk = _col_blocks()
    col_blocks = triton.cdiv(k, bk)
    chunk, chunks = _row_chunks(n, col_blocks, bn, z.device)
    has_other = other is not None
    pmean = torch.empty((chunks, k), dtype=acc if chunks == 1 else torch.float64, device=z.device)
    pm2 = torch.empty((chunks, k), dtype=acc, device=z.device)
    psq = torch.empty((chunks, k), dtype=acc, device=z.device) if has_other else pm2
    _col_stats_kernel[(col_blocks, chunks)](z, other if has_other else z, pmean, pm2, psq, n, k, chunk,
                                            HAS_OTHER=has_other, BLOCK_N=bn, BLOCK_K=bk)
    if chunks == 1:
        return pmean[0], pm2[0], (psq[0] if has_other else None)
    mean = torch.empty(k, dtype=acc, device=z.device)
    m2 = torch.empty(k, dtype=acc, device=z.device)
    sq = torch.empty(k, dtype=acc, device=z.device) if has_other else mean
    _chan_merge_kernel[(col_blocks,)](pmean, pm2, psq, mean, m2, sq, n, k, chunk, chunks, HAS_OTHER=has_other, BLOCK_K=bk)
    return mean, m2, (sq if has_other else None)


def _bn_finish(d, view, out):
    """out ← batch-norm backward of dÂ = d through view = (z, mean, scale); one launch when the
    rows form one chunk, else column sums per chunk, added over chunks by torch (fixed order),
    then the elementwise pass on the same (column block, row chunk) grid."""
    n, k = d.shape
    bn, bk = _col_blocks()
    col_blocks = triton.cdiv(k, bk)
    chunk, chunks = _row_chunks(n, col_blocks, bn, d.device)
    grid = (col_blocks, chunks)
    if chunks == 1:
        _bn_finish_kernel[grid](d, *view, d, out, n, k, chunk, SUMS=False, BLOCK_N=bn, BLOCK_K=bk)
        return out
    part = torch.empty((2, chunks, k), dtype=d.dtype, device=d.device)
    _bn_sums_kernel[grid](d, *view, part, n, k, chunk, BLOCK_N=bn, BLOCK_K=bk)
    sums = part.sum(1)
    _bn_finish_kernel[grid](d, *view, sums, out, n, k, chunk, SUMS=True, BLOCK_N=bn, BLOCK_K=bk)
    return out


def _col_dot(za, ma, sa, zb, mb, sb):
    """Σ_n Â_nk B̂_nk per column: per-chunk sums, added over chunks by torch (fixed order) when there are several."""
    n, k = za.shape
    bn, bk = _col_blocks()
    col_blocks = triton.cdiv(k, bk)
    chunk, chunks = _row_chunks(n, col_blocks, bn, za.device)
    out = torch.empty((chunks, k), dtype=ma.dtype, device=za.device)
    _col_dot_kernel[(col_blocks, chunks)](za, ma, sa, zb, mb, sb, out, n, k, chunk, BLOCK_N=bn, BLOCK_K=bk)
    return out[0] if chunks == 1 else out.sum(0)


def _barlow_diag(z_a, mean_a, rstd_a, z_b, mean_b, rstd_b):
    """c_kk = Σ_n Â_nk B̂_nk / N: the rows scaled by rstd alone and the sum divided by N once. Scaled
    by rstd/√N on each side, the two roundings of 1/√N biased every c_kk alike, and Barlow's
    on-diagonal term Σ (c_kk - 1)² (c_kk near 1) was 2.5× farther from float64 than plain PyTorch's."""
    return _col_dot(z_a, mean_a, rstd_a.contiguous(), z_b, mean_b, rstd_b.contiguous()) / z_a.shape[0]


def _product(a, b, gram, precision, *, second=None, skip_diag=False, sym=False, store=False, reduce=True):
    """Launch _prod_kernel on (z, mean, scale) triples; returns (partials or None, prod1, prod2)."""
    z = a[0]
    n, k = z.shape
    acc = _acc(z.dtype)
    bij, bt, warps = _blocks(z.dtype)
    d = n if gram else k
    grid = (triton.cdiv(d, bij), triton.cdiv(d, bij))
    partials = torch.empty(grid if reduce else (1,), dtype=acc, device=z.device)
    # distinct (0, 0) tensors when not stored: a custom op's outputs may not alias each other
    prod1 = torch.empty((d, d) if store else (0, 0), dtype=acc, device=z.device)
    prod2 = torch.empty((d, d) if store and second is not None else (0, 0), dtype=acc, device=z.device)
    c, dd = second if second is not None else (a, b)
    _prod_kernel[grid](*a, *b, *c, *dd, partials, prod1, prod2, n, k, GRAM=gram, TWO=second is not None, SKIP_DIAG=skip_diag,
                       SYM=sym, STORE=store, REDUCE=reduce, BLOCK_I=bij, BLOCK_T=bt, dot_t=_dot_t(z.dtype),
                       PREC=_prec(z.dtype, precision), num_warps=warps)
    return (partials if reduce else None), prod1, prod2


def _apply(zhat, mat, mat_t, mz, epi, ehat, other, w, coef, out, precision):
    """out ← epilogue(Ẑ·M) (mz False, M K×K) or epilogue(M·Ẑ) (mz True, M N×N); mat_t: use Mᵀ."""
    z = zhat[0]
    n, k = z.shape
    s0, s1 = mat.stride()
    if mat_t:
        s0, s1 = s1, s0
    dot_t, prec = _dot_t(z.dtype), _prec(z.dtype, precision)
    if z.dtype == torch.float16:
        # The stored product (a Gram entry sums K products) can pass fp16's 65504 even when z
        # fits: multiply in fp32 storage with TF32 inputs, fp16's own 10-bit mantissa.
        dot_t, prec = tl.float32, _prec(torch.float32, "tf32")
    br, bc, bt, warps = _apply_blocks(z.dtype, prec, mz)
    grid = (triton.cdiv(n, br), triton.cdiv(k, bc))
    _apply_kernel[grid](*zhat, mat, s0, s1, *ehat, other if other is not None else ehat[0], w, coef, out, n, k,
                        MZ=mz, EPI=epi, HAS_OTHER=other is not None, BLOCK_R=br, BLOCK_C=bc, BLOCK_T=bt,
                        dot_t=dot_t, PREC=prec, num_warps=warps)
    return out


def _use_gram(route, gram_cost, kk_cost):
    return route == 2 or (route == 0 and gram_cost < kk_cost)


def _sum64(t):
    """Sum of per-program partials in float64, returned in the partials' dtype."""
    return t.double().sum().to(t.dtype)


def vicreg_view_forward(z, other, eps, route, save, precision):
    """(terms (3,), mean, m2, prod): terms = [Σ_k relu(1 - sqrt(var_k + eps)), Σ_{j≠k} Cov_jk², Σ (z - other)²]
    (the last from the column-mean pass, 0 when ``other`` is None); prod the product the backward
    needs (route 2: ÂÂᵀ, route 1: ÂᵀÂ) when ``save``, else (0, 0)."""
    z = z.contiguous()
    n, k = z.shape
    other = other.to(z.dtype).contiguous() if other is not None else None
    mean, m2, sq = _col_stats(z, other)
    sq_sum = _sum64(sq) if sq is not None else mean.new_zeros(())
    var = m2 / (n - 1)
    hinge = torch.relu(1.0 - torch.sqrt(var + eps)).sum()
    scale = torch.full_like(mean, 1.0 / math.sqrt(n - 1))
    view = (z, mean, scale)
    if _use_gram(route, 4 * n, 3 * k):
        parts, prod, _ = _product(view, view, True, precision, sym=True, store=save)
        off = _sum64(parts) - (var * var).sum()
    else:
        parts, prod, _ = _product(view, view, False, precision, skip_diag=True, sym=True, store=save)
        off = _sum64(parts)
    return torch.stack([hinge, off, sq_sum]), mean, m2, prod


def vicreg_view_backward(z, other, mean, m2, prod, coef, eps, route, precision):
    """dz = coef[0]·∂terms[0] + coef[1]·∂terms[1] + coef[2]·(z - other)."""
    z = z.contiguous()
    n, k = z.shape
    acc = mean.dtype
    coef = coef.to(acc)
    s = 1.0 / math.sqrt(n - 1)
    var = m2 / (n - 1)
    std = torch.sqrt(var + eps)
    active = (1.0 - std > 0).to(acc)
    hinge_w = torch.where(torch.isnan(std), std, -coef[0] * active / std)
    w = ((hinge_w - 4.0 * coef[1] * var) * s).contiguous()
    c = torch.stack([4.0 * coef[1] * s, coef[2]]).contiguous()
    scale = torch.full_like(mean, s)
    view = (z, mean, scale)
    gram = _use_gram(route, 4 * n, 3 * k)
    mat = prod if prod.numel() else _product(view, view, gram, precision, sym=True, store=True, reduce=False)[1]
    out = torch.empty_like(z)
    other = other.to(z.dtype).contiguous() if other is not None else None
    return _apply(view, mat, False, gram, 0, view, other, w, c, out, precision)


def barlow_twins_forward(z_a, z_b, lambd, eps, route, save, precision):
    """(loss, mean_a, rstd_a, mean_b, rstd_b, prod_a, prod_b); the products as in the C++ op."""
    z_a = z_a.contiguous()
    z_b = z_b.to(z_a.dtype).contiguous()
    n, k = z_a.shape
    mean_a, m2_a, _ = _col_stats(z_a)
    mean_b, m2_b, _ = _col_stats(z_b)
    rstd_a = torch.rsqrt(m2_a / n + eps)
    rstd_b = torch.rsqrt(m2_b / n + eps)
    va = (z_a, mean_a, rstd_a / math.sqrt(n))
    vb = (z_b, mean_b, rstd_b / math.sqrt(n))
    diag = _barlow_diag(z_a, mean_a, rstd_a, z_b, mean_b, rstd_b)
    on = (diag - 1.0).pow(2).sum()
    if _use_gram(route, 4 * n, 3 * k):
        parts, prod_a, prod_b = _product(va, va, True, precision, second=(vb, vb), sym=True, store=save)
        off = _sum64(parts) - (diag * diag).sum()
    else:
        parts, prod_a, prod_b = _product(va, vb, False, precision, skip_diag=True, store=save)
        off = _sum64(parts)
    return on + lambd * off, mean_a, rstd_a, mean_b, rstd_b, prod_a, prod_b


def barlow_twins_backward(grad, z_a, z_b, mean_a, rstd_a, mean_b, rstd_b, prod_a, prod_b, lambd, route, precision):
    """(dz_a, dz_b) for the incoming 0-d gradient ``grad``."""
    z_a = z_a.contiguous()
    z_b = z_b.to(z_a.dtype).contiguous()
    n, k = z_a.shape
    acc = mean_a.dtype
    g = grad.to(acc)
    va = (z_a, mean_a, (rstd_a / math.sqrt(n)).contiguous())
    vb = (z_b, mean_b, (rstd_b / math.sqrt(n)).contiguous())
    diag = _barlow_diag(z_a, mean_a, rstd_a, z_b, mean_b, rstd_b)
    w = (g * (2.0 * (1.0 - lambd) * diag - 2.0)).contiguous()
    c = (g * (2.0 * lambd)).reshape(1).contiguous()
    d_a = torch.empty((n, k), dtype=acc, device=z_a.device)
    d_b = torch.empty((n, k), dtype=acc, device=z_a.device)
    saved = prod_a.numel() > 0
    if _use_gram(route, 4 * n, 3 * k):
        if saved:
            g_a, g_b = prod_a, prod_b
        else:
            _, g_a, g_b = _product(va, va, True, precision, second=(vb, vb), sym=True, store=True, reduce=False)
        _apply(va, g_b, False, True, 1, vb, None, w, c, d_a, precision)  # dÂ = 2λ·Gb·Â + B̂·D
        _apply(vb, g_a, False, True, 1, va, None, w, c, d_b, precision)  # dB̂ = 2λ·Ga·B̂ + Â·D
    else:
        cm = prod_a if saved else _product(va, vb, False, precision, store=True, reduce=False)[1]  # c = ÂᵀB̂
        _apply(vb, cm, True, False, 1, vb, None, w, c, d_a, precision)  # dÂ = 2λ·B̂cᵀ + B̂·D
        _apply(va, cm, False, False, 1, va, None, w, c, d_b, precision)  # dB̂ = 2λ·Âc + Â·D
    out_a = torch.empty_like(z_a)
    out_b = torch.empty_like(z_b)
    _bn_finish(d_a, va, out_a)
    _bn_finish(d_b, vb, out_b)
    return out_a, out_b
