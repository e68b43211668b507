"""sslops: fast, memory-light, exact self-supervised-learning losses for PyTorch.

    from sslops import vicreg_loss, barlow_twins_loss, info_nce_loss, nt_xent_loss
    loss = vicreg_loss(z_a, z_b)                 # same number as facebookresearch/vicreg

Every loss takes ``backend="auto" | "triton" | "cuda" | "cpu" | "reference"`` (or the
environment variable ``SSLOPS_BACKEND``) and ``gather=True`` for the global batch of a
torch.distributed job. :func:`backends` says what runs on this machine and why not.
"""

from ._version import __version__
from ._backend import BackendUnavailableError, backends, kernel_backends
from ._validation import set_debug
from . import reference, ops  # noqa: F401  (ops registers the kernels)
from .functional import (
    barlow_twins_loss,
    clip_loss,
    info_nce_loss,
    matrix_cross_entropy,
    matrix_log,
    matrix_ssl_loss,
    nt_xent_loss,
    siglip_loss,
    vicreg_loss,
    vicreg_relation_loss,
)
from . import nn  # noqa: E402
from . import metrics  # noqa: E402  (diagnostics; the streaming ones load torchmetrics lazily)
from . import spectral, toy  # noqa: E402  (the papers' closed-form optima and toy data)

__all__ = [
    "__version__",
    "backends",
    "kernel_backends",
    "BackendUnavailableError",
    "set_debug",
    "vicreg_loss",
    "vicreg_relation_loss",
    "barlow_twins_loss",
    "info_nce_loss",
    "nt_xent_loss",
    "clip_loss",
    "siglip_loss",
    "matrix_log",
    "matrix_cross_entropy",
    "matrix_ssl_loss",
    "nn",
    "metrics",
    "spectral",
    "toy",
    "reference",
]
