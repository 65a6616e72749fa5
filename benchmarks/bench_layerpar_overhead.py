"""Overhead of the layer-parallel module on one rank, measured side by side.

1. forward + backward of LayerParallel with max_levels=1 (exact, layer-serial)
   against the same network as a plain nn.Sequential of residual layers
   u + h F(u) with ordinary autograd (target: ratio <= 1.05 on the CPU,
   <= 1.01 on the small dense network, <= 1.10 on a GPU), for three networks:

     conv         N = 64, 8 channels, 28x28, batch 32 (compute-bound on a CPU)
     small-conv   N = 64, 4 channels, 4x4, batch 2
     small-dense  N = 64, width 8, batch 4

   The two small ones cost a few microseconds of arithmetic per layer: what
   is measured there is the per-layer cost of the Python and autograd
   machinery, as on a GPU, where the kernels run asynchronously and a step
   costs little more than its launches.
2. the time of one MGRIT iteration of the forward solve relative to one serial
   forward sweep (no autograd), for 2 and 3 levels, cfactor 4 (conv network).

float32, one torch thread.  Repetitions alternate between the variants and
the median is reported, so load on the machine affects both alike; the
spread is the quartiles of the ratio of each repetition's pair.

    python benchmarks/bench_layerpar_overhead.py [--reps 11] [--layers 64]
                                                 [--device cuda] [--presets conv,small-dense]
Writes benchmarks/results/layerpar_overhead[_DEVICE].csv and .png.
"""
import argparse
import csv
import os
import statistics
import time

import torch
from mpi4py import MPI
from torch import nn

import _common as common

from layerpar import ConvStep, DenseStep, LayerParallel

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# name -> (step factory, state shape)
PRESETS = {
    "conv": (lambda: ConvStep(8, 3, "relu"), (32, 8, 28, 28)),
    "small-conv": (lambda: ConvStep(4, 3, "relu"), (2, 4, 4, 4)),
    "small-dense": (lambda: DenseStep(8, "tanh"), (4, 8)),
}


class Residual(nn.Module):
    """u + h F(u), one fused add (as layerpar computes it): the plainest
    residual layer, for the baseline."""

    def __init__(self, F, h):
        super().__init__()
        self.F, self.h = F, h

    def forward(self, u):
        return torch.add(u, self.F(u), alpha=self.h)


def plain_sequential(net):
    """The network's N layers with the same weights as an ``nn.Sequential``
    of ``Residual`` layers: ordinary modules and autograd, nothing else."""
    return nn.Sequential(*(Residual(layer.F, layer.h) for layer in net.serial_equivalent()))


def timer(device):
    """fn -> seconds it takes, the device's queue drained before and after."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t
    return timed


def run_variants(variants, reps, timed):
    """Medians and best times of each variant, repetitions interleaved."""
    for fn in variants.values():  # warm-up
        fn()
        fn()
    times = {k: [] for k in variants}
    for _ in range(reps):
        for k, fn in variants.items():
            times[k].append(timed(fn))
    return ({k: statistics.median(v) for k, v in times.items()},
            {k: min(v) for k, v in times.items()}, times)


def exact_against_sequential(preset, layers, device, reps, timed):
    make, shape = PRESETS[preset]
    exact = LayerParallel(lambda n: make(), layers, 1.0, MPI.COMM_SELF, max_levels=1).to(device)
    seq = plain_sequential(exact).to(device)
    x = torch.randn(shape, device=device)
    with torch.no_grad():
        if not torch.equal(exact(x), seq(x)):
            raise RuntimeError("the baseline does not compute what LayerParallel computes")

    def fb(net):
        def run():
            net.zero_grad()
            net(x).sum().backward()
        return run
    med, best, times = run_variants({"layerpar": fb(exact), "sequential": fb(seq)}, reps,
                                    timed)
    exact.close()
    pairs = [a / b for a, b in zip(times["layerpar"], times["sequential"])]
    q = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs * 3
    return med, best, (q[0], q[2])


def mgrit_iterations(layers, device, reps, timed):
    make, shape = PRESETS["conv"]
    x = torch.randn(shape, device=device)
    variants, solvers = {}, {}
    for levels in (2, 3):
        for iters in (1, 3):
            net = LayerParallel(lambda n: make(), layers, 1.0, MPI.COMM_SELF, max_levels=levels,
                                cfactor=4, fwd_iters=iters, min_coarse=1).to(device)
            solvers[levels, iters] = net

            def fwd(net=net):
                with torch.no_grad():
                    net(x)
            variants[f"L{levels}_it{iters}"] = fwd
    serial = plain_sequential(net).to(device)  # the same weights (seeded per layer)

    def sweep():
        with torch.no_grad():
            serial(x)
    variants["serial_sweep"] = sweep
    med, _, _ = run_variants(variants, reps, timed)
    out = {}
    for levels in (2, 3):
        per_iter = (med[f"L{levels}_it3"] - med[f"L{levels}_it1"]) / 2
        out[levels] = (per_iter, per_iter / med["serial_sweep"],
                       solvers[levels, 3].last_forward["steps"])
    for net in solvers.values():
        net.close()
    return med["serial_sweep"], out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:k]")
    p.add_argument("--presets", default=",".join(PRESETS),
                   help=f"comma-separated, of {', '.join(PRESETS)}")
    a = p.parse_args()
    presets = common.chosen(p, "--presets", a.presets, PRESETS)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device}: this torch has no CUDA device")
    torch.set_num_threads(1)
    timed = timer(device)
    target = 1.10 if device.type == "cuda" else 1.05

    rows, bars = [], []
    print(f"LayerParallel(max_levels=1) against nn.Sequential, forward+backward, N = {a.layers}, "
          f"float32, {device}, 1 thread, median of {a.reps}")
    for preset in presets:
        med, best, (q1, q3) = exact_against_sequential(preset, a.layers, device, a.reps, timed)
        ratio = med["layerpar"] / med["sequential"]
        ratio_best = best["layerpar"] / best["sequential"]
        shape = "x".join(map(str, PRESETS[preset][1]))
        goal = 1.01 if preset == "small-dense" and device.type == "cpu" else target
        print(f"  {preset:12s} state {shape:12s} LayerParallel {med['layerpar'] * 1e3:8.2f} ms   "
              f"nn.Sequential {med['sequential'] * 1e3:8.2f} ms   ratio {ratio:6.3f} "
              f"(pairs {q1:.3f}-{q3:.3f}, best times {ratio_best:.3f}; target <= {goal})")
        rows += [(preset, "layerpar_exact_forward_backward_s", med["layerpar"]),
                 (preset, "sequential_forward_backward_s", med["sequential"]),
                 (preset, "ratio_layerpar_over_sequential", ratio),
                 (preset, "ratio_layerpar_over_sequential_q1", q1),
                 (preset, "ratio_layerpar_over_sequential_q3", q3),
                 (preset, "ratio_layerpar_over_sequential_best", ratio_best)]
        bars.append((preset, ratio))

    if "conv" in presets:
        sweep, iters = mgrit_iterations(a.layers, device, a.reps, timed)
        rows.append(("conv", "serial_forward_sweep_s", sweep))
        print(f"  serial forward sweep (conv, no autograd)       {sweep * 1e3:8.1f} ms")
        for levels, (per_iter, rel, steps) in iters.items():
            rows.append(("conv", f"mgrit_{levels}_levels_iteration_over_serial_sweep", rel))
            print(f"  one MGRIT iteration, {levels} levels, cfactor 4     {per_iter * 1e3:8.1f} ms"
                  f"  = {rel:.2f} serial sweeps  (steps per level in 3 iterations: {steps})")

    os.makedirs(RESULTS, exist_ok=True)
    stem = "layerpar_overhead" + ("" if device.type == "cpu" else f"_{device.type}")
    path = os.path.join(RESULTS, stem + ".csv")
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["network", "quantity", "value"])
        w.writerows(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([b[0] for b in bars], [b[1] for b in bars], color="C0")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(target, color="C3", ls="--", lw=0.8, label=f"target {target}")
        ax.set_ylabel("LayerParallel exact / nn.Sequential")
        ax.set_title(f"forward+backward, N={a.layers}, one rank, {device}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, stem + ".png"), dpi=120)
    except ImportError:
        print("matplotlib missing: no plot")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
