r"""``gather=True``: losses over the global batch of a torch.distributed job (conventions §5).

Every loss of :mod:`sslops.functional` called with ``gather=True`` inside a process
group of W > 1 ranks lands here (with no process group, or W = 1, ``functional`` runs the
single-process loss itself, so one script runs on one device and on many). Rank r holds
B_r rows; the *global batch* is the concatenation of the local batches in rank order
(N = Σ_r B_r rows, rank r's rows start at offset o_r = Σ_{q<r} B_q). The B_r may differ.
The README's "Distributed training" section is the user-facing summary of this page.

The contract, for every loss, with the same hyperparameters on every rank:

* the mean over ranks of the per-rank loss is the single-process loss L on the global
  batch (the covariance-type losses other than two-view VICReg, and Matrix-SSL, return
  that same value on every rank; VICReg adds its local invariance term, InfoNCE returns
  W·Σ_{local anchors} ℓ_i / #anchors);
* ``z.grad`` on rank r is W·∂L/∂z restricted to rank r's rows, so that
  DistributedDataParallel's gradient *averaging* yields exactly the single-process
  gradient of L with respect to the parameters.

Why the gradients come out right: DDP differentiates F = Σ_r L_r (each rank
back-propagates its own L_r, then the parameter gradients are averaged, i.e. summed
and divided by W); with mean_r L_r = L we have F = W·L. A collective's backward is the
adjoint of its forward *summed over ranks*:

* ``all_reduce(sum)``: forward S = Σ_q s_q on every rank; ∂F/∂s_q = Σ_r ∂L_r/∂S.
* row gather: forward Z = [z_0; …; z_{W-1}] on every rank; ∂F/∂z_q = rows o_q..o_q+B_q
  of Σ_r ∂L_r/∂Z.

When every rank computes the *same* function of S (or of Z) — the covariance-type losses
and Matrix-SSL — those sums over ranks are W times this rank's own ∂L/∂S (∂L/∂Z): no
collective is needed in the backward. The loss is wrapped so that its gradient is
multiplied by W (a scalar, before any kernel's backward: one rounding, not two), the
all-reduce passes the gradient through unchanged and the row gather keeps the own rows
(the official VICReg code all-reduces the gathered gradient instead, moving N·K more
values per view in the backward). This assumes what DDP does anyway: every rank calls
``backward`` on the loss with the same scale (a per-rank ``loss * c_r`` would need the
all-reduce). The column means that centre the statistics (below) get no gradient at all:
∂L/∂μ = -Σ_global (rows of the centred gradient) = 0 exactly, so they are constants.
Only terms whose value differs per rank keep a backward collective: the local anchors of
InfoNCE, NT-Xent, CLIP and SigLIP (a reduce-scatter of the row gradients: padded
``reduce_scatter_tensor`` on NCCL; gloo has none, so there an all-reduce and a slice).

**Two forward paths for the covariance-type losses** (VICReg, VICReg over G, Barlow Twins):

* ``"rows"``: one all-gather of the rows (both views side by side, in the input dtype:
  bf16 rows travel as bf16; labels in the same buffer), then the fused single-process
  kernel of the op layer (:mod:`sslops.ops.covariance`, the backend ``backend`` names or
  ``auto`` picks for the global shape, Gram route included when N < K) on the global batch,
  on every rank. Work per rank: the single-process cost at N rows.
* ``"sums"``: the K×K sums each rank computes from its own rows with plain matmuls,
  all-reduced in fp32 (fp64 for fp64). Centring is exact, in two stages: the global column
  means first (an all-reduce of 2K column sums), then the *centred* sums Σ(z-μ)ᵀ(z-μ) (or
  Σ(z_a-μ_a)ᵀ(z_b-μ_b) and Σ(z-μ)² for Barlow Twins' batch norm); the one-collective
  alternative Σzᵀz - Nμμᵀ cancels catastrophically when |μ| ≫ σ (relative error
  ~1e-7·(μ/σ)² in fp32). Work per rank: B_r·K² multiply-adds per product.

``gather=True`` (or ``"auto"``) picks, per call, the path that moves fewer bytes for this
N, max B_r, K, W and dtype, from the layout exchange every call starts with, so every rank
picks the same one (ties go to ``"rows"``). ``gather="rows"`` or ``gather="sums"`` forces
one, as does the environment variable ``SSLOPS_GATHER`` (``auto``, ``rows`` or ``sums``)
when the argument is ``True``/``"auto"``: for tests, and for users who know their
network (all ranks must ask for the same path; the layout exchange checks it).

**Cost model** (bytes one rank sends, :func:`collective_bytes`): a ring all-reduce of S
bytes sends 2(W-1)/W·S, a ring all-gather whose output is O bytes sends (W-1)/W·O.
Variable batches are padded to M = max B_r rows before an all-gather, so O counts W·M
rows. With e bytes per input element, w per compute element (4; 8 for float64),
a = (W-1)/W, P = the most pairs any rank passes, ℓ = 1 with labels (0 with pairs):

=============== ===== ============================================================ ===========
loss            path  forward                                                      backward
=============== ===== ============================================================ ===========
vicreg          rows  AG [z_a | z_b]: a·W·M·2K·e                                   none
                sums  AR 2K (means) + AR 2K² (two centred Grams): 2a·(2K + 2K²)·w   none
barlow_twins    rows  AG [z_a | z_b]: a·W·M·2K·e                                   none
                sums  AR 2K (means) + AR 2K + K² (Σ(a-μ)², Σ(b-μ)², (a-μ)ᵀ(b-μ)):    none
                      2a·(4K + K²)·w
vicreg_relation rows  AG [z | labels]: a·W·M·(K·e + 8ℓ) [pairs: + AG a·W·P·16]     none
                sums  the same row gather (the invariance term needs the rows)     none
                      + AR K² (centred Gram): + 2a·K²·w
info_nce        -     AG [z | labels]: a·W·M·(K·e + 8ℓ) [pairs: + AG a·W·P·16]     RS (N, K)·w
nt_xent         -     AG [z_a; z_b]: a·W·2M·K·e (labels rebuilt from the layout)    RS (2N, K)·w
matrix_ssl      -     AG [p | z]: a·W·M·2K·e                                       none
=============== ===== ============================================================ ===========

Every call adds the layout exchange, an AG of W·10 int64 (a·W·80 bytes), the call's one
host sync. RS = the row-gradient reduce: on gloo an all-reduce of the (N, ·) gradient
(2a·N·K·w), on NCCL a padded reduce-scatter (a·W·M·K·w). "none" is exact: the backward
of these losses launches no collective at all.

With equal batches VICReg's rows path moves less when N·e < 2(K + 1)·w, i.e. N < 2K + 2
in fp32 and N < 4K + 4 for bf16 rows; Barlow Twins' when N·e < (K + 4)·w. At the
official configuration (N = 2048, K = 8192, many ranks, fp32) VICReg's rows path sends
about 134 MB per rank where the sums path sends 1.07 GB. The relation form's rows path
always moves less (its sums path adds a K² all-reduce to the same row gather); its sums
path exists for a fast network and wide K, where B_r·K² work per rank beats N·K².

Every call starts with one small all-gather of each rank's layout (loss, B_r, K, dtype,
the relation's kind, length and index range, the requested path). It is the only host
synchronisation of a call: the row counts are needed on the host to pad and trim, and a
mismatch (a rank with a different K or dtype, invalid labels/pairs, pairs outside the
global range, ranks calling different losses or asking for different paths) raises the
same clear ``ValueError`` on every rank instead of hanging in a collective with
mismatched sizes. After such an error the process group is still in step.

Numerics. Everything of the sums path runs in fp32 (fp64 for fp64 inputs) with autocast
disabled; the rows path runs the op layer's kernel on the gathered rows in their own
dtype, as the single-process loss does. Losses are fp32 (fp64), gradients come back in
the input dtype.

Loss-specific choices:

* VICReg two-view: the invariance MSE is computed on the local pairs only, as the
  official code does (no rows travel for it), weighted W·B_r/N: with equal B_r the weight
  is 1 and the per-rank term *is* the official local MSE; with unequal B_r the weight keeps
  the contract exact. The rows path runs the fused kernel with ``sim_coeff=0`` on the
  global views for the variance and covariance terms.
* VICReg relation form: the invariance term Σ_ij G_ij‖z_i - z_j‖² / (nnz(G)·K) is taken
  over the whole gathered batch on every rank (the op layer's O(nnz·K) relation op), so
  every rank returns L itself and no row gradient needs summing over ranks. ``pairs``
  with ``gather=True`` hold *global* row indices (row i of rank r is o_r + i) and G is the
  union of the pairs passed on all ranks: passing the same full list on every rank and
  passing each rank a share of it give the same loss. ``labels`` are per-row (B_r,) on
  each rank and travel with the rows.
* InfoNCE: local anchors against the gathered candidates, with
  ``sslops.ops.infonce.info_nce_rows`` (the blockwise kernel: never (ΣB)² memory) when
  it is available, else ``sslops.reference.info_nce_rows``. The number of anchors with a
  positive is computed on every rank from the gathered relation (no collective, no sync).
* Matrix-SSL: p and z travel together in one all-gather and every rank computes the
  global loss with the single-process function :mod:`sslops.functional` hands in
  (:func:`global_batch_loss`; this module does not import the public losses).

``backend`` picks the InfoNCE row kernel and the kernel of every rows path; the sums path
computes its B_r·K² local sums with plain matmuls (the fused kernels do not produce
partial sums). A named backend that cannot run raises before any collective.

``gather=True`` runs eagerly: the layout exchange reads row counts on the host, so
under ``torch.compile`` the call is a graph break. Collectives use the default process
group. Every rank must call the same losses in the same order (as for any collective),
and all ranks must run backward. Input errors that ``sslops.functional`` finds on one
rank alone (before this module runs, e.g. z_a and z_b of different shapes) go through
:func:`raise_on_every_rank`, which joins the layout exchange with an error flag: every
rank raises, none hangs.
"""

import os
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import _backend, reference
from . import _validation as V
from .ops import covariance as covariance_ops

__all__ = [
    "world_size",
    "GATHER_PATHS",
    "Traffic",
    "collective_bytes",
    "choose_path",
    "global_batch_loss",
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


# ----------------------------------------------------------------------------- the path switch

GATHER_PATHS = ("auto", "rows", "sums")
_PATH_LOSSES = ("vicreg", "vicreg_relation", "barlow_twins")  # the losses with two forward paths


def check_gather(gather, loss):
    """Raise unless ``gather`` suits ``loss``: a bool (any non-string is read as one), or, for
    the covariance-type losses, one of :data:`GATHER_PATHS`."""
    if not isinstance(gather, str):
        return
    if loss not in _PATH_LOSSES:
        raise ValueError(f"gather must be True or False for {loss} (it has one distributed path), got {gather!r}")
    if gather not in GATHER_PATHS:
        raise ValueError(f"gather must be True, False, 'auto', 'rows' or 'sums', got {gather!r}")


def _requested_path(gather):
    """The path asked for: ``gather`` when it names one, else ``SSLOPS_GATHER``, else ``"auto"``."""
    if isinstance(gather, str) and gather != "auto":
        return gather
    path = os.environ.get("SSLOPS_GATHER", "auto").strip().lower() or "auto"
    V.check_choice("SSLOPS_GATHER", path, GATHER_PATHS)
    return path


class Traffic(NamedTuple):
    """Bytes one rank sends in the collectives of one call, forward and backward."""

    forward: float
    backward: float

    @property
    def total(self):
        return self.forward + self.backward


_META = 10  # loss, rows, K, dtype, relation kind, relation length, error flag, pairs min, pairs max, path


def _all_reduce_bytes(nbytes, world):
    return 2.0 * (world - 1) / world * nbytes


def _all_gather_bytes(out_bytes, world):
    return (world - 1) / world * out_bytes


def collective_bytes(loss, path, sizes, k, dtype, *, labels=False, pairs_per_rank=None):
    """:class:`Traffic` of one ``loss(gather=path)`` call, by the ring model of the module docstring.

    Args:
        loss: ``"vicreg"``, ``"barlow_twins"``, ``"vicreg_relation"`` or ``"matrix_ssl"``.
        path: ``"rows"`` or ``"sums"`` (``matrix_ssl``: ``"rows"``).
        sizes: the local batch sizes B_r of the W ranks, in rank order.
        k: features K. dtype: the input dtype.
        labels: ``vicreg_relation`` with labels (they travel with the rows).
        pairs_per_rank: ``vicreg_relation`` with pairs: the number each rank passes.

    The layout exchange is included; the backward of these losses moves nothing.
    """
    world, top = len(sizes), max(sizes)
    e = torch.empty((), dtype=dtype).element_size()
    w = 8 if dtype == torch.float64 else 4
    forward = _all_gather_bytes(world * _META * 8, world)
    if loss in ("vicreg", "barlow_twins", "matrix_ssl") and path == "rows":
        forward += _all_gather_bytes(world * top * 2 * k * e, world)
    elif loss == "vicreg" and path == "sums":
        forward += _all_reduce_bytes(2 * k * w, world) + _all_reduce_bytes(2 * k * k * w, world)
    elif loss == "barlow_twins" and path == "sums":
        forward += _all_reduce_bytes(2 * k * w, world) + _all_reduce_bytes((2 * k + k * k) * w, world)
    elif loss == "vicreg_relation" and path in ("rows", "sums"):
        forward += _all_gather_bytes(world * top * (k * e + (8 if labels else 0)), world)
        if pairs_per_rank is not None and max(pairs_per_rank) > 0:
            forward += _all_gather_bytes(world * max(pairs_per_rank) * 16, world)
        if path == "sums":
            forward += _all_reduce_bytes(k * k * w, world)
    else:
        raise ValueError(f"collective_bytes: no {path!r} path for {loss!r}")
    return Traffic(forward, 0.0)


def choose_path(loss, sizes, k, dtype, *, labels=False, pairs_per_rank=None):
    """``"rows"`` or ``"sums"``: the path of :func:`collective_bytes` that moves fewer bytes (ties: rows)."""
    kw = dict(labels=labels, pairs_per_rank=pairs_per_rank)
    rows = collective_bytes(loss, "rows", sizes, k, dtype, **kw).total
    sums = collective_bytes(loss, "sums", sizes, k, dtype, **kw).total
    return "rows" if rows <= sums else "sums"


# ----------------------------------------------------------------------------- layout exchange

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOSSES = ("vicreg", "vicreg_relation", "barlow_twins", "info_nce", "nt_xent", "matrix_ssl", "clip", "siglip")
_NO_RELATION, _LABELS, _PAIRS = 0, 1, 2


class _Layout:
    """What every rank learnt from the layout all-gather (host ints)."""

    def __init__(self, rank, world, sizes, k, pair_counts, path="rows"):
        self.rank = rank
        self.world = world
        self.sizes = sizes
        self.offsets = [sum(sizes[:q]) for q in range(world)]
        self.n = sum(sizes)
        self.k = k
        self.pair_counts = pair_counts
        self.path = path  # the forward path of a covariance-type loss, the same on every rank

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


def _exchange_layout(loss, z, relation=False, labels=None, pairs=None, path="auto"):
    """All-gather every rank's layout, check it, and return a :class:`_Layout`.

    ``path`` is the forward path this rank asks for (covariance-type losses); the layout's
    ``path`` is the one every rank takes: the requested one, or for ``"auto"`` the cheaper
    one by :func:`choose_path` on the exchanged sizes.

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
    tail = torch.tensor([GATHER_PATHS.index(path)], dtype=torch.int64, device=z.device)
    meta = torch.cat([head, bounds, tail])
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
    paths = [GATHER_PATHS[row[9]] for row in table]
    if len(set(paths)) > 1:
        per_rank = ", ".join(f"rank {q}: {p!r}" for q, p in enumerate(paths))
        raise ValueError(f"{loss}(gather=...): every rank must ask for the same path (the gather argument, "
                         f"else SSLOPS_GATHER); got {per_rank}")
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
    chosen = "rows"
    if loss in _PATH_LOSSES:
        chosen = path if path != "auto" else choose_path(loss, sizes, ks[0], dtypes[0], labels=relation and table[0][4] == _LABELS,
                                                         pairs_per_rank=pair_counts)
    return _Layout(rank, world, sizes, ks[0], pair_counts, chosen)


# ----------------------------------------------------------------------------- autograd collectives


# How the backward of a per-rank row gather (InfoNCE, NT-Xent) sums the (N, C) gradient over
# ranks and keeps the own rows: "auto" = a padded reduce-scatter on NCCL, an all-reduce and a
# slice elsewhere (older gloo builds have no reduce-scatter); "reduce_scatter" forces the
# padded path (the tests use it to cover that path with gloo where this torch's gloo has it).
ROW_GRAD_REDUCE = "auto"


def _reduce_scatter(out, inp):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp)


def _use_reduce_scatter(t):
    if ROW_GRAD_REDUCE == "reduce_scatter":
        return True
    return t.is_cuda and "nccl" in str(dist.get_backend()).lower()


def _all_reduce_constant(t):
    """Σ_ranks t, outside autograd (the global column means: they need no gradient, see above)."""
    out = t.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out)
    return out


class _AllReduceSame(torch.autograd.Function):
    """S = Σ_ranks s for a loss every rank computes alike from S.

    Backward: the incoming gradient itself, no collective. The adjoint is Σ_r ∂L_r/∂S =
    W·∂L/∂S, and the loss built on S is wrapped by :func:`_times_world`, so W·∂L/∂S is
    what arrives here.
    """

    @staticmethod
    def forward(ctx, s):
        if not s.is_contiguous():
            s = s.contiguous()
        else:
            ctx.mark_dirty(s)  # the callers hand a fresh temporary (the local sums): reduce it in place
        dist.all_reduce(s)
        return s

    @staticmethod
    def backward(ctx, grad):
        return grad


class _TimesWorld(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by W (see the module docstring)."""

    @staticmethod
    def forward(ctx, loss, world):
        ctx.world = world
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.world, None


def _times_world(loss, layout):
    return _TimesWorld.apply(loss, layout.world)


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
    """Z_i = [x_i on rank 0; …; x_i on rank W-1] for each (B_r, K_i) input x_i, plus the
    int64 per-row ``extra`` (labels), all in one all-gather.

    The inputs (one dtype) travel side by side as raw bytes in their own dtype, padded to
    max B_r rows, the extras in the same buffer. Outputs: each Z_i, contiguous, in
    ``wide`` (or the input dtype when ``wide`` is None), then the gathered extras (empty
    when there are none). Backward, ``same=True`` (every rank computed the same loss of
    the Z_i, its gradient already ×W): the own rows, no collective; ``same=False`` (per-rank
    anchors): the own rows of the sum over ranks (:func:`_reduce_own_rows`), in ``wide``.
    """

    @staticmethod
    def forward(ctx, layout, same, wide, extra, *xs):
        rows = xs[0].shape[0]
        parts = [x.contiguous().view(torch.uint8) for x in xs]
        widths = [p.shape[1] for p in parts]
        if extra is not None:
            parts.append(extra.to(torch.int64).contiguous().view(torch.uint8).reshape(rows, 8))
        packed = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        top = max(layout.sizes)
        buf = packed.new_zeros((top, packed.shape[1]))
        buf[:rows] = packed
        gathered = [torch.empty_like(buf) for _ in range(layout.world)]
        dist.all_gather(gathered, buf)
        outs, start = [], 0
        for x, width in zip(xs, widths):
            block = torch.cat([g[:b, start:start + width] for g, b in zip(gathered, layout.sizes)])
            block = block.view(x.dtype)
            outs.append(block if wide is None else block.to(wide))
            start += width
        if extra is not None:
            extra_all = torch.cat([g[:b, start:] for g, b in zip(gathered, layout.sizes)]).view(torch.int64).reshape(-1)
        else:
            extra_all = torch.empty(0, dtype=torch.int64, device=xs[0].device)
        ctx.mark_non_differentiable(extra_all)
        ctx.layout, ctx.same, ctx.in_dtype = layout, same, xs[0].dtype
        return (*outs, extra_all)

    @staticmethod
    def backward(ctx, *grads):
        layout = ctx.layout
        own = slice(layout.offset, layout.offset + layout.rows)
        out = []
        for g in grads[:-1]:
            if g is None:
                out.append(None)
            elif ctx.same:
                out.append(g[own].to(ctx.in_dtype, copy=True))  # a copy: not a view holding all N rows
            else:
                out.append(_reduce_own_rows(g, layout).to(ctx.in_dtype))
        return (None, None, None, None, *out)


def _gather_rows(layout, *xs, same, wide=None, extra=None):
    """(Z_1, …, Z_m, extras or None): see :class:`_GatherRows`."""
    *outs, extra_all = _GatherRows.apply(layout, same, wide, extra, *xs)
    return (*outs, extra_all if extra is not None else None)


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


def global_batch_loss(loss, fn, *tensors):
    """``fn(*global tensors)`` on every rank, with the gradient contract, no backward collective.

    For a loss every rank computes wholly from the global batch: the (B_r, K_i) ``tensors``
    travel in one all-gather in their own dtype, ``fn`` (a single-process loss) runs on the
    (N, K_i) concatenations, and its gradient is scaled by W; each rank keeps its own rows.
    ``loss`` names the call in the layout exchange (and in its errors).
    """
    layout = _exchange_layout(loss, tensors[0])
    gathered = _gather_rows(layout, *tensors, same=True)[:-1]
    return _times_world(fn(*gathered), layout)


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


def _centred(tensors, layout):
    """Each (B_r, K) tensor minus its global column mean; the means (one forward-only
    all-reduce of the concatenated column sums) are constants for autograd."""
    sums = _all_reduce_constant(torch.cat([t.detach().sum(dim=0) for t in tensors]))
    means = (sums / layout.n).split(layout.k)
    return [t - m for t, m in zip(tensors, means)]


# ----------------------------------------------------------------------------- losses


def vicreg_loss(z_a, z_b, *, gather=True, backend="auto", sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4):
    """VICReg two-view over the global batch (see the module docstring).

    rows: AG of [z_a | z_b], the fused kernel (``sim_coeff=0``) on the global views;
    sums: AR of 2K column sums, AR of the two centred K×K Grams (2·B_r·K² multiply-adds per
    rank). Both add the local invariance MSE, weighted W·B_r/N. No backward collective.
    """
    path = _requested_path(gather)
    _backend.resolve("vicreg", backend, z_a.device)  # a named backend that cannot run raises before any collective
    layout = _exchange_layout("vicreg", z_a, path=path)
    wide = _wide(z_a.dtype)
    n, k, w = layout.n, layout.k, layout.world
    with _no_autocast(z_a.device):
        inv = (z_a.to(wide) - z_b.to(wide)).pow(2).sum() * (w / (n * k))  # local pairs, weight W·B_r/N on the local MSE
        if layout.path == "rows":
            a_all, b_all, _ = _gather_rows(layout, z_a, z_b, same=True)
            params = dict(sim_coeff=0.0, std_coeff=std_coeff, cov_coeff=cov_coeff, eps=eps)
            var_cov = _backend.run("vicreg", backend, (a_all, b_all), params, reference.vicreg_loss)
        else:
            ac, bc = _centred([z_a.to(wide), z_b.to(wide)], layout)
            cov_a, cov_b = _AllReduceSame.apply(torch.stack([ac.T @ ac, bc.T @ bc])) / (n - 1)
            var = _std_hinge(cov_a.diagonal(), eps) / 2 + _std_hinge(cov_b.diagonal(), eps) / 2
            cov = _off_diagonal_square_sum(cov_a) / k + _off_diagonal_square_sum(cov_b) / k
            var_cov = std_coeff * var + cov_coeff * cov
        return _times_world(var_cov, layout) + sim_coeff * inv


def barlow_twins_loss(z_a, z_b, *, gather=True, backend="auto", lambd=0.0051, eps=1e-5):
    """Barlow Twins over the global batch, with global batch-norm statistics.

    rows: AG of [z_a | z_b], the fused kernel on the global views; sums: AR of 2K column
    sums, AR of [Σ(a-μ_a)², Σ(b-μ_b)², (a-μ_a)ᵀ(b-μ_b)] (2K + K² values; B_r·K² multiply-adds
    per rank). No backward collective.
    """
    path = _requested_path(gather)
    _backend.resolve("barlow_twins", backend, z_a.device)
    layout = _exchange_layout("barlow_twins", z_a, path=path)
    wide = _wide(z_a.dtype)
    n, k = layout.n, layout.k
    with _no_autocast(z_a.device):
        if layout.path == "rows":
            a_all, b_all, _ = _gather_rows(layout, z_a, z_b, same=True)
            loss = _backend.run("barlow_twins", backend, (a_all, b_all), dict(lambd=lambd, eps=eps), reference.barlow_twins_loss)
        else:
            ac, bc = _centred([z_a.to(wide), z_b.to(wide)], layout)
            stats = _AllReduceSame.apply(torch.cat([ac.pow(2).sum(dim=0), bc.pow(2).sum(dim=0), (ac.T @ bc).reshape(-1)]))
            inv_std_a = torch.rsqrt(stats[:k] / n + eps)
            inv_std_b = torch.rsqrt(stats[k:2 * k] / n + eps)
            c = stats[2 * k:].view(k, k) * inv_std_a[:, None] * inv_std_b[None, :] / n
            loss = (c.diagonal() - 1).pow(2).sum() + lambd * _off_diagonal_square_sum(c)
        return _times_world(loss, layout)


def vicreg_relation_loss(z, *, labels=None, pairs=None, gather=True, backend="auto", alpha=25.0, beta=1.0, gamma=25.0,
                         eps=1e-4):
    """VICReg relation form over the global batch; ``pairs`` hold global row indices.

    Both paths gather the rows (labels in the same buffer; pairs in a second all-gather)
    and take the invariance term over the whole global batch on every rank. rows: the fused
    kernel on the global batch; sums: the var/cov terms from the AR of the centred K×K Gram
    (B_r·K² multiply-adds per rank). Every rank returns the global loss; no backward collective.
    """
    path = _requested_path(gather)
    _backend.resolve("vicreg_relation", backend, z.device)
    layout = _exchange_layout("vicreg_relation", z, relation=True, labels=labels, pairs=pairs, path=path)
    wide = _wide(z.dtype)
    n, k = layout.n, layout.k
    params = dict(alpha=alpha, beta=beta, gamma=gamma, eps=eps)
    with _no_autocast(z.device):
        z_all, labels_all = _gather_rows(layout, z, same=True, extra=labels)
        pairs_all = _gather_pairs(pairs, layout) if pairs is not None else None
        if layout.path == "rows":
            loss = _backend.run("vicreg_relation", backend, (z_all, labels_all, pairs_all), params,
                                reference.vicreg_relation_loss)
        else:
            mean = z_all.detach().to(wide).mean(dim=0)  # a constant, see _centred
            zc = z.to(wide) - mean
            cov_m = _AllReduceSame.apply(zc.T @ zc) / (n - 1)
            total, nnz = covariance_ops._relation_invariance(z_all, labels_all, pairs_all)
            inv = total.to(wide) / (nnz.to(wide).clamp(min=1) * k)
            loss = alpha * _std_hinge(cov_m.diagonal(), eps) + beta * _off_diagonal_square_sum(cov_m) / k + gamma * inv
        return _times_world(loss, layout)


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
        z_all, labels_all = _gather_rows(layout, z, same=False, wide=wide, extra=labels)
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
        z_all, _ = _gather_rows(both, torch.cat([z_a, z_b]), same=False, wide=wide)
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
        both, labels_all = _gather_rows(layout, torch.cat([z_a, z_b], dim=1), same=False, wide=wide, extra=labels)
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
        b_all, labels_all = _gather_rows(layout, z_b, same=False, wide=wide, extra=labels)
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


def matrix_ssl_loss(p, z, single, *, backend="auto"):
    """Matrix-SSL over the global batch: one all-gather of [p | z], then ``single(p_all, z_all)``
    (the single-process loss, handed in by :mod:`sslops.functional`) on every rank.

    Collectives: layout AG; AG of W·max B_r·2K input elements; no backward collective.
    Work per rank: the single-process cost at N rows.
    """
    _backend.resolve("matrix_ssl", backend, p.device)
    return global_batch_loss("matrix_ssl", single, p, z)
