r"""Blockwise InfoNCE over a sparse relation G in Triton: flash-attention style, never M×M.

Math (SPEC §3). z is (M, K); anchors are the window rows [row_start, row_end) (B of them),
candidates all M rows. With ‖z_k‖ the row norm, ẑ = z / max(‖z‖, 1e-12), s_ij = ⟨ẑ_i, ẑ_j⟩
and x_ij = s_ij / τ::

    LSE_i = log Σ_{j≠i} exp(x_ij)                       online: running max and sum
    ℓ_i   = LSE_i − (1/|P(i)|) Σ_{j∈P(i)} x_ij          0 when P(i) = ∅

LSE is kept split, m_i + l_i (m_i the row maximum, l_i = log Σ exp(x_ij − m_i)), and the
candidates equal to the running maximum (terms exactly 1) are counted apart from the sum of
the others, added once at the end: a single fp32 LSE is rounded to the ulp of |x| (1e-6 at
τ = 0.07), and exp(x − LSE) put that error into the weight of a dominant positive, whose
gradient p − 1 then lost up to 4× against lightly's and pytorch-metric-learning's forms.

The similarity tile is one tensor-core product of the raw rows, scaled afterwards by the
two inverse norms (the normalisation is fused: no normalised copy of z exists). G is
``labels`` (label tiles compared inside the tile loop) or a symmetric CSR (crow, col with
col = −1 for skipped duplicates and self-pairs) whose positive logits a sparse kernel sums
in O(nnz·K).

Gradient. With g_i the gradient of ℓ_i, a_i = g_i·[|P(i)| > 0] (0 outside the window),
p_ij = exp((x_ij − m_i) − l_i) and C_ij = a_i (p_ij − G_ij/|P(i)|)/τ (j ≠ i), the symmetry of s
gives every row its anchor and candidate terms in one sum::

    dẑ_k = Σ_j (C_kj + C_jk) ẑ_j          dz_k = (dẑ_k − ẑ_k⟨ẑ_k, dẑ_k⟩) / max(‖z_k‖, 1e-12)

(the projection is skipped where the clamp is active). One program per block of rows
recomputes each tile of s from the saved LSE, forms D = C + Cᵀ for the tile and adds
D·Ẑ: every row is written by one program in a fixed order, so results are bit-identical
from run to run with no atomics. Rows outside the window visit only the window's columns.
The CSR part of D (−a_k/|P(k)| − a_j/|P(j)|)/τ over k's pairs is added per row by the
final kernel, which also applies the normalisation backward.

Precision: the similarity tiles multiply the raw input rows (exact products for fp16/bf16 on
the tensor cores, IEEE fp32 for fp32, fp64) and accumulate in fp32 (fp64). The backward's D·Z
product feeds D in the input dtype, except for fp16, whose D entries (≈ 1/N² at batch size N)
would flush to zero: it multiplies in fp32 storage with TF32 inputs (fp16's 10-bit mantissa).

Saved by the forward: the split LSE (2, B) and |P(i)| (B,) in fp32 (fp64 for fp64); row norms are
recomputed (one read of z). Extra memory: norms (M,), the (M, K) fp32 dẑ buffer of the
backward, nothing quadratic.

FLOPs: forward 2·B·M·K (+ B·M exp); backward (2 + 2·⌈K/BLOCK_KO⌉)·(2BM − B²)·K (+ 2 exp per
pair and K slice): every program along K recomputes its similarity tiles (blocks in _tiles).
Bytes: forward reads z once per anchor block, M·K·⌈B/BLOCK_M⌉ elements (L2-resident
tiles); backward likewise per row block, plus 2·M·K·4 for the dẑ buffer.
"""

import torch
import triton
import triton.language as tl

from sslops import _backend

_NORM_EPS = 1e-12


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_aligned(z):
    """Whether every row of z starts 16 elements apart with unit column stride.

    Triton then specialises the row stride as divisible by 16 and the loads of a tile become
    vector loads that the pipeliner copies asynchronously into shared memory (num_stages
    buffers). Otherwise (an odd K, a strided view) every element is its own masked scalar
    load with its own 64-bit address: no asynchronous copies, one shared-memory buffer, and
    far more registers at the same tile. The launch configuration depends on it.
    """
    return z.stride(1) == 1 and z.stride(0) % 16 == 0


def _tiles(kernel, dtype, k, aligned):
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_KO, num_warps, num_stages) of ``kernel`` ("forward" or "backward").

    BLOCK_M × BLOCK_N is the similarity tile, BLOCK_K the K chunk of its product loop,
    BLOCK_KO the dẑ columns one backward program owns (unused by the forward). Both K
    blocks are capped at K's next power of two (at least 16): a narrow K gets no padding.

    Chosen 2026-11-22 from ``ptxas -v`` for sm_90 (tests/test_triton_sm90.py, no GPU here),
    under triton 3.6.0 (the GPU machine's) and 3.8.0, at an aligned shape (M = 1024,
    K = 256) and an odd wide one (M = 520, K = 1000, rows not 16-aligned): every fp32,
    bf16 and fp16 configuration below spills nothing in either version, label and pair
    relations alike. Registers per thread (3.6 / 3.8; pairs, labels) are quoted with each.
    None of this has been timed on a GPU: the choice is "largest tile that fits the
    register file without local memory", not a measured optimum.

    * bf16/fp16 (tensor cores): 64×64 tiles, 8 warps, 3 stages throughout; only the K chunks
      shrink where registers run out (BLOCK_M/BLOCK_N stay 64).
      - forward, aligned: BLOCK_K 64 (regs 100,204 / 80,162). 128×64 and 128×128 spill
        (labels, 40–650 B); 4 warps spill under 3.6.
      - forward, unaligned: BLOCK_K 32 (127,246 / 127,203); BLOCK_K 64 compiles at 237–254
        registers, at the cliff.
      - backward, aligned: BLOCK_K 64, BLOCK_KO 128 (159,179 / 160,181).
      - backward, unaligned: BLOCK_K 16, BLOCK_KO 64 (bf16 176,230 / 171,219; fp16 165,178 /
        165,179). The aligned config spilled here (bf16 pairs 60/48 B under 3.6, 28/16 B
        under 3.8); with BLOCK_KO 128 and BLOCK_K 16 or 32 they compiled at 235–255
        registers (bf16 at 255); 128×64 tiles at 254–255 (fp16 spilled under 3.8). The price: twice the programs along K, each recomputing its
        similarity tiles (the FLOPs in the module docstring).
    * fp32 (IEEE FMA dot, never TF32: the tiles are the logits; smaller tiles cost no
      tensor-core throughput here):
      - forward, aligned: 64×64, BLOCK_K 64, 8 warps, 3 stages (144,192 / 150,190), unchanged.
      - forward, unaligned: 64×64, BLOCK_K 16, 8 warps, 1 stage (128,224 / 128,218). The
        aligned config spilled here (up to 32/32 B); BLOCK_K 32 spilled with 3 stages (36 B,
        3.6) and 1 stage (12 B, 3.8) and hit 255 registers with 2.
      - backward: 32×64, BLOCK_K 32, BLOCK_KO 128, 8 warps, 2 stages (aligned 112,100 /
        101,100; unaligned 182,180 / 183,183). Was 64×64×64: up to 60/48 B; 64×64 with
        BLOCK_K 16 fits only at 253–255 registers unaligned, and BLOCK_KO 64 would double
        the similarity recomputation.
    * fp64 (the reference dtype: correctness first, speed secondary; FP64 FMA): forward
      32×64, BLOCK_K 16, 8 warps, 1 stage (aligned 122,200 / 114,128; unaligned 128,202 /
      120,128); backward 32×32, BLOCK_K 16, BLOCK_KO 64, 4 warps, 2 stages (aligned
      179,178 / 168,168; unaligned 234,242 / 234,240). No spills either (not asserted by the
      test). Was 64×64×64: up to 108/116 B of spills at the aligned shape.

    With unaligned rows (:func:`_rows_aligned`) the 2-byte dtypes get a single shared-memory
    buffer whatever num_stages says (no asynchronous copies below 4 bytes), so a smaller
    BLOCK_K gives up no prefetching there; fp32/fp64 still pipeline.
    """
    kcap = max(16, triton.next_power_of_2(k))
    bm, bn, bk, bko, warps, stages = _tiles_wide(kernel, dtype, aligned)
    return bm, bn, min(bk, kcap), min(bko, kcap), warps, stages


def _tiles_wide(kernel, dtype, aligned):
    """:func:`_tiles` before capping the K blocks at K."""
    if _backend.interpreting_triton():
        return 16, 16, 16, 32, 1, 1
    if dtype in (torch.bfloat16, torch.float16):
        if kernel == "forward":
            return (64, 64, 64, 0, 8, 3) if aligned else (64, 64, 32, 0, 8, 3)
        return (64, 64, 64, 128, 8, 3) if aligned else (64, 64, 16, 64, 8, 3)
    if dtype == torch.float32:
        if kernel == "forward":
            return (64, 64, 64, 0, 8, 3) if aligned else (64, 64, 16, 0, 8, 1)
        return 32, 64, 32, 128, 8, 2
    if kernel == "forward":  # float64
        return 32, 64, 16, 0, 8, 1
    return 32, 32, 16, 64, 4, 2


@triton.jit
def _row_norm_kernel(z_ptr, norm_ptr, K, stride_m, stride_k, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ss = tl.zeros((BLOCK_K,), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(z_ptr + row * stride_m + cols * stride_k, mask=cols < K, other=0.0).to(ACC)
        ss += v * v
    tl.store(norm_ptr + row, tl.sqrt(tl.sum(ss, axis=0)))


@triton.jit
def _sim_tile(z_ptr, rows, rmask, cols, cmask, K, stride_m, stride_k,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
              DOT: tl.constexpr, PREC: tl.constexpr):
    """⟨z_r, z_c⟩ for a (BLOCK_M, BLOCK_N) tile of raw rows, accumulated in ACC."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    r_off = rows.to(tl.int64) * stride_m
    c_off = cols.to(tl.int64) * stride_m
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(z_ptr + r_off[:, None] + ks[None, :] * stride_k, mask=rmask[:, None] & kmask[None, :], other=0.0).to(DOT)
        b = tl.load(z_ptr + c_off[:, None] + ks[None, :] * stride_k, mask=cmask[:, None] & kmask[None, :], other=0.0).to(DOT)
        acc += tl.dot(a, tl.trans(b), input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _pairs_positive_kernel(z_ptr, norm_ptr, crow_ptr, col_ptr, pos_ptr, cnt_ptr, row_start, K, stride_m, stride_k,
                           inv_tau_ptr, EPS: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Σ_{j∈P(i)} x_ij and |P(i)| for one anchor i from the CSR, O(|P(i)|·K)."""
    inv_tau = tl.load(inv_tau_ptr)
    i = (row_start + tl.program_id(0)).to(tl.int64)
    inv_i = 1.0 / tl.maximum(tl.load(norm_ptr + i), EPS)
    start = tl.load(crow_ptr + i)
    end = tl.load(crow_ptr + i + 1)
    pos = tl.zeros((BLOCK_K,), dtype=ACC)
    cnt = 0.0
    for e in range(start, end):
        j = tl.load(col_ptr + e)
        live = j >= 0
        jj = tl.maximum(j, 0).to(tl.int64)
        inv_j = 1.0 / tl.maximum(tl.load(norm_ptr + jj), EPS)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = (ks < K) & live
            a = tl.load(z_ptr + i * stride_m + ks * stride_k, mask=kmask, other=0.0).to(ACC)
            b = tl.load(z_ptr + jj * stride_m + ks * stride_k, mask=kmask, other=0.0).to(ACC)
            pos += a * b * (inv_i * inv_j)
        cnt += tl.where(live, 1.0, 0.0)
    out = tl.program_id(0)
    tl.store(pos_ptr + out, tl.sum(pos, axis=0) * inv_tau)
    tl.store(cnt_ptr + out, cnt)


@triton.jit
def _forward_kernel(z_ptr, norm_ptr, labels_ptr, pos_ptr, cnt_ptr, loss_ptr, count_ptr, lse_ptr,
                    M, K, row_start, row_end, stride_m, stride_k, inv_tau_ptr,
                    HAS_LABELS: tl.constexpr, EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    inv_tau = tl.load(inv_tau_ptr)
    rows = row_start + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    inv_r = 1.0 / tl.maximum(tl.load(norm_ptr + rows, mask=rmask, other=1.0), EPS)
    # The candidates equal to the running max (terms exactly 1) are counted in run_top, apart
    # from run_sum: one rounding near 1 at the end instead of one per tile (module docstring).
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    run_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    run_top = tl.zeros((BLOCK_M,), dtype=ACC)
    pos = tl.zeros((BLOCK_M,), dtype=ACC)
    cnt = tl.zeros((BLOCK_M,), dtype=ACC)
    if HAS_LABELS:
        lab_r = tl.load(labels_ptr + rows, mask=rmask, other=0)
    for c0 in range(0, M, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < M
        inv_c = 1.0 / tl.maximum(tl.load(norm_ptr + cols, mask=cmask, other=1.0), EPS)
        s = _sim_tile(z_ptr, rows, rmask, cols, cmask, K, stride_m, stride_k, BLOCK_M, BLOCK_N, BLOCK_K, ACC, DOT, PREC)
        x = s * inv_r[:, None] * inv_c[None, :] * inv_tau
        valid = cmask[None, :] & (rows[:, None] != cols[None, :])
        xm = tl.where(valid, x, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(xm, axis=1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        grown = new_max > run_max  # the old maximum's terms join the others, rescaled
        run_sum = tl.where(grown, (run_sum + run_top) * tl.exp(run_max - safe), run_sum)
        run_top = tl.where(grown, 0.0, run_top)
        at_max = valid & (xm == new_max[:, None])
        run_sum += tl.sum(tl.where(at_max, 0.0, tl.exp(xm - safe[:, None])), axis=1)
        run_top += tl.sum(tl.where(at_max, 1.0, 0.0), axis=1)
        run_max = new_max
        if HAS_LABELS:
            lab_c = tl.load(labels_ptr + cols, mask=cmask, other=0)
            g = valid & (lab_r[:, None] == lab_c[None, :])
            pos += tl.sum(tl.where(g, x, 0.0), axis=1)
            cnt += tl.sum(tl.where(g, 1.0, 0.0), axis=1)
    if not HAS_LABELS:
        pos = tl.load(pos_ptr + rows - row_start, mask=rmask, other=0.0)
        cnt = tl.load(cnt_ptr + rows - row_start, mask=rmask, other=0.0)
    log_sum = tl.log(run_top + run_sum)  # LSE − max
    loss = tl.where(cnt > 0, (run_max - pos / tl.maximum(cnt, 1.0)) + log_sum, 0.0)
    out = rows - row_start
    tl.store(loss_ptr + out, loss, mask=rmask)
    tl.store(count_ptr + out, cnt, mask=rmask)
    tl.store(lse_ptr + out, run_max, mask=rmask)  # lse is (2, B): max, then log Σ exp(x − max)
    tl.store(lse_ptr + (row_end - row_start) + out, log_sum, mask=rmask)


@triton.jit
def _backward_tiles_kernel(z_ptr, norm_ptr, labels_ptr, w_ptr, max_ptr, log_ptr, invc_ptr, dzh_ptr,
                           M, K, row_start, row_end, stride_m, stride_k, inv_tau_ptr,
                           HAS_LABELS: tl.constexpr, EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_KO: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                           PREC: tl.constexpr, DOT_D: tl.constexpr, PREC_D: tl.constexpr):
    """dẑ (dense part) for one block of rows: Σ_j D_kj ẑ_j over the needed column tiles."""
    inv_tau = tl.load(inv_tau_ptr)
    r0 = tl.program_id(0) * BLOCK_M
    ko = tl.program_id(1) * BLOCK_KO
    rows = r0 + tl.arange(0, BLOCK_M)
    rmask = rows < M
    inv_r = 1.0 / tl.maximum(tl.load(norm_ptr + rows, mask=rmask, other=1.0), EPS)
    w_r = tl.load(w_ptr + rows, mask=rmask, other=0.0)
    max_r = tl.load(max_ptr + rows, mask=rmask, other=float("inf"))
    log_r = tl.load(log_ptr + rows, mask=rmask, other=0.0)
    invc_r = tl.load(invc_ptr + rows, mask=rmask, other=0.0)
    if HAS_LABELS:
        lab_r = tl.load(labels_ptr + rows, mask=rmask, other=0)
    # Rows outside the window have no anchor term: only the window's columns matter.
    has_anchor = (r0 < row_end) & (r0 + BLOCK_M > row_start)
    c_begin = tl.where(has_anchor, 0, row_start)
    c_end = tl.where(has_anchor, M, row_end)
    c_begin = (c_begin // BLOCK_N) * BLOCK_N
    kos = ko + tl.arange(0, BLOCK_KO)
    komask = kos < K
    dacc = tl.zeros((BLOCK_M, BLOCK_KO), dtype=ACC)
    for c0 in range(c_begin, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < c_end
        inv_c = 1.0 / tl.maximum(tl.load(norm_ptr + cols, mask=cmask, other=1.0), EPS)
        w_c = tl.load(w_ptr + cols, mask=cmask, other=0.0)
        max_c = tl.load(max_ptr + cols, mask=cmask, other=float("inf"))
        log_c = tl.load(log_ptr + cols, mask=cmask, other=0.0)
        s = _sim_tile(z_ptr, rows, rmask, cols, cmask, K, stride_m, stride_k, BLOCK_M, BLOCK_N, BLOCK_K, ACC, DOT, PREC)
        x = s * inv_r[:, None] * inv_c[None, :] * inv_tau
        p_r = tl.exp((x - max_r[:, None]) - log_r[:, None])  # p_rc, from the split LSE
        p_c = tl.exp((x - max_c[None, :]) - log_c[None, :])  # p_cr
        if HAS_LABELS:  # p − G/|P| formed before scaling: exact for a dominant positive
            lab_c = tl.load(labels_ptr + cols, mask=cmask, other=0)
            invc_c = tl.load(invc_ptr + cols, mask=cmask, other=0.0)
            same = lab_r[:, None] == lab_c[None, :]
            p_r -= tl.where(same, invc_r[:, None], 0.0)
            p_c -= tl.where(same, invc_c[None, :], 0.0)
        d = w_r[:, None] * p_r + w_c[None, :] * p_c
        valid = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
        # fold 1/τ and the candidates' inverse norms into D, then D·z_C (raw rows)
        d = tl.where(valid, d * inv_tau * inv_c[None, :], 0.0)
        zc = tl.load(z_ptr + cols.to(tl.int64)[:, None] * stride_m + kos[None, :] * stride_k,
                     mask=cmask[:, None] & komask[None, :], other=0.0).to(DOT_D)
        dacc += tl.dot(d.to(DOT_D), zc, input_precision=PREC_D, out_dtype=ACC)
    tl.store(dzh_ptr + rows.to(tl.int64)[:, None] * K + kos[None, :], dacc, mask=rmask[:, None] & komask[None, :])


@triton.jit
def _backward_rows_kernel(z_ptr, norm_ptr, dzh_ptr, crow_ptr, col_ptr, w_ptr, invc_ptr, dz_ptr,
                          K, stride_m, stride_k, dz_stride_m, inv_tau_ptr,
                          HAS_PAIRS: tl.constexpr, EPS: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Per row: dẑ += the CSR positives' part, then dz = (dẑ − ẑ⟨ẑ, dẑ⟩) / ‖z‖."""
    inv_tau = tl.load(inv_tau_ptr)
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    nrm = tl.load(norm_ptr + row)
    inv = 1.0 / tl.maximum(nrm, EPS)
    zh = tl.load(z_ptr + row * stride_m + ks * stride_k, mask=kmask, other=0.0).to(ACC) * inv
    g = tl.load(dzh_ptr + row * K + ks, mask=kmask, other=0.0)
    if HAS_PAIRS:
        own = tl.load(w_ptr + row) * tl.load(invc_ptr + row)
        start = tl.load(crow_ptr + row)
        end = tl.load(crow_ptr + row + 1)
        for e in range(start, end):
            j = tl.load(col_ptr + e)
            live = j >= 0
            jj = tl.maximum(j, 0).to(tl.int64)
            coef = -(own + tl.load(w_ptr + jj) * tl.load(invc_ptr + jj)) * inv_tau
            coef = tl.where(live, coef, 0.0)
            inv_j = 1.0 / tl.maximum(tl.load(norm_ptr + jj), EPS)
            zj = tl.load(z_ptr + jj * stride_m + ks * stride_k, mask=kmask & live, other=0.0).to(ACC)
            g += (coef * inv_j) * zj
    proj = tl.sum(zh * g, axis=0)
    clamped = nrm < EPS
    out = tl.where(clamped, g * inv, (g - zh * proj) * inv)
    tl.store(dz_ptr + row * dz_stride_m + ks, out.to(dz_ptr.dtype.element_ty), mask=kmask)


# ----------------------------------------------------------------------------- launchers


def _row_norms(z, acc):
    m, k = z.shape
    norm = torch.empty(m, dtype=acc, device=z.device)
    if m:
        bk = min(1024, max(16, triton.next_power_of_2(k)))
        _row_norm_kernel[(m,)](z, norm, k, z.stride(0), z.stride(1), BLOCK_K=bk, ACC=_tl_dtype(acc))
    return norm


def _tl_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _dot_dtype(dtype):
    """(operand dtype, input_precision) of the similarity tiles: the input's own (tensor cores
    for fp16/bf16, exact products of the raw rows), fp32 in IEEE (never TF32), fp64."""
    # 2026-11-22: the interpreter multiplies the raw bit patterns of bfloat16 tl.dot operands
    # (https://github.com/triton-lang/triton/issues/11584), so under TRITON_INTERPRET=1 bf16
    # products are fed as fp32; the GPU lane covers the bf16 dot.
    if dtype == torch.bfloat16 and _backend.interpreting_triton():
        return tl.float32, "ieee"
    return _TL[dtype], "ieee"


def _dot_d_dtype(dtype):
    """(operand dtype, input_precision) of the backward's D·Z product.

    D's entries a·p/(τ‖z_c‖) are about 1/N² at batch size N (1e-8 at N = 8192): in fp16 they
    flush to zero (smallest subnormal 6e-8), so fp16 inputs multiply in fp32 storage with TF32
    inputs (fp16's own 10-bit mantissa, fp32's range; fp16 z converts exactly). bf16 has fp32's
    range and keeps its own tensor-core dot.
    """
    if dtype == torch.float16:
        return tl.float32, "tf32"
    return _dot_dtype(dtype)


def info_nce_forward(z, labels, crow, col, temperature, row_start, row_end):
    """(loss_rows, pos_count, lse) for anchors [row_start, row_end); see the module docstring."""
    m, k = z.shape
    b = row_end - row_start
    acc = _acc_dtype(z.dtype)
    loss = torch.empty(b, dtype=acc, device=z.device)
    count = torch.empty(b, dtype=acc, device=z.device)
    lse = torch.empty((2, b), dtype=acc, device=z.device)  # row max, log Σ exp(x − max)
    if b == 0:
        return loss, count, lse
    norm = _row_norms(z, acc)
    inv_tau = torch.full((1,), 1.0 / temperature, dtype=acc, device=z.device)
    bm, bn, bk, _, warps, stages = _tiles("forward", z.dtype, k, _rows_aligned(z))
    dot, prec = _dot_dtype(z.dtype)
    if labels is None:
        pos = torch.empty(b, dtype=acc, device=z.device)
        cnt = torch.empty(b, dtype=acc, device=z.device)
        bkp = min(256, max(16, triton.next_power_of_2(k)))
        _pairs_positive_kernel[(b,)](z, norm, crow, col, pos, cnt, row_start, k, z.stride(0), z.stride(1), inv_tau,
                                     EPS=_NORM_EPS, BLOCK_K=bkp, ACC=_tl_dtype(acc))
        lab = norm  # unused pointer
    else:
        pos = cnt = loss  # unused pointers
        lab = labels
    _forward_kernel[(triton.cdiv(b, bm),)](
        z, norm, lab, pos, cnt, loss, count, lse, m, k, row_start, row_end, z.stride(0), z.stride(1), inv_tau,
        HAS_LABELS=labels is not None, EPS=_NORM_EPS, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ACC=_tl_dtype(acc),
        DOT=dot, PREC=prec, num_warps=warps, num_stages=stages)
    return loss, count, lse


def info_nce_backward(grad_rows, z, labels, crow, col, pos_count, lse, temperature, row_start, row_end):
    """dL/dz for all M rows from the gradient of loss_rows; see the module docstring."""
    m, k = z.shape
    acc = _acc_dtype(z.dtype)
    dz = torch.empty((m, k), dtype=z.dtype, device=z.device)
    if m == 0:
        return dz
    norm = _row_norms(z, acc)
    # Per-row (M,) weights: a_k = g_k·[|P(k)| > 0] in the window, else 0; the split LSE (max
    # +inf and log 0 where a_k is 0, so that exp vanishes); 1/|P(k)|.
    has = pos_count > 0
    g = grad_rows.to(acc)
    w = torch.zeros(m, dtype=acc, device=z.device)
    max_w = torch.full((m,), float("inf"), dtype=acc, device=z.device)
    log_w = torch.zeros(m, dtype=acc, device=z.device)
    invc = torch.zeros(m, dtype=acc, device=z.device)
    w[row_start:row_end] = torch.where(has, g, torch.zeros_like(g))
    max_w[row_start:row_end] = torch.where(has, lse[0].to(acc), torch.full_like(g, float("inf")))
    log_w[row_start:row_end] = torch.where(has, lse[1].to(acc), torch.zeros_like(g))
    invc[row_start:row_end] = torch.where(has, 1.0 / pos_count.to(acc).clamp(min=1), torch.zeros_like(g))
    inv_tau = torch.full((1,), 1.0 / temperature, dtype=acc, device=z.device)
    # dẑ slice per program: (BLOCK_M × BLOCK_KO) accumulators; wider K takes more programs
    # along the grid's second axis (each recomputes its similarity tiles).
    bm, bn, bk, bko, warps, stages = _tiles("backward", z.dtype, k, _rows_aligned(z))
    dot, prec = _dot_dtype(z.dtype)
    dot_d, prec_d = _dot_d_dtype(z.dtype)
    dzh = torch.empty((m, k), dtype=acc, device=z.device)
    lab = labels if labels is not None else norm
    _backward_tiles_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bko))](
        z, norm, lab, w, max_w, log_w, invc, dzh, m, k, row_start, row_end, z.stride(0), z.stride(1), inv_tau,
        HAS_LABELS=labels is not None, EPS=_NORM_EPS, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_KO=bko,
        ACC=_tl_dtype(acc), DOT=dot, PREC=prec, DOT_D=dot_d, PREC_D=prec_d, num_warps=warps, num_stages=stages)
    pairs = labels is None
    _backward_rows_kernel[(m,)](
        z, norm, dzh, crow if pairs else norm, col if pairs else norm, w, invc, dz, k, z.stride(0), z.stride(1),
        dz.stride(0), inv_tau, HAS_PAIRS=pairs, EPS=_NORM_EPS, BLOCK_K=max(16, triton.next_power_of_2(k)),
        ACC=_tl_dtype(acc))
    return dz
