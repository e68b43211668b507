"""The C++ CPU kernels' vector ISA levels (csrc/cpu/cpu_capability.h): every level this CPU can
run gives the float64 reference's numbers, and SSLOPS_CPU_CAPABILITY selects and validates.

The contrastive pass's per-row loops (logits, online log-sum-exp, SigLIP's softplus sums, the
backward's coefficients) are compiled for the build's baseline ISA, for AVX2 + FMA and for
AVX-512, and chosen per call. The rest of the suite runs at the best level this CPU supports;
here each lower level runs the checks that reach every loop: CLIP and SigLIP (labels, raw
inputs, bf16), InfoNCE over each relation kind with a queue, decoupled and DCLW weights, the
small-τ gradient rule against the peers' formulas, and bit-identical reruns at any thread count.
Levels this CPU lacks are skipped, saying so.
"""

import os

import pytest
import torch

import sslops
from sslops import _extension
from tests import test_clip as clip_tests
from tests import test_infonce as infonce_tests
from tests import test_siglip as siglip_tests
from tests.utils import INTERPRET, randn

LEVELS = ["default", "avx2", "avx512"]
pytestmark = pytest.mark.skipif(not _extension.LOADED or INTERPRET, reason="sslops._C not built / interpreter lane")


def _best():
    """The level this CPU supports (SSLOPS_CPU_CAPABILITY left as it was)."""
    saved = os.environ.pop("SSLOPS_CPU_CAPABILITY", None)
    try:
        return _extension.cpu_capability()
    finally:
        if saved is not None:
            os.environ["SSLOPS_CPU_CAPABILITY"] = saved


@pytest.fixture(params=LEVELS)
def level(request, monkeypatch):
    """Run the test at one ISA level (skipped where this CPU lacks it)."""
    name = request.param
    if _extension.LOADED and LEVELS.index(name) > LEVELS.index(_best()):
        pytest.skip(f"this CPU runs at most {_best()}")
    monkeypatch.setenv("SSLOPS_CPU_CAPABILITY", name)
    assert _extension.cpu_capability() == name
    return name


def test_unset_gives_the_best_level_and_the_variable_caps_it(monkeypatch):
    monkeypatch.delenv("SSLOPS_CPU_CAPABILITY", raising=False)
    best = _extension.cpu_capability()
    assert best in LEVELS
    for name in LEVELS:
        monkeypatch.setenv("SSLOPS_CPU_CAPABILITY", name)
        assert _extension.cpu_capability() == LEVELS[min(LEVELS.index(name), LEVELS.index(best))]
    monkeypatch.setenv("SSLOPS_CPU_CAPABILITY", "")  # empty: as if unset
    assert _extension.cpu_capability() == best
    assert f"{best} vector loops" in sslops.backends()["cpu"]["reason"]


@pytest.mark.parametrize("value", ["AVX2", "avx-512", "sse4"])
def test_bad_value_is_an_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("SSLOPS_CPU_CAPABILITY", value)
    with pytest.raises(ValueError, match=f"SSLOPS_CPU_CAPABILITY={value} is not a CPU capability"):
        _extension.cpu_capability()
    a, b = randn(5, 3, seed=1), randn(5, 3, seed=2)
    with pytest.raises(RuntimeError, match="SSLOPS_CPU_CAPABILITY"):
        sslops.clip_loss(a, b, torch.tensor(10.0), backend="cpu")
    assert "SSLOPS_CPU_CAPABILITY" in sslops.backends()["cpu"]["reason"]


@pytest.mark.parametrize("n,k", [(97, 129), (1025, 3), (300, 17)])
@pytest.mark.parametrize("labels", [False, True])
def test_clip(level, n, k, labels):
    clip_tests.check("cpu", n, k, torch.float32, "cpu", seed=n + k, labels=labels)


def test_clip_raw_inputs_and_low_precision(level):
    clip_tests.check("cpu", 97, 19, torch.float32, "cpu", seed=3, normalize=False)
    clip_tests.check("cpu", 97, 19, torch.float64, "cpu", seed=4, labels=True)
    clip_tests.check("cpu", 97, 19, torch.bfloat16, "cpu", seed=5, grad_tol_scale=2.0)


@pytest.mark.parametrize("n,k", [(97, 129), (1025, 3), (300, 17)])
@pytest.mark.parametrize("labels", [False, True])
def test_siglip(level, n, k, labels):
    siglip_tests.check("cpu", n, k, torch.float32, "cpu", seed=n + k, labels=labels)


@pytest.mark.parametrize("scale,bias", [(1e4, -1e4), (1e-3, 50.0)])
def test_siglip_extreme_logits_and_dtypes(level, scale, bias):
    siglip_tests.check("cpu", 97, 19, torch.float32, "cpu", seed=6, scale=scale, bias=bias)
    siglip_tests.check("cpu", 97, 19, torch.float64, "cpu", seed=7, labels=True, normalize=False)
    siglip_tests.check("cpu", 97, 19, torch.bfloat16, "cpu", seed=8, grad_tol_scale=2.0)


@pytest.mark.parametrize("kind", ["two_views", "supcon", "pairs"])
@pytest.mark.parametrize("in_batch,m,decoupled", [(True, 0, False), (True, 300, True), (False, 300, "weighted"),
                                                  (True, 5, "weighted")], ids=str)
def test_info_nce_options(level, kind, in_batch, m, decoupled):
    infonce_tests.check_info_nce_options("cpu", 97, 13, m, torch.float32, "cpu", kind=kind, in_batch=in_batch,
                                        decoupled=decoupled, seed=m + 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_nt_xent_queue_dtypes(level, dtype):
    low = dtype == torch.float16
    infonce_tests.check_nt_xent_options("cpu", 37, 19, 4097, dtype, "cpu", in_batch=False, seed=5,
                                       grad_tol_scale=2.0 if low else 1.0)
    infonce_tests.check_nt_xent_options("cpu", 37, 19, 11, dtype, "cpu", decoupled="weighted", seed=6,
                                       grad_tol_scale=2.0 if low else 1.0)


@pytest.mark.parametrize("noise", [0.3, 1.0])
def test_nt_xent_fp32_gradient_at_small_tau_within_2x_of_peers(level, noise):
    infonce_tests._check_small_tau_gradient("cpu", 0, noise, "cpu")


def test_reruns_and_thread_counts_bit_identical(level):
    z = randn(257, 24, seed=8)
    rel = infonce_tests.relation("views3", 257)
    a, b = randn(300, 40, seed=9), randn(300, 40, seed=10)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)

    def run():
        out = list(infonce_tests.kernel_loss_and_grad(z, rel, 0.1, 1.3, "cpu"))
        for fn in (lambda x, y: sslops.clip_loss(x, y, scale, backend="cpu"),
                   lambda x, y: sslops.siglip_loss(x, y, scale, bias, backend="cpu")):
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            loss = fn(x, y)
            loss.backward()
            out += [loss.detach(), x.grad, y.grad]
        return out

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        first, again = run(), run()
    finally:
        torch.set_num_threads(threads)
    for u, v, w in zip(one, first, again):
        assert torch.equal(u, v) and torch.equal(v, w)


def test_levels_agree_to_rounding(monkeypatch):
    """The same call at every level this CPU runs: equal to fp32 rounding (the loops differ only
    in vector width and fused multiply-adds), so no level can drift from the others unseen."""
    a, b = randn(513, 33, seed=11), randn(513, 33, seed=12)
    labels = torch.arange(513) % 100
    results = {}
    for name in LEVELS[: LEVELS.index(_best()) + 1]:
        monkeypatch.setenv("SSLOPS_CPU_CAPABILITY", name)
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = sslops.clip_loss(x, y, torch.tensor(14.0), labels=labels, backend="cpu") + sslops.siglip_loss(
            x, y, torch.tensor(10.0), torch.tensor(-10.0), labels=labels, backend="cpu")
        loss.backward()
        results[name] = (loss.detach(), x.grad, y.grad)
    base = results["default"]
    for name, got in results.items():
        for u, v in zip(got, base):
            torch.testing.assert_close(u, v, rtol=2e-5, atol=2e-7, msg=lambda m: f"{name} vs default: {m}")
