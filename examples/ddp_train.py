"""sslops in an ordinary DistributedDataParallel training loop.

Runs on CPU with the gloo backend (NCCL when every rank has a GPU), two processes::

    torchrun --nproc_per_node=2 examples/ddp_train.py --steps 20

and unchanged as one process (``python examples/ddp_train.py``): ``gather=True`` without a
process group is the single-process loss. Each rank draws its own two augmented views of
its own samples; ``gather=True`` makes the losses see the global batch (conventions §5;
README, "Distributed training"): VICReg and Barlow Twins exchange either the rows or their K×K
sums, whichever moves fewer bytes (``--gather rows|sums`` forces one), InfoNCE puts the
local anchors against every rank's rows. Every rank returns a loss whose mean over ranks is the global-batch loss and
whose gradient is W times the global gradient of its rows, so DDP's gradient averaging
trains exactly as one process on the concatenated batch would.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import sslops

if dist.is_available():
    # Imported before init_process_group on purpose (torch 2.13, 2026-11-30). DDP imports this
    # module lazily, and its functions' default argument ``group=group.WORLD`` would then hold
    # the default process group until the interpreter exits, so that destroy_process_group()
    # could not free it nor join gloo's worker threads (see the end of main()).
    import torch.distributed.nn.functional  # noqa: F401


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="samples per rank")
    parser.add_argument("--dim", type=int, default=32, help="input features")
    parser.add_argument("--embed", type=int, default=16, help="embedding features K")
    parser.add_argument("--loss", choices=("vicreg", "barlow", "simclr"), default="vicreg")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--gather", choices=("auto", "rows", "sums"), default="auto",
                        help="forward path of the covariance losses across ranks (auto: fewer bytes)")
    return parser.parse_args()


def setup():
    """Join the torchrun process group if launched by torchrun; else run as one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cpu")
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["LOCAL_WORLD_SIZE"])
    if use_cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def augment(x, generator):
    """A toy augmentation: random feature dropout plus noise."""
    keep = (torch.rand(x.shape, generator=generator, device=x.device) > 0.1).to(x.dtype)
    return x * keep + 0.1 * torch.randn(x.shape, generator=generator, device=x.device)


def main():
    args = parse_args()
    rank, world, device = setup()
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    encoder = torch.nn.Sequential(
        torch.nn.Linear(args.dim, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Linear(64, args.embed),
    ).to(device)
    model = DDP(encoder) if world > 1 else encoder
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    data = torch.Generator(device=device).manual_seed(1234 + rank)  # different data on every rank
    centres = torch.randn(10, args.dim, generator=torch.Generator().manual_seed(0)).to(device)
    if rank == 0:
        print(f"world size {world}, {args.batch_size} samples per rank, loss {args.loss}", flush=True)

    for step in range(1, args.steps + 1):
        idx = torch.randint(0, 10, (args.batch_size,), generator=data, device=device)
        x = centres[idx] + 0.5 * torch.randn(args.batch_size, args.dim, generator=data, device=device)
        views = torch.cat([augment(x, data), augment(x, data)])
        z = model(views)  # one forward per step: both views in one batch
        z_a, z_b = z.chunk(2)
        if args.loss == "vicreg":
            loss = sslops.vicreg_loss(z_a, z_b, gather=args.gather)
        elif args.loss == "barlow":
            loss = sslops.barlow_twins_loss(z_a, z_b, gather=args.gather)
        else:
            loss = sslops.nt_xent_loss(z_a, z_b, temperature=0.5, gather=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        # The per-rank losses average to the global-batch loss: report that average.
        shown = loss.detach().clone()
        if world > 1:
            dist.all_reduce(shown)
            shown /= world
        if rank == 0:
            print(f"step {step}: global-batch loss {shown.item():.4f}", flush=True)

    if world > 1:
        # Leave the process group in this order, so that none of gloo's threads outlives Python
        # (before: ~3 runs in 20 aborted after training on a loaded machine). A gloo worker
        # thread still holding a finished collective's tensors when the interpreter shuts down
        # needs the GIL to release them and dies with "terminate called without an active
        # exception" (SIGABRT). So every rank waits for the others (none leaves while a peer
        # still sends), DDP goes first (its reducer holds a reference to the process group),
        # and destroy_process_group() drops the last reference: its destructor joins gloo's
        # threads here, with Python whole.
        dist.barrier()
        del model, optimizer
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
