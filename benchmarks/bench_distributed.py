"""``gather=True`` of the covariance-type losses: the two forward paths, timed across W ranks.

``python -m benchmarks --only distributed`` spawns W = 2 ranks on 127.0.0.1 (gloo on CPU,
one thread each; NCCL when the device is CUDA and two GPUs are present) and measures,
per case (VICReg and Barlow Twins, K = 4096, N_local = B_r ∈ {32, 512} rows per rank,
fp32, forward + backward of the per-rank loss):

* ``naive``: the official VICReg code's route: all-gather the rows of each view with
  an autograd gather layer whose backward all-reduces the (N, K) gradient and keeps the
  own rows, then the loss in plain PyTorch (``sslops.reference``) on the global batch
  (VICReg's invariance MSE on the local pairs, as there);
* ``sslops-rows``: ``gather="rows"``: one all-gather of [z_a | z_b], the fused kernel on the
  global batch, no backward collective;
* ``sslops-sums``: ``gather="sums"``: all-reduce of the K×K sums of each rank's rows;
* ``sslops-auto``: ``gather=True``: the path the cost model picks for this call.

Time: the slowest rank's seconds per call (each block of calls starts after a barrier;
the block times are max-reduced over ranks), blocks of about 50 ms taken round-robin
over the providers until each has at least 3 blocks and ``min_run_time`` seconds (one
call per block for calls over 1 s); median, p20, p80 over blocks. Memory: rank 0's peak
allocated above the inputs (the profiler, as every CPU case). Bytes: what one rank sends
per call, forward and backward, by the ring model of :mod:`sslops.distributed` (its
``collective_bytes``, which ``tests/test_distributed.py`` checks against the bytes handed
to the collectives; for ``naive``: the all-gather of both views forward, the all-reduce
of their (N, K) gradients backward).
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch

import sslops
from sslops import distributed as sd
from sslops import reference

from . import common
from .common import Case, randn_inputs

LOSSES = ["vicreg_distributed", "barlow_twins_distributed"]
WORLD = 2
BLOCK_S = 0.05


def _crossover_note(loss, n_local, k, dtype):
    """Which path the cost model picks here, and the global N where the two paths' bytes cross."""
    e = torch.empty((), dtype=dtype).element_size()
    w = 8 if dtype == torch.float64 else 4
    rows_per_byte = 2 * (k + 1) if loss == "vicreg" else k + 4  # see the sslops.distributed docstring
    picked = sd.choose_path(loss, [n_local] * WORLD, k, dtype)
    return f"auto picks {picked}; bytes equal at N = {rows_per_byte * w // e}"


def distributed_case(loss, n_local, k, dtype=torch.float32):
    """One case: ``loss`` ("vicreg" or "barlow_twins") at W·n_local global rows."""
    n = WORLD * n_local
    single = sslops.vicreg_loss if loss == "vicreg" else sslops.barlow_twins_loss
    naive = reference.vicreg_loss if loss == "vicreg" else reference.barlow_twins_loss
    return Case(
        loss=loss,
        name=f"{loss}_distributed",
        shape={"W": WORLD, "N": n, "N_local": n_local, "K": k},
        dtype=dtype,
        make_inputs=randn_inputs((n, k), (n, k), dtype=dtype),  # the global batch; rank r takes its rows
        sslops_fn=lambda z_a, z_b, backend: single(z_a, z_b, backend=backend),
        naive_fn=naive,
        compile=False,
        note=_crossover_note(loss, n_local, k, dtype),
    )


def cases(device, full):
    """K = 4096, N_local ∈ {32, 512}; ``--full`` adds K = 512 with N_local from 128 to 2048,
    across both paths' byte crossover (global N = 1026 for VICReg, 516 for Barlow Twins)."""
    out = []
    for loss in ("vicreg", "barlow_twins"):
        for n_local in (32, 512):
            out.append(distributed_case(loss, n_local, 4096))
        if full:
            for n_local in (128, 512, 2048):
                out.append(distributed_case(loss, n_local, 512))
    return out


# ----------------------------------------------------------------------------- the providers


class _GatherAllReduceGrad(torch.autograd.Function):
    """The official VICReg code's gather layer: all-gather forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        rank, rows = torch.distributed.get_rank(), grad.shape[0] // torch.distributed.get_world_size()
        return grad[rank * rows:(rank + 1) * rows]


def _naive(loss):
    """The official route (equal local batches, as the official code assumes)."""

    def run(z_a, z_b):
        a_all, b_all = _GatherAllReduceGrad.apply(z_a), _GatherAllReduceGrad.apply(z_b)
        if loss == "vicreg":
            return reference.vicreg_loss(a_all, b_all, sim_coeff=0.0) + 25.0 * torch.nn.functional.mse_loss(z_a, z_b)
        return reference.barlow_twins_loss(a_all, b_all)

    return run


def _providers(case):
    single = sslops.vicreg_loss if case.loss == "vicreg" else sslops.barlow_twins_loss
    return [("naive", _naive(case.loss)),
            ("sslops-rows", lambda a, b: single(a, b, gather="rows")),
            ("sslops-sums", lambda a, b: single(a, b, gather="sums")),
            ("sslops-auto", lambda a, b: single(a, b, gather=True))]


def _bytes(case, provider):
    """(forward, backward) bytes one rank sends per call."""
    sizes, k = [case.shape["N_local"]] * WORLD, case.shape["K"]
    if provider == "naive":
        share = (WORLD - 1) / WORLD
        view = case.shape["N"] * k * torch.empty((), dtype=case.dtype).element_size()
        return 2 * share * view, 2 * 2 * share * view
    path = provider.split("-")[1]
    if path == "auto":
        path = sd.choose_path(case.loss, sizes, k, case.dtype)
    traffic = sd.collective_bytes(case.loss, path, sizes, k, case.dtype)
    return traffic.forward, traffic.backward


# ----------------------------------------------------------------------------- the ranks


def _slowest(seconds):
    t = torch.tensor([seconds], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t)


def _timed_block(step, number):
    torch.distributed.barrier()
    t0 = time.perf_counter()
    for _ in range(number):
        step()
    return _slowest(time.perf_counter() - t0) / number


def _rank_main(rank, port, spec, device_type, min_run_time, out_path):
    threads = max(1, (os.cpu_count() or 1) // WORLD)
    torch.set_num_threads(threads)
    use_nccl = device_type == "cuda"
    if use_nccl:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if use_nccl else torch.device("cpu")
    torch.distributed.init_process_group("nccl" if use_nccl else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=WORLD, timeout=timedelta(seconds=1800))
    try:
        case = distributed_case(*spec)
        n_local = case.shape["N_local"]
        global_inputs = case.make_inputs(device)
        leaves = [t[rank * n_local:(rank + 1) * n_local].detach().clone().requires_grad_() for t in global_inputs]
        del global_inputs
        rows, steps, first = [], [], []
        for name, fn in _providers(case):
            def step(fn=fn):
                for t in leaves:
                    t.grad = None
                loss = fn(*leaves)
                loss.backward()
                return loss

            box = []
            t0 = time.perf_counter()
            if rank == 0 and device.type == "cpu":
                peak = common.peak_bytes_cpu(lambda: box.append(float(step().detach())))
            elif device.type == "cuda":
                peak = common.peak_bytes_cuda(lambda: box.append(float(step().detach())), device)
            else:
                box.append(float(step().detach()))
                peak = 0
            first.append(_slowest(time.perf_counter() - t0))
            fwd, bwd = _bytes(case, name)
            rows.append({"provider": name, "peak_mb": peak / 1e6, "loss_value": box[0], "bytes_forward": fwd,
                         "bytes_backward": bwd, "samples": [], "threads_per_rank": threads})
            steps.append(step)
        number = [1 if t > 1.0 else max(1, int(BLOCK_S / max(t, 1e-6))) for t in first]
        spent = [0.0] * len(steps)
        while True:
            active = [i for i, r in enumerate(rows) if len(r["samples"]) < 3 or spent[i] < min_run_time]
            active = [i for i in active if not (first[i] > 1.0 and len(rows[i]["samples"]) >= 3)]
            if not active:
                break
            for i in active:
                per_call = _timed_block(steps[i], number[i])
                rows[i]["samples"].append(per_call)
                spent[i] += per_call * number[i]
        if rank == 0:
            for r in rows:
                times = r.pop("samples")
                med, p20, p80 = (1e3 * t for t in common._quantiles(times))
                r.update(median_ms=med, p20_ms=p20, p80_ms=p80, samples=len(times), peak_rss_mb=None, status="ok")
            torch.save(rows, out_path)
        torch.distributed.barrier()  # no rank leaves while a peer still sends (see examples/ddp_train.py)
    finally:
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(case, device, *, with_compile=True, compile_budget=None, min_run_time=0.5, on_provider=None, **_):
    """The harness's ``run_case`` for this file: W spawned ranks measure every provider together."""
    import tempfile

    import torch.multiprocessing as mp

    names = [name for name, _ in _providers(case)]
    spec = (case.loss, case.shape["N_local"], case.shape["K"], case.dtype)
    reason = None
    if device.type == "cuda" and torch.cuda.device_count() < WORLD:
        reason = f"needs {WORLD} CUDA devices, found {torch.cuda.device_count()}"
    elif not torch.distributed.is_available():
        reason = "torch.distributed is not available"
    rows = []
    if reason is None:
        with tempfile.TemporaryDirectory() as tmp:
            out_path = os.path.join(tmp, "rows.pt")
            t0 = time.perf_counter()
            try:
                mp.start_processes(_rank_main, args=(_free_port(), spec, device.type, min_run_time, out_path),
                                   nprocs=WORLD, start_method="spawn")
                rows = torch.load(out_path)
            except Exception as exc:  # noqa: BLE001 - recorded as the providers' failure
                reason = "ranks failed: " + common._short_error(exc)
            wall = time.perf_counter() - t0
        for r in rows:
            r["wall_s"] = round(wall / len(rows), 3)
    if reason is not None:
        rows = [{"provider": name, "status": "skipped" if "needs" in reason else "failed", "error": reason} for name in names]
    for name in names:
        if on_provider:
            on_provider(name)
    common._add_ratios(case, device, rows)
    return rows
