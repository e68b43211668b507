r"""The blockwise contrastive pass in Triton (InfoNCE/SupCon, queues, DCL, CLIP, SigLIP): never N×N.

Math (conventions §3, §3b; the op contract in ``sslops/ops/infonce.py``). Anchors are the
window rows [row_start, row_end) of a matrix X, candidates the rows of C: in the square form
C = [X; negatives] (the in-batch block first, NB = rows of X, an anchor never its own
candidate), in the two-set form C = Y (CLIP's second direction is a second launch with the
roles swapped). With x̂ = x / max(‖x‖, 1e-12) (or x as given, NORMALIZE off), s_ij = ⟨x̂_i, ĉ_j⟩,
scale t and bias b (0-d tensors, read from memory: learnable), per anchor row the forward
writes::

    softmax   diff = [lse_i, Σ_P s, Σ_P s·e^{s/σ}]      aux = [|P(i)|, Σ_D p·s, Σ_P e^{s/σ}, lo_i]
              lse_i = log Σ_{j∈D(i)} e^{t·s_ij}          online: running max, sum and Σ e·s
              lo_i = (m_i + log Σ e^{t·s − m_i}) − lse_i exactly (TwoSum): lse's rounding residual
              D(i) = in-batch j ≠ i with [j∈P(i)] ? KEEP_POS : KEEP_NEG, and every negative
    sigmoid   diff = [Σ_j softplus(−y x), 0, 0]          aux = [|P(i)|, Σ_j h s, Σ_j h, 0]
              x = t·s + b, y = ±1, h = −y·σ(−y x)

The similarity tile is one tensor-core product of the raw rows, scaled afterwards by the two
inverse norms (the normalisation is fused: no normalised copy exists). G is ``labels`` (label
tiles compared inside the loop) or a symmetric CSR (columns sorted per row; an entry equal
to its predecessor or to its row is skipped) whose positives a sparse kernel sums in
O(nnz·K); where the denominator depends on membership (decoupled, no in-batch negatives)
each row walks its sorted CSR entries along with the column tiles (three vectors of state).

Gradient. From the gradients (a, gp, gq) of (lse, Σ_P s, Σ_P s·e^{s/σ}) per row (of the
softplus sum for SigLIP), the gradient of s_ij from anchor i is
C_ij = [j∈D(i)]·a_i·t·e^{(t s_ij − lse_i) − lo_i} + [j∈P(i)]·(gp_i + gq_i e^{s_ij/σ})  (SigLIP: a_i·t·h_ij),
and each row r of one set collects both directions' terms against the columns of the other,
dx̂_r = Σ_j (C_rj + C_jr) ĉ_j: one program per block of rows (and slice of K) recomputes the
tiles, forms that D and adds D·Ĉ, so every row is written by one program in a fixed order:
bit-identical reruns, no atomics. Rows whose coefficients are all zero (outside their set's
window) visit only the other set's window. A final per-row kernel adds the CSR positives'
terms and applies the normalisation backward. The residual lo_i keeps the softmax weights as
accurate as naive fp32's: lse_i ≈ 1/τ rounded alone would perturb every weight by its ulp
(1e-6 at τ = 0.07), which a dominant positive's p − 1 magnifies; t·s − lse_i is exact near the
row maximum. The gradients of t and b come from the forward's
per-row statistics (sslops/ops/infonce.py), not from these kernels.

Precision: the similarity tiles multiply the raw input rows (exact products for fp16/bf16 on
the tensor cores, IEEE fp32 for fp32, fp64) and accumulate in fp32 (fp64). The backward's D·C
product feeds D in the input dtype, except for fp16, whose D entries (≈ 1/N² at batch size N)
would flush to zero: it multiplies in fp32 storage with TF32 inputs (fp16's 10-bit mantissa).
softplus and σ use e^{−|v|} only (finite for any logit, any dtype), log1p(u) = log(w) −
(w − 1 − u)/w with w = 1 + u (accurate for tiny u).

Saved by the forward: diff (B, 3) and aux (B, 4), fp32 (fp64 for fp64); norms are recomputed
(one read). Extra memory: norms, the (rows, K) fp32 dx̂ buffer of the backward, C = [X; Q]
concatenated once in the input dtype when there are negatives; nothing quadratic.

FLOPs: forward 2·B·C·K (+ B·C exp, two more transcendentals per pair for SigLIP); backward
per pass (2 + 2·⌈K/BLOCK_KO⌉)·rows·columns·K (+ 2 exp per pair and K slice): every program
along K recomputes its similarity tiles (blocks in _tiles). Bytes: forward reads C once per
anchor block (L2-resident tiles); backward likewise per row block, plus 2·rows·K·4 for dx̂.
"""

import torch
import triton
import triton.language as tl

from sslops import _backend

_NORM_EPS = 1e-12
# flags of the custom ops (sslops/ops/infonce.py)
_SIGMOID, _NO_INBATCH, _DECOUPLED, _WEIGHTED, _NO_NORMALIZE, _BIDIR = 1, 2, 4, 8, 16, 32


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_aligned(*ts):
    """Whether every row of each tensor starts 16 elements apart with unit column stride.

    Triton then specialises the row stride as divisible by 16 and the loads of a tile become
    vector loads that the pipeliner copies asynchronously into shared memory (num_stages
    buffers). Otherwise (an odd K, a strided view) every element is its own masked scalar
    load with its own 64-bit address: no asynchronous copies, one shared-memory buffer, and
    far more registers at the same tile. The launch configuration depends on it.
    """
    return all(t.stride(1) == 1 and t.stride(0) % 16 == 0 for t in ts)


def _tiles(kernel, dtype, k, aligned, member=False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_KO, num_warps, num_stages) of ``kernel`` ("forward" or "backward").

    BLOCK_M × BLOCK_N is the similarity tile, BLOCK_K the K chunk of its product loop,
    BLOCK_KO the dx̂ columns one backward program owns (unused by the forward). Both K
    blocks are capped at K's next power of two (at least 16): a narrow K gets no padding.

    Chosen 2026-11-22 from ``ptxas -v`` for sm_90 (tests/test_triton_sm90.py, no GPU here),
    under triton 3.6.0 (the GPU machine's) and 3.8.0, at an aligned shape (M = 1024,
    K = 256) and an odd wide one (M = 520, K = 1000, rows not 16-aligned), for the square
    InfoNCE kernels; rechecked under 3.8.0 for the generalised kernels of the contrastive family (the
    extra per-row accumulators, the two-set, sigmoid, decoupled and CSR-membership
    variants): no fp32/bf16/fp16 configuration spills (test_triton_sm90.py asserts it).
    None of this has been timed on a GPU: the choice is "largest tile that fits the
    register file without local memory", not a measured optimum.

    * bf16/fp16 (tensor cores): 64×64 tiles, 8 warps, 3 stages; only the K chunks shrink
      where registers run out. forward BLOCK_K 64 aligned, 32 unaligned; backward BLOCK_K 64,
      BLOCK_KO 128 aligned, BLOCK_K 16, BLOCK_KO 64 unaligned.
    * fp32 (IEEE FMA dot, never TF32: the tiles are the logits): forward 64×64, BLOCK_K 64,
      8 warps, 3 stages aligned, BLOCK_K 16 and 1 stage unaligned; backward 32×64, BLOCK_K
      32, BLOCK_KO 128, 8 warps, 2 stages.
    * fp64 (the reference dtype: correctness first, FP64 FMA): forward 32×64, BLOCK_K 16,
      8 warps, 1 stage; backward 32×32, BLOCK_K 16, BLOCK_KO 64, 4 warps, 2 stages.
    * ``member`` (a CSR relation whose membership shapes the denominator: DCL, no in-batch
      negatives): the fp32 forward and backward walk 32 columns at a time (their 64-column
      tiles spilled).

    With unaligned rows (:func:`_rows_aligned`) the 2-byte dtypes get a single shared-memory
    buffer whatever num_stages says (no asynchronous copies below 4 bytes), so a smaller
    BLOCK_K gives up no prefetching there; fp32/fp64 still pipeline.
    """
    kcap = max(16, triton.next_power_of_2(k))
    bm, bn, bk, bko, warps, stages = _tiles_wide(kernel, dtype, aligned)
    if member and dtype == torch.float32 and not _backend.interpreting_triton():
        # the CSR walk's state next to the fp32 dx̂ block: 64 columns spilled ~300 B (255 regs), 32 fit (207);
        # the forward's (with the split sum of issue 12.3) spilled 28 B at 64
        bn = 32
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
def _inv_norm(norm_ptr, idx, mask, NORMALIZE: tl.constexpr, EPS: tl.constexpr):
    """1 / max(‖row‖, eps) for a block of rows ``idx`` (1 where the normalisation is off)."""
    nrm = tl.load(norm_ptr + idx, mask=mask, other=1.0)
    if NORMALIZE:
        inv = 1.0 / tl.maximum(nrm, EPS)
    else:
        inv = nrm * 0.0 + 1.0  # ones in the norms' dtype (one return type for both branches)
    return inv


@triton.jit
def _inv_norm1(norm_ptr, i, NORMALIZE: tl.constexpr, EPS: tl.constexpr):
    """:func:`_inv_norm` for one row."""
    nrm = tl.load(norm_ptr + i)
    if NORMALIZE:
        inv = 1.0 / tl.maximum(nrm, EPS)
    else:
        inv = nrm * 0.0 + 1.0
    return inv


@triton.jit
def _relation_masks(rows, cols, valid, inb, lab_r, lab_c, member, SELF: tl.constexpr, HAS_LABELS: tl.constexpr,
                    MEMBER: tl.constexpr, KEEP_POS: tl.constexpr, KEEP_NEG: tl.constexpr):
    """(g, den) of a softmax tile: in-batch positives (self excluded; False where the relation is not
    needed: a CSR's positives are summed sparsely) and the denominator mask D(i) (negatives'
    columns always in). ``member``: the CSR membership of the tile (MEMBER)."""
    ok = valid
    if SELF:
        ok = ok & (rows[:, None] != cols[None, :])
    if HAS_LABELS:
        g = ok & inb & (lab_r[:, None] == lab_c[None, :])
    elif MEMBER:
        g = ok & inb & member
    else:
        g = ok & (cols[None, :] < 0)
    if KEEP_POS and KEEP_NEG:
        keep = ok
    elif KEEP_POS:
        keep = g
    elif KEEP_NEG:
        keep = ok & ~g
    else:
        keep = ok & (cols[None, :] < 0)
    den = tl.where(inb, keep, ok)
    return g, den


@triton.jit
def _sim_tile(a_ptr, b_ptr, rows, rmask, cols, cmask, K, stride_am, stride_ak, stride_bm, stride_bk,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
              DOT: tl.constexpr, PREC: tl.constexpr):
    """⟨a_r, b_c⟩ for a (BLOCK_M, BLOCK_N) tile of raw rows of two matrices, accumulated in ACC."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    r_off = rows.to(tl.int64) * stride_am
    c_off = cols.to(tl.int64) * stride_bm
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(a_ptr + r_off[:, None] + ks[None, :] * stride_ak, mask=rmask[:, None] & kmask[None, :], other=0.0).to(DOT)
        b = tl.load(b_ptr + c_off[:, None] + ks[None, :] * stride_bk, mask=cmask[:, None] & kmask[None, :], other=0.0).to(DOT)
        acc += tl.dot(a, tl.trans(b), input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _csr_walk(col_ptr, ptr, end, cols, c_hi):
    """Which columns of this tile are CSR entries of each row, advancing each row's position.

    ``ptr``/``end`` (BLOCK_M,) walk every row's sorted CSR entries as the column tiles move
    left to right: the entries below ``c_hi`` are consumed here (those below the tile too,
    which match nothing), so a row's entries are read once over the whole loop, and the
    state is three vectors, not a (BLOCK_M, BLOCK_N) search.
    """
    g = (ptr[:, None] < 0) & (cols[None, :] < 0)  # all False
    cur = tl.load(col_ptr + ptr, mask=ptr < end, other=c_hi)
    inside = (ptr < end) & (cur < c_hi)
    while tl.max(inside.to(tl.int32), axis=0) > 0:
        g = g | (inside[:, None] & (cur[:, None] == cols[None, :]))
        ptr = ptr + inside.to(ptr.dtype)
        cur = tl.load(col_ptr + ptr, mask=ptr < end, other=c_hi)
        inside = (ptr < end) & (cur < c_hi)
    return g, ptr


@triton.jit
def _log1p(u):
    """log(1 + u) for u ≥ 0, accurate for tiny u: log(w) − (w − 1 − u)/w with w = 1 + u."""
    w = 1.0 + u
    return tl.log(w) - ((w - 1.0) - u) / w


@triton.jit
def _pairs_positive_kernel(x_ptr, c_ptr, normx_ptr, normc_ptr, crow_ptr, col_ptr, out_ptr, row_start, K,
                           stride_xm, stride_xk, stride_cm, stride_ck, inv_sigma, NORMALIZE: tl.constexpr,
                           WEIGHTED: tl.constexpr, EPS: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """For one anchor i from the CSR: Σ_{j∈P(i)} s_ij, |P(i)| and (WEIGHTED) Σ s·e^{s/σ}, Σ e^{s/σ}, O(|P(i)|·K)."""
    i = (row_start + tl.program_id(0)).to(tl.int64)
    inv_i = _inv_norm1(normx_ptr, i, NORMALIZE, EPS)
    start = tl.load(crow_ptr + i)
    end = tl.load(crow_ptr + i + 1)
    pos = tl.sum(tl.zeros((BLOCK_K,), dtype=ACC), axis=0)
    cnt = pos
    pse = pos
    pe = pos
    prev = start * 0 - 1
    for e in range(start, end):
        j = tl.load(col_ptr + e)
        live = (j != i) & (j != prev)
        prev = j
        dotv = tl.zeros((BLOCK_K,), dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = (ks < K) & live
            a = tl.load(x_ptr + i * stride_xm + ks * stride_xk, mask=kmask, other=0.0).to(ACC)
            b = tl.load(c_ptr + j * stride_cm + ks * stride_ck, mask=kmask, other=0.0).to(ACC)
            dotv += a * b
        s = tl.sum(dotv, axis=0) * inv_i * _inv_norm1(normc_ptr, j, NORMALIZE, EPS)
        pos += tl.where(live, s, 0.0)
        cnt += tl.where(live, 1.0, 0.0)
        if WEIGHTED:
            w = tl.exp(s * inv_sigma)
            pse += tl.where(live, s * w, 0.0)
            pe += tl.where(live, w, 0.0)
    out = out_ptr + tl.program_id(0) * 4
    tl.store(out, pos)
    tl.store(out + 1, cnt)
    tl.store(out + 2, pse)
    tl.store(out + 3, pe)


@triton.jit
def _forward_kernel(x_ptr, c_ptr, normx_ptr, normc_ptr, labx_ptr, labc_ptr, crow_ptr, col_ptr, sparse_ptr, diff_ptr, aux_ptr,
                    NC, NB, K, row_start, row_end, stride_xm, stride_xk, stride_cm, stride_ck, scale_ptr, bias_ptr,
                    inv_sigma,
                    SIGMOID: tl.constexpr, SELF: tl.constexpr, HAS_LABELS: tl.constexpr, MEMBER: tl.constexpr,
                    KEEP_POS: tl.constexpr, KEEP_NEG: tl.constexpr, WEIGHTED: tl.constexpr, NORMALIZE: tl.constexpr,
                    EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    t = tl.load(scale_ptr).to(ACC)
    rows = row_start + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    inv_r = _inv_norm(normx_ptr, rows, rmask, NORMALIZE, EPS)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    run_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    run_ms = tl.zeros((BLOCK_M,), dtype=ACC)
    pos = tl.zeros((BLOCK_M,), dtype=ACC)
    cnt = tl.zeros((BLOCK_M,), dtype=ACC)
    pse = tl.zeros((BLOCK_M,), dtype=ACC)
    pe = tl.zeros((BLOCK_M,), dtype=ACC)
    if SIGMOID:
        b = tl.load(bias_ptr).to(ACC)
    if HAS_LABELS:
        lab_r = tl.load(labx_ptr + rows, mask=rmask, other=0)
    if MEMBER:
        walk = tl.load(crow_ptr + rows, mask=rmask, other=0)
        walk_end = tl.load(crow_ptr + rows + 1, mask=rmask, other=0)
    for c0 in range(0, NC, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < NC
        inv_c = _inv_norm(normc_ptr, cols, cmask, NORMALIZE, EPS)
        if MEMBER:
            member, walk = _csr_walk(col_ptr, walk, walk_end, cols, c0 + BLOCK_N)
        else:
            member = cmask[None, :]
        s = _sim_tile(x_ptr, c_ptr, rows, rmask, cols, cmask, K, stride_xm, stride_xk, stride_cm, stride_ck,
                      BLOCK_M, BLOCK_N, BLOCK_K, ACC, DOT, PREC)
        s = s * (inv_r[:, None] * inv_c[None, :])  # one rounding order for s_ij and s_ji
        valid = rmask[:, None] & cmask[None, :]
        if HAS_LABELS:
            lab_c = tl.load(labc_ptr + cols, mask=cols < NB, other=0)
        if SIGMOID:
            g = valid & (lab_r[:, None] == lab_c[None, :])
            xv = s * t + b
            v = tl.where(g, -xv, xv)
            u = tl.exp(-tl.abs(v))
            sig = tl.where(v >= 0, 1.0, u) / (1.0 + u)
            h = tl.where(g, -sig, sig)
            pos += tl.sum(tl.where(valid, tl.maximum(v, 0.0) + _log1p(u), 0.0), axis=1)
            run_ms += tl.sum(tl.where(valid, h * s, 0.0), axis=1)
            run_sum += tl.sum(tl.where(valid, h, 0.0), axis=1)
            cnt += tl.sum(tl.where(g, 1.0, 0.0), axis=1)
        else:
            inb = (cols[None, :] < NB) & valid
            g, den = _relation_masks(rows, cols, valid, inb, lab_r if HAS_LABELS else rows, lab_c if HAS_LABELS else cols,
                                     member, SELF, HAS_LABELS, MEMBER, KEEP_POS, KEEP_NEG)
            xm = tl.where(den, s * t, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(xm, axis=1))
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            e = tl.exp(xm - safe[:, None])
            f = tl.exp(run_max - safe)
            # run_sum leaves out one term at the row maximum (exactly 1), added after the others'
            # sum: one rounding near 1 instead of one per later small term. Ties beyond that one
            # are exact small integers added to the tile's part (n_top − [the maximum grew here]).
            top = xm == safe[:, None]
            grew = new_max > run_max
            part = tl.sum(tl.where(top, 0.0, e), axis=1) + (tl.sum(top.to(ACC), axis=1) - grew.to(ACC))
            run_sum = tl.where(grew, (run_sum + 1.0) * f, run_sum) + part
            run_ms = run_ms * f + tl.sum(e * tl.where(den, s, 0.0), axis=1)
            run_max = new_max
            if HAS_LABELS:
                pos += tl.sum(tl.where(g, s, 0.0), axis=1)
                cnt += tl.sum(tl.where(g, 1.0, 0.0), axis=1)
                if WEIGHTED:
                    w = tl.exp(s * inv_sigma)
                    pse += tl.sum(tl.where(g, s * w, 0.0), axis=1)
                    pe += tl.sum(tl.where(g, w, 0.0), axis=1)
    out = (rows - row_start).to(tl.int64) * 3
    out_a = (rows - row_start).to(tl.int64) * 4
    if SIGMOID:
        tl.store(diff_ptr + out, pos, mask=rmask)
        tl.store(diff_ptr + out + 1, tl.zeros_like(pos), mask=rmask)
        tl.store(diff_ptr + out + 2, tl.zeros_like(pos), mask=rmask)
        tl.store(aux_ptr + out_a, cnt, mask=rmask)
        tl.store(aux_ptr + out_a + 1, run_ms, mask=rmask)
        tl.store(aux_ptr + out_a + 2, run_sum, mask=rmask)
        tl.store(aux_ptr + out_a + 3, tl.zeros_like(pos), mask=rmask)
    else:
        if not HAS_LABELS:
            sp = sparse_ptr + (rows - row_start).to(tl.int64) * 4
            pos = tl.load(sp, mask=rmask, other=0.0)
            cnt = tl.load(sp + 1, mask=rmask, other=0.0)
            pse = tl.load(sp + 2, mask=rmask, other=0.0)
            pe = tl.load(sp + 3, mask=rmask, other=0.0)
        run_sum = run_sum + tl.where(run_max > float("-inf"), 1.0, 0.0)  # the maximum's own term, last
        log_sum = tl.log(run_sum)
        lse = run_max + log_sum
        v = lse - run_max  # TwoSum: run_max + log_sum = lse + lo exactly
        lo = (run_max - (lse - v)) + (log_sum - v)
        lo = tl.where(lse - lse == 0, lo, 0.0)  # 0 where lse is not finite
        ms = tl.where(run_sum > 0, run_ms / tl.where(run_sum > 0, run_sum, 1.0), 0.0)
        ms = tl.where(run_sum != run_sum, run_sum, ms)  # NaN stays NaN
        tl.store(diff_ptr + out, lse, mask=rmask)
        tl.store(diff_ptr + out + 1, pos, mask=rmask)
        tl.store(diff_ptr + out + 2, pse, mask=rmask)
        tl.store(aux_ptr + out_a, cnt, mask=rmask)
        tl.store(aux_ptr + out_a + 1, ms, mask=rmask)
        tl.store(aux_ptr + out_a + 2, pe, mask=rmask)
        tl.store(aux_ptr + out_a + 3, lo, mask=rmask)


@triton.jit
def _backward_tiles_kernel(r_ptr, c_ptr, normr_ptr, normc_ptr, labr_ptr, labc_ptr, crow_ptr, col_ptr, coefr_ptr, coefc_ptr,
                           dzh_ptr, NR, NC, NB_C, K, rw0, rw1, cw0, cw1, stride_rm, stride_rk, stride_cm, stride_ck,
                           scale_ptr, bias_ptr, inv_sigma,
                           SIGMOID: tl.constexpr, SELF: tl.constexpr, ROWS_EXTRA: tl.constexpr, HAS_LABELS: tl.constexpr,
                           MEMBER: tl.constexpr, KEEP_POS: tl.constexpr, KEEP_NEG: tl.constexpr, WEIGHTED: tl.constexpr,
                           NORMALIZE: tl.constexpr, EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_KO: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                           PREC: tl.constexpr, DOT_D: tl.constexpr, PREC_D: tl.constexpr):
    """dr̂ (dense part) for one block of rows: Σ_c D_rc ĉ_c over the needed column tiles.

    Coefficient arrays are (5, n): a, lse (+inf where a = 0), gp, gq, lo (lse's residual) per row of each set.
    """
    t = tl.load(scale_ptr).to(ACC)
    r0 = tl.program_id(0) * BLOCK_M
    ko = tl.program_id(1) * BLOCK_KO
    rows = r0 + tl.arange(0, BLOCK_M)
    rmask = rows < NR
    inv_r = _inv_norm(normr_ptr, rows, rmask, NORMALIZE, EPS)
    a_r = tl.load(coefr_ptr + rows, mask=rmask, other=0.0)
    if SIGMOID:
        b = tl.load(bias_ptr).to(ACC)
    else:
        lse_r = tl.load(coefr_ptr + NR + rows, mask=rmask, other=float("inf"))
        gp_r = tl.load(coefr_ptr + 2 * NR + rows, mask=rmask, other=0.0)
        gq_r = tl.load(coefr_ptr + 3 * NR + rows, mask=rmask, other=0.0)
        lo_r = tl.load(coefr_ptr + 4 * NR + rows, mask=rmask, other=0.0)
    if HAS_LABELS:
        lab_r = tl.load(labr_ptr + rows, mask=rmask, other=0)
    if MEMBER:
        walk = tl.load(crow_ptr + rows, mask=rmask, other=0)
        walk_end = tl.load(crow_ptr + rows + 1, mask=rmask, other=0)
    # Rows outside their window have zero coefficients: only the other set's window matters.
    has_anchor = (r0 < rw1) & (r0 + BLOCK_M > rw0)
    c_begin = tl.where(has_anchor, 0, cw0)
    c_end = tl.where(has_anchor, NC, cw1)
    c_begin = (c_begin // BLOCK_N) * BLOCK_N
    kos = ko + tl.arange(0, BLOCK_KO)
    komask = kos < K
    dacc = tl.zeros((BLOCK_M, BLOCK_KO), dtype=ACC)
    for c0 in range(c_begin, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < c_end
        inv_c = _inv_norm(normc_ptr, cols, cmask, NORMALIZE, EPS)
        a_c = tl.load(coefc_ptr + cols, mask=cmask, other=0.0)
        if MEMBER:
            member, walk = _csr_walk(col_ptr, walk, walk_end, cols, c0 + BLOCK_N)
        else:
            member = cmask[None, :]
        s = _sim_tile(r_ptr, c_ptr, rows, rmask, cols, cmask, K, stride_rm, stride_rk, stride_cm, stride_ck,
                      BLOCK_M, BLOCK_N, BLOCK_K, ACC, DOT, PREC)
        s = s * (inv_r[:, None] * inv_c[None, :])  # one rounding order for s_ij and s_ji
        valid = rmask[:, None] & cmask[None, :]
        if HAS_LABELS:
            lab_c = tl.load(labc_ptr + cols, mask=cmask & (cols < NB_C), other=0)
        if SIGMOID:
            g = valid & (lab_r[:, None] == lab_c[None, :])
            xv = s * t + b
            v = tl.where(g, -xv, xv)
            u = tl.exp(-tl.abs(v))
            sig = tl.where(v >= 0, 1.0, u) / (1.0 + u)
            d = (a_r[:, None] + a_c[None, :]) * t * tl.where(g, -sig, sig)
            d = tl.where(valid, d, 0.0)
        else:
            lse_c = tl.load(coefc_ptr + NC + cols, mask=cmask, other=float("inf"))
            lo_c = tl.load(coefc_ptr + 4 * NC + cols, mask=cmask, other=0.0)
            if ROWS_EXTRA:  # the negatives' rows: no relation, always in the anchors' denominators
                inb = valid & (cols[None, :] < 0)
            else:
                inb = valid & (cols[None, :] < NB_C)
            g, den = _relation_masks(rows, cols, valid, inb, lab_r if HAS_LABELS else rows, lab_c if HAS_LABELS else cols,
                                     member, SELF, HAS_LABELS, MEMBER, KEEP_POS, KEEP_NEG)
            x = s * t
            soft = t * (a_r[:, None] * tl.exp((x - lse_r[:, None]) - lo_r[:, None])
                        + a_c[None, :] * tl.exp((x - lse_c[None, :]) - lo_c[None, :]))
            d = tl.where(den, soft, 0.0)  # a select: outside D(i) the exponent may overflow
            if HAS_LABELS:
                gp_c = tl.load(coefc_ptr + 2 * NC + cols, mask=cmask, other=0.0)
                gpair = gp_r[:, None] + gp_c[None, :]
                if WEIGHTED:
                    gq_c = tl.load(coefc_ptr + 3 * NC + cols, mask=cmask, other=0.0)
                    gpair += (gq_r[:, None] + gq_c[None, :]) * tl.exp(s * inv_sigma)
                d += tl.where(g, gpair, 0.0)
        # fold the columns' inverse norms into D, then D·C (raw rows)
        d = d * inv_c[None, :]
        cv = tl.load(c_ptr + cols.to(tl.int64)[:, None] * stride_cm + kos[None, :] * stride_ck,
                     mask=cmask[:, None] & komask[None, :], other=0.0).to(DOT_D)
        dacc += tl.dot(d.to(DOT_D), cv, input_precision=PREC_D, out_dtype=ACC)
    tl.store(dzh_ptr + rows.to(tl.int64)[:, None] * K + kos[None, :], dacc, mask=rmask[:, None] & komask[None, :])


@triton.jit
def _backward_rows_kernel(r_ptr, c_ptr, normr_ptr, normc_ptr, dzh_ptr, crow_ptr, col_ptr, coef_ptr, dz_ptr, NR, K,
                          stride_rm, stride_rk, stride_cm, stride_ck, dz_stride_m, inv_sigma,
                          HAS_PAIRS: tl.constexpr, WEIGHTED: tl.constexpr, NORMALIZE: tl.constexpr, EPS: tl.constexpr,
                          BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Per row: dr̂ += the CSR positives' part, then dr = (dr̂ − r̂⟨r̂, dr̂⟩) / ‖r‖ (dr̂ when not normalising)."""
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    inv = _inv_norm1(normr_ptr, row, NORMALIZE, EPS)
    zh = tl.load(r_ptr + row * stride_rm + ks * stride_rk, mask=kmask, other=0.0).to(ACC) * inv
    g = tl.load(dzh_ptr + row * K + ks, mask=kmask, other=0.0)
    if HAS_PAIRS:
        gp_r = tl.load(coef_ptr + 2 * NR + row)
        gq_r = tl.load(coef_ptr + 3 * NR + row)
        start = tl.load(crow_ptr + row)
        end = tl.load(crow_ptr + row + 1)
        prev = start * 0 - 1
        for e in range(start, end):
            j = tl.load(col_ptr + e)
            live = (j != row) & (j != prev)
            prev = j
            inv_j = _inv_norm1(normc_ptr, j, NORMALIZE, EPS)
            zj = tl.load(c_ptr + j * stride_cm + ks * stride_ck, mask=kmask & live, other=0.0).to(ACC) * inv_j
            coef = gp_r + tl.load(coef_ptr + 2 * NR + j)
            if WEIGHTED:
                coef += (gq_r + tl.load(coef_ptr + 3 * NR + j)) * tl.exp(tl.sum(zh * zj, axis=0) * inv_sigma)
            g += tl.where(live, coef, 0.0) * zj
    if NORMALIZE:
        proj = tl.sum(zh * g, axis=0)
        clamped = tl.load(normr_ptr + row) < EPS
        out = tl.where(clamped, g * inv, (g - zh * proj) * inv)
    else:
        out = g
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
    """(operand dtype, input_precision) of the backward's D·C product.

    D's entries a·p·t/‖c‖ are about 1/N² at batch size N (1e-8 at N = 8192): in fp16 they
    flush to zero (smallest subnormal 6e-8), so fp16 inputs multiply in fp32 storage with TF32
    inputs (fp16's own 10-bit mantissa, fp32's range; fp16 rows convert exactly). bf16 has
    fp32's range and keeps its own tensor-core dot.
    """
    if dtype == torch.float16:
        return tl.float32, "tf32"
    return _dot_dtype(dtype)


class _Call:
    """The inputs of one call, laid out for the kernels (mirrors ``Prepared`` in csrc/cpu/infonce.cpp)."""

    def __init__(self, x, y, negatives, labels_x, labels_y, crow, col, flags):
        self.square = y is None
        self.bidir = bool(flags & _BIDIR) and not self.square
        self.sigmoid = bool(flags & _SIGMOID)
        self.normalize = not (flags & _NO_NORMALIZE)
        self.weighted = bool(flags & _WEIGHTED)
        self.keep_pos = not (flags & _DECOUPLED)
        self.keep_neg = not (flags & _NO_INBATCH)
        self.acc = _acc_dtype(x.dtype)
        self.x, self.y, self.neg = x, y, negatives
        self.nq = 0 if negatives is None else negatives.shape[0]
        if self.square:
            self.c = x if not self.nq else torch.cat([x, negatives])
            self.nb = x.shape[0]
            self.labels_x = self.labels_c = labels_x
        else:
            self.c, self.nb = y, y.shape[0]
            self.labels_x, self.labels_c = labels_x, labels_y
        self.crow, self.col = crow, col
        self.member = (not self.sigmoid and labels_x is None and crow is not None and self.keep_pos != self.keep_neg)
        self.norm_x = _row_norms(x, self.acc)
        self.norm_c = self.norm_x if (self.square and not self.nq) else _row_norms(self.c, self.acc)
        self.inv_sigma = 1.0

    def constexprs(self):
        return dict(SIGMOID=self.sigmoid, HAS_LABELS=self.labels_x is not None, MEMBER=self.member,
                    KEEP_POS=self.keep_pos, KEEP_NEG=self.keep_neg, WEIGHTED=self.weighted, NORMALIZE=self.normalize,
                    EPS=_NORM_EPS)


def _forward_rows(call, x, norm_x, labels_x, c, norm_c, labels_c, nb, self_excl, scale, bias, rs, re, csr):
    """(diff, aux) for anchors [rs, re) of x against the rows of c."""
    b = re - rs
    acc = call.acc
    diff = torch.empty((b, 3), dtype=acc, device=x.device)
    aux = torch.empty((b, 4), dtype=acc, device=x.device)
    if b == 0:
        return diff, aux
    k = x.shape[1]
    bm, bn, bk, _, warps, stages = _tiles("forward", x.dtype, k, _rows_aligned(x, c), call.member)
    dot, prec = _dot_dtype(x.dtype)
    crow, col = csr if csr is not None else (None, None)
    sparse = diff  # unused pointer unless a CSR gives the positives
    if crow is not None and not call.sigmoid:
        sparse = torch.empty((b, 4), dtype=acc, device=x.device)
        bkp = min(256, max(16, triton.next_power_of_2(k)))
        _pairs_positive_kernel[(b,)](x, c, norm_x, norm_c, crow, col, sparse, rs, k, x.stride(0), x.stride(1), c.stride(0),
                                     c.stride(1), call.inv_sigma, NORMALIZE=call.normalize, WEIGHTED=call.weighted,
                                     EPS=_NORM_EPS, BLOCK_K=bkp, ACC=_tl_dtype(acc))
    lab_x = labels_x if labels_x is not None else norm_x
    lab_c = labels_c if labels_c is not None else norm_x
    _forward_kernel[(triton.cdiv(b, bm),)](
        x, c, norm_x, norm_c, lab_x, lab_c, crow if crow is not None else norm_x, col if col is not None else norm_x,
        sparse, diff, aux, c.shape[0], nb, k, rs, re, x.stride(0), x.stride(1), c.stride(0), c.stride(1), scale, bias,
        call.inv_sigma, SELF=self_excl, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ACC=_tl_dtype(acc), DOT=dot,
        PREC=prec, num_warps=warps, num_stages=stages, **call.constexprs())
    return diff, aux


def contrastive_forward(x, y, negatives, labels_x, labels_y, crow, col, scale, bias, x_start, x_end, y_start, y_end, flags,
                        sigma):
    """(diff_x, aux_x, diff_y, aux_y): the forward of ``sslops::contrastive_fwd`` (see the module docstring)."""
    call = _Call(x, y, negatives, labels_x, labels_y, crow, col, flags)
    call.inv_sigma = 1.0 / sigma
    scale = scale.to(call.acc).reshape(1)
    bias = bias.to(call.acc).reshape(1)
    csr = (crow, col) if crow is not None else None
    diff_x, aux_x = _forward_rows(call, x, call.norm_x, call.labels_x, call.c, call.norm_c, call.labels_c, call.nb,
                                  call.square, scale, bias, x_start, x_end, csr)
    if call.bidir:
        diff_y, aux_y = _forward_rows(call, y, call.norm_c, call.labels_c, x, call.norm_x, call.labels_x, x.shape[0], False,
                                      scale, bias, y_start, y_end, None)
    else:
        diff_y, aux_y = (torch.empty((0, c), dtype=call.acc, device=x.device) for c in (3, 4))
    return diff_x, aux_x, diff_y, aux_y


def _coefficients(grad, diff, aux, n, w0, w1, sigmoid, acc, device):
    """(5, n): a, lse (+inf where a = 0), gp, gq, lo (0 where a = 0) per row, zero outside the window [w0, w1)."""
    c = torch.zeros((5, n), dtype=acc, device=device)
    c[1].fill_(float("inf"))  # fill_, not a setitem of a Python number (a lift_fresh: a host tensor)
    if w1 > w0:
        g = grad.to(acc)
        a = g[:, 0]
        c[0, w0:w1] = a
        if not sigmoid:
            c[1, w0:w1] = torch.where(a != 0, diff[:, 0].to(acc), torch.full_like(a, float("inf")))
            c[2, w0:w1] = g[:, 1]
            c[3, w0:w1] = g[:, 2]
            c[4, w0:w1] = torch.where(a != 0, aux[:, 3].to(acc), 0.0)
    return c


def _backward_rows(call, r, norm_r, labels_r, coef_r, c, norm_c, labels_c, coef_c, nb_c, windows, self_excl, rows_extra,
                   scale, bias, csr, out):
    """dr (in r's dtype, into ``out``) from both directions' coefficients against the columns of c."""
    nr, k = r.shape
    if nr == 0:
        return
    acc = call.acc
    bm, bn, bk, bko, warps, stages = _tiles("backward", r.dtype, k, _rows_aligned(r, c), call.member and not rows_extra)
    dot, prec = _dot_dtype(r.dtype)
    dot_d, prec_d = _dot_d_dtype(r.dtype)
    dzh = torch.empty((nr, k), dtype=acc, device=r.device)
    rw0, rw1, cw0, cw1 = windows
    consts = call.constexprs()
    if rows_extra:
        consts.update(HAS_LABELS=False, MEMBER=False)
    lab_r = labels_r if consts["HAS_LABELS"] else norm_r
    lab_c = labels_c if consts["HAS_LABELS"] else norm_r
    crow, col = csr if csr is not None else (norm_r, norm_r)
    _backward_tiles_kernel[(triton.cdiv(nr, bm), triton.cdiv(k, bko))](
        r, c, norm_r, norm_c, lab_r, lab_c, crow, col, coef_r, coef_c, dzh, nr, c.shape[0], nb_c, k, rw0, rw1, cw0, cw1,
        r.stride(0), r.stride(1), c.stride(0), c.stride(1), scale, bias, call.inv_sigma, SELF=self_excl, ROWS_EXTRA=rows_extra, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_KO=bko, ACC=_tl_dtype(acc), DOT=dot,
        PREC=prec, DOT_D=dot_d, PREC_D=prec_d, num_warps=warps, num_stages=stages, **consts)
    pairs = csr is not None and not call.sigmoid
    _backward_rows_kernel[(nr,)](
        r, c, norm_r, norm_c, dzh, crow, col, coef_r, out, nr, k, r.stride(0), r.stride(1), c.stride(0), c.stride(1),
        out.stride(0), call.inv_sigma, HAS_PAIRS=pairs, WEIGHTED=call.weighted, NORMALIZE=call.normalize, EPS=_NORM_EPS,
        BLOCK_K=max(16, triton.next_power_of_2(k)), ACC=_tl_dtype(acc))


def contrastive_backward(grad_x, grad_y, x, y, negatives, labels_x, labels_y, crow, col, diff_x, diff_y, aux_x, aux_y,
                         scale, bias, x_start, x_end, y_start, y_end, flags, sigma, need_x, need_y, need_negatives):
    """(dx, dy, dnegatives): the backward of ``sslops::contrastive_bwd`` ((0, K) where not needed)."""
    call = _Call(x, y, negatives, labels_x, labels_y, crow, col, flags)
    call.inv_sigma = 1.0 / sigma
    acc, dev, k = call.acc, x.device, x.shape[1]
    scale = scale.to(acc).reshape(1)
    bias = bias.to(acc).reshape(1)
    nx = x.shape[0]
    dx = torch.empty((nx if need_x else 0, k), dtype=x.dtype, device=dev)
    dy = torch.empty((y.shape[0] if (need_y and y is not None) else 0, k), dtype=x.dtype, device=dev)
    dneg = torch.empty((call.nq if need_negatives else 0, k), dtype=x.dtype, device=dev)
    coef_x = _coefficients(grad_x, diff_x, aux_x, nx, x_start, x_end, call.sigmoid, acc, dev)
    if call.square:
        coef_c = torch.cat([coef_x, _coefficients(grad_x, diff_x, aux_x, call.nq, 0, 0, call.sigmoid, acc, dev)], dim=1)
        csr = (crow, col) if crow is not None else None
        if need_x:
            _backward_rows(call, x, call.norm_x, call.labels_x, coef_x, call.c, call.norm_c, call.labels_c, coef_c, nx,
                           (x_start, x_end, x_start, x_end), True, False, scale, bias, csr, dx)
        if need_negatives and call.nq:
            norm_q = call.norm_c[nx:]
            empty = _coefficients(grad_x, diff_x, aux_x, call.nq, 0, 0, call.sigmoid, acc, dev)
            _backward_rows(call, negatives, norm_q, None, empty, x, call.norm_x, None, coef_x, nx,
                           (0, 0, x_start, x_end), False, True, scale, bias, None, dneg)
        return dx, dy, dneg
    ny = y.shape[0]
    if call.bidir:
        coef_y = _coefficients(grad_y, diff_y, aux_y, ny, y_start, y_end, call.sigmoid, acc, dev)
        yw = (y_start, y_end)
    else:
        coef_y = _coefficients(grad_y, diff_y, aux_y, ny, 0, 0, call.sigmoid, acc, dev)
        yw = (0, 0)
    if need_x:
        _backward_rows(call, x, call.norm_x, call.labels_x, coef_x, y, call.norm_c, call.labels_c, coef_y, ny,
                       (x_start, x_end) + yw, False, False, scale, bias, None, dx)
    if need_y:
        _backward_rows(call, y, call.norm_c, call.labels_c, coef_y, x, call.norm_x, call.labels_x, coef_x, nx,
                       yw + (x_start, x_end), False, False, scale, bias, None, dy)
    return dx, dy, dneg
