"""Layer-parallel training with the library: a 64-layer dense ResNet on the
peaks data set, split over the ranks of MPI.COMM_WORLD.

    mpiexec -n 4 .venv/bin/python examples/train_library.py [--epochs 2]

Every rank runs the same loop on the same batches; rank 0 prints.
"""
import argparse

import torch
import torch.nn.functional as F
from mpi4py import MPI

from layerpar import DenseClosing, DenseOpening, DenseStep, Network
from layerpar.data import load_dataset


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--nlayers", type=int, default=64)
    args = p.parse_args()

    torch.set_num_threads(1)                       # one thread per rank
    comm = MPI.COMM_WORLD
    first, last = comm.rank == 0, comm.rank == comm.size - 1
    data = load_dataset("peaks", dtype=torch.float64, need_inputs=first, need_labels=last,
                        comm=comm)
    batches = data.train.loader(batch_size=100, seed=0, need_inputs=first, need_labels=last)

    net = Network(lambda: DenseOpening(2, 8),      # first rank
                  lambda n: DenseStep(8, "tanh"),  # F_n, layer n (built where it lives)
                  lambda: DenseClosing(8, 5),      # last rank
                  nlayers=args.nlayers, T=4.0, comm=comm,
                  max_levels=2, cfactor=4, relax="F", skip=True,
                  fwd_iters=2, bwd_iters=1).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(args.epochs):
        total = 0.0
        for x, y in batches.epoch(epoch):          # the same batches on every rank
            opt.zero_grad()
            loss = net.loss(x, y, F.cross_entropy)  # real on the last rank
            loss.backward()                         # adjoint MGRIT on every rank
            opt.step()
            total += net.reduce(loss)               # the last rank's value, on every rank
        if comm.rank == 0:
            print(f"epoch {epoch + 1}: mean loss {total / len(batches):.4f}, MGRIT iterations "
                  f"{net.body.last_forward['iterations']}/{net.body.last_backward['iterations']}",
                  flush=True)


if __name__ == "__main__":
    main()
