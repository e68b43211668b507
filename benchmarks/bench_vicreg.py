"""VICReg benchmarks: the two-view loss and the relation form.

Providers per case: every sslops kernel backend, naive PyTorch (``sslops.reference`` in
the input dtype), ``torch.compile`` of it. Sizes: a quick CPU set (the CPU target
N=512, K=4096 fp32 included) and, with ``--full`` (default on CUDA), N and K from 256 to
16384 in bf16 and fp32 with the official N=2048, K=8192.
"""

import torch

import sslops
from sslops import reference

from .common import Case, randn_inputs

LOSSES = ["vicreg", "vicreg_relation"]


def vicreg_flops(n, k):
    """Forward + backward FLOPs of the covariance terms, the dominant cost.

    Per view: the K×K covariance ZcᵀZc (2NK²) forward and one N×K×K product backward
    (2NK²); when N < K the N×N Gram route gives the same numbers with N²K instead of NK².
    Two views: 8·N·K·min(N, K). Elementwise terms (O(NK)) are left out.
    """
    return 8.0 * n * k * min(n, k)


def vicreg_case(n, k, dtype, *, compile=True, note=""):
    return Case(
        loss="vicreg",
        shape={"N": n, "K": k},
        dtype=dtype,
        make_inputs=randn_inputs((n, k), (n, k), dtype=dtype),
        sslops_fn=lambda z_a, z_b, backend: sslops.vicreg_loss(z_a, z_b, backend=backend),
        naive_fn=reference.vicreg_loss,
        flops=vicreg_flops(n, k),
        compile=compile,
        note=note,
    )


def _labels_two_views(n, device):
    return {"labels": torch.arange(n // 2, device=device).repeat(2)}


def _pairs_ring(n, device):
    i = torch.arange(n, device=device)
    return {"pairs": torch.cat([torch.stack([i, (i + 1) % n]), torch.stack([(i + 1) % n, i])], dim=1)}


_RELATIONS = {
    "labels": (_labels_two_views, "labels = two views of n/2 samples"),
    "pairs": (_pairs_ring, "pairs: ring over the batch plus its reverse and duplicates"),
}


def relation_case(n, k, dtype, *, relation="labels", compile=True):
    """VICReg over G with G from ``labels`` (two views) or ``pairs`` (a ring, both directions)."""
    make_relation, note = _RELATIONS[relation]

    def make(device, _randn=randn_inputs((n, k), dtype=dtype)):
        (z,) = _randn(device)
        return z, make_relation(n, device)

    return Case(
        loss="vicreg_relation",
        shape={"N": n, "K": k},
        dtype=dtype,
        make_inputs=make,
        sslops_fn=lambda z, rel, backend: sslops.vicreg_relation_loss(z, backend=backend, **rel),
        naive_fn=lambda z, rel: reference.vicreg_relation_loss(z, **rel),
        flops=4.0 * n * k * min(n, k),
        compile=compile,
        note=note,
    )


def cases(device, full):
    on_cpu = torch.device(device).type == "cpu"
    if not full:
        return [
            # compile costs ~30 s per case on this CPU: only at the target size there
            vicreg_case(256, 256, torch.float32, compile=not on_cpu),
            vicreg_case(256, 256, torch.bfloat16, compile=not on_cpu),
            vicreg_case(512, 4096, torch.float32, note="CPU target case"),
            # K < N (the K×K route): the shape class where auto's choice of "cpu" is least obvious
            vicreg_case(4096, 256, torch.float32, compile=not on_cpu, note="K < N"),
            relation_case(512, 128, torch.float32, compile=not on_cpu),
            relation_case(512, 1024, torch.float32, relation="pairs", compile=not on_cpu),
        ]
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        for n in (256, 1024, 2048, 4096, 16384):
            out.append(vicreg_case(n, 8192, dtype, note="official size" if n == 2048 else ""))
        for k in (256, 1024, 2048, 4096, 16384):
            out.append(vicreg_case(2048, k, dtype))
        out.append(vicreg_case(16384, 16384, dtype))
        out.append(vicreg_case(512, 4096, dtype, note="CPU target size"))
        out.append(relation_case(4096, 2048, dtype))
    return out
