"""CLIP (conventions §3b) on every kernel backend against the float64 reference.

The reference itself is checked against open_clip's ClipLoss formula in tests/test_reference.py.
Here: the loss and the gradients of both sets and of a tensor ``logit_scale`` (grad_output ≠ 1)
at sizes that straddle every block, with and without labels, ``normalize=False``, every dtype,
non-contiguous inputs, the op checks (opcheck, gradcheck, torch.compile, autocast), the module.
"""

import math

import pytest
import torch

import sslops
from sslops import reference as R
from tests.utils import INTERPRET, acc_dtype, assert_compiled_matches_eager, check_against_reference, grad_floor, kernel_backends, loss_and_grads, noncontiguous, randn

BACKENDS = kernel_backends("clip")
HAS_CPU = sslops._extension.LOADED
needs_kernels = pytest.mark.skipif(not BACKENDS or INTERPRET, reason="no clip kernel backend here / interpreter lane")
needs_cpu = pytest.mark.skipif(not HAS_CPU or INTERPRET, reason="the C++ CPU backend is not built / interpreter lane")
SIZES = [(n, k) for n in (1, 2, 3, 97, 1025) for k in (1, 3, 129)]


def case(n, k, dtype, device, *, seed=0, labels=False, scale_tensor=True):
    a, b = randn(n, k, dtype, device=device, seed=seed), randn(n, k, dtype, device=device, seed=seed + 1)
    lab = (torch.arange(n, device=device) % max(1, n // 3)) if labels else None
    scale = torch.tensor(1 / 0.07, device=device, dtype=acc_dtype(dtype)) if scale_tensor else 1 / 0.07
    return a, b, lab, scale


def check(backend, n, k, dtype, device, *, seed=0, labels=False, normalize=True, grad_tol_scale=1.0, wrap=None):
    a, b, lab, scale = case(n, k, dtype, device, seed=seed, labels=labels)
    if not normalize:  # open_clip's convention: features normalised upstream, used as given
        a = torch.nn.functional.normalize(a.double(), dim=1).to(dtype)
        b = torch.nn.functional.normalize(b.double(), dim=1).to(dtype)
    wrap = wrap or (lambda t: t)

    def kernel(x, y, t):
        return sslops.clip_loss(wrap(x), wrap(y), t, labels=lab, normalize=normalize, backend=backend)

    def ref(x, y, t):
        return R.clip_loss(x, y, t, labels=None if lab is None else lab.cpu(), normalize=normalize)

    return check_against_reference(kernel, ref, [a, b, scale], dtype, grad_tol_scale=grad_tol_scale, grad_floor=grad_floor(k))


@needs_kernels
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k", SIZES)
def test_every_size_fp32(backend, n, k, device):
    check(backend, n, k, torch.float32, device, seed=n + k)


@needs_kernels
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("labels,normalize", [(False, True), (True, True), (False, False)])
def test_labels_normalize_dtypes(backend, dtype, labels, normalize, device):
    low = dtype in (torch.bfloat16, torch.float16)
    check(backend, 300, 17, dtype, device, seed=3, labels=labels, normalize=normalize, grad_tol_scale=2.0 if low else 1.0)


@needs_kernels
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous(backend, device):
    check(backend, 65, 33, torch.float32, device, seed=5, labels=True, wrap=noncontiguous)


@needs_kernels
@pytest.mark.parametrize("backend", BACKENDS)
def test_reruns_bit_identical_and_nan(backend, device):
    a, b, lab, scale = case(300, 40, torch.float32, device, seed=4, labels=True)
    first = loss_and_grads(lambda x, y, t: sslops.clip_loss(x, y, t, labels=lab, backend=backend), [a, b, scale])
    again = loss_and_grads(lambda x, y, t: sslops.clip_loss(x, y, t, labels=lab, backend=backend), [a, b, scale])
    assert torch.equal(first[0], again[0]) and all(torch.equal(x, y) for x, y in zip(first[1], again[1]))
    a[3, 1] = float("nan")
    assert torch.isnan(sslops.clip_loss(a, b, scale, backend=backend))
    assert torch.isnan(sslops.clip_loss(b, b, torch.tensor(-1.0, device=device), backend=backend))


@needs_kernels
@pytest.mark.parametrize("backend", BACKENDS)
def test_high_scale_bf16_is_finite(backend, device):
    """t = 100 (open_clip's clamp) with near-duplicate pairs: logits up to 100 stay finite in bf16."""
    n, k = 128, 32
    a = randn(n, k, torch.bfloat16, seed=9, device=device)
    b = (a.float() + 0.01 * randn(n, k, seed=10, device=device)).to(torch.bfloat16)
    loss, grads = loss_and_grads(lambda x, y: sslops.clip_loss(x, y, 100.0, backend=backend), [a, b])
    assert torch.isfinite(loss) and all(torch.isfinite(g.float()).all() for g in grads)
    torch.testing.assert_close(loss.double().cpu(), R.clip_loss(a.double().cpu(), b.double().cpu(), 100.0),
                               atol=5e-2, rtol=3e-2)


@needs_cpu
def test_opcheck_two_set_op():
    a, b = randn(13, 6, torch.float64, seed=1), randn(13, 6, torch.float64, seed=2)
    labels = torch.arange(13) % 5
    from sslops.ops import infonce as ops

    for requires_grad in (False, True):
        args = (a.clone().requires_grad_(requires_grad), b.clone().requires_grad_(requires_grad), None, labels, labels,
                None, None, torch.tensor(3.0, dtype=torch.float64, requires_grad=requires_grad),
                torch.zeros((), dtype=torch.float64), 2, 11, 1, 9, ops.BIDIR, 0.5, "cpu")
        torch.library.opcheck(torch.ops.sslops.contrastive_fwd.default, args)
    dx, ax, dy, ay = (t.detach() for t in torch.ops.sslops.contrastive_fwd(*args))
    torch.library.opcheck(torch.ops.sslops.contrastive_bwd.default,
                          (torch.randn(dx.shape, dtype=torch.float64), torch.randn(dy.shape, dtype=torch.float64), a, b,
                           None, labels, labels, None, None, dx, dy, ax, ay, args[7].detach(), args[8], 2, 11, 1, 9, ops.BIDIR, 0.5,
                           True, True, False, "cpu"))


@needs_cpu
def test_gradcheck_float64_cpu():
    a = randn(9, 4, torch.float64, seed=3).requires_grad_()
    b = randn(9, 4, torch.float64, seed=4).requires_grad_()
    t = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 2, 3, 1, 4, 0])
    for lab, normalize in ((None, True), (labels, True), (labels, False)):
        assert torch.autograd.gradcheck(
            lambda x, y, s: sslops.clip_loss(x, y, s, labels=lab, normalize=normalize, backend="cpu"), (a, b, t))


@needs_cpu
def test_torch_compile_fullgraph_cpu():
    kernel = sslops._backend.kernel_impl("clip", "cpu")
    labels = torch.arange(21) % 7

    def f(a, b, log_t):
        return kernel(a, b, logit_scale=log_t.exp(), labels=labels) + kernel(b, a, logit_scale=log_t.exp())

    args = [randn(21, 8, seed=1), randn(21, 8, seed=2), torch.tensor(math.log(10.0))]
    assert_compiled_matches_eager(f, args)


@needs_cpu
def test_autocast_bf16_and_module():
    lin = torch.nn.Linear(8, 12)
    criterion = sslops.nn.CLIPLoss(backend="cpu")
    x, y = randn(16, 8, seed=1), randn(16, 8, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = lin(x), lin(y)
        loss = criterion(a, b)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(lin.weight.grad).all() and criterion.log_logit_scale.grad is not None
    ref = R.clip_loss(a.double(), b.double(), 1 / 0.07)
    torch.testing.assert_close(loss.detach().double(), ref.detach(), atol=5e-2, rtol=3e-2)


def test_module_clamps_scale_and_holds_log():
    criterion = sslops.nn.CLIPLoss(init_logit_scale=50.0, backend="reference")
    assert math.isclose(float(criterion.log_logit_scale), math.log(50.0), rel_tol=1e-6)
    with torch.no_grad():  # training pushed the log-scale past the clamp (a start there raises)
        criterion.log_logit_scale.fill_(math.log(200.0))
    assert float(criterion.logit_scale) == 100.0
    a, b = randn(6, 4, seed=1), randn(6, 4, seed=2)
    loss = criterion(a, b)
    torch.testing.assert_close(loss, R.clip_loss(a, b, 100.0))
    loss.backward()
    assert criterion.log_logit_scale.grad == 0  # the clamp is active
    frozen = sslops.nn.CLIPLoss(learnable=False)
    assert not list(frozen.parameters()) and "log_logit_scale" in dict(frozen.named_buffers())


def test_input_policy():
    a, b = randn(6, 4), randn(6, 4)
    with pytest.raises(ValueError, match="same shape"):
        sslops.clip_loss(a, randn(5, 4), 10.0)
    with pytest.raises(ValueError, match="same shape"):
        sslops.clip_loss(a, randn(6, 3), 10.0)
    with pytest.raises(ValueError, match="logit_scale must be a finite number > 0"):
        sslops.clip_loss(a, b, 0.0)
    with pytest.raises(ValueError, match="logit_scale must be a float or a 0-d tensor"):
        sslops.clip_loss(a, b, torch.ones(2))
    with pytest.raises(TypeError, match="logit_scale"):
        sslops.clip_loss(a, b, "10")
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\)"):
        sslops.clip_loss(a, b, 10.0, labels=torch.arange(5))
    with pytest.raises(TypeError, match="same dtype"):
        sslops.clip_loss(a, b.double(), 10.0)
    with pytest.raises(TypeError, match="normalize"):
        sslops.clip_loss(a, b, 10.0, normalize=1)
    sslops.set_debug(True)
    try:
        with pytest.raises(ValueError, match="logit_scale must be a finite number > 0"):
            sslops.clip_loss(a, b, torch.tensor(-1.0))
    finally:
        sslops.set_debug(False)


# ----------------------------------------------------------------------------- Triton (interpreter lane)

TRITON_SIZES = [(1, 3), (2, 1), (3, 5), (33, 3), (40, 37)]


@pytest.mark.triton
@pytest.mark.parametrize("n,k", TRITON_SIZES)
@pytest.mark.parametrize("labels", [False, True])
def test_triton_matches_reference(n, k, labels, device):
    check("triton", n, k, torch.float32, device, seed=n * 3 + k, labels=labels)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_triton_dtypes_and_raw_inputs(dtype, device):
    check("triton", 37, 19, dtype, device, seed=5, labels=True, grad_tol_scale=2.0)
    check("triton", 21, 9, dtype, device, seed=6, normalize=False, grad_tol_scale=2.0, wrap=noncontiguous)


# ----------------------------------------------------------------------------- GPU lane


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_large_and_reruns(backend, dtype, device):
    check(backend, 8193, 128, dtype, device, seed=21, labels=True, grad_tol_scale=2.0)
    a, b, lab, scale = case(4099, 256, dtype, "cuda", seed=22)
    first = loss_and_grads(lambda x, y, t: sslops.clip_loss(x, y, t, backend=backend), [a, b, scale])
    for _ in range(20):
        again = loss_and_grads(lambda x, y, t: sslops.clip_loss(x, y, t, backend=backend), [a, b, scale])
        assert torch.equal(first[0], again[0]) and all(torch.equal(x, y) for x, y in zip(first[1], again[1]))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_target_shape_runs_in_memory(backend, device):
    """N = 65536, K = 512, bf16 (the issue's GPU target): runs, finite, at most 1 GB above the inputs."""
    n, k = 65536, 512
    a, b, _, scale = case(n, k, torch.bfloat16, "cuda", seed=23)
    a.requires_grad_(), b.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = sslops.clip_loss(a, b, scale, backend=backend)
    loss.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and torch.isfinite(a.grad.float()).all()
    assert torch.cuda.max_memory_allocated() - base < 1e9 + 2 * a.numel() * 2  # the gradients themselves included
