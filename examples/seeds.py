"""The seed papers' claims, reproduced with sslops.spectral, sslops.toy and sslops.metrics (CPU, float64).

    python examples/seeds.py            # the table: what each paper claims, what sslops measures
    python examples/seeds.py --plot     # and the figures (needs matplotlib), in --out

Four claims, fixed seeds, nothing downloaded (scikit-learn's bundled digits):

1. Balestriero & LeCun 2022 (arXiv 2205.11508): the closed-form minimiser of VICReg's
   quadratic relaxation over a relation G (``vicreg_optimum``) is the minimum L-BFGS finds
   from random starts, and its rank follows the threshold λ_j < βN/(γ(N − 1)); InfoNCE over
   a 4-class G collapses to a rank-3 simplex while VICReg at small γ keeps rank k.
2. Balestriero & LeCun 2024 (arXiv 2402.11337): on digits the principal directions align
   with the labels as 50, 65, 83, 93, 98 % at k = 2, 4, 8, 16, 32; Gaussian denoising changes
   nothing; with per-pixel background noise, masking (p = 0.75) raises the alignment of the
   top 8 directions by more than 10 points, with a smooth gradient background it does not.
3. arXiv 2402.06884: the label-free part of the population features ψ* of
   ``structural_redundancy`` has rank s (redundancy ε_{s'} = 0 exactly for s' ≥ s), and the
   labels are linearly recoverable from ψ* exactly when p + s ≤ d2.
4. Yang, Li, Jiang, Li (AAAI 2024, arXiv 2401.03214): two sigmoid neurons trained by
   gradient ascent on Σ⟨σ(Wx'), σ(Wx'')⟩ − αn‖W‖² capture the label feature e1 and the
   hidden feature e2; a supervised two-layer sigmoid network captures only e1.

Each ``claim_*`` function returns a dict of measured numbers (tests/test_examples_seeds.py
asserts the papers' thresholds on them) plus what its figure needs.
"""

import argparse
import math
import os
import sys
import time

import torch

from sslops import info_nce_loss, spectral, toy
from sslops.metrics import alignment, redundancy

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- claim 1


def _random_relation(n, seed):
    """A connected random weighted relation: random weights on half the pairs, plus a ring."""
    g = _gen(seed)
    w = torch.rand(n, n, generator=g, dtype=F64) * (torch.rand(n, n, generator=g) < 0.5)
    w = w + 0.5 * torch.roll(torch.eye(n, dtype=F64), 1, dims=1)
    w = (w + w.T) / 2
    return w.fill_diagonal_(0.0)


def _quadratic_vicreg(lap, beta, gamma):
    n = lap.shape[0]

    def loss(z):
        zc = z - z.mean(dim=0)
        cov = zc.T @ zc / (n - 1)
        return beta * ((cov - torch.eye(z.shape[1], dtype=F64)) ** 2).sum() + (2 * gamma / n) * (zc * (lap @ zc)).sum()

    return loss


def _lbfgs(loss_fn, z):
    opt = torch.optim.LBFGS([z], lr=1, max_iter=300, tolerance_grad=1e-13, tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss_fn(z)
        value.backward()
        return value

    for _ in range(2):
        opt.step(closure)
    return float(loss_fn(z.detach()))


def _left_projector(z, rank):
    u = torch.linalg.svd(z - z.mean(dim=0), full_matrices=False).U[:, :rank]
    return u @ u.T


def claim_1(starts=3):
    """vicreg_optimum vs L-BFGS; the rank threshold; InfoNCE's rank-3 simplex vs VICReg's rank k."""
    n, k, beta = 14, 4, 1.0
    w = _random_relation(n, seed=1)
    lap = spectral.laplacian(G=w)
    lam = spectral.vicreg_optimum(k + 1, G=w, gamma=0.0).eigenvalues
    gaps, distances, ranks_ok = [], [], True
    for rank in (k, 2, 1):  # γ that puts the threshold midway between λ_rank and λ_rank+1
        gamma = beta * n / ((n - 1) * float(lam[rank - 1] + lam[rank]) / 2)
        opt = spectral.vicreg_optimum(k, G=w, beta=beta, gamma=gamma)
        ranks_ok &= opt.rank == rank
        for start in range(starts):
            z = torch.randn(n, k, generator=_gen(100 + start), dtype=F64).requires_grad_()
            found = _lbfgs(_quadratic_vicreg(lap, beta, gamma), z)
            gaps.append(abs(found - opt.loss) / opt.loss)
            distances.append(float((_left_projector(z.detach(), rank) - _left_projector(opt.embedding, rank)).norm()))

    # the rank of the optimum against γ on 4 classes with random weights inside (4 components)
    labels = torch.arange(4).repeat_interleave(6)
    g = _gen(3)
    blocks = (labels[:, None] == labels[None, :]).double() * torch.rand(24, 24, generator=g, dtype=F64) * (torch.rand(24, 24, generator=g) < 0.6)
    blocks = ((blocks + blocks.T) / 2).fill_diagonal_(0.0)
    block_lam = spectral.vicreg_optimum(23, G=blocks, gamma=0.0).eigenvalues
    gammas = torch.logspace(-3, 2, 60).tolist()
    curve = [spectral.vicreg_optimum(8, G=blocks, gamma=g).rank for g in gammas]
    predicted = [int((block_lam[:8] < 24 / (g * 23)).sum()) for g in gammas]

    # InfoNCE over a 4-class block G by gradient descent, against the simplex
    c, per, kk = 4, 8, 6
    cls = torch.arange(c).repeat_interleave(per)
    z = torch.randn(c * per, kk, generator=_gen(11), dtype=F64).requires_grad_()
    sgd = torch.optim.SGD([z], lr=2.0, momentum=0.9)
    for _ in range(1500):
        sgd.zero_grad()
        info_nce_loss(z, labels=cls, temperature=0.5, backend="reference").backward()
        sgd.step()
    s = torch.linalg.svdvals(torch.nn.functional.normalize(z.detach(), dim=1))
    return dict(
        lbfgs_loss_gap=max(gaps), subspace_distance=max(distances), ranks_follow_threshold=ranks_ok and curve == predicted,
        infonce_singular_values=s.tolist(), infonce_target=math.sqrt(c * per / (c - 1)),
        vicreg_small_gamma_rank=spectral.vicreg_optimum(kk, labels=cls, gamma=1e-3).rank, k=kk,
        gammas=gammas, rank_curve=curve, components=spectral.n_components(G=blocks),
    )


# ----------------------------------------------------------------------------- claim 2


def load_digits():
    """scikit-learn's bundled digits: (1797, 64) float64 pixels in 0..16 and (1797,) labels."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # pragma: no cover - the message is the point
        raise SystemExit("this example needs scikit-learn (pip install 'sslops[examples]')") from exc
    digits = sk_load_digits()
    return torch.tensor(digits.data, dtype=F64), torch.tensor(digits.target)


def claim_2():
    """Alignment of reconstruction with perception on digits; Gaussian denoising; masking vs backgrounds."""
    x, y = load_digits()
    plain = alignment(x, y, squared=False)
    gauss = spectral.denoising_optimum(x, plain.numel(), noise_std=4.0).encoder
    gauss_curve = alignment(x, y, directions=gauss, squared=False)
    curves, gains = {"digits": plain}, {}
    for kind in ("pixel_noise", "gradient", "blocky"):
        xb = toy.add_background(x.reshape(-1, 8, 8), kind, generator=_gen(0)).reshape(-1, 64)
        base = alignment(xb, y, squared=False)
        masked = {}
        for patch in (1, 2):
            v = spectral.denoising_optimum(xb, 32, mask_prob=0.75, patch=patch, image_shape=(8, 8)).encoder
            masked[patch] = alignment(xb, y, directions=v, squared=False)
            gains[(kind, patch)] = 100 * float(masked[patch][7] - base[7])
        curves[kind] = base
        curves[kind + ", masked"] = masked[1]
    return dict(
        alignment_at={k: 100 * float(plain[k - 1]) for k in (2, 4, 8, 16, 32)},
        gaussian_difference=float((gauss_curve - plain).abs().max()),
        mask_gain_pixel_noise=gains[("pixel_noise", 1)], mask_gain_gradient=gains[("gradient", 1)],
        mask_gain_blocky=gains[("blocky", 1)], patch_mask_gain_blocky=gains[("blocky", 2)],
        curves=curves,
    )


# ----------------------------------------------------------------------------- claim 3


def claim_3(n=2000):
    """ε_{s'} of the population features ψ* vanishes from s' = s on; recovery iff p + s ≤ d2."""
    tails = {}
    for s in (2, 4, 6):
        data = toy.structural_redundancy(n, s, generator=_gen(s))
        eps = torch.tensor([float(redundancy(data.psi, data.y, t)) for t in range(0, 9)], dtype=F64)
        tails[s] = eps
    zero_from_s = max(float(tails[s][s:].max() / tails[s][0]) for s in tails)
    positive_below_s = min(float(tails[s][s - 1] / tails[s][0]) for s in tails)
    recovery = {}
    for p, s in ((3, 16), (3, 17), (3, 18), (3, 19), (5, 15), (5, 16), (2, 18), (2, 19)):
        data = toy.structural_redundancy(n, s, p=p, generator=_gen(100 * p + s))
        target = torch.nn.functional.one_hot(data.y, p).double()
        fit = data.psi @ torch.linalg.lstsq(data.psi, target, driver="gelsd").solution
        recovery[(p, s)] = float((target - fit).norm() / target.norm())
    return dict(
        zero_from_s=zero_from_s, positive_below_s=positive_below_s, tails=tails,
        recovered=max(r for (p, s), r in recovery.items() if p + s <= 20),
        not_recovered=min(r for (p, s), r in recovery.items() if p + s > 20), recovery=recovery,
    )


# ----------------------------------------------------------------------------- claim 4


def _span_projections(w):
    """‖P e1‖, ‖P e2‖ for P the projector onto the span of the rows of each w (seeds, 2, d)."""
    q = torch.linalg.qr(w.transpose(1, 2)).Q
    p = q @ q.transpose(1, 2)
    return p[:, :, 0].norm(dim=1), p[:, :, 1].norm(dim=1)


def two_neurons(seeds=10, n=400, d=10, steps=600, lr=2.0, alpha=1 / 800, split_init=True):
    """Train two sigmoid neurons per seed, SSL and supervised, all seeds at once; return their (seeds, 2, d) weights.

    SSL: gradient ascent on (1/n)[Σ_i ⟨σ(Wx_i'), σ(Wx_i'')⟩ − αn‖W‖²], fresh views
    x + ρξ each step (ρ = d^(−3/2)). Supervised: gradient descent on the logistic loss of
    vᵀσ(Wx) for the label, plus α‖W‖². Both start from small random weights (0.1·N(0, 1));
    with ``split_init`` (the paper's initialisation region) the two neurons' e1 weights start
    at +1 and −1, else they are random too (then about half the seeds start both neurons on
    the same side of e1 and SSL ends with two copies of one neuron).
    """
    data = [toy.hidden_feature_clusters(n, d=d, generator=_gen(seed)) for seed in range(seeds)]
    x = torch.stack([s.x for s in data])
    label = torch.stack([s.label for s in data])
    g = _gen(1000)
    w0 = 0.1 * torch.randn(seeds, 2, d, generator=g, dtype=F64)
    if split_init:
        w0[:, 0, 0], w0[:, 1, 0] = 1.0, -1.0
    rho = d**-1.5
    w = w0.clone().requires_grad_()
    for _ in range(steps):
        a, b = toy.augment(x.reshape(-1, d), rho, g).view_as(x), toy.augment(x.reshape(-1, d), rho, g).view_as(x)
        objective = (torch.sigmoid(a @ w.transpose(1, 2)) * torch.sigmoid(b @ w.transpose(1, 2))).sum() / n - alpha * (w**2).sum()
        (grad,) = torch.autograd.grad(objective, w)
        with torch.no_grad():
            w += lr * grad
    ws = w0.clone().requires_grad_()
    v = torch.tensor([0.1, -0.1], dtype=F64).repeat(seeds, 1).requires_grad_()
    target = (label > 0).double()
    for _ in range(steps):
        logits = (torch.sigmoid(x @ ws.transpose(1, 2)) * v[:, None, :]).sum(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum") / n + alpha * (ws**2).sum()
        gw, gv = torch.autograd.grad(loss, (ws, v))
        with torch.no_grad():
            ws -= lr * gw
            v -= lr * gv
    return w.detach(), ws.detach()


def claim_4(seeds=10):
    """‖Pe1‖, ‖Pe2‖ of two SSL sigmoid neurons and of a supervised two-layer sigmoid network."""
    ssl, sup = two_neurons(seeds)
    ssl_e1, ssl_e2 = _span_projections(ssl)
    sup_e1, sup_e2 = _span_projections(sup)
    free, _ = two_neurons(seeds, split_init=False)
    free_e2 = _span_projections(free)[1]
    return dict(
        ssl_e1=ssl_e1.tolist(), ssl_e2=ssl_e2.tolist(), sup_e1=sup_e1.tolist(), sup_e2=sup_e2.tolist(),
        random_init_both=int((free_e2 > 0.7).sum()), seeds=seeds,
    )


# ----------------------------------------------------------------------------- table and figures


def rows(c1, c2, c3, c4):
    """(paper, claim, measured, holds) for the table."""
    a = c2["alignment_at"]
    sv = c1["infonce_singular_values"]
    return [
        ("2205.11508", "vicreg_optimum = L-BFGS minimum (1e-6 rel.), same subspace",
         f"loss gap {c1['lbfgs_loss_gap']:.1e}, subspace distance {c1['subspace_distance']:.1e}",
         c1["lbfgs_loss_gap"] < 1e-6 and c1["subspace_distance"] < 1e-4),
        ("2205.11508", "rank Z* = #{λ_j < βN/(γ(N−1))}, down to components − 1",
         f"{'all' if c1['ranks_follow_threshold'] else 'NOT all'} of {len(c1['gammas'])} γ; large γ: rank {c1['rank_curve'][-1]} ({c1['components']} components)",
         c1["ranks_follow_threshold"]),
        ("2205.11508", f"InfoNCE, 4 classes: rank 3, σ = √(N/3) = {c1['infonce_target']:.4f} (1e-3)",
         f"σ = {', '.join(f'{v:.4f}' for v in sv[:3])}; σ_4 = {sv[3]:.1e}",
         max(abs(v - c1["infonce_target"]) for v in sv[:3]) < 1e-3 and sv[3] < 1e-3),
        ("2205.11508", f"quadratic VICReg, small γ: rank k = {c1['k']}", f"rank {c1['vicreg_small_gamma_rank']}", c1["vicreg_small_gamma_rank"] == c1["k"]),
        ("2402.11337", "digits alignment(2, 4, 8, 16, 32) = 50, 65, 83, 93, 98 % (±1.5)",
         ", ".join(f"{v:.1f}" for v in a.values()),
         all(abs(a[k] - t) <= 1.5 for k, t in zip((2, 4, 8, 16, 32), (50, 65, 83, 93, 98)))),
        ("2402.11337", "Gaussian denoising: alignment unchanged (1e-6)", f"max difference {c2['gaussian_difference']:.1e}", c2["gaussian_difference"] < 1e-6),
        ("2402.11337", "pixel-noise background: masking p = 0.75 adds > 10 points to alignment(8)", f"{c2['mask_gain_pixel_noise']:+.1f} points", c2["mask_gain_pixel_noise"] > 10),
        ("2402.11337", "gradient background: masking does not help (control)", f"{c2['mask_gain_gradient']:+.1f} points", c2["mask_gain_gradient"] <= 10),
        ("(sslops)", "blocky 2×2 background: pixel vs 2×2-patch masking", f"{c2['mask_gain_blocky']:+.1f} vs {c2['patch_mask_gain_blocky']:+.1f} points", None),
        ("2402.06884", "ε_s'(ψ*) = 0 for s' ≥ s, > 0 below (s = 2, 4, 6)",
         f"ε_s'/ε_0 ≤ {c3['zero_from_s']:.0e} from s on, ≥ {c3['positive_below_s']:.0e} at s − 1",
         c3["zero_from_s"] < 1e-10 and c3["positive_below_s"] > 1e-8),
        ("2402.06884", "onehot(y) linear in ψ* iff p + s ≤ d2 (residual < 1e-8 rel. iff)",
         f"p+s ≤ 20: ≤ {c3['recovered']:.0e}; p+s > 20: ≥ {c3['not_recovered']:.0e}",
         c3["recovered"] < 1e-8 and c3["not_recovered"] > 1e-8),
        ("(sslops)", "the residual jumps at p + s = d2 + 1", f"{c3['not_recovered'] / c3['recovered']:.0e}× the largest recovered one", None),
        ("2401.03214", f"SSL: ‖Pe1‖ > 0.95 and ‖Pe2‖ > 0.7 ({c4['seeds']} seeds)",
         f"min ‖Pe1‖ {min(c4['ssl_e1']):.4f}, min ‖Pe2‖ {min(c4['ssl_e2']):.4f}",
         min(c4["ssl_e1"]) > 0.95 and min(c4["ssl_e2"]) > 0.7),
        ("2401.03214", "supervised: ‖Pe2‖ < 0.05", f"max ‖Pe2‖ {max(c4['sup_e2']):.4f} (min ‖Pe1‖ {min(c4['sup_e1']):.4f})", max(c4["sup_e2"]) < 0.05),
        ("(sslops)", "SSL from unconstrained random init", f"{c4['random_init_both']}/{c4['seeds']} seeds capture e2", None),
    ]


def print_table(table):
    widths = [max(len(str(r[i])) for r in table) for i in range(3)]
    header = ("paper", "claim", "measured by sslops")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  holds")
    print("  ".join("-" * w for w in widths) + "  -----")
    for paper, claim, measured, holds in table:
        mark = "—" if holds is None else ("yes" if holds else "NO")
        print("  ".join(str(v).ljust(w) for v, w in zip((paper, claim, measured), widths)) + f"  {mark}")


def plot(c1, c2, c3, c4, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover
        raise SystemExit("--plot needs matplotlib (pip install 'sslops[examples]')") from exc
    os.makedirs(out, exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    ax = axes[0]
    ax.semilogx(c1["gammas"], c1["rank_curve"], "o-", ms=3, label="rank of vicreg_optimum (k = 8)")
    ax.axhline(c1["components"] - 1, color="grey", ls=":", label="components − 1")
    ax.set(xlabel="γ / β", ylabel="rank", title="1. VICReg over G: rank against γ")
    ax.legend(fontsize=8)
    ax = axes[1]
    for name, curve in c2["curves"].items():
        ks = range(1, curve.numel() + 1)
        ax.plot(ks, 100 * curve, label=name, ls="--" if "masked" in name else "-")
    ax.set(xlabel="k (directions)", ylabel="alignment (%)", title="2. digits: reconstruction vs perception", xlim=(1, 40))
    ax.legend(fontsize=8)
    ax = axes[2]
    for s, eps in c3["tails"].items():
        ax.semilogy(range(eps.numel()), (eps / eps[0]).clamp_min(1e-17), "o-", label=f"s = {s}")
    ax.set(xlabel="s'", ylabel="ε_s' / ε_0 (exact zeros drawn at 1e-17)", title="3. redundancy tail of ψ*")
    ax.legend(fontsize=8)
    ax = axes[3]
    seeds = range(c4["seeds"])
    for key, marker, name in (("ssl_e1", "o", "SSL ‖Pe1‖"), ("ssl_e2", "s", "SSL ‖Pe2‖"), ("sup_e1", "^", "supervised ‖Pe1‖"), ("sup_e2", "x", "supervised ‖Pe2‖")):
        ax.plot(seeds, c4[key], marker, label=name)
    ax.set(xlabel="seed", ylabel="norm of the projection", title="4. two sigmoid neurons", ylim=(-0.05, 1.05))
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "seeds.png")
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plot", action="store_true", help="draw the four figures (matplotlib)")
    parser.add_argument("--out", default="seeds_figures", help="folder for the figures")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny problems: one thread is several times faster than two on a busy CPU
    results = []
    for claim in (claim_1, claim_2, claim_3, claim_4):
        start = time.perf_counter()
        results.append(claim())
        print(f"[{claim.__name__}: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    print_table(rows(*results))
    if args.plot:
        plot(*results, args.out)


if __name__ == "__main__":
    main()
