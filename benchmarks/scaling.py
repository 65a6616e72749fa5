"""Strong and weak scaling of training steps, measured where this machine
allows and modelled (layerpar.perfmodel, calibrated here) to 256 ranks, and
the peak memory per rank; CSV and PNG under benchmarks/results/.

    python benchmarks/scaling.py [--ranks 1,2,4] [--max-ranks 256] [--mpiexec srun]
    python benchmarks/scaling.py --memory-only      (memory.csv alone)

Network (benchmarks/_netbench.py): conv, 1-channel 8x8 images, 4 channels,
batch 32, float32, one torch thread per rank; a training step is opening,
N residual conv layers, closing, cross-entropy and an SGD step.
  strong  N = 1024 on P = 1, 2, 4, ... ranks
  weak    N = 16 P
Settings: serial (one level across the ranks), the exact pipeline with
min(batch, 4P) micro-batches, layer-parallel F-relaxation with the skipped
first down-cycle and FCF (4 levels, cfactor 4, 2 forward / 1 backward
iterations) and one-shot (F, skip, 4 levels, 1 / 1, warm-started).

Measured: `mpiexec -n P` for each P of --ranks (P above the number of
cores is oversubscribed and marked so), the median of --steps training
steps (default 1; at least 5 in the weak study) after a warm-up, in wall
seconds and in CPU seconds of the busiest rank (on a machine shared with
other jobs, the CPU seconds are the time the step would take with the cores
to itself).  Modelled: the calibration made
on one rank (CPU clock: step costs, the solver's own costs, ends and
optimiser) with the message latency and bandwidth of a ping-pong on two
ranks, for P = 1, 2, 4, ..., --max-ranks.  Speed-up: over serial on one
rank (same source); efficiency: over the same setting on one rank (strong:
T_1 / (P T_P), weak: T_1 / T_P).

Memory: in a fresh process per setting, the peak resident set (VmHWM) of one
training step of the N = 1024 network minus the resident set before it
(after the imports and a warm-up step of a small network with the same
options), the largest over the ranks: serial on one rank, the same layers as
one nn.Sequential under autograd, and each setting on 4 ranks.

Writes scaling.csv, scaling_strong.png, scaling_weak.png, memory.csv and
scaling_calibration.json.
"""
import argparse
import csv
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
MG = dict(max_levels=4, cfactor=4)
SETTINGS = [  # name, model mode, options (model and Network alike)
    ("serial", "serial", dict(max_levels=1)),
    ("pipeline", "pipeline", dict(max_levels=1)),  # micro-batches: min(batch, 4P)
    ("layer-parallel F skip", "layer-parallel",
     dict(MG, relax="F", skip=True, fwd_iters=2, bwd_iters=1)),
    ("layer-parallel FCF", "layer-parallel",
     dict(MG, relax="FCF", skip=False, fwd_iters=2, bwd_iters=1)),
    ("one-shot F skip", "one-shot", dict(MG, relax="F", skip=True, fwd_iters=1, bwd_iters=1)),
]
FIELDS = ["study", "setting", "ranks", "layers", "source", "clock", "oversubscribed",
          "seconds", "speedup_vs_serial_1", "efficiency"]
MEM_FIELDS = ["setting", "ranks", "layers", "peak_MiB_per_rank", "ratio_to_serial_1",
              "ratio_to_sequential_1"]


def microbatches(P, batch):
    return min(batch, 4 * P)


def net_options(name, options, P, batch):
    opts = dict(options)
    if name == "pipeline":
        opts["microbatches"] = microbatches(P, batch)
    if name.startswith("one-shot"):
        opts["warm_start"] = True
    return opts


def model_options(name, options, P, batch):
    opts = {k: v for k, v in options.items() if k != "max_levels" or v > 1}
    if name == "pipeline":
        return {"microbatches": microbatches(P, batch)}
    if name == "serial":
        return {}
    return opts


def layers_of(study, P, a):
    return a.layers if study == "strong" else a.per_rank * P


def _bench(a, layers):
    sys.path.insert(0, HERE)
    from _netbench import ConvNet
    return ConvNet(layers=layers, width=a.width, size=a.size, batch=a.batch)


def time_worker(a):
    import torch
    from mpi4py import MPI
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    P, rank = comm.Get_size(), comm.Get_rank()
    out = []
    if P <= 2:  # the calibration: steps on one rank, messages on two
        cal = _bench(a, 8).calibrate(comm, clock="cpu")
        if rank == 0:
            out.append({"calibration": cal.to_dict()})
    for study in ("strong", "weak"):
        N = layers_of(study, P, a)
        bench = _bench(a, N)
        for name, _, options in SETTINGS:
            if name == "pipeline" and P == 1:
                continue
            net = bench.network(comm, **net_options(name, options, P, a.batch))
            step = bench.trainer(net)
            step()  # warm-up (the one-shot solver's cold solve)
            wall, cpu = [], []
            for _ in range(a.steps if study == "strong" else max(a.steps, 5)):
                comm.Barrier()
                t, c = time.perf_counter(), time.process_time()
                step()
                comm.Barrier()
                wall.append(time.perf_counter() - t)
                cpu.append(comm.allreduce(time.process_time() - c, op=MPI.MAX))
            net.close()
            if rank == 0:
                row = dict(study=study, setting=name, ranks=P, layers=N,
                           wall=statistics.median(wall), cpu=statistics.median(cpu))
                out.append(row)
                print(f"  P={P} {study} N={N} {name}: {row['wall']:.3f} s wall, "
                      f"{row['cpu']:.3f} s CPU", flush=True)
    if rank == 0:
        with open(a.out, "w") as fh:
            json.dump(out, fh)


def _resident(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def memory_worker(a):
    import torch
    import torch.nn.functional as Fn
    from mpi4py import MPI
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    P = comm.Get_size()
    name = a.setting
    if name == "sequential":
        # the same layers as one nn.Sequential under plain autograd, one rank
        small = _bench(a, 4).network(MPI.COMM_SELF, max_levels=1)
        warm = small.serial_equivalent()
        small.close()
        bench = _bench(a, a.layers)
        Fn.cross_entropy(warm(bench.x), bench.y).backward()
        net = bench.network(MPI.COMM_SELF, max_levels=1)
        seq = net.serial_equivalent()
        net.close()
        del warm
        gc.collect()
        base = _resident("VmRSS")
        Fn.cross_entropy(seq(bench.x), bench.y).backward()
    else:
        options = {s[0]: s[2] for s in SETTINGS}[name]
        opts = net_options(name, options, P, a.batch)
        small = _bench(a, 4 * P)
        with small.network(comm, **opts) as net:
            small.trainer(net)()  # warm-up: torch's and MPI's first-use buffers
        gc.collect()
        base = _resident("VmRSS")
        bench = _bench(a, a.layers)
        net = bench.network(comm, **opts)
        bench.trainer(net)()
        net.close()
    peak = comm.allreduce(_resident("VmHWM") - base, op=MPI.MAX)
    if comm.Get_rank() == 0:
        with open(a.out, "w") as fh:
            json.dump({"setting": name, "ranks": P, "peak": peak}, fh)


# ---- the driver ---------------------------------------------------------------
def _run(P, args, a):
    cmd = a.mpiexec.split() + ["-n", str(P), sys.executable, os.path.abspath(__file__)] + args
    for k in ("layers", "per_rank", "width", "size", "batch", "steps"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    subprocess.run(cmd, check=True)


def measure_all(a, tmp):
    rows, cal, cal2 = [], None, None
    for P in a.ranks:
        path = os.path.join(tmp, f"time_{P}.json")
        print(f"measuring on {P} rank{'s' * (P > 1)}", flush=True)
        _run(P, ["--worker", "time", "--out", path], a)
        with open(path) as fh:
            for r in json.load(fh):
                if "calibration" in r:
                    if P == 1:
                        cal = r["calibration"]
                    else:
                        cal2 = r["calibration"]
                else:
                    rows.append(r)
    if cal is None:
        sys.exit("scaling: --ranks must include 1 (the calibration runs there)")
    if cal2 is not None:  # messages from the ping-pong on two ranks
        cal.update(latency=cal2["latency"], bandwidth=cal2["bandwidth"])
        cal["info"]["messages"] = "ping-pong on 2 ranks"
    return rows, cal


def memory_all(a, tmp):
    runs = [("serial", 1), ("sequential", 1)] + [(s[0], a.memory_ranks) for s in SETTINGS]
    out = []
    for name, P in runs:
        path = os.path.join(tmp, "mem.json")
        _run(P, ["--worker", "memory", "--setting", name, "--out", path], a)
        with open(path) as fh:
            out.append(json.load(fh))
        print(f"  memory {name} P={P}: {out[-1]['peak'] / 2**20:.1f} MiB per rank", flush=True)
    serial = next(r["peak"] for r in out if r["setting"] == "serial")
    seq = next(r["peak"] for r in out if r["setting"] == "sequential")
    return [dict(setting=r["setting"], ranks=r["ranks"], layers=a.layers,
                 peak_MiB_per_rank=f"{r['peak'] / 2**20:.2f}",
                 ratio_to_serial_1=f"{r['peak'] / serial:.3f}",
                 ratio_to_sequential_1=f"{r['peak'] / seq:.3f}") for r in out]


def write_memory(a, memory):
    with open(os.path.join(a.results, "memory.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, MEM_FIELDS)
        w.writeheader()
        w.writerows(memory)
    print("memory (peak per rank, N = %d):" % a.layers)
    for m in memory:
        print(f"  {m['setting']:<24} P={m['ranks']}: {m['peak_MiB_per_rank']} MiB, "
              f"x{m['ratio_to_serial_1']} of serial on 1 rank, x{m['ratio_to_sequential_1']} "
              "of nn.Sequential")


def model_rows(a, cal):
    from layerpar import perfmodel as pm
    c = pm.Calibration.load_dict(cal)
    rows = []
    P = 1
    while P <= a.max_ranks:
        for study in ("strong", "weak"):
            N = layers_of(study, P, a)
            for name, mode, options in SETTINGS:
                if name == "pipeline" and P == 1:
                    continue
                t = pm.training_step(c, N, P, mode, batch=a.batch,
                                     **model_options(name, options, P, a.batch))["time"]
                rows.append(dict(study=study, setting=name, ranks=P, layers=N, cpu=t))
        P *= 2
    return rows


def table(measured, modelled):
    cores = os.cpu_count() or 1
    out = []
    for source, rows, clocks in (("measured", measured, ("wall", "cpu")),
                                 ("model", modelled, ("cpu",))):
        for clock in clocks:
            def t(study, setting, P):
                return next((r[clock] for r in rows if r["study"] == study and
                             r["setting"] == setting and r["ranks"] == P), None)
            for r in rows:
                s, P = r["study"], r["ranks"]
                base, own = t(s, "serial", 1), t(s, r["setting"], 1)
                own = own if own is not None else t(s, "serial", 1)  # pipeline at P = 1
                eff = own / (P * r[clock]) if s == "strong" else own / r[clock]
                out.append(dict(study=s, setting=r["setting"], ranks=P, layers=r["layers"],
                                source=source, clock=clock,
                                oversubscribed="yes" if source == "measured" and P > cores
                                else "no",
                                seconds=f"{r[clock]:.5f}",
                                speedup_vs_serial_1=f"{base / r[clock]:.3f}" if s == "strong"
                                else "", efficiency=f"{eff:.3f}"))
    return out


def plot(rows, study, path, a):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    colors = dict(zip([s[0] for s in SETTINGS], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    sel = [r for r in rows if r["study"] == study]
    for name in colors:
        m = [r for r in sel if r["setting"] == name and r["source"] == "model"]
        x = [int(r["ranks"]) for r in m]
        ax[0].plot(x, [float(r["seconds"]) for r in m], "-", color=colors[name], label=name)
        key = "speedup_vs_serial_1" if study == "strong" else "efficiency"
        ax[1].plot(x, [float(r[key]) for r in m], "-", color=colors[name])
        for over, marker in (("no", "o"), ("yes", "s")):
            d = [r for r in sel if r["setting"] == name and r["source"] == "measured"
                 and r["clock"] == "cpu" and r["oversubscribed"] == over]
            kw = dict(color=colors[name], ls="none", marker=marker,
                      mfc="none" if over == "yes" else colors[name])
            ax[0].plot([int(r["ranks"]) for r in d], [float(r["seconds"]) for r in d], **kw)
            ax[1].plot([int(r["ranks"]) for r in d], [float(r[key]) for r in d], **kw)
    ser = [r for r in sel if r["setting"] == "serial" and r["source"] == "model"]
    P = [int(r["ranks"]) for r in ser]
    t1 = float(ser[0]["seconds"])
    if study == "strong":
        ax[0].plot(P, [t1 / p for p in P], "k:", label="ideal (serial, 1 rank / P)")
        ax[1].plot(P, P, "k:", label="ideal")
        ax[1].set_yscale("log", base=2)
        ax[1].set_ylabel("speed-up over serial on 1 rank")
        ax[0].set_title(f"strong scaling, N = {a.layers}")
    else:
        ax[0].plot(P, [t1] * len(P), "k:", label="ideal (serial, 1 rank)")
        ax[1].axhline(1.0, color="k", ls=":")
        ax[1].set_ylabel("efficiency T(1) / T(P)")
        ax[0].set_title(f"weak scaling, N = {a.per_rank} P")
    ax[0].set_yscale("log")
    ax[0].set_ylabel("seconds per training step")
    for x in ax:
        x.set_xscale("log", base=2)
        x.set_xlabel("ranks P")
        x.grid(True, which="both", alpha=0.3)
    ax[0].legend(fontsize=7)
    ax[1].set_title("lines: model; dots: measured (CPU s), hollow: oversubscribed",
                    fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2,4", help="measured rank counts (must include 1)")
    p.add_argument("--max-ranks", type=int, default=256)
    p.add_argument("--memory-ranks", type=int, default=4)
    p.add_argument("--memory-only", action="store_true",
                   help="measure the memory only (memory.csv; no timing, model or plots)")
    p.add_argument("--layers", type=int, default=1024, help="N of the strong study")
    p.add_argument("--per-rank", type=int, default=16, help="N / P of the weak study")
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--results", default=RESULTS)
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    p.add_argument("--mpiexec", default=beside if os.path.exists(beside) else "mpiexec",
                   help="launcher taking -n P (default: the mpiexec beside this Python; "
                   "srun in a SLURM allocation)")
    p.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--setting", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker == "time":
        return time_worker(a)
    if a.worker == "memory":
        return memory_worker(a)
    a.ranks = [int(r) for r in a.ranks.split(",")]
    os.makedirs(a.results, exist_ok=True)
    t0 = time.perf_counter()
    if a.memory_only:
        with tempfile.TemporaryDirectory() as tmp:
            memory = memory_all(a, tmp)
        write_memory(a, memory)
        print(f"wrote memory.csv ({time.perf_counter() - t0:.0f} s)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        measured, cal = measure_all(a, tmp)
        print("memory", flush=True)
        memory = memory_all(a, tmp)
    with open(os.path.join(a.results, "scaling_calibration.json"), "w") as fh:
        json.dump(cal, fh, indent=1)
    rows = table(measured, model_rows(a, cal))
    path = os.path.join(a.results, "scaling.csv")
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, FIELDS)
        w.writeheader()
        w.writerows(rows)
    write_memory(a, memory)
    for study in ("strong", "weak"):
        plot(rows, study, os.path.join(a.results, f"scaling_{study}.png"), a)
    print(f"{'study':<7}{'setting':<24}{'P':>4} {'measured wall':>13} {'measured CPU':>12} "
          f"{'model':>8}")
    for r in rows:
        if r["source"] != "model" or r["ranks"] not in a.ranks:
            continue
        def get(src, clock):
            v = next((x["seconds"] for x in rows if x["source"] == src and x["clock"] == clock
                      and x["study"] == r["study"] and x["setting"] == r["setting"]
                      and x["ranks"] == r["ranks"]), "")
            return v
        print(f"{r['study']:<7}{r['setting']:<24}{r['ranks']:>4} {get('measured', 'wall'):>13} "
              f"{get('measured', 'cpu'):>12} {r['seconds']:>8}")
    print(f"wrote {path} and the PNG, memory.csv next to it "
          f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
