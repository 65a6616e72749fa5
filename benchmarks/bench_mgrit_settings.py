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

``--defaults`` (run on two ranks) measures the candidates for the
layer-parallel defaults on the configured networks instead: the default
peaks network (layerpar/configs/peaks.toml), digits-conv
(layerpar/configs/digits-conv.toml) and a deeper digits-conv (--deep
layers), each on its first training batch with the configuration's dtype.
For every candidate: time per training step (forward, loss, backward) on one
rank as a ratio to the exact mode on one rank (medians, best times beside),
the time on two ranks as a ratio to the same candidate's on one rank (and
the same ratio of the solver's virtual clock, the modelled parallel time,
which load on the machine does not change), and the relative error of the
gradient against the exact gradient.  While one rank runs a one-rank
measurement the other sleeps (no busy wait).

    mpiexec -n 2 python benchmarks/bench_mgrit_settings.py --defaults [--reps 5]
Writes benchmarks/results/mgrit_defaults.csv.
"""
import argparse
import csv
import os
import statistics
import sys
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
    "L3-FCF (old default)": dict(max_levels=3, cfactor=4, relax="FCF"),
    "L2-F-skip (default)": dict(max_levels=2, cfactor=4, relax="F", skip=True),
    "L3-F-skip": dict(max_levels=3, cfactor=4, relax="F", skip=True),
    "L3-FCF-skip": dict(max_levels=3, cfactor=4, relax="FCF", skip=True),
    "L2-FCF-skip": dict(max_levels=2, cfactor=4, relax="FCF", skip=True),
    "L3-F": dict(max_levels=3, cfactor=4, relax="F"),
    "L2-F-skip-m8": dict(max_levels=2, cfactor=8, relax="F", skip=True),
}


def flat_grad(net):
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "layerpar", "configs")

# candidates for the layer-parallel defaults: (levels, cfactor, relax, skip,
# forward iterations, backward iterations)
CANDIDATES = [(1, 4, "F", False, 1, 1)] + [
    (3, 4, "FCF", False, 2, 1),   # the defaults before this measurement
    (2, 4, "F", True, 2, 1), (2, 4, "F", False, 2, 1), (2, 4, "FCF", True, 2, 1),
    (2, 4, "FCF", False, 2, 1), (3, 4, "F", True, 2, 1), (3, 4, "FCF", True, 2, 1),
    (2, 2, "F", True, 2, 1), (3, 2, "F", True, 2, 1), (2, 4, "F", True, 1, 1),
    (2, 4, "F", True, 2, 2), (2, 4, "F", True, 3, 1)]


def candidate_name(c):
    levels, m, relax, skip, fi, bi = c
    if levels == 1:
        return "exact"
    return f"L{levels}-m{m}-{relax}{'-skip' if skip else ''}-{fi}/{bi}"


def _idle_until(req):
    """Wait for a nonblocking collective without spinning a core."""
    while not req.Test():
        time.sleep(0.002)


def defaults_main(a):
    """The candidates for the layer-parallel defaults on two ranks (see the
    module's docstring)."""
    from layerpar.config import resolve
    from layerpar.training.build import build_network, load_data
    world = MPI.COMM_WORLD
    if world.size != 2:
        raise SystemExit("--defaults runs on two ranks: mpiexec -n 2 python "
                         "benchmarks/bench_mgrit_settings.py --defaults")
    nets = [("peaks N=32", os.path.join(CONFIGS, "peaks.toml"), []),
            ("digits-conv N=16", os.path.join(CONFIGS, "digits-conv.toml"), []),
            (f"digits-conv N={a.deep}", os.path.join(CONFIGS, "digits-conv.toml"),
             [f"model.nlayers={a.deep}"])]
    rows = []
    for name, path, sets in nets:
        base = resolve(path, sets)
        data = load_data(base, MPI.COMM_SELF)
        B = base["data"]["batch_size"]
        x, y = data.train.inputs[:B], data.train.labels[:B]

        def make(c, comm):
            levels, m, relax, skip, fi, bi = c
            cfg = resolve(path, sets + [f"mgrit.max_levels={levels}", f"mgrit.cfactor={m}",
                                        f'mgrit.relax="{relax}"', f"mgrit.skip={str(skip).lower()}",
                                        f"mgrit.fwd_iters={fi}", f"mgrit.bwd_iters={bi}"])
            return build_network(cfg, data.input_shape, data.num_classes, comm)

        def step(net):
            net.zero_grad()
            net.loss(x, y, Fn.cross_entropy).backward()

        one = {c: make(c, MPI.COMM_SELF) for c in CANDIDATES} if world.rank == 0 else {}
        two = {c: make(c, world) for c in CANDIDATES}

        def timed(c, P):
            world.Barrier()
            t = time.perf_counter()
            if P == 2:
                step(two[c])
            elif world.rank == 0:
                step(one[c])
            if P == 1:  # rank 1 sleeps while rank 0 works alone
                req = world.Ibarrier()
                _idle_until(req)
            else:
                world.Barrier()
            return time.perf_counter() - t

        def clock(net):  # the virtual clock of the step's two solves (agreed over ranks)
            return net.body.last_forward["virtual_time"] + net.body.last_backward["virtual_time"]

        grads, vt = {}, {}
        for c in CANDIDATES:  # warm-up; gradients on one rank; virtual clocks
            timed(c, 1)
            timed(c, 2)
            if world.rank == 0:
                grads[c] = flat_grad(one[c])
                vt[c] = (clock(one[c]), clock(two[c]))
        times = {(c, P): [] for c in CANDIDATES for P in (1, 2)}
        for _ in range(a.reps):
            for c in CANDIDATES:
                for P in (1, 2):
                    times[c, P].append(timed(c, P))
        for net in list(one.values()) + list(two.values()):
            net.close()
        if world.rank != 0:
            continue
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        exact = CANDIDATES[0]
        g0 = grads[exact]
        m = base["model"]
        print(f"{name}: {m['kind']} width {m['width']}, T={m['T']}, batch {B}, "
              f"{base['data']['dtype']}, median (best) of {a.reps}")
        print(f"  {'setting':<22} {'s/step P=1':>10} {'P=1 / exact':>14} {'P=2 / P=1':>12} "
              f"{'clock P=2/P=1':>14} {'grad rel err':>13}")
        for c in CANDIDATES:
            err = float((grads[c] - g0).norm() / g0.norm())
            r1 = med[c, 1] / med[exact, 1]
            r1b = best[c, 1] / best[exact, 1]
            r2 = med[c, 2] / med[c, 1]
            r2b = best[c, 2] / best[c, 1]
            rv = vt[c][1] / vt[c][0]
            print(f"  {candidate_name(c):<22} {med[c, 1]:10.4f} {r1:7.2f} ({r1b:4.2f}) "
                  f"{r2:5.2f} ({r2b:4.2f}) {rv:14.2f} {err:13.2e}")
            rows.append((name, candidate_name(c), *c, med[c, 1], med[c, 2], r1, r1b, r2, r2b,
                         rv, err))
        sys.stdout.flush()
    if world.rank == 0:
        os.makedirs(RESULTS, exist_ok=True)
        path = os.path.join(RESULTS, "mgrit_defaults.csv")
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["network", "setting", "max_levels", "cfactor", "relax", "skip",
                        "fwd_iters", "bwd_iters", "seconds_per_step_P1", "seconds_per_step_P2",
                        "P1_over_exact", "P1_over_exact_best", "P2_over_P1", "P2_over_P1_best",
                        "virtual_clock_P2_over_P1", "grad_rel_error"])
            w.writerows(rows)
        print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nets", default="conv64,digits,peaks")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--defaults", action="store_true",
                   help="the candidates for the layer-parallel defaults, on two ranks")
    p.add_argument("--deep", type=int, default=256,
                   help="--defaults: layers of the deeper digits-conv network")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.defaults:
        return defaults_main(a)
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
