"""Train a small MLP encoder on scikit-learn's digits with every sslops loss, and see what it learned.

    python examples/train_digits.py                 # every loss, the default budget (CPU)
    python examples/train_digits.py --plot          # and accuracy / RankMe over training (matplotlib)
    python examples/train_digits.py --losses vicreg barlow_twins --steps 500

The digits (1797 images of 8×8 pixels, bundled with scikit-learn: nothing is downloaded) are
split once into 1297 training and 500 test images. Each loss trains the same encoder
(64 → 256 → 256 → 16, batch norm and ReLU, the 16-dim output is the embedding) with a
projector (16 → 128 → 128) on two augmented views of a batch (random rotation ±12°,
scaling 0.9–1.1, shifts of up to a pixel, 10 % pixel dropout, Gaussian noise), Adam, the
same number of steps for every loss. Then, on the 500 test images:

- **few-label linear probe**: logistic regression (standardised features, L2 ½‖W‖², by
  L-BFGS) on 10 labelled training images per class (100 in all), averaged over 5 draws. Full-label probes do not separate
  anything on digits: a random MLP's features already probe at 96–97 %.
- **k-NN** (k = 5, cosine) with the same 100 labelled images as the bank;
- **RankMe** (sslops.metrics.rankme) of the test embeddings, at most 16;
- the time per training step.

Baselines: raw pixels, the same encoder at its random initialisation, and the encoder
trained with cross-entropy on all 1297 training labels (supervised) with the same
augmentations and budget. SupCon uses the training labels too (it is a supervised loss).

The losses (sslops functions, defaults unless said):

==============  =============================================================================
nt_xent         ``nt_xent_loss(p_a, p_b, temperature=0.2)`` (SimCLR)
supcon          ``info_nce_loss([p_a; p_b], labels=[y; y], temperature=0.2)`` (labels used)
vicreg          ``vicreg_loss(p_a, p_b)``
vicreg_g        ``vicreg_relation_loss([p_1; …; p_4], labels=sample ids)``: 4 views, G = same image
barlow_twins    ``barlow_twins_loss(p_a, p_b)``
matrix_ssl      ``½[matrix_ssl_loss(p_b', p_a) + matrix_ssl_loss(p_a', p_b)]``, p' = detached target
==============  =============================================================================
"""

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import sslops
from sslops.metrics import rankme

LOSSES = ("nt_xent", "supcon", "vicreg", "vicreg_g", "barlow_twins", "matrix_ssl")
LABELLED_PER_CLASS = 10
DRAWS = 5
EMBED = 16


# ----------------------------------------------------------------------------- data


def load_split(seed=0, test=500):
    """Digits as (N, 1, 8, 8) float32 in [0, 1] and labels, split once into train and test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover
        raise SystemExit("this example needs scikit-learn (pip install 'sslops[examples]')") from exc
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, held = order[test:], order[:test]
    return x[train], y[train], x[held], y[held]


def augment(x, g):
    """Random rotation ±12°, scale 0.9–1.1, shift ±1 px (bilinear), 10 % pixel dropout, N(0, 0.05²) noise."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(12)
    scale = 0.9 + 0.2 * torch.rand(n, generator=g)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 / 8)  # ±1 pixel in [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    out = out * (torch.rand(out.shape, generator=g) > 0.1)
    return (out + 0.05 * torch.randn(out.shape, generator=g)).flatten(1)


# ----------------------------------------------------------------------------- model


def mlp(*sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [torch.nn.BatchNorm1d(b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.ModuleDict({"encoder": mlp(64, 256, 256, EMBED), "projector": mlp(EMBED, 128, 128)})


def loss_step(name, model, x, y, g):
    """The loss of one batch: views, projections, an sslops loss."""
    views = 4 if name == "vicreg_g" else 2
    p = model["projector"](model["encoder"](torch.cat([augment(x, g) for _ in range(views)])))
    if name == "vicreg_g":
        return sslops.vicreg_relation_loss(p, labels=torch.arange(len(x)).repeat(views))
    p_a, p_b = p.chunk(2)
    if name == "nt_xent":
        return sslops.nt_xent_loss(p_a, p_b, temperature=0.2)
    if name == "supcon":
        return sslops.info_nce_loss(p, labels=torch.cat([y, y]), temperature=0.2)
    if name == "vicreg":
        return sslops.vicreg_loss(p_a, p_b)
    if name == "barlow_twins":
        return sslops.barlow_twins_loss(p_a, p_b)
    if name == "matrix_ssl":
        return 0.5 * (sslops.matrix_ssl_loss(p_b.detach(), p_a) + sslops.matrix_ssl_loss(p_a.detach(), p_b))
    if name == "supervised":
        return F.cross_entropy(model["head"](model["encoder"](augment(x, g))), y)
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")


# ----------------------------------------------------------------------------- evaluation


def labelled_draws(y_train, draws=DRAWS, per_class=LABELLED_PER_CLASS, seed=0):
    """``draws`` index sets of ``per_class`` training images per class (the same for every method)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(draws):
        picks = [torch.nonzero(y_train == c).flatten() for c in range(10)]
        out.append(torch.cat([p[torch.randperm(len(p), generator=g)[:per_class]] for p in picks]))
    return out


def linear_probe(train, labels, test, classes=10):
    """Multinomial logistic regression (L2 weight ½‖W‖², scikit-learn's C = 1) on standardised features, by L-BFGS."""
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-12)
    train, test = (train - mean) / std, (test - mean) / std
    weight = torch.zeros(train.shape[1], classes, dtype=train.dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=train.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(train @ weight + bias, labels, reduction="sum") + 0.5 * (weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (test @ weight + bias).argmax(dim=1)


def knn(train, labels, test, k=5, classes=10):
    """Majority vote of the k nearest labelled embeddings by cosine similarity (ties: the smaller class)."""
    sim = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    votes = F.one_hot(labels[sim.topk(k, dim=1).indices], classes).sum(dim=1)
    return votes.argmax(dim=1)


def evaluate(embed_train, y_train, embed_test, y_test, draws):
    """Few-label probe and k-NN accuracy (%), averaged over the draws; RankMe of the test embeddings."""
    a_train, a_test = embed_train.double(), embed_test.double()
    probe, near = [], []
    for idx in draws:
        probe.append(100 * float((linear_probe(a_train[idx], y_train[idx], a_test) == y_test).double().mean()))
        near.append(100 * float((knn(a_train[idx], y_train[idx], a_test) == y_test).double().mean()))
    return dict(probe=statistics.fmean(probe), knn=statistics.fmean(near), rankme=float(rankme(a_test)))


@torch.no_grad()
def embeddings(model, x):
    model.eval()
    out = model["encoder"](x.flatten(1))
    model.train()
    return out


# ----------------------------------------------------------------------------- training


def _progress(total, desc, quiet):
    if quiet:
        return None
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
    except ImportError:
        return None


def train(name, data, *, steps, batch_size=256, lr=2e-3, seed=0, eval_every=0, quiet=False):
    """Train one model with ``name``'s loss for ``steps`` steps; return the final metrics and the curve."""
    x_train, y_train, x_test, y_test, draws = data
    model = make_model(seed)
    if name == "supervised":
        model["head"] = torch.nn.Linear(EMBED, 10)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    g = torch.Generator().manual_seed(seed + 1)
    curve, step_times = [], []
    bar = _progress(steps, name, quiet)
    for step in range(1, steps + 1):
        idx = torch.randperm(len(x_train), generator=g)[:batch_size]
        start = time.perf_counter()
        loss = loss_step(name, model, x_train[idx], y_train[idx], g)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step_times.append(time.perf_counter() - start)
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"{name}: the loss became {float(loss)} at step {step}")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        elif not quiet and step % max(1, steps // 4) == 0:
            print(f"  {name}: step {step}/{steps}, loss {float(loss.detach()):.4f}", file=sys.stderr)
        if eval_every and (step % eval_every == 0 or step == steps):
            curve.append((step, evaluate(embeddings(model, x_train), y_train, embeddings(model, x_test), y_test, draws)))
    if bar is not None:
        bar.close()
    result = evaluate(embeddings(model, x_train), y_train, embeddings(model, x_test), y_test, draws)
    result["ms_per_step"] = 1000 * statistics.median(step_times)
    result["seconds"] = sum(step_times)
    return result, curve


def baselines(data, seed=0):
    """Raw pixels and the random encoder (the models' initialisation, untrained)."""
    x_train, y_train, x_test, y_test, draws = data
    out = {"pixels": evaluate(x_train.flatten(1), y_train, x_test.flatten(1), y_test, draws)}
    out["random encoder"] = evaluate(embeddings(make_model(seed), x_train), y_train, embeddings(make_model(seed), x_test), y_test, draws)
    return out


def run(losses=LOSSES, steps=300, batch_size=256, seed=0, eval_every=0, quiet=False, supervised=True):
    """Baselines, then every loss (and the supervised encoder): {name: metrics}, {name: curve}."""
    x_train, y_train, x_test, y_test = load_split()
    data = (x_train, y_train, x_test, y_test, labelled_draws(y_train))
    results, curves = baselines(data, seed), {}
    for name in tuple(losses) + (("supervised",) if supervised else ()):
        results[name], curves[name] = train(name, data, steps=steps, batch_size=batch_size, seed=seed, eval_every=eval_every, quiet=quiet)
    return results, curves


def print_table(results):
    print(f"{'encoder':<16} {'probe, 10/class':>16} {'k-NN, 10/class':>15} {'RankMe':>7} {'ms/step':>8} {'train s':>8}")
    for name, r in results.items():
        timing = f"{r['ms_per_step']:8.1f} {r['seconds']:8.1f}" if "ms_per_step" in r else f"{'—':>8} {'—':>8}"
        print(f"{name:<16} {r['probe']:15.1f}% {r['knn']:14.1f}% {r['rankme']:7.2f} {timing}")


def plot(curves, baseline, out, pixels=None):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover
        raise SystemExit("--plot needs matplotlib (pip install 'sslops[examples]')") from exc
    os.makedirs(out, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for (key, title), ax in zip((("probe", "few-label linear probe (%)"), ("knn", "few-label k-NN (%)"), ("rankme", "RankMe (of 16)")), axes):
        for name, curve in curves.items():
            if curve:
                ax.plot([s for s, _ in curve], [m[key] for _, m in curve], "-o", ms=3, label=name)
        ax.axhline(baseline[key], color="grey", ls=":", label="random encoder")
        if pixels is not None and key != "rankme":
            ax.axhline(pixels[key], color="black", ls="--", lw=0.8, label="raw pixels")
        ax.set(xlabel="step", title=title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "train_digits.png")
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--steps", type=int, default=300, help="training steps per loss")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small matrices: 1 is fastest on a shared CPU)")
    parser.add_argument("--plot", action="store_true", help="evaluate during training and draw accuracy and RankMe (matplotlib)")
    parser.add_argument("--out", default="train_digits_figures")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results, curves = run(args.losses, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                          eval_every=max(1, args.steps // 10) if args.plot else 0, quiet=args.quiet)
    print_table(results)
    cpu = "C++ CPU kernels" if sslops.backends()["cpu"]["available"] else "the PyTorch reference (no C++ extension)"
    print(f"total {time.perf_counter() - start:.0f} s on {args.threads} thread(s); losses ran on {cpu}")
    if args.plot:
        plot(curves, results["random encoder"], args.out, pixels=results["pixels"])


if __name__ == "__main__":
    main()
