"""The exact pipeline against serial propagation, time per training step,
measured side by side in one run.

Variants (all exact: the serial network's outputs and gradients):
  serial P=1     max_levels=1 on one rank (the others wait)
  serial P       max_levels=1 across all ranks (layer-serial, one batch)
  pipeline P     max_levels=1, --microbatches micro-batches (GPipe schedule)
  1f1b P         the same with the 1F1B schedule (one forward, one backward)
A training step is forward, loss, backward and an SGD step.  Conv network:
opening conv, N residual conv layers, closing pool + linear; one torch thread
per rank.  Repetitions alternate between the variants and the median is
reported, so load on the machine affects all alike.  Memory: in one more
step of each variant, the peak over the step of the bytes autograd holds for
backward (distinct storages of the saved tensors: activations, received
micro-batches and, once each, the weights), the maximum over the ranks, and
the most micro-batch graphs a rank held at once.

    mpiexec -n 2 python benchmarks/bench_pipeline.py [--layers 32] [--batch 64]
Writes benchmarks/results/pipeline.csv.
"""
import argparse
import csv
import os
import statistics
import time

import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from layerpar import ConvClosing, ConvOpening, ConvStep, Network

import _common as common

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class SavedBytes:
    """The bytes of the distinct storages autograd holds for backward: live
    now and the peak (saved_tensors_hooks: pack counts, the packed object's
    release uncounts)."""

    def __init__(self):
        self.live = self.peak = 0
        self.refs = {}  # storage address -> (packed tensors holding it, bytes)

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        count, nbytes = self.refs.get(key, (0, t.untyped_storage().nbytes()))
        if count == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[key] = (count + 1, nbytes)
        return _Saved(t, key, self)

    @staticmethod
    def unpack(saved):
        return saved.tensor

    def release(self, key):
        count, nbytes = self.refs[key]
        if count == 1:
            del self.refs[key]
            self.live -= nbytes
        else:
            self.refs[key] = (count - 1, nbytes)


class _Saved:
    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor, key, meter):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        self.meter.release(self.key)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.conv_pipeline_args(p, reps=7)
    a = p.parse_args()
    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    P = world.size

    def network(comm, microbatches, schedule="gpipe"):
        return Network(lambda: ConvOpening(1, a.channels),
                       lambda n: ConvStep(a.channels, 3, "relu"),
                       lambda: ConvClosing(a.channels, 10, pool=4),
                       nlayers=a.layers, T=1.0, comm=comm, seed=1, max_levels=1,
                       microbatches=microbatches, schedule=schedule)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 1, a.size, a.size, generator=g)
    y = torch.randint(0, 10, (a.batch,), generator=g)

    nets = {f"serial_P{P}": network(world, 1), f"pipeline_P{P}": network(world, a.microbatches),
            f"1f1b_P{P}": network(world, a.microbatches, "1f1b")}
    alone = network(MPI.COMM_SELF, 1) if world.rank == 0 else None

    def step(net):
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)

        def run():
            opt.zero_grad()
            net.loss_and_backward(x, y, Fn.cross_entropy)
            opt.step()
        return run

    runs = {k: step(v) for k, v in nets.items()}
    one = step(alone) if alone is not None else None

    def timed(key):
        world.Barrier()
        t = time.perf_counter()
        if key == "serial_P1":
            if one is not None:
                one()
        else:
            runs[key]()
        world.Barrier()
        return time.perf_counter() - t

    keys = ["serial_P1"] + list(runs)
    for k in keys:  # warm-up
        timed(k)
    times = {k: [] for k in keys}
    for _ in range(a.reps):
        for k in keys:
            times[k].append(timed(k))
    memory, held = {}, {}
    for k in keys:
        meter = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            timed(k)
        memory[k] = world.allreduce(meter.peak, op=MPI.MAX)
        net = alone if k == "serial_P1" else nets[k]
        mine = net.body.pipeline.peak_held if net is not None and net.body.pipelined else 0
        held[k] = world.allreduce(mine, op=MPI.MAX)
    med = {k: statistics.median(v) for k, v in times.items()}
    vt = {k: nets[k].body.last_forward["virtual_time"] + nets[k].body.last_backward["virtual_time"]
          for k in nets}
    if world.rank != 0:
        return
    base = med["serial_P1"]
    print(f"conv network: {a.layers} layers, {a.channels} channels, {a.size}x{a.size}, "
          f"batch {a.batch}, float32, 1 thread per rank, {P} ranks, median of {a.reps}")
    print(f"  {'variant':<16} {'s/step':>9} {'vs serial P=1':>14} {'vs serial P=' + str(P):>14}"
          f" {'model':>8} {'saved MiB':>10} {'vs gpipe':>9} {'held':>5}")
    rows = []
    gp = memory[f"pipeline_P{P}"]
    for k in keys:
        model = vt.get(k, 2.0 * a.layers)
        mib = memory[k] / 2**20
        print(f"  {k:<16} {med[k]:9.4f} {base / med[k]:13.2f}x "
              f"{med[f'serial_P{P}'] / med[k]:13.2f}x {model:8.1f} {mib:10.2f} "
              f"{memory[k] / gp:9.2f} {held[k]:5d}")
        rows.append((k, med[k], base / med[k], med[f"serial_P{P}"] / med[k], model,
                     memory[k], memory[k] / gp, held[k]))
    print("  (speed-ups: higher is faster; model = virtual clock of forward + backward in "
          "full-batch layer steps; saved = peak bytes held for backward on a rank; held = "
          "most micro-batch graphs a rank held)")
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "pipeline.csv")
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "seconds_per_step", "speedup_vs_serial_P1",
                    f"speedup_vs_serial_P{P}", "virtual_time", "peak_saved_bytes",
                    "peak_saved_vs_gpipe", "microbatches_held"])
        w.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
