"""Overhead of the layer-parallel module on one rank, measured side by side.

1. forward + backward of LayerParallel with max_levels=1 (exact, layer-serial)
   against the same network as a plain nn.Sequential with ordinary autograd
   (target: ratio <= 1.05);
2. the time of one MGRIT iteration of the forward solve relative to one serial
   forward sweep (no autograd), for 2 and 3 levels, cfactor 4.

Conv network: N = 64 layers, 8 channels, 28x28 inputs, batch 32, float32,
one torch thread.  Repetitions alternate between the variants and the median
is reported, so load on the machine affects both alike.

    python benchmarks/bench_layerpar_overhead.py [--reps 7] [--layers 64]
Writes benchmarks/results/layerpar_overhead.csv and .png.
"""
import argparse
import csv
import os
import statistics
import time

import torch
from mpi4py import MPI

from layerpar import ConvStep, LayerParallel

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=11)
    a = p.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_SELF

    def factory(n):
        return ConvStep(a.channels, 3, "relu")

    exact = LayerParallel(factory, a.layers, 1.0, comm, max_levels=1)
    seq = exact.serial_equivalent()
    x = torch.randn(a.batch, a.channels, a.size, a.size)

    def run_exact():
        exact.zero_grad()
        exact(x).sum().backward()

    def run_seq():
        seq.zero_grad()
        seq(x).sum().backward()

    def sweep_serial():
        with torch.no_grad():
            seq(x)

    solvers = {}
    for levels in (2, 3):
        for iters in (1, 3):
            solvers[levels, iters] = LayerParallel(factory, a.layers, 1.0, comm, max_levels=levels,
                                                   cfactor=4, fwd_iters=iters, min_coarse=1)

    def fwd_only(net):
        def run():
            with torch.no_grad():
                net(x)
        return run

    variants = {"layerpar_exact_fb": run_exact, "sequential_fb": run_seq,
                "serial_sweep": sweep_serial}
    for key, net in solvers.items():
        variants[f"mgrit_L{key[0]}_it{key[1]}"] = fwd_only(net)
    for fn in variants.values():  # warm-up
        fn()
    times = {k: [] for k in variants}
    for _ in range(a.reps):
        for k, fn in variants.items():
            times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}

    ratio = med["layerpar_exact_fb"] / med["sequential_fb"]
    ratio_best = best["layerpar_exact_fb"] / best["sequential_fb"]
    rows = [("layerpar_exact_forward_backward_s", med["layerpar_exact_fb"]),
            ("sequential_forward_backward_s", med["sequential_fb"]),
            ("ratio_layerpar_over_sequential", ratio),
            ("ratio_layerpar_over_sequential_best", ratio_best),
            ("serial_forward_sweep_s", med["serial_sweep"])]
    print(f"conv network: {a.layers} layers, {a.channels} channels, {a.size}x{a.size}, "
          f"batch {a.batch}, float32, 1 thread, median of {a.reps}")
    print(f"  forward+backward  LayerParallel(max_levels=1) {med['layerpar_exact_fb']*1e3:8.1f} ms")
    print(f"  forward+backward  nn.Sequential               {med['sequential_fb']*1e3:8.1f} ms")
    print(f"  ratio (medians)                               {ratio:8.3f}   (target <= 1.05)")
    print(f"  ratio (best times)                            {ratio_best:8.3f}")
    print(f"  serial forward sweep (no autograd)            {med['serial_sweep']*1e3:8.1f} ms")
    for levels in (2, 3):
        per_iter = (med[f"mgrit_L{levels}_it3"] - med[f"mgrit_L{levels}_it1"]) / 2
        rel = per_iter / med["serial_sweep"]
        steps = solvers[levels, 3].last_forward["steps"]
        rows.append((f"mgrit_{levels}_levels_iteration_over_serial_sweep", rel))
        print(f"  one MGRIT iteration, {levels} levels, cfactor 4     {per_iter*1e3:8.1f} ms  "
              f"= {rel:.2f} serial sweeps  (steps per level in 3 iterations: {steps})")

    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "layerpar_overhead.csv")
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["quantity", "value"])
        w.writerows(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = ["nn.Sequential\nfwd+bwd", "LayerParallel\nexact fwd+bwd", "serial\nsweep",
                  "MGRIT iter\n2 levels", "MGRIT iter\n3 levels"]
        vals = [med["sequential_fb"], med["layerpar_exact_fb"], med["serial_sweep"],
                (med["mgrit_L2_it3"] - med["mgrit_L2_it1"]) / 2,
                (med["mgrit_L3_it3"] - med["mgrit_L3_it1"]) / 2]
        ax.bar(labels, [v * 1e3 for v in vals], color=["gray", "C0", "gray", "C1", "C1"])
        ax.set_ylabel("time [ms]")
        ax.set_title(f"conv ResNet, N={a.layers}, one rank (ratio {ratio:.3f})")
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, "layerpar_overhead.png"), dpi=120)
    except ImportError:
        print("matplotlib missing: no plot")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
