"""Autocast: every route of every loss computes in fp32 (fp64 for fp64) inside ``torch.autocast``.

The README promises fp32 accumulation and an fp32 loss whatever autocast is doing
(sslops/_autocast.py says how it is kept). Each case runs a loss forward and backward
(``grad_output`` ≠ 1) once outside autocast and once with both inside an fp16 or bf16
autocast block, for fp32 inputs and for inputs already in the autocast dtype (what an
autocast model hands over), and asserts the same dtypes and the same numbers: bit for bit
on the CPU (reference, C++ CPU kernels, the Triton interpreter), within two units in the
last place on CUDA (``pairs`` gradients there are summed by float atomics).

Lanes: CPU tensors with ``torch.autocast("cpu")`` in the default lane (reference, cpu) and
the Triton lane (triton; CUDA tensors where there is a GPU); CUDA tensors with
``torch.autocast("cuda")`` in the GPU lane (reference, cuda, triton).
"""

import dataclasses
from typing import Callable

import pytest
import torch

import sslops
from sslops import reference
from tests.utils import DEVICE, randn

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
N, K, KQ = 37, 29, 13  # odd sizes: rows, features, the side of the K×K matrices


@dataclasses.dataclass
class Case:
    name: str
    make: Callable  # (device, dtype) -> dict of keyword inputs (float leaves require grad)
    run: Callable  # (backend, **inputs) -> loss (or matrix)
    kernels: bool  # True: the route has kernels (backend= matters); False: one pure-PyTorch route


def _views(device, dtype, seed=0, scale=3.0):
    z_a = randn(N, K, dtype, device, seed=seed, scale=scale)
    z_b = (z_a.double() + randn(N, K, torch.float64, device, seed=seed + 1, scale=0.3 * scale)).to(dtype)
    return dict(z_a=z_a.requires_grad_(), z_b=z_b.requires_grad_())


def _relation(kind):
    def make(device, dtype):
        z = randn(N, K, dtype, device, seed=3, scale=2.0).requires_grad_()
        if kind == "labels":
            return dict(z=z, labels=torch.arange(N, device=device) % 7)
        g = torch.Generator().manual_seed(4)
        pairs = torch.randint(0, N, (2, 45), generator=g)
        pairs[:, 40:] = pairs[:, :5]  # duplicates, counted once
        return dict(z=z, pairs=pairs.to(device))

    return make


def _near_identity(device, dtype, seed):
    """Symmetric Q = I + S with ‖S‖₂ = 0.4: the series converges, eigh sees a positive definite Q."""
    s = randn(KQ, KQ, torch.float64, seed=seed)
    s = s + s.T
    q = torch.eye(KQ, dtype=torch.float64) + 0.4 * s / torch.linalg.matrix_norm(s, ord=2)
    return q.to(device=device, dtype=dtype).requires_grad_()


def _matrices(device, dtype):
    return dict(p=randn(KQ, KQ, dtype, device, seed=6).requires_grad_(), q=_near_identity(device, dtype, 7))


def _ssl_inputs(device, dtype):
    return dict(p=randn(N, K, dtype, device, seed=8).requires_grad_(), z=randn(N, K, dtype, device, seed=9).requires_grad_())


CASES = [
    Case("vicreg", _views, lambda b, **t: sslops.vicreg_loss(**t, backend=b), True),
    Case("vicreg_relation-labels", _relation("labels"), lambda b, **t: sslops.vicreg_relation_loss(**t, backend=b), True),
    Case("vicreg_relation-pairs", _relation("pairs"), lambda b, **t: sslops.vicreg_relation_loss(**t, backend=b), True),
    Case("barlow_twins", _views, lambda b, **t: sslops.barlow_twins_loss(**t, backend=b), True),
    Case("info_nce-labels", _relation("labels"), lambda b, **t: sslops.info_nce_loss(**t, temperature=0.1, backend=b), True),
    Case("info_nce-pairs", _relation("pairs"), lambda b, **t: sslops.info_nce_loss(**t, temperature=0.1, backend=b), True),
    Case("nt_xent", _views, lambda b, **t: sslops.nt_xent_loss(**t, temperature=0.1, backend=b), True),
    Case("matrix_log-taylor", lambda d, t: dict(q=_near_identity(d, t, 5)), lambda b, **t: sslops.matrix_log(**t), False),
    Case("matrix_log-eigh", lambda d, t: dict(q=_near_identity(d, t, 5)), lambda b, **t: sslops.matrix_log(**t, method="eigh"), False),
    Case("matrix_cross_entropy-taylor", _matrices, lambda b, **t: sslops.matrix_cross_entropy(**t, backend=b), True),
    Case("matrix_cross_entropy-eigh", _matrices, lambda b, **t: sslops.matrix_cross_entropy(**t, method="eigh"), False),
    Case("matrix_ssl-taylor", _ssl_inputs, lambda b, **t: sslops.matrix_ssl_loss(**t, backend=b), True),
    Case("matrix_ssl-exact", _ssl_inputs, lambda b, **t: sslops.matrix_ssl_loss(**t, method="exact"), False),
]

# (device, backend, marks): CPU tensors in the default and Triton lanes, CUDA tensors in the GPU lane.
PLACES = [
    ("cpu", "reference", ()),
    ("cpu", "cpu", ()),
    (DEVICE, "triton", (pytest.mark.triton,)),
    ("cuda", "reference", (pytest.mark.gpu,)),
    ("cuda", "cuda", (pytest.mark.gpu,)),
    ("cuda", "triton", (pytest.mark.gpu, pytest.mark.triton)),
]


def _params():
    for case in CASES:
        for device, backend, marks in PLACES:
            if not case.kernels and backend != "reference":
                continue  # one pure-PyTorch route: backend= does not change it
            for amp in AMP_DTYPES:
                for inputs in ("fp32", "amp"):
                    yield pytest.param(case, device, backend, amp, inputs, marks=marks,
                                       id=f"{case.name}-{device}-{backend}-{amp}-{inputs}-inputs")


def _forward_backward(case, backend, inputs):
    out = case.run(backend, **inputs)
    leaves = [t for t in inputs.values() if t.is_floating_point() and t.requires_grad]
    grad_out = torch.full_like(out, 0.7) if out.dim() == 0 else randn(*out.shape, out.dtype, out.device, seed=11)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


def _assert_same(inside, outside, device, what):
    assert inside.dtype == outside.dtype, f"{what}: dtype {inside.dtype} under autocast, {outside.dtype} without"
    if device == "cpu":
        assert torch.equal(inside, outside), f"{what}: autocast changed the numbers (max |diff| {(inside.double() - outside.double()).abs().max().item():.3g})"
        return
    eps = torch.finfo(outside.dtype).eps
    scale = outside.double().abs().max().item()
    torch.testing.assert_close(inside, outside, rtol=2 * eps, atol=2 * eps * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case,device,backend,amp,input_dtype", list(_params()))
def test_autocast_changes_nothing(case, device, backend, amp, input_dtype):
    if backend != "reference":
        loss = {"nt_xent": "info_nce"}.get(case.name.split("-")[0], case.name.split("-")[0])  # its kernels' name
        if backend not in sslops.kernel_backends(loss, device):
            pytest.skip(f"backend {backend!r} cannot run {loss} here: {sslops.backends()[backend]['reason']}")
    if device == "cpu" and amp == "fp16" and not torch.amp.is_autocast_available("cpu"):
        pytest.skip("no CPU autocast in this torch")
    dtype = torch.float32 if input_dtype == "fp32" else AMP_DTYPES[amp]
    out_dtype = dtype if case.name.startswith("matrix_log") else torch.float32  # matrix_log returns q's dtype
    inputs = case.make(device, dtype)
    outside, grads_outside = _forward_backward(case, backend, inputs)
    with torch.autocast(device, dtype=AMP_DTYPES[amp]):
        inside, grads_inside = _forward_backward(case, backend, inputs)
    assert outside.dtype == out_dtype and inside.dtype == out_dtype, (outside.dtype, inside.dtype)
    assert torch.isfinite(outside).all()
    _assert_same(inside, outside, device, "loss")
    names = [n for n, t in inputs.items() if t.is_floating_point()]
    for name, gi, go in zip(names, grads_inside, grads_outside):
        assert go.dtype == inputs[name].dtype
        _assert_same(gi, go, device, f"grad {name}")


# ----------------------------------------------------------------------------- the reports


def test_reference_route_under_autocast_matches_float64():
    """The numbers of the report: VICReg inf in fp16, Barlow Twins a bf16 2.8125, NT-Xent 0.0034 for 0.0246."""
    z_a, z_b = randn(64, 128, seed=21, scale=300.0), randn(64, 128, seed=22, scale=300.0)
    want = reference.vicreg_loss(z_a.double(), z_b.double())
    with torch.autocast("cpu", dtype=torch.float16):
        got = sslops.vicreg_loss(z_a, z_b, backend="reference")
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)

    z_a, z_b = randn(64, 128, seed=23), randn(64, 128, seed=24)
    want = reference.barlow_twins_loss(z_a.double(), z_b.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sslops.barlow_twins_loss(z_a, z_b, backend="reference")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)

    z_b = z_a + 0.05 * randn(64, 128, seed=25)  # aligned views: a small loss, sensitive to bf16 logits
    want = reference.nt_xent_loss(z_a.double(), z_b.double(), temperature=0.1)
    for amp in AMP_DTYPES.values():
        with torch.autocast("cpu", dtype=amp):
            got = sslops.nt_xent_loss(z_a, z_b, temperature=0.1, backend="reference")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


def test_convergence_guard_under_autocast():
    """The guard's power iteration (x @ v) keeps x's dtype inside an autocast block."""
    from sslops import matrix_guard

    k = 96
    basis, _ = torch.linalg.qr(randn(k, k, torch.float64, seed=61))
    x = ((basis * torch.linspace(-0.97, 0.97, k, dtype=torch.float64)) @ basis.T).float()
    outside = matrix_guard.power_estimate(x)
    result = torch.ones(())
    for amp in AMP_DTYPES.values():
        with torch.autocast("cpu", dtype=amp):
            inside = matrix_guard.power_estimate(x)
            guarded = matrix_guard.guard(result, matrix_guard.log_series_matrices(x), "nan", "test")
        assert inside.dtype == torch.float32 and torch.equal(inside, outside), (inside, outside)
        assert torch.equal(guarded, result)


def _cxx_ops_available():
    return "cpu" in sslops.kernel_backends("matrix_ssl", "cpu")


@pytest.mark.skipif(not _cxx_ops_available(), reason="sslops._C (the C++ CPU kernels) is not built")
def test_cxx_ops_called_directly_under_autocast():
    """The C++ kernels exclude autocast themselves (csrc/no_autocast.h), for callers of the raw ``*_cxx`` ops:
    under bf16 autocast ``at::mm`` would hand ``addmm_`` a bf16 product (a crash) or round a product to bf16."""
    ops = torch.ops.sslops
    p, z = randn(N, K, seed=31), randn(N, K, seed=32)
    q = _near_identity("cpu", torch.float32, 33).detach()
    pm = randn(KQ, KQ, seed=34)
    labels = torch.arange(N) % 5
    grad = torch.tensor(0.7)

    def run():
        fwd = ops.matrix_ssl_fwd_cxx(p, z, 1.0, 1.0, 1.0, 4)
        bwd = ops.matrix_ssl_bwd_cxx(grad, p, z, *fwd[1:], 1.0, 1.0, 1.0, 4, True, True)
        mce = ops.matrix_mce_fwd_cxx(pm, q, 4)
        mce_b = ops.matrix_mce_bwd_cxx(grad, pm, mce[1], mce[2], 4, True, True)
        # the contrastive pass (sslops/ops/infonce.py): InfoNCE with a queue, CLIP's two directions, SigLIP
        scale, bias, queue = torch.tensor(5.0), torch.tensor(-1.0), randn(7, K, seed=35)
        nce = ops.contrastive_fwd_cxx(z, None, queue, labels, None, None, None, scale, torch.tensor(0.0), 0, N, 0, 0, 0, 0.5)
        nce_b = ops.contrastive_bwd_cxx(torch.full((N, 3), 0.7), nce[2], z, None, queue, labels, None, None, None, nce[0],
                                        nce[2], nce[1], nce[3], scale, torch.tensor(0.0), 0, N, 0, 0, 0, 0.5, True, False, True)
        clip = ops.contrastive_fwd_cxx(p, z, None, labels, labels, None, None, scale, torch.tensor(0.0), 0, N, 0, N, 32, 0.5)
        clip_b = ops.contrastive_bwd_cxx(torch.full((N, 3), 0.7), torch.full((N, 3), 0.3), p, z, None, labels, labels, None,
                                         None, clip[0], clip[2], clip[1], clip[3], scale, torch.tensor(0.0), 0, N, 0, N, 32, 0.5,
                                         True, True, False)
        sig = ops.contrastive_fwd_cxx(p, z, None, labels, labels, None, None, scale, bias, 0, N, 0, 0, 1, 0.5)
        sig_b = ops.contrastive_bwd_cxx(torch.full((N, 3), 0.7), sig[2], p, z, None, labels, labels, None, None, sig[0],
                                        sig[2], sig[1], sig[3], scale, bias, 0, N, 0, 0, 1, 0.5, True, True, False)
        vic = ops.vicreg_view_forward_cxx(z, p, 1e-4, 0, True)
        vic_b = ops.vicreg_view_backward_cxx(z, p, vic[1], vic[2], vic[3], torch.tensor([0.5, 0.25, 0.125]), 1e-4, 0)
        bt = ops.barlow_twins_forward_cxx(p, z, 0.0051, 1e-5, 0, True)
        bt_b = ops.barlow_twins_backward_cxx(grad, p, z, *bt[1:], 0.0051, 0)
        return [*fwd, *bwd, *mce, *mce_b, *nce, *nce_b, *clip, *clip_b, *sig, *sig_b, *vic, vic_b, *bt, *bt_b]

    outside = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = run()
    for i, (a, b) in enumerate(zip(inside, outside)):
        _assert_same(a, b, "cpu", f"output {i}")


@pytest.mark.skipif(not _cxx_ops_available(), reason="sslops._C (the C++ CPU kernels) is not built")
@pytest.mark.parametrize("route", ["kernel", "reference"])
def test_compiled_loss_under_autocast(route):
    """``torch.compile(fullgraph=True)`` traces the autocast-off region; forward and backward inside the block agree with eager outside.

    torch.compile traces the backward together with the forward, with the autocast state
    ``torch._functorch.config.backward_pass_autocast`` says ("same_as_forward" by default up
    to torch 2.13): the kernel routes are immune (their backward ops switch autocast off
    themselves); a pure-PyTorch route's built-in backward formulas need "off" (see
    sslops/_autocast.py), which the reference case sets.
    """
    import torch._functorch.config as functorch_config

    backend = "cpu" if route == "kernel" else "reference"
    z_a, z_b = (t.requires_grad_() for t in (randn(N, K, seed=41), randn(N, K, seed=42)))

    def f(a, b):
        return sslops.vicreg_loss(a, b, backend=backend) + sslops.matrix_ssl_loss(a, b, backend=backend, check="nan")

    loss = f(z_a, z_b)
    grads = torch.autograd.grad(loss, (z_a, z_b))
    torch._dynamo.reset()
    setting = {} if route == "kernel" else {"backward_pass_autocast": "off"}
    with functorch_config.patch(**setting):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            c_loss = compiled(z_a, z_b)
            c_grads = torch.autograd.grad(c_loss, (z_a, z_b))
    assert c_loss.dtype == torch.float32
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=0)
    for g, w in zip(c_grads, grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_retained_graph_backward_twice_under_autocast():
    """Under autocast the loss's graph lives in one node (sslops/_autocast.py); ``retain_graph=True`` still allows a second backward."""
    z_a, z_b = (t.requires_grad_() for t in (randn(N, K, seed=51), randn(N, K, seed=52)))
    want = torch.autograd.grad(sslops.barlow_twins_loss(z_a, z_b, backend="reference"), z_a)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sslops.barlow_twins_loss(z_a, z_b, backend="reference")
        first = torch.autograd.grad(loss, z_a, retain_graph=True)[0]
        second = torch.autograd.grad(loss, z_a)[0]
    assert torch.equal(first, want) and torch.equal(second, want)
