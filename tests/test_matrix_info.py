"""Matrix log, matrix cross-entropy and Matrix-SSL: every backend against the float64 reference.

Lanes: default (C++ CPU, reference, guard, exact methods, opcheck, gradcheck, compile),
``-m triton`` under TRITON_INTERPRET=1 (tiny shapes), ``-m gpu`` (CUDA device).
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import sslops
from sslops import matrix_guard, reference
from sslops.ops import matrix_info as ops

from .utils import assert_close, kernel_backends, noncontiguous, randn

CPU_BACKENDS = [b for b in kernel_backends("matrix_ssl", "cpu") if b == "cpu"]
needs_cpu = pytest.mark.skipif(not CPU_BACKENDS, reason="sslops._C (the C++ CPU kernels) is not built")


def _reference(p, z, grad_out, **params):
    """Loss and gradients of the float64 reference."""
    p64 = p.detach().double().cpu().requires_grad_()
    z64 = z.detach().double().cpu().requires_grad_()
    loss = reference.matrix_ssl_loss(p64, z64, **params)
    gp, gz = torch.autograd.grad(loss * grad_out, (p64, z64))
    return loss.detach(), gp, gz


def _run(backend, p, z, grad_out, **params):
    p = p.detach().clone().requires_grad_()
    z = z.detach().clone().requires_grad_()
    # check="off": tiny shapes (K = 1, N = 2) sit exactly on ρ(Q - I) = 1; the guard has its own tests
    loss = sslops.matrix_ssl_loss(p, z, backend=backend, check="off", **params)
    gp, gz = torch.autograd.grad(loss * grad_out, (p, z))
    return loss, gp, gz


def _check(backend, n, k, order, dtype=torch.float32, device="cpu", seed=0, contiguous=True, mu=1.0, scale=1.0):
    p = randn(n, k, dtype, device, seed=seed)
    z = randn(n, k, dtype, device, seed=seed + 1) + 0.5 * p.to(torch.float64).to(dtype)
    if not contiguous:
        p, z = noncontiguous(p), noncontiguous(z)
    params = dict(lambd=0.7, mu=mu, gamma=1.3, order=order)
    grad_out = 1.7
    loss, gp, gz = _run(backend, p, z, grad_out, **params)
    ref, rgp, rgz = _reference(p, z, grad_out, **params)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert gp.dtype == dtype and gz.dtype == dtype
    # gradients scale like 1/sqrt(K·N) per element; compare relative to their size
    gscale = scale * max(1.0, float(rgp.abs().max()) / 1e-3)
    assert_close(loss, ref, dtype, "loss", scale=scale * max(1.0, abs(float(ref))))
    assert_close(gp, rgp, dtype, "grad p", scale=gscale)
    assert_close(gz, rgz, dtype, "grad z", scale=gscale)


# ----------------------------------------------------------------------------- C++ CPU


@needs_cpu
@pytest.mark.parametrize("k", [1, 3, 17, 129])
@pytest.mark.parametrize("n", [2, 97, 1025])
def test_cpu_matches_reference_shapes(n, k):
    for order in (1, 4):
        _check("cpu", n, k, order, torch.float64, seed=n + k)
        _check("cpu", n, k, order, torch.float32, seed=n + k + 7)


@needs_cpu
@pytest.mark.parametrize("order", [1, 2, 3, 4, 5, 6, 7, 8])
def test_cpu_matches_reference_orders(order):
    _check("cpu", 97, 17, order, torch.float64, seed=order)
    _check("cpu", 33, 129, order, torch.float32, seed=order + 1)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_precision(dtype):
    _check("cpu", 97, 17, 4, dtype, seed=3)


@needs_cpu
def test_cpu_noncontiguous_and_mu():
    _check("cpu", 97, 17, 4, torch.float32, contiguous=False, seed=4)
    _check("cpu", 50, 17, 3, torch.float64, mu=0.6, seed=5)  # non-trivial μ: Q - I has a μ-1 shift


@needs_cpu
@pytest.mark.parametrize("n,k,order", [(40, 9, 4), (257, 129, 4), (131, 130, 5)])
def test_cpu_only_one_input_needs_grad(n, k, order):
    # K >= 128: the symmetric-product path of the backward (half blocks) and the transposed q
    p, z = randn(n, k, seed=1), randn(n, k, seed=2) + 0.5 * randn(n, k, seed=1)
    ref, rgp, rgz = _reference(p, z, 1.0, order=order)
    pr = p.clone().requires_grad_()
    (gp,) = torch.autograd.grad(sslops.matrix_ssl_loss(pr, z, order=order, backend="cpu"), (pr,))
    assert_close(gp, rgp, torch.float32, "grad p alone", scale=10)
    zr = z.clone().requires_grad_()
    (gz,) = torch.autograd.grad(sslops.matrix_ssl_loss(p, zr, order=order, backend="cpu"), (zr,))
    assert_close(gz, rgz, torch.float32, "grad z alone", scale=10)


@needs_cpu
def test_cpu_nan_input_gives_nan():
    p, z = randn(20, 5, seed=1), randn(20, 5, seed=2)
    p[3, 2] = float("nan")
    assert torch.isnan(sslops.matrix_ssl_loss(p, z, backend="cpu"))  # the guard does not hide it


@needs_cpu
def test_cpu_zero_row_is_clamped_like_f_normalize():
    p, z = randn(20, 5, seed=1), randn(20, 5, seed=2)
    p[4] = 0.0
    _ = sslops.matrix_ssl_loss(p, z, backend="cpu")
    loss, gp, gz = _run("cpu", p, z, 1.0)
    ref, rgp, rgz = _reference(p, z, 1.0)
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(gp, rgp, torch.float32, "grad p", scale=10)


@needs_cpu
def test_cpu_saved_products_are_the_powers():
    """The saved stack holds Xu^2..Xu^h, P·Xa^1..P·Xa^(n-2), then Xa² (what the backward reads)."""
    p, z = randn(30, 6, torch.float64, seed=1), randn(30, 6, torch.float64, seed=2)
    mu = 0.8
    loss, xu, pa, xa, saved = torch.ops.sslops.matrix_ssl_fwd_cxx(p, z, 1.0, mu, 1.0, 5)
    eye = torch.eye(6, dtype=torch.float64)
    pn, zn = F.normalize(p, dim=1), F.normalize(z, dim=1)
    pc, zc = pn - pn.mean(0), zn - zn.mean(0)
    torch.testing.assert_close(xu, pc.T @ zc / 30 + (mu - 1) * eye)
    torch.testing.assert_close(pa, pc.T @ pc / 30 + mu * eye)
    torch.testing.assert_close(xa, zc.T @ zc / 30 + (mu - 1) * eye)
    assert saved.shape == (2 + 4, 6, 6)
    torch.testing.assert_close(saved[0], xu @ xu)
    torch.testing.assert_close(saved[1], xu @ xu @ xu)
    for j in range(1, 4):
        torch.testing.assert_close(saved[1 + j], pa @ torch.linalg.matrix_power(xa, j))
    torch.testing.assert_close(saved[5], xa @ xa)
    torch.testing.assert_close(saved[5], saved[5].T, rtol=0, atol=0)
    # order 2 keeps the full chain: [Xu^1.. none, P·Xa]
    _, _, pa2, xa2, saved2 = torch.ops.sslops.matrix_ssl_fwd_cxx(p, z, 1.0, mu, 1.0, 2)
    assert saved2.shape == (1, 6, 6)
    torch.testing.assert_close(saved2[0], pa2 @ xa2)
    torch.testing.assert_close(pa, pa.T, rtol=0, atol=0)
    torch.testing.assert_close(xa, xa.T, rtol=0, atol=0)


# ----------------------------------------------------------------------------- op layer


@needs_cpu
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_cpu(requires_grad):
    p = randn(13, 5, seed=1).requires_grad_(requires_grad)
    z = randn(13, 5, seed=2).requires_grad_(requires_grad)
    torch.library.opcheck(ops._ssl_forward, (p, z, 0.7, 1.0, 1.3, 4, "cpu"))
    out = ops._ssl_forward(p.detach(), z.detach(), 0.7, 1.0, 1.3, 4, "cpu")
    g = torch.tensor(1.5)
    for need in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(ops._ssl_backward, (g, p.detach(), z.detach(), *out[1:], 0.7, 1.0, 1.3, 4, *need, "cpu"))
    dp, dz = ops._ssl_backward(g, p.detach(), z.detach(), *out[1:], 0.7, 1.0, 1.3, 4, False, True, "cpu")
    assert dp.shape == (0,) and dz.shape == z.shape  # the gradient not asked for is not allocated


@needs_cpu
def test_gradcheck_float64_cpu():
    p = randn(11, 4, torch.float64, seed=1).requires_grad_()
    z = randn(11, 4, torch.float64, seed=2).requires_grad_()
    for order in (1, 4, 5):
        torch.autograd.gradcheck(lambda a, b: sslops.matrix_ssl_loss(a, b, order=order, lambd=0.7, gamma=1.3, backend="cpu"), (p, z))


@needs_cpu
def test_compile_fullgraph_cpu():
    p = randn(33, 7, seed=1).requires_grad_()
    z = randn(33, 7, seed=2)

    # The op-level entry point (what sslops.matrix_ssl_loss(backend="cpu") calls after
    # validation): backend resolution queries the extension through pybind, which dynamo
    # cannot trace. check="raise" acts as "nan" while compiling (no data-dependent branch).
    def f(a, b, mu=1.0):
        return ops.matrix_ssl(a, b, lambd=1.0, mu=mu, gamma=1.0, order=4, backend="cpu", check="raise")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(p, z)
    (gp,) = torch.autograd.grad(loss, (p,))
    ref, rgp, _ = _reference(p, z, 1.0)
    assert_close(loss, ref, torch.float32, "compiled loss")
    assert_close(gp, rgp, torch.float32, "compiled grad", scale=10)
    bad = compiled(p.detach(), z, mu=-1.0)
    assert torch.isnan(bad)


@needs_cpu
def test_compile_fullgraph_public_function():
    p = randn(21, 6, seed=3).requires_grad_()
    z = randn(21, 6, seed=4)
    compiled = torch.compile(lambda a, b: sslops.matrix_ssl_loss(a, b, lambd=0.7, gamma=1.3), fullgraph=True, backend="aot_eager")
    loss = compiled(p, z)
    (gp,) = torch.autograd.grad(loss * 1.7, (p,))
    ref, rgp, _ = _reference(p, z, 1.7, lambd=0.7, mu=1.0, gamma=1.3, order=4)
    assert_close(loss, ref, torch.float32, "compiled public loss")
    assert_close(gp, rgp, torch.float32, "compiled public grad", scale=10)


def test_docs_name_p_the_target_and_z_the_online_branch():
    """The released training code's roles (p: the momentum teacher's output, detached; z: the
    online predictor's output) in every docstring and README line that names them, and the
    benchmark's training case differentiates z alone."""
    import os

    from benchmarks import bench_mce
    from benchmarks.common import _prepare

    args = sslops.matrix_ssl_loss.__doc__.split("Args:")[1]
    p_line = next(line for line in args.splitlines() if line.strip().startswith("p:"))
    z_line = next(line for line in args.splitlines() if line.strip().startswith("z:"))
    assert "target" in p_line and "teacher" in p_line and "online" not in p_line, p_line
    assert "online" in z_line and "target" not in z_line, z_line
    assert "with torch.no_grad():" in sslops.matrix_ssl_loss.__doc__  # the momentum-teacher use
    nn_doc = sslops.nn.MatrixSSLLoss.__doc__
    assert "``p1, p2`` are the **target** branch" in nn_doc and "``z1, z2`` are the\n    **online** branch" in nn_doc
    readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md"), encoding="utf-8").read()
    row = next(line for line in readme.splitlines() if line.startswith("| `matrix_ssl_loss("))
    assert "p the target branch" in row and "z the online branch" in row
    for both, grads in ((False, [False, True]), (True, [True, True])):
        inputs, _ = _prepare(bench_mce.mce_case(8, 4, compile=False, both=both), torch.device("cpu"))
        assert [t.requires_grad for t in inputs] == grads


def test_auto_picks_cpu_kernel_on_cpu():
    if not CPU_BACKENDS:
        pytest.skip("sslops._C is not built")
    assert sslops._backend.resolve("matrix_ssl", "auto", torch.device("cpu")) == "cpu"


# ----------------------------------------------------------------------------- convergence guard


def _non_normal(k, eig=0.5, off=3.0):
    """Upper-triangular X with every eigenvalue ``eig`` but norms far above 1 (ρ < 1, ‖X‖ > 1)."""
    x = torch.triu(torch.full((k, k), off, dtype=torch.float64), diagonal=1) * 0.2 + eig * torch.eye(k, dtype=torch.float64)
    return x


def test_guard_bound_and_estimate():
    k = 6
    x = _non_normal(k)
    assert float(matrix_guard.norm_bound(x)) > 1  # the cheap bound is inconclusive
    est = float(matrix_guard.power_estimate(x))
    assert 0.4 < est < 0.99  # ... and the estimate finds ρ = 0.5 (nilpotent part inflates it only a little)
    assert not bool(matrix_guard.divergent(x))
    assert bool(matrix_guard.divergent(torch.diag(torch.tensor([0.1, -1.2, 0.3], dtype=torch.float64))))
    # complex pair of modulus 1.1: rotation-scaled block
    r = 1.1 * torch.tensor([[math.cos(1.0), -math.sin(1.0)], [math.sin(1.0), math.cos(1.0)]], dtype=torch.float64)
    assert abs(float(matrix_guard.power_estimate(r)) - 1.1) < 1e-6
    assert bool(matrix_guard.divergent(r))
    assert float(matrix_guard.norm_bound(0.3 * torch.eye(4))) == pytest.approx(0.3)


def test_guard_power_iteration_runs_serially_and_restores_threads():
    """On CPU tensors the power iteration runs on one thread; the caller's thread count comes
    back also when the guard raises, and the estimate is the same as with every thread."""
    x = 1.2 * randn(97, 97, torch.float64, seed=4) / math.sqrt(97)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        serial = float(matrix_guard.power_estimate(x))
        assert torch.get_num_threads() == 2
        parallel = float(matrix_guard._power_estimate(x, matrix_guard.POWER_STEPS, matrix_guard.POWER_VECTORS))
        assert serial == pytest.approx(parallel, rel=1e-12)
        with pytest.raises(ValueError, match="argument q"):
            sslops.matrix_log(torch.eye(97, dtype=torch.float64) + x)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_guard_matrix_log_raises_names_q():
    q = torch.eye(4, dtype=torch.float64) + torch.diag(torch.tensor([0.2, -0.3, 1.5, 0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"argument q.*spectral radius|spectral radius.*argument q"):
        sslops.matrix_log(q)
    with pytest.raises(ValueError, match="matrix_cross_entropy"):
        sslops.matrix_cross_entropy(q, q)
    with pytest.warns(RuntimeWarning, match="diverges"):
        sslops.matrix_log(q, check="warn")
    assert torch.isnan(sslops.matrix_log(q, check="nan")).all()
    assert torch.isfinite(sslops.matrix_log(q, check="off")).all()
    assert torch.isnan(sslops.matrix_cross_entropy(q, q, check="nan"))
    # the exact route has no convergence condition
    torch.testing.assert_close(sslops.matrix_log(q, method="eigh").diagonal(), torch.log(q.diagonal()))
    with pytest.raises(ValueError, match="check must be one of"):
        sslops.matrix_log(q, check="maybe")


def test_guard_accepts_non_normal_convergent_q():
    x = _non_normal(5)
    q = torch.eye(5, dtype=torch.float64) + x
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sslops.matrix_log(q, order=60)  # converges (ρ = 0.5) although ‖Q - I‖ > 1
    torch.testing.assert_close(torch.linalg.matrix_exp(out), q, atol=1e-8, rtol=1e-8)


def test_guard_radius_exactly_one_raises():
    q = torch.diag(torch.tensor([1.0, 0.0, 1.5], dtype=torch.float64))  # ρ(Q - I) = 1: log 0
    with pytest.raises(ValueError, match="argument q"):
        sslops.matrix_log(q)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_guard_matrix_ssl_raises_names_mu(backend):
    p, z = randn(40, 9, seed=1), randn(40, 9, seed=2)
    for mu in (0.0, 2.5, -1.0):
        with pytest.raises(ValueError, match="argument mu"):
            sslops.matrix_ssl_loss(p, z, mu=mu, backend=backend)
        assert torch.isnan(sslops.matrix_ssl_loss(p, z, mu=mu, backend=backend, check="nan"))
        with pytest.warns(RuntimeWarning):
            sslops.matrix_ssl_loss(p, z, mu=mu, backend=backend, check="warn")
        assert torch.isfinite(sslops.matrix_ssl_loss(p, z, mu=mu, backend=backend, check="off"))
    for mu in (1.0, 0.6, 1.4):  # fine: no error, no warning, and "nan" leaves the value alone
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            a = sslops.matrix_ssl_loss(p, z, mu=mu, backend=backend)
        torch.testing.assert_close(sslops.matrix_ssl_loss(p, z, mu=mu, backend=backend, check="nan"), a)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_guard_message_offers_the_called_functions_own_exact_method(backend):
    """matrix_ssl_loss's message offers method='exact' (it rejects 'eigh'); matrix_log and
    matrix_cross_entropy offer method='eigh' (they reject 'exact'): the advice works as given."""
    p, z = randn(40, 9, seed=1), randn(40, 9, seed=2)
    with pytest.raises(ValueError) as err:
        sslops.matrix_ssl_loss(p, z, mu=2.5, backend=backend)
    msg = str(err.value)
    assert "method='exact'" in msg and "method='eigh'" not in msg
    assert torch.isfinite(sslops.matrix_ssl_loss(p, z, mu=2.5, method="exact"))  # the advice, followed
    q = torch.eye(4, dtype=torch.float64) + torch.diag(torch.tensor([0.2, -0.3, 1.5, 0.1], dtype=torch.float64))
    for fn in (sslops.matrix_log, lambda m: sslops.matrix_cross_entropy(m, m, backend=backend)):
        with pytest.raises(ValueError) as err:
            fn(q)
        assert "method='eigh'" in str(err.value) and "method='exact'" not in str(err.value)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_guard_warning_points_at_the_callers_line(backend):
    p, z = randn(40, 9, seed=1), randn(40, 9, seed=2)
    q = torch.eye(4, dtype=torch.float64) + torch.diag(torch.tensor([0.2, -0.3, 1.5, 0.1], dtype=torch.float64))
    calls = [
        lambda: sslops.matrix_ssl_loss(p, z, mu=2.5, backend=backend, check="warn"),
        lambda: sslops.nn.MatrixSSLLoss(mu=2.5, backend=backend, check="warn")(p, p, z, z),
        lambda: sslops.matrix_log(q, check="warn"),
        lambda: sslops.matrix_cross_entropy(q, q, backend=backend, check="warn"),
    ]
    for call in calls:
        with pytest.warns(RuntimeWarning, match="diverges") as record:
            call()
        assert {w.filename for w in record} == {__file__}, [w.filename for w in record]


def test_guard_collapsed_embeddings_mu_one():
    """Fully collapsed rows give ρ(Q - I) = 1 exactly for the uniformity term: a divergence, flagged."""
    base = randn(1, 8, torch.float64, seed=3)
    sign = torch.where(torch.arange(30) % 2 == 0, 1.0, -1.0).double().unsqueeze(1)
    p = sign * base
    z = -sign * base  # pᵀJz/N = -e eᵀ: eigenvalue -1
    with pytest.raises(ValueError, match="uniformity"):
        sslops.matrix_ssl_loss(p, z, backend="reference")


# ----------------------------------------------------------------------------- matrix log / MCE


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("k", [1, 3, 17, 129])
def test_mce_matches_reference_nonsymmetric(order, k):
    g = torch.Generator().manual_seed(order * 1000 + k)
    p = torch.randn(k, k, generator=g, dtype=torch.float64)
    x = torch.randn(k, k, generator=g, dtype=torch.float64)
    q = torch.eye(k, dtype=torch.float64) + 0.5 * x / torch.linalg.matrix_norm(x, 2)  # ρ(Q - I) ≤ 0.5, not symmetric
    p32, q32 = p.float().requires_grad_(), q.float().requires_grad_()
    pr, qr = p.clone().requires_grad_(), q.clone().requires_grad_()
    ref = reference.matrix_cross_entropy(pr, qr, order=order)
    out = sslops.matrix_cross_entropy(p32, q32, order=order)
    rgp, rgq = torch.autograd.grad(ref * 0.6, (pr, qr))
    gp, gq = torch.autograd.grad(out * 0.6, (p32, q32))
    s = max(1.0, abs(float(ref.detach())))
    assert_close(out, ref, torch.float32, "mce", scale=s * max(1, k / 16))
    assert_close(gp, rgp, torch.float32, "mce grad p", scale=max(1, k / 16))
    assert_close(gq, rgq, torch.float32, "mce grad q", scale=max(1, k / 16) * max(1.0, float(rgq.abs().max())))
    out64 = sslops.matrix_cross_entropy(p, q, order=order)
    torch.testing.assert_close(out64, ref.detach(), rtol=1e-11, atol=1e-11 * k)


def test_matrix_log_series_converges_to_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(17, 17, generator=g, dtype=torch.float64)
    s = a @ a.T
    q = torch.eye(17, dtype=torch.float64) + 0.6 * s / torch.linalg.matrix_norm(s, 2) - 0.3 * torch.eye(17, dtype=torch.float64)
    exact = sslops.matrix_log(q, method="eigh")
    err = [float((sslops.matrix_log(q, order=n) - exact).abs().max()) for n in (1, 2, 4, 8, 40)]
    assert all(b < a for a, b in zip(err, err[1:]))  # monotone for ρ = 0.3..0.3 spectrum
    assert err[-1] < 1e-12
    assert err[2] < 0.3**5 / 5 * 1.01 + 1e-15  # order-4 truncation bound Σ_{k>4} ρ^k/k ≈ ρ⁵/5/(1-ρ)
    # MCE exact vs series
    p = torch.eye(17, dtype=torch.float64) + 0.1 * s / torch.linalg.matrix_norm(s, 2)
    torch.testing.assert_close(sslops.matrix_cross_entropy(p, q, order=40), sslops.matrix_cross_entropy(p, q, method="eigh"))


@pytest.mark.parametrize("k", [3, 17, 129])
def test_matrix_ssl_exact_method(k):
    n = 97
    p = randn(n, k, torch.float64, seed=k)
    z = randn(n, k, torch.float64, seed=k + 1) + 0.5 * p
    pr, zr = p.clone().requires_grad_(), z.clone().requires_grad_()
    exact = sslops.matrix_ssl_loss(pr, zr, method="exact", lambd=0.7, gamma=1.3)
    # independent form: -λ Σ log eig(Qu) (real part) and -tr(P log_eigh Qa)
    pn, zn = F.normalize(p, dim=1), F.normalize(z, dim=1)
    pc, zc = pn - pn.mean(0), zn - zn.mean(0)
    eye = torch.eye(k, dtype=torch.float64)
    qu = pc.T @ zc / n + eye
    u = -0.7 * torch.log(torch.linalg.eigvals(qu)).real.sum()
    a = -(reference.matrix_log(zc.T @ zc / n + eye, method="eigh") * (pc.T @ pc / n + eye)).sum()
    torch.testing.assert_close(exact, u + 1.3 * a)
    series = sslops.matrix_ssl_loss(p, z, order=30, lambd=0.7, gamma=1.3, backend="reference")
    torch.testing.assert_close(series, exact.detach(), rtol=1e-9, atol=1e-9)
    torch.autograd.gradcheck(lambda a, b: sslops.matrix_ssl_loss(a, b, method="exact"), (pr[:9, :3].detach().clone().requires_grad_(), zr[:9, :3].detach().clone().requires_grad_()))


@needs_cpu
def test_cpu_high_order_reaches_exact():
    p = randn(97, 17, torch.float64, seed=1)
    z = randn(97, 17, torch.float64, seed=2) + 0.5 * p
    exact = sslops.matrix_ssl_loss(p, z, method="exact")
    errs = [abs(float(sslops.matrix_ssl_loss(p, z, order=n, backend="cpu") - exact)) for n in (1, 2, 4, 8)]
    assert errs[3] < errs[2] < errs[0] and errs[3] < 1e-6


# ----------------------------------------------------------------------------- Triton (interpreter lane / GPU)


@pytest.mark.triton
@pytest.mark.parametrize("n,k", [(2, 1), (5, 3), (37, 17), (33, 40)])
def test_triton_matches_reference(n, k, device):
    for order in (1, 2, 3, 4, 5) if (n, k) == (37, 17) else (4,):
        _check("triton", n, k, order, torch.float32, device=device, seed=n + k + order)
    _check("triton", n, k, 4, torch.float64, device=device, seed=n + k)


@pytest.mark.triton
def test_triton_noncontiguous_halves_and_guard(device):
    _check("triton", 21, 9, 4, torch.float32, device=device, contiguous=False, seed=2)
    _check("triton", 21, 9, 3, torch.bfloat16, device=device, seed=3)
    p, z = randn(21, 9, device=device, seed=1), randn(21, 9, device=device, seed=2)
    with pytest.raises(ValueError, match="argument mu"):
        sslops.matrix_ssl_loss(p, z, mu=0.0, backend="triton")


@pytest.mark.triton
def test_triton_primitives(device):
    from sslops.triton_kernels import matrix_info as tk

    g = torch.Generator().manual_seed(0)
    for k in (1, 5, 33, 40):
        a = torch.randn(k, k, generator=g).to(device)
        b = torch.randn(k, k, generator=g).to(device)
        r = torch.randn(k, k, generator=g).to(device)
        prod, tr = tk.mm_trace(a, b, r)
        torch.testing.assert_close(prod, a @ b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(tr, torch.trace(a @ b @ r), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(tk.trace_dot(a, b), torch.trace(a @ b), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- GPU lane


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_large_and_deterministic(backend, device):
    if backend not in sslops.kernel_backends("matrix_ssl", "cuda"):
        pytest.skip(f"{backend} cannot run here")
    for n, k in [(1025, 129), (4096, 1024)]:
        _check(backend, n, k, 4, torch.float32, device=device, seed=n, scale=10)
    p, z = randn(2049, 513, device=device, seed=1).requires_grad_(), randn(2049, 513, device=device, seed=2)
    first = None
    for _ in range(20):
        loss = sslops.matrix_ssl_loss(p, z, backend=backend)
        (gp,) = torch.autograd.grad(loss, (p,))
        if first is None:
            first = (loss, gp)
        else:
            assert torch.equal(loss, first[0]) and torch.equal(gp, first[1])


@pytest.mark.gpu
def test_gpu_fused_trace_matmul(device):
    if "triton" not in sslops.kernel_backends("matrix_ssl", "cuda"):
        pytest.skip("triton cannot run here")
    from sslops.triton_kernels import matrix_info as tk

    tk.set_gpu_mm("triton")
    try:
        for n, k in [(97, 17), (1025, 129), (2048, 1000)]:
            _check("triton", n, k, 4, torch.float32, device=device, seed=n, scale=10)
            _check("triton", n, k, 3, torch.float64, device=device, seed=n + 1)
    finally:
        tk.set_gpu_mm("cublas")


@pytest.mark.gpu
def test_gpu_tf32_vs_ieee(device):
    if "triton" not in sslops.kernel_backends("matrix_ssl", "cuda"):
        pytest.skip("triton cannot run here")
    p, z = randn(2048, 512, device=device, seed=1), randn(2048, 512, device=device, seed=2)
    ref = reference.matrix_ssl_loss(p.double(), z.double())
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        ieee = sslops.matrix_ssl_loss(p, z, backend="triton")
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = sslops.matrix_ssl_loss(p, z, backend="triton")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert abs(float(ieee) - float(ref)) < 1e-4 * max(1, abs(float(ref)))
    assert abs(float(tf32) - float(ref)) < 1e-2 * max(1, abs(float(ref)))


@pytest.mark.triton
def test_opcheck_triton(device):
    p = randn(9, 5, device=device, seed=1).requires_grad_()
    z = randn(9, 5, device=device, seed=2).requires_grad_()
    torch.library.opcheck(ops._ssl_forward, (p, z, 0.7, 1.0, 1.3, 4, "triton"))
    out = ops._ssl_forward(p.detach(), z.detach(), 0.7, 1.0, 1.3, 4, "triton")
    g = torch.tensor(1.5, device=device)
    torch.library.opcheck(ops._ssl_backward, (g, p.detach(), z.detach(), *out[1:], 0.7, 1.0, 1.3, 4, True, False, "triton"))


# ----------------------------------------------------------------------------- matrix cross-entropy kernels

MCE_CPU = [b for b in kernel_backends("matrix_cross_entropy", "cpu") if b == "cpu"]
needs_mce_cpu = pytest.mark.skipif(not MCE_CPU, reason="sslops._C (the C++ CPU kernels) is not built")


def _mce_inputs(k, dtype=torch.float32, device="cpu", seed=0, rho=0.6):
    """Non-symmetric P and Q = I + X with ‖X‖₂ = rho (so ρ(Q - I) ≤ rho < 1), made in float64."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(k, k, generator=g, dtype=torch.float64)
    x = torch.randn(k, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    x = rho * x / torch.linalg.matrix_norm(x, 2)
    q = torch.eye(k, dtype=torch.float64) + x
    return p.to(device=device, dtype=dtype), q.to(device=device, dtype=dtype)


def _mce_reference(p, q, grad_out, order):
    """Float64 reference loss and gradients on the (already rounded) inputs."""
    p64 = p.detach().double().cpu().requires_grad_()
    q64 = q.detach().double().cpu().requires_grad_()
    loss = reference.matrix_cross_entropy(p64, q64, order=order)
    gp, gq = torch.autograd.grad(loss * grad_out, (p64, q64))
    return loss.detach(), gp, gq


def _mce_check(backend, k, order, dtype=torch.float32, device="cpu", seed=0, contiguous=True, grad_out=0.7):
    p, q = _mce_inputs(k, dtype, device, seed)
    if not contiguous:
        p, q = noncontiguous(p), noncontiguous(q)
    pr, qr = p.clone().requires_grad_(), q.clone().requires_grad_()
    loss = sslops.matrix_cross_entropy(pr, qr, order=order, backend=backend)
    gp, gq = torch.autograd.grad(loss * grad_out, (pr, qr))
    ref, rgp, rgq = _mce_reference(p, q, grad_out, order)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert gp.dtype == dtype and gq.dtype == dtype and gp.shape == (k, k) and gq.shape == (k, k)
    assert_close(loss, ref, dtype, f"mce loss (order {order}, K {k})", scale=max(1.0, abs(float(ref))))
    assert_close(gp, rgp, dtype, f"mce grad p (order {order}, K {k})", scale=max(1.0, float(rgp.abs().max())))
    assert_close(gq, rgq, dtype, f"mce grad q (order {order}, K {k})", scale=max(1.0, float(rgq.abs().max())))


@needs_mce_cpu
@pytest.mark.parametrize("k", [1, 3, 17, 129])
def test_mce_cpu_matches_reference(k):
    for order in range(1, 9):
        _mce_check("cpu", k, order, torch.float64, seed=10 * k + order)
        _mce_check("cpu", k, order, torch.float32, seed=10 * k + order + 1)


@needs_mce_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mce_cpu_half_precision(dtype):
    for order in (1, 4):
        _mce_check("cpu", 17, order, dtype, seed=order)


@needs_mce_cpu
def test_mce_cpu_noncontiguous():
    _mce_check("cpu", 17, 4, torch.float32, contiguous=False, seed=4)
    _mce_check("cpu", 33, 5, torch.float64, contiguous=False, seed=5)
    # a strided slice (every other row and column) as well as transposed storage
    p, q = _mce_inputs(24, torch.float64, seed=6)
    big_p = torch.zeros(48, 48, dtype=torch.float64)
    big_q = torch.zeros(48, 48, dtype=torch.float64)
    big_p[::2, ::2], big_q[::2, ::2] = p, q
    pv, qv = big_p[::2, ::2].requires_grad_(), big_q[::2, ::2]
    loss = sslops.matrix_cross_entropy(pv, qv, order=3, backend="cpu")
    (gp,) = torch.autograd.grad(loss * 1.3, (pv,))
    ref, rgp, _ = _mce_reference(p, q, 1.3, 3)
    torch.testing.assert_close(loss, ref, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(gp, rgp, rtol=1e-11, atol=1e-11)


@needs_mce_cpu
@pytest.mark.parametrize("order", [1, 4])
def test_mce_cpu_only_one_input_needs_grad(order):
    p, q = _mce_inputs(17, torch.float64, seed=7)
    ref, rgp, rgq = _mce_reference(p, q, 1.9, order)
    pr = p.clone().requires_grad_()
    (gp,) = torch.autograd.grad(sslops.matrix_cross_entropy(pr, q, order=order, backend="cpu") * 1.9, (pr,))
    torch.testing.assert_close(gp, rgp, rtol=1e-11, atol=1e-11)
    qr = q.clone().requires_grad_()
    (gq,) = torch.autograd.grad(sslops.matrix_cross_entropy(p, qr, order=order, backend="cpu") * 1.9, (qr,))
    torch.testing.assert_close(gq, rgq, rtol=1e-11, atol=1e-11)
    # the backward op leaves the gradient nobody asked for at zero (and computes it not)
    loss, x, saved = torch.ops.sslops.matrix_mce_fwd_cxx(p, q, order)
    g = torch.tensor(1.9, dtype=torch.float64)
    dp, dq = torch.ops.sslops.matrix_mce_bwd_cxx(g, p, x, saved, order, True, False)
    torch.testing.assert_close(dp, rgp, rtol=1e-11, atol=1e-11)
    assert not dq.any()
    dp, dq = torch.ops.sslops.matrix_mce_bwd_cxx(g, p, x, saved, order, False, True)
    torch.testing.assert_close(dq, rgq, rtol=1e-11, atol=1e-11)
    assert not dp.any()


@needs_mce_cpu
def test_mce_cpu_saved_chain_and_nan():
    p, q = _mce_inputs(6, torch.float64, seed=8)
    loss, x, saved = torch.ops.sslops.matrix_mce_fwd_cxx(p, q, 5)
    torch.testing.assert_close(x, q - torch.eye(6, dtype=torch.float64), rtol=0, atol=0)
    assert saved.shape == (4, 6, 6)
    for j in range(1, 5):
        torch.testing.assert_close(saved[j - 1], p @ torch.linalg.matrix_power(x, j))
    assert torch.ops.sslops.matrix_mce_fwd_cxx(p, q, 1)[2].shape == (0, 6, 6)
    p[2, 3] = float("nan")
    assert torch.isnan(sslops.matrix_cross_entropy(p, q, backend="cpu"))


@needs_mce_cpu
@pytest.mark.parametrize("requires_grad", [False, True])
def test_mce_opcheck_cpu(requires_grad):
    for order in (1, 4):
        p, q = _mce_inputs(5, seed=order)
        p, q = p.requires_grad_(requires_grad), q.requires_grad_(requires_grad)
        torch.library.opcheck(ops._mce_forward, (p, q, order, "cpu"))
        _, x, saved = ops._mce_forward(p.detach(), q.detach(), order, "cpu")
        g = torch.tensor(1.5)
        torch.library.opcheck(ops._mce_backward, (g, p.detach(), x, saved, order, True, True, "cpu"))
        torch.library.opcheck(ops._mce_backward, (g, p.detach(), x, saved, order, False, True, "cpu"))


@needs_mce_cpu
def test_mce_gradcheck_float64_cpu():
    p, q = _mce_inputs(4, torch.float64, seed=9)
    p, q = p.requires_grad_(), q.requires_grad_()
    for order in (1, 3, 4):
        torch.autograd.gradcheck(lambda a, b: sslops.matrix_cross_entropy(a, b, order=order, backend="cpu"), (p, q))


@needs_mce_cpu
def test_mce_compile_fullgraph_cpu():
    p, q = _mce_inputs(9, seed=10)
    p = p.requires_grad_()
    compiled = torch.compile(lambda a, b: sslops.matrix_cross_entropy(a, b, order=4, backend="cpu"), fullgraph=True, backend="aot_eager")
    loss = compiled(p, q)
    (gp,) = torch.autograd.grad(loss * 1.7, (p,))
    ref, rgp, _ = _mce_reference(p, q, 1.7, 4)
    assert_close(loss, ref, torch.float32, "compiled mce", scale=max(1.0, abs(float(ref))))
    assert_close(gp, rgp, torch.float32, "compiled mce grad")
    bad = q + 2.0 * torch.eye(9)  # ρ(Q - I) ≥ 2: check="raise" acts as "nan" while compiling
    assert torch.isnan(compiled(p.detach(), bad))


@pytest.mark.parametrize("backend", ["reference"] + MCE_CPU)
def test_mce_guard_through_backend(backend):
    p, q = _mce_inputs(7, torch.float64, seed=11)
    bad = q.clone()
    bad[3, 3] += 1.5  # an eigenvalue of Q - I moves past 1 (ρ ≥ 1)
    with pytest.raises(ValueError, match=r"matrix_cross_entropy.*argument q"):
        sslops.matrix_cross_entropy(p, bad, backend=backend)
    with pytest.warns(RuntimeWarning, match="diverges"):
        sslops.matrix_cross_entropy(p, bad, backend=backend, check="warn")
    assert torch.isnan(sslops.matrix_cross_entropy(p, bad, backend=backend, check="nan"))
    assert torch.isfinite(sslops.matrix_cross_entropy(p, bad, backend=backend, check="off"))
    radius_one = torch.diag(torch.tensor([1.0, 0.0, 1.5], dtype=torch.float64))  # ρ(Q - I) = 1 exactly
    with pytest.raises(ValueError, match="argument q"):
        sslops.matrix_cross_entropy(radius_one, radius_one, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good = sslops.matrix_cross_entropy(p, q, backend=backend)
    torch.testing.assert_close(sslops.matrix_cross_entropy(p, q, backend=backend, check="nan"), good)


def test_mce_auto_picks_cpu_kernel_on_cpu():
    if not MCE_CPU:
        pytest.skip("sslops._C is not built")
    assert sslops._backend.resolve("matrix_cross_entropy", "auto", torch.device("cpu")) == "cpu"
    p, q = _mce_inputs(5, torch.float64, seed=12)
    torch.testing.assert_close(sslops.matrix_cross_entropy(p, q), sslops.matrix_cross_entropy(p, q, backend="reference"),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.triton
@pytest.mark.parametrize("k", [1, 3, 17, 40])
def test_mce_triton_matches_reference(k, device):
    orders = range(1, 9) if k == 17 else (1, 4)
    for order in orders:
        _mce_check("triton", k, order, torch.float32, device=device, seed=k + order)
    _mce_check("triton", k, 3, torch.float64, device=device, seed=k + 20)


@pytest.mark.triton
def test_mce_triton_dtypes_noncontiguous_one_grad_guard(device):
    _mce_check("triton", 9, 4, torch.bfloat16, device=device, seed=1)
    _mce_check("triton", 9, 5, torch.float32, device=device, contiguous=False, seed=2)
    p, q = _mce_inputs(9, torch.float64, device, seed=3)
    ref, rgp, rgq = _mce_reference(p, q, 0.8, 4)
    pr = p.clone().requires_grad_()
    (gp,) = torch.autograd.grad(sslops.matrix_cross_entropy(pr, q, backend="triton") * 0.8, (pr,))
    torch.testing.assert_close(gp.cpu(), rgp, rtol=1e-11, atol=1e-11)
    qr = q.clone().requires_grad_()
    (gq,) = torch.autograd.grad(sslops.matrix_cross_entropy(p, qr, backend="triton") * 0.8, (qr,))
    torch.testing.assert_close(gq.cpu(), rgq, rtol=1e-11, atol=1e-11)
    bad = q.clone()
    bad[4, 4] += 1.5
    with pytest.raises(ValueError, match="argument q"):
        sslops.matrix_cross_entropy(p, bad, backend="triton")
    assert torch.isnan(sslops.matrix_cross_entropy(p, bad, backend="triton", check="nan"))


@pytest.mark.triton
def test_mce_opcheck_triton(device):
    p, q = _mce_inputs(5, device=device, seed=4)
    p, q = p.requires_grad_(), q.requires_grad_()
    torch.library.opcheck(ops._mce_forward, (p, q, 4, "triton"))
    _, x, saved = ops._mce_forward(p.detach(), q.detach(), 4, "triton")
    g = torch.tensor(1.5, device=device)
    torch.library.opcheck(ops._mce_backward, (g, p.detach(), x, saved, 4, True, True, "triton"))
