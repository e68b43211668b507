"""CLIP benchmarks: sslops.clip_loss against open_clip's dense formula.

Two sets of N rows (K features), a learnable logit scale (a 0-d tensor with a gradient, as
open_clip trains it). Naive PyTorch is open_clip's ``ClipLoss`` on normalised features: the
N×N logits, a cross-entropy along each axis (``torch.compile`` of it is the other
baseline). Quick CPU set: the CPU target N = 16384, K = 64 fp32 (sslops at least 2× faster
than naive and under 2 % of its peak memory) and smaller sizes; ``--full`` (default on CUDA):
N = 1024 … 262144 at K = 512 in bf16 (naive runs out of memory at the top: its logits alone
are 2·N² bytes), the GPU target N = 65536, K = 512.
"""

import torch
import torch.nn.functional as F

import sslops

from .common import Case, randn_inputs

LOSSES = ["clip"]
LOGIT_SCALE = 1 / 0.07


def clip_flops(n, k):
    """Forward + backward FLOPs of the N×N products along sslops' route: two forward passes
    (one per direction, 2N²K each), two backward passes each recomputing its tile and
    multiplying (4N²K each): 12N²K. (The dense form needs 6N²K; sslops trades FLOPs for memory.)"""
    return 12.0 * n * n * k


def open_clip_loss(z_a, z_b, logit_scale, labels=None):
    """open_clip's ClipLoss (features normalised first, as its models do); with labels, each
    direction averages the log-probabilities of all same-label targets (conventions §3b)."""
    a, b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
    logits = logit_scale * a @ b.T
    if labels is None:
        target = torch.arange(z_a.shape[0], device=z_a.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    same = (labels[:, None] == labels[None, :]).to(logits.dtype)
    target = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def clip_case(n, k, dtype, *, compile=True, note="", labels=False):
    def make(device, _randn=randn_inputs((n, k), (n, k), dtype=dtype)):
        a, b = _randn(device)
        scale = torch.tensor(LOGIT_SCALE, device=device)
        lab = (torch.arange(n, device=device) % max(1, n // 4)) if labels else None
        return a, b, scale, lab

    def sslops_fn(a, b, scale, lab, backend):
        return sslops.clip_loss(a, b, scale, labels=lab, backend=backend)

    return Case(
        loss="clip",
        shape={"N": n, "K": k},
        dtype=dtype,
        make_inputs=make,
        sslops_fn=sslops_fn,
        naive_fn=open_clip_loss,
        flops=clip_flops(n, k),
        compile=compile,
        note=("labels: 4 rows per class; " if labels else "") + note,
        name="clip[labels]" if labels else "clip",
    )


def cases(device, full):
    on_cpu = torch.device(device).type == "cpu"
    if not full:
        return [
            clip_case(4096, 128, torch.float32),
            clip_case(4096, 128, torch.float32, labels=True),
            # naive PyTorch takes seconds per call here: compile only at the smaller sizes on a CPU
            clip_case(16384, 64, torch.float32, compile=not on_cpu, note="CPU target case"),
        ]
    out = [clip_case(1024 * 2**i, 512, torch.bfloat16) for i in range(9)]  # 1024 ... 262144
    out[6].note = "GPU target size"  # 65536
    out.append(clip_case(16384, 64, torch.float32, note="CPU target size"))
    out.append(clip_case(32768, 512, torch.bfloat16, labels=True))
    return out
