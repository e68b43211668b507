"""VICReg (two views and relation form): every kernel backend against the float64 reference.

Default lane: the C++ CPU kernels (both routes, every dtype, odd shapes, opcheck, gradcheck,
torch.compile, autocast). Interpreter lane (-m triton, TRITON_INTERPRET=1): the Triton
kernels at tiny shapes. GPU lane (-m gpu): Triton at large shapes, TF32 vs IEEE, reruns.
"""

import pytest
import torch

import sslops
from sslops import reference
from sslops.ops import covariance as cov_ops
from tests.utils import TOLERANCES, assert_kernel_within_rule, noncontiguous, randn

HAVE_CPU = sslops._extension.LOADED

CPU = pytest.param("cpu", marks=pytest.mark.skipif(not HAVE_CPU, reason="sslops._C not built"))
TRITON = pytest.param("triton", marks=pytest.mark.triton)

# (N, K): K > N (Gram route by shape), K < N (K×K route), K = 1, tiny N
CPU_SHAPES = [(2, 3), (3, 1), (97, 129), (1025, 3), (97, 3), (3, 129), (1025, 129)]
TRITON_SHAPES = [(2, 3), (3, 1), (17, 40), (40, 17), (33, 33)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _shapes(backend):
    return CPU_SHAPES if backend == "cpu" else TRITON_SHAPES


def _cases(dtypes=DTYPES):
    out = []
    for b in (CPU, TRITON):
        for n, k in _shapes(b.values[0]):
            for dt in dtypes:
                out.append(pytest.param(b.values[0], n, k, dt, marks=b.marks, id=f"{b.values[0]}-{n}x{k}-{str(dt)[6:]}"))
    return out


def _rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _check(value, ref, dtype, what, scale=1.0):
    """Elementwise per-dtype tolerance against the float64 reference, scaled to the reference's size."""
    atol, rtol = TOLERANCES[dtype]
    mag = max(1.0, ref.double().abs().max().item())
    torch.testing.assert_close(value.double().cpu(), ref.double().cpu(), atol=atol * scale * mag, rtol=rtol * scale,
                               msg=lambda m: f"{what}: {m}")


def _two_view_inputs(n, k, dtype, device, seed):
    z_a = randn(n, k, dtype, device, seed=seed, scale=0.7, shift=0.5)
    z_b = (z_a.double().cpu() + randn(n, k, torch.float64, seed=seed + 1, scale=0.3)).to(device=device, dtype=dtype)
    return z_a, z_b


def _grads(fn, tensors, grad_out=1.7):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss.backward(torch.tensor(grad_out, dtype=loss.dtype, device=loss.device))
    return loss.detach(), [t.grad for t in leaves]


# ----------------------------------------------------------------------------- two-view VICReg


@pytest.mark.parametrize("backend,n,k,dtype", _cases())
@pytest.mark.parametrize("route", [0, 1, 2])
def test_vicreg_matches_reference(backend, n, k, dtype, route, device):
    z_a, z_b = _two_view_inputs(n, k, dtype, device, seed=n * 31 + k)
    params = dict(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4)
    fn = cov_ops._vicreg(backend, route)
    loss, (ga, gb) = _grads(lambda a, b: fn(a, b, **params), (z_a, z_b))
    ref, (ra, rb) = _grads(lambda a, b: reference.vicreg_loss(a, b, **params), (z_a.double(), z_b.double()))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ga.dtype == dtype and gb.dtype == dtype
    _check(loss, ref, dtype, "loss")
    _check(ga, ra, dtype, "grad z_a")
    _check(gb, rb, dtype, "grad z_b")
    assert _rel_err(ga, ra) < (1e-10 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("backend", [CPU, TRITON])
def test_vicreg_public_api_noncontiguous_and_grad_out(backend, device):
    z_a, z_b = _two_view_inputs(19, 23, torch.float32, device, seed=5)
    nc_a, nc_b = noncontiguous(z_a), noncontiguous(z_b)
    loss, (ga, gb) = _grads(lambda a, b: sslops.vicreg_loss(a, b, sim_coeff=3.0, std_coeff=7.0, cov_coeff=2.0, backend=backend),
                            (nc_a, nc_b), grad_out=-0.37)
    ref, (ra, rb) = _grads(lambda a, b: reference.vicreg_loss(a, b, 3.0, 7.0, 2.0), (z_a.double(), z_b.double()), grad_out=-0.37)
    _check(loss, ref, torch.float32, "loss")
    _check(ga, ra, torch.float32, "grad z_a")
    _check(gb, rb, torch.float32, "grad z_b")


@pytest.mark.parametrize("backend", [CPU, TRITON])
def test_vicreg_zero_variance_columns_and_hinge_boundary(backend, device):
    z_a, z_b = _two_view_inputs(12, 9, torch.float64, device, seed=9)
    z_a[:, 2] = 3.0  # constant column: var 0, std sqrt(eps)
    z_b[:, 4] = -1.0
    z_a[:, 5] *= 10.0  # std > 1: hinge inactive
    loss, (ga, gb) = _grads(lambda a, b: sslops.vicreg_loss(a, b, backend=backend), (z_a, z_b))
    ref, (ra, rb) = _grads(lambda a, b: reference.vicreg_loss(a, b), (z_a, z_b))
    _check(loss, ref, torch.float64, "loss")
    _check(ga, ra, torch.float64, "grad z_a")
    _check(gb, rb, torch.float64, "grad z_b")


@pytest.mark.parametrize("backend", [CPU, TRITON])
def test_vicreg_nan_propagates(backend, device):
    z_a, z_b = _two_view_inputs(6, 5, torch.float32, device, seed=2)
    z_a[3, 1] = float("nan")
    assert torch.isnan(sslops.vicreg_loss(z_a, z_b, backend=backend))
    assert torch.isnan(sslops.vicreg_relation_loss(z_a, labels=torch.arange(6, device=device) % 2, backend=backend))


@pytest.mark.parametrize("backend", [CPU, TRITON])
def test_vicreg_fp16_large_values_do_not_overflow_products(backend, device):
    """Gram entries Σ_k Â_ik Â_jk (~K·σ²/(N-1) ≈ 9e4 here) pass fp16's range (65504) although
    the inputs and the gradients (~3e4) fit."""
    z_a, z_b = _two_view_inputs(8, 400, torch.float64, device, seed=21)
    z_a, z_b = (z_a * 40 / 0.7).half(), (z_b * 40 / 0.7).half()  # σ ≈ 40
    fn = cov_ops._vicreg(backend, 2)
    loss, (ga, gb) = _grads(lambda a, b: fn(a, b, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4), (z_a, z_b))
    ref, (ra, rb) = _grads(lambda a, b: reference.vicreg_loss(a, b), (z_a.double(), z_b.double()))
    assert torch.isfinite(ga.float()).all() and torch.isfinite(gb.float()).all()
    assert abs(loss.item() - ref.item()) <= 1e-3 * abs(ref.item())
    assert _rel_err(ga, ra) < 1e-2 and _rel_err(gb, rb) < 1e-2


def test_vicreg_large_mean_is_centred_accurately():
    if not HAVE_CPU:
        pytest.skip("sslops._C not built")
    z_a, z_b = _two_view_inputs(64, 50, torch.float32, "cpu", seed=4)
    z_a, z_b = z_a + 1000.0, z_b - 500.0
    loss = sslops.vicreg_loss(z_a, z_b, backend="cpu")
    ref = reference.vicreg_loss(z_a.double(), z_b.double())
    _check(loss, ref, torch.float32, "loss", scale=3.0)


@pytest.mark.skipif(not HAVE_CPU, reason="sslops._C not built")
@pytest.mark.parametrize("n,shift", [(32768, 0.0), (256, 1e5), (4097, 1e5)])
def test_cpu_fp32_error_within_2x_of_naive_at_large_n_and_mean(n, shift):
    """Column sums in one fp32 running total lost precision with N and with |mean|/std
    (issue: Barlow Twins 700× and 50× farther from float64 than plain fp32 PyTorch; VICReg the
    same pattern): the two-view loss and its gradients within 2× of naive fp32, and the
    relation form's at N = 256 (where group means of values near 1e5 lost 60×)."""
    z_a, z_b = _two_view_inputs(n, 128, torch.float64, "cpu", seed=n)
    z_a, z_b = (z_a + shift).float(), (z_b + shift).float()
    assert_kernel_within_rule(lambda a, b: sslops.vicreg_loss(a, b, backend="cpu"), reference.vicreg_loss, (z_a, z_b),
                              grad_out=1.3, what=f"vicreg N={n} shift={shift:g}")
    if n <= 256:  # the reference's relation is dense: N²·K pairwise differences
        labels = torch.arange(n) // 2
        assert_kernel_within_rule(lambda z: sslops.vicreg_relation_loss(z, labels=labels, backend="cpu"),
                                  lambda z: reference.vicreg_relation_loss(z, labels=labels), (z_a,), grad_out=0.7,
                                  what=f"vicreg_relation N={n} shift={shift:g}")


# ----------------------------------------------------------------------------- invariance MSE (fused in the forward)


def _view_forward(backend, z, other, route=0, save=False):
    """The per-view forward kernel of a backend: (terms (3,), mean, m2, prod)."""
    return cov_ops._kernels(backend).vicreg_view_forward(z, other, 1e-4, route or cov_ops.vicreg_route(*z.shape), save)


# odd N, K; one shape per route; under the interpreter sizes straddling the 16-wide blocks
MSE_SHAPES = {"cpu": [(97, 129), (1025, 3), (3, 1)], "triton": [(17, 40), (33, 33)]}
MSE_DTYPES = [torch.float64, torch.float32, torch.bfloat16]
MSE_REL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6}  # inputs exact in the dtype: accumulation only


def _mse_cases():
    out = []
    for b in (CPU, TRITON):
        for n, k in MSE_SHAPES[b.values[0]]:
            for dt in MSE_DTYPES:
                out.append(pytest.param(b.values[0], n, k, dt, marks=b.marks, id=f"{b.values[0]}-{n}x{k}-{str(dt)[6:]}"))
    return out


@pytest.mark.parametrize("backend,n,k,dtype", _mse_cases())
@pytest.mark.parametrize("coeffs", [(25.0, 0.0, 0.0), (100.0, 0.5, 0.02)], ids=["inv-only", "inv-dominant"])
def test_vicreg_invariance_mse_fused_in_forward(backend, n, k, dtype, coeffs, device):
    """Loss dominated by (or made only of) the invariance MSE, z_b non-contiguous, against float64."""
    z_a, z_b = _two_view_inputs(n, k, dtype, device, seed=3 * n + k)
    z_b = noncontiguous((z_b.double() * 1.5 - 0.25).to(dtype))  # larger differences, shifted
    sim, std, cov = coeffs
    params = dict(sim_coeff=sim, std_coeff=std, cov_coeff=cov, eps=1e-4)
    loss, (ga, gb) = _grads(lambda a, b: sslops.vicreg_loss(a, b, backend=backend, **params), (z_a, z_b), grad_out=-0.8)
    ref, (ra, rb) = _grads(lambda a, b: reference.vicreg_loss(a, b, **params), (z_a.double(), z_b.double()), grad_out=-0.8)
    rel = abs(loss.double().item() - ref.item()) / abs(ref.item())
    limit = MSE_REL[dtype] * (1.0 if coeffs[1] == 0.0 else 50.0)  # the var/cov terms carry their own rounding
    assert rel < limit, f"loss {loss.item()} vs {ref.item()} (rel {rel:.2e})"
    _check(ga, ra, dtype, "grad z_a")
    _check(gb, rb, dtype, "grad z_b")
    # the fused sum itself, against Σ(z_a - z_b)² in float64
    terms = _view_forward(backend, z_a, z_b)[0]
    want = (z_a.double() - z_b.double()).pow(2).sum()
    assert abs(terms[2].double().item() - want.item()) <= MSE_REL[dtype] * want.item()
    assert _view_forward(backend, z_b, None)[0][2].item() == 0.0


@pytest.mark.parametrize("backend", [CPU, TRITON])
def test_vicreg_nan_in_second_view_only(backend, device):
    z_a, z_b = _two_view_inputs(9, 7, torch.float32, device, seed=13)
    z_b[4, 6] = float("nan")
    assert torch.isnan(sslops.vicreg_loss(z_a, z_b, backend=backend))
    assert torch.isnan(sslops.vicreg_loss(z_a, z_b, sim_coeff=1.0, std_coeff=0.0, cov_coeff=0.0, backend=backend))
    terms = _view_forward(backend, z_a, z_b)[0]  # z_a's own terms stay finite, the fused sum is NaN
    assert torch.isfinite(terms[:2]).all() and torch.isnan(terms[2])


@pytest.mark.parametrize("backend", [CPU, TRITON])
def test_vicreg_fused_sum_is_deterministic(backend, device):
    z_a, z_b = _two_view_inputs(41, 37, torch.float32, device, seed=17)
    first = _view_forward(backend, z_a, z_b)[0]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the CPU kernel splits columns between threads: the sum must not depend on it
        again = _view_forward(backend, z_a, z_b)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[2], again[2])


# ----------------------------------------------------------------------------- relation form


def _relations(n, device, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, max(1, n // 3), (n,), generator=g).to(device)
    p = max(1, 2 * n)
    pairs = torch.randint(0, n, (2, p), generator=g)
    pairs = torch.cat([pairs, pairs[:, :3], torch.tensor([[0], [0]])], dim=1).to(device)  # duplicates and a self-pair
    return {"labels": labels, "pairs": pairs}


@pytest.mark.parametrize("backend,n,k,dtype", _cases())
@pytest.mark.parametrize("relation", ["labels", "pairs"])
def test_vicreg_relation_matches_reference(backend, n, k, dtype, relation, device):
    z = randn(n, k, dtype, device, seed=n + 7 * k, scale=0.8, shift=-0.3)
    rel = {relation: _relations(n, device, seed=n)[relation]}
    params = dict(alpha=25.0, beta=1.0, gamma=25.0, eps=1e-4)
    loss, (gz,) = _grads(lambda x: sslops.vicreg_relation_loss(x, backend=backend, **rel, **params), (z,), grad_out=0.61)
    rel64 = {key: val.cpu() for key, val in rel.items()}
    ref, (rz,) = _grads(lambda x: reference.vicreg_relation_loss(x, **rel64, **params), (z.double().cpu(),), grad_out=0.61)
    assert gz.dtype == dtype
    _check(loss, ref, dtype, "loss")
    _check(gz, rz, dtype, "grad z")


@pytest.mark.parametrize("backend", [CPU, TRITON])
@pytest.mark.parametrize("route", [1, 2])
def test_vicreg_relation_routes_and_empty_relation(backend, route, device):
    z = randn(11, 13, torch.float64, device, seed=1)
    fn = cov_ops._vicreg_relation(backend, route)
    labels = torch.arange(11, device=device)  # every label distinct: G empty, inv = 0
    params = dict(alpha=2.0, beta=3.0, gamma=5.0, eps=1e-4)
    loss, (gz,) = _grads(lambda x: fn(x, labels, None, **params), (z,))
    ref, (rz,) = _grads(lambda x: reference.vicreg_relation_loss(x, labels=labels.cpu(), **params), (z.cpu(),))
    _check(loss, ref, torch.float64, "loss")
    _check(gz, rz, torch.float64, "grad z")


def test_relation_two_view_identity():
    """z = [z_a; z_b] paired row i with row i + N: inv equals the two-view MSE."""
    z_a, z_b = _two_view_inputs(8, 6, torch.float64, "cpu", seed=3)
    n = z_a.shape[0]
    pairs = torch.stack([torch.arange(n), torch.arange(n) + n])
    total, nnz = cov_ops._relation_invariance(torch.cat([z_a, z_b]), None, pairs)
    mse = (z_a - z_b).pow(2).mean()
    torch.testing.assert_close(total / (nnz * z_a.shape[1]), mse)
    labels = torch.arange(n).repeat(2)
    total_l, nnz_l = cov_ops._relation_invariance(torch.cat([z_a, z_b]), labels, None)
    torch.testing.assert_close(total_l / (nnz_l * z_a.shape[1]), mse)


# ----------------------------------------------------------------------------- relation invariance op (O(nnz·K) memory-light)


def _dense_invariance(z64, labels=None, pairs=None):
    """Float64 oracle: Σ_ij G_ij‖z_i - z_j‖² with the dense G of reference.relation_matrix, and nnz(G)."""
    g = reference.relation_matrix(z64.shape[0], labels=labels, pairs=pairs).to(z64.dtype)
    d2 = (z64[:, None, :] - z64[None, :, :]).pow(2).sum(dim=-1)
    return (g * d2).sum(), g.sum()


def _invariance_relations():
    """(name, n, labels, pairs): every grouping and pair-list corner the op must handle."""
    g = torch.Generator().manual_seed(5)
    cases = []
    cases.append(("two-views", 26, torch.arange(13).repeat(2), None))
    cases.append(("three-views", 27, torch.arange(9).repeat(3)[torch.randperm(27, generator=g)], None))
    supcon = torch.randint(0, 4, (31,), generator=g)
    supcon[[2, 9, 30]] = torch.tensor([100, 101, -7])  # lone anchors: groups of one, no pair
    cases.append(("supcon-lone", 31, supcon.to(torch.int32), None))
    cases.append(("all-unique", 19, torch.randperm(19, generator=g), None))
    rnd = torch.randint(0, 29, (2, 70), generator=g)
    dup = torch.cat([rnd, rnd[:, :9], rnd[[1, 0], 10:15], torch.tensor([[4, 4, 7], [4, 5, 7]])], dim=1)  # repeats, reversed, self
    cases.append(("pairs-dup-self-both", 29, None, dup))
    cases.append(("pairs-only-self", 8, None, torch.tensor([[1, 3], [1, 3]])))
    cases.append(("pairs-empty", 9, None, torch.zeros((2, 0), dtype=torch.int64)))
    return [pytest.param(n, lab, pr, id=name) for name, n, lab, pr in cases]


@pytest.mark.parametrize("n,labels,pairs", _invariance_relations())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", ["default", "small"])
def test_relation_invariance_op_matches_dense(monkeypatch, n, labels, pairs, dtype, chunk):
    """The custom op against the dense float64 Σ G_ij‖z_i - z_j‖²: forward (total, nnz) and
    the gradient at grad_output 0.37, non-contiguous z; "small" chunks run several chunks."""
    k = 13
    if chunk == "small":  # 3 rows or pairs per chunk whatever the accumulation dtype
        monkeypatch.setattr(cov_ops, "_RELATION_CHUNK_BYTES", 3 * k * (8 if dtype == torch.float64 else 4))
    z = noncontiguous(randn(n, k, dtype, seed=n + 3, scale=0.9, shift=1.5))
    leaf = z.detach().clone().requires_grad_()
    total, nnz = cov_ops._relation_invariance(leaf, labels, pairs)
    total.backward(torch.tensor(0.37, dtype=total.dtype))
    assert total.dtype == nnz.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert leaf.grad.dtype == dtype and leaf.grad.shape == (n, k)
    z64 = z.double().requires_grad_()
    ref, ref_nnz = _dense_invariance(z64, labels, pairs)
    ref.backward(torch.tensor(0.37, dtype=torch.float64))
    assert nnz.item() == ref_nnz.item()
    atol, rtol = TOLERANCES[dtype if dtype == torch.float64 else torch.float32]
    torch.testing.assert_close(total.double(), ref.detach(), atol=atol * max(1.0, ref.item()), rtol=rtol)
    _check(leaf.grad, z64.grad, dtype, "grad z")
    if ref_nnz.item() == 0:
        assert total.item() == 0 and not leaf.grad.any()


def test_relation_invariance_gradient_formula_matches_old_autograd():
    """The label backward's closed form 4m_g(z_i - μ_g) against autograd of the previous
    differentiable torch formula (centred on group means), float64."""
    z = randn(23, 7, torch.float64, seed=21, shift=2.0).requires_grad_()
    labels = torch.tensor([0, 1, 2, 0, 1, 5, 0, 9, 9, 1, 2, 3, 3, 3, 3, 0, 4, 6, 6, 7, 8, 2, 1])
    gid = torch.searchsorted(torch.sort(labels).values, labels)
    count = torch.zeros(23, dtype=torch.float64).index_add_(0, gid, torch.ones(23, dtype=torch.float64))
    m = count[gid]
    centred = z - torch.zeros_like(z).index_add(0, gid, z)[gid] / m[:, None]
    old = (2.0 * m * centred.pow(2).sum(dim=1)).sum()
    (g_old,) = torch.autograd.grad(old * 1.3, z)
    total, nnz = cov_ops._relation_invariance(z, labels, None)
    (g_new,) = torch.autograd.grad(total * 1.3, z)
    torch.testing.assert_close(total, old, rtol=1e-13, atol=0)
    assert nnz.item() == (m - 1).sum().item()
    torch.testing.assert_close(g_new, g_old, rtol=1e-12, atol=1e-12)


def test_relation_invariance_centred_on_group_means():
    """A large common offset (1e4) on small spreads (1e-2) in fp32: rows taken relative to a
    sample of their group (exact differences) and centred on those differences' means keep
    fp32 accuracy (centring on fp32 group means of the raw values left (ulp(1e4)/spread)² ~ 1e-3),
    where 2mΣ‖z‖² - 2‖Σz‖² would cancel to noise (shown on the same inputs)."""
    z = (randn(40, 9, torch.float64, seed=4, scale=1e-2) + 1e4).float()
    labels = torch.arange(10).repeat(4)
    ref, _ = _dense_invariance(z.double(), labels=labels)  # exact pairwise differences of the fp32 values
    total, _ = cov_ops._relation_invariance(z, labels, None)
    torch.testing.assert_close(total.double(), ref, rtol=1e-5, atol=0)
    gid = torch.searchsorted(torch.sort(labels).values, labels)
    sums = torch.zeros_like(z).index_add_(0, gid, z)
    m = torch.zeros(40).index_add_(0, gid, torch.ones(40))
    cancelling = 2 * (m[gid] * z.pow(2).sum(1)).sum() - 2 * (sums.pow(2).sum(1)).sum()
    assert abs(cancelling.item() - ref.item()) > 10 * abs(total.item() - ref.item())


@pytest.mark.parametrize("relation", ["labels", "pairs"])
def test_relation_invariance_nan_and_cpu_determinism(relation):
    z = randn(12, 5, torch.float32, seed=8)
    rel = (torch.arange(6).repeat(2), None) if relation == "labels" else (None, torch.tensor([[0, 1, 3, 3], [6, 2, 3, 9]]))
    grads = []
    for _ in range(2):
        leaf = z.clone().requires_grad_()
        total, _ = cov_ops._relation_invariance(leaf, *rel)
        total.backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])
    z[0, 2] = float("nan")
    leaf = z.clone().requires_grad_()
    total, _ = cov_ops._relation_invariance(leaf, *rel)
    total.backward()
    assert torch.isnan(total)
    assert torch.isnan(leaf.grad[0, 2]) and torch.isnan(leaf.grad[6, 2])  # row 0's partner (group or pair) too


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("relation", ["labels", "pairs"])
def test_opcheck_relation_invariance_ops(monkeypatch, requires_grad, relation):
    monkeypatch.setattr(cov_ops, "_RELATION_CHUNK_BYTES", 2 * 6 * 4)  # 2 rows per chunk
    z = randn(9, 6, torch.float32, seed=2).requires_grad_(requires_grad)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 7, 2, 3]) if relation == "labels" else None
    pairs = torch.tensor([[0, 1, 4, 4, 8, 2], [3, 1, 5, 5, 2, 8]]) if relation == "pairs" else None
    torch.library.opcheck(cov_ops.relation_invariance_fwd, (z, labels, pairs))
    zd = z.detach()
    _, _, rows, cols, weight, mean = cov_ops.relation_invariance_fwd(zd, labels, pairs)
    torch.library.opcheck(cov_ops.relation_invariance_bwd,
                          (torch.tensor(0.6), noncontiguous(zd), rows, cols, weight, mean, relation == "labels"))


@pytest.mark.parametrize("relation", ["labels", "pairs"])
def test_gradcheck_relation_invariance_float64(monkeypatch, relation):
    monkeypatch.setattr(cov_ops, "_RELATION_CHUNK_BYTES", 3 * 4 * 8)
    z = randn(10, 4, torch.float64, seed=13).requires_grad_()
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 7, 2, 2, 2]) if relation == "labels" else None
    pairs = torch.tensor([[0, 1, 4, 5, 9, 2, 3], [3, 1, 5, 4, 2, 9, 7]]) if relation == "pairs" else None
    assert torch.autograd.gradcheck(lambda x: cov_ops._relation_invariance(x, labels, pairs)[0], (z,))


@pytest.mark.skipif(not HAVE_CPU, reason="sslops._C not built")
def test_torch_compile_fullgraph_relation_pairs():
    """The pairs path compiled (labels: test_torch_compile_fullgraph, through the public API).
    Here the backend entry, past sslops.vicreg_relation_loss: its pair-index validation reads
    values (a data-dependent guard under fullgraph), the op itself traces."""
    z = randn(15, 9, torch.float32, seed=17, shift=0.4)
    pairs = torch.tensor([[0, 1, 2, 3, 3, 14, 6], [7, 8, 9, 10, 10, 0, 6]])
    fn = cov_ops._vicreg_relation("cpu")
    params = dict(alpha=25.0, beta=1.0, gamma=25.0, eps=1e-4)
    compiled = torch.compile(lambda x: fn(x, None, pairs, **params), fullgraph=True, backend="aot_eager")
    loss, (gz,) = _grads(compiled, (z,), grad_out=0.45)
    ref, (rz,) = _grads(lambda x: reference.vicreg_relation_loss(x, pairs=pairs, **params), (z.double(),), grad_out=0.45)
    _check(loss, ref, torch.float32, "loss")
    _check(gz, rz, torch.float32, "grad z")


@pytest.mark.parametrize("relation", ["labels", "pairs"])
def test_relation_invariance_peak_memory_cpu(monkeypatch, relation):
    """Forward + backward of the invariance term alone at N = 4096, K = 512 fp32, peak bytes
    above the inputs by the benchmark harness's profiler walk. Labels: the saved group means,
    the gradient and one chunk's gather — at most 3 N×K fp32 buffers (the previous autograd
    version peaked at 4). Pairs (4N random pairs, 512-pair chunks): the fp32 gradient plus
    chunk temporaries, at most 1.5 N×K (previously 32: both directions' gathers kept)."""
    from benchmarks.common import peak_bytes_cpu

    n, k = 4096, 512
    z = randn(n, k, torch.float32, seed=3).requires_grad_()
    if relation == "labels":
        rel, limit = (torch.arange(n // 2).repeat(2), None), 3.0
    else:
        monkeypatch.setattr(cov_ops, "_RELATION_CHUNK_BYTES", 512 * k * 4)
        g = torch.Generator().manual_seed(0)
        rel, limit = (None, torch.randint(0, n, (2, 4 * n), generator=g)), 1.5

    def step():
        total, nnz = cov_ops._relation_invariance(z, *rel)
        (total / nnz).backward(torch.tensor(0.8))

    peak = peak_bytes_cpu(step)
    assert z.grad is not None and torch.isfinite(z.grad).all()
    buffer = n * k * 4
    small = 64 * (n + 4 * n) + (1 << 16)  # index/weight vectors of N or P entries, scalars
    assert peak <= limit * buffer + small, f"peak {peak / buffer:.2f} N×K fp32 buffers"


# ----------------------------------------------------------------------------- op registrations (default lane)

needs_cpu = pytest.mark.skipif(not HAVE_CPU, reason="sslops._C not built")


@needs_cpu
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("route", [1, 2])
@pytest.mark.parametrize("save", [False, True])
def test_opcheck_vicreg_ops(requires_grad, route, save):
    z_a, z_b = _two_view_inputs(7, 9, torch.float32, "cpu", seed=6)
    z_a.requires_grad_(requires_grad)
    z_b.requires_grad_(requires_grad)
    torch.library.opcheck(cov_ops.vicreg_fwd, (z_a, z_b, 25.0, 25.0, 1.0, 1e-4, "cpu", route, save))
    torch.library.opcheck(cov_ops.vicreg_varcov_fwd, (z_a, 1e-4, "cpu", route, save))
    a, b = z_a.detach(), z_b.detach()
    _, mean_a, m2_a, prod_a, mean_b, m2_b, prod_b = cov_ops.vicreg_fwd(a, b, 25.0, 25.0, 1.0, 1e-4, "cpu", route, save)
    assert prod_a.shape == ((0, 0) if not save else (7, 7) if route == 2 else (9, 9))
    grad = torch.tensor(0.8)
    torch.library.opcheck(cov_ops.vicreg_bwd, (grad, a, b, mean_a, m2_a, prod_a, mean_b, m2_b, prod_b, 25.0, 25.0, 1.0, 1e-4, "cpu", route))
    torch.library.opcheck(cov_ops.vicreg_varcov_bwd, (torch.tensor([0.3, -1.2, 0.9]), a, mean_a, m2_a, prod_a, 1e-4, "cpu", route))
    # the C++ per-view op, with and without the fused invariance input (z_b non-contiguous)
    view = torch.ops.sslops.vicreg_view_forward_cxx.default
    for other in (noncontiguous(b), None):
        torch.library.opcheck(view, (a, other, 1e-4, route, save), test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.parametrize("backend", [CPU, TRITON])
@pytest.mark.parametrize("route", [1, 2])
def test_backward_without_saved_product_matches(backend, route, device):
    """The backward recomputes the product when the forward did not save it (save=False)."""
    z_a, z_b = _two_view_inputs(9, 6, torch.float64, device, seed=12)
    outs = {}
    for save in (False, True):
        _, mean_a, m2_a, prod_a, mean_b, m2_b, prod_b = cov_ops.vicreg_fwd(z_a, z_b, 2.0, 3.0, 4.0, 1e-4, backend, route, save)
        outs[save] = cov_ops.vicreg_bwd(torch.tensor(1.5, dtype=torch.float64, device=device), z_a, z_b, mean_a, m2_a, prod_a, mean_b, m2_b,
                                        prod_b, 2.0, 3.0, 4.0, 1e-4, backend, route)
    for x, y in zip(outs[False], outs[True]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@needs_cpu
@pytest.mark.parametrize("route", [1, 2])
def test_gradcheck_float64(route):
    z_a, z_b = _two_view_inputs(5, 4, torch.float64, "cpu", seed=8)
    z_a.requires_grad_()
    z_b.requires_grad_()
    fn = cov_ops._vicreg("cpu", route)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, sim_coeff=2.0, std_coeff=3.0, cov_coeff=1.5, eps=1e-4), (z_a, z_b))
    rel = cov_ops._vicreg_relation("cpu", route)
    labels = torch.tensor([0, 1, 0, 1, 1])
    assert torch.autograd.gradcheck(lambda a: rel(a, labels, None, alpha=2.0, beta=3.0, gamma=1.5, eps=1e-4), (z_a,))


@needs_cpu
def test_torch_compile_fullgraph():
    z_a, z_b = _two_view_inputs(10, 14, torch.float32, "cpu", seed=11)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3])

    def f(a, b):
        return sslops.vicreg_loss(a, b, backend="cpu") + sslops.vicreg_relation_loss(a, labels=labels, backend="cpu")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss, (ga, gb) = _grads(compiled, (z_a, z_b))
    ref, (ra, rb) = _grads(lambda a, b: reference.vicreg_loss(a, b) + reference.vicreg_relation_loss(a, labels=labels),
                           (z_a.double(), z_b.double()))
    _check(loss, ref, torch.float32, "loss")
    _check(ga, ra, torch.float32, "grad z_a")
    _check(gb, rb, torch.float32, "grad z_b")


@needs_cpu
def test_autocast_bf16():
    lin = torch.nn.Linear(8, 12).double().float()
    x_a, x_b = randn(16, 8, seed=1), randn(16, 8, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_a, z_b = lin(x_a), lin(x_b)
        assert z_a.dtype == torch.bfloat16
        loss = sslops.vicreg_loss(z_a, z_b, backend="cpu")
    assert loss.dtype == torch.float32
    loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    ref = reference.vicreg_loss(z_a.double(), z_b.double())
    _check(loss.detach(), ref.detach(), torch.bfloat16, "loss")


@needs_cpu
def test_auto_picks_cpu_kernels_on_cpu():
    from sslops import _backend

    assert _backend.resolve("vicreg", "auto", torch.device("cpu"), ((512, 4096), (512, 4096))) == "cpu"
    assert _backend.resolve("vicreg_relation", "auto", torch.device("cpu"), ((512, 4096),)) == "cpu"


def test_dot_precision_setting(monkeypatch):
    cov_ops.set_dot_precision(None)
    monkeypatch.setenv("SSLOPS_DOT_PRECISION", "tf32")
    assert cov_ops.dot_precision() == "tf32"
    cov_ops.set_dot_precision("ieee")
    assert cov_ops.dot_precision() == "ieee"
    cov_ops.set_dot_precision(None)
    with pytest.raises(ValueError, match="precision"):
        cov_ops.set_dot_precision("fp8")


# ----------------------------------------------------------------------------- Triton, rows split into chunks


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("route", [1, 2])
def test_triton_row_chunks_match_reference(monkeypatch, dtype, route, device):
    """Column statistics (with the fused invariance sum) split over 4 row chunks (10+10+10+7):
    loss and gradients against float64, and bit-identical to a rerun."""
    from sslops.triton_kernels import covariance as tc

    monkeypatch.setattr(tc, "_ROW_CHUNK", 10)
    z_a, z_b = _two_view_inputs(37, 21, dtype, device, seed=77)
    params = dict(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4)
    fn = cov_ops._vicreg("triton", route)
    loss, (ga, gb) = _grads(lambda a, b: fn(a, b, **params), (z_a, z_b), grad_out=-0.6)
    ref, (ra, rb) = _grads(lambda a, b: reference.vicreg_loss(a, b, **params), (z_a.double(), z_b.double()), grad_out=-0.6)
    _check(loss, ref, dtype, "loss")
    _check(ga, ra, dtype, "grad z_a")
    _check(gb, rb, dtype, "grad z_b")
    again, (ga2, gb2) = _grads(lambda a, b: fn(a, b, **params), (z_a, z_b), grad_out=-0.6)
    assert torch.equal(loss, again) and torch.equal(ga, ga2) and torch.equal(gb, gb2)
    z_a[25, 4] = float("nan")  # third chunk
    assert torch.isnan(fn(z_a, z_b, **params))


# ----------------------------------------------------------------------------- GPU lane


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("precision,tol", [("ieee", 1e-4), ("tf32", 5e-3)])
@pytest.mark.parametrize("n,k", [(2048, 8192), (4097, 1025), (1025, 4097)])
def test_gpu_large_tf32_vs_ieee_and_determinism(precision, tol, n, k, device):
    cov_ops.set_dot_precision(precision)
    try:
        z_a, z_b = _two_view_inputs(n, k, torch.float32, device, seed=n + k)
        loss, (ga, gb) = _grads(lambda a, b: sslops.vicreg_loss(a, b, backend="triton"), (z_a, z_b))
        ref, (ra, rb) = _grads(lambda a, b: reference.vicreg_loss(a, b), (z_a.double(), z_b.double()))
        assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
        assert _rel_err(ga, ra) < tol and _rel_err(gb, rb) < tol
        again, (ga2, gb2) = _grads(lambda a, b: sslops.vicreg_loss(a, b, backend="triton"), (z_a, z_b))
        assert torch.equal(loss, again) and torch.equal(ga, ga2) and torch.equal(gb, gb2)
    finally:
        cov_ops.set_dot_precision(None)


def _relation_float64_chunked(z, pairs, alpha, beta, gamma, eps, grad_out, u, v, rows, chunk):
    """Independent float64 VICReg relation loss and gradient checks, never holding more than
    `chunk` rows in float64: (loss, uᵀ·dz·v, dz[rows]). Pairs (2, P) must be distinct, i ≠ j
    and not repeated in reverse (nnz(G) = 2P). Gradient, Zc = z - mean, C = ZcᵀZc/(N-1):
      dz = g·[Zc·diag(-α·[std < 1]/(K·std·(N-1))) + 4β/(K(N-1))·Zc·(C - diag C)] + inv part,
      inv part: +2γg/(PK)·(z_i - z_j) on row i, the negative on row j."""
    n, k = z.shape
    f64 = torch.float64
    mean = torch.zeros(k, dtype=f64, device=z.device)
    for r in range(0, n, chunk):
        mean += z[r:r + chunk].double().sum(0)
    mean /= n
    c = torch.zeros(k, k, dtype=f64, device=z.device)
    for r in range(0, n, chunk):
        zc = z[r:r + chunk].double() - mean
        c += zc.t() @ zc
    c /= n - 1
    var = c.diagonal()
    std = torch.sqrt(var + eps)
    off = c - torch.diag(var)
    i, j = pairs[0].long(), pairs[1].long()
    p = i.numel()
    d = z[i].double() - z[j].double()
    loss = alpha * torch.relu(1.0 - std).mean() + beta * (off * off).sum() / k + gamma * (d * d).sum() / (p * k)
    col_w = -alpha * (std < 1).to(f64) / (k * std * (n - 1))
    cov_m = (4.0 * beta / (k * (n - 1))) * off
    wv = col_w * v + cov_m @ v
    a = 2.0 * gamma / (p * k)
    checksum = a * ((u[i] - u[j]) * (d @ v)).sum()
    for r in range(0, n, chunk):
        checksum = checksum + u[r:r + chunk] @ ((z[r:r + chunk].double() - mean) @ wv)
    zr = z[rows].double() - mean
    dz_rows = zr * col_w + zr @ cov_m
    hit_i = (i[:, None] == rows[None, :]).to(f64)
    hit_j = (j[:, None] == rows[None, :]).to(f64)
    dz_rows += a * ((hit_i - hit_j).t() @ d)
    return loss, grad_out * checksum, grad_out * dz_rows


def _kernel_checksum(grad, u, v, chunk):
    total = torch.zeros((), dtype=torch.float64, device=grad.device)
    for r in range(0, grad.shape[0], chunk):
        total += u[r:r + chunk] @ (grad[r:r + chunk].double() @ v)
    return total


def test_relation_float64_chunked_matches_reference():
    """The GPU lane's independent chunked computation against the float64 reference's autograd
    at a small shape (so a failure there points at the kernels, not at the check)."""
    n, k = 301, 9
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, k + 1, generator=g, dtype=torch.float64)
    z = 0.5 * x[:, :-1] + 0.3 * x[:, 1:] + 3.0  # correlated neighbours: Cov_{k,k+1} = 0.15
    perm = torch.randperm(n, generator=g)
    pairs = torch.stack([perm[:40], perm[40:80]])
    params = dict(alpha=25.0, beta=50.0, gamma=25.0, eps=1e-4)
    zz = z.clone().requires_grad_()
    ref = reference.vicreg_relation_loss(zz, pairs=pairs, **params)
    ref.backward(torch.tensor(0.7, dtype=torch.float64))
    u = torch.randn(n, generator=g, dtype=torch.float64)
    v = torch.randn(k, generator=g, dtype=torch.float64)
    rows = torch.tensor([0, perm[3].item(), perm[45].item(), perm[200].item(), n - 1])
    loss, cs, dz_rows = _relation_float64_chunked(z, pairs, *params.values(), 0.7, u, v, rows, chunk=64)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(cs, _kernel_checksum(zz.grad, u, v, 64), rtol=1e-10, atol=0)
    torch.testing.assert_close(dz_rows, zz.grad[rows], rtol=1e-10, atol=1e-15)


def _check_relation_against_float64(n, k, chunk, device):
    """Triton relation loss on correlated inputs (Cov_{k,k+1} = 0.15, std 0.58: every hinge
    active; mean 3) with 2048 pairs (fewer when n is small) against _relation_float64_chunked:
    loss, a gradient checksum uᵀ·dz·v over the unpaired rows (the var/cov gradient; the pairs'
    part is far larger), and full gradient rows (paired and unpaired; on a big input both sides
    of the 2³¹-element boundary), fp32 tolerances. Returns the peak of allocated CUDA memory
    during forward and backward (0 off CUDA)."""
    cuda = torch.device(device).type == "cuda"
    gen = torch.Generator(device=device).manual_seed(11)
    z = torch.empty(n, k, device=device)
    for r in range(0, n, chunk):  # made chunk by chunk: no second N×K buffer
        x = torch.randn(min(chunk, n - r), k + 1, device=device, generator=gen)
        z[r:r + chunk] = 0.5 * x[:, :-1] + 0.3 * x[:, 1:] + 3.0
    del x
    boundary = min(2 ** 31 // k, n - 4)  # the last row below 2³¹ elements; the next one straddles it (when n·k > 2³¹)
    paired = torch.tensor([n - 1, boundary + 1, 0], device=device)
    unpaired = torch.tensor([1, boundary, n - 2], device=device)
    perm = torch.randperm(n, device=device, generator=gen)
    perm = perm[~torch.isin(perm, torch.cat([paired, unpaired]))]
    perm = torch.cat([paired, perm])
    p = min(2048, (n - 3) // 4)
    pairs = torch.stack([perm[:p], perm[p:2 * p]])  # 2p distinct rows: no duplicate or self pairs
    params = dict(alpha=25.0, beta=50.0, gamma=25.0, eps=1e-4)
    grad_out = 0.7
    u = torch.randn(n, device=device, generator=gen, dtype=torch.float64)
    u[perm[:2 * p]] = 0.0
    v = torch.randn(k, device=device, generator=gen, dtype=torch.float64)
    rows = torch.cat([paired, unpaired, pairs[1, :3]])
    cov_ops.set_dot_precision("ieee")
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        zz = z.requires_grad_()
        loss = sslops.vicreg_relation_loss(zz, pairs=pairs, backend="triton", **params)
        loss.backward(torch.tensor(grad_out, device=device, dtype=loss.dtype))
        peak = 0
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
    finally:
        cov_ops.set_dot_precision(None)
    grad = zz.grad
    zz.requires_grad_(False)
    ref_loss, ref_cs, ref_rows = _relation_float64_chunked(z, pairs, *params.values(), grad_out, u, v, rows, chunk)
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    cs = _kernel_checksum(grad, u, v, chunk)
    assert abs(cs.item() - ref_cs.item()) <= 1e-4 * abs(ref_cs.item()), (cs.item(), ref_cs.item())
    for row, got, want in zip(rows.tolist(), grad[rows].double(), ref_rows):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item(), msg=lambda m: f"row {row}: {m}")
    return peak


@pytest.mark.triton
def test_triton_relation_against_chunked_float64(device):
    """The GPU lane's big-shape check at an interpreter size (the comparison itself is exercised)."""
    _check_relation_against_float64(203, 19, 64, device)


@pytest.mark.gpu
@pytest.mark.triton
def test_gpu_int32_overflow_shape(device):
    """The relation form at N·K > 2³¹: N = 2²¹ + 3, K = 1025 (rows from 2095105 on sit past 2³¹
    elements), against float64 computed 65536 rows at a time. Memory: z and its gradient
    8.6 GB each; the pairs' gradient goes through two N×K fp32 index_put buffers while the
    var/cov dz (N×K fp32) is alive: peak ~26 GB, asserted < 30 GB (the former 65539×32769
    version made several fp32 copies, ~50 GB, and only checked that the loss was finite)."""
    n, k = 2 ** 21 + 3, 1025
    assert n * k > 2 ** 31
    peak = _check_relation_against_float64(n, k, 65536, device)
    assert peak < 30e9, f"peak {peak / 1e9:.1f} GB"


# ----------------------------------------------------------------------------- Triton for sm_90 without a GPU


@pytest.mark.cuda_compile
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_kernels_compile_for_sm90(dtype):
    """Ahead-of-time compilation of the main Triton kernels for Hopper (catches what the
    interpreter lets through: non-constexpr control flow, dot shape/dtype rules)."""
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sslops.triton_kernels import covariance as tk

    zt, dot_t = ("fp32", tl.float32) if dtype == "fp32" else ("bf16", tl.bfloat16)
    ptr = {n: f"*{zt}" if n.startswith("z") else "*fp32" for n in
           ["za", "ma", "sa", "zb", "mb", "sb", "zc", "mc", "sc", "zd", "md", "sd", "partials", "prod1", "prod2"]}
    consts = dict(GRAM=True, TWO=True, SKIP_DIAG=False, SYM=True, STORE=True, REDUCE=True, BLOCK_I=64, BLOCK_T=32,
                  dot_t=dot_t, PREC="tf32" if dtype == "fp32" else "ieee")
    sig = dict(ptr, N="i32", K="i32", **{k: "constexpr" for k in consts})
    try:
        triton.compile(ASTSource(fn=tk._prod_kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    except RuntimeError as exc:
        if "ptxas" in str(exc).lower() and "not found" in str(exc).lower():
            pytest.skip(f"no ptxas: {exc}")
        raise
    consts = dict(MZ=True, EPI=0, HAS_OTHER=True, BLOCK_R=64, BLOCK_C=64, BLOCK_T=32, dot_t=dot_t, PREC="ieee")
    sig = dict(z=f"*{zt}", mz="*fp32", sz="*fp32", mat="*fp32", sm0="i32", sm1="i32", ez=f"*{zt}", emz="*fp32", esz="*fp32",
               eo=f"*{zt}", w="*fp32", coef="*fp32", out=f"*{zt}", N="i32", K="i32", **{k: "constexpr" for k in consts})
    triton.compile(ASTSource(fn=tk._apply_kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    consts = dict(HAS_OTHER=True, BLOCK_N=64, BLOCK_K=64)  # column statistics with the fused invariance sum
    sig = dict(z=f"*{zt}", other=f"*{zt}", pmean="*fp32", pm2="*fp32", psq="*fp32", N="i32", K="i32", CHUNK="i32",
               **{k: "constexpr" for k in consts})
    triton.compile(ASTSource(fn=tk._col_stats_kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
