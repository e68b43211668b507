r"""Streaming RankMe, EffectiveRank and LiDAR as torchmetrics ``Metric`` s (``sslops.metrics``).

Each keeps float64 sums whose size depends only on K (the number of features): ``update``
adds a batch's sums (no host synchronisation: a training step can call it every time),
``compute`` turns them into the value for every row seen since ``reset`` — all-reducing
the sums across ranks first when a process group is initialised (torchmetrics'
``dist_reduce_fx="sum"``), so every rank gets the value of the concatenation of all ranks'
rows, whatever the batch sizes. The result equals the one-shot function of
:mod:`sslops.metrics` on the concatenation.

States (K features): RankMe / EffectiveRank: the :class:`sslops.metrics.Moments` of the
rows (a count, the K column sums, two K×K matrices, the products' rounding scale);
LiDAR: the :func:`sslops.metrics.lidar_moments` sums (three K×K, one K, three counts).
Memory O(K²) whatever the number of rows.

The states are float64, which MPS lacks: keep these metrics on the CPU when the model runs
on MPS (``update`` copies an MPS batch to the states' device).
"""

import torch

from . import _validation as V
from . import metrics as M
from ._autocast import disabled

try:
    from torchmetrics import Metric
except ImportError as exc:  # pragma: no cover - exercised by the test that hides torchmetrics
    raise ImportError(
        "sslops.metrics.RankMe, EffectiveRank and LiDAR are torchmetrics Metrics: install the extra with "
        "`pip install \"sslops[metrics]\"` (or `pip install torchmetrics`). The functions rankme, lidar, ... "
        "of sslops.metrics need only torch."
    ) from exc

F64 = torch.float64


def _check_features(num_features):
    if isinstance(num_features, bool) or not isinstance(num_features, int):
        raise TypeError(f"num_features must be an int (K, the columns of every batch), got {type(num_features).__name__}")
    if num_features < 1:
        raise ValueError(f"num_features must be >= 1, got {num_features}")


class _StreamingMetric(Metric):
    """Shared plumbing: K fixed at construction, float64 sum states, batch checks."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_features, **kwargs):
        _check_features(num_features)
        super().__init__(**kwargs)
        self.num_features = num_features

    def _sum_state(self, name, *shape):
        self.add_state(name, default=torch.zeros(shape, dtype=F64), dist_reduce_fx="sum")

    def _batch(self, z):
        V.check_embedding("z", z)
        if z.shape[1] != self.num_features:
            raise ValueError(f"z must have {self.num_features} columns (num_features), got shape {tuple(z.shape)}")
        return z.to(self.device)  # the states' device (float64 states cannot live on MPS: keep them on the CPU)


class _GramMetric(_StreamingMetric):
    """Sums of rows and of their outer products (for RankMe and EffectiveRank)."""

    def __init__(self, num_features, **kwargs):
        super().__init__(num_features, **kwargs)
        k = num_features
        self._sum_state("count")
        self._sum_state("total", k)
        self._sum_state("within", k, k)
        self._sum_state("between", k, k)
        self._sum_state("noise")

    @disabled
    def update(self, z):
        """Add the rows of ``z`` (B, K) (any B ≥ 1, any floating dtype; no host sync)."""
        z = self._batch(z)
        for name, value in M.row_moments(z.detach())._asdict().items():
            setattr(self, name, getattr(self, name) + value)

    def _moments(self):
        return M.Moments(self.count, self.total, self.within, self.between, self.noise)

    def _rows_rank(self, center):
        """The entropy rank of the singular values of all rows seen (centred or not)."""
        moments = self._moments()
        count = torch.clamp(self.count, max=float(self.num_features))  # k <= min(N, K)
        return M.singular_value_rank(moments.gram(center), moments.floor(), count, self.eps)

    def _check_rows(self, need, why):
        seen = int(self.count)
        if 0 < seen < need:
            raise ValueError(f"z: {seen} row(s) seen since reset; {why}")

    def _empty_to_nan(self, value):
        return torch.where(self.count > 0, value, torch.full_like(value, float("nan")))


class RankMe(_GramMetric):
    r"""RankMe over every row seen since ``reset`` (streaming :func:`sslops.metrics.rankme`).

    ``update(z)`` adds a batch (B, K) of embeddings; ``compute()`` returns RankMe of all of
    them (on every rank, of all ranks' rows), as ``sslops.metrics.rankme`` of their
    concatenation would; ``forward(z)`` (calling the metric) updates and returns the
    batch's own value. NaN before the first update. Logged every step as usual::

        rankme = RankMe(num_features=2048)
        ...
        rankme.update(z.detach())                     # every step, no host sync
        print(float(rankme.compute())); rankme.reset()

    or in Lightning ``self.rankme(z); self.log("rankme", self.rankme)``.

    Args:
        num_features: K, the columns of every batch.
        eps: ε ≥ 0 (1e-7 as in the paper; stable-pretraining uses 1e-5).
        center: subtract the column means of all rows seen (global, exact) first.
        **kwargs: torchmetrics ``Metric`` options (``process_group``, ``sync_on_compute``, ...).
    """

    def __init__(self, num_features, *, eps=1e-7, center=False, **kwargs):
        M._check_eps(eps)
        M._check_bool("center", center)
        super().__init__(num_features, **kwargs)
        self.eps = float(eps)
        self.center = center

    @disabled
    def compute(self):
        if self.center:
            self._check_rows(2, "center=True needs two rows at least")
        return self._empty_to_nan(self._rows_rank(self.center))


class EffectiveRank(_GramMetric):
    r"""Effective rank over every row seen since ``reset`` (streaming :func:`sslops.metrics.effective_rank`).

    ``covariance=False``: effective_rank of the (N, K) matrix of all rows seen (the entropy
    of its normalised singular values, ε = 0 by default: RankMe without ε).
    ``covariance=True``: effective_rank of their covariance matrix (``torch.cov`` of the
    rows, centred by the global column means), the σ²-weighted quantity
    (≤ RankMe with ``center=True, eps=0``; see :func:`sslops.metrics.effective_rank`).

    Args:
        num_features: K, the columns of every batch.
        eps: ε ≥ 0.
        covariance: the effective rank of the covariance instead of the rows.
        **kwargs: torchmetrics ``Metric`` options.
    """

    def __init__(self, num_features, *, eps=0.0, covariance=False, **kwargs):
        M._check_eps(eps)
        M._check_bool("covariance", covariance)
        super().__init__(num_features, **kwargs)
        self.eps = float(eps)
        self.covariance = covariance

    @disabled
    def compute(self):
        if not self.covariance:
            return self._empty_to_nan(self._rows_rank(False))
        self._check_rows(2, "a covariance needs two rows at least")
        moments = self._moments()
        lam, finite = M.gram_eigenvalues(moments.gram(True), moments.floor())
        return self._empty_to_nan(M._nan_unless(finite, M.entropy_rank(lam, self.eps)))


class LiDAR(_StreamingMetric):
    r"""LiDAR over every source seen since ``reset`` (streaming :func:`sslops.metrics.lidar`).

    ``update(z, groups)``: z (B, K) views, ``groups`` (B,) the source id of each row. Every
    view of a source must come in the same update (on the same rank): ids are local to one
    update (the same id in two updates means two sources), and a source with a single view
    in an update raises a ``ValueError`` at ``compute``, whose check needs the host (update
    itself never synchronises). ``compute()`` returns LiDAR of all sources seen (all ranks).

    Args:
        num_features: K, the columns of every batch.
        delta: δ > 0 added to the within-source covariance.
        eps: ε ≥ 0 (RankMe's convention; see :func:`sslops.metrics.lidar`).
        **kwargs: torchmetrics ``Metric`` options.
    """

    _SUMS = ("rows", "sources", "singletons", "residual", "mean_total", "mean_within", "mean_between")

    def __init__(self, num_features, *, delta=1e-4, eps=1e-8, **kwargs):
        V.check_positive("delta", delta)
        M._check_eps(eps)
        super().__init__(num_features, **kwargs)
        self.delta = float(delta)
        self.eps = float(eps)
        k = num_features
        for name in ("rows", "sources", "singletons"):
            self._sum_state(name)
        self._sum_state("residual", k, k)
        self._sum_state("mean_total", k)
        self._sum_state("mean_within", k, k)
        self._sum_state("mean_between", k, k)

    @disabled
    def update(self, z, groups):
        """Add the views ``z`` (B, K) of the sources ``groups`` (B,) (no host sync)."""
        z = self._batch(z)
        M.check_groups(groups, z.shape[0], groups.device)
        groups = groups.to(z.device)
        sums = M.lidar_moments(z.detach(), groups)
        for name in self._SUMS:
            setattr(self, name, getattr(self, name) + sums[name])

    @disabled
    def compute(self):
        sums = {name: getattr(self, name) for name in self._SUMS}
        if int(self.rows) == 0:
            return torch.full((), float("nan"), dtype=F64, device=self.rows.device)
        M.check_lidar_moments(sums, "the rows seen since reset")
        return M.lidar_from_moments(sums, self.delta, self.eps)
