"""Watching for collapse while training: RankMe, LiDAR and SimSiam's std logged every step.

Two small encoders learn from two augmented views of scikit-learn's digits (a synthetic
10-class mixture of the same shape when scikit-learn is not installed): one with VICReg,
one with the negative cosine similarity of the views alone (SimSiam without its predictor
and stop-gradient), which collapses within a few dozen steps. Every step logs, for
each, the RankMe of the batch (``sslops.metrics.rankme``: one K×K Gram and a K×K
``eigvalsh``, no SVD), SimSiam's ``std_of_l2_normalized`` and, with torchmetrics, the
streaming ``RankMe`` / ``LiDAR`` over all rows since the last ``reset`` (here: every
``--epoch-steps`` steps; each batch holds two views of each image, so the views of a
source come in the same update, as LiDAR needs)::

    python examples/monitor_collapse.py --steps 60
    python examples/monitor_collapse.py --steps 60 --lightning   # the same in Lightning: self.log

In an ordinary loop the habit is ``metric.update(z.detach())`` every step and
``metric.compute()`` / ``metric.reset()`` when logging; in Lightning it is
``self.rankme(z.detach())`` then ``self.log("rankme", self.rankme)``, which calls
``compute`` and ``reset`` at the end of each epoch (and syncs across devices under DDP).
"""

import argparse
import sys

import torch

import sslops
from sslops import metrics


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (two views each)")
    parser.add_argument("--embed", type=int, default=32, help="embedding features K")
    parser.add_argument("--epoch-steps", type=int, default=10, help="steps between compute()/reset() of the streaming metrics")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--lightning", action="store_true", help="train the VICReg encoder with Lightning, logging with self.log")
    return parser.parse_args()


def load_data():
    """(x (N, 64) float32 scaled to [0, 1], source name)."""
    try:
        from sklearn.datasets import load_digits

        return torch.tensor(load_digits().data, dtype=torch.float32) / 16.0, "scikit-learn digits"
    except ImportError:
        g = torch.Generator().manual_seed(0)
        centres = torch.rand(10, 64, generator=g)
        labels = torch.randint(0, 10, (1797,), generator=g)
        x = (centres[labels] + 0.2 * torch.randn(1797, 64, generator=g)).clamp(0, 1)
        return x, "synthetic 10-class mixture (scikit-learn not installed)"


def augment(x, generator):
    """Random pixel masking (p = 0.25) plus Gaussian noise."""
    keep = (torch.rand(x.shape, generator=generator) > 0.25).to(x.dtype)
    return x * keep + 0.1 * torch.randn(x.shape, generator=generator)


def encoder(embed):
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, embed))


def batches(x, batch_size, steps, seed=0):
    """(images, views (2B, 64), groups (2B,)) for each step: two views of each image."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        images = x[torch.randint(0, x.shape[0], (batch_size,), generator=g)]
        views = torch.cat([augment(images, g), augment(images, g)])
        yield views, torch.arange(batch_size).repeat(2)


def objective(name, z, batch_size):
    z_a, z_b = z[:batch_size], z[batch_size:]
    if name == "vicreg":
        return sslops.vicreg_loss(z_a, z_b)
    # SimSiam without its stop-gradient and predictor: the collapsed constant is a minimiser
    return -torch.nn.functional.cosine_similarity(z_a, z_b).mean()


def streaming_metrics(k):
    """The torchmetrics forms when torchmetrics is installed, else None."""
    try:
        return {"RankMe": metrics.RankMe(k), "LiDAR": metrics.LiDAR(k)}
    except ImportError:
        return None


def train_plain(args, x):
    """An ordinary loop: log per step, compute/reset the streaming metrics per "epoch"."""
    runs = {}
    for name in ("vicreg", "collapsing"):
        torch.manual_seed(0)
        model = encoder(args.embed)
        runs[name] = (model, torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9), streaming_metrics(args.embed))
    if runs["vicreg"][2] is None:
        print("torchmetrics not installed: the streaming RankMe/LiDAR columns stay empty (pip install \"sslops[metrics]\")")
    columns = f"{'loss':>8} {'rankme':>7} {'std·√K':>7} {'RankMe*':>7} {'LiDAR*':>7}"
    print(f"{'':8} | {'VICReg':^40} | {'-cos(z_a, z_b) (collapses)':^40}")
    print(f"{'':8} | {columns} | {columns}")
    for step, (views, groups) in enumerate(batches(x, args.batch_size, args.steps), 1):
        cells = []
        for name, (model, opt, streaming) in runs.items():
            z = model(views)
            loss = objective(name, z, args.batch_size)
            opt.zero_grad()
            loss.backward()
            opt.step()
            z = z.detach()
            cell = f"{float(loss.detach()):8.4f} {float(metrics.rankme(z)):7.2f} {float(metrics.std_of_l2_normalized(z)) * args.embed ** 0.5:7.3f}"
            if streaming is not None:
                streaming["RankMe"].update(z)  # no host sync: fine every step
                streaming["LiDAR"].update(z, groups)
            if streaming is not None and (step % args.epoch_steps == 0 or step == args.steps):
                cell += f" {float(streaming['RankMe'].compute()):7.2f} {float(streaming['LiDAR'].compute()):7.2f}"
                for metric in streaming.values():
                    metric.reset()
            else:
                cell += " " * 16
            cells.append(cell)
        print(f"step {step:3d} | {cells[0]} | {cells[1]}")
    print(f"rankme, std·√K: this batch (sslops.metrics.rankme, std_of_l2_normalized); RankMe*, LiDAR*: "
          f"streaming over every row since the last reset (every {args.epoch_steps} steps)")


def train_lightning(args, x):
    """The same VICReg run as a LightningModule: the metric is a module attribute, logged with self.log."""
    try:
        import lightning as L
    except ImportError:
        try:
            import pytorch_lightning as L
        except ImportError:
            raise SystemExit("--lightning needs Lightning: pip install lightning") from None

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder = encoder(args.embed)
            self.rankme = metrics.RankMe(args.embed)  # a torchmetrics Metric: moved, synced and reset by Lightning
            self.lidar = metrics.LiDAR(args.embed)

        def training_step(self, batch, batch_idx):
            views, groups = batch
            z = self.encoder(views)
            loss = sslops.vicreg_loss(z[:args.batch_size], z[args.batch_size:])
            self.rankme(z.detach())  # update, and the batch's own value for on_step logging
            self.lidar.update(z.detach(), groups)
            self.log("loss", loss, prog_bar=True)
            self.log("rankme", self.rankme, on_step=True, on_epoch=True)
            self.log("lidar", self.lidar, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=args.lr, momentum=0.9)

    data = list(batches(x, args.batch_size, args.steps))
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)
    torch.manual_seed(0)
    module = Module()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, loader)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(f"Lightning, {args.steps} steps (step {args.steps}): " + ", ".join(f"{k} = {v:.4f}" for k, v in sorted(logged.items())))


def main():
    args = parse_args()
    x, source = load_data()
    print(f"data: {source}, {x.shape[0]} images of {x.shape[1]} pixels; K = {args.embed}")
    if args.lightning:
        train_lightning(args, x)
    else:
        train_plain(args, x)
    return 0


if __name__ == "__main__":
    sys.exit(main())
