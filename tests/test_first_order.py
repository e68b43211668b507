"""Every loss's fused kernels are first-order: double backward and torch.func raise a clear error.

Before, ``create_graph=True`` failed inside PyTorch ("Trying to backward through
sslops.<op>_backward but no autograd formula was registered") and ``torch.func.grad`` with a
message about ``setup_context``. Now both raise ``RuntimeError`` naming the loss, saying
sslops losses are first-order and pointing at ``backend="reference"``, which is plain
PyTorch and differentiable to any order (checked here too). Single first-order gradients,
opcheck and torch.compile keep working (their own tests).
"""

import pytest
import torch

import sslops

from .utils import kernel_backends, randn

N, K = 12, 5
LABELS = torch.arange(N // 2).repeat(2)
PAIRS = torch.tensor([[0, 2, 4], [1, 3, 5]])


def _losses():
    """(name, loss(z_a, z_b, backend) -> scalar): every public loss, inputs (N, K) or (K, K)."""
    return [
        ("vicreg_loss", "vicreg", lambda a, b, backend: sslops.vicreg_loss(a, b, backend=backend)),
        ("barlow_twins_loss", "barlow_twins", lambda a, b, backend: sslops.barlow_twins_loss(a, b, backend=backend)),
        ("vicreg_relation_loss", "vicreg_relation",
         lambda a, b, backend: sslops.vicreg_relation_loss(a + b, labels=LABELS, backend=backend)),
        ("vicreg_relation_loss", "vicreg_relation",
         lambda a, b, backend: sslops.vicreg_relation_loss(a + b, pairs=PAIRS, backend=backend)),
        ("info_nce_loss", "info_nce", lambda a, b, backend: sslops.info_nce_loss(a + b, labels=LABELS, backend=backend)),
        ("nt_xent_loss", "nt_xent", lambda a, b, backend: sslops.nt_xent_loss(a, b, backend=backend)),
        ("clip_loss", "clip", lambda a, b, backend: sslops.clip_loss(a, b, 2.0, backend=backend)),
        ("siglip_loss", "siglip", lambda a, b, backend: sslops.siglip_loss(a, b, 2.0, -1.0, backend=backend)),
        ("matrix_ssl_loss", "matrix_ssl", lambda a, b, backend: sslops.matrix_ssl_loss(a, b, backend=backend)),
        ("matrix_cross_entropy", "matrix_cross_entropy",
         lambda a, b, backend: sslops.matrix_cross_entropy(a[:K] / 10, torch.eye(K, dtype=b.dtype) + (a[:K] + b[:K]) / 20,
                                                            backend=backend)),
    ]


def _cases():
    out = []
    for i, (name, registry, fn) in enumerate(_losses()):
        for backend in kernel_backends(registry, "cpu"):
            out.append(pytest.param(name, fn, backend, id=f"{i}-{name}-{backend}"))
    return out


def _inputs():
    return randn(N, K, seed=1).requires_grad_(), randn(N, K, seed=2).requires_grad_()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("name,fn,backend", _cases())
def test_double_backward_raises_clearly(name, fn, backend):
    a, b = _inputs()
    loss = fn(a, b, backend)
    (ga, gb) = torch.autograd.grad(loss, (a, b))  # first order: fine
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
    loss = fn(a, b, backend)
    with pytest.raises(RuntimeError, match=rf"{name}\S*: sslops losses are first-order.*backend='reference'"):
        torch.autograd.grad(loss, (a, b), create_graph=True)
    loss = fn(a, b, backend)
    with pytest.raises(RuntimeError, match="first-order"):
        loss.backward(create_graph=True)


@pytest.mark.parametrize("name,fn,backend", _cases())
def test_torch_func_grad_raises_clearly(name, fn, backend):
    a, b = _inputs()
    with pytest.raises(RuntimeError, match=rf"{name}\S*: sslops losses are first-order"):
        torch.func.grad(lambda x: fn(x, b.detach(), backend))(a.detach())


@pytest.mark.parametrize("name,registry,fn", _losses(), ids=lambda v: v if isinstance(v, str) else "")
def test_reference_backend_has_second_derivatives(name, registry, fn):
    """The way out the message names: a Hessian-vector product against differences of gradients."""
    b = randn(N, K, torch.float64, seed=4)
    v = randn(N, K, torch.float64, seed=5)

    def grad_at(x, create_graph=False):
        x = x.detach().requires_grad_()
        (g,) = torch.autograd.grad(fn(x, b, "reference"), (x,), create_graph=create_graph)
        return x, g

    a, g = grad_at(randn(N, K, torch.float64, seed=3), create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), (a,))
    eps = 1e-6
    finite = (grad_at(a + eps * v)[1] - grad_at(a - eps * v)[1]) / (2 * eps)
    torch.testing.assert_close(hv, finite, rtol=1e-5, atol=1e-7)
