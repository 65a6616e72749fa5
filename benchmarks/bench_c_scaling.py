"""Modelled strong scaling of the MGRIT core, from the C-only driver.

Builds braid_ext/examples/c/scalar_driver.c (Dahlquist, backward Euler) and
runs it under mpiexec at P = 1, 2, 4, ..., 64 ranks (oversubscribed: MPICH's
mpiexec allows it) for N = 4096 steps, cfactor 4, FCF relaxation.  The
virtual clock of the core turns each run into the modelled parallel time of
the schedule that ran, with every step costing 1 and every message a latency
of 0, 0.1 or 1 step; the speedup is over sequential stepping (N unit steps).
The wall time of the runs says nothing about scaling (P processes share this
machine's cores); the virtual time does.

    python benchmarks/bench_c_scaling.py [--ranks 1 2 4 8 16 32 64]
        [--latency 0 0.1 1] [--levels 5] [--nsteps 4096] [--cfactor 4]
Writes benchmarks/results/c_scaling.csv and c_scaling.png.
"""
import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from glob import glob

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "braid_ext", "src")
DRIVER = os.path.join(ROOT, "braid_ext", "examples", "c", "scalar_driver.c")
FIELDS = ["ranks", "latency", "levels", "cfactor", "nsteps", "iters", "error", "vtime",
          "seqtime", "speedup", "messages", "wall_s"]


def clean_env():
    """Without the variables of an MPI job this process may belong to."""
    prefixes = ("PMI_", "PMIX_", "HYDRA_", "MPI_", "OMPI_", "MPIR_", "I_MPI_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def find(name, env_var=None):
    if env_var and os.environ.get(env_var):
        return os.environ[env_var].split()
    path = shutil.which(name) or shutil.which(name, path=os.path.join(sys.prefix, "bin"))
    if not path:
        sys.exit(f"bench_c_scaling: {name} not found (install the mpich wheel or set ${env_var})")
    return [path]


def build(outdir):
    exe = os.path.join(outdir, "scalar_driver")
    cmd = find("mpicc", "MPICC") + ["-O2", f"-I{SRC}", DRIVER] + sorted(glob(os.path.join(
        SRC, "*.c"))) + ["-lm", "-o", exe]
    subprocess.run(cmd, check=True, env=clean_env())
    return exe


def run(exe, ranks, args, latency, levels):
    cmd = find("mpiexec") + ["-n", str(ranks), exe, "-n", str(args.nsteps), "-levels",
                             str(levels), "-cf", str(args.cfactor), "-nrelax", "1",
                             "-tol", str(args.tol), "-latency", str(latency), "-quiet"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=600)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("summary"))
    words = line.split()
    s = {k: float(v) for k, v in zip(words[1::2], words[2::2])}
    return dict(ranks=ranks, latency=latency, levels=int(s["levels"]), cfactor=args.cfactor,
                nsteps=args.nsteps, iters=int(s["iters"]), error=s["error"], vtime=s["vtime"],
                seqtime=s["seqtime"], speedup=s["seqtime"] / s["vtime"],
                messages=int(s["messages"]), wall_s=wall)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for levels in sorted({r["levels"] for r in rows}):
        for lat in sorted({r["latency"] for r in rows}):
            sel = [r for r in rows if r["latency"] == lat and r["levels"] == levels]
            ax.plot([r["ranks"] for r in sel], [r["speedup"] for r in sel], "o-",
                    label=f"latency {lat:g} step" + (f", {levels} levels" if len(
                        {r['levels'] for r in rows}) > 1 else ""))
    ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="sequential stepping")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("ranks P")
    ax.set_ylabel("modelled speedup over sequential (N / virtual time)")
    r0 = rows[0]
    ax.set_title(f"MGRIT (C core), Dahlquist, N={r0['nsteps']}, cfactor {r0['cfactor']}, FCF")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--latency", type=float, nargs="+", default=[0.0, 0.1, 1.0])
    p.add_argument("--levels", type=int, nargs="+", default=[5])
    p.add_argument("--nsteps", type=int, default=4096)
    p.add_argument("--cfactor", type=int, default=4)
    p.add_argument("--tol", type=float, default=1e-12)
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(tmp)
        head = (f"{'P':>4} {'latency':>7} {'levels':>6} {'iters':>5} {'error':>9} "
                f"{'vtime':>9} {'speedup':>8} {'messages':>8} {'wall s':>7}")
        print(f"N = {args.nsteps}, cfactor {args.cfactor}, FCF, tol {args.tol:g}; "
              f"speedup = N / virtual time")
        print(head)
        print("-" * len(head))
        for levels in args.levels:
            for lat in args.latency:
                for ranks in args.ranks:
                    r = run(exe, ranks, args, lat, levels)
                    rows.append(r)
                    print(f"{r['ranks']:>4} {r['latency']:>7g} {r['levels']:>6} {r['iters']:>5} "
                          f"{r['error']:>9.2e} {r['vtime']:>9.6g} {r['speedup']:>8.3f} "
                          f"{r['messages']:>8} {r['wall_s']:>7.1f}", flush=True)

    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "c_scaling.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    png = os.path.join(RESULTS, "c_scaling.png")
    plot(rows, png)
    print(f"wrote {path}\nwrote {png}")


if __name__ == "__main__":
    main()
