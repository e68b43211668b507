"""Barlow Twins benchmarks.

Quick CPU set (the CPU target N=512, K=4096 fp32 included); ``--full`` (default on CUDA):
N and K from 256 to 16384 in bf16 and fp32 with the official N=2048, K=8192.
"""

import torch

import sslops
from sslops import reference

from .common import Case, randn_inputs

LOSSES = ["barlow_twins"]


def barlow_twins_flops(n, k):
    """Forward + backward FLOPs of the cross-correlation, the dominant cost.

    c = bn(z_a)ᵀ bn(z_b): 2NK² forward, two N×K×K products backward (4NK²): 6NK².
    The Gram route (⟨AAᵀ, BBᵀ⟩_F, N < K) costs 4N²K forward and 4N²K backward: 8N²K.
    """
    return min(6.0 * n * k * k, 8.0 * n * n * k)


def barlow_case(n, k, dtype, *, compile=True, note=""):
    return Case(
        loss="barlow_twins",
        shape={"N": n, "K": k},
        dtype=dtype,
        make_inputs=randn_inputs((n, k), (n, k), dtype=dtype),
        sslops_fn=lambda z_a, z_b, backend: sslops.barlow_twins_loss(z_a, z_b, backend=backend),
        naive_fn=reference.barlow_twins_loss,
        flops=barlow_twins_flops(n, k),
        compile=compile,
        note=note,
    )


def cases(device, full):
    on_cpu = torch.device(device).type == "cpu"
    if not full:
        return [
            # compile costs ~30 s per case on this CPU: only at the target size there
            barlow_case(256, 256, torch.float32, compile=not on_cpu),
            barlow_case(256, 256, torch.bfloat16, compile=not on_cpu),
            barlow_case(512, 4096, torch.float32, note="CPU target case"),
            barlow_case(4096, 256, torch.float32, compile=not on_cpu, note="K < N"),
        ]
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        for n in (256, 1024, 2048, 4096, 16384):
            out.append(barlow_case(n, 8192, dtype, note="official size" if n == 2048 else ""))
        for k in (256, 1024, 2048, 4096, 16384):
            out.append(barlow_case(2048, k, dtype))
        out.append(barlow_case(16384, 16384, dtype))
        out.append(barlow_case(512, 4096, dtype, note="CPU target size"))
    return out
