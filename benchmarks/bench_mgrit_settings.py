"""Layer-parallel settings against the exact mode on one rank: time per
training step and gradient accuracy, measured side by side.

For each setting (levels, relaxation, skipped first down-cycle, cfactor; 2
forward and 1 backward iterations as in the layer-parallel mode) a training
step (forward, loss, backward; the optimiser step is the same for all and
left out) is timed against the exact mode (max_levels=1) with the same
weights, and the gradient is compared with the exact one (relative error in
the 2-norm over all parameters).  Repetitions alternate between the
settings; medians and best times (the best is the steadier figure on a
loaded machine).  Two networks:
  conv64   N = 64, 8 channels, 28x28, batch 32 (the overhead benchmark's)
  digits   N = 256, 16 channels, 8x8, batch 100
  peaks    dense N = 32, width 8, T = 5, tanh, batch 100 (the command's default
           network; its larger steps make every setting less accurate)
float32, one torch thread.

    python benchmarks/bench_mgrit_settings.py [--nets conv64,digits,peaks] [--reps 5]
Writes benchmarks/results/mgrit_settings.csv.
"""
import argparse
import csv
import os
import statistics
import time

import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from layerpar import (ConvClosing, ConvOpening, ConvStep, DenseClosing, DenseOpening,
                      DenseStep, Network)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

NETS = {"conv64": dict(layers=64, channels=8, size=28, batch=32, T=1.0),
        "digits": dict(layers=256, channels=16, size=8, batch=100, T=1.0),
        "peaks": dict(layers=32, channels=8, size=0, batch=100, T=5.0)}


def build(spec, opts):
    c = spec["channels"]
    if spec["size"] == 0:
        parts = (lambda: DenseOpening(2, c), lambda n: DenseStep(c, "tanh"),
                 lambda: DenseClosing(c, 5))
    else:
        parts = (lambda: ConvOpening(1, c), lambda n: ConvStep(c, 3, "relu"),
                 lambda: ConvClosing(c, 10, pool=4))
    return Network(*parts, nlayers=spec["layers"], T=spec["T"], comm=MPI.COMM_SELF, seed=1,
                   fwd_iters=2, bwd_iters=1, **opts)

SETTINGS = {
    "exact": dict(max_levels=1),
    "L3-FCF (config default)": dict(max_levels=3, cfactor=4, relax="FCF"),
    "L2-F-skip": dict(max_levels=2, cfactor=4, relax="F", skip=True),
    "L3-F-skip": dict(max_levels=3, cfactor=4, relax="F", skip=True),
    "L3-FCF-skip": dict(max_levels=3, cfactor=4, relax="FCF", skip=True),
    "L2-FCF-skip": dict(max_levels=2, cfactor=4, relax="FCF", skip=True),
    "L3-F": dict(max_levels=3, cfactor=4, relax="F"),
    "L2-F-skip-m8": dict(max_levels=2, cfactor=8, relax="F", skip=True),
}


def flat_grad(net):
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nets", default="conv64,digits,peaks")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in a.nets.split(","):
        spec = NETS[name]
        g = torch.Generator().manual_seed(0)
        if spec["size"] == 0:
            x = 2 * torch.randn(spec["batch"], 2, generator=g)
            y = torch.randint(0, 5, (spec["batch"],), generator=g)
        else:
            x = torch.randn(spec["batch"], 1, spec["size"], spec["size"], generator=g)
            y = torch.randint(0, 10, (spec["batch"],), generator=g)
        nets = {k: build(spec, opts) for k, opts in SETTINGS.items()}

        def step(net):
            net.zero_grad()
            net.loss(x, y, Fn.cross_entropy).backward()

        grads, work = {}, {}
        for k, net in nets.items():  # warm-up, gradients and steps per level
            step(net)
            grads[k] = flat_grad(net)
            work[k] = (net.body.last_forward["steps"], net.body.last_backward["steps"])
        times = {k: [] for k in nets}
        for _ in range(a.reps):
            for k, net in nets.items():
                t = time.perf_counter()
                step(net)
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        print(f"{name}: N={spec['layers']}, width {spec['channels']}, T={spec['T']}, "
              f"batch {spec['batch']}, float32, 1 rank, median of {a.reps}")
        print(f"  {'setting':<24} {'s/step':>8} {'x exact':>8} {'best x':>7} {'grad rel err':>13}"
              f"  steps per level fwd / bwd")
        exact = grads["exact"]
        for k in nets:
            err = float((grads[k] - exact).norm() / exact.norm())
            ratio, ratio_best = med[k] / med["exact"], best[k] / best["exact"]
            print(f"  {k:<24} {med[k]:8.3f} {ratio:8.2f} {ratio_best:7.2f} {err:13.2e}"
                  f"  {work[k][0]} / {work[k][1]}")
            rows.append((name, k, med[k], ratio, ratio_best, err, work[k][0], work[k][1]))
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "mgrit_settings.csv")
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["network", "setting", "seconds_per_step", "ratio_to_exact",
                    "ratio_to_exact_best", "grad_rel_error", "fwd_steps_per_level", "bwd_steps_per_level"])
        w.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
