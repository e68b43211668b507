"""``torch.nn.Module`` wrappers that hold the hyperparameters of each loss.

Each module's ``forward`` calls the function of the same name in
:mod:`sslops.functional`; see there for the math and the conventions.
"""

import math

import torch

from . import distributed
from . import functional as F

__all__ = ["VICRegLoss", "VICRegRelationLoss", "BarlowTwinsLoss", "InfoNCELoss", "NTXentLoss", "CLIPLoss", "SigLIPLoss",
           "NegativeQueue", "MatrixSSLLoss"]


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
    """InfoNCE over a sparse G: ``loss = InfoNCELoss(0.1)(z, labels=ids)``. See :func:`sslops.info_nce_loss`.

    ``forward(z, labels=None, pairs=None, negatives=None)``; ``temperature`` may be a 0-d
    tensor or ``nn.Parameter`` (learnable).
    """

    _fields = ("temperature", "in_batch_negatives", "decoupled", "gather", "backend")

    def __init__(self, temperature=0.1, gather=False, backend="auto", *, in_batch_negatives=True, decoupled=False):
        super().__init__()
        self.temperature, self.gather, self.backend = temperature, gather, backend
        self.in_batch_negatives, self.decoupled = in_batch_negatives, decoupled

    def forward(self, z, labels=None, pairs=None, negatives=None):
        return F.info_nce_loss(z, labels=labels, pairs=pairs, negatives=negatives, **self._kwargs())


class NTXentLoss(_Loss):
    """SimCLR's NT-Xent: ``loss = NTXentLoss(0.5)(z_a, z_b)``. See :func:`sslops.nt_xent_loss`.

    ``forward(z_a, z_b, negatives=None)``: with a :class:`NegativeQueue` and
    ``in_batch_negatives=False`` it is MoCo's loss / lightly's memory-bank NT-Xent.
    """

    _fields = ("temperature", "in_batch_negatives", "decoupled", "gather", "backend")

    def __init__(self, temperature=0.5, gather=False, backend="auto", *, in_batch_negatives=True, decoupled=False):
        super().__init__()
        self.temperature, self.gather, self.backend = temperature, gather, backend
        self.in_batch_negatives, self.decoupled = in_batch_negatives, decoupled

    def forward(self, z_a, z_b, negatives=None):
        return F.nt_xent_loss(z_a, z_b, negatives=negatives, **self._kwargs())


class CLIPLoss(_Loss):
    """CLIP with a learnable scale: ``loss = CLIPLoss()(image_emb, text_emb)``. See :func:`sslops.clip_loss`.

    Holds ``log_logit_scale`` = log t (a parameter when ``learnable``, else a buffer),
    initialised at log(``init_logit_scale``) = log(1/0.07); the scale used is
    ``min(exp(log_logit_scale), max_logit_scale)`` (open_clip clamps at 100), so the gradient
    of log t is zero while the clamp is active. ``forward(z_a, z_b, labels=None)``.
    """

    _fields = ("max_logit_scale", "normalize", "gather", "backend")

    def __init__(self, init_logit_scale=1 / 0.07, learnable=True, max_logit_scale=100.0, normalize=True, gather=False,
                 backend="auto"):
        super().__init__()
        if not init_logit_scale > 0 or not max_logit_scale > 0:
            raise ValueError(f"init_logit_scale and max_logit_scale must be > 0, got {init_logit_scale}, {max_logit_scale}")
        if learnable and init_logit_scale > max_logit_scale:
            raise ValueError(f"init_logit_scale ({init_logit_scale}) must be <= max_logit_scale ({max_logit_scale}): "
                             "clamped from the first step, the scale would get no gradient and never learn")
        log_scale = torch.tensor(math.log(init_logit_scale), dtype=torch.float32)
        if learnable:
            self.log_logit_scale = torch.nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)
        self.max_logit_scale, self.normalize, self.gather, self.backend = float(max_logit_scale), normalize, gather, backend

    @property
    def logit_scale(self):
        """t = min(exp(log t), max_logit_scale), a 0-d tensor in the graph."""
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, z_a, z_b, labels=None):
        return F.clip_loss(z_a, z_b, self.logit_scale, labels=labels, normalize=self.normalize, gather=self.gather,
                           backend=self.backend)


class SigLIPLoss(_Loss):
    """SigLIP with a learnable scale and bias: ``loss = SigLIPLoss()(image_emb, text_emb)``. See :func:`sslops.siglip_loss`.

    Holds ``log_logit_scale`` = log t (init log 10) and ``logit_bias`` = b (init −10), the
    paper's initialisation; parameters when ``learnable``, else buffers.
    ``forward(z_a, z_b, labels=None)``.
    """

    _fields = ("normalize", "gather", "backend")

    def __init__(self, init_logit_scale=10.0, init_logit_bias=-10.0, learnable=True, normalize=True, gather=False,
                 backend="auto"):
        super().__init__()
        if not init_logit_scale > 0:
            raise ValueError(f"init_logit_scale must be > 0, got {init_logit_scale}")
        log_scale = torch.tensor(math.log(init_logit_scale), dtype=torch.float32)
        bias = torch.tensor(float(init_logit_bias), dtype=torch.float32)
        if learnable:
            self.log_logit_scale, self.logit_bias = torch.nn.Parameter(log_scale), torch.nn.Parameter(bias)
        else:
            self.register_buffer("log_logit_scale", log_scale)
            self.register_buffer("logit_bias", bias)
        self.normalize, self.gather, self.backend = normalize, gather, backend

    @property
    def logit_scale(self):
        return self.log_logit_scale.exp()

    def forward(self, z_a, z_b, labels=None):
        return F.siglip_loss(z_a, z_b, self.logit_scale, self.logit_bias, labels=labels, normalize=self.normalize,
                             gather=self.gather, backend=self.backend)


class NegativeQueue(torch.nn.Module):
    """A first-in-first-out queue of negative rows (MoCo's queue, lightly's memory bank).

    ::

        queue = sslops.nn.NegativeQueue(65536, 128, init="random")   # MoCo's start
        loss = sslops.nt_xent_loss(q, k, negatives=queue.negatives, in_batch_negatives=False)
        loss.backward(); optimizer.step()
        queue.enqueue(k)            # after the step: the keys of this batch replace the oldest rows

    ``init``: ``"empty"`` (the default; lightly's and the in-batch form's start: with
    ``in_batch_negatives=True`` the first step uses the batch alone) or ``"random"`` (MoCo's
    start: the queue full of random unit rows from ``torch.randn``, so that the MoCo form,
    ``in_batch_negatives=False``, which needs negatives, runs from the first step). The random
    rows come from this process's generator: under ``torch.distributed`` seed every rank alike
    before building the queue (or keep it in the DDP-wrapped module, whose buffers DDP
    broadcasts from rank 0), so that the ranks start from one queue as they continue in one.
    ``negatives`` is the filled part of the queue ((min(seen, size), K), detached; with
    ``init="empty"`` empty until the first ``enqueue``). ``enqueue(keys)`` stores ``keys.detach()``
    in the queue's dtype (a floating dtype; under ``torch.autocast`` the losses cast the queue to
    the features' dtype);
    under ``torch.distributed`` (``gather=True``, the default) it first gathers the keys of
    every rank in rank order (batches may differ in size), so every rank holds the same queue,
    as MoCo's ``concat_all_gather`` does. A batch larger than the queue keeps its last
    ``size`` rows. The queue, its write position and fill level are buffers (saved in
    ``state_dict``). No host synchronisation: positions are kept as Python ints too.
    """

    def __init__(self, size, dim, *, dtype=torch.float32, device=None, gather=True, init="empty"):
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype (the queue holds features), got {dtype!r}")
        if init not in ("empty", "random"):
            raise ValueError(f"init must be 'empty' or 'random', got {init!r}")
        self.size, self.dim, self.gather = size, dim, gather
        if init == "random":
            rows = torch.nn.functional.normalize(torch.randn(size, dim, dtype=torch.float32, device=device), dim=1)
            self.register_buffer("queue", rows.to(dtype))
        else:
            self.register_buffer("queue", torch.zeros(size, dim, dtype=dtype, device=device))
        self._position, self._filled = 0, (size if init == "random" else 0)
        self.register_buffer("position", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("filled", torch.full((), self._filled, dtype=torch.int64, device=device))

    def extra_repr(self):
        return f"size={self.size}, dim={self.dim}, dtype={self.queue.dtype}, filled={self._filled}, gather={self.gather}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._position, self._filled = int(self.position), int(self.filled)

    @property
    def negatives(self):
        """The stored rows, (min(rows enqueued, size), K); the order of rows is immaterial to the losses."""
        return self.queue if self._filled == self.size else self.queue[:self._filled]

    @torch.no_grad()
    def enqueue(self, keys):
        """Append ``keys`` (B, K) (gathered over ranks when ``gather`` and W > 1), overwriting the oldest rows."""
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be a (B, {self.dim}) tensor, got "
                             f"{tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__}")
        keys = keys.detach()
        if self.gather and distributed.world_size() > 1:
            keys = distributed.all_gather_rows(keys)
        keys = keys[-self.size:].to(device=self.queue.device, dtype=self.queue.dtype)
        b = keys.shape[0]
        first = min(b, self.size - self._position)
        self.queue[self._position:self._position + first] = keys[:first]
        self.queue[:b - first] = keys[first:]
        self._position = (self._position + b) % self.size
        self._filled = min(self.size, self._filled + b)
        self.position.fill_(self._position)
        self.filled.fill_(self._filled)


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
