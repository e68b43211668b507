r"""Convergence guard for the Taylor series of log Q around I.

The series :math:`\log Q \approx \sum_{k=1}^{n} (-1)^{k+1} (Q-I)^k / k` converges only when
the spectral radius :math:`\rho(Q-I)` is below 1; outside that disc the partial sums grow
without bound and any finite order returns a number that has nothing to do with log Q.
Every sslops entry point that uses the series (:func:`sslops.matrix_log`,
:func:`sslops.matrix_cross_entropy`, :func:`sslops.matrix_ssl_loss`) runs this guard on
X = Q - I unless told otherwise.

The test, cheapest first:

1. a certified bound: :math:`\rho(X) \le \min(\lVert X\rVert_1, \lVert X\rVert_\infty, \lVert X\rVert_F)`
   (O(K²), one pass over X). Below 1 the series converges: done.
2. otherwise an estimate by power iteration: 24 steps of X·V on 4 fixed, deterministic
   starting vectors; ρ̂ is the geometric mean growth per step over the last 12 steps (this
   converges to ρ(X) also for non-symmetric X and complex eigenvalue pairs). O(K²) per step,
   about 100·K² flops in all: under 1% of one K×K product once K ≥ 64.
   X is declared divergent when ρ̂ ≥ 1 - ``MARGIN`` (``MARGIN`` = 0.01: power iteration
   approaches ρ from below, and at ρ ≥ 0.99 an order-4 partial sum is anyway off from
   log Q by more than ρ⁵/5 per eigenvalue).

NaN or Inf in X makes the bound NaN and is *not* reported by the guard: it already gives a
NaN result, which is the library's policy for non-finite input.

Policies (the ``check`` argument):

``"raise"`` (default)
    ``ValueError`` naming the argument (``q``, or ``mu`` and the term for Matrix-SSL) with
    the estimated radius. Costs one host synchronisation per call (one more per matrix
    whose cheap bound is inconclusive): on a GPU a stall of some microseconds per call.
``"warn"``
    the same test, a ``RuntimeWarning`` instead of the error; the value is returned as is.
``"nan"``
    no host synchronisation: the result is replaced by NaN (every element, for
    :func:`~sslops.matrix_log`) when the test fails. Works inside CUDA graphs and
    ``torch.compile``; the training loop sees a NaN loss rather than a wrong one.
``"off"``
    no test at all, for training loops that have verified their μ (with rows L2-normalised
    and μ = 1, Matrix-SSL's matrices have ρ(Q - I) ≤ 1 by construction).

Under ``torch.compile`` (``torch.compiler.is_compiling()``) ``"raise"`` and ``"warn"``
act as ``"nan"``: a data-dependent Python branch would break the graph.
"""

import contextlib
import math
import warnings

import torch

from . import _autocast

CHECK_POLICIES = ("raise", "warn", "nan", "off")
MARGIN = 0.01
POWER_STEPS = 24
POWER_VECTORS = 4


def _start_vectors(k, m, dtype, device):
    """Fixed pseudo-random (k, m) start block, the same on every call and device (no RNG state)."""
    i = torch.arange(1, k + 1, dtype=torch.float64, device=device).unsqueeze(1)
    j = torch.arange(1, m + 1, dtype=torch.float64, device=device).unsqueeze(0)
    v = torch.sin(i * 12.9898 * j + 78.233 * j) * 43758.5453
    return (v - torch.floor(v) - 0.5).to(dtype)


def norm_bound(x):
    """A certified upper bound of ρ(x): min of the 1-, ∞- and Frobenius norms (0-dim tensor)."""
    a = x.abs()
    one = a.sum(dim=0).amax()
    inf = a.sum(dim=1).amax()
    fro = torch.linalg.vector_norm(x)
    return torch.minimum(torch.minimum(one, inf), fro)


@contextlib.contextmanager
def _serial_on_cpu(device):
    """Run the block on one intra-op thread for CPU tensors (eager mode only).

    The power iteration is ~100 tiny O(K²) ops; with several threads each one ends in a
    barrier, and on a machine whose cores are busy (data-loader workers, other jobs) a
    barrier waits for a descheduled thread: measured 2026-11-22 on a loaded 2-core machine,
    K = 512: 223 ms with 2 threads, 9.5 ms with 1 (K = 128: 387 ms against 1.9 ms).
    """
    if device.type != "cpu" or torch.compiler.is_compiling():  # compiled code: no thread switching
        yield
        return
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@_autocast.disabled  # x @ v in x's dtype, not fp16/bf16
def power_estimate(x, steps=POWER_STEPS, vectors=POWER_VECTORS):
    """Estimate ρ(x) as the mean growth per step of ‖x^t v‖ over the last half of ``steps``."""
    with _serial_on_cpu(x.device):
        return _power_estimate(x, steps, vectors)


def _power_estimate(x, steps, vectors):
    k = x.shape[-1]
    v = _start_vectors(k, vectors, x.dtype, x.device)
    v = v / torch.linalg.vector_norm(v, dim=0).clamp_min(1e-30)
    tiny = torch.finfo(x.dtype).tiny
    log_growth = torch.zeros(vectors, dtype=x.dtype, device=x.device)
    half = steps // 2
    for t in range(steps):
        w = x @ v
        nrm = torch.linalg.vector_norm(w, dim=0)
        if t >= half:
            log_growth = log_growth + torch.log(nrm.clamp_min(tiny))
        v = w / nrm.clamp_min(tiny).unsqueeze(0)
    return torch.exp(log_growth / (steps - half)).amax()


def divergent(x):
    """0-dim bool tensor: True when the series of log(I + x) must be taken as divergent.

    ``(norm_bound(x) >= 1) & (power_estimate(x) >= 1 - MARGIN)``; no host synchronisation.
    """
    x = x.detach()
    return (norm_bound(x) >= 1) & (power_estimate(x) >= 1 - MARGIN)


def log_series_matrices(x, arg="q"):
    """The ``mats`` entry of :func:`guard` for the series of log Q with X = Q - I given, Q the argument ``arg``."""
    return [(x, f"Q = {arg}", arg, " (the series needs every eigenvalue of Q within distance 1 of 1)")]


def _message(where, what, arg, radius, hint):
    return (
        f"{where}: the Taylor series of log Q diverges for {what}: the spectral radius of Q - I is "
        f"about {radius:.4g} (it must be below 1). Check the argument {arg}{hint}; or use an exact "
        "method (method='eigh' / method='exact'), or pass check='warn' | 'nan' | 'off' "
        "(see sslops.matrix_guard)."
    )


def check_policy(check):
    if check not in CHECK_POLICIES:
        raise ValueError(f"check must be one of {', '.join(map(repr, CHECK_POLICIES))}, got {check!r}")


@_autocast.disabled  # every check in the matrices' dtype, not fp16/bf16
def guard(result, mats, check, where):
    """Apply the policy ``check`` to ``result`` for the matrices ``mats``.

    ``mats`` is a list of ``(x, what, arg, hint)``: x = Q - I (K×K), ``what`` says which Q,
    ``arg`` names the argument to blame, ``hint`` is appended to the advice. Returns
    ``result`` (NaN-filled under ``"nan"`` when some x fails).
    """
    if check == "off" or not mats:
        return result
    policy = check
    if policy in ("raise", "warn") and torch.compiler.is_compiling():
        policy = "nan"
    if policy == "nan":
        bad = None
        for x, *_ in mats:
            d = divergent(x)
            bad = d if bad is None else bad | d
        return torch.where(bad, torch.full_like(result, math.nan), result)
    # host sync 1, for all matrices: the Frobenius norms (one pass each). They settle the
    # common case (Matrix-SSL with μ = 1 has ‖Q - I‖_F ≤ 1); the 1-/∞-norms come next.
    fro = torch.stack([torch.linalg.vector_norm(x.detach()) for x, *_ in mats]).tolist()
    for (x, what, arg, hint), f in zip(mats, fro):
        x = x.detach()
        if not f >= 1:  # below 1, or NaN (non-finite input: the result is NaN already)
            continue
        if not float(norm_bound(x)) >= 1:
            continue
        radius = float(power_estimate(x))  # host sync 2 (only when the cheap bound is inconclusive)
        if radius >= 1 - MARGIN:
            msg = _message(where, what, arg, radius, hint)
            if policy == "raise":
                raise ValueError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return result
