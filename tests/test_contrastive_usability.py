"""What a user meets first with the contrastive family: the MoCo loop of NegativeQueue's
docstring runs from its first step, a queue beside autocast features, and the modules'
argument checks (found by a fresh-user trial)."""

import pytest
import torch

import sslops
from sslops import reference as R
from tests.utils import randn


def test_random_queue_runs_the_moco_form_from_the_first_step():
    torch.manual_seed(0)
    queue = sslops.nn.NegativeQueue(10, 16, init="random")
    assert queue.negatives.shape == (10, 16)
    torch.testing.assert_close(queue.negatives.norm(dim=1), torch.ones(10))
    q, k = randn(4, 16, seed=1).requires_grad_(), randn(4, 16, seed=2)
    loss = sslops.nt_xent_loss(q, k, negatives=queue.negatives, in_batch_negatives=False)
    expected = R.nt_xent_loss(q.double(), k.double(), negatives=queue.negatives.double(), in_batch_negatives=False)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    queue.enqueue(k)
    assert queue.negatives.shape == (10, 16)
    torch.testing.assert_close(queue.queue[:4], k)  # the oldest (random) rows replaced first
    assert "size=10, dim=16" in repr(queue) and "filled=10" in repr(queue)
    state = queue.state_dict()
    again = sslops.nn.NegativeQueue(10, 16)
    again.load_state_dict(state)
    assert torch.equal(again.negatives, queue.negatives)


def test_empty_queue_is_the_default_and_the_moco_form_says_what_it_needs():
    queue = sslops.nn.NegativeQueue(10, 16)
    assert queue.negatives.shape == (0, 16)
    with pytest.raises(ValueError, match="in_batch_negatives=False needs negatives"):
        sslops.nt_xent_loss(randn(4, 16), randn(4, 16), negatives=queue.negatives, in_batch_negatives=False)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(dtype=torch.int64), TypeError, "dtype must be a floating"),
    (dict(init="zeros"), ValueError, "init must be 'empty' or 'random'"),
])
def test_queue_argument_checks(kwargs, error, match):
    with pytest.raises(error, match=match):
        sslops.nn.NegativeQueue(4, 8, **kwargs)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not sslops._extension.LOADED, reason="sslops._C not built"))])
def test_queue_of_another_dtype_under_autocast_is_cast_to_the_features(backend):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 8)
    x, y = randn(6, 8, seed=3), randn(6, 8, seed=4)
    queue = sslops.nn.NegativeQueue(20, 8, init="random")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zq, zk = head(x), head(y)
        assert zq.dtype == torch.bfloat16 and queue.negatives.dtype == torch.float32
        loss = sslops.nt_xent_loss(zq, zk, negatives=queue.negatives, in_batch_negatives=False, backend=backend)
    loss.backward()
    expected = sslops.nt_xent_loss(zq.detach(), zk.detach(), negatives=queue.negatives.to(torch.bfloat16),
                                   in_batch_negatives=False, backend=backend)
    torch.testing.assert_close(loss.detach(), expected)
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    with pytest.raises(TypeError, match="negatives must have the dtype of z_a"):  # outside autocast: an error
        sslops.nt_xent_loss(zq.detach(), zk.detach(), negatives=queue.negatives, in_batch_negatives=False)


def test_clip_module_start_scale_above_its_clamp_is_an_error():
    with pytest.raises(ValueError, match="init_logit_scale .* must be <= max_logit_scale"):
        sslops.nn.CLIPLoss(init_logit_scale=50, max_logit_scale=10)
    sslops.nn.CLIPLoss(init_logit_scale=50, max_logit_scale=10, learnable=False)  # a fixed scale may be clamped


def test_one_row_message_is_singular():
    with pytest.raises(ValueError, match=r"z_a needs at least 1 row, got N = 0"):
        sslops.clip_loss(torch.zeros(0, 3), torch.zeros(0, 3), 5.0)
