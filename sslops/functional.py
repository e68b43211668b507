r"""The public losses: validation, backend choice, and the signatures users call.

Every function here checks its inputs (conventions §6: a ``ValueError``/``TypeError`` that names
the argument), picks a backend (:mod:`sslops._backend`), and runs either a fused kernel
(registered by ``sslops/ops/<stem>.py``) or the pure-PyTorch reference.

Conventions shared by every loss:

* inputs are fp16, bf16, fp32 or fp64; everything accumulates in fp32 (fp64 for fp64
  inputs), the loss comes back as fp32 (fp64 for fp64 inputs) and gradients in the
  input's dtype;
* ``gather=True`` computes the loss over the global batch of all ranks of the default
  ``torch.distributed`` process group with the gradient contract of conventions §5
  (:mod:`sslops.distributed`); with no process group, or one rank, it is the
  single-process loss, so one script runs on one device and on many;
* ``backend`` is ``"auto" | "triton" | "cuda" | "cpu" | "reference"`` (or the
  environment variable ``SSLOPS_BACKEND`` when ``"auto"``).
"""

import contextlib
import functools
import math

import torch

from . import _autocast, _backend, distributed, reference
from . import _validation as V
from .ops._first_order import no_func_transform

__all__ = [
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
]


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel(loss, name):
    """The fused kernel ``name`` of ``loss``, after checking that no torch.func transform differentiates it."""
    no_func_transform(_PUBLIC_NAMES.get(loss, loss))
    return _backend.kernel_impl(loss, name)


_PUBLIC_NAMES = {"vicreg": "vicreg_loss", "vicreg_relation": "vicreg_relation_loss", "barlow_twins": "barlow_twins_loss",
                 "info_nce": "info_nce_loss", "nt_xent": "nt_xent_loss", "clip": "clip_loss", "siglip": "siglip_loss",
                 "matrix_ssl": "matrix_ssl_loss"}


def _run(loss, backend, tensors, params, reference_fn):
    """:func:`sslops._backend.run` (the resolved backend's kernel, or the reference in fp32,
    fp64 for fp64), with a fused kernel first checked by :func:`_kernel`."""
    shapes = tuple(t.shape for t in tensors if isinstance(t, torch.Tensor))
    name = _backend.resolve(loss, backend, tensors[0].device, shapes)
    if name != "reference":
        return _kernel(loss, name)(*tensors, **params)
    return _backend.run(loss, "reference", tensors, params, reference_fn)


def _relation_run(loss, backend, z, labels, pairs, params, reference_fn):
    """``_run`` for losses over a relation. Eagerly, ``pairs`` were range-checked already (one
    host sync). Under ``torch.compile`` a value check cannot raise, so it happens in the graph:
    out-of-range pairs are replaced by 0 before any kernel indexes with them and the loss
    becomes NaN (as the matrix guard's ``check="nan"``): never a wrong number, never an
    out-of-bounds read."""
    if pairs is None or not torch.compiler.is_compiling():
        return _run(loss, backend, (z, labels, pairs), params, reference_fn)
    bad = ((pairs < 0) | (pairs >= z.shape[0])).any()
    safe = torch.where(bad, torch.zeros_like(pairs), pairs)
    out = _run(loss, backend, (z, labels, safe), params, reference_fn)
    return torch.where(bad, torch.full_like(out, math.nan), out)


def _gathering(gather, loss):
    """Whether ``gather`` asks for the global batch here; a string must name a path ``loss`` has."""
    distributed.check_gather(gather, loss)
    return bool(gather) and distributed.world_size() > 1


@contextlib.contextmanager
def _checked(loss, gathering):
    """Run input checks; under ``gather=True`` a failure here raises on every rank (no hang)."""
    try:
        yield
    except (TypeError, ValueError) as exc:
        if gathering:
            distributed.raise_on_every_rank(loss, exc)
        raise


# ----------------------------------------------------------------------------- VICReg


@_autocast.fp32_loss
def vicreg_loss(z_a, z_b, *, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4, gather=False, backend="auto"):
    r"""VICReg, two-view form (Bardes, Ponce, LeCun 2022), as ``facebookresearch/vicreg``.

    .. math::

        \mathrm{inv} &= \tfrac{1}{NK}\textstyle\sum_{n,k} (z_a - z_b)_{nk}^2 \\
        \mathrm{std}(z)_k &= \sqrt{\mathrm{Var}_{unbiased}(z_{:,k}) + \epsilon} \\
        \mathrm{var} &= \tfrac12\,\mathrm{mean}_k\,\mathrm{relu}(1-\mathrm{std}(z_a)_k)
                      + \tfrac12\,\mathrm{mean}_k\,\mathrm{relu}(1-\mathrm{std}(z_b)_k) \\
        C(z) &= (z-\bar z)^\top (z-\bar z)/(N-1) \\
        \mathrm{cov} &= \textstyle\sum_{j\ne k} C(z_a)_{jk}^2/K + \sum_{j\ne k} C(z_b)_{jk}^2/K \\
        \mathcal L &= \lambda_{sim}\,\mathrm{inv} + \lambda_{std}\,\mathrm{var} + \lambda_{cov}\,\mathrm{cov}

    lightly and stable-pretraining compute the same number. solo-learn leaves the variance
    term unhalved: pass ``std_coeff=50`` to get its value.

    Args:
        z_a, z_b: (N, K) embeddings of the two views, N >= 2.
        sim_coeff, std_coeff, cov_coeff: the weights λ_sim, λ_std, λ_cov (25, 25, 1).
        eps: added to the variance before the square root (in fp32).
        gather: global-batch loss over all ranks (conventions §5; README, "Distributed training"); the
            invariance MSE stays local, as in the official code. ``True``/``"auto"``: the
            forward path that moves fewer bytes (``SSLOPS_GATHER`` can force one); ``"rows"``:
            all-gather the rows, then the fused kernel on the global batch; ``"sums"``:
            all-reduce K×K sums (:mod:`sslops.distributed` tables the bytes of both). No
            backward collective.
        backend: see :mod:`sslops`.
    Returns:
        0-dim loss, fp32 for fp16/bf16/fp32 inputs (fp64 for fp64), under autocast too;
        gradients in the inputs' dtype (first order: double backward raises).
    Raises:
        TypeError/ValueError naming the argument: shapes (2-D, N >= 2 where a variance is
        needed, the two inputs alike where the loss pairs them), dtypes,
        devices, non-finite or out-of-range hyperparameters (conventions §6);
        ``sslops.BackendUnavailableError`` when ``backend`` cannot run these tensors. NaN/Inf
        input gives a NaN loss (an error under ``sslops.set_debug(True)``).
    """
    gathering = _gathering(gather, "vicreg")
    with _checked("vicreg", gathering):
        V.check_embedding("z_a", z_a, min_rows=1 if gathering else 2, why_rows=" (VICReg needs a variance)")
        V.check_embedding("z_b", z_b, min_rows=1 if gathering else 2, why_rows=" (VICReg needs a variance)")
        V.check_same_layout("z_a", z_a, "z_b", z_b)
        for name, value in (("sim_coeff", sim_coeff), ("std_coeff", std_coeff), ("cov_coeff", cov_coeff)):
            V.check_real(name, value)
        V.check_positive("eps", eps)
    params = dict(sim_coeff=float(sim_coeff), std_coeff=float(std_coeff), cov_coeff=float(cov_coeff), eps=float(eps))
    if gathering:
        return distributed.vicreg_loss(z_a, z_b, gather=gather, backend=backend, **params)
    return _run("vicreg", backend, (z_a, z_b), params, reference.vicreg_loss)


@_autocast.fp32_loss
def vicreg_relation_loss(z, *, labels=None, pairs=None, alpha=25.0, beta=1.0, gamma=25.0, eps=1e-4, gather=False, backend="auto"):
    r"""VICReg over a relation matrix G (Balestriero & LeCun 2022, the spectral view).

    One matrix ``z`` of N rows; G is symmetric with a zero diagonal, given by ``labels``
    (G_ij = [labels_i = labels_j], i ≠ j) or by ``pairs`` (a (2, P) int64 (or int32) tensor; a pair
    given once counts both ways, duplicates count once, self-pairs are dropped).

    .. math::

        \mathrm{var} &= \mathrm{mean}_k\,\mathrm{relu}(1 - \sqrt{\mathrm{Cov}(z)_{kk}+\epsilon}) \\
        \mathrm{cov} &= \textstyle\sum_{j\ne k}\mathrm{Cov}(z)_{jk}^2 / K \\
        \mathrm{inv} &= \textstyle\sum_{ij} G_{ij}\,\lVert z_i - z_j\rVert^2 / (\mathrm{nnz}(G)\,K) \\
        \mathcal L &= \alpha\,\mathrm{var} + \beta\,\mathrm{cov} + \gamma\,\mathrm{inv}

    Cov is the unbiased covariance of all N rows. With ``z = cat([z_a, z_b])`` and G
    pairing row i with row i + N, inv equals the two-view MSE (var and cov then use one
    covariance of the stacked rows). An empty G gives inv = 0.

    Args:
        z: (N, K) embeddings, N >= 2.
        labels: (N,) integer tensor, or ``pairs``: (2, P) int64 (or int32) indices in [0, N); exactly one.
        alpha, beta, gamma: weights of var, cov and inv (25, 1, 25).
        eps: added to the variance before the square root.
        gather: global-batch loss (conventions §5; README, "Distributed training"); ``pairs`` then hold
            global row indices. ``True``/``"auto"``: the forward path that moves fewer bytes
            (``SSLOPS_GATHER`` can force one); ``"rows"``: all-gather the rows, then the fused
            kernel on the global batch; ``"sums"``: all-reduce K×K sums
            (:mod:`sslops.distributed` tables the bytes of both). No backward collective.
        backend: see :mod:`sslops`.
    Returns:
        0-dim loss, fp32 for fp16/bf16/fp32 inputs (fp64 for fp64), under autocast too;
        gradients in the inputs' dtype (first order: double backward raises).
    Raises:
        TypeError/ValueError naming the argument: shapes (2-D, N >= 2 where a variance is
        needed, the two inputs alike where the loss pairs them), dtypes,
        devices, non-finite or out-of-range hyperparameters (conventions §6);
        ``sslops.BackendUnavailableError`` when ``backend`` cannot run these tensors. NaN/Inf
        input gives a NaN loss (an error under ``sslops.set_debug(True)``).
    """
    gathering = _gathering(gather, "vicreg_relation")
    with _checked("vicreg_relation", gathering):
        V.check_embedding("z", z, min_rows=1 if gathering else 2, why_rows=" (the variance term needs two)")
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            V.check_real(name, value)
        V.check_positive("eps", eps)
    params = dict(alpha=float(alpha), beta=float(beta), gamma=float(gamma), eps=float(eps))
    if gathering:
        return distributed.vicreg_relation_loss(z, labels=labels, pairs=pairs, gather=gather, backend=backend, **params)
    V.check_relation(z.shape[0], z.device, labels, pairs)
    return _relation_run("vicreg_relation", backend, z, labels, pairs, params, reference.vicreg_relation_loss)


# ----------------------------------------------------------------------------- Barlow Twins


@_autocast.fp32_loss
def barlow_twins_loss(z_a, z_b, *, lambd=0.0051, eps=1e-5, gather=False, backend="auto"):
    r"""Barlow Twins (Zbontar et al. 2021), as ``facebookresearch/barlowtwins``.

    .. math::

        \mathrm{bn}(z) &= (z - \bar z)/\sqrt{\mathrm{Var}_{biased}(z) + \epsilon}
            \quad\text{per view, per column} \\
        c &= \mathrm{bn}(z_a)^\top \mathrm{bn}(z_b) / N \qquad (K\times K) \\
        \mathcal L &= \textstyle\sum_k (c_{kk}-1)^2 + \lambda\sum_{j\ne k} c_{jk}^2

    lightly uses λ = 5e-3 with the same normalisation (pass ``lambd=5e-3``).

    Args:
        z_a, z_b: (N, K) embeddings of the two views, N >= 2.
        lambd: weight of the off-diagonal term (0.0051).
        eps: batch-norm epsilon (1e-5), applied in fp32.
        gather: global-batch loss (conventions §5; README, "Distributed training"). ``True``/``"auto"``: the
            forward path that moves fewer bytes (``SSLOPS_GATHER`` can force one); ``"rows"``:
            all-gather the rows, then the fused kernel on the global batch; ``"sums"``:
            all-reduce K×K sums (:mod:`sslops.distributed` tables the bytes of both). No
            backward collective.
        backend: see :mod:`sslops`.
    Returns:
        0-dim loss, fp32 for fp16/bf16/fp32 inputs (fp64 for fp64), under autocast too;
        gradients in the inputs' dtype (first order: double backward raises).
    Raises:
        TypeError/ValueError naming the argument: shapes (2-D, N >= 2 where a variance is
        needed, the two inputs alike where the loss pairs them), dtypes,
        devices, non-finite or out-of-range hyperparameters (conventions §6);
        ``sslops.BackendUnavailableError`` when ``backend`` cannot run these tensors. NaN/Inf
        input gives a NaN loss (an error under ``sslops.set_debug(True)``).
    """
    gathering = _gathering(gather, "barlow_twins")
    with _checked("barlow_twins", gathering):
        V.check_embedding("z_a", z_a, min_rows=1 if gathering else 2, why_rows=" (batch normalisation needs a variance)")
        V.check_embedding("z_b", z_b, min_rows=1 if gathering else 2, why_rows=" (batch normalisation needs a variance)")
        V.check_same_layout("z_a", z_a, "z_b", z_b)
        V.check_real("lambd", lambd)
        V.check_positive("eps", eps)
    params = dict(lambd=float(lambd), eps=float(eps))
    if gathering:
        return distributed.barlow_twins_loss(z_a, z_b, gather=gather, backend=backend, **params)
    return _run("barlow_twins", backend, (z_a, z_b), params, reference.barlow_twins_loss)


# ----------------------------------------------------------------------------- InfoNCE and the contrastive family


def _positive_or_nan(loss, *values):
    """NaN where a tensor hyperparameter is not > 0 (conventions §3b: no host sync on the hot path)."""
    for value in values:
        if isinstance(value, torch.Tensor):
            loss = torch.where(value > 0, loss, torch.full_like(loss, math.nan))
    return loss


def _check_contrastive_options(name_z, z, temperature, negatives, in_batch_negatives, decoupled):
    V.check_hyper("temperature", temperature, z.device, positive=True)
    V.check_negatives(negatives, name_z, z)
    V.check_candidates(in_batch_negatives, negatives, decoupled)


def _contrastive_params(temperature, negatives, in_batch_negatives, decoupled):
    if negatives is not None and negatives.shape[0] == 0:
        negatives = None
    return dict(temperature=temperature if isinstance(temperature, torch.Tensor) else float(temperature),
                negatives=negatives, in_batch_negatives=in_batch_negatives, decoupled=decoupled)


@_autocast.fp32_loss
def info_nce_loss(z, *, labels=None, pairs=None, temperature=0.1, negatives=None, in_batch_negatives=True,
                  decoupled=False, gather=False, backend="auto"):
    r"""InfoNCE over a sparse relation G: SimCLR (any number of views), SupCon, MoCo-style queues, DCL.

    With cosine similarities :math:`s_{ij}` and positives :math:`P(i) = \{j : G_{ij}=1\}`:

    .. math::

        \ell_i = -\frac{1}{|P(i)|}\sum_{p\in P(i)}\Big[\frac{s_{ip}}{\tau}
                 - \log\sum_{a\in D(i)} e^{s_{ia}/\tau}\Big],\qquad
        \mathcal L = \mathrm{mean}\{\ell_i : |P(i)| \ge 1\}

    with the candidates :math:`D(i)` = every other row and the ``negatives`` (conventions §3,
    §3b). Every row is a negative for every other row; an anchor without positives adds
    nothing to the mean but still serves as a negative; a batch where no anchor has a
    positive gives 0 (and zero gradients). This is SupCon's :math:`L_{out}` (Khosla et al.
    2020). ``labels`` holding sample ids gives multi-view SimCLR; class ids give SupCon.
    solo-learn's SimCLR puts all positives in one numerator and pytorch-metric-learning
    drops the other positives from the denominator: those are different losses.

    Options (conventions §3b):

    * ``negatives`` (M, K): extra candidates of every anchor, never anchors or positives (a
      MoCo queue, a memory bank: see :class:`sslops.nn.NegativeQueue`); gradients reach them
      if they require grad. With ``in_batch_negatives=False`` an anchor's in-batch candidates
      are its positives only (D(i) = P(i) ∪ negatives).
    * ``decoupled=True``: DCL (Yeh et al., ECCV 2022, Eq. 6): D(i) leaves out the positives;
      an anchor left with no candidate drops out of the mean. ``"weighted"``: DCLW, each
      positive term weighted by :math:`w_{ip} = 2 - |E|\,\mathrm{softmax}_E(s_{ip}/\sigma)`
      (σ = 0.5, E the ordered positive pairs, weights detached; lightly's ``DCLWLoss``).
    * ``temperature`` may be a 0-d tensor that requires grad (a learnable temperature); a
      non-positive tensor gives a NaN loss (``sslops.set_debug(True)`` raises instead).

    Args:
        z: (N, K) embeddings (not necessarily normalised).
        labels: (N,) integers, G_ij = [labels_i = labels_j] for i ≠ j; or
        pairs: (2, P) int64 (or int32) row/column indices (symmetric; duplicates count once; self-pairs dropped).
        temperature: τ > 0 (0.1), a float or a 0-d tensor.
        negatives: (M, K) extra negatives of z's dtype and device, or None.
        in_batch_negatives: whether the batch's other rows are candidates (True).
        decoupled: False, True (DCL) or "weighted" (DCLW).
        gather: local anchors against the global batch (conventions §5); ``pairs`` then hold
            global row indices; ``negatives`` are not gathered (every rank holds the same queue).
        backend: see :mod:`sslops`.
    Returns:
        0-dim, fp32 (fp64 for fp64 inputs).
    Raises:
        TypeError/ValueError naming the argument (shapes, dtypes, devices, labels of the wrong
        length, pairs out of range, τ ≤ 0, negatives of another K/dtype/device,
        ``in_batch_negatives=False`` without negatives).
    """
    gathering = _gathering(gather, "info_nce")
    with _checked("info_nce", gathering):
        V.check_embedding("z", z)
        _check_contrastive_options("z", z, temperature, negatives, in_batch_negatives, decoupled)
    params = _contrastive_params(temperature, negatives, in_batch_negatives, decoupled)
    if gathering:
        out = distributed.info_nce_loss(z, labels=labels, pairs=pairs, backend=backend, **params)
    else:
        V.check_relation(z.shape[0], z.device, labels, pairs)
        out = _relation_run("info_nce", backend, z, labels, pairs, params, reference.info_nce_loss)
    return _positive_or_nan(out, temperature)


@_autocast.fp32_loss
def nt_xent_loss(z_a, z_b, *, temperature=0.5, negatives=None, in_batch_negatives=True, decoupled=False,
                 gather=False, backend="auto"):
    r"""SimCLR's NT-Xent over 2N anchors: row i of ``z_a`` and row i of ``z_b`` are positives.

    Equal to :func:`info_nce_loss` on ``cat([z_a, z_b])`` with ``labels = [0..N-1, 0..N-1]``,
    and to lightly's ``NTXentLoss`` (default τ = 0.5).

    With ``negatives`` (a MoCo queue or memory bank) and ``in_batch_negatives=False`` the
    anchors are the rows of ``z_a`` only, and anchor i's candidates are ``z_b[i]`` (its
    positive) and the negatives: MoCo's InfoNCE (q = z_a, k = z_b) and lightly's
    ``NTXentLoss(memory_bank_size=M)``, same value and gradients (conventions §3b).
    ``decoupled=True`` is DCL as the paper's Eq. 6 and its authors' code compute it (one
    logsumexp over both views' negatives; lightly's ``DCLLoss`` sums two separate ones, a
    different number), ``"weighted"`` DCLW with lightly's weights (2 − N·softmax(s_ii'/0.5),
    detached).

    Args:
        z_a, z_b: (N, K) embeddings of the two views.
        temperature: τ > 0 (0.5), a float or a 0-d tensor (learnable).
        negatives: (M, K) extra negatives, or None.
        in_batch_negatives: whether in-batch rows are candidates (True).
        decoupled: False, True (DCL) or "weighted" (DCLW).
        gather: global-batch negatives (conventions §5); ``negatives`` are not gathered.
        backend: see :mod:`sslops`.
    Returns:
        0-dim loss, fp32 for fp16/bf16/fp32 inputs (fp64 for fp64), under autocast too;
        gradients in the inputs' dtype (first order: double backward raises).
    Raises:
        TypeError/ValueError naming the argument: shapes (2-D, N >= 2 where a variance is
        needed, the two inputs alike where the loss pairs them), dtypes,
        devices, non-finite or out-of-range hyperparameters (conventions §6);
        ``sslops.BackendUnavailableError`` when ``backend`` cannot run these tensors. NaN/Inf
        input gives a NaN loss (an error under ``sslops.set_debug(True)``).
    """
    gathering = _gathering(gather, "nt_xent")
    with _checked("nt_xent", gathering):
        V.check_embedding("z_a", z_a)
        V.check_embedding("z_b", z_b)
        V.check_same_layout("z_a", z_a, "z_b", z_b)
        _check_contrastive_options("z_a", z_a, temperature, negatives, in_batch_negatives, decoupled)
    params = _contrastive_params(temperature, negatives, in_batch_negatives, decoupled)
    if gathering:
        out = distributed.nt_xent_loss(z_a, z_b, backend=backend, **params)
    else:
        out = _run("nt_xent", backend, (z_a, z_b), params, reference.nt_xent_loss)
    return _positive_or_nan(out, temperature)


def _check_two_sets(loss, z_a, z_b, labels, normalize, gathering):
    V.check_embedding("z_a", z_a)
    V.check_embedding("z_b", z_b)
    V.check_same_layout("z_a", z_a, "z_b", z_b)
    V.check_bool("normalize", normalize)
    if labels is not None:
        V.check_labels(labels, z_a.shape[0], z_a.device)


@_autocast.fp32_loss
def clip_loss(z_a, z_b, logit_scale, *, labels=None, normalize=True, gather=False, backend="auto"):
    r"""CLIP's symmetric cross-entropy over two sets (Radford et al. 2021; open_clip ``ClipLoss``).

    With :math:`T_{ij} = t\cos(a_i, b_j)`, t = ``logit_scale`` (already exponentiated, as
    open_clip passes it) and positives :math:`P(i)` (b_i, or every b_j with the label of a_i):

    .. math::

        \mathcal L = \tfrac12\Big[\mathrm{mean}_i\big(\log\textstyle\sum_j e^{T_{ij}}
            - \tfrac{1}{|P(i)|}\sum_{j\in P(i)} T_{ij}\big)
            + \mathrm{mean}_j\big(\log\textstyle\sum_i e^{T_{ij}}
            - \tfrac{1}{|P(j)|}\sum_{i\in P(j)} T_{ij}\big)\Big]

    Without labels this is open_clip's ``ClipLoss`` (same value and gradients for normalised
    features); with labels each direction is §3's L_out (conventions §3b). The kernels never
    store T: per row and per column a running max and sum over tiles (two passes), per-row
    statistics saved, tiles recomputed in the backward, the gradient of a tensor
    ``logit_scale`` from those statistics.

    Args:
        z_a, z_b: (N, K) embeddings of the two sets (images, texts), same dtype and device.
        logit_scale: t > 0, a float or a 0-d tensor (learnable: :class:`sslops.nn.CLIPLoss`
            holds log t); a non-positive tensor gives a NaN loss.
        labels: (N,) integers, one per pair (a_i, b_i), or None (the positive of a_i is b_i).
        normalize: normalise rows inside (True); False uses the inputs as given.
        gather: each rank's rows against all ranks' rows of the other set (conventions §5).
        backend: see :mod:`sslops`.
    Returns:
        0-dim, fp32 (fp64 for fp64 inputs); gradients in the inputs' dtype.
    Raises:
        TypeError/ValueError naming the argument: shapes (2-D, N >= 2 where a variance is
        needed, the two inputs alike where the loss pairs them), dtypes,
        devices, non-finite or out-of-range hyperparameters (conventions §6);
        ``sslops.BackendUnavailableError`` when ``backend`` cannot run these tensors. NaN/Inf
        input gives a NaN loss (an error under ``sslops.set_debug(True)``).
    """
    gathering = _gathering(gather, "clip")
    with _checked("clip", gathering):
        _check_two_sets("clip", z_a, z_b, labels, normalize, gathering)
        V.check_hyper("logit_scale", logit_scale, z_a.device, positive=True)
    scale = logit_scale if isinstance(logit_scale, torch.Tensor) else float(logit_scale)
    params = dict(logit_scale=scale, labels=labels, normalize=normalize)
    if gathering:
        out = distributed.clip_loss(z_a, z_b, backend=backend, **params)
    else:
        out = _run("clip", backend, (z_a, z_b), params, reference.clip_loss)
    return _positive_or_nan(out, logit_scale)


@_autocast.fp32_loss
def siglip_loss(z_a, z_b, logit_scale, logit_bias, *, labels=None, normalize=True, gather=False, backend="auto"):
    r"""SigLIP's pairwise sigmoid loss (Zhai et al., ICCV 2023; open_clip ``SigLipLoss``).

    .. math::

        \mathcal L = -\frac1N \sum_i\sum_j \log\sigma\big(y_{ij}\,(t\cos(a_i, b_j) + b)\big),
        \qquad y_{ij} = \begin{cases} +1 & j \in P(i) \\ -1 & \text{otherwise}\end{cases}

    t = ``logit_scale`` (exponentiated; SigLIP initialises log t = log 10), b =
    ``logit_bias`` (initialised −10), P(i) = {i} or the b_j sharing a_i's label. Same value
    and gradients as open_clip's ``SigLipLoss`` on normalised features (conventions §3b).
    The kernels sum softplus(−y·x) over tiles, never an N×N matrix, stably in every dtype
    (no inf/NaN for any logit), with the gradients of t and b reduced in the same pass.

    Args:
        z_a, z_b: (N, K) embeddings of the two sets.
        logit_scale: t > 0, a float or a 0-d tensor; a non-positive tensor gives a NaN loss.
        logit_bias: b, a float or a 0-d tensor.
        labels: (N,) integers, one per pair, or None.
        normalize: normalise rows inside (True); False uses the inputs as given.
        gather: local rows of a against all rows of b (conventions §5).
        backend: see :mod:`sslops`.
    Returns:
        0-dim, fp32 (fp64 for fp64 inputs).
    Raises:
        TypeError/ValueError naming the argument: shapes (2-D, N >= 2 where a variance is
        needed, the two inputs alike where the loss pairs them), dtypes,
        devices, non-finite or out-of-range hyperparameters (conventions §6);
        ``sslops.BackendUnavailableError`` when ``backend`` cannot run these tensors. NaN/Inf
        input gives a NaN loss (an error under ``sslops.set_debug(True)``).
    """
    gathering = _gathering(gather, "siglip")
    with _checked("siglip", gathering):
        _check_two_sets("siglip", z_a, z_b, labels, normalize, gathering)
        V.check_hyper("logit_scale", logit_scale, z_a.device, positive=True)
        V.check_hyper("logit_bias", logit_bias, z_a.device, positive=False)
    scale = logit_scale if isinstance(logit_scale, torch.Tensor) else float(logit_scale)
    bias = logit_bias if isinstance(logit_bias, torch.Tensor) else float(logit_bias)
    params = dict(logit_scale=scale, logit_bias=bias, labels=labels, normalize=normalize)
    if gathering:
        out = distributed.siglip_loss(z_a, z_b, backend=backend, **params)
    else:
        out = _run("siglip", backend, (z_a, z_b), params, reference.siglip_loss)
    return _positive_or_nan(out, logit_scale)


# ----------------------------------------------------------------------------- matrix information


from . import matrix_guard  # noqa: E402  (the convergence guard of the series below)

_LOG_METHODS = ("taylor", "eigh")
_SSL_METHODS = ("taylor", "exact")


def _series_guard_q(q):
    return matrix_guard.log_series_matrices(q - torch.eye(q.shape[-1], dtype=q.dtype, device=q.device))


@_autocast.fp32_loss
def matrix_log(q, *, order=4, method="taylor", check="raise"):
    r"""log Q by the Taylor series around I, or exactly by eigendecomposition.

    ``method="taylor"``: :math:`\log Q \approx \sum_{k=1}^{n} (-1)^{k+1} (Q-I)^k / k`, valid
    only when the spectral radius of Q − I is below 1. The convergence guard
    (:mod:`sslops.matrix_guard`) checks it: a norm bound first, power iterations when the
    bound is inconclusive; ``check`` is the policy when it fails: ``"raise"`` (default, a
    ``ValueError`` naming ``q``; one host sync per call), ``"warn"``, ``"nan"`` (no sync: the
    result is all NaN) or ``"off"``.
    ``method="eigh"``: the exact log of the symmetric part of Q (Q must be symmetric
    positive definite; a non-positive eigenvalue gives NaN/-inf). O(K³), about 10× one K×K
    product; no convergence condition.

    Args:
        q: (K, K) matrix.
        order: n >= 1, the number of Taylor terms.
        method: ``"taylor"`` or ``"eigh"``.
        check: the guard's policy for ``method="taylor"``.
    Returns:
        (K, K) in q's dtype, computed in fp32 (fp64 for fp64).
    """
    V.check_square("q", q)
    V.check_order(order)
    V.check_choice("method", method, _LOG_METHODS)
    matrix_guard.check_policy(check)
    wide = q.to(_compute_dtype(q.dtype))
    out = reference.matrix_log(wide, order=int(order), method=method)
    if method == "taylor":
        out = matrix_guard.guard(out, _series_guard_q(wide), check, "matrix_log")
    return out.to(q.dtype)


def _trace_p_log_taylor(p, q, order):
    """tr(P · Σ_k c_k (Q-I)^k) along the chain A_k = A_{k-1}(Q-I): order-1 products, no log Q."""
    x = q - torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    xt = x.T
    a = p
    total = (a * xt).sum()
    for k in range(2, order + 1):
        a = a @ x
        total = total + ((-1.0) ** (k + 1) / k) * (a * xt).sum()
    return total


def _mce_reference(p, q, *, order, check):
    """The reference route of :func:`matrix_cross_entropy`: the torch-op chain, autograd."""
    out = -_trace_p_log_taylor(p, q, order) + q.diagonal().sum()
    return matrix_guard.guard(out, _series_guard_q(q), check, "matrix_cross_entropy")


@_autocast.fp32_loss
def matrix_cross_entropy(p, q, *, order=4, method="taylor", check="raise", backend="auto"):
    r"""Matrix cross-entropy :math:`\mathrm{MCE}(P, Q) = \mathrm{tr}(-P\log Q + Q)`.

    The full definition, including +tr(Q); Matrix-SSL's released code drops that term
    (:func:`matrix_ssl_loss` follows the released code).

    ``method="taylor"`` takes tr(P log Q) from the series without forming log Q
    (c_k = (-1)^{k+1}/k, n = ``order``, X = Q - I):

    .. math::

        \mathcal L = -\textstyle\sum_{k=1}^{n} c_k\,\mathrm{tr}(P X^k) + \mathrm{tr}\,Q,
        \qquad \mathrm{tr}(P X^k) = \textstyle\sum_{ij} (A_{k-1})_{ij} X_{ji},\quad
        A_0 = P,\; A_j = A_{j-1} X

    The fused kernels (``backend``: cpu, cuda, triton; :mod:`sslops.ops.matrix_info`) make
    the n - 1 products of the chain, tracing each without another product, and get the
    gradient from closed forms instead of autograd through the chain:

    .. math::

        \partial\mathcal L/\partial P = -f(X)^\top,\; f(X) = \textstyle\sum_k c_k X^k,
        \qquad \partial\mathcal L/\partial Q = -G^\top + I,\;
        G = \textstyle\sum_{m<n} X^m \sum_{j\le n-1-m} c_{m+j+1} A_j

    (Paterson–Stockmeyer for f, Horner in X for G). Cost: n - 1 K×K products forward (one
    fewer than "log Q, then P·log Q"), about 2(n - 1) backward, each only for the input that
    needs a gradient (order 4: three forward, two for P and three for Q). The ``reference``
    backend runs the same chain as PyTorch ops with autograd through it. The series is guarded like
    :func:`matrix_log` (``check``, on X, no extra product); P and Q need not be symmetric.
    ``method="eigh"``: the exact log of the symmetric part of Q, O(K³), autograd, no kernel.

    Args:
        p, q: (K, K) matrices.
        order, method, check: how log Q is computed and guarded (see :func:`matrix_log`).
        backend: see :mod:`sslops` (``method="taylor"`` only).
    Returns:
        0-dim, fp32 (fp64 for fp64 inputs); gradients in the inputs' dtype.
    """
    V.check_square("p", p)
    V.check_square("q", q)
    V.check_same_layout("p", p, "q", q)
    V.check_order(order)
    V.check_choice("method", method, _LOG_METHODS)
    matrix_guard.check_policy(check)
    _backend.requested(backend)  # a bad name raises also where method="eigh" would not use it
    if method == "eigh":
        wide = _compute_dtype(p.dtype)
        return reference.matrix_cross_entropy(p.to(wide), q.to(wide), order=int(order), method=method)
    return _run("matrix_cross_entropy", backend, (p, q), dict(order=int(order), check=check), _mce_reference)


def _matrix_ssl_exact(p, z, lambd, mu, gamma):
    """U by log det (LU: the cross-covariance is not symmetric), A by eigh; O(K³), autograd."""
    n, k = p.shape
    p = torch.nn.functional.normalize(p, dim=1)
    z = torch.nn.functional.normalize(z, dim=1)
    pc = p - p.mean(dim=0)
    zc = z - z.mean(dim=0)
    eye = torch.eye(k, dtype=p.dtype, device=p.device)
    sign, logabs = torch.linalg.slogdet(pc.T @ zc / n + mu * eye)
    logdet = torch.where(sign > 0, logabs, torch.full_like(logabs, float("nan")))  # no real principal log
    big_p = pc.T @ pc / n + mu * eye
    qa = zc.T @ zc / n + mu * eye
    w, v = torch.linalg.eigh((qa + qa.T) / 2)
    # tr(P V diag(log w) Vᵀ) = Σ_i log w_i · v_iᵀ P v_i
    alignment = -(torch.log(w) * ((big_p @ v) * v).sum(dim=0)).sum()
    return -lambd * logdet + gamma * alignment


@_autocast.fp32_loss
def matrix_ssl_loss(p, z, *, lambd=1.0, mu=1.0, gamma=1.0, order=4, gather=False, backend="auto", method="taylor", check="raise"):
    r"""Matrix-SSL (Zhang et al., arXiv 2305.17326) for one ordered pair: target p, online z.

    The roles are those of the paper's released training code: ``p`` is the **target**
    branch, the teacher (momentum / EMA) encoder's output, detached there; ``z`` is the
    **online** branch, the predictor's output, whose gradient trains the network: it flows
    through log Q(z) of the alignment term and through pᵀJz of the uniformity term. (The
    function is differentiable in both arguments; a ``p`` that requires grad gets its
    gradient too, through P = pᵀJp and pᵀJz.) Rows are L2-normalised, J centres by
    subtracting column means (never an N×N matrix):

    .. math::

        U(p, z) &= -\mathrm{tr}\big(\lambda I\cdot\log(p^\top J z/N + \mu I)\big) \\
        A(p, z) &= -\mathrm{tr}\big((p^\top J p/N + \mu I)\cdot\log(z^\top J z/N + \mu I)\big) \\
        \mathcal L(p, z) &= U(p, z) + \gamma\,A(p, z)

    log by the Taylor series of ``order`` around I, as the released code does (it drops
    MCE's +tr(Q) term). The symmetric two-view loss of the paper, with a momentum teacher::

        z1, z2 = predictor(encoder(x1)), predictor(encoder(x2))   # online branch
        with torch.no_grad():                                      # target branch
            p1, p2 = teacher(x1), teacher(x2)                      # teacher: EMA copy of encoder
        loss = 0.5 * (matrix_ssl_loss(p2, z1) + matrix_ssl_loss(p1, z2))
        loss.backward()
        ema_update(teacher, encoder)                               # e.g. momentum 0.996

    with λ = μ = γ = 1 (the released command line; its argparse defaults are 0.5).

    The kernels never form log Q: only tr(X^k) and tr(P X^k) (four K×K products for order
    4 in the forward; in the backward four when both inputs need a gradient, two when only
    z does; see :mod:`sslops.ops.matrix_info`).

    **Convergence guard.** The series needs ρ(Q - I) < 1 for both Q. With L2-normalised rows
    and μ = 1 that holds by construction (‖pᵀJz/N‖_F ≤ 1); other μ can break it (μ ≤ 0 or
    μ ≥ 2 always does: Q - I then has an eigenvalue μ - 1 or above 1). ``check`` (see :mod:`sslops.matrix_guard`): ``"raise"``
    (default: ``ValueError`` naming ``mu``; one host sync per call, on the K×K matrices
    the kernel already made, no extra product), ``"warn"``, ``"nan"`` (no sync: NaN loss
    when divergent; what ``torch.compile`` gets) or ``"off"`` for loops that have checked μ.

    **Exact alternative** (``method="exact"``): U = -λ·log det(pᵀJz/N + μI) by LU
    (``slogdet``; NaN when the determinant is not positive, where no real log exists) and A
    with log Q from ``eigh``: no series, no convergence condition, O(K³) (an eigh costs
    about ten K×K products), autograd, no fused kernel. How far order 4 sits from it
    (float64, μ = λ = 1, relative error of U and of A, measured with this library):

    ========================================================  ==========  ==========
    embeddings (N = 1024, K = 128, rows L2-normalised)         U           A
    ========================================================  ==========  ==========
    independent Gaussian p, z                                  3.4e-11     1.9e-9
    p, z = shared rank-16 signal + 0.1 noise                   7.5e-6      7.6e-6
    p, z = shared rank-4 signal + 0.1 noise                    8.4e-4      8.5e-4
    p, z = shared rank-2 signal + 0.1 noise (near collapse)    1.0e-2      9.9e-3
    ========================================================  ==========  ==========

    The eigenvalues of Q - I are about 1/(effective rank), so the truncation error
    (~ρ⁵/5 per eigenvalue) is negligible for spread-out embeddings and reaches 1% as they
    collapse onto two directions.

    The fused kernels are first-order (their backward is not differentiable):
    ``create_graph=True`` and ``torch.func.grad`` raise ``RuntimeError``; ``backend="reference"``
    is plain PyTorch, differentiable to any order.

    Args:
        p: (N, K) target-branch embeddings (the teacher's output; usually detached), N >= 2.
        z: (N, K) online-branch embeddings (the predictor's output), same shape and dtype.
        lambd, mu, gamma: λ, μ, γ (1, 1, 1).
        order: Taylor order n >= 1 (4).
        gather: global-batch loss (conventions §5; README, "Distributed training"): one all-gather of the
            rows, then this function on the global batch on every rank (``method="taylor"``
            only; ``check`` applies there).
        backend: see :mod:`sslops` (``method="taylor"`` only).
        method: ``"taylor"`` (the released code's series) or ``"exact"``.
        check: the convergence guard's policy for ``method="taylor"``.
    Returns:
        0-dim, fp32 (fp64 for fp64 inputs); gradients in the inputs' dtype.
    Raises:
        TypeError, ValueError: bad input, naming the argument (N < 2: one centred row has a
        zero covariance); ``ValueError`` from the guard (``check="raise"``) when the series
        diverges.
    """
    gathering = _gathering(gather, "matrix_ssl")
    with _checked("matrix_ssl", gathering):
        why = " (Matrix-SSL centres the rows: the covariances of one row are zero)"
        V.check_embedding("p", p, min_rows=1 if gathering else 2, why_rows=why)
        V.check_embedding("z", z, min_rows=1 if gathering else 2, why_rows=why)
        V.check_same_layout("p", p, "z", z)
        for name, value in (("lambd", lambd), ("mu", mu), ("gamma", gamma)):
            V.check_real(name, value)
        V.check_order(order)
        V.check_choice("method", method, _SSL_METHODS)
        _backend.requested(backend)  # a bad name raises also where method="exact" would not use it
    matrix_guard.check_policy(check)
    params = dict(lambd=float(lambd), mu=float(mu), gamma=float(gamma), order=int(order))
    if gathering:
        if method != "taylor":
            raise ValueError("method='exact' does not support gather=True; use method='taylor'")
        single = functools.partial(matrix_ssl_loss, **params, backend=backend, method=method, check=check)
        return distributed.matrix_ssl_loss(p, z, single, backend=backend)
    wide = _compute_dtype(p.dtype)
    if method == "exact":
        return _matrix_ssl_exact(p.to(wide), z.to(wide), params["lambd"], params["mu"], params["gamma"])
    name = _backend.resolve("matrix_ssl", backend, p.device, (tuple(p.shape), tuple(z.shape)))
    if name != "reference":
        return _kernel("matrix_ssl", name)(p, z, check=check, **params)
    pw, zw = p.to(wide), z.to(wide)
    loss = reference.matrix_ssl_loss(pw, zw, **params)
    if check != "off":
        with torch.no_grad():
            n = pw.shape[0]
            pc = torch.nn.functional.normalize(pw, dim=1)
            zc = torch.nn.functional.normalize(zw, dim=1)
            pc, zc = pc - pc.mean(dim=0), zc - zc.mean(dim=0)
            shift = (params["mu"] - 1.0) * torch.eye(pw.shape[1], dtype=wide, device=pw.device)
            mats = _matrix_info_ops().guard_matrices(pc.T @ zc / n + shift, zc.T @ zc / n + shift)
        loss = matrix_guard.guard(loss, mats, check, "matrix_ssl_loss")
    return loss


def _matrix_info_ops():
    from .ops import matrix_info

    return matrix_info
