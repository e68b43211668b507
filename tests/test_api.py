"""The public API: exports, signatures, dtype conventions, modules, backend selection."""

import inspect

import pytest
import torch

import sslops
from sslops import reference
from tests.utils import randn

PUBLIC = [
    "vicreg_loss", "vicreg_relation_loss", "barlow_twins_loss", "info_nce_loss",
    "nt_xent_loss", "clip_loss", "siglip_loss", "matrix_log", "matrix_cross_entropy", "matrix_ssl_loss",
]


def test_exports_and_signatures():
    for name in PUBLIC:
        assert callable(getattr(sslops, name)), name
        assert getattr(sslops, name).__doc__ and len(getattr(sslops, name).__doc__) > 200, f"{name} needs a docstring with the math"
    sig = inspect.signature(sslops.vicreg_loss)
    assert list(sig.parameters)[:2] == ["z_a", "z_b"]
    assert {k: v.default for k, v in sig.parameters.items() if v.kind is v.KEYWORD_ONLY} == dict(
        sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4, gather=False, backend="auto")
    sig = inspect.signature(sslops.vicreg_relation_loss)
    assert {k: v.default for k, v in sig.parameters.items() if v.kind is v.KEYWORD_ONLY} == dict(
        labels=None, pairs=None, alpha=25.0, beta=1.0, gamma=25.0, eps=1e-4, gather=False, backend="auto")
    sig = inspect.signature(sslops.barlow_twins_loss)
    assert {k: v.default for k, v in sig.parameters.items() if v.kind is v.KEYWORD_ONLY} == dict(
        lambd=0.0051, eps=1e-5, gather=False, backend="auto")
    contrastive = dict(negatives=None, in_batch_negatives=True, decoupled=False, gather=False, backend="auto")
    sig = inspect.signature(sslops.info_nce_loss)
    assert {k: v.default for k, v in sig.parameters.items() if v.kind is v.KEYWORD_ONLY} == dict(
        labels=None, pairs=None, temperature=0.1, **contrastive)
    sig = inspect.signature(sslops.nt_xent_loss)
    assert {k: v.default for k, v in sig.parameters.items() if v.kind is v.KEYWORD_ONLY} == dict(
        temperature=0.5, **contrastive)
    sig = inspect.signature(sslops.clip_loss)
    assert list(sig.parameters)[:3] == ["z_a", "z_b", "logit_scale"]
    assert {k: v.default for k, v in sig.parameters.items() if v.kind is v.KEYWORD_ONLY} == dict(
        labels=None, normalize=True, gather=False, backend="auto")
    sig = inspect.signature(sslops.siglip_loss)
    assert list(sig.parameters)[:4] == ["z_a", "z_b", "logit_scale", "logit_bias"]
    assert {k: v.default for k, v in sig.parameters.items() if v.kind is v.KEYWORD_ONLY} == dict(
        labels=None, normalize=True, gather=False, backend="auto")
    sig = inspect.signature(sslops.matrix_ssl_loss)
    kw = {k: v.default for k, v in sig.parameters.items() if v.kind is v.KEYWORD_ONLY}
    assert {k: kw[k] for k in ("lambd", "mu", "gamma", "order", "gather", "backend")} == dict(
        lambd=1.0, mu=1.0, gamma=1.0, order=4, gather=False, backend="auto")
    for name in ("matrix_log", "matrix_cross_entropy"):
        kw = {k: v.default for k, v in inspect.signature(getattr(sslops, name)).parameters.items() if v.kind is v.KEYWORD_ONLY}
        assert kw["order"] == 4 and kw["method"] == "taylor"
    kw = {k: v.default for k, v in inspect.signature(sslops.matrix_cross_entropy).parameters.items() if v.kind is v.KEYWORD_ONLY}
    assert kw["backend"] == "auto" and kw["check"] == "raise"


QUEUE = randn(6, 5, seed=99)  # extra negatives of the queue cases


def _cases(dtype, seed=0):
    za, zb = randn(9, 5, dtype, seed=seed), randn(9, 5, dtype, seed=seed + 1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 4])
    pairs = torch.tensor([[0, 1, 4, 7], [3, 5, 2, 8]])
    q = torch.eye(5, dtype=dtype) + 0.1 * randn(5, 5, dtype, seed=seed + 2)
    p = randn(5, 5, dtype, seed=seed + 3)
    return [
        ("vicreg", lambda **kw: sslops.vicreg_loss(za, zb, **kw), lambda t: reference.vicreg_loss(*t), (za, zb)),
        ("vicreg_relation", lambda **kw: sslops.vicreg_relation_loss(za, labels=labels, **kw),
         lambda t: reference.vicreg_relation_loss(t[0], labels=labels), (za,)),
        ("vicreg_relation_pairs", lambda **kw: sslops.vicreg_relation_loss(za, pairs=pairs, **kw),
         lambda t: reference.vicreg_relation_loss(t[0], pairs=pairs), (za,)),
        ("barlow", lambda **kw: sslops.barlow_twins_loss(za, zb, **kw), lambda t: reference.barlow_twins_loss(*t), (za, zb)),
        ("info_nce", lambda **kw: sslops.info_nce_loss(za, labels=labels, **kw),
         lambda t: reference.info_nce_loss(t[0], labels=labels), (za,)),
        ("info_nce_pairs", lambda **kw: sslops.info_nce_loss(za, pairs=pairs, **kw),
         lambda t: reference.info_nce_loss(t[0], pairs=pairs), (za,)),
        ("nt_xent", lambda **kw: sslops.nt_xent_loss(za, zb, **kw), lambda t: reference.nt_xent_loss(*t), (za, zb)),
        ("nt_xent_queue", lambda **kw: sslops.nt_xent_loss(za, zb, negatives=QUEUE.to(dtype), in_batch_negatives=False,
                                                           decoupled=True, **kw),
         lambda t: reference.nt_xent_loss(*t, negatives=QUEUE.to(dtype).double(), in_batch_negatives=False, decoupled=True),
         (za, zb)),
        ("clip", lambda **kw: sslops.clip_loss(za, zb, 14.0, labels=labels, **kw),
         lambda t: reference.clip_loss(*t, 14.0, labels=labels), (za, zb)),
        ("siglip", lambda **kw: sslops.siglip_loss(za, zb, 10.0, -10.0, **kw),
         lambda t: reference.siglip_loss(*t, 10.0, -10.0), (za, zb)),
        ("matrix_ssl", lambda **kw: sslops.matrix_ssl_loss(za, zb, **kw), lambda t: reference.matrix_ssl_loss(*t), (za, zb)),
        ("mce", lambda **kw: sslops.matrix_cross_entropy(p, q, **kw),
         lambda t: reference.matrix_cross_entropy(*t), (p, q)),
    ]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_every_loss_matches_reference_in_float64(backend):
    for name, public, ref, tensors in _cases(torch.float64):
        got = public(backend=backend)
        want = ref(tensors)
        assert got.dtype == torch.float64, name
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_returns_fp32_loss_and_input_dtype_grads(dtype):
    for name, public, ref, tensors in _cases(dtype, seed=5):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        # rebuild the call on the leaves: patch the closure by calling with the leaf tensors directly
        got = _call_on(name, leaves)
        assert got.dtype == torch.float32, f"{name}: loss dtype {got.dtype}"
        got.backward()
        for leaf in leaves:
            assert leaf.grad is not None and leaf.grad.dtype == dtype, name
        want = ref([t.double() for t in tensors])
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def _call_on(name, leaves):
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 4])
    pairs = torch.tensor([[0, 1, 4, 7], [3, 5, 2, 8]])
    return {
        "vicreg": lambda: sslops.vicreg_loss(*leaves),
        "vicreg_relation": lambda: sslops.vicreg_relation_loss(leaves[0], labels=labels),
        "vicreg_relation_pairs": lambda: sslops.vicreg_relation_loss(leaves[0], pairs=pairs),
        "barlow": lambda: sslops.barlow_twins_loss(*leaves),
        "info_nce": lambda: sslops.info_nce_loss(leaves[0], labels=labels),
        "info_nce_pairs": lambda: sslops.info_nce_loss(leaves[0], pairs=pairs),
        "nt_xent": lambda: sslops.nt_xent_loss(*leaves),
        "nt_xent_queue": lambda: sslops.nt_xent_loss(*leaves, negatives=QUEUE.to(leaves[0].dtype), in_batch_negatives=False,
                                                     decoupled=True),
        "clip": lambda: sslops.clip_loss(*leaves, 14.0, labels=labels),
        "siglip": lambda: sslops.siglip_loss(*leaves, 10.0, -10.0),
        "matrix_ssl": lambda: sslops.matrix_ssl_loss(*leaves),
        "mce": lambda: sslops.matrix_cross_entropy(*leaves),
    }[name]()


def test_gather_without_process_group_is_single_process():
    za, zb = randn(7, 3, seed=1), randn(7, 3, seed=2)
    assert torch.equal(sslops.vicreg_loss(za, zb, gather=True), sslops.vicreg_loss(za, zb))
    assert torch.equal(sslops.nt_xent_loss(za, zb, gather=True), sslops.nt_xent_loss(za, zb))
    assert torch.equal(sslops.matrix_ssl_loss(za, zb, gather=True), sslops.matrix_ssl_loss(za, zb))


def test_modules_hold_hyperparameters_and_match_functions():
    za, zb = randn(8, 4, seed=3), randn(8, 4, seed=4)
    labels = torch.arange(4).repeat(2)
    checks = [
        (sslops.nn.VICRegLoss(sim_coeff=10.0), sslops.vicreg_loss(za, zb, sim_coeff=10.0), (za, zb), {}),
        (sslops.nn.VICRegRelationLoss(gamma=3.0), sslops.vicreg_relation_loss(za, labels=labels, gamma=3.0), (za,), {"labels": labels}),
        (sslops.nn.BarlowTwinsLoss(lambd=5e-3), sslops.barlow_twins_loss(za, zb, lambd=5e-3), (za, zb), {}),
        (sslops.nn.InfoNCELoss(0.2), sslops.info_nce_loss(za, labels=labels, temperature=0.2), (za,), {"labels": labels}),
        (sslops.nn.NTXentLoss(0.3), sslops.nt_xent_loss(za, zb, temperature=0.3), (za, zb), {}),
        (sslops.nn.MatrixSSLLoss(gamma=2.0), sslops.matrix_ssl_loss(za, zb, gamma=2.0), (za, zb), {}),
    ]
    for module, want, args, kwargs in checks:
        assert isinstance(module, torch.nn.Module)
        torch.testing.assert_close(module(*args, **kwargs), want)
        assert "backend='auto'" in repr(module)
    exact = sslops.nn.MatrixSSLLoss(method="exact", check="off")
    torch.testing.assert_close(exact(za, zb), sslops.matrix_ssl_loss(za, zb, method="exact", check="off"))
    sym = sslops.nn.MatrixSSLLoss()(za, zb, zb, za)
    torch.testing.assert_close(sym, 0.5 * (sslops.matrix_ssl_loss(zb, zb) + sslops.matrix_ssl_loss(za, za)))


def test_backends_report():
    info = sslops.backends()
    assert set(info) == {"triton", "cuda", "cpu", "reference"}
    for name, entry in info.items():
        assert isinstance(entry["available"], bool) and entry["reason"], name
    assert info["reference"]["available"]
    if not torch.cuda.is_available():
        assert not info["cuda"]["available"] and "CUDA" in info["cuda"]["reason"] or "cuda" in info["cuda"]["reason"]


def test_environment_selects_backend(monkeypatch):
    za, zb = randn(6, 3, torch.float64, seed=7), randn(6, 3, torch.float64, seed=8)
    monkeypatch.setenv("SSLOPS_BACKEND", "reference")
    assert sslops._backend.resolve("vicreg", None, za.device) == "reference"
    torch.testing.assert_close(sslops.vicreg_loss(za, zb), reference.vicreg_loss(za, zb))
    # an explicit argument wins over the environment
    monkeypatch.setenv("SSLOPS_BACKEND", "cuda")
    assert sslops._backend.resolve("vicreg", "reference", za.device) == "reference"


def test_auto_never_picks_unverified_gpu_kernels_or_interpreted_triton():
    for loss in ("vicreg", "vicreg_relation", "barlow_twins", "info_nce", "matrix_ssl", "matrix_cross_entropy"):
        assert sslops._backend.resolve(loss, "auto", torch.device("cpu")) in ("cpu", "reference")
        kernels = sslops._backend._KERNELS[loss]
        order = sslops._backend._auto_order(loss, torch.device("cuda"), ((64, 64),))
        assert ("cuda" in order) <= kernels.cuda_verified and ("triton" in order) <= kernels.triton_verified, (loss, order)


def test_auto_filter_applies_to_prefer_hooks(monkeypatch):
    kernels = sslops._backend.KernelSet({"triton": None, "cuda": None, "cpu": None}, prefer=lambda d, s: ["cuda", "triton"])
    monkeypatch.setitem(sslops._backend._KERNELS, "probe", kernels)
    assert sslops._backend._auto_order("probe", torch.device("cuda"), ()) == []
    kernels.triton_verified = True
    assert sslops._backend._auto_order("probe", torch.device("cuda"), ()) == ["triton"]
    kernels.cuda_verified = True
    assert sslops._backend._auto_order("probe", torch.device("cuda"), ()) == ["cuda", "triton"]


def test_public_api_compiles_fullgraph():
    """Backend choice is plain Python on cached values: the public losses trace without graph breaks."""
    za = randn(12, 6, seed=11).requires_grad_(True)
    zb = randn(12, 6, seed=12)
    labels = torch.arange(6).repeat(2)
    for name, fn in (("vicreg", lambda a: sslops.vicreg_loss(a, zb)),
                     ("info_nce", lambda a: sslops.info_nce_loss(a, labels=labels))):
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got = compiled(za)
        (g_got,) = torch.autograd.grad(got, za)
        want = fn(za)
        (g_want,) = torch.autograd.grad(want, za)
        torch.testing.assert_close(got, want, msg=name)
        torch.testing.assert_close(g_got, g_want, msg=name)


@pytest.mark.parametrize("loss", ["info_nce", "vicreg_relation"])
def test_pairs_compile_fullgraph_and_out_of_range_gives_nan(loss):
    """Under torch.compile the pair range is checked in the graph (no host sync): valid pairs
    give the eager loss and gradient; an out-of-range index gives NaN, never a wrong number or
    an out-of-bounds read. Eagerly the same input raises."""
    n = 11
    z = randn(n, 5, seed=21).requires_grad_(True)
    fn = {"info_nce": lambda a, p: sslops.info_nce_loss(a, pairs=p),
          "vicreg_relation": lambda a, p: sslops.vicreg_relation_loss(a, pairs=p)}[loss]
    good = torch.tensor([[0, 1, 4, 7, 3], [3, 5, 2, 10, 3]])
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(z, good)
    want = fn(z, good)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, z)[0], torch.autograd.grad(want, z)[0])
    for bad in (torch.tensor([[0, 1], [3, n]]), torch.tensor([[0, -1], [3, 4]])):
        assert torch.isnan(compiled(z, bad))
        with pytest.raises(ValueError, match="pairs must hold indices"):
            fn(z, bad)


def test_bad_backend_raises_also_for_the_exact_methods():
    """backend= is checked before method picks a route that ignores it (eigh / exact)."""
    p, z = randn(8, 3, seed=1), randn(8, 3, seed=2)
    q = torch.eye(3) * 0.9
    with pytest.raises(ValueError, match="backend must be one of"):
        sslops.matrix_cross_entropy(q * 0.5, q, method="eigh", backend="bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        sslops.matrix_ssl_loss(p, z, method="exact", backend="bogus")
