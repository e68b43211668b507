"""SigLIP benchmarks: sslops.siglip_loss against open_clip's dense formula.

Two sets of N rows (K features), a learnable logit scale and bias (0-d tensors with
gradients, the paper's initialisation t = 10, b = −10). Naive PyTorch is open_clip's
``SigLipLoss`` on normalised features: the N×N logits, ``-logsigmoid(labels · logits)``
summed and divided by N (``torch.compile`` of it is the other baseline). Quick CPU set: the CPU
target N = 16384, K = 64 fp32 (sslops at least 2× faster than naive and under 2 % of its peak
memory) and smaller sizes; ``--full`` (default on CUDA): N = 1024 … 262144 at K = 512 in bf16,
the GPU target N = 65536, K = 512.
"""

import torch
import torch.nn.functional as F

import sslops

from .common import Case, randn_inputs

LOSSES = ["siglip"]


def siglip_flops(n, k):
    """Forward + backward FLOPs of the N×N products along sslops' route: one forward pass
    (2N²K), two backward passes each recomputing its tile and multiplying (4N²K each): 10N²K."""
    return 10.0 * n * n * k


def open_clip_siglip_loss(z_a, z_b, logit_scale, logit_bias, labels=None):
    """open_clip's SigLipLoss (features normalised first): −Σ logsigmoid(y·(t·a bᵀ + b)) / N."""
    a, b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
    logits = logit_scale * a @ b.T + logit_bias
    n = z_a.shape[0]
    if labels is None:
        y = 2 * torch.eye(n, device=z_a.device, dtype=logits.dtype) - 1
    else:
        y = 2 * (labels[:, None] == labels[None, :]).to(logits.dtype) - 1
    return -F.logsigmoid(y * logits).sum() / n


def siglip_case(n, k, dtype, *, compile=True, note="", labels=False):
    def make(device, _randn=randn_inputs((n, k), (n, k), dtype=dtype)):
        a, b = _randn(device)
        lab = (torch.arange(n, device=device) % max(1, n // 4)) if labels else None
        return a, b, torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device), lab

    def sslops_fn(a, b, scale, bias, lab, backend):
        return sslops.siglip_loss(a, b, scale, bias, labels=lab, backend=backend)

    return Case(
        loss="siglip",
        shape={"N": n, "K": k},
        dtype=dtype,
        make_inputs=make,
        sslops_fn=sslops_fn,
        naive_fn=open_clip_siglip_loss,
        flops=siglip_flops(n, k),
        compile=compile,
        note=("labels: 4 rows per class; " if labels else "") + note,
        name="siglip[labels]" if labels else "siglip",
    )


def cases(device, full):
    on_cpu = torch.device(device).type == "cpu"
    if not full:
        return [
            siglip_case(4096, 128, torch.float32),
            siglip_case(4096, 128, torch.float32, labels=True),
            siglip_case(16384, 64, torch.float32, compile=not on_cpu, note="CPU target case"),
        ]
    out = [siglip_case(1024 * 2**i, 512, torch.bfloat16) for i in range(9)]  # 1024 ... 262144
    out[6].note = "GPU target size"  # 65536
    out.append(siglip_case(16384, 64, torch.float32, note="CPU target size"))
    out.append(siglip_case(32768, 512, torch.bfloat16, labels=True))
    return out
