"""gather=True under torch.distributed (conventions §5), with the gloo backend on 127.0.0.1.

One spawned process group per world size W = 1, 2, 3 runs every check inside it (spawning
is the slow part on two cores). Every rank holds different rows and the local batch
sizes differ; each rank also builds the global batch (the concatenation in rank order)
and computes the single-process float64 reference on it, then checks, per loss:

* the mean over ranks of the per-rank loss equals the single-process loss (and, for the
  covariance-type losses other than two-view VICReg, and Matrix-SSL, every rank's loss
  equals it);
* with the loss scaled by 0.7 before backward, z.grad on rank r equals
  0.7·W·∂L_global/∂z on rank r's rows;
* for VICReg, VICReg over G (labels, pairs, no pairs) and Barlow Twins along both forward
  paths (gather="rows", gather="sums") and the automatic choice (gather=True); strided
  inputs; fp32/bf16 inputs (fp32 loss, gradients in the input dtype); fp32 rows whose mean
  is 300 standard deviations; the padded reduce-scatter row-gradient path NCCL takes for
  InfoNCE's per-rank anchors;
* the rows path runs the op layer's fused kernel (sslops::vicreg_fwd, ...) on the global
  batch, forward and backward, and the sums path none (seen by a dispatch mode);
* at W = 2, the bytes each call hands to the collectives (the torch.distributed functions
  wrapped and counted) at (N_global, K) = (256, 4096) and (8192, 128): no backward
  collective for the covariance-type losses and Matrix-SSL, each path's bytes equal to
  sslops.distributed's cost model, the automatic choice never moving more than the other;
* the layout checks raise the same clear error on every rank (K or dtype mismatch,
  invalid labels on one rank, pairs outside the global range, different paths asked for)
  and leave the group usable;
* a tiny encoder trained a few steps under DistributedDataParallel, along each path, ends
  with the same parameters as single-process training on the global batch;
* after the teardown no gloo thread is left (the order of examples/ddp_train.py).

For W = 1 the public functions run the single-process path, so the checks call
``sslops.distributed`` directly there (a one-rank group through the collectives).
"""

import functools
import gc
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import sslops
from sslops import distributed as sd

if dist.is_available():
    # before any init_process_group: see examples/ddp_train.py (this module's import binds no group)
    import torch.distributed.nn.functional  # noqa: F401

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
K = 5
# Uneven local batches per world size (a rank of one row included at W = 3).
SIZES = {1: [6], 2: [4, 7], 3: [5, 1, 6]}
EQUAL = {1: [5], 2: [4, 4], 3: [3, 3, 3]}
WORKER_TIMEOUT_S = 150


# ----------------------------------------------------------------------------- process plumbing


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_threads():
    """Names of this process's gloo threads (Linux; [] elsewhere)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as fh:
                names.append(fh.read().strip())
        except OSError:
            continue
    return [name for name in names if "gloo" in name]


def _worker(rank, world, port, check):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        check(rank, world)
        dist.barrier()  # no rank leaves while a peer still sends
    finally:
        gc.collect()  # the checks' DDP modules (their reducers hold the process group) are gone
        dist.destroy_process_group()
    # the examples/ddp_train.py teardown (issue 12): the group's destructor has joined gloo's
    # threads, none is left to touch Python objects while the interpreter shuts down
    assert not _gloo_threads(), f"gloo threads outlive destroy_process_group: {_gloo_threads()}"


def _spawn(world, check, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ctx = mp.start_processes(_worker, args=(world, _free_port(), check), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers (W = {world}) did not finish in {WORKER_TIMEOUT_S} s (a hang?)")


# ----------------------------------------------------------------------------- data


def _rows(world, sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.3, 2.0, K, dtype=F64)
    za = torch.randn(n, K, generator=g, dtype=F64) * scales + 0.5
    zb = za + 0.4 * torch.randn(n, K, generator=g, dtype=F64)
    labels = torch.randint(0, 3, (n,), generator=g)
    labels[-1] = 7  # an anchor without positives (a negative only)
    p = torch.randn(n, K, generator=g, dtype=F64)
    q = p + 0.3 * torch.randn(n, K, generator=g, dtype=F64)
    return za, zb, labels, p, q


def _pairs(n, seed):
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randint(0, n, (2, 2 * n), generator=g)
    extra = torch.tensor([[0, 1, 1, 2], [1, 0, 1, 0]])  # a duplicate (both ways) and a self-pair
    return torch.cat([pairs, extra], dim=1)


def _share(pairs, rank, world):
    """Rank r's share of the global pair list (the union over ranks is the full list)."""
    return pairs[:, rank::world]


# ----------------------------------------------------------------------------- the checks


def _close(actual, expected, what, tol=1e-10):
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _check_loss(name, rank, world, sizes, dist_fn, ref_fn, global_inputs, same_everywhere, grad_scale=0.7):
    """dist_fn(*local) on every rank against ref_fn(*global) (float64 single process)."""
    rows = _rows(world, sizes, rank)
    local = [t[rows].clone().requires_grad_() for t in global_inputs]
    loss = dist_fn(*local)
    (loss * grad_scale).backward()

    full = [t.clone().requires_grad_() for t in global_inputs]
    expected = ref_fn(*full)
    expected.backward()

    assert loss.dtype == F64 and loss.dim() == 0, f"{name}: loss {loss.dtype} {tuple(loss.shape)}"
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    _close(mean / world, expected.detach(), f"{name} (W={world}, rank {rank}): mean over ranks of the loss")
    if same_everywhere:
        _close(loss.detach(), expected.detach(), f"{name} (W={world}, rank {rank}): per-rank loss")
    for i, (mine, ref) in enumerate(zip(local, full)):
        _close(mine.grad, grad_scale * world * ref.grad[rows], f"{name} (W={world}, rank {rank}): grad of input {i}")
    return loss.detach()


def _public_or_direct(world, path=True):
    """Through the public API when W > 1; straight into sslops.distributed when W = 1.

    ``path`` is the ``gather`` value of the covariance-type losses (True, "rows", "sums").
    """
    if world > 1:
        return dict(
            vicreg=lambda a, b: sslops.vicreg_loss(a, b, gather=path),
            barlow=lambda a, b: sslops.barlow_twins_loss(a, b, gather=path),
            relation=lambda z, **kw: sslops.vicreg_relation_loss(z, gather=path, **kw),
            info_nce=lambda z, **kw: sslops.info_nce_loss(z, gather=True, **kw),
            nt_xent=lambda a, b, **kw: sslops.nt_xent_loss(a, b, gather=True, **kw),
            matrix=lambda p, z: sslops.matrix_ssl_loss(p, z, gather=True),
            clip=lambda a, b, t, **kw: sslops.clip_loss(a, b, t, gather=True, **kw),
            siglip=lambda a, b, t, c, **kw: sslops.siglip_loss(a, b, t, c, gather=True, **kw),
        )
    return dict(
        vicreg=lambda a, b: sd.vicreg_loss(a, b, gather=path),
        barlow=lambda a, b: sd.barlow_twins_loss(a, b, gather=path),
        relation=lambda z, **kw: sd.vicreg_relation_loss(z, gather=path, **kw),
        info_nce=lambda z, **kw: sd.info_nce_loss(z, **kw),
        nt_xent=lambda a, b, **kw: sd.nt_xent_loss(a, b, **kw),
        matrix=lambda p, z: sd.matrix_ssl_loss(p, z, functools.partial(sslops.matrix_ssl_loss, gather=False)),
        clip=lambda a, b, t, **kw: sd.clip_loss(a, b, logit_scale=t, **kw),
        siglip=lambda a, b, t, c, **kw: sd.siglip_loss(a, b, logit_scale=t, logit_bias=c, **kw),
    )


def _ref(fn, **kw):
    return lambda *t: fn(*t, gather=False, backend="reference", **kw)


PATHS = ("rows", "sums", True)  # the gather values of the covariance-type losses: both forward paths and auto


def _check_covariance_losses(rank, world, sizes, path):
    """VICReg, VICReg over G (labels, pairs, no pairs) and Barlow Twins along one forward path."""
    n = sum(sizes)
    rows = _rows(world, sizes, rank)
    za, zb, labels, _, _ = _data(n, seed=100 + world)
    pairs = _pairs(n, seed=200 + world)
    api = _public_or_direct(world, path)
    tag = f"gather={path!r}"

    _check_loss(f"vicreg {tag}", rank, world, sizes, api["vicreg"], _ref(sslops.vicreg_loss), [za, zb], False)
    _check_loss(f"barlow_twins {tag}", rank, world, sizes, api["barlow"], _ref(sslops.barlow_twins_loss), [za, zb], True)
    _check_loss(f"vicreg_relation labels {tag}", rank, world, sizes,
                lambda z: api["relation"](z, labels=labels[rows]),
                lambda z: sslops.vicreg_relation_loss(z, labels=labels, backend="reference"), [za], True)
    _check_loss(f"vicreg_relation pairs (shared) {tag}", rank, world, sizes,
                lambda z: api["relation"](z, pairs=_share(pairs, rank, world)),
                lambda z: sslops.vicreg_relation_loss(z, pairs=pairs, backend="reference"), [za], True)
    _check_loss(f"vicreg_relation pairs (full list on every rank) {tag}", rank, world, sizes,
                lambda z: api["relation"](z, pairs=pairs),
                lambda z: sslops.vicreg_relation_loss(z, pairs=pairs, backend="reference"), [za], True)
    empty = torch.zeros((2, 0), dtype=torch.int64)  # every rank passes an empty list: inv = 0
    _check_loss(f"vicreg_relation no pairs {tag}", rank, world, sizes, lambda z: api["relation"](z, pairs=empty),
                lambda z: sslops.vicreg_relation_loss(z, pairs=empty, backend="reference"), [za], True)

    # Equal local batches: the per-rank VICReg loss is the official code's per-rank value
    # (the local MSE unweighted, global var/cov).
    eq = EQUAL[world]
    ea, eb, *_ = _data(sum(eq), seed=300 + world)
    mine = _check_loss(f"vicreg equal batches {tag}", rank, world, eq, api["vicreg"], _ref(sslops.vicreg_loss), [ea, eb], False)
    er = _rows(world, eq, rank)
    full = sslops.vicreg_loss(ea, eb, backend="reference")
    full_inv = (ea - eb).pow(2).mean()
    local_inv = (ea[er] - eb[er]).pow(2).mean()
    _close(mine, full - 25.0 * full_inv + 25.0 * local_inv, f"vicreg equal batches {tag} (rank {rank}): official per-rank value")


def _check_every_loss(rank, world):
    sizes = SIZES[world]
    n = sum(sizes)
    za, zb, labels, p, q = _data(n, seed=100 + world)
    pairs = _pairs(n, seed=200 + world)
    api = _public_or_direct(world)

    for path in PATHS:
        _check_covariance_losses(rank, world, sizes, path)
    _check_info_nce(rank, world, sizes, za, labels, pairs, api)
    _check_loss("nt_xent", rank, world, sizes, api["nt_xent"], _ref(sslops.nt_xent_loss), [za, zb], False)
    _check_loss("matrix_ssl", rank, world, sizes, api["matrix"], _ref(sslops.matrix_ssl_loss), [p, q], True)
    _check_contrastive_family(rank, world, sizes, za, zb, labels, pairs, api)

    _check_fused_kernel_on_rows_path(rank, world, sizes, za, zb, labels)
    _check_padded_reduce_scatter(rank, world, sizes, za, zb, labels, api)
    _check_noncontiguous(rank, world, sizes, za, zb, labels)
    if world > 1:
        _check_low_precision(rank, world, sizes, za, zb, labels)
        _check_large_mean_fp32(rank, world, sizes)
        _check_errors(rank, world, sizes, za, labels, pairs)
    for path in ("rows", "sums"):
        _check_ddp(rank, world, sizes, path)
    if world == 2:
        _check_traffic(rank, world)


def _check_info_nce(rank, world, sizes, za, labels, pairs, api):
    n = sum(sizes)
    rows = _rows(world, sizes, rank)
    _check_loss("info_nce labels", rank, world, sizes,
                lambda z: api["info_nce"](z, labels=labels[rows], temperature=0.3),
                lambda z: sslops.info_nce_loss(z, labels=labels, temperature=0.3, backend="reference"), [za], False)
    _check_loss("info_nce pairs (full list on every rank)", rank, world, sizes,
                lambda z: api["info_nce"](z, pairs=pairs, temperature=0.3),
                lambda z: sslops.info_nce_loss(z, pairs=pairs, temperature=0.3, backend="reference"), [za], False)
    _check_loss("info_nce pairs (shared)", rank, world, sizes,
                lambda z: api["info_nce"](z, pairs=_share(pairs, rank, world), temperature=0.3),
                lambda z: sslops.info_nce_loss(z, pairs=pairs, temperature=0.3, backend="reference"), [za], False)
    empty = torch.zeros((2, 0), dtype=torch.int64)  # no pairs at all: InfoNCE = 0
    _check_loss("info_nce no pairs", rank, world, sizes, lambda z: api["info_nce"](z, pairs=empty),
                lambda z: sslops.info_nce_loss(z, pairs=empty, backend="reference"), [za], False)
    # SupCon labels where no anchor has a positive: loss 0, zero gradients, no NaN.
    unique = torch.arange(n)
    loss = _check_loss("info_nce no positives", rank, world, sizes,
                       lambda z: api["info_nce"](z, labels=unique[rows]),
                       lambda z: sslops.info_nce_loss(z, labels=unique, backend="reference"), [za], False)
    assert loss == 0


def _check_loss_shared(name, rank, world, sizes, dist_fn, ref_fn, row_inputs, shared_inputs, grad_scale=0.7):
    """:func:`_check_loss` with inputs every rank holds whole (a queue, a temperature, a scale, a bias):
    their gradient on each rank is that of the rank's own loss, so the mean over ranks is ∂L/∂x."""
    rows = _rows(world, sizes, rank)
    local = [t[rows].clone().requires_grad_() for t in row_inputs]
    shared = [t.clone().requires_grad_() for t in shared_inputs]
    loss = dist_fn(*local, *shared)
    (loss * grad_scale).backward()
    full = [t.clone().requires_grad_() for t in row_inputs]
    ref_shared = [t.clone().requires_grad_() for t in shared_inputs]
    expected = ref_fn(*full, *ref_shared)
    expected.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    _close(mean / world, expected.detach(), f"{name} (W={world}, rank {rank}): mean over ranks of the loss")
    for i, (mine, ref) in enumerate(zip(local, full)):
        _close(mine.grad, grad_scale * world * ref.grad[rows], f"{name} (W={world}, rank {rank}): grad of input {i}")
    for i, (mine, ref) in enumerate(zip(shared, ref_shared)):
        total = mine.grad.clone()
        dist.all_reduce(total)
        _close(total / world, grad_scale * ref.grad, f"{name} (W={world}, rank {rank}): mean grad of shared input {i}")


def _check_contrastive_family(rank, world, sizes, za, zb, labels, pairs, api):
    """Queues, in_batch_negatives=False, DCL/DCLW, a learnable temperature, CLIP and SigLIP (conventions §3b)."""
    rows = _rows(world, sizes, rank)
    g = torch.Generator().manual_seed(17)
    queue = torch.randn(4, K, generator=g, dtype=F64)  # every rank holds the same queue
    tau = torch.tensor(0.3, dtype=F64)
    share = _share(pairs, rank, world)
    cases = [
        ("info_nce queue + DCL", lambda z, q, t: api["info_nce"](z, labels=labels[rows], temperature=t, negatives=q,
                                                                   decoupled=True),
         lambda z, q, t: sslops.info_nce_loss(z, labels=labels, temperature=t, negatives=q, decoupled=True,
                                              backend="reference"), [za], [queue, tau]),
        ("info_nce pairs DCLW", lambda z, t: api["info_nce"](z, pairs=share, temperature=t, decoupled="weighted"),
         lambda z, t: sslops.info_nce_loss(z, pairs=pairs, temperature=t, decoupled="weighted", backend="reference"),
         [za], [tau]),
        ("nt_xent queue, no in-batch negatives (MoCo)",
         lambda a, b, q, t: api["nt_xent"](a, b, temperature=t, negatives=q, in_batch_negatives=False),
         lambda a, b, q, t: sslops.nt_xent_loss(a, b, temperature=t, negatives=q, in_batch_negatives=False,
                                                backend="reference"), [za, zb], [queue, tau]),
        ("nt_xent MoCo DCLW", lambda a, b, q, t: api["nt_xent"](a, b, temperature=t, negatives=q, in_batch_negatives=False,
                                                               decoupled="weighted"),
         lambda a, b, q, t: sslops.nt_xent_loss(a, b, temperature=t, negatives=q, in_batch_negatives=False,
                                                decoupled="weighted", backend="reference"), [za, zb], [queue, tau]),
        ("nt_xent queue DCLW", lambda a, b, q, t: api["nt_xent"](a, b, temperature=t, negatives=q, decoupled="weighted"),
         lambda a, b, q, t: sslops.nt_xent_loss(a, b, temperature=t, negatives=q, decoupled="weighted",
                                                backend="reference"), [za, zb], [queue, tau]),
        ("clip", lambda a, b, t: api["clip"](a, b, t), lambda a, b, t: sslops.clip_loss(a, b, t, backend="reference"),
         [za, zb], [tau * 20]),
        ("clip labels", lambda a, b, t: api["clip"](a, b, t, labels=labels[rows]),
         lambda a, b, t: sslops.clip_loss(a, b, t, labels=labels, backend="reference"), [za, zb], [tau * 20]),
        ("siglip", lambda a, b, t, c: api["siglip"](a, b, t, c),
         lambda a, b, t, c: sslops.siglip_loss(a, b, t, c, backend="reference"), [za, zb], [tau * 30, tau * -10]),
        ("siglip labels", lambda a, b, t, c: api["siglip"](a, b, t, c, labels=labels[rows], normalize=False),
         lambda a, b, t, c: sslops.siglip_loss(a, b, t, c, labels=labels, normalize=False, backend="reference"),
         [za, zb], [tau, tau * -3]),
    ]
    for name, dist_fn, ref_fn, row_inputs, shared in cases:
        _check_loss_shared(name, rank, world, sizes, dist_fn, ref_fn, row_inputs, shared)
    # NegativeQueue: every rank enqueues its own keys; all ranks end with the same queue, in rank order
    queue_module = sslops.nn.NegativeQueue(5, K, dtype=F64)
    queue_module.enqueue(za[rows])  # W > 1: the keys of every rank, gathered in rank order
    expected = za[-5:] if za.shape[0] >= 5 else za
    _close(queue_module.negatives.sort(dim=0).values, expected.sort(dim=0).values, f"NegativeQueue (W={world})")


class _OpLog(TorchDispatchMode):
    """The sslops custom ops called under it, with the shape of their first tensor argument."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("sslops::"):
            self.calls.append((name, tuple(args[1].shape) if name.endswith("_bwd") else tuple(args[0].shape), args))
        return func(*args, **(kwargs or {}))


def _check_fused_kernel_on_rows_path(rank, world, sizes, za, zb, labels, backend="cpu", dtype=F64, tol=1e-10):
    """gather="rows" runs the op layer's fused kernel of ``backend`` on the global batch, forward
    and backward, with the single-process float64 numbers; gather="sums" runs none (plain
    matmuls on the local rows)."""
    n = sum(sizes)
    rows = _rows(world, sizes, rank)
    cases = (("vicreg", lambda a, b, **kw: sd.vicreg_loss(a, b, **kw), ("sslops::vicreg_fwd", "sslops::vicreg_bwd")),
             ("barlow_twins", lambda a, b, **kw: sd.barlow_twins_loss(a, b, **kw),
              ("sslops::barlow_twins_fwd", "sslops::barlow_twins_bwd")),
             ("vicreg_relation", lambda a, b, **kw: sd.vicreg_relation_loss(a, labels=labels[rows], **kw),
              ("sslops::vicreg_varcov_fwd", "sslops::vicreg_varcov_bwd")))
    for name, fn, (fwd, bwd) in cases:
        if backend not in sslops.kernel_backends(name, "cpu"):
            pytest.skip(f"no {backend} kernels here")
        for path in ("rows", "sums"):
            a, b = za[rows].to(dtype).requires_grad_(), zb[rows].to(dtype).requires_grad_()
            with _OpLog() as log:
                loss = fn(a, b, gather=path, backend=backend)
                (loss * 0.7).backward()
            called = {c[0]: c[1] for c in log.calls}
            if path == "rows":
                assert called.get(fwd) == (n, K) and called.get(bwd) == (n, K), (name, rank, log.calls)
                assert all(c[2][-3 if c[0] == fwd else -2] == backend for c in log.calls if c[0] in (fwd, bwd)), (name, log.calls)
            else:
                assert fwd not in called and bwd not in called, (name, path, log.calls)
            # the same numbers as the float64 single process on the same (rounded) values
            a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
            ref = fn(a64, b64, gather=path, backend="reference")
            (ref * 0.7).backward()
            _close(loss, ref, f"{name} {path} {backend}", tol=tol)
            _close(a.grad, a64.grad, f"{name} {path} {backend} grad", tol=tol)


def _check_triton_rows_path(rank, world):
    sizes = SIZES[world]
    za, zb, labels, _, _ = _data(sum(sizes), seed=400 + world)
    _check_fused_kernel_on_rows_path(rank, world, sizes, za, zb, labels, backend="triton", dtype=torch.float32, tol=1e-4)


def _check_padded_reduce_scatter(rank, world, sizes, za, zb, labels, api):
    """The row-gradient path NCCL takes for per-rank anchors (padded reduce-scatter), run here with gloo."""
    try:
        sd._reduce_scatter(torch.zeros(1), torch.zeros(world))
    except (RuntimeError, NotImplementedError):  # an older gloo without reduce-scatter: on every rank alike
        return
    rows = _rows(world, sizes, rank)
    sd.ROW_GRAD_REDUCE = "reduce_scatter"
    try:
        _check_loss("info_nce labels (reduce-scatter)", rank, world, sizes,
                    lambda z: api["info_nce"](z, labels=labels[rows], temperature=0.3),
                    lambda z: sslops.info_nce_loss(z, labels=labels, temperature=0.3, backend="reference"), [za], False)
        _check_loss("nt_xent (reduce-scatter)", rank, world, sizes, api["nt_xent"], _ref(sslops.nt_xent_loss), [za, zb], False)
        _check_loss_shared("clip (reduce-scatter)", rank, world, sizes, lambda a, b, t: api["clip"](a, b, t),
                           lambda a, b, t: sslops.clip_loss(a, b, t, backend="reference"), [za, zb],
                           [torch.tensor(6.0, dtype=F64)])
    finally:
        sd.ROW_GRAD_REDUCE = "auto"


def _transposed_storage(t):
    out = torch.empty(t.shape[::-1], dtype=t.dtype).t()
    out.copy_(t)
    return out


def _check_noncontiguous(rank, world, sizes, za, zb, labels):
    """Strided (transposed-storage) local inputs give the same loss and gradients, on both paths."""
    rows = _rows(world, sizes, rank)
    for path in ("rows", "sums"):
        api = _public_or_direct(world, path)
        for name, fn in (("vicreg", lambda a, b: api["vicreg"](a, b)), ("barlow", lambda a, b: api["barlow"](a, b)),
                         ("nt_xent", lambda a, b: api["nt_xent"](a, b)),
                         ("relation", lambda a, b: api["relation"](a, labels=labels[rows]) + api["info_nce"](b, labels=labels[rows]))):
            results = []
            for make in (lambda t: t.clone(), _transposed_storage):
                a, b = make(za[rows]).requires_grad_(), make(zb[rows]).requires_grad_()
                if make is _transposed_storage and a.shape[0] > 1:
                    assert not a.is_contiguous()
                loss = fn(a, b)
                loss.backward()
                results.append((loss.detach(), a.grad, b.grad))
            for x, y in zip(*results):
                _close(x, y, f"{name} non-contiguous, gather={path!r} (W={world}, rank {rank})")


def _check_low_precision(rank, world, sizes, za, zb, labels):
    """fp32/bf16 inputs: fp32 loss, gradients in the input dtype, close to float64 on the same values."""
    rows = _rows(world, sizes, rank)
    for path in ("rows", "sums"):
        def total_of(a, b):
            return (sslops.vicreg_loss(a, b, gather=path) + sslops.barlow_twins_loss(a, b, gather=path)
                    + sslops.vicreg_relation_loss(a, labels=labels[rows], gather=path)
                    + sslops.info_nce_loss(a, labels=labels[rows], gather=True) + sslops.nt_xent_loss(a, b, gather=True))

        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
            a = za[rows].to(dtype).requires_grad_()
            b = zb[rows].to(dtype).requires_grad_()
            for piece in (sslops.vicreg_loss(a, b, gather=path), sslops.barlow_twins_loss(a, b, gather=path),
                          sslops.vicreg_relation_loss(a, labels=labels[rows], gather=path)):
                assert piece.dtype == torch.float32, (dtype, path, piece.dtype)
            total = total_of(a, b)
            total.backward()
            assert a.grad.dtype == dtype and b.grad.dtype == dtype
            # against the float64 distributed result on the same rounded inputs
            a64 = a.detach().double().requires_grad_()
            b64 = b.detach().double().requires_grad_()
            total64 = total_of(a64, b64)
            total64.backward()
            scale = float(total64.abs()) + 1
            _close(total, total64, f"{dtype} loss, gather={path!r}", tol=tol * scale)
            _close(a.grad, a64.grad, f"{dtype} grad, gather={path!r}", tol=tol * scale)


def _check_large_mean_fp32(rank, world, sizes):
    """Exact centring: fp32 rows with |mean| = 300·std keep fp32 accuracy on both paths
    (the sums path centres on the global mean first; Σzᵀz - Nμμᵀ would not)."""
    n = sum(sizes)
    rows = _rows(world, sizes, rank)
    g = torch.Generator().manual_seed(11)
    za = (torch.randn(n, K, generator=g, dtype=F64) * 0.5 + 300.0).float().double()  # exactly representable in fp32
    zb = (za + 0.3 * torch.randn(n, K, generator=g, dtype=F64)).float().double()
    for path in ("rows", "sums"):
        for name, fn in (("vicreg", sslops.vicreg_loss), ("barlow_twins", sslops.barlow_twins_loss)):
            a = za[rows].float().requires_grad_()
            loss = fn(a, zb[rows].float(), gather=path)
            (loss * 0.7).backward()
            ref_a = za.clone().requires_grad_()
            ref = fn(ref_a, zb, backend="reference")
            ref.backward()
            mean = loss.detach().double()
            dist.all_reduce(mean)
            _close(mean / world, ref.detach(), f"{name} fp32, mean 300, gather={path!r} (W={world})", tol=1e-4)
            _close(a.grad, 0.7 * world * ref_a.grad[rows], f"{name} fp32 grad, mean 300, gather={path!r} (W={world})", tol=1e-4)


def _expect_error(fn, *needles):
    """fn() must raise ValueError/TypeError on this rank; every rank must see an error."""
    try:
        fn()
    except (ValueError, TypeError) as exc:
        message = str(exc)
    else:
        message = None
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    assert all(m is not None for m in messages), f"not every rank raised: {messages}"
    assert all(needle in message for needle in needles), (needles, message)
    return messages


def _check_errors(rank, world, sizes, za, labels, pairs):
    rows = _rows(world, sizes, rank)
    z = za[rows]
    last = world - 1
    n = sum(sizes)

    # a rank with a different K: the same message on every rank, no hang
    bad_k = torch.randn(sizes[rank], K + 1, dtype=F64) if rank == last else z
    msgs = _expect_error(lambda: sslops.vicreg_loss(bad_k, bad_k, gather=True), "same number of features K", f"rank {last}: K = {K + 1}")
    assert len(set(msgs)) == 1, msgs
    msgs = _expect_error(lambda: sslops.info_nce_loss(bad_k, labels=labels[rows], gather=True), "same number of features K")
    assert len(set(msgs)) == 1, msgs
    # a rank with a different dtype
    bad_dtype = z.float() if rank == 0 else z
    msgs = _expect_error(lambda: sslops.matrix_ssl_loss(bad_dtype, bad_dtype, gather=True), "same dtype", "rank 0: K = 5, float32")
    assert len(set(msgs)) == 1, msgs
    # labels of the wrong length on one rank: that rank says what is wrong, the others name it
    bad_labels = labels[rows][:-1] if rank == last else labels[rows]
    msgs = _expect_error(lambda: sslops.info_nce_loss(z, labels=bad_labels, gather=True), "gather=True")
    assert "labels must have shape" in msgs[last] and f"rank(s) [{last}]" in msgs[0], msgs
    # labels on some ranks and pairs on others
    mixed = dict(labels=labels[rows]) if rank == 0 else dict(pairs=_share(pairs, rank, world))
    _expect_error(lambda: sslops.vicreg_relation_loss(z, gather=True, **mixed), "same kind of relation")
    # pairs must hold global indices below N (a local-range check would accept n - 1)
    out_of_range = torch.tensor([[0], [n]]) if rank == 0 else _share(pairs, rank, world)
    msgs = _expect_error(lambda: sslops.info_nce_loss(z, pairs=out_of_range, gather=True), f"[0, {n})", f"rank 0 passed {n}")
    assert len(set(msgs)) == 1, msgs
    negative = torch.tensor([[-1], [0]]) if rank == last else _share(pairs, rank, world)
    _expect_error(lambda: sslops.vicreg_relation_loss(z, pairs=negative, gather=True), f"rank {last} passed -1")
    # a check in sslops.functional failing on one rank only (z_a, z_b of different shapes there;
    # a bad temperature there): that rank says what is wrong, the others name it, nobody hangs
    short = z[:-1] if rank == last else z
    msgs = _expect_error(lambda: sslops.vicreg_loss(z, short, gather=True), "gather=True")
    assert "z_a and z_b must have the same shape" in msgs[last] and f"rank(s) [{last}]" in msgs[0], msgs
    tau = -1.0 if rank == 0 else 0.1
    msgs = _expect_error(lambda: sslops.info_nce_loss(z, labels=labels[rows], temperature=tau, gather=True), "gather=True")
    assert "temperature must be" in msgs[0] and (world == 1 or "rank(s) [0]" in msgs[last]), msgs
    # ranks asking for different forward paths (the argument, or SSLOPS_GATHER)
    msgs = _expect_error(lambda: sslops.barlow_twins_loss(z, z, gather="rows" if rank == 0 else "sums"), "same path",
                         "rank 0: 'rows'", "rank 1: 'sums'")
    assert len(set(msgs)) == 1, msgs
    # ranks calling different losses
    _expect_error(lambda: (sslops.barlow_twins_loss(z, z, gather=True) if rank == 0 else sslops.vicreg_loss(z, z, gather=True)),
                  "different sslops losses")
    # the group is still in step afterwards
    loss = sslops.info_nce_loss(z, pairs=pairs, gather=True)
    assert torch.isfinite(loss)


class _Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, K))

    def forward(self, x):
        return self.net(x)


def _ssl_objective(za, zb, labels, gather, path):
    """Several sslops losses in one backward: several collectives interleaved with DDP's."""
    cov_gather = path if gather else False
    return (sslops.vicreg_loss(za, zb, gather=cov_gather, backend="reference") * 0.1
            + sslops.barlow_twins_loss(za, zb, gather=cov_gather)
            + sslops.vicreg_relation_loss(torch.cat([za, zb]), labels=labels, gather=cov_gather) * 0.1
            + sslops.nt_xent_loss(za, zb, gather=gather)
            + sslops.info_nce_loss(torch.cat([za, zb]), labels=labels, gather=gather)
            + sslops.matrix_ssl_loss(za, zb, gather=gather))


def _check_ddp(rank, world, sizes, path):
    from torch.nn.parallel import DistributedDataParallel as DDP

    n = sum(sizes)
    rows = _rows(world, sizes, rank)
    g = torch.Generator().manual_seed(7)
    x_a = torch.randn(n, 6, generator=g, dtype=F64)
    x_b = x_a + 0.2 * torch.randn(n, 6, generator=g, dtype=F64)
    classes = torch.randint(0, 3, (n,), generator=g)

    torch.manual_seed(0)
    single = _Encoder().double()
    torch.manual_seed(0)
    ddp = DDP(_Encoder().double())
    opt_single = torch.optim.SGD(single.parameters(), lr=0.05, momentum=0.9)
    opt_ddp = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    local_labels = torch.cat([classes[rows], classes[rows]])
    global_labels = torch.cat([classes, classes])  # a row order of its own: the relation losses do not depend on it
    for _ in range(3):
        opt_single.zero_grad()
        z = single(torch.cat([x_a, x_b]))
        _ssl_objective(z[:n], z[n:], global_labels, gather=False, path=path).backward()
        opt_single.step()

        opt_ddp.zero_grad()
        b = sizes[rank]
        z = ddp(torch.cat([x_a[rows], x_b[rows]]))  # one forward per step (DDP's rule)
        _ssl_objective(z[:b], z[b:], local_labels, gather=True, path=path).backward()
        opt_ddp.step()
    for (name, mine), ref in zip(ddp.module.named_parameters(), single.parameters()):
        _close(mine.detach(), ref.detach(), f"DDP gather={path!r} (W={world}, rank {rank}) parameter {name}", tol=1e-9)


class _Traffic:
    """Wraps torch.distributed's collectives and adds up the bytes each call sends, per phase.

    Ring model (the one sslops.distributed documents): an all-reduce of S bytes sends
    2(W-1)/W·S per rank, an all-gather (W-1)/W of its output, a reduce-scatter (W-1)/W of
    its input. ``phase`` ("forward" or "backward") is set by the caller; every call is
    listed under it, so a backward collective of any kind shows up.
    """

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
             "broadcast", "all_to_all", "all_to_all_single", "all_gather_object", "barrier")

    def __init__(self, world):
        self.share = (world - 1) / world
        self.phase = "forward"
        self.sent = {"forward": 0.0, "backward": 0.0}
        self.calls = {"forward": [], "backward": []}

    @staticmethod
    def _bytes(t):
        return t.numel() * t.element_size()

    def _model(self, name, args):
        if name == "all_reduce":
            return 2 * self.share * self._bytes(args[0])
        if name == "all_gather":
            return self.share * sum(self._bytes(t) for t in args[0])
        if name in ("all_gather_into_tensor",):
            return self.share * self._bytes(args[0])
        if name == "reduce_scatter_tensor":
            return self.share * self._bytes(args[1])
        return float("nan")  # a collective sslops is not expected to call

    def __enter__(self):
        self._saved = {name: getattr(dist, name) for name in self.NAMES if hasattr(dist, name)}

        def wrap(name, fn):
            def counted(*args, **kwargs):
                self.calls[self.phase].append(name)
                self.sent[self.phase] += self._model(name, args)
                return fn(*args, **kwargs)

            return counted

        for name, fn in self._saved.items():
            setattr(dist, name, wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        return False


def _check_traffic(rank, world):
    """Bytes handed to the collectives, forward and backward, at (N_global, K) = (256, 4096) and
    (8192, 128), fp32, equal batches: no backward collective for any covariance-type loss (nor
    Matrix-SSL); each path moves exactly the bytes of sslops.distributed's cost model; the
    automatic choice moves no more than the other path and gives the same loss as forcing it."""
    for n, k in ((256, 4096), (8192, 128)):
        sizes = [n // world] * world
        rows = _rows(world, sizes, rank)
        g = torch.Generator().manual_seed(n + k)
        za = torch.randn(n, k, generator=g)
        zb = za + 0.5 * torch.randn(n, k, generator=g)
        labels = torch.randint(0, 10, (n,), generator=g)
        cases = [("vicreg", dict(), lambda a, b, path: sslops.vicreg_loss(a, b, gather=path)),
                 ("barlow_twins", dict(), lambda a, b, path: sslops.barlow_twins_loss(a, b, gather=path)),
                 ("vicreg_relation", dict(labels=True),
                  lambda a, b, path: sslops.vicreg_relation_loss(a, labels=labels[rows], gather=path))]
        if k <= 128:  # Matrix-SSL costs O(K³) per call: the narrow shape only
            cases.append(("matrix_ssl", dict(), lambda a, b, path: sslops.matrix_ssl_loss(a, b, gather=True)))
        for loss, kw, fn in cases:
            measured, values = {}, {}
            for path in (("rows", "sums", "auto") if loss != "matrix_ssl" else ("rows",)):
                a, b = za[rows].clone().requires_grad_(), zb[rows].clone().requires_grad_()
                with _Traffic(world) as traffic:
                    value = fn(a, b, True if path == "auto" else path)
                    traffic.phase = "backward"
                    value.backward()
                where = f"{loss} gather={path!r} at N={n}, K={k} (rank {rank})"
                assert traffic.calls["backward"] == [], f"{where}: backward collectives {traffic.calls['backward']}"
                measured[path], values[path] = traffic.sent["forward"], value.detach()
                if path != "auto":
                    model = sd.collective_bytes(loss, path, sizes, k, torch.float32, **kw)
                    assert model.backward == 0
                    assert abs(measured[path] - model.forward) <= 1e-9 * model.forward, (where, measured[path], model)
            if loss == "matrix_ssl":
                continue
            chosen = sd.choose_path(loss, sizes, k, torch.float32, **kw)
            other = "sums" if chosen == "rows" else "rows"
            assert measured["auto"] == measured[chosen] <= measured[other], (loss, n, k, measured)
            assert torch.equal(values["auto"], values[chosen]), (loss, n, k, values)
            expected = {("vicreg", 256): "rows", ("vicreg", 8192): "sums", ("barlow_twins", 256): "rows",
                        ("barlow_twins", 8192): "sums", ("vicreg_relation", 256): "rows", ("vicreg_relation", 8192): "rows"}
            assert chosen == expected[(loss, n)], (loss, n, k, chosen)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("world", [1, 2, 3])
def test_gather_matches_single_process(world, monkeypatch):
    _spawn(world, _check_every_loss, monkeypatch)


@pytest.mark.triton
def test_rows_path_runs_the_triton_kernels(monkeypatch):
    """The rows path on the Triton backend (the interpreter lane: TRITON_INTERPRET=1, CPU tensors)."""
    if "triton" not in sslops.kernel_backends("vicreg", "cpu"):
        pytest.skip("the Triton kernels do not run here (TRITON_INTERPRET=1 on CPU)")
    _spawn(2, _check_triton_rows_path, monkeypatch)


def test_no_process_group_is_single_process():
    assert not dist.is_initialized() and sd.world_size() == 1
    za, zb, labels, p, q = _data(7, seed=5)
    for fn, args, kw in ((sslops.vicreg_loss, (za, zb), {}), (sslops.barlow_twins_loss, (za, zb), {}),
                         (sslops.vicreg_relation_loss, (za,), dict(labels=labels)),
                         (sslops.info_nce_loss, (za,), dict(labels=labels)), (sslops.nt_xent_loss, (za, zb), {}),
                         (sslops.matrix_ssl_loss, (p, q), {})):
        _close(fn(*args, gather=True, **kw), fn(*args, gather=False, **kw), fn.__name__)


_EXAMPLE_WRAPPER = """
import runpy, sys
example, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(example, run_name="__main__")
sys.path.insert(0, {tests!r})
from test_distributed import _gloo_threads  # imported only now: it imports torch.distributed.nn.functional
if _gloo_threads():
    sys.exit(f"gloo threads outlive the example's main(): {{_gloo_threads()}}")
"""


def test_ddp_example_runs_under_torchrun(tmp_path):
    """The README's torchrun command exits 0, and its teardown leaves no gloo thread running
    into interpreter shutdown (the cause of issue 12's SIGABRTs; examples/stress_ddp.sh reruns it)."""
    wrapper = tmp_path / "run_example.py"
    wrapper.write_text(_EXAMPLE_WRAPPER.format(tests=str(ROOT / "tests")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(wrapper),
           str(ROOT / "examples" / "ddp_train.py"), "--steps", "3", "--batch-size", "8"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "world size 2" in out.stdout and "step 3" in out.stdout, out.stdout


def test_gather_values_are_checked():
    za, zb, labels, _, _ = _data(6, seed=9)
    with pytest.raises(ValueError, match="gather must be True, False, 'auto', 'rows' or 'sums', got 'fast'"):
        sslops.vicreg_loss(za, zb, gather="fast")
    with pytest.raises(ValueError, match="gather must be True or False for info_nce"):
        sslops.info_nce_loss(za, labels=labels, gather="rows")
    # without a process group a path name is the single-process loss, like gather=True
    for path in sd.GATHER_PATHS:
        _close(sslops.barlow_twins_loss(za, zb, gather=path), sslops.barlow_twins_loss(za, zb), f"gather={path!r}")


def test_gather_environment_switch_is_checked(monkeypatch):
    monkeypatch.setenv("SSLOPS_GATHER", "sums")
    assert sd._requested_path(True) == "sums" and sd._requested_path("auto") == "sums"
    assert sd._requested_path("rows") == "rows"  # the argument wins over the environment
    monkeypatch.setenv("SSLOPS_GATHER", "both")
    with pytest.raises(ValueError, match="SSLOPS_GATHER must be one of 'auto', 'rows', 'sums', got 'both'"):
        sd._requested_path(True)


@pytest.mark.parametrize("world", [2, 3, 8])
def test_cost_model_crossovers(world):
    """The crossovers the module docstring states, equal batches: VICReg's rows path moves no
    more bytes up to N = 2K + 2 in fp32 (4K + 4 for bf16 rows), Barlow Twins' up to K + 4."""
    k = 96
    for loss, dtype, last in (("vicreg", torch.float32, 2 * k + 2), ("vicreg", torch.bfloat16, 4 * k + 4),
                              ("vicreg", torch.float64, 2 * k + 2), ("barlow_twins", torch.float32, k + 4)):
        for n in range(world, 6 * k, world):
            expected = "rows" if n <= last else "sums"
            assert sd.choose_path(loss, [n // world] * world, k, dtype) == expected, (loss, dtype, n)
    # the relation form gathers its rows on both paths: the sums path only adds an all-reduce
    for labels in (True, False):
        assert sd.choose_path("vicreg_relation", [4096] * world, 8, torch.float32, labels=labels,
                              pairs_per_rank=None if labels else [5000] * world) == "rows"
    # uneven batches are padded to the largest before an all-gather
    uneven = sd.collective_bytes("vicreg", "rows", [3, 10], 4, torch.float32).forward
    padded = sd.collective_bytes("vicreg", "rows", [10, 10], 4, torch.float32).forward
    assert uneven == padded
