"""layerpar's exact pipeline against torch.distributed.pipelining, time per
training step, measured side by side in one run.

Both run the conv network of ``bench_pipeline.py`` (opening conv, N residual
conv layers, closing pool + linear) with the same stages (rank r holds the
layers layerpar's layout gives it, the opening on the first rank and the
closing on the last), the same initial weights (torch's stages are copies of
layerpar's modules), the same micro-batches and the same schedule: GPipe and
1F1B (``ScheduleGPipe``, ``Schedule1F1B``).  torch's side talks over a gloo
process group made from the MPI ranks (env://, a free port chosen on rank 0
and broadcast over MPI); layerpar's side is ``Network.loss_and_backward``
with one level and its automatic wait (``wait='auto'``: sleeping waits when
the node runs more ranks than it has cores).

Before timing, one step of each side in float64 from the same weights must
give the same loss and the same gradients on every rank (relative
difference printed; the run stops above 1e-10).  A training step is
zero_grad, forward, loss (cross entropy, the mean over the batch), backward
and an SGD step.  Repetitions alternate between the variants, each between
two barriers, and the median is reported with its quartiles, so load on the
machine affects all alike.  One torch thread per rank.

    mpiexec -n 4 python benchmarks/bench_pipeline_torch.py [--layers 32] [--batch 64]
                                                           [--microbatches 8] [--reps 21]
Writes benchmarks/results/pipeline_torch.csv (one row per rank count and
schedule; rows of other rank counts already there are kept).
"""
import argparse
import copy
import csv
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as Fn
from mpi4py import MPI
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from layerpar import ConvClosing, ConvOpening, ConvStep, Network

import _common as common

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
FIELDS = ["ranks", "schedule", "microbatches", "layers", "batch", "wait", "layerpar_s",
          "layerpar_q1_s", "layerpar_q3_s", "torch_s", "torch_q1_s", "torch_q3_s",
          "ratio_layerpar_over_torch", "ratio_q1", "ratio_q3", "float64_max_rel_diff", "reps"]


class StageModule(nn.Module):
    """One rank's part of the serial network: the opening (first rank), the
    residual layers u + h F(u) (computed as layerpar computes them: one fused
    add) and the closing (last rank)."""

    def __init__(self, opening, steps, h, closing):
        super().__init__()
        self.opening, self.closing = opening, closing
        self.steps = nn.ModuleList(steps)
        self.h = h

    def forward(self, u):
        if self.opening is not None:
            u = self.opening(u)
        for F in self.steps:
            u = torch.add(u, F(u), alpha=self.h)
        if self.closing is not None:
            u = self.closing(u)
        return u


def process_group(world):
    """A gloo process group of the MPI ranks (env://, a free port that rank 0
    finds and broadcasts)."""
    port = None
    if world.rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = world.bcast(port, root=0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(world.rank), WORLD_SIZE=str(world.size))
    dist.init_process_group("gloo", init_method="env://", rank=world.rank,
                            world_size=world.size)


class Pair:
    """A layerpar Network and torch's pipeline stage of the same weights, with
    ``schedule`` and ``m`` micro-batches; ``step_layerpar()`` and
    ``step_torch()`` run one training step each."""

    def __init__(self, a, world, schedule, dtype, x, y, lr):
        self.world, self.x, self.y = world, x, y
        self.net = Network(lambda: ConvOpening(1, a.channels),
                           lambda n: ConvStep(a.channels, 3, "relu"),
                           lambda: ConvClosing(a.channels, 10, pool=4),
                           nlayers=a.layers, T=1.0, comm=world, seed=1, max_levels=1,
                           microbatches=a.microbatches, schedule=schedule).to(dtype)
        body = self.net.body
        self.first, self.last = self.net.is_first, self.net.is_last
        self.module = StageModule(copy.deepcopy(self.net.opening),
                                  [copy.deepcopy(body.layer(n)) for n in body.layer_indices],
                                  body.h, copy.deepcopy(self.net.closing))
        stage = PipelineStage(self.module, world.rank, world.size, torch.device("cpu"))
        self.schedule = SCHEDULES[schedule](stage, a.microbatches, loss_fn=Fn.cross_entropy)
        self.opt_lp = torch.optim.SGD(self.net.parameters(), lr=lr)
        self.opt_torch = torch.optim.SGD(self.module.parameters(), lr=lr)
        self.loss_torch = None

    def step_layerpar(self):
        self.opt_lp.zero_grad()
        loss, _ = self.net.loss_and_backward(self.x if self.first else None,
                                             self.y if self.last else None, Fn.cross_entropy)
        self.opt_lp.step()
        return loss

    def step_torch(self):
        self.opt_torch.zero_grad()
        losses = []
        if self.first and self.last:
            self.schedule.step(self.x, target=self.y, losses=losses)
        elif self.first:
            self.schedule.step(self.x)
        elif self.last:
            self.schedule.step(target=self.y, losses=losses)
        else:
            self.schedule.step()
        self.opt_torch.step()
        # the micro-batches' mean losses, averaged (equal micro-batches: the batch's mean)
        return torch.stack(losses).mean() if losses else None

    def gradients(self):
        """Each side's (name, gradient) of this rank, in one order: the
        opening, the layers, the closing."""
        def grads(opening, steps, closing):
            mods = [m for m in (opening, *steps, closing) if m is not None]
            return [q.grad for m in mods for q in m.parameters()]
        body = self.net.body
        lp = grads(self.net.opening, [body.layer(n) for n in body.layer_indices],
                   self.net.closing)
        return lp, grads(self.module.opening, self.module.steps, self.module.closing)

    def close(self):
        self.net.close()


def max_rel_diff(pairs):
    worst = 0.0
    for a, b in pairs:
        a, b = a.detach(), b.detach()
        scale = max(float(b.abs().max()), 1e-300)
        worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


def check(a, world, schedule, x, y):
    """The largest relative difference over the ranks between the two sides'
    loss and gradients after one float64 step from the same weights (no
    update: lr 0)."""
    pair = Pair(a, world, schedule, torch.float64, x.double(), y, lr=0.0)
    try:
        loss_lp = pair.step_layerpar()
        loss_torch = pair.step_torch()
        lp, th = pair.gradients()
        if len(lp) != len(th) or any(p.shape != q.shape for p, q in zip(lp, th)):
            raise RuntimeError("the two sides' parameters differ in number or shape")
        diffs = list(zip(lp, th))
        if pair.last:
            diffs.append((loss_lp.reshape(1), loss_torch.reshape(1)))
        return world.allreduce(max_rel_diff(diffs), op=MPI.MAX)
    finally:
        pair.close()


def quartiles(v):
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return q[0], statistics.median(v), q[2]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.conv_pipeline_args(p, reps=21)
    p.add_argument("--schedules", default="gpipe,1f1b",
                   help=f"comma-separated, of {', '.join(SCHEDULES)}")
    a = p.parse_args()
    schedules = common.chosen(p, "--schedules", a.schedules, SCHEDULES)
    if a.batch % a.microbatches:
        p.error(f"--batch {a.batch} must be a multiple of --microbatches {a.microbatches} "
                "(torch's loss is the mean of the micro-batches' means)")
    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    P = world.size
    process_group(world)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 1, a.size, a.size, generator=g)
    y = torch.randint(0, 10, (a.batch,), generator=g)

    diffs = {s: check(a, world, s, x, y) for s in schedules}
    if world.rank == 0:
        for s, d in diffs.items():
            print(f"float64 check, {s}: loss and gradients differ by at most {d:.2e} (relative)")
    if any(d > 1e-10 for d in diffs.values()):
        raise SystemExit("the two pipelines do not compute the same step")

    pairs = {s: Pair(a, world, s, torch.float32, x, y, lr=1e-3) for s in schedules}
    runs = {}
    for s, pair in pairs.items():
        runs[f"layerpar_{s}"] = pair.step_layerpar
        runs[f"torch_{s}"] = pair.step_torch

    def timed(run):
        world.Barrier()
        t = time.perf_counter()
        run()
        world.Barrier()
        return time.perf_counter() - t

    for run in runs.values():  # warm-up
        timed(run)
        timed(run)
    times = {k: [] for k in runs}
    for _ in range(a.reps):
        for k, run in runs.items():
            times[k].append(timed(run))
    # the slowest rank's time of each repetition (the barriers make them alike)
    times = {k: [max(t) for t in zip(*world.allgather(v))] for k, v in times.items()}
    wait = pairs[schedules[0]].net.body.wait
    for pair in pairs.values():
        pair.close()
    dist.destroy_process_group()
    if world.rank != 0:
        return
    print(f"conv network: {a.layers} layers, {a.channels} channels, {a.size}x{a.size}, "
          f"batch {a.batch}, {a.microbatches} micro-batches, float32, 1 thread per rank, "
          f"{P} ranks on {os.cpu_count()} cores, layerpar wait '{wait}', median of {a.reps} "
          "(quartiles)")
    rows = []
    for s in schedules:
        lp, th = times[f"layerpar_{s}"], times[f"torch_{s}"]
        ratios = [u / v for u, v in zip(lp, th)]
        ql, qt, qr = quartiles(lp), quartiles(th), quartiles(ratios)
        ratio = ql[1] / qt[1]
        print(f"  {s:6s} layerpar {ql[1]:8.4f} s ({ql[0]:.4f}-{ql[2]:.4f})   torch "
              f"{qt[1]:8.4f} s ({qt[0]:.4f}-{qt[2]:.4f})   layerpar/torch {ratio:.3f} "
              f"(per repetition {qr[0]:.3f}-{qr[2]:.3f})")
        rows.append({"ranks": P, "schedule": s, "microbatches": a.microbatches,
                     "layers": a.layers, "batch": a.batch, "wait": wait,
                     "layerpar_s": ql[1], "layerpar_q1_s": ql[0], "layerpar_q3_s": ql[2],
                     "torch_s": qt[1], "torch_q1_s": qt[0], "torch_q3_s": qt[2],
                     "ratio_layerpar_over_torch": ratio, "ratio_q1": qr[0], "ratio_q3": qr[2],
                     "float64_max_rel_diff": diffs[s], "reps": a.reps})
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "pipeline_torch.csv")
    kept = []
    if os.path.exists(path):
        with open(path, newline="") as fh:
            kept = [r for r in csv.DictReader(fh) if r.get("ranks") != str(P)]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(kept + rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
