"""Helpers shared by the tests: random inputs, backends to run, tolerances. Import as `from tests.utils import ...`."""

import os

import pytest
import torch

import sslops

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Imported by a test module (``from tests.utils import one_thread``): its tests run on one
    thread. Tiny float64 problems run several times faster so, and CI has two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def device_for(backend=None):
    """The device a kernel test runs ``backend`` on (what the ``device`` fixture of conftest.py
    gives): CPU for the C++ ``cpu`` backend and under TRITON_INTERPRET=1 (the interpreter runs
    CPU tensors), otherwise CUDA when a device is present, else CPU."""
    if backend == "cpu" or INTERPRET or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")

# (atol, rtol) of a kernel's loss or gradient against the float64 reference, per input dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (5e-2, 3e-2),
    torch.float16: (1e-2, 1e-2),
}


def acc_dtype(dtype):
    """The accumulation (and loss) dtype sslops uses for inputs of ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def randn(n, k, dtype=torch.float32, device="cpu", seed=0, scale=1.0, shift=0.0):
    """Fresh (n, k) normal samples, made in float64 on the CPU so every backend sees the same values."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * scale + shift
    return z.to(device=device, dtype=dtype)


def noncontiguous(t):
    """The same values in a strided (transposed-storage) layout."""
    out = torch.empty(t.shape[::-1], dtype=t.dtype, device=t.device).t()
    out.copy_(t)
    assert not out.is_contiguous() or t.numel() <= 1 or min(t.shape) == 1
    return out


def kernel_backends(loss, device=DEVICE):
    """Kernel backends that can run ``loss`` here: "cpu" (default lane), "triton" (interpreter lane or GPU), "cuda" (GPU)."""
    found = sslops.kernel_backends(loss, device)
    if INTERPRET:
        return [b for b in found if b == "triton"]
    return [b for b in found if b != "triton" or device == "cuda"]


def assert_close(actual, expected, dtype, what="value", scale=1.0):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol * scale, rtol=rtol * scale, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- the 2× rule (flash-attention's)

# The floor of the rule in units in the last place of the kernel's output dtype, relative to
# the exact result's largest entry. For fp64 the naive computation is the exact one (error
# 0), so the floor is the whole bound: ≈1.2e-10 relative, TOLERANCES' fp64 rtol.
RULE_ULPS = {torch.float64: 2 ** 19, torch.float32: 4, torch.bfloat16: 4, torch.float16: 4}


def max_abs_error(value, exact):
    """max |value - exact| over all entries, in float64 (inf when value has a NaN/Inf that exact has not)."""
    v, e = value.detach().double().cpu(), exact.detach().double().cpu()
    diff = (v - e).abs()
    diff = torch.where(torch.isnan(diff), torch.tensor(float("inf"), dtype=torch.float64), diff)
    return diff.max().item() if diff.numel() else 0.0


def assert_error_within(kernel, naive, exact, *, factor=2.0, ulps=None, scale=None, what="value"):
    """The flash-attention rule: the kernel's error against the exact result is at most
    ``factor`` × naive PyTorch's error in the same dtype, plus a floor of ``ulps`` units in the
    last place of the kernel's dtype times ``scale`` (default: the largest |exact| entry), so a
    case where naive happens to be exact cannot make the test flaky.

    ``kernel``: the kernel's result; ``naive``: the same math in plain PyTorch in the inputs'
    dtype (``sslops.reference`` on the same tensors); ``exact``: float64 of the same rounded
    inputs. Errors are max-abs over all entries. A naive result that overflowed (inf error)
    leaves only the requirement that the kernel's error is finite.
    Returns ``(kernel_error, naive_error, bound)`` for reports.
    """
    assert kernel.shape == exact.shape == naive.shape, f"{what}: shapes {kernel.shape}, {naive.shape}, {exact.shape}"
    if ulps is None:
        ulps = RULE_ULPS[kernel.dtype]
    if scale is None:
        scale = exact.detach().double().abs().max().item() if exact.numel() else 0.0
    err_kernel = max_abs_error(kernel, exact)
    err_naive = max_abs_error(naive, exact)
    floor = ulps * torch.finfo(kernel.dtype).eps * scale
    bound = factor * err_naive + floor
    assert err_kernel <= bound and err_kernel != float("inf"), (
        f"{what}: kernel error {err_kernel:.3e} > {factor:g} × naive error {err_naive:.3e} + floor {floor:.3e} "
        f"({ulps} ulp of {kernel.dtype} × {scale:.3e})")
    return err_kernel, err_naive, bound


def assert_kernel_within_rule(kernel_fn, naive_fn, tensors, *, grad_out=1.0, factor=2.0, what=""):
    """The 2× rule for a loss and its gradients: ``kernel_fn`` on ``tensors`` against
    ``naive_fn`` (the pure-PyTorch reference) on the same tensors and on their float64 copies.
    Returns the worst (kernel_error / bound) ratio over the loss and the gradients."""
    loss, grads = loss_and_grads(kernel_fn, tensors, grad_out)
    naive, naive_grads = loss_and_grads(naive_fn, tensors, grad_out)
    exact, exact_grads = loss_and_grads(naive_fn, [t.double() for t in tensors], grad_out)
    for t, g in zip(tensors, grads):
        assert g.dtype == t.dtype and g.shape == t.shape, f"{what}: gradient {g.dtype} {tuple(g.shape)} for {t.dtype} {tuple(t.shape)}"
    worst = 0.0
    for name, k, n, e in [("loss", loss, naive, exact)] + [(f"grad {i}", g, ng, eg) for i, (g, ng, eg) in
                                                            enumerate(zip(grads, naive_grads, exact_grads))]:
        err, _, bound = assert_error_within(k, n, e, factor=factor, what=f"{what} {name}")
        worst = max(worst, err / bound if bound > 0 else 0.0)
    return worst


# With K = 1 a normalised row is ±1 and the exact gradient of the rows is 0: what a kernel (or
# naive PyTorch) returns there is the rounding of the gradient before the normalisation's
# projection, divided by the row's norm (amplified for short rows). Tests at K = 1 compare
# against this absolute floor instead of the (zero) reference gradient.
K1_GRAD_FLOOR = 1.0


def grad_floor(k):
    """The ``grad_floor`` of :func:`check_against_reference` for inputs of K features."""
    return K1_GRAD_FLOOR if k == 1 else 1e-3


def loss_and_grads(fn, tensors, scale=1.7):
    """``(loss, grads)`` of ``scale·fn(*leaves)``: fresh leaves of ``tensors``, a gradient for each
    floating one (``None`` where the loss does not depend on it); integer tensors pass as they are."""
    leaves = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in tensors]
    loss = fn(*leaves)
    wanted = [t for t in leaves if t.is_floating_point()]
    grads = torch.autograd.grad(loss * scale, wanted, allow_unused=True)
    return loss.detach(), grads


def assert_compiled_matches_eager(fn, tensors):
    """``torch.compile(fn, fullgraph=True)`` (aot_eager: no codegen, the ops' fake and autograd
    registrations traced) gives eager's loss and every gradient on the same leaves."""
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, got_grads = loss_and_grads(compiled, tensors)
    want, want_grads = loss_and_grads(fn, tensors)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def check_against_reference(kernel_fn, reference_fn, tensors, dtype, *, grad_tol_scale=1.0, scale=1.7, grad_floor=1e-3):
    """Loss and every gradient of ``kernel_fn(*tensors)`` against ``reference_fn`` on float64 CPU copies.

    Per-dtype tolerances (``TOLERANCES[dtype]``); a gradient is compared against its own
    largest entry, floored at ``grad_floor`` (with K = 1 or symmetric inputs the exact gradient
    may be 0 and only rounding of the gradient before the normalisation's projection remains,
    whose size is the loss's), with ``grad_output = scale ≠ 1``.
    """
    loss, grads = loss_and_grads(kernel_fn, tensors, scale)
    wide = [t.detach().double().cpu() if t.is_floating_point() else t.cpu() for t in tensors]
    ref_loss, ref_grads = loss_and_grads(reference_fn, wide, scale)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), loss.dtype
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double().cpu(), ref_loss, atol=atol, rtol=rtol, msg=lambda m: f"loss: {m}")
    floating = [t for t in tensors if t.is_floating_point()]
    for index, (t, got, want) in enumerate(zip(floating, grads, ref_grads)):
        if want is None:
            assert got is None or not got.abs().max() > 0, f"gradient {index}: expected none"
            continue
        assert got is not None, f"gradient {index}: missing"
        assert got.dtype == t.dtype and got.shape == t.shape, (index, got.dtype, got.shape)
        gscale = max(want.abs().max().item(), grad_floor)
        torch.testing.assert_close(got.double().cpu(), want, atol=atol * gscale * 10 * grad_tol_scale,
                                   rtol=rtol * grad_tol_scale, msg=lambda m, i=index: f"gradient {i}: {m}")
    return loss, ref_loss
