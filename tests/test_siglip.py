"""SigLIP (conventions §3b) on every kernel backend against the float64 reference.

The reference itself is checked against open_clip's SigLipLoss formula in tests/test_reference.py.
Here: the loss and the gradients of both sets and of tensor ``logit_scale`` and ``logit_bias``
(grad_output ≠ 1) at sizes that straddle every block, with and without labels,
``normalize=False``, every dtype, non-contiguous inputs; stability in bf16 at the paper's
initial scale and bias and at extreme logits; the op checks (opcheck, gradcheck,
torch.compile, autocast) and the module.
"""

import math

import pytest
import torch

import sslops
from sslops import reference as R
from tests.utils import INTERPRET, acc_dtype, assert_compiled_matches_eager, check_against_reference, grad_floor, kernel_backends, loss_and_grads, noncontiguous, randn

BACKENDS = kernel_backends("siglip")
HAS_CPU = sslops._extension.LOADED
needs_kernels = pytest.mark.skipif(not BACKENDS or INTERPRET, reason="no siglip kernel backend here / interpreter lane")
needs_cpu = pytest.mark.skipif(not HAS_CPU or INTERPRET, reason="the C++ CPU backend is not built / interpreter lane")
SIZES = [(n, k) for n in (1, 2, 3, 97, 1025) for k in (1, 3, 129)]


def check(backend, n, k, dtype, device, *, seed=0, labels=False, normalize=True, scale=10.0, bias=-10.0, grad_tol_scale=1.0,
          wrap=None):
    """Loss and gradients against the reference (K = 1: see tests.utils.K1_GRAD_FLOOR)."""
    a, b = randn(n, k, dtype, device=device, seed=seed), randn(n, k, dtype, device=device, seed=seed + 1)
    if not normalize:
        a = torch.nn.functional.normalize(a.double(), dim=1).to(dtype)
        b = torch.nn.functional.normalize(b.double(), dim=1).to(dtype)
    lab = (torch.arange(n, device=device) % max(1, n // 3)) if labels else None
    t, bb = (torch.tensor(v, device=device, dtype=acc_dtype(dtype)) for v in (scale, bias))
    wrap = wrap or (lambda x: x)

    def kernel(x, y, s, c):
        return sslops.siglip_loss(wrap(x), wrap(y), s, c, labels=lab, normalize=normalize, backend=backend)

    def ref(x, y, s, c):
        return R.siglip_loss(x, y, s, c, labels=None if lab is None else lab.cpu(), normalize=normalize)

    return check_against_reference(kernel, ref, [a, b, t, bb], dtype, grad_tol_scale=grad_tol_scale,
                                   grad_floor=grad_floor(k))


@needs_kernels
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k", SIZES)
def test_every_size_fp32(backend, n, k, device):
    check(backend, n, k, torch.float32, device, seed=n + k)


@needs_kernels
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("labels,normalize,scale,bias", [(False, True, 10.0, -10.0), (True, True, 3.0, 0.5),
                                                         (False, False, 7.0, -2.0)])
def test_labels_normalize_dtypes(backend, dtype, labels, normalize, scale, bias, device):
    low = dtype in (torch.bfloat16, torch.float16)
    check(backend, 300, 17, dtype, device, seed=3, labels=labels, normalize=normalize, scale=scale, bias=bias,
          grad_tol_scale=2.0 if low else 1.0)


@needs_kernels
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous(backend, device):
    check(backend, 65, 33, torch.float32, device, seed=5, labels=True, wrap=noncontiguous)


@needs_kernels
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (1e4, -1e4), (1e4, 1e4), (1e-3, 50.0)])
def test_bf16_stable_for_any_logit(backend, scale, bias, device):
    """bf16 at the paper's initial scale and bias, and at logits of ±1e4: finite, and the reference's number."""
    n, k = 96, 16
    a = randn(n, k, torch.bfloat16, seed=9, device=device)
    b = (a.float() + 0.05 * randn(n, k, seed=10, device=device)).to(torch.bfloat16)
    loss, grads = loss_and_grads(lambda x, y: sslops.siglip_loss(x, y, scale, bias, backend=backend), [a, b])
    assert torch.isfinite(loss) and all(torch.isfinite(g.float()).all() for g in grads)
    ref = R.siglip_loss(a.double().cpu(), b.double().cpu(), scale, bias)
    torch.testing.assert_close(loss.double().cpu(), ref, atol=5e-2, rtol=3e-2)


@needs_kernels
@pytest.mark.parametrize("backend", BACKENDS)
def test_reruns_bit_identical_and_nan(backend, device):
    a, b = randn(300, 40, seed=4, device=device), randn(300, 40, seed=5, device=device)
    t, c = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)

    def fn(x, y, s, d):
        return sslops.siglip_loss(x, y, s, d, backend=backend)

    first = loss_and_grads(fn, [a, b, t, c])
    again = loss_and_grads(fn, [a, b, t, c])
    assert torch.equal(first[0], again[0]) and all(torch.equal(x, y) for x, y in zip(first[1], again[1]))
    a[3, 1] = float("nan")
    assert torch.isnan(fn(a, b, t, c))
    assert torch.isnan(fn(b, b, torch.tensor(0.0, device=device), c))


@needs_cpu
def test_opcheck_sigmoid_op():
    from sslops.ops import infonce as ops

    a, b = randn(13, 6, torch.float64, seed=1), randn(11, 6, torch.float64, seed=2)
    la, lb = torch.arange(13) % 4, torch.arange(11) % 4
    for requires_grad in (False, True):
        args = (a.clone().requires_grad_(requires_grad), b.clone().requires_grad_(requires_grad), None, la, lb, None, None,
                torch.tensor(3.0, dtype=torch.float64, requires_grad=requires_grad),
                torch.tensor(-1.0, dtype=torch.float64, requires_grad=requires_grad), 2, 11, 0, 0, ops.SIGMOID, 0.5, "cpu")
        torch.library.opcheck(torch.ops.sslops.contrastive_fwd.default, args)
    dx, ax, dy, ay = (t.detach() for t in torch.ops.sslops.contrastive_fwd(*args))
    torch.library.opcheck(torch.ops.sslops.contrastive_bwd.default,
                          (torch.randn(dx.shape, dtype=torch.float64), torch.zeros(dy.shape, dtype=torch.float64), a, b, None,
                           la, lb, None, None, dx, dy, ax, ay, args[7].detach(), args[8].detach(), 2, 11, 0, 0, ops.SIGMOID, 0.5,
                           True, True, False, "cpu"))


@needs_cpu
def test_gradcheck_float64_cpu():
    a = randn(9, 4, torch.float64, seed=3).requires_grad_()
    b = randn(9, 4, torch.float64, seed=4).requires_grad_()
    t = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 2, 3, 1, 4, 0])
    for lab, normalize in ((None, True), (labels, True), (labels, False)):
        assert torch.autograd.gradcheck(
            lambda x, y, s, d: sslops.siglip_loss(x, y, s, d, labels=lab, normalize=normalize, backend="cpu"), (a, b, t, c))


@needs_cpu
def test_torch_compile_fullgraph_cpu():
    kernel = sslops._backend.kernel_impl("siglip", "cpu")
    labels = torch.arange(21) % 7

    def f(a, b, log_t, bias):
        return kernel(a, b, logit_scale=log_t.exp(), logit_bias=bias, labels=labels) + kernel(
            b, a, logit_scale=log_t.exp(), logit_bias=bias)

    args = [randn(21, 8, seed=1), randn(21, 8, seed=2), torch.tensor(math.log(10.0)), torch.tensor(-10.0)]
    assert_compiled_matches_eager(f, args)


@needs_cpu
def test_autocast_bf16_and_module():
    lin = torch.nn.Linear(8, 12)
    criterion = sslops.nn.SigLIPLoss(backend="cpu")
    x, y = randn(16, 8, seed=1), randn(16, 8, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = lin(x), lin(y)
        loss = criterion(a, b)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(lin.weight.grad).all()
    assert criterion.log_logit_scale.grad is not None and criterion.logit_bias.grad is not None
    ref = R.siglip_loss(a.double(), b.double(), 10.0, -10.0)
    torch.testing.assert_close(loss.detach().double(), ref.detach(), atol=5e-2, rtol=3e-2)


def test_module_parameters():
    criterion = sslops.nn.SigLIPLoss()
    assert math.isclose(float(criterion.logit_scale), 10.0, rel_tol=1e-6) and float(criterion.logit_bias) == -10.0
    assert {n for n, _ in criterion.named_parameters()} == {"log_logit_scale", "logit_bias"}
    frozen = sslops.nn.SigLIPLoss(learnable=False, init_logit_scale=5.0, init_logit_bias=1.0)
    assert not list(frozen.parameters())
    a, b = randn(6, 4, seed=1), randn(6, 4, seed=2)
    torch.testing.assert_close(frozen(a, b), R.siglip_loss(a, b, 5.0, 1.0))


def test_input_policy():
    a, b = randn(6, 4), randn(6, 4)
    with pytest.raises(ValueError, match="same shape"):
        sslops.siglip_loss(a, randn(6, 5), 10.0, -10.0)
    with pytest.raises(ValueError, match="logit_scale must be a finite number > 0"):
        sslops.siglip_loss(a, b, -1.0, -10.0)
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        sslops.siglip_loss(a, b, 10.0, math.inf)
    with pytest.raises(ValueError, match="logit_bias must be a float or a 0-d tensor"):
        sslops.siglip_loss(a, b, 10.0, torch.zeros(3))
    with pytest.raises(ValueError, match="logit_scale must be on the same device"):
        sslops.siglip_loss(a, b, torch.tensor(10.0, device="meta"), -10.0)
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\)"):
        sslops.siglip_loss(a, b, 10.0, -10.0, labels=torch.arange(7))


# ----------------------------------------------------------------------------- Triton (interpreter lane)

TRITON_SIZES = [(1, 3), (2, 1), (3, 5), (33, 3), (40, 37)]


@pytest.mark.triton
@pytest.mark.parametrize("n,k", TRITON_SIZES)
@pytest.mark.parametrize("labels", [False, True])
def test_triton_matches_reference(n, k, labels, device):
    check("triton", n, k, torch.float32, device, seed=n * 3 + k, labels=labels, scale=4.0, bias=-1.0)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_triton_dtypes_and_raw_inputs(dtype, device):
    check("triton", 37, 19, dtype, device, seed=5, labels=True, grad_tol_scale=2.0)
    check("triton", 21, 9, dtype, device, seed=6, normalize=False, grad_tol_scale=2.0, wrap=noncontiguous)


# ----------------------------------------------------------------------------- GPU lane


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_large(backend, dtype, device):
    check(backend, 8193, 128, dtype, device, seed=21, labels=True, grad_tol_scale=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_target_shape_runs_in_memory(backend, device):
    """N = 65536, K = 512, bf16 (the issue's GPU target): runs, finite, at most 1 GB above the inputs."""
    n, k = 65536, 512
    a = randn(n, k, torch.bfloat16, device="cuda", seed=23).requires_grad_()
    b = randn(n, k, torch.bfloat16, device="cuda", seed=24).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = sslops.siglip_loss(a, b, 10.0, -10.0, backend=backend)
    loss.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and torch.isfinite(a.grad.float()).all()
    assert torch.cuda.max_memory_allocated() - base < 1e9 + 2 * a.numel() * 2
