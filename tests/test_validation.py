"""Input policy (conventions §6): every bad input raises ValueError/TypeError naming the argument."""

import math

import pytest
import torch

import sslops

Z = torch.randn(6, 4)
Z2 = torch.randn(6, 4)
LABELS = torch.arange(3).repeat(2)


def two_view_losses():
    return [
        ("vicreg_loss", lambda a, b, **kw: sslops.vicreg_loss(a, b, **kw)),
        ("barlow_twins_loss", lambda a, b, **kw: sslops.barlow_twins_loss(a, b, **kw)),
        ("nt_xent_loss", lambda a, b, **kw: sslops.nt_xent_loss(a, b, **kw)),
        ("matrix_ssl_loss", lambda a, b, **kw: sslops.matrix_ssl_loss(a, b, **kw)),
    ]


@pytest.mark.parametrize("name,fn", two_view_losses())
class TestTwoViewInputs:
    def test_mismatched_shapes(self, name, fn):
        with pytest.raises(ValueError, match="same shape"):
            fn(Z, torch.randn(6, 5))

    def test_mismatched_rows(self, name, fn):
        with pytest.raises(ValueError, match="same shape"):
            fn(Z, torch.randn(5, 4))

    def test_wrong_rank(self, name, fn):
        with pytest.raises(ValueError, match=r"\(N, K\)"):
            fn(torch.randn(6, 4, 1), torch.randn(6, 4, 1))
        with pytest.raises(ValueError, match=r"\(N, K\)"):
            fn(torch.randn(6), torch.randn(6))

    def test_integer_dtype(self, name, fn):
        with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
            fn(torch.ones(6, 4, dtype=torch.int64), torch.ones(6, 4, dtype=torch.int64))

    def test_mixed_dtypes(self, name, fn):
        with pytest.raises(TypeError, match="same dtype"):
            fn(Z, Z2.double())

    def test_not_a_tensor(self, name, fn):
        with pytest.raises(TypeError, match="torch.Tensor"):
            fn(Z.tolist(), Z2)

    def test_unknown_backend(self, name, fn):
        with pytest.raises(ValueError, match="backend must be one of"):
            fn(Z, Z2, backend="tpu")

    def test_zero_features(self, name, fn):
        with pytest.raises(ValueError, match="feature"):
            fn(torch.randn(6, 0), torch.randn(6, 0))


@pytest.mark.parametrize("fn,first", [(sslops.vicreg_loss, "z_a"), (sslops.barlow_twins_loss, "z_a"),
                                      (sslops.matrix_ssl_loss, "p")], ids=["vicreg", "barlow", "matrix_ssl"])
def test_variance_needs_two_rows(fn, first):
    # one row has a zero centred covariance: an error, not a silent 0.0 (Matrix-SSL returned 0.0)
    with pytest.raises(ValueError, match=rf"{first} needs at least 2 rows.*N = 1"):
        fn(torch.randn(1, 4), torch.randn(1, 4))


def test_relation_variance_needs_two_rows():
    with pytest.raises(ValueError, match=r"z needs at least 2 rows"):
        sslops.vicreg_relation_loss(torch.randn(1, 4), labels=torch.zeros(1, dtype=torch.long))


RELATION_LOSSES = [
    ("info_nce_loss", sslops.info_nce_loss),
    ("vicreg_relation_loss", sslops.vicreg_relation_loss),
]


@pytest.mark.parametrize("name,fn", RELATION_LOSSES)
class TestRelationInputs:
    def test_labels_wrong_length(self, name, fn):
        with pytest.raises(ValueError, match=r"labels must have shape \(6,\)"):
            fn(Z, labels=torch.arange(5))

    def test_labels_wrong_rank(self, name, fn):
        with pytest.raises(ValueError, match="labels must have shape"):
            fn(Z, labels=LABELS.view(2, 3))

    def test_labels_float(self, name, fn):
        with pytest.raises(TypeError, match="labels must have an integer dtype"):
            fn(Z, labels=LABELS.float())

    def test_both_or_neither(self, name, fn):
        with pytest.raises(ValueError, match="exactly one of labels"):
            fn(Z)
        with pytest.raises(ValueError, match="exactly one of labels"):
            fn(Z, labels=LABELS, pairs=torch.tensor([[0], [1]]))

    def test_pairs_negative(self, name, fn):
        with pytest.raises(ValueError, match="pairs must hold indices in \\[0, 6\\).*negative"):
            fn(Z, pairs=torch.tensor([[0, -1], [1, 2]]))

    def test_pairs_out_of_range(self, name, fn):
        with pytest.raises(ValueError, match="pairs must hold indices in \\[0, 6\\)"):
            fn(Z, pairs=torch.tensor([[0, 6], [1, 2]]))

    def test_pairs_wrong_shape(self, name, fn):
        with pytest.raises(ValueError, match=r"pairs must have shape \(2, P\)"):
            fn(Z, pairs=torch.tensor([[0, 1, 2]]))

    def test_pairs_float(self, name, fn):
        with pytest.raises(TypeError, match="pairs must have dtype int64"):
            fn(Z, pairs=torch.tensor([[0.0], [1.0]]))

    def test_integer_z(self, name, fn):
        with pytest.raises(TypeError, match="z must be"):
            fn(torch.ones(6, 4, dtype=torch.int32), labels=LABELS)


@pytest.mark.parametrize("temperature", [0.0, -0.1, math.inf, math.nan])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        sslops.info_nce_loss(Z, labels=LABELS, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        sslops.nt_xent_loss(Z, Z2, temperature=temperature)


def test_temperature_type():
    with pytest.raises(TypeError, match="temperature must be a real number"):
        sslops.info_nce_loss(Z, labels=LABELS, temperature="0.1")


@pytest.mark.parametrize("eps", [0.0, -1e-4, math.nan])
def test_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        sslops.vicreg_loss(Z, Z2, eps=eps)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        sslops.barlow_twins_loss(Z, Z2, eps=eps)


def test_coefficients_must_be_finite():
    with pytest.raises(ValueError, match="sim_coeff must be finite"):
        sslops.vicreg_loss(Z, Z2, sim_coeff=math.inf)
    with pytest.raises(ValueError, match="lambd must be finite"):
        sslops.barlow_twins_loss(Z, Z2, lambd=math.nan)
    with pytest.raises(TypeError, match="gamma must be a real number"):
        sslops.vicreg_relation_loss(Z, labels=LABELS, gamma=None)


@pytest.mark.parametrize("order", [0, -2])
def test_order_at_least_one(order):
    q = torch.eye(3) * 1.1
    with pytest.raises(ValueError, match="order must be >= 1"):
        sslops.matrix_log(q, order=order)
    with pytest.raises(ValueError, match="order must be >= 1"):
        sslops.matrix_cross_entropy(q, q, order=order)
    with pytest.raises(ValueError, match="order must be >= 1"):
        sslops.matrix_ssl_loss(Z, Z2, order=order)


def test_order_type():
    with pytest.raises(TypeError, match="order must be an int"):
        sslops.matrix_log(torch.eye(3), order=2.5)


def test_matrix_inputs():
    with pytest.raises(ValueError, match=r"q must be a square \(K, K\) matrix"):
        sslops.matrix_log(torch.randn(3, 4))
    with pytest.raises(ValueError, match="method must be one of"):
        sslops.matrix_log(torch.eye(3), method="pade")
    with pytest.raises(TypeError, match="p and q must have the same dtype"):
        sslops.matrix_cross_entropy(torch.eye(3), torch.eye(3).double())
    with pytest.raises(ValueError, match="p and q must have the same shape"):
        sslops.matrix_cross_entropy(torch.eye(3), torch.eye(4))


def test_unknown_backend_from_environment(monkeypatch):
    monkeypatch.setenv("SSLOPS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="SSLOPS_BACKEND must be one of"):
        sslops.vicreg_loss(Z, Z2)


def test_unavailable_backend_says_why():
    # CPU tensors: the cuda backend can never run them, on any machine
    with pytest.raises(sslops.BackendUnavailableError, match="cuda backend needs CUDA tensors|no cuda kernel|cannot run"):
        sslops.vicreg_loss(Z, Z2, backend="cuda")


def test_non_finite_input_gives_nan_by_default_and_error_in_debug():
    bad = Z.clone()
    bad[2, 1] = float("nan")
    assert torch.isnan(sslops.vicreg_loss(bad, Z2, backend="reference"))
    sslops.set_debug(True)
    try:
        with pytest.raises(ValueError, match="z_a holds NaN or Inf"):
            sslops.vicreg_loss(bad, Z2)
        with pytest.raises(ValueError, match="z holds NaN or Inf"):
            sslops.info_nce_loss(bad, labels=LABELS)
    finally:
        sslops.set_debug(False)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_wholly_non_finite_batch_gives_nan_on_every_loss(value, backend):
    """A diverged step (every entry NaN or Inf) must not read as a perfect loss: an earlier CPU
    InfoNCE kernel lost an all-NaN row's max and returned 0.0 for the batch."""
    if not sslops.backends()[backend]["available"]:
        pytest.skip(f"{backend} backend not built here")
    bad, bad2 = torch.full((6, 4), value), torch.full((6, 4), value)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    losses = {
        "vicreg": lambda: sslops.vicreg_loss(bad, bad2, backend=backend),
        "vicreg_relation": lambda: sslops.vicreg_relation_loss(bad, labels=LABELS, backend=backend),
        "barlow_twins": lambda: sslops.barlow_twins_loss(bad, bad2, backend=backend),
        "info_nce": lambda: sslops.info_nce_loss(bad, labels=LABELS, backend=backend),
        "info_nce_pairs": lambda: sslops.info_nce_loss(bad, pairs=torch.tensor([[0, 1], [3, 4]]), backend=backend),
        "nt_xent": lambda: sslops.nt_xent_loss(bad, bad2, backend=backend),
        "nt_xent_queue": lambda: sslops.nt_xent_loss(bad, bad2, negatives=torch.randn(5, 4), backend=backend),
        "clip": lambda: sslops.clip_loss(bad, bad2, scale, backend=backend),
        "siglip": lambda: sslops.siglip_loss(bad, bad2, scale, bias, backend=backend),
    }
    for name, loss in losses.items():
        assert torch.isnan(loss()), name


# ----------------------------------------------------------------------------- the contrastive family (conventions §3b)


@pytest.mark.parametrize("name,fn", [("info_nce_loss", lambda z, **kw: sslops.info_nce_loss(z, labels=LABELS, **kw)),
                                     ("nt_xent_loss", lambda z, **kw: sslops.nt_xent_loss(z, Z2, **kw))])
class TestQueueAndDecoupledInputs:
    def test_negatives_of_another_k(self, name, fn):
        with pytest.raises(ValueError, match=r"negatives must have the 4 features"):
            fn(Z, negatives=torch.randn(3, 5))

    def test_negatives_of_another_dtype(self, name, fn):
        with pytest.raises(TypeError, match="negatives must have the dtype"):
            fn(Z, negatives=torch.randn(3, 4, dtype=torch.float64))

    def test_negatives_on_another_device(self, name, fn):
        with pytest.raises(ValueError, match="negatives must be on the device"):
            fn(Z, negatives=torch.randn(3, 4, device="meta"))

    def test_negatives_wrong_rank_or_type(self, name, fn):
        with pytest.raises(ValueError, match=r"negatives must have shape \(M, K\)"):
            fn(Z, negatives=torch.randn(12))
        with pytest.raises(TypeError, match="negatives must be a torch.Tensor"):
            fn(Z, negatives=[[0.0] * 4])

    def test_no_in_batch_negatives_needs_negatives(self, name, fn):
        with pytest.raises(ValueError, match="in_batch_negatives=False needs negatives"):
            fn(Z, in_batch_negatives=False)
        with pytest.raises(ValueError, match="in_batch_negatives=False needs negatives"):
            fn(Z, in_batch_negatives=False, negatives=torch.randn(0, 4))
        with pytest.raises(TypeError, match="in_batch_negatives must be True or False"):
            fn(Z, in_batch_negatives=1, negatives=torch.randn(3, 4))

    def test_decoupled_choices(self, name, fn):
        for bad in ("yes", 1, None):
            with pytest.raises(ValueError, match="decoupled must be False, True or 'weighted'"):
                fn(Z, decoupled=bad)

    def test_tensor_temperature_shape_and_device(self, name, fn):
        with pytest.raises(ValueError, match="temperature must be a float or a 0-d tensor"):
            fn(Z, temperature=torch.ones(2))
        with pytest.raises(TypeError, match="temperature must be a float or a 0-d floating tensor"):
            fn(Z, temperature=torch.tensor(1))
        with pytest.raises(ValueError, match="temperature must be on the same device"):
            fn(Z, temperature=torch.tensor(0.5, device="meta"))

    def test_tensor_temperature_checked_in_debug_mode(self, name, fn):
        assert torch.isnan(fn(Z, temperature=torch.tensor(-0.5)))  # no host sync: a NaN loss
        sslops.set_debug(True)
        try:
            with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
                fn(Z, temperature=torch.tensor(-0.5))
        finally:
            sslops.set_debug(False)


def test_negative_queue_module_policy():
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        sslops.nn.NegativeQueue(0, 4)
    with pytest.raises(ValueError, match="dim must be an int >= 1"):
        sslops.nn.NegativeQueue(8, 0)
    queue = sslops.nn.NegativeQueue(5, 4)
    with pytest.raises(ValueError, match=r"keys must be a \(B, 4\) tensor"):
        queue.enqueue(torch.randn(3, 5))
    assert queue.negatives.shape == (0, 4)
    keys = torch.randn(7, 4)
    queue.enqueue(keys[:3])
    assert torch.equal(queue.negatives, keys[:3])
    queue.enqueue(keys[3:])  # 4 more: the oldest two are replaced, the queue is full
    assert queue.negatives.shape == (5, 4)
    assert sorted(map(tuple, queue.negatives.tolist())) == sorted(map(tuple, keys[2:].tolist()))
    restored = sslops.nn.NegativeQueue(5, 4)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.negatives, queue.negatives)
    restored.enqueue(keys[:1])
    assert restored.negatives.shape == (5, 4) and int(restored.position) == (7 + 1) % 5
