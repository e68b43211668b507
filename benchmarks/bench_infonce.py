"""InfoNCE benchmarks: SimCLR/NT-Xent as InfoNCE with labels = two views; NT-Xent with a queue (issues 4, 13).

Shape N counts every row (both views: N = 2 × batch), K features. Quick CPU set (the CPU
target 2N = 16384, K = 64 fp32 included); ``--full`` (default on CUDA): N from 1024 to
262144 at K = 256 in bf16 (naive PyTorch is expected to run out of memory at the top:
its N×N logits alone are 2·N² bytes), plus the CPU target size.

NT-Xent with a MoCo queue (``nt_xent[queue]``, ``nt_xent[moco]``): N rows per view, a queue of
M = 65536 rows that is a buffer (no gradient), K = 128; the 2N anchors against the 2N − 1
other rows and the queue, or (MoCo, ``in_batch_negatives=False``) the N anchors of z_a
against their positive and the queue. CPU target at N = 4096: under 5 % of naive's peak
memory and no slower.
"""

import torch

import sslops
from sslops import reference

from .common import Case, randn_inputs

LOSSES = ["info_nce", "nt_xent"]
TEMPERATURE = 0.1


def info_nce_flops(n, k):
    """Forward + backward FLOPs of the N×N similarity products, the dominant cost.

    Forward: the logits ẐẐᵀ, 2N²K. Backward (flash style): the logits recomputed (2N²K)
    and one N×N×K product for the gradient (2N²K; the relation is symmetric). 6N²K.
    """
    return 6.0 * n * n * k


def _relation(kind, n, device):
    """The relation G as keyword arguments: two views, four views, SupCon classes, or random pairs."""
    if kind == "two_views":
        return {"labels": torch.arange(n // 2, device=device).repeat(2)}
    if kind == "four_views":
        return {"labels": torch.arange(n // 4, device=device).repeat(4)}
    if kind == "supcon":  # 100 classes: about N²/100 positive pairs, compared tile by tile
        g = torch.Generator().manual_seed(1)
        return {"labels": torch.randint(0, 100, (n,), generator=g).to(device)}
    if kind == "pairs":  # sparse G given by index pairs: 4 random partners per row, via the CSR
        g = torch.Generator().manual_seed(2)
        rows = torch.arange(n).repeat(4)
        return {"pairs": torch.stack([rows, torch.randint(0, n, (4 * n,), generator=g)]).to(device)}
    raise ValueError(kind)


_NOTES = {"two_views": "labels = two views", "four_views": "labels = four views",
          "supcon": "labels = 100 SupCon classes", "pairs": "pairs = 4 random partners per row (CSR)"}


def info_nce_case(n, k, dtype, *, compile=True, note="", relation="two_views"):
    def make(device, _randn=randn_inputs((n, k), dtype=dtype)):
        (z,) = _randn(device)
        rel = _relation(relation, n, device)
        return z, rel.get("labels"), rel.get("pairs")

    def sslops_fn(z, labels, pairs, backend):
        return sslops.info_nce_loss(z, labels=labels, pairs=pairs, temperature=TEMPERATURE, backend=backend)

    def naive_fn(z, labels, pairs):
        return reference.info_nce_loss(z, labels=labels, pairs=pairs, temperature=TEMPERATURE)

    return Case(
        loss="info_nce",
        shape={"N": n, "K": k},
        dtype=dtype,
        make_inputs=make,
        sslops_fn=sslops_fn,
        naive_fn=naive_fn,
        flops=info_nce_flops(n, k),
        compile=compile,
        note=(_NOTES[relation] + "; " + note) if note else _NOTES[relation],
        name="info_nce" if relation == "two_views" else f"info_nce[{relation}]",
        skip_backends=_slow_backends(n, k),
    )


# The CUDA C++ InfoNCE kernel multiplies with FP32 FMAs, not tensor cores: about 2·N²·K·3
# flops at a few tens of TFLOP/s means seconds per call from N ≈ 65536 (K = 256), and
# minutes of device time per case once repeated for timing. Triton is the GPU path there.
CUDA_FMA_MAX_WORK = 32768 * 32768 * 256


def _slow_backends(n, k):
    if n * n * k > CUDA_FMA_MAX_WORK:
        return {"cuda": f"not timed at N={n}, K={k}: the CUDA C++ kernel uses FP32 FMA (no tensor cores), "
                        "seconds per call here; the Triton kernel is the GPU path"}
    return {}


def nt_xent_queue_flops(n, m, k, in_batch):
    """Forward + backward FLOPs of the anchors × candidates products (A anchors, C candidates):
    forward 2ACK, backward recompute + product 4ACK (no gradient to the queue): 6ACK."""
    a, c = (2 * n, 2 * n + m) if in_batch else (n, 2 * n + m)
    return 6.0 * a * c * k


def nt_xent_queue_case(n, m, k, dtype, *, in_batch=True, compile=True, note=""):
    def make(device, _randn=randn_inputs((n, k), (n, k), (m, k), dtype=dtype)):
        z_a, z_b, queue = _randn(device)
        return z_a, z_b, [queue]  # the queue in a list: a buffer, no gradient

    def sslops_fn(z_a, z_b, queue, backend):
        return sslops.nt_xent_loss(z_a, z_b, temperature=TEMPERATURE, negatives=queue[0], in_batch_negatives=in_batch,
                                   backend=backend)

    def naive_fn(z_a, z_b, queue):
        return reference.nt_xent_loss(z_a, z_b, temperature=TEMPERATURE, negatives=queue[0], in_batch_negatives=in_batch)

    return Case(
        loss="nt_xent",
        shape={"N": n, "K": k, "M": m},
        dtype=dtype,
        make_inputs=make,
        sslops_fn=sslops_fn,
        naive_fn=naive_fn,
        flops=nt_xent_queue_flops(n, m, k, in_batch),
        compile=compile,
        note=(f"queue of M = {m} rows (no gradient)" + ("" if in_batch else ", MoCo form: no in-batch negatives")
              + ("; " + note if note else "")),
        name="nt_xent[queue]" if in_batch else "nt_xent[moco]",
    )


def cases(device, full):
    on_cpu = torch.device(device).type == "cpu"
    if not full:
        return [
            info_nce_case(2048, 128, torch.float32),
            # naive PyTorch alone takes seconds per call here; compile only at the smaller size on a CPU
            info_nce_case(16384, 64, torch.float32, compile=not on_cpu, note="CPU target case"),
            info_nce_case(2048, 128, torch.float32, relation="supcon"),
            info_nce_case(2048, 128, torch.float32, relation="pairs"),
            nt_xent_queue_case(4096, 65536, 128, torch.float32, compile=not on_cpu, note="CPU target case"),
            nt_xent_queue_case(4096, 65536, 128, torch.float32, in_batch=False, compile=not on_cpu),
        ]
    out = [info_nce_case(1024 * 2**i, 256, torch.bfloat16) for i in range(9)]  # 1024 ... 262144
    out.append(info_nce_case(16384, 64, torch.float32, note="CPU target size"))
    out.append(info_nce_case(16384, 256, torch.float32))
    out.append(info_nce_case(32768, 256, torch.bfloat16, note="H100 target size"))
    for relation in ("four_views", "supcon", "pairs"):
        out.append(info_nce_case(32768, 256, torch.bfloat16, relation=relation))
    out.append(nt_xent_queue_case(4096, 65536, 128, torch.float32, note="CPU target size"))
    for in_batch in (True, False):
        out.append(nt_xent_queue_case(16384, 65536, 256, torch.bfloat16, in_batch=in_batch))
    return out
