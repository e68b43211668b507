"""Diagnostics benchmarks (``sslops.metrics``): forward only, against the straightforward PyTorch.

``rankme`` (fp32 embeddings z (N, K)), providers:

* ``sslops``: ``sslops.metrics.rankme(z)``: float64 sums of fp32 products over blocks of
  rows through zᵀz, one K×K ``eigvalsh``;
* ``naive``: ``torch.linalg.svdvals`` of the whole (N, K) matrix in fp32, then the entropy
  (what stable-pretraining's callback does);
* ``gram+eigvalsh``: one fp32 ``z.T @ z`` and one float64 ``eigvalsh`` of it, the yardstick
  of the cost target (sslops within 2× of it at N = 65536, K = 2048 on CPU).

``alignment`` (data x (N, D) fp32, 10 class ids), the value at k = 32, providers:

* ``sslops``: ``sslops.metrics.alignment(x, y, 32)``: xᵀx and yᵀx over blocks of rows,
  one D×D ``eigh``, never an N×N matrix;
* ``naive``: the N×N route: the Gram x xᵀ (centred) and its ``eigh`` for the principal
  directions, Y Yᵀ (N×N) applied to them. Skipped, with the reason, where two N×N fp32
  matrices would not fit (N = 70000: 2 × 19.6 GB).

Sizes: rankme N = 65536, K = 2048 (the target) and N = 8192, K = 512; alignment N = 70000,
D = 3072 (CIFAR-sized) and N = 2048, D = 256. ``--full`` (default on CUDA) adds a wide
rankme (N = 1024, K = 4096) and a mid-size alignment (N = 8192, D = 1024).
"""

import torch

from sslops import metrics

from .common import Case, randn_inputs

LOSSES = ["rankme", "alignment"]
ALIGNMENT_K = 32
CLASSES = 10


def naive_rankme(z, eps=1e-7):
    s = torch.linalg.svdvals(z)
    p = s / s.sum() + eps
    return torch.exp(-(p * torch.log(p)).sum())


def gram_eigvalsh(z):
    return torch.linalg.eigvalsh((z.T @ z).double()).sum()


def rankme_case(n, k, dtype=torch.float32, note=""):
    return Case(
        loss="rankme",
        shape={"N": n, "K": k},
        dtype=dtype,
        make_inputs=randn_inputs((n, k), dtype=dtype),
        sslops_fn=lambda z, backend: metrics.rankme(z),
        naive_fn=naive_rankme,
        extra={"sslops": metrics.rankme, "gram+eigvalsh": gram_eigvalsh},
        flops=2.0 * n * k * min(n, k) + 4.0 * min(n, k) ** 3 / 3,
        compile=False,
        note=note,
        backward=False,
    )


def naive_alignment(x, y, k=ALIGNMENT_K):
    """alignment(k) through N×N matrices: eigh of the centred Gram x xᵀ, Y Yᵀ explicit."""
    xc = x - x.mean(dim=0)
    w, u = torch.linalg.eigh(xc @ xc.T)
    w, u = w.flip(0), u.flip(1)
    basis = u[:, : int((w > w[0] * x.shape[0] * torch.finfo(x.dtype).eps).sum())]
    onehot = torch.nn.functional.one_hot(y, CLASSES).to(x.dtype)
    energy = ((onehot @ onehot.T @ basis) ** 2).sum(dim=0)
    return energy[:k].sum() / energy.sum()


def classification_inputs(n, d, dtype, seed=0):
    """x: 10 class centres plus correlated noise (a decaying spectrum); y: class ids."""

    def make(device):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, CLASSES, (n,), generator=g)
        centres = torch.randn(CLASSES, d, generator=g)
        mix = torch.randn(d, d, generator=g) / d**0.5 * torch.logspace(0, -2, d)
        x = centres[y]
        for start in range(0, n, 8192):
            x[start:start + 8192] += torch.randn(min(8192, n - start), d, generator=g) @ mix
        return x.to(device=device, dtype=dtype), y.to(device)

    return make


def alignment_case(n, d, dtype=torch.float32, note=""):
    skip = {}
    if 2 * n * n * torch.tensor([], dtype=dtype).element_size() > 8e9:
        skip["naive"] = f"the N×N route needs two {n}×{n} {str(dtype)[6:]} matrices ({2 * n * n * 4 / 1e9:.1f} GB): over this machine's memory"
    return Case(
        loss="alignment",
        shape={"N": n, "K": d},
        dtype=dtype,
        make_inputs=classification_inputs(n, d, dtype),
        sslops_fn=lambda x, y, backend: metrics.alignment(x, y, ALIGNMENT_K),
        naive_fn=naive_alignment,
        extra={"sslops": lambda x, y: metrics.alignment(x, y, ALIGNMENT_K)},
        flops=2.0 * n * d * d + 4.0 * d**3 / 3,
        compile=False,
        note=note,
        skip_providers=skip,
        backward=False,
    )


def cases(device, full):
    out = [
        rankme_case(8192, 512),
        rankme_case(65536, 2048, note="cost target: sslops within 2x of gram+eigvalsh"),
        alignment_case(2048, 256),
        alignment_case(70000, 3072, note="CIFAR-sized: no N×N matrix"),
    ]
    if full:
        out += [rankme_case(1024, 4096, note="N < K: the N×N Gram"), alignment_case(8192, 1024)]
    return out
