r"""The source papers' toy data, as reproducible generators (float64, ``torch.Generator``).

=======================================  ======================================================
:func:`hidden_feature_clusters`,         four clusters ±e1, ±e1 + τe2: a label feature e1 and a
:func:`augment`                          hidden feature e2 (Yang, Li, Jiang, Li, AAAI 2024,
                                         arXiv 2401.03214)
:func:`structural_redundancy`            labels from ‖x1‖, features x2 whose label-free part
                                         has rank s (arXiv 2402.06884), with the population ψ*
:func:`add_background`                   distracting backgrounds for (N, H, W) images, scaled for
                                         scikit-learn's digits (0–16 pixels): the setting of
                                         Balestriero & LeCun 2024 (arXiv 2402.11337)
=======================================  ======================================================

Every generator takes ``generator=`` (a CPU ``torch.Generator``; ``None`` uses torch's
global one) and draws from it in a fixed order, so the same seed gives the same tensors.
Samples are float64 CPU tensors, one per row.
"""

import math
import numbers
from typing import NamedTuple

import torch

__all__ = [
    "HiddenFeatureClusters",
    "StructuralRedundancy",
    "hidden_feature_clusters",
    "augment",
    "structural_redundancy",
    "add_background",
    "BACKGROUNDS",
]

_F64 = torch.float64

BACKGROUNDS = ("pixel_noise", "blocky", "gradient")
"""The kinds :func:`add_background` draws."""


class HiddenFeatureClusters(NamedTuple):
    """Samples of :func:`hidden_feature_clusters`."""

    x: torch.Tensor
    """(n, d) float64 samples: centre + ρ·noise."""
    label: torch.Tensor
    """(n,) int64, the sign of the e1 coordinate of the centre: −1 or +1."""
    hidden: torch.Tensor
    """(n,) int64, 1 where the centre carries τe2, else 0 (independent of the label)."""
    centre: torch.Tensor
    """(n, d) float64 cluster centres ±e1 (+ τe2), without noise."""


class StructuralRedundancy(NamedTuple):
    """Samples of :func:`structural_redundancy`."""

    x1: torch.Tensor
    """(n, d1) float64, N(0, I)."""
    x2: torch.Tensor
    """(n, d2) float64, ψ*(x1) + N(0, I)."""
    y: torch.Tensor
    """(n,) int64 class in 0..p − 1: the bin of ‖x1‖."""
    psi: torch.Tensor
    """(n, d2) float64, the population features ψ*(x1) = E[x2 | x1]."""
    a: torch.Tensor
    """(d2, p) float64, the label part A ~ U(−2, 2)."""
    b: torch.Tensor
    """(d2, s) float64, the label-free part B ~ U(−2, 2)."""


def _int(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def _real(name, value, *, lo=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (lo is not None and value < lo):
        raise ValueError(f"{name} must be a finite number{f' >= {lo}' if lo is not None else ''}, got {value}")
    return value


def _generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (samples are made on the CPU), got one on {generator.device}")
    return generator


def hidden_feature_clusters(n, *, d=10, tau=7.0, rho=None, generator=None):
    r"""The toy distribution of Yang, Li, Jiang, Li (AAAI 2024, arXiv 2401.03214).

    Four equiprobable clusters in R^d with centres ±e1 and ±e1 + τe2: the sign of the e1
    coordinate is the label, the presence of τe2 a hidden feature independent of it. Each
    sample is its centre plus ρ·N(0, I_d):

        x = label·e1 + hidden·τ·e2 + ρ·ξ,   label ∈ {−1, +1}, hidden ∈ {0, 1}, ξ ~ N(0, I_d).

    The paper shows that two sigmoid neurons trained by gradient ascent on the SSL
    objective Σ_i ⟨σ(Wx_i'), σ(Wx_i'')⟩ − αn‖W‖² (views from :func:`augment`) span both e1
    and e2, while a supervised two-layer sigmoid network learns only e1.

    Draws, in order: the label signs (n Bernoulli), the hidden bits (n Bernoulli), ξ (n×d).

    Args:
        n: number of samples >= 1.
        d: dimension >= 2 (10).
        tau: τ, the length of the hidden feature (7).
        rho: ρ >= 0, the noise scale (default d^(−3/2), the paper's).
        generator: a CPU ``torch.Generator`` (or None).
    Returns:
        :class:`HiddenFeatureClusters` (x, label, hidden, centre).
    """
    n = _int("n", n, 1)
    d = _int("d", d, 2)
    tau = _real("tau", tau)
    rho = d ** -1.5 if rho is None else _real("rho", rho, lo=0.0)
    generator = _generator(generator)
    label = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    hidden = torch.randint(0, 2, (n,), generator=generator)
    centre = torch.zeros(n, d, dtype=_F64)
    centre[:, 0] = label.to(_F64)
    centre[:, 1] = tau * hidden.to(_F64)
    x = centre + rho * torch.randn(n, d, generator=generator, dtype=_F64)
    return HiddenFeatureClusters(x, label, hidden, centre)


def augment(x, rho, generator=None):
    r"""A fresh view of samples: x + ρ·N(0, I), float64 (the augmentation of arXiv 2401.03214).

    Two calls give the two views x', x'' of the SSL objective. Pass the clean centres
    (``hidden_feature_clusters(...).centre``) for views drawn like the data itself, or the
    samples x for views around each sample.

    Args:
        x: (n, d) real tensor.
        rho: ρ >= 0, the noise scale.
        generator: a CPU ``torch.Generator`` (or None).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"x must be a real (n, d) torch.Tensor, got {type(x).__name__ if not isinstance(x, torch.Tensor) else f'{x.dtype} {tuple(x.shape)}'}")
    rho = _real("rho", rho, lo=0.0)
    generator = _generator(generator)
    x = x.detach().to(device="cpu", dtype=_F64)
    return x + rho * torch.randn(x.shape, generator=generator, dtype=_F64)


def _bins(p):
    """The p − 1 thresholds on ‖x1‖: 2.5 and 3.5 for p = 3, evenly spaced over [2.5, 3.5] otherwise (3.0 for p = 2)."""
    if p == 2:
        return torch.tensor([3.0], dtype=_F64)
    return torch.linspace(2.5, 3.5, p - 1, dtype=_F64)


def structural_redundancy(n, s, *, d1=10, d2=20, p=3, generator=None):
    r"""The generator of arXiv 2402.06884: features whose label-free part has rank s.

    ::

        x1 ~ N(0, I_d1)
        y  = the bin of ‖x1‖ with edges 2.5 and 3.5 (p = 3 classes; for other p, p − 1
             edges evenly spaced over [2.5, 3.5], 3.0 for p = 2)
        A (d2, p), B (d2, s) ~ U(−2, 2), drawn once per call
        g(x1)_jk = max(x1)·sin(2π((j/s)·min(x1) + 2πk/p)),   j = 0..s − 1, k = 0..p − 1
        ψ*(x1) = (A + B g(x1))·onehot(y) = E[x2 | x1]
        x2 = ψ*(x1) + N(0, I_d2)

    (the doubled 2π in g is the official code's). ψ*'s part that the labels do not explain
    lies in span(B), rank s: the low-rank redundancy ε_{s'} of
    :func:`sslops.metrics.redundancy` is 0 for s' ≥ s and positive below. The labels are
    linearly recoverable from ψ* (onehot(y) = Tψ* for some T) exactly when [A B] has full
    column rank, i.e. when p + s ≤ d2.

    Draws, in order: A, B, x1 (n×d1), the noise of x2 (n×d2).

    Args:
        n: samples >= 1; s: rank of the label-free part >= 1.
        d1: dimension of x1 >= 1 (10); d2: dimension of x2 >= 1 (20); p: classes >= 2 (3).
        generator: a CPU ``torch.Generator`` (or None).
    Returns:
        :class:`StructuralRedundancy` (x1, x2, y, psi, a, b).
    """
    n = _int("n", n, 1)
    s = _int("s", s, 1)
    d1 = _int("d1", d1, 1)
    d2 = _int("d2", d2, 1)
    p = _int("p", p, 2)
    generator = _generator(generator)
    a = torch.rand(d2, p, generator=generator, dtype=_F64) * 4 - 2
    b = torch.rand(d2, s, generator=generator, dtype=_F64) * 4 - 2
    x1 = torch.randn(n, d1, generator=generator, dtype=_F64)
    y = torch.bucketize(x1.norm(dim=1), _bins(p))
    j = torch.arange(s, dtype=_F64)[:, None]
    k = torch.arange(p, dtype=_F64)[None, :]
    lo, hi = x1.min(dim=1).values, x1.max(dim=1).values
    g = hi[:, None, None] * torch.sin(2 * math.pi * ((j / s) * lo[:, None, None] + 2 * math.pi * k / p))  # (n, s, p)
    g_y = g[torch.arange(n), :, y]  # g(x1)·onehot(y), (n, s)
    psi = a[:, y].T + g_y @ b.T
    x2 = psi + torch.randn(n, d2, generator=generator, dtype=_F64)
    return StructuralRedundancy(x1, x2, y, psi, a, b)


def add_background(images, kind, *, generator=None):
    r"""Add a distracting background to (N, H, W) images (pixel scale 0–16, scikit-learn's digits).

    The perception-vs-reconstruction setting of Balestriero & LeCun 2024 (arXiv 2402.11337):
    backgrounds that hold much of the pixel variance and none of the label, which
    reconstruction (PCA) spends its first directions on.

    * ``"pixel_noise"``: a per-pixel standard deviation 24·u³, u ~ U(0, 1), drawn once per
      call (a few very noisy pixels, most quiet), then fresh Gaussian noise per image.
    * ``"blocky"``: a texture of 2×2 blocks, each N(0, 8²), fresh per image (odd sides crop the
      last block).
    * ``"gradient"``: a linear intensity ramp of amplitude 16 (from 0 to 16 across the image)
      in a direction θ ~ U(0, 2π), fresh per image: a low-rank background.

    Draws, in order: pixel_noise: u (H×W), then the noise (N×H×W); blocky: the block values
    (N×⌈H/2⌉×⌈W/2⌉); gradient: θ (N).

    Args:
        images: (N, H, W) real tensor.
        kind: one of ``"pixel_noise"``, ``"blocky"``, ``"gradient"``.
        generator: a CPU ``torch.Generator`` (or None).
    Returns:
        (N, H, W) float64: images + background.
    """
    if not isinstance(images, torch.Tensor) or images.dtype == torch.bool or images.is_complex():
        raise TypeError(f"images must be a real torch.Tensor (N, H, W), got {type(images).__name__ if not isinstance(images, torch.Tensor) else images.dtype}")
    if images.dim() != 3 or min(images.shape) < 1:
        raise ValueError(f"images must have shape (N, H, W), got {tuple(images.shape)}")
    if kind not in BACKGROUNDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, BACKGROUNDS))}, got {kind!r}")
    generator = _generator(generator)
    images = images.detach().to(device="cpu", dtype=_F64)
    n, h, w = images.shape
    if kind == "pixel_noise":
        std = 24.0 * torch.rand(h, w, generator=generator, dtype=_F64) ** 3
        return images + std * torch.randn(n, h, w, generator=generator, dtype=_F64)
    if kind == "blocky":
        blocks = 8.0 * torch.randn(n, (h + 1) // 2, (w + 1) // 2, generator=generator, dtype=_F64)
        return images + blocks.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)[:, :h, :w]
    theta = 2 * math.pi * torch.rand(n, generator=generator, dtype=_F64)
    rows = torch.linspace(0.0, 1.0, h, dtype=_F64) if h > 1 else torch.zeros(1, dtype=_F64)
    cols = torch.linspace(0.0, 1.0, w, dtype=_F64) if w > 1 else torch.zeros(1, dtype=_F64)
    ramp = torch.cos(theta)[:, None, None] * cols[None, None, :] + torch.sin(theta)[:, None, None] * rows[None, :, None]
    low = ramp.amin(dim=(1, 2), keepdim=True)
    span = ramp.amax(dim=(1, 2), keepdim=True) - low
    ramp = torch.where(span > 0, (ramp - low) / span.clamp_min(1e-300), torch.zeros_like(ramp))
    return images + 16.0 * ramp
