"""sslops.spectral: every closed form against an independent numerical optimisation (float64, fixed seeds).

- vicreg_optimum: L-BFGS from several random starts on random weighted G reaches the same
  loss (1e-6 relative) and the same left singular subspace; its rank follows the threshold
  λ_j < βN/(γ(N − 1)) in γ/β, down to n_components − 1 (claim 1 of the README's seeds table, first half).
- InfoNCE over a 4-class block G: gradient descent on sslops.info_nce_loss ends at rank 3
  with equal singular values √(N/3), the simplex of infonce_optimum, while the quadratic
  VICReg at small γ keeps rank k (claim 1, second half).
- linear_vicreg_optimum and reconstruction_optimum against gradient descent; the denoising
  optimum against gradient descent on the expected loss and its S, G against sampled masks.
- laplacian / n_components against direct forms; every input check names its argument.
"""

import math

import pytest
import torch

import sslops
from sslops import metrics, spectral
from tests.utils import one_thread  # noqa: F401 (an autouse fixture: every test here on one thread)

F64 = torch.float64



def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _random_weighted_g(n, seed, density=0.5):
    """A connected random symmetric weighted relation (a ring keeps it connected)."""
    g = _gen(seed)
    w = torch.rand(n, n, generator=g, dtype=F64) * (torch.rand(n, n, generator=g) < density)
    w = w + torch.roll(torch.eye(n, dtype=F64), 1, dims=1) * 0.5
    w = (w + w.T) / 2
    w.fill_diagonal_(0)
    return w


def _projector(a, rank=None):
    """Orthogonal projector onto the span of the top-``rank`` left singular vectors of a (centred) matrix."""
    a = a - a.mean(dim=0)
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    rank = int((s > 1e-6 * s[0]).sum()) if rank is None else rank
    return u[:, :rank] @ u[:, :rank].T


def _quadratic_vicreg(lap, beta, gamma):
    """L_q of vicreg_quadratic_loss with the Laplacian made once (the optimisers call it thousands of times)."""
    n = lap.shape[0]

    def loss(z):
        zc = z - z.mean(dim=0)
        cov = zc.T @ zc / (n - 1)
        return beta * ((cov - torch.eye(z.shape[1], dtype=F64)) ** 2).sum() + (2 * gamma / n) * (zc * (lap @ zc)).sum()

    return loss


def _descend(loss_fn, params, lr, steps):
    """Full-batch gradient descent with heavy-ball momentum 0.9; returns the final loss."""
    sgd = torch.optim.SGD(params, lr=lr, momentum=0.9)
    for _ in range(steps):
        sgd.zero_grad()
        loss_fn().backward()
        sgd.step()
    with torch.no_grad():
        return float(loss_fn())


def _lbfgs(loss_fn, params, rounds=2):
    opt = torch.optim.LBFGS(params, lr=1, max_iter=300, tolerance_grad=1e-13, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss_fn()
        value.backward()
        return value

    for _ in range(rounds):
        opt.step(closure)
    with torch.no_grad():
        return float(loss_fn())


# ----------------------------------------------------------------------------- VICReg over G


@pytest.mark.parametrize("rank", [4, 2, 1])
def test_vicreg_optimum_matches_lbfgs_from_random_starts(rank):
    n, k, beta = 14, 4, 1.0
    w = _random_weighted_g(n, seed=1)
    lam = spectral.vicreg_optimum(k + 1, G=w, gamma=0.0).eigenvalues
    # γ that puts the threshold βN/(γ(N − 1)) midway between λ_rank and λ_rank+1
    gamma = beta * n / ((n - 1) * float(lam[rank - 1] + lam[rank]) / 2)
    opt = spectral.vicreg_optimum(k, G=w, beta=beta, gamma=gamma)
    assert opt.rank == rank
    # the returned loss is the objective at the returned embedding
    assert math.isclose(float(spectral.vicreg_quadratic_loss(opt.embedding, G=w, beta=beta, gamma=gamma)), opt.loss, rel_tol=1e-12)
    objective = _quadratic_vicreg(spectral.laplacian(G=w), beta, gamma)
    assert math.isclose(float(objective(opt.embedding)), opt.loss, rel_tol=1e-12)
    for start in range(4):
        z = torch.randn(n, k, generator=_gen(100 + start), dtype=F64).requires_grad_()
        found = _lbfgs(lambda: objective(z), [z])
        assert abs(found - opt.loss) <= 1e-6 * abs(opt.loss), (start, found, opt.loss)
        assert found >= opt.loss - 1e-9 * abs(opt.loss), "the optimiser went below the claimed minimum"
        p_found = _projector(z.detach(), opt.rank)
        p_opt = _projector(opt.embedding, opt.rank)
        assert (p_found - p_opt).norm() < 1e-5, (start, (p_found - p_opt).norm())
        s = torch.linalg.svdvals(z.detach() - z.detach().mean(dim=0))
        torch.testing.assert_close(s, ((n - 1) * opt.variances).sqrt(), atol=1e-5, rtol=1e-5)


def test_vicreg_optimum_rank_threshold_in_gamma_over_beta():
    # 4 label blocks of 6, plus weak random links inside the blocks: 4 components, eigenvalue 0 ×3
    labels = torch.arange(4).repeat_interleave(6)
    n, k = labels.numel(), 8
    w = spectral.laplacian(labels=labels).neg().fill_diagonal_(0) * (0.5 + torch.rand(n, n, generator=_gen(3), dtype=F64))
    w = (w + w.T) / 2
    assert spectral.n_components(G=w) == 4
    lam = spectral.vicreg_optimum(n - 1, G=w, gamma=0.0).eigenvalues
    assert torch.all(lam[:3].abs() < 1e-10) and lam[3] > 1e-3
    for beta in (0.5, 2.0):
        for gamma in (1e-4, 0.01, 0.05, 0.1, 0.2, 1.0, 10.0, 1e4):
            opt = spectral.vicreg_optimum(k, G=w, beta=beta, gamma=gamma)
            threshold = beta * n / (gamma * (n - 1))
            assert opt.rank == int((lam[:k] < threshold).sum())
            assert opt.rank == int((torch.linalg.svdvals(opt.embedding) > 1e-9).sum())
        for rank in range(3, k + 1):  # every rank from components − 1 to k, with the threshold between λ_rank and λ_rank+1
            gamma = beta * n / ((n - 1) * float(lam[rank - 1] + lam[rank]) / 2)
            assert spectral.vicreg_optimum(k, G=w, beta=beta, gamma=gamma).rank == rank
            assert spectral.vicreg_optimum(k, G=w, beta=beta, gamma=gamma * 0.999).rank >= rank
        assert spectral.vicreg_optimum(k, G=w, beta=beta, gamma=1e-6).rank == k  # small γ: full rank
        assert spectral.vicreg_optimum(k, G=w, beta=beta, gamma=1e6).rank == min(k, 4 - 1)  # large γ: components − 1
    # the rank depends on γ/β only
    assert spectral.vicreg_optimum(k, G=w, beta=2.0, gamma=0.2).rank == spectral.vicreg_optimum(k, G=w, beta=1.0, gamma=0.1).rank


def test_vicreg_optimum_lbfgs_agrees_on_the_rank():
    labels = torch.arange(3).repeat_interleave(5)
    n, k = 15, 4
    for gamma, rank in ((1e-3, 4), (5.0, 2)):
        opt = spectral.vicreg_optimum(k, labels=labels, gamma=gamma)
        assert opt.rank == rank
        z = torch.randn(n, k, generator=_gen(7), dtype=F64).requires_grad_()
        objective = _quadratic_vicreg(spectral.laplacian(labels=labels), 1.0, gamma)
        found = _lbfgs(lambda: objective(z), [z])
        assert abs(found - opt.loss) <= 1e-6 * opt.loss
        s = torch.linalg.svdvals(z.detach() - z.detach().mean(dim=0))
        assert int((s > 1e-3 * s[0]).sum()) == rank


def test_vicreg_optimum_relation_forms_agree():
    labels = torch.tensor([0, 1, 0, 2, 1, 2, 2, 0])
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(8, dtype=torch.bool)
    rows, cols = torch.nonzero(same, as_tuple=True)
    pairs = torch.stack([rows, cols])[:, rows < cols]
    by_labels = spectral.laplacian(labels=labels)
    torch.testing.assert_close(spectral.laplacian(pairs=pairs, num_rows=8), by_labels, rtol=0, atol=0)
    torch.testing.assert_close(spectral.laplacian(pairs=pairs.flip(0).repeat(1, 2), num_rows=8), by_labels, rtol=0, atol=0)
    torch.testing.assert_close(spectral.laplacian(G=same.double()), by_labels, rtol=0, atol=0)
    a = spectral.vicreg_optimum(3, labels=labels, gamma=0.1)
    b = spectral.vicreg_optimum(3, pairs=pairs, num_rows=8, gamma=0.1)
    assert a.rank == b.rank and math.isclose(a.loss, b.loss, rel_tol=1e-12)
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues)


def test_laplacian_properties():
    w = _random_weighted_g(11, seed=5)
    lap = spectral.laplacian(G=w)
    torch.testing.assert_close(lap.sum(dim=1), torch.zeros(11, dtype=F64), atol=1e-12, rtol=0)
    z = torch.randn(11, 3, generator=_gen(6), dtype=F64)
    direct = sum(float(w[i, j]) * float((z[i] - z[j]).pow(2).sum()) for i in range(11) for j in range(11))
    assert math.isclose(direct, 2 * float((z * (lap @ z)).sum()), rel_tol=1e-12)
    assert float(torch.linalg.eigvalsh(lap)[0]) > -1e-12
    # a self-loop in G changes nothing
    w2 = w.clone()
    w2.fill_diagonal_(3.0)
    torch.testing.assert_close(spectral.laplacian(G=w2), lap)


def test_n_components():
    assert spectral.n_components(labels=torch.tensor([5, 1, 1, 7, 5])) == 3
    # a path 0-1-2, a pair 3-4, isolated 5 and 6, given in a scrambled order with duplicates
    pairs = torch.tensor([[2, 4, 1, 1], [1, 3, 0, 2]])
    assert spectral.n_components(pairs=pairs, num_rows=7) == 4
    # a long path in reverse order (label propagation needs the pointer jumping)
    n = 300
    path = torch.stack([torch.arange(n - 1, 0, -1), torch.arange(n - 2, -1, -1)])
    assert spectral.n_components(pairs=path, num_rows=n) == 1
    for seed in range(3):
        g = _gen(seed)
        w = (torch.rand(40, 40, generator=g, dtype=F64) < 0.03).double()
        w = ((w + w.T) > 0).double()
        w.fill_diagonal_(0)
        zeros = int((torch.linalg.eigvalsh(spectral.laplacian(G=w)) < 1e-9).sum())
        assert spectral.n_components(G=w) == zeros


# ----------------------------------------------------------------------------- InfoNCE (claim 1, second half)


def test_infonce_optimum_geometry():
    labels = torch.tensor([3, 1, 2, 3, 1, 2, 3, 1, 2, 9, 9, 9])
    opt = spectral.infonce_optimum(labels, 5)
    n, c = 12, 4
    z = opt.embedding
    torch.testing.assert_close(z.norm(dim=1), torch.ones(n, dtype=F64))
    cos = z @ z.T
    same = labels[:, None] == labels[None, :]
    torch.testing.assert_close(cos[same], torch.ones(int(same.sum()), dtype=F64))
    torch.testing.assert_close(cos[~same], torch.full((int((~same).sum()),), -1 / (c - 1), dtype=F64))
    s = torch.linalg.svdvals(z)
    torch.testing.assert_close(s[: c - 1], torch.full((c - 1,), math.sqrt(n / (c - 1)), dtype=F64))
    assert float(s[c - 1 :].abs().max()) < 1e-12 and opt.rank == c - 1
    torch.testing.assert_close(opt.singular_values, s[: c - 1])


def test_infonce_minimiser_by_gradient_descent_is_the_simplex_and_vicreg_keeps_rank_k():
    """Claim 1 (2205.11508): on a 4-class block G, GD on InfoNCE ends at rank 3 with equal
    singular values √(N/3) (within 1e-3), while the quadratic VICReg at small γ keeps rank k."""
    c, per, k = 4, 8, 6
    labels = torch.arange(c).repeat_interleave(per)
    n = c * per
    z = torch.randn(n, k, generator=_gen(11), dtype=F64).requires_grad_()
    _descend(lambda: sslops.info_nce_loss(z, labels=labels, temperature=0.5, backend="reference"), [z], lr=2.0, steps=1500)
    u = torch.nn.functional.normalize(z.detach(), dim=1)
    s = torch.linalg.svdvals(u)
    target = math.sqrt(n / (c - 1))
    assert torch.all((s[: c - 1] - target).abs() < 1e-3), s
    assert float(s[c - 1 :].max()) < 1e-3, s  # rank 3
    best = spectral.infonce_optimum(labels, k)
    final = float(sslops.info_nce_loss(z.detach(), labels=labels, temperature=0.5, backend="reference"))
    at_simplex = float(sslops.info_nce_loss(best.embedding, labels=labels, temperature=0.5, backend="reference"))
    assert at_simplex <= final + 1e-9 and final - at_simplex < 1e-6
    vic = spectral.vicreg_optimum(k, labels=labels, gamma=1e-3)
    assert vic.rank == k


# ----------------------------------------------------------------------------- linear encoders


def test_linear_vicreg_optimum_matches_gradient_descent():
    g = _gen(21)
    n, d, k = 30, 6, 3
    x = torch.randn(n, d, generator=g, dtype=F64) + 2.0
    xc = x - x.mean(dim=0)
    w = _random_weighted_g(n, seed=22, density=0.2)
    mu = spectral.linear_vicreg_optimum(x, k, G=w, gamma=1.0).eigenvalues  # μ ∝ γ
    for gamma, rank in ((1.0 / float(mu[2]), 3), (4.0 / float(mu[0] + mu[1]), 1)):  # μ_3 = 1, then the threshold 2β between μ_1 and μ_2
        opt = spectral.linear_vicreg_optimum(x, k, G=w, gamma=gamma)
        assert opt.rank == rank
        assert math.isclose(float(spectral.vicreg_quadratic_loss(x @ opt.weight, G=w, gamma=gamma)), opt.loss, rel_tol=1e-10)
        objective = _quadratic_vicreg(spectral.laplacian(G=w), 1.0, gamma)
        weight = (0.3 * torch.randn(d, k, generator=g, dtype=F64)).requires_grad_()
        found = _descend(lambda: objective(xc @ weight), [weight], lr=0.02, steps=1500)
        assert abs(found - opt.loss) <= 1e-6 * opt.loss, (gamma, found, opt.loss)
        assert (_projector(x @ weight.detach(), rank) - _projector(opt.embedding, rank)).norm() < 1e-4
        torch.testing.assert_close(torch.diagonal(torch.cov(opt.embedding.T)), opt.variances)


def test_linear_vicreg_optimum_drops_null_directions_and_thresholds():
    g = _gen(23)
    n = 25
    base = torch.randn(n, 3, generator=g, dtype=F64)
    x = torch.cat([base, base[:, :1] * 2 - base[:, 1:2], torch.full((n, 1), 7.0, dtype=F64)], dim=1)  # rank 3 of 5
    labels = torch.arange(5).repeat(5)
    with pytest.raises(ValueError, match="rank of the centred x is 3"):
        spectral.linear_vicreg_optimum(x, 4, labels=labels)
    opt = spectral.linear_vicreg_optimum(x, 3, labels=labels, beta=1.0, gamma=5.0)
    assert opt.weight[4].abs().max() < 1e-12  # nothing on the constant column
    assert opt.rank == int((opt.eigenvalues < 2.0).sum())
    big = spectral.linear_vicreg_optimum(x, 3, labels=labels, beta=1.0, gamma=1e6)
    assert big.rank == 0 and float(big.embedding.abs().max()) == 0.0


def _reconstruction_loss(x, y, v, w, z, lam):
    code = x @ v
    return ((y - code @ w) ** 2).sum() + lam * ((x - code @ z) ** 2).sum()


@pytest.mark.parametrize("lam", [0.0, 0.3, 100.0])
def test_reconstruction_optimum_matches_gradient_descent(lam):
    g = _gen(31)
    n, d, c, k = 40, 5, 3, 2
    y = torch.arange(c).repeat(14)[:n]
    x = torch.randn(n, d, generator=g, dtype=F64) + torch.nn.functional.one_hot(y, c).double() @ torch.randn(c, d, generator=g, dtype=F64)
    x = x / x.std()
    opt = spectral.reconstruction_optimum(x, y, k, lam=lam)
    xc, yt = x - x.mean(dim=0), torch.nn.functional.one_hot(y, c).double()
    assert math.isclose(float(_reconstruction_loss(xc, yt, opt.encoder, opt.head, opt.decoder, lam)), opt.loss, rel_tol=1e-10)
    params = [(0.3 * torch.randn(*shape, generator=g, dtype=F64)).requires_grad_() for shape in ((d, k), (k, c), (k, d))]
    found = _descend(lambda: _reconstruction_loss(xc, yt, *params, lam), params, lr=2e-3 / (1 + lam), steps=1500)
    assert abs(found - opt.loss) <= 1e-6 * opt.loss, (found, opt.loss)
    assert found >= opt.loss * (1 - 1e-9)
    assert (_projector(xc @ params[0].detach(), k) - _projector(xc @ opt.encoder, k)).norm() < 1e-4


def test_reconstruction_optimum_limits():
    g = _gen(32)
    x = torch.randn(60, 6, generator=g, dtype=F64) * torch.tensor([5.0, 4, 3, 2, 1, 0.5], dtype=F64)
    y = torch.randint(0, 3, (60,), generator=g)
    pca = torch.linalg.eigh((x - x.mean(0)).T @ (x - x.mean(0))).eigenvectors.flip(1)[:, :3]
    v = spectral.reconstruction_optimum(x, y, 3, lam=1e9).encoder
    xc = x - x.mean(0)
    assert (_projector(xc @ v) - _projector(xc @ pca)).norm() < 1e-6  # λ → ∞: PCA
    yt = torch.nn.functional.one_hot(y).double()
    sup = spectral.reconstruction_optimum(x, yt, 2, lam=0.0)
    fit = xc @ torch.linalg.lstsq(xc, yt).solution  # λ = 0: the least-squares fit's span (rank C − 1 after centring)
    assert (_projector(xc @ sup.encoder, 2) - _projector(fit, 2)).norm() < 1e-8


# ----------------------------------------------------------------------------- denoising


def _expected_denoising_loss(xc, v, z, keep, cov):
    """E‖x − x'VZ‖² = ‖x‖² − 2 tr(Zᵀ Vᵀ Sᵀ x) + tr(Zᵀ Vᵀ G V Z), S = keep·x."""
    return (xc**2).sum() - 2 * keep * (z * (v.T @ xc.T @ xc)).sum() + (z * (v.T @ cov @ v @ z)).sum()


def test_denoising_optimum_matches_gradient_descent_and_sampled_masks():
    g = _gen(41)
    n, h, w = 50, 4, 4
    x = torch.randn(n, h * w, generator=g, dtype=F64) @ torch.randn(h * w, h * w, generator=g, dtype=F64) * 0.3
    xc = x - x.mean(dim=0)
    p, patch, k = 0.4, 2, 3
    opt = spectral.denoising_optimum(x, k, mask_prob=p, patch=patch, image_shape=(h, w))
    # S and G of the theorem against 20000 sampled patch masks
    blocks = torch.rand(20000, h // patch, w // patch, generator=g) >= p
    masks = blocks.repeat_interleave(patch, 1).repeat_interleave(patch, 2).reshape(20000, h * w).double()
    cov_sampled = (xc.T @ xc) * (masks.T @ masks / 20000)
    same = spectral._same_patch((h, w), patch, h * w)
    channels = spectral._same_patch((2, h, w), patch, 2 * h * w)  # (C, H, W): a block holds all channels
    assert channels[0, h * w + w + 1] and not channels[0, h * w + 2] and int(channels.sum(1)[0]) == 2 * patch * patch
    gram = xc.T @ xc
    cov = (1 - p) ** 2 * gram + p * (1 - p) * torch.where(same, gram, torch.zeros_like(gram))
    assert float((cov_sampled - cov).abs().max()) < 0.02 * float(gram.abs().max())
    assert math.isclose(float(_expected_denoising_loss(xc, opt.encoder, opt.decoder, 1 - p, cov)), opt.loss, rel_tol=1e-10)
    params = [(0.1 * torch.randn(*shape, generator=g, dtype=F64)).requires_grad_() for shape in ((h * w, k), (k, h * w))]
    found = _descend(lambda: _expected_denoising_loss(xc, *params, 1 - p, cov), params, lr=1e-3, steps=2000)
    assert abs(found - opt.loss) <= 1e-6 * opt.loss, (found, opt.loss)


def test_gaussian_denoising_keeps_the_principal_directions():
    g = _gen(42)
    x = torch.randn(80, 7, generator=g, dtype=F64) * torch.tensor([3.0, 2.5, 2, 1.5, 1, 0.5, 0.2], dtype=F64)
    xc = x - x.mean(dim=0)
    pca = torch.linalg.eigh(xc.T @ xc).eigenvectors.flip(1)[:, :4]
    for sigma in (0.0, 0.5, 10.0):
        v = spectral.denoising_optimum(x, 4, noise_std=sigma).encoder
        cos = torch.nn.functional.normalize(v, dim=0).T @ pca
        torch.testing.assert_close(cos.abs(), torch.eye(4, dtype=F64), atol=1e-8, rtol=0)  # same directions, same order
    # so the alignment of the encoder with labels is exactly that of the principal directions
    y = torch.randint(0, 3, (80,), generator=g)
    plain = metrics.alignment(x, y)
    for sigma in (0.1, 2.0, 30.0):
        v = spectral.denoising_optimum(x, 7, noise_std=sigma).encoder
        assert float((metrics.alignment(x, y, directions=v) - plain).abs().max()) < 1e-6
    # masking with p = 0 is the plain auto-encoder (PCA)
    v = spectral.denoising_optimum(x, 4, mask_prob=0.0).encoder
    assert (_projector(xc @ v) - _projector(xc @ pca)).norm() < 1e-8


# ----------------------------------------------------------------------------- input checks


def test_bad_input_names_the_argument():
    labels = torch.tensor([0, 0, 1, 1])
    w = torch.rand(4, 4, dtype=F64)
    sym = (w + w.T) / 2
    x = torch.randn(4, 3, dtype=F64)
    cases = [
        (lambda: spectral.vicreg_optimum(2), ValueError, "exactly one of labels"),
        (lambda: spectral.vicreg_optimum(2, labels=labels, G=sym), ValueError, "labels and G"),
        (lambda: spectral.vicreg_optimum(2, G=w), ValueError, "G must be symmetric"),
        (lambda: spectral.vicreg_optimum(2, G=-sym), ValueError, "G must be non-negative"),
        (lambda: spectral.vicreg_optimum(2, G=sym[:3]), ValueError, "G must be a square"),
        (lambda: spectral.vicreg_optimum(2, G=sym.masked_fill(torch.eye(4, dtype=torch.bool), math.nan)), ValueError, "G holds NaN"),
        (lambda: spectral.vicreg_optimum(4, labels=labels), ValueError, "k must be in \\[1, 3\\]"),
        (lambda: spectral.vicreg_optimum(0, labels=labels), ValueError, "k must be"),
        (lambda: spectral.vicreg_optimum(1.5, labels=labels), TypeError, "k must be an int"),
        (lambda: spectral.vicreg_optimum(2, labels=labels, beta=0.0), ValueError, "beta must be"),
        (lambda: spectral.vicreg_optimum(2, labels=labels, gamma=-1.0), ValueError, "gamma must be"),
        (lambda: spectral.vicreg_optimum(2, labels=labels.double()), TypeError, "labels must have an integer dtype"),
        (lambda: spectral.vicreg_optimum(2, labels=labels[None]), ValueError, "labels must have shape"),
        (lambda: spectral.vicreg_optimum(2, pairs=torch.tensor([[0], [1]])), ValueError, "num_rows"),
        (lambda: spectral.vicreg_optimum(2, pairs=torch.tensor([[0], [4]]), num_rows=4), ValueError, "pairs must hold indices in \\[0, 4\\)"),
        (lambda: spectral.vicreg_optimum(2, pairs=torch.tensor([[0, 1]]), num_rows=4), ValueError, "pairs must have shape"),
        (lambda: spectral.laplacian(labels=torch.tensor([0])), ValueError, "at least 2 rows"),
        (lambda: spectral.laplacian(pairs=torch.zeros(2, 0, dtype=torch.long), num_rows=spectral.MAX_ROWS + 1), ValueError, "at most 8192"),
        (lambda: spectral.linear_vicreg_optimum(x, 1, labels=labels[:3]), ValueError, "labels must have one entry per row"),
        (lambda: spectral.linear_vicreg_optimum(x[:, :, None], 1, labels=labels), ValueError, "x must have shape"),
        (lambda: spectral.linear_vicreg_optimum(x.masked_fill(x > 0, math.inf), 1, labels=labels), ValueError, "x holds NaN"),
        (lambda: spectral.linear_vicreg_optimum(torch.zeros(spectral.MAX_ROWS + 1, 2), 1, labels=torch.zeros(spectral.MAX_ROWS + 1, dtype=torch.long)), ValueError, "at most 8192"),
        (lambda: spectral.infonce_optimum(torch.tensor([0, 0, 1]), 2), ValueError, "balanced"),
        (lambda: spectral.infonce_optimum(torch.tensor([0, 0]), 2), ValueError, "at least 2 classes"),
        (lambda: spectral.infonce_optimum(torch.tensor([0, 1, 2]), 1), ValueError, "k must be >= 2"),
        (lambda: spectral.reconstruction_optimum(x, labels, 1, lam=-1.0), ValueError, "lam must be"),
        (lambda: spectral.reconstruction_optimum(x, labels[:3], 1, lam=1.0), ValueError, "y must have one entry per row"),
        (lambda: spectral.reconstruction_optimum(x, labels, 4, lam=1.0), ValueError, "k must be <= 3"),
        (lambda: spectral.denoising_optimum(x, 1), ValueError, "exactly one of noise_std"),
        (lambda: spectral.denoising_optimum(x, 1, noise_std=1.0, mask_prob=0.5), ValueError, "exactly one of noise_std"),
        (lambda: spectral.denoising_optimum(x, 1, mask_prob=1.0), ValueError, "mask_prob must be in \\[0, 1\\)"),
        (lambda: spectral.denoising_optimum(x, 1, mask_prob=-0.1), ValueError, "mask_prob must be in \\[0, 1\\)"),
        (lambda: spectral.denoising_optimum(x, 1, noise_std=-1.0), ValueError, "noise_std must be"),
        (lambda: spectral.denoising_optimum(torch.randn(5, 12), 1, mask_prob=0.5, patch=2), ValueError, "needs image_shape"),
        (lambda: spectral.denoising_optimum(torch.randn(5, 12), 1, mask_prob=0.5, patch=2, image_shape=(3, 4)), ValueError, "patch = 2 must tile the image"),
        (lambda: spectral.denoising_optimum(torch.randn(5, 12), 1, mask_prob=0.5, patch=2, image_shape=(4, 4)), ValueError, "has 16 pixels"),
        (lambda: spectral.denoising_optimum(x, 5, noise_std=1.0), ValueError, "k must be in \\[1, 3\\]"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_results_are_float64_namedtuples():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.randn(6, 4, generator=_gen(51), dtype=torch.float32)
    for result in (
        spectral.vicreg_optimum(2, labels=labels),
        spectral.linear_vicreg_optimum(x, 2, labels=labels),
        spectral.infonce_optimum(labels, 2),
        spectral.reconstruction_optimum(x, labels, 2, lam=1.0),
        spectral.denoising_optimum(x, 2, noise_std=0.1),
    ):
        assert hasattr(result, "_fields")
        for name, value in zip(result._fields, result):
            if isinstance(value, torch.Tensor):
                assert value.dtype == F64 and value.device.type == "cpu", name
