r"""``gather=True``: losses over the global batch of a torch.distributed job (conventions §5).

Every loss of :mod:`sslops.functional` called with ``gather=True`` inside a process
group of W > 1 ranks lands here (with no process group, or W = 1, ``functional`` runs the
single-process loss itself, so one script runs on one device and on many). Rank r holds
B_r rows; the *global batch* is the concatenation of the local batches in rank order
(N = Σ_r B_r rows, rank r's rows start at offset o_r = Σ_{q<r} B_q). The B_r may differ.

The contract, for every loss, with the same hyperparameters on every rank:

* the mean over ranks of the per-rank loss is the single-process loss L on the global
  batch (covariance-type losses and Matrix-SSL return that same value on every rank;
  InfoNCE returns W·Σ_{local anchors} ℓ_i / #anchors, whose mean over ranks is L);
* ``z.grad`` on rank r is W·∂L/∂z restricted to rank r's rows, so that
  DistributedDataParallel's gradient *averaging* yields exactly the single-process
  gradient of L with respect to the parameters.

Why the gradients come out right: DDP differentiates F = Σ_r L_r (each rank
back-propagates its own L_r, then the parameter gradients are averaged, i.e. summed
and divided by W); with mean_r L_r = L we have F = W·L. The collectives are autograd
functions whose backward is the adjoint of the forward *summed over ranks*:

* ``all_reduce(sum)``: forward S = Σ_q s_q on every rank; ∂F/∂s_q = Σ_r ∂L_r/∂S, so
  its backward is again an all-reduce-sum of the incoming gradients. (When every rank
  computes the same L from S, that sum is W·∂L/∂S, the factor W of the contract.)
* row gather: forward Z = [z_0; …; z_{W-1}] on every rank; ∂F/∂z_q = rows o_q..o_q+B_q
  of Σ_r ∂L_r/∂Z, so its backward sums the (N, K) gradients over ranks and keeps the
  own rows: a reduce-scatter (padded ``reduce_scatter_tensor`` on NCCL; gloo has no
  reduce-scatter, so there it is an all-reduce of the (N, K) gradient and a slice).

Every call starts with one small all-gather of each rank's layout (loss, B_r, K, dtype,
and the relation's kind, length and index range). It is the only host synchronisation
of a call: the row counts are needed on the host to pad and trim, and a mismatch (a rank
with a different K or dtype, invalid labels/pairs, pairs outside the global range,
ranks calling different losses) raises the same clear ``ValueError`` on every rank
instead of hanging in a collective with mismatched sizes. After such an error the
process group is still in step: the next call works.

Per loss (W ranks, N = Σ B_r global rows, K features, e bytes per input element, w
bytes per compute element (4, or 8 for float64), M = max B_r; "AR n" = all-reduce of n
compute elements, "AG" = all-gather; "RS" = the backward of a row gather: a padded
reduce-scatter of the (N, C) gradient on NCCL, an all-reduce of it on gloo). Add to
each the layout AG of W·9 int64, the call's one host sync:

=============== ============================================= =========================
loss            forward                                       backward
=============== ============================================= =========================
vicreg          AR 2K (column sums), AR 2K² (centred Grams)   AR 2K², AR 2K
barlow_twins    AR 2K (column sums),                          AR 2K + K², AR 2K
                AR 2K + K² (Σ centred², cross-correlation)
vicreg_relation AG rows+labels (W·M·(K·e + 8) bytes)          AR K², RS (N, K)
                [pairs: AG W·max P_r·16 bytes], AR K²
info_nce        AG rows+labels (W·M·(K·e + 8) bytes)          RS (N, K)
                [pairs: AG W·max P_r·16 bytes]
nt_xent         AG of the 2B_r rows (W·2M·K·e bytes; labels   RS (2N, K)
                are rebuilt from the layout, none travel)
matrix_ssl      AG of [p | z] (W·M·2K·e bytes)                RS (N, 2K)
=============== ============================================= =========================

Numerics. Covariance-type losses are computed in two stages for exact centring: the
global column means first (an all-reduce of the column sums), then the *centred* sums
Σ(z-μ)ᵀ(z-μ) (or Σ(z_a-μ_a)ᵀ(z_b-μ_b) and Σ(z-μ)² for Barlow Twins' batch norm). The
one-collective alternative Σzᵀz - Nμμᵀ cancels catastrophically when |μ| ≫ σ (in fp32
the relative error of the covariance is ~1e-7·(μ/σ)²); the second, tiny (2K) all-reduce
is the price of getting the single-process numbers. Everything runs in fp32 (fp64 for
fp64 inputs) with autocast disabled; the loss is fp32 (fp64) and the gradients come back
in the input dtype. Row gathers move the input dtype (bf16 rows travel as bf16) and
reduce gradients in the compute dtype. The Gram route (N < K) does not decompose over
ranks, so the distributed path always all-reduces K×K sums.

Loss-specific choices:

* VICReg two-view: the invariance MSE is computed on the local pairs only, as the
  official code does (no rows travel), weighted W·B_r/N: with equal B_r the weight is 1
  and the per-rank term *is* the official local MSE; with unequal B_r the weight keeps
  the contract exact (the mean over ranks is the global MSE), where the unweighted local
  MSE would over-weight the rows of small ranks.
* VICReg relation form: var/cov from the all-reduced centred Gram; the invariance term
  gathers z once (labels in the same buffer) and each rank sums G_ij‖z_i - z_j‖² over
  its local anchors i against all N rows, scaled by W/(nnz(G)·K), where nnz(G) is
  counted on every rank from the gathered relation. With labels the sum is O(N·K) by the
  within-class identity Σ_{j∈c}‖z_i - z_j‖² = n_c‖z_i - m_c‖² + S_c (centred terms
  only); with pairs it takes the differences of the deduplicated pairs directly, O(P·K).
  Both use ``index_add_``/sort, which on CUDA are bitwise reproducible only under
  ``torch.use_deterministic_algorithms(True)``.
* InfoNCE: local anchors against the gathered candidates, with
  ``sslops.ops.infonce.info_nce_rows`` (the blockwise kernel: never (ΣB)² memory) when
  it is available, else ``sslops.reference.info_nce_rows``. The number of anchors with a
  positive is computed on every rank from the gathered relation (no collective, no sync).
* ``pairs`` with ``gather=True`` hold *global* row indices (row i of rank r is o_r + i)
  and the relation G is the union of the pairs passed on all ranks: passing the same
  full list on every rank and passing each rank a share of it give the same loss.
  ``labels`` are per-row (B_r,) on each rank and travel with the rows.
* Matrix-SSL: p and z travel together in one all-gather and every rank computes the
  global loss with the single-process kernel (``functional.matrix_ssl_loss``).

``backend`` picks the InfoNCE row kernel and the Matrix-SSL kernel; the covariance-type
losses compute their B_r·K² local sums with plain matmuls (the fused single-process
kernels do not produce partial sums), so there it is only checked. A named backend that
cannot run raises before any collective.

``gather=True`` runs eagerly: the layout exchange reads row counts on the host, so
under ``torch.compile`` the call is a graph break. Collectives use the default process
group. Every rank must call the same losses in the same order (as for any collective),
and all ranks must run backward. Input errors that ``sslops.functional`` finds on one
rank alone (before this module runs, e.g. z_a and z_b of different shapes) go through
:func:`raise_on_every_rank`, which joins the layout exchange with an error flag: every
rank raises, none hangs.
"""

import torch
import torch.distributed as dist

from . import _backend, reference
from . import _validation as V

__all__ = [
    "world_size",
    "vicreg_loss",
    "vicreg_relation_loss",
    "barlow_twins_loss",
    "info_nce_loss",
    "nt_xent_loss",
    "clip_loss",
    "siglip_loss",
    "matrix_ssl_loss",
    "all_gather_rows",
]


def world_size() -> int:
    """Ranks in the default process group, or 1 when torch.distributed is not in use."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


# ----------------------------------------------------------------------------- layout exchange

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOSSES = ("vicreg", "vicreg_relation", "barlow_twins", "info_nce", "nt_xent", "matrix_ssl", "clip", "siglip")
_NO_RELATION, _LABELS, _PAIRS = 0, 1, 2
_META = 9  # loss, rows, K, dtype, relation kind, relation length, flag, pairs min, pairs max


class _Layout:
    """What every rank learnt from the layout all-gather (host ints)."""

    def __init__(self, rank, world, sizes, k, pair_counts):
        self.rank = rank
        self.world = world
        self.sizes = sizes
        self.offsets = [sum(sizes[:q]) for q in range(world)]
        self.n = sum(sizes)
        self.k = k
        self.pair_counts = pair_counts

    @property
    def rows(self):
        return self.sizes[self.rank]

    @property
    def offset(self):
        return self.offsets[self.rank]


def _local_relation(labels, pairs, rows, device):
    """Check this rank's labels/pairs locally: (kind, length, pairs min, pairs max, error)."""
    try:
        if (labels is None) == (pairs is None):
            raise ValueError("give exactly one of labels (B_r,) or pairs (2, P); got " + ("both" if labels is not None else "neither"))
        if labels is not None:
            V.check_labels(labels, rows, device)
            return _LABELS, rows, None, None, None
        V.check_pairs(pairs, None, device, check_range=False)  # the global range is checked after the exchange
        count = pairs.shape[1]
        if count == 0:
            return _PAIRS, 0, None, None, None
        return _PAIRS, count, pairs.min().to(torch.int64), pairs.max().to(torch.int64), None
    except (TypeError, ValueError) as exc:
        return _NO_RELATION, 0, None, None, exc


def _collective_device():
    """Where the layout tensor lives: the current CUDA device for NCCL, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def raise_on_every_rank(loss, error):
    """This rank's input failed validation under ``gather=True``: make every rank raise.

    Joins the layout all-gather of the call with the error flag set, so the other ranks
    (which passed their own checks and are waiting in that collective) raise a
    ``ValueError`` naming this rank instead of hanging; this rank raises ``error``
    prefixed with its rank.
    """
    meta = torch.zeros(_META, dtype=torch.int64, device=_collective_device())
    meta[0] = _LOSSES.index(loss)
    meta[6] = 1
    dist.all_gather([torch.empty_like(meta) for _ in range(dist.get_world_size())], meta)
    raise type(error)(f"{loss}(gather=True) on rank {dist.get_rank()}: {error}") from error


def _exchange_layout(loss, z, relation=False, labels=None, pairs=None):
    """All-gather every rank's layout, check it, and return a :class:`_Layout`.

    Raises the same ``ValueError`` on every rank when the ranks disagree (a rank whose own
    labels/pairs are invalid raises its specific error; the others name that rank).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    rows, k = z.shape
    kind, length, lo, hi, error = _NO_RELATION, 0, None, None, None
    if relation:
        kind, length, lo, hi, error = _local_relation(labels, pairs, rows, z.device)
    head = torch.tensor([_LOSSES.index(loss), rows, k, _DTYPES.index(z.dtype), kind, length, int(error is not None)],
                        dtype=torch.int64, device=z.device)
    if lo is None:
        bounds = torch.tensor([0, -1], dtype=torch.int64, device=z.device)
    else:
        bounds = torch.stack([lo, hi])
    meta = torch.cat([head, bounds])
    gathered = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(gathered, meta)
    table = torch.stack(gathered).tolist()  # the one host sync of the call

    bad = [q for q, row in enumerate(table) if row[6]]
    if bad:  # checked first: a rank that failed its own checks may have sent no valid layout
        if error is not None:
            raise type(error)(f"{loss}(gather=True) on rank {rank}: {error}") from error
        raise ValueError(f"{loss}(gather=True): invalid input on rank(s) {bad} (see the error raised there); "
                         "no rank computed the loss")
    losses = [row[0] for row in table]
    if len(set(losses)) > 1:
        names = ", ".join(f"rank {q}: {_LOSSES[c]}" for q, c in enumerate(losses))
        raise ValueError(f"gather=True: the ranks called different sslops losses at the same point ({names}); "
                         "every rank must call the same losses in the same order")
    ks = [row[2] for row in table]
    dtypes = [_DTYPES[row[3]] for row in table]
    if len(set(ks)) > 1 or len(set(dtypes)) > 1:
        per_rank = ", ".join(f"rank {q}: K = {kq}, {str(dq).replace('torch.', '')}" for q, (kq, dq) in enumerate(zip(ks, dtypes)))
        raise ValueError(f"{loss}(gather=True): every rank must pass embeddings with the same number of features K "
                         f"and the same dtype; got {per_rank}")
    sizes = [row[1] for row in table]
    n = sum(sizes)
    kinds = [row[4] for row in table]
    if len(set(kinds)) > 1:  # checked on every rank (a loss whose labels are optional sends kind 0 without them)
        kind_names = {_NO_RELATION: "none", _LABELS: "labels", _PAIRS: "pairs"}
        names = ", ".join(f"rank {q}: {kind_names[c]}" for q, c in enumerate(kinds))
        raise ValueError(f"{loss}(gather=True): every rank must pass the same kind of relation ({names})")
    if relation:
        for q, row in enumerate(table):
            if row[4] == _PAIRS and row[5] > 0 and (row[7] < 0 or row[8] >= n):
                found = row[7] if row[7] < 0 else row[8]
                raise ValueError(f"{loss}(gather=True): pairs must hold global row indices in [0, {n}) "
                                 f"(N = rows of all {world} ranks together); rank {q} passed {found}")
    pair_counts = [row[5] for row in table] if relation and table[0][4] == _PAIRS else None
    return _Layout(rank, world, sizes, ks[0], pair_counts)


# ----------------------------------------------------------------------------- autograd collectives


# How the backward of a row gather sums the (N, C) gradient over ranks and keeps the own
# rows: "auto" = a padded reduce-scatter on NCCL, an all-reduce and a slice elsewhere (older
# gloo builds have no reduce-scatter); "reduce_scatter" forces the padded path (the tests
# use it to cover that path with gloo where this torch's gloo supports it).
ROW_GRAD_REDUCE = "auto"


def _reduce_scatter(out, inp):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp)


def _use_reduce_scatter(t):
    if ROW_GRAD_REDUCE == "reduce_scatter":
        return True
    return t.is_cuda and "nccl" in str(dist.get_backend()).lower()


class _AllReduceSum(torch.autograd.Function):
    """S = Σ_ranks s; backward: the all-reduce-sum of the incoming gradients."""

    @staticmethod
    def forward(ctx, s):
        out = s.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def _reduce_own_rows(grad, layout):
    """Rows o_r..o_r+B_r of the sum over ranks of ``grad`` (N, C)."""
    if _use_reduce_scatter(grad):
        width = grad.shape[1]
        top = max(layout.sizes)
        padded = grad.new_zeros((layout.world, top, width))
        for q, (o, b) in enumerate(zip(layout.offsets, layout.sizes)):
            padded[q, :b] = grad[o:o + b]
        out = grad.new_empty((top, width))
        _reduce_scatter(out, padded.view(layout.world * top, width))
        return out[:layout.rows]
    total = grad.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(total)
    return total[layout.offset:layout.offset + layout.rows]


class _GatherRows(torch.autograd.Function):
    """Z = [x_0; …; x_{W-1}] (variable B_r) in the compute dtype, plus int64 per-row extras.

    The rows travel as raw bytes in the input dtype, padded to max B_r; the extras (labels)
    ride in the same buffer. Backward: the own rows of the gradient summed over ranks.
    """

    @staticmethod
    def forward(ctx, x, extra, layout, wide):
        rows, k = x.shape
        x_bytes = x.contiguous().view(torch.uint8)
        width = x_bytes.shape[1]
        parts = [x_bytes]
        if extra is not None:
            parts.append(extra.to(torch.int64).contiguous().view(torch.uint8).reshape(rows, 8))
        packed = torch.cat(parts, dim=1) if len(parts) > 1 else x_bytes
        top = max(layout.sizes)
        buf = packed.new_zeros((top, packed.shape[1]))
        buf[:rows] = packed
        gathered = [torch.empty_like(buf) for _ in range(layout.world)]
        dist.all_gather(gathered, buf)
        every = torch.cat([g[:b] for g, b in zip(gathered, layout.sizes)])
        x_all = every[:, :width].contiguous().view(x.dtype).to(wide)
        if extra is not None:
            extra_all = every[:, width:].contiguous().view(torch.int64).reshape(-1)
        else:
            extra_all = torch.empty(0, dtype=torch.int64, device=x.device)
        ctx.mark_non_differentiable(extra_all)
        ctx.layout = layout
        ctx.in_dtype = x.dtype
        return x_all, extra_all

    @staticmethod
    def backward(ctx, grad, _grad_extra):
        return _reduce_own_rows(grad, ctx.layout).to(ctx.in_dtype), None, None, None


def _gather_rows(x, layout, wide, extra=None):
    x_all, extra_all = _GatherRows.apply(x, extra, layout, wide)
    return x_all, (extra_all if extra is not None else None)


def _gather_pairs(pairs, layout):
    """The (2, ΣP_r) concatenation of every rank's pairs (int64, no gradient)."""
    counts = layout.pair_counts
    top = max(counts)
    device = pairs.device
    if top == 0:
        return torch.zeros((2, 0), dtype=torch.int64, device=device)
    buf = torch.zeros((2, top), dtype=torch.int64, device=device)
    buf[:, :pairs.shape[1]] = pairs
    gathered = [torch.empty_like(buf) for _ in range(layout.world)]
    dist.all_gather(gathered, buf)
    return torch.cat([g[:, :c] for g, c in zip(gathered, counts)], dim=1)


def all_gather_rows(x):
    """The (ΣB_r, K) concatenation of every rank's rows in rank order, without autograd (B_r may differ).

    One all-gather of the row counts (a host sync), one of the rows padded to max B_r (as
    bytes, so any dtype travels on gloo). Used by :class:`sslops.nn.NegativeQueue`.
    """
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = torch.cat(sizes).tolist()
    rows = x.detach().contiguous().view(torch.uint8)
    buf = rows.new_zeros((max(sizes), rows.shape[1]))
    buf[:x.shape[0]] = rows
    gathered = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(gathered, buf)
    return torch.cat([g[:b] for g, b in zip(gathered, sizes)]).view(x.dtype)


# ----------------------------------------------------------------------------- helpers


def _wide(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_autocast(device):
    return torch.autocast(device_type=device.type, enabled=False)


def _off_diagonal_square_sum(c):
    diag = torch.eye(c.shape[-1], dtype=torch.bool, device=c.device)
    return torch.where(diag, 0.0, c).pow(2).sum()


def _std_hinge(variance, eps):
    return torch.relu(1.0 - torch.sqrt(variance + eps)).mean()


def _global_means(tensors, layout):
    """Global column means of each (B_r, K) tensor: one all-reduce of the concatenated sums."""
    sums = _AllReduceSum.apply(torch.cat([t.sum(dim=0) for t in tensors]))
    return (sums / layout.n).split(layout.k)


def _label_invariance(z_all, labels_all, start, stop):
    """(Σ_{i in [start, stop)} Σ_j G_ij‖z_i - z_j‖², nnz(G)) for G from labels, in O(N·K).

    Within a class c of n_c rows with mean m_c and scatter S_c = Σ_{j∈c}‖z_j - m_c‖²,
    Σ_{j∈c}‖z_i - z_j‖² = n_c‖z_i - m_c‖² + S_c (the j = i term is 0). Every quantity is
    a centred one (no ‖z_i‖² + ‖z_j‖² - 2⟨z_i, z_j⟩ cancellation). Classes are located
    by sorting: a row's slot is the first position of its label in the sorted labels.
    """
    n = z_all.shape[0]
    slot = torch.searchsorted(labels_all.sort().values, labels_all)
    size = torch.zeros(n, dtype=torch.int64, device=z_all.device).index_add_(0, slot, torch.ones_like(slot))
    size_f = size.to(z_all.dtype)
    means = torch.zeros_like(z_all).index_add_(0, slot, z_all) / size_f.clamp(min=1)[:, None]
    dev2 = (z_all - means[slot]).pow(2).sum(dim=1)
    scatter = torch.zeros(n, dtype=z_all.dtype, device=z_all.device).index_add_(0, slot, dev2)
    mine = slot[start:stop]
    sq_sum = (size_f[mine] * dev2[start:stop] + scatter[mine]).sum()
    return sq_sum, (size[slot] - 1).sum()


def _pair_invariance(z_all, pairs_all, start, stop):
    """(Σ_{i in [start, stop)} Σ_j G_ij‖z_i - z_j‖², nnz(G)) for G from pairs, in O(P·K).

    Both directions of every pair, self-pairs dropped, duplicates counted once by sorting
    the keys i·N + j (fixed shapes: no host sync); differences taken directly, a block of
    pairs at a time.
    """
    n, k = z_all.shape
    rows = torch.cat([pairs_all[0], pairs_all[1]])
    cols = torch.cat([pairs_all[1], pairs_all[0]])
    sentinel = n * n
    key = torch.where(rows != cols, rows * n + cols, sentinel).sort().values
    keep = key < sentinel
    keep[1:] &= key[1:] != key[:-1]
    key = torch.where(keep, key, 0)
    i, j = key // n, key % n
    mine = keep & (i >= start) & (i < stop)
    sq_sum = z_all.new_zeros(())
    block = max(1, reference._PAIR_BLOCK_ELEMENTS // max(1, k))
    for e0 in range(0, key.shape[0], block):
        e1 = min(key.shape[0], e0 + block)
        d2 = (z_all[i[e0:e1]] - z_all[j[e0:e1]]).pow(2).sum(dim=1)
        sq_sum = sq_sum + torch.where(mine[e0:e1], d2, 0.0).sum()
    return sq_sum, keep.sum()


# ----------------------------------------------------------------------------- losses


def vicreg_loss(z_a, z_b, *, backend="auto", sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4):
    """VICReg two-view over the global batch (see the module docstring).

    Collectives: layout AG; AR of 2K column sums; AR of the two centred K×K Grams
    (2K² elements); backward: the same two ARs. Work per rank: 2·B_r·K² multiply-adds.
    """
    _backend.requested(backend)
    layout = _exchange_layout("vicreg", z_a)
    wide = _wide(z_a.dtype)
    n, k, w = layout.n, layout.k, layout.world
    with _no_autocast(z_a.device):
        a, b = z_a.to(wide), z_b.to(wide)
        mean_a, mean_b = _global_means([a, b], layout)
        ac, bc = a - mean_a, b - mean_b
        grams = _AllReduceSum.apply(torch.stack([ac.T @ ac, bc.T @ bc]))
        cov_a, cov_b = grams / (n - 1)
        var = _std_hinge(cov_a.diagonal(), eps) / 2 + _std_hinge(cov_b.diagonal(), eps) / 2
        cov = _off_diagonal_square_sum(cov_a) / k + _off_diagonal_square_sum(cov_b) / k
        inv = (a - b).pow(2).sum() * (w / (n * k))  # local pairs, weight W·B_r/N on the local MSE
        return sim_coeff * inv + std_coeff * var + cov_coeff * cov


def barlow_twins_loss(z_a, z_b, *, backend="auto", lambd=0.0051, eps=1e-5):
    """Barlow Twins over the global batch, with global batch-norm statistics.

    Collectives: layout AG; AR of 2K column sums; AR of [Σ(a-μ_a)², Σ(b-μ_b)², (a-μ_a)ᵀ(b-μ_b)]
    (2K + K² elements); backward: the same two ARs. Work per rank: B_r·K² multiply-adds.
    """
    _backend.requested(backend)
    layout = _exchange_layout("barlow_twins", z_a)
    wide = _wide(z_a.dtype)
    n, k = layout.n, layout.k
    with _no_autocast(z_a.device):
        a, b = z_a.to(wide), z_b.to(wide)
        mean_a, mean_b = _global_means([a, b], layout)
        ac, bc = a - mean_a, b - mean_b
        stats = _AllReduceSum.apply(torch.cat([ac.pow(2).sum(dim=0), bc.pow(2).sum(dim=0), (ac.T @ bc).reshape(-1)]))
        inv_std_a = torch.rsqrt(stats[:k] / n + eps)
        inv_std_b = torch.rsqrt(stats[k:2 * k] / n + eps)
        c = stats[2 * k:].view(k, k) * inv_std_a[:, None] * inv_std_b[None, :] / n
        on_diag = (c.diagonal() - 1).pow(2).sum()
        return on_diag + lambd * _off_diagonal_square_sum(c)


def vicreg_relation_loss(z, *, labels=None, pairs=None, backend="auto", alpha=25.0, beta=1.0, gamma=25.0, eps=1e-4):
    """VICReg relation form over the global batch; ``pairs`` hold global row indices.

    Collectives: layout AG; AG of the rows (labels in the same buffer) [+ AG of the pairs];
    AR of the centred Gram (K²); backward: AR K², then the row-gradient reduce. Work per
    rank: B_r·K² (Gram) + O(N·K) (labels) or O(P·K) (pairs) for the invariance term.
    """
    _backend.requested(backend)
    layout = _exchange_layout("vicreg_relation", z, relation=True, labels=labels, pairs=pairs)
    wide = _wide(z.dtype)
    n, k, w = layout.n, layout.k, layout.world
    start, stop = layout.offset, layout.offset + layout.rows
    with _no_autocast(z.device):
        z_all, labels_all = _gather_rows(z, layout, wide, extra=labels)
        pairs_all = _gather_pairs(pairs, layout) if pairs is not None else None
        zc = z.to(wide) - z_all.mean(dim=0)
        gram = _AllReduceSum.apply(zc.T @ zc)
        cov_m = gram / (n - 1)
        if labels_all is not None:
            sq_sum, nnz = _label_invariance(z_all, labels_all, start, stop)
        else:
            sq_sum, nnz = _pair_invariance(z_all, pairs_all, start, stop)
        var = _std_hinge(cov_m.diagonal(), eps)
        cov = _off_diagonal_square_sum(cov_m) / k
        inv = sq_sum * w / (nnz.clamp(min=1).to(wide) * k)
        return alpha * var + beta * cov + gamma * inv


def _positive_counts(labels_all, pairs_all, n):
    """|P(i)| of every global row (int64), computed without a host sync."""
    if labels_all is not None:
        ordered = labels_all.sort().values
        return torch.searchsorted(ordered, labels_all, right=True) - torch.searchsorted(ordered, labels_all) - 1
    rows = torch.cat([pairs_all[0], pairs_all[1]])
    cols = torch.cat([pairs_all[1], pairs_all[0]])
    key = (rows * n + cols).sort().values
    keep = (key // n) != (key % n)
    keep[1:] &= key[1:] != key[:-1]
    return torch.zeros(n, dtype=torch.int64, device=key.device).index_add_(0, key // n, keep.to(torch.int64))


def _kernel_module(loss, backend, device, shape):
    """sslops.ops.infonce when ``backend`` resolves to a kernel for ``loss``, else None (the reference)."""
    name = _backend.resolve(loss, backend, device, (shape,))
    if name == "reference":
        return None, name
    from .ops import infonce as kernel_module

    return kernel_module, name


def _weight_totals(pe_sum, count_sum):
    """DCLW's normaliser over the global batch: Σ e^{s/σ} and |E| summed over ranks (detached)."""
    totals = torch.stack([pe_sum, count_sum]).detach().clone()
    dist.all_reduce(totals)
    return totals[0], totals[1]


def _info_nce_window(z_all, labels_all, pairs_all, layout, start, stop, anchors, temperature, backend, options,
                     weight_rows=None):
    """W·Σ_{window} ℓ_i / #anchors: the per-rank InfoNCE loss of conventions §5."""
    kernels, name = _kernel_module("info_nce", backend, z_all.device, tuple(z_all.shape))
    if kernels is not None:
        loss_rows, _ = kernels.info_nce_rows(z_all, labels_all, pairs_all, temperature, start, stop, name,
                                             weight_totals=_weight_totals, **options)
    else:  # weight_rows: the local anchors only (MoCo form), whose DCLW sums need the all-reduce too
        loss_rows, _ = reference.info_nce_rows(z_all, labels=labels_all, pairs=pairs_all, temperature=temperature,
                                               row_start=start, row_end=stop, weight_rows=weight_rows,
                                               weight_totals=None if weight_rows is None else _weight_totals, **options)
    wide = z_all.dtype
    return loss_rows.to(wide).sum() * layout.world / anchors.to(wide).clamp(min=1)


def _options(negatives, in_batch_negatives, decoupled, wide):
    return dict(negatives=None if negatives is None else negatives.to(wide), in_batch_negatives=in_batch_negatives,
                decoupled=decoupled)


def info_nce_loss(z, *, labels=None, pairs=None, backend="auto", temperature=0.1, negatives=None, in_batch_negatives=True,
                  decoupled=False):
    """InfoNCE: local anchors against the gathered global batch; per-rank loss W·Σℓ_local/#anchors.

    ``negatives`` are not gathered (every rank holds the same queue); DCLW's normaliser is
    all-reduced (two numbers, forward only). Collectives: layout AG; AG of the rows (labels
    in the same buffer) [+ AG of the pairs] [+ AR of 2 numbers for DCLW]; backward: the
    row-gradient reduce. Work per rank: B_r·(N + M)·K (the kernel's row window).
    """
    _backend.resolve("info_nce", backend, z.device)  # an unavailable backend raises before any collective
    layout = _exchange_layout("info_nce", z, relation=True, labels=labels, pairs=pairs)
    wide = _wide(z.dtype)
    options = _options(negatives, in_batch_negatives, decoupled, wide)
    with _no_autocast(z.device):
        z_all, labels_all = _gather_rows(z, layout, wide, extra=labels)
        pairs_all = _gather_pairs(pairs, layout) if pairs is not None else None
        count = _positive_counts(labels_all, pairs_all, layout.n)
        n_neg = 0 if negatives is None else negatives.shape[0]
        anchors = reference.anchor_mask(count, layout.n, n_neg, in_batch_negatives, decoupled).sum()
        return _info_nce_window(z_all, labels_all, pairs_all, layout, layout.offset, layout.offset + layout.rows,
                                anchors, temperature, backend, options)


def nt_xent_loss(z_a, z_b, *, temperature=0.5, backend="auto", negatives=None, in_batch_negatives=True, decoupled=False):
    """NT-Xent over the global batch's 2N anchors; this rank's 2B_r rows are its anchors.

    The gathered matrix holds [z_a⁰; z_b⁰; z_a¹; z_b¹; …] (rank-major); the loss is
    invariant to that row order, and each rank builds the sample-id labels from the layout.
    Collectives: layout AG; AG of the 2B_r rows; backward: the row-gradient reduce.
    With ``in_batch_negatives=False`` (MoCo) an anchor's candidates are its own positive and
    the negatives, all on this rank: no rows travel (only DCLW's two-number all-reduce), the
    anchors are this rank's rows of z_a and the per-rank loss is W·Σℓ_local/N.
    """
    _backend.resolve("nt_xent", backend, z_a.device)
    layout = _exchange_layout("nt_xent", z_a)
    wide = _wide(z_a.dtype)
    options = _options(negatives, in_batch_negatives, decoupled, wide)
    n_neg = 0 if negatives is None else negatives.shape[0]
    with _no_autocast(z_a.device):
        if not in_batch_negatives:
            b = layout.rows
            local = _Layout(layout.rank, layout.world, layout.sizes, layout.k, None)
            ids = torch.arange(b, device=z_a.device)
            z = torch.cat([z_a, z_b]).to(wide)
            anchors = torch.full((), layout.n, dtype=torch.int64, device=z_a.device)
            return _info_nce_window(z, torch.cat([ids, ids]), None, local, 0, b, anchors, temperature, backend, options,
                                    weight_rows=(0, b))
        both = _Layout(layout.rank, layout.world, [2 * b for b in layout.sizes], layout.k, None)
        z_all, _ = _gather_rows(torch.cat([z_a, z_b]), both, wide)
        ids = [torch.arange(o, o + b, device=z_a.device) for o, b in zip(layout.offsets, layout.sizes)]
        labels_all = torch.cat([torch.cat([i, i]) for i in ids])
        count = torch.ones(2 * layout.n, dtype=torch.int64, device=z_a.device)
        anchors = reference.anchor_mask(count, 2 * layout.n, n_neg, True, decoupled).sum()
        return _info_nce_window(z_all, labels_all, None, both, both.offset, both.offset + both.rows,
                                anchors, temperature, backend, options)


def clip_loss(z_a, z_b, *, logit_scale, labels=None, normalize=True, backend="auto"):
    """CLIP: this rank's rows of each set against all ranks' rows of the other; per-rank W·½(Σℓᵃ + Σℓᵇ)_local/N.

    Collectives: layout AG; AG of [z_a | z_b] (labels in the same buffer); backward: the
    (N, 2K) row-gradient reduce. Work per rank: 2·B_r·N·K (two directions).
    """
    _backend.resolve("clip", backend, z_a.device)
    layout = _exchange_layout("clip", z_a, relation=labels is not None, labels=labels)
    wide, k = _wide(z_a.dtype), layout.k
    start, stop = layout.offset, layout.offset + layout.rows
    with _no_autocast(z_a.device):
        both, labels_all = _gather_rows(torch.cat([z_a, z_b], dim=1), layout, wide, extra=labels)
        a_all, b_all = both[:, :k], both[:, k:]
        kernels, name = _kernel_module("clip", backend, z_a.device, tuple(a_all.shape))
        if kernels is not None:
            loss_a, loss_b = kernels.clip_rows(a_all, b_all, logit_scale, labels_all, normalize, start, stop, name)
        else:
            loss_a, loss_b = reference.clip_rows(a_all, b_all, logit_scale, labels=labels_all, normalize=normalize,
                                                 row_start=start, row_end=stop)
        return 0.5 * (loss_a.sum() + loss_b.sum()) * layout.world / layout.n


def siglip_loss(z_a, z_b, *, logit_scale, logit_bias, labels=None, normalize=True, backend="auto"):
    """SigLIP: this rank's rows of a against all ranks' rows of b; per-rank W·Σ_local r_i / N.

    Only b travels (a's gradient stays local, as in open_clip's chunked exchange).
    Collectives: layout AG; AG of z_b (labels in the same buffer); backward: the (N, K)
    row-gradient reduce. Work per rank: B_r·N·K.
    """
    _backend.resolve("siglip", backend, z_a.device)
    layout = _exchange_layout("siglip", z_a, relation=labels is not None, labels=labels)
    wide = _wide(z_a.dtype)
    start = layout.offset
    with _no_autocast(z_a.device):
        b_all, labels_all = _gather_rows(z_b, layout, wide, extra=labels)
        a = z_a.to(wide)
        kernels, name = _kernel_module("siglip", backend, z_a.device, tuple(b_all.shape))
        if kernels is not None:
            ids_all = labels_all if labels is not None else torch.arange(layout.n, device=z_a.device)
            rows = kernels.siglip_rows(a, b_all, logit_scale, logit_bias, ids_all[start:start + layout.rows], ids_all,
                                       normalize, name)
        else:
            rows = reference.siglip_rows(a, b_all, logit_scale, logit_bias, labels=labels_all, normalize=normalize,
                                         row_offset=start)
        return rows.sum() * layout.world / layout.n


def matrix_ssl_loss(p, z, *, backend="auto", lambd=1.0, mu=1.0, gamma=1.0, order=4):
    """Matrix-SSL over the global batch: one all-gather of [p | z], the global loss on every rank.

    Collectives: layout AG; AG of W·max B_r·2K elements; backward: the (N, 2K) gradient
    reduce. Work per rank: the single-process cost at N rows.
    """
    from . import functional  # functional imports this module

    _backend.resolve("matrix_ssl", backend, p.device)
    layout = _exchange_layout("matrix_ssl", p)
    k = layout.k
    with _no_autocast(p.device):
        both, _ = _gather_rows(torch.cat([p, z], dim=1), layout, _wide(p.dtype))
    return functional.matrix_ssl_loss(both[:, :k], both[:, k:], lambd=lambd, mu=mu, gamma=gamma, order=order,
                                      gather=False, backend=backend)
