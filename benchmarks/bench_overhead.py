"""Overhead of the braid_ext binding and core around a cheap numpy app.

The app integrates du/dt = -u + 0.5 tanh(W u) on R^64 with k explicit
sub-steps per MGRIT step, k tuned by measurement so that one step costs
about --step-us microseconds (50 by default).  For N = 4096 steps it solves
with MGRIT (3 levels, cfactor 4, FCF, abs_tol 1e-9) and with max_levels=1
(sequential stepping), on 1 and 2 ranks, and reports per rank count:

  total      seconds inside solve() (maximum over ranks)
  app        seconds inside the app's methods (stats()['app_time'])
  outside    (total - app) / total: the binding, the C core, and, on several
             ranks, the time spent waiting for neighbours (target < 5% on 1 rank)
  bind/call  (callback_time - app_time) / calls: the trampolines, in us
  core/call  (total - callback_time) / calls: the C core between calls, in us

Run it as
    python benchmarks/bench_overhead.py                 # 1 rank here, spawns mpiexec -n 2
    mpiexec -n 2 python benchmarks/bench_overhead.py    # 2 ranks, and 1 rank on rank 0
Writes benchmarks/results/overhead.csv and overhead.png.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from mpi4py import MPI

from braid_ext import NumpyApp, Solver

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FIELDS = ["ranks", "method", "iterations", "total_s", "app_s", "callback_s", "calls",
          "outside_pct", "bind_us_per_call", "core_us_per_call", "step_us", "substeps",
          "repeat"]


class TanhFlow(NumpyApp):
    """du/dt = -u + 0.5 tanh(W u), ||W|| <= 1: a contraction, k sub-steps
    of explicit Euler per step."""

    def __init__(self, n=64, substeps=10, seed=0):
        super().__init__((n,))
        rng = np.random.default_rng(seed)
        w = rng.standard_normal((n, n))
        self.w = w / np.linalg.norm(w, 2)
        self.u0 = rng.standard_normal(n)
        self.substeps = substeps

    def init(self, t, index):
        return self.u0.copy() if index == 0 else np.zeros_like(self.u0)

    def step(self, u, status):
        h = (status.t_stop - status.t_start) / self.substeps
        w = self.w
        for _ in range(self.substeps):
            u = u + h * (0.5 * np.tanh(w @ u) - u)
        return u


class _Status:
    t_start, t_stop = 0.0, 1.0 / 4096


def time_step(substeps, n=64):
    """Microseconds of one step with `substeps` sub-steps (best of 5)."""
    app = TanhFlow(n, substeps=substeps)
    u, st = app.init(0.0, 0), _Status()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(50):
            app.step(u, st)
        best = min(best, (time.perf_counter() - t) / 50)
    return 1e6 * best


def tune_substeps(target_us):
    """Sub-steps per step for a step of about target_us microseconds, and
    the measured cost of that step."""
    k = 10
    for _ in range(3):
        k = max(1, round(k * target_us / time_step(k)))
    return k, time_step(k)


def measure(comm, nsteps, substeps, step_us, method, repeat):
    """Best of `repeat` solves (by total time) on comm; rank 0 gets the row."""
    app = TanhFlow(substeps=substeps)
    opts = dict(max_levels=1) if method == "sequential" else \
        dict(max_levels=3, cfactor=4, relax="FCF", abs_tol=1e-9, max_iter=30)
    best = None
    for _ in range(repeat):
        with Solver(app, comm, 0.0, 1.0, nsteps, warm_start=False, **opts) as solver:
            comm.Barrier()
            solver.solve()
            st = solver.stats(reduce=True)
        if best is None or st["total_time"] < best["total_time"]:
            best = st
    st = best
    row = dict(ranks=comm.Get_size(), method=method, iterations=st["iterations"],
               total_s=st["total_time"], app_s=st["app_time"], callback_s=st["callback_time"],
               calls=st["calls"],
               outside_pct=100.0 * (st["total_time"] - st["app_time"]) / st["total_time"],
               bind_us_per_call=1e6 * (st["callback_time"] - st["app_time"]) / st["calls"],
               core_us_per_call=1e6 * (st["total_time"] - st["callback_time"]) / st["calls"],
               step_us=step_us, substeps=substeps, repeat=repeat)
    return row


def clean_env():
    prefixes = ("PMI_", "PMIX_", "HYDRA_", "MPI_", "OMPI_", "MPIR_", "I_MPI_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def spawn(ranks, args, substeps, step_us):
    """Run this script under mpiexec -n ranks as a worker; returns its rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = ["mpiexec", "-n", str(ranks), sys.executable, os.path.abspath(__file__),
               "--worker", out, "--substeps", str(substeps), "--step-us", str(step_us),
               "--nsteps", str(args.nsteps), "--repeat", str(args.repeat)]
        subprocess.run(cmd, check=True, env=clean_env())
        with open(out) as f:
            return json.load(f)


def report(rows, args):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "overhead.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"N = {args.nsteps} steps; one step = {rows[0]['substeps']} sub-steps = "
          f"{rows[0]['step_us']:.1f} us measured; best of {args.repeat} solves")
    head = (f"{'ranks':>5} {'method':>10} {'iters':>5} {'total s':>9} {'app s':>9} "
            f"{'calls':>8} {'outside %':>9} {'bind us/call':>12} {'core us/call':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['ranks']:>5} {r['method']:>10} {r['iterations']:>5} {r['total_s']:>9.3f} "
              f"{r['app_s']:>9.3f} {r['calls']:>8} {r['outside_pct']:>9.2f} "
              f"{r['bind_us_per_call']:>12.2f} {r['core_us_per_call']:>12.2f}")
    print("outside % on several ranks includes the time spent waiting for neighbours")
    print(f"wrote {path}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['method']}\n{r['ranks']} rank{'s' if r['ranks'] > 1 else ''}" for r in rows]
    app = [r["app_s"] for r in rows]
    rest = [r["total_s"] - r["app_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(labels, app, label="inside app methods")
    ax.bar(labels, rest, bottom=app, label="outside (binding, core, waiting)")
    for i, r in enumerate(rows):
        ax.text(i, r["total_s"], f"{r['outside_pct']:.1f}%", ha="center", va="bottom")
    ax.set_ylabel("seconds per solve")
    ax.set_title(f"braid_ext overhead, N={args.nsteps}, step ~{rows[0]['step_us']:.0f} us")
    ax.legend()
    fig.tight_layout()
    png = os.path.join(RESULTS, "overhead.png")
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsteps", type=int, default=4096)
    p.add_argument("--step-us", type=float, default=50.0)
    p.add_argument("--substeps", type=int, default=0, help="0: tune to --step-us")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2],
                   help="rank counts (when started without mpiexec)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    if args.substeps:  # given (a worker is told both)
        substeps, step_us = args.substeps, args.step_us
    else:
        substeps, step_us = comm.bcast(tune_substeps(args.step_us) if comm.rank == 0 else None)

    def run(c):
        return [measure(c, args.nsteps, substeps, step_us, m, args.repeat)
                for m in ("mgrit", "sequential")]

    rows = []
    if args.worker or comm.size > 1:
        rows = run(comm)
        if args.worker:
            if comm.rank == 0:
                with open(args.worker, "w") as f:
                    json.dump(rows, f)
            return
        if comm.rank == 0:  # the one-rank case, on rank 0 alone
            rows = run(MPI.COMM_SELF) + rows
        comm.Barrier()
    else:
        for ranks in sorted(set(args.ranks)):
            rows += run(comm) if ranks == 1 else spawn(ranks, args, substeps, step_us)
    if comm.rank == 0:
        report(rows, args)


if __name__ == "__main__":
    main()
