"""A ResNet written as plain PyTorch, made layer-parallel in one call and
trained by an ordinary loop (torch.optim.SGD, a learning-rate schedule, a
DataLoader, gradient clipping, evaluation under torch.no_grad()).

    mpiexec -n 2 python examples/dropin_resnet.py [--steps 30] [--blocks 8] [--levels 2]

Every rank builds the same model and iterates over the same batches; the
network takes rank 0's weights, and each rank keeps only its own blocks.
``--levels 1`` propagates exactly (layer-serial across the ranks); more
levels run layer-parallel MGRIT with inexact gradients.  Rank 0 prints.
"""
import argparse

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import layerpar


class BasicBlock(nn.Module):
    """x -> relu(x + bn(conv(relu(bn(conv(x))))))."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


def resnet(channels, blocks, classes):
    stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))
    return nn.Sequential(stem, *[BasicBlock(channels) for _ in range(blocks)], head)


def squares(n, seed):
    """8x8 noisy images with a bright 4x4 square in one of the four
    quadrants; the label is the quadrant."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for i, k in enumerate(y.tolist()):
        r, c = divmod(k, 2)
        x[i, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 1.0
    return x, y


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--levels", type=int, default=2)
    args = p.parse_args()

    torch.set_num_threads(1)                       # one thread per rank
    comm = MPI.COMM_WORLD
    torch.manual_seed(0)
    model = resnet(channels=4, blocks=args.blocks, classes=4)   # the whole model, as usual

    net = layerpar.parallelize(model[0], blocks=model[1:-1], head=model[-1], comm=comm,
                               h=1.0, max_levels=args.levels, cfactor=2,
                               fwd_iters=2, bwd_iters=1)
    del model                                      # now each rank holds only its blocks

    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    train = TensorDataset(*squares(512, seed=1))
    loader = DataLoader(train, batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))  # the same order everywhere

    step = 0
    while step < args.steps:
        for x, y in loader:
            net.train()
            opt.zero_grad()
            loss = net.step(x, y, F.cross_entropy)  # forward and backward, every rank
            net.clip_grad_norm_(5.0)                # the global norm, over every rank
            opt.step()
            schedule.step()
            step += 1
            if comm.rank == 0 and (step % 10 == 0 or step == 1):
                print(f"step {step}: loss {loss:.4f}", flush=True)
            if step == args.steps:
                break

    xv, yv = squares(256, seed=2)
    net.eval()
    with torch.no_grad():
        scores = net(xv)                           # class scores on the last rank
    correct = int((scores.argmax(1) == yv).sum()) if net.is_last else 0
    accuracy = net.reduce(correct) / len(yv)       # the last rank's count, on every rank
    if comm.rank == 0:
        print(f"validation accuracy {accuracy:.3f}", flush=True)
    net.close()


if __name__ == "__main__":
    main()
