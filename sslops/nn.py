"""``torch.nn.Module`` wrappers that hold the hyperparameters of each loss.

Each module's ``forward`` calls the function of the same name in
:mod:`sslops.functional`; see there for the math and the conventions.
"""

import torch

from . import functional as F

__all__ = ["VICRegLoss", "VICRegRelationLoss", "BarlowTwinsLoss", "InfoNCELoss", "NTXentLoss", "MatrixSSLLoss"]


class _Loss(torch.nn.Module):
    _fields = ()

    def extra_repr(self):
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)

    def _kwargs(self):
        return {name: getattr(self, name) for name in self._fields}


class VICRegLoss(_Loss):
    """VICReg, two-view form: ``loss = VICRegLoss()(z_a, z_b)``. See :func:`sslops.vicreg_loss`."""

    _fields = ("sim_coeff", "std_coeff", "cov_coeff", "eps", "gather", "backend")

    def __init__(self, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4, gather=False, backend="auto"):
        super().__init__()
        self.sim_coeff, self.std_coeff, self.cov_coeff, self.eps = sim_coeff, std_coeff, cov_coeff, eps
        self.gather, self.backend = gather, backend

    def forward(self, z_a, z_b):
        return F.vicreg_loss(z_a, z_b, **self._kwargs())


class VICRegRelationLoss(_Loss):
    """VICReg over a relation G: ``loss = VICRegRelationLoss()(z, labels=...)``. See :func:`sslops.vicreg_relation_loss`."""

    _fields = ("alpha", "beta", "gamma", "eps", "gather", "backend")

    def __init__(self, alpha=25.0, beta=1.0, gamma=25.0, eps=1e-4, gather=False, backend="auto"):
        super().__init__()
        self.alpha, self.beta, self.gamma, self.eps = alpha, beta, gamma, eps
        self.gather, self.backend = gather, backend

    def forward(self, z, labels=None, pairs=None):
        return F.vicreg_relation_loss(z, labels=labels, pairs=pairs, **self._kwargs())


class BarlowTwinsLoss(_Loss):
    """Barlow Twins: ``loss = BarlowTwinsLoss()(z_a, z_b)``. See :func:`sslops.barlow_twins_loss`."""

    _fields = ("lambd", "eps", "gather", "backend")

    def __init__(self, lambd=0.0051, eps=1e-5, gather=False, backend="auto"):
        super().__init__()
        self.lambd, self.eps, self.gather, self.backend = lambd, eps, gather, backend

    def forward(self, z_a, z_b):
        return F.barlow_twins_loss(z_a, z_b, **self._kwargs())


class InfoNCELoss(_Loss):
    """InfoNCE over a sparse G: ``loss = InfoNCELoss(0.1)(z, labels=ids)``. See :func:`sslops.info_nce_loss`."""

    _fields = ("temperature", "gather", "backend")

    def __init__(self, temperature=0.1, gather=False, backend="auto"):
        super().__init__()
        self.temperature, self.gather, self.backend = temperature, gather, backend

    def forward(self, z, labels=None, pairs=None):
        return F.info_nce_loss(z, labels=labels, pairs=pairs, **self._kwargs())


class NTXentLoss(_Loss):
    """SimCLR's NT-Xent: ``loss = NTXentLoss(0.5)(z_a, z_b)``. See :func:`sslops.nt_xent_loss`."""

    _fields = ("temperature", "gather", "backend")

    def __init__(self, temperature=0.5, gather=False, backend="auto"):
        super().__init__()
        self.temperature, self.gather, self.backend = temperature, gather, backend

    def forward(self, z_a, z_b):
        return F.nt_xent_loss(z_a, z_b, **self._kwargs())


class MatrixSSLLoss(_Loss):
    """Matrix-SSL, symmetric over two views: ``loss = MatrixSSLLoss()(p1, p2, z1, z2)``.

    ``p1, p2`` are the **target** branch of views 1 and 2: the teacher (momentum / EMA)
    encoder's outputs, detached in the paper's released training code; ``z1, z2`` are the
    **online** branch: the predictor's outputs, through which the gradient flows. Returns
    ``0.5 * (matrix_ssl_loss(p2, z1) + matrix_ssl_loss(p1, z2))``, the paper's training
    loss (each view's online output against the other view's target); call with ``(p, z)``
    only for one ordered pair. ::

        criterion = sslops.nn.MatrixSSLLoss()
        z1, z2 = predictor(encoder(x1)), predictor(encoder(x2))
        with torch.no_grad():
            p1, p2 = teacher(x1), teacher(x2)
        criterion(p1, p2, z1, z2).backward()

    See :func:`sslops.matrix_ssl_loss` for the math, the arguments and what it raises.
    """

    _fields = ("lambd", "mu", "gamma", "order", "gather", "backend", "method", "check")

    def __init__(self, lambd=1.0, mu=1.0, gamma=1.0, order=4, gather=False, backend="auto", method="taylor", check="raise"):
        super().__init__()
        self.lambd, self.mu, self.gamma, self.order = lambd, mu, gamma, order
        self.gather, self.backend, self.method, self.check = gather, backend, method, check

    def forward(self, p1, p2, z1=None, z2=None):
        if z1 is None and z2 is None:
            return F.matrix_ssl_loss(p1, p2, **self._kwargs())
        if z1 is None or z2 is None:
            raise ValueError("MatrixSSLLoss takes (p, z) for one ordered pair or (p1, p2, z1, z2) for both views")
        return 0.5 * (F.matrix_ssl_loss(p2, z1, **self._kwargs()) + F.matrix_ssl_loss(p1, z2, **self._kwargs()))
