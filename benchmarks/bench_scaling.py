"""Strong and weak scaling of layer-parallel training steps.

Under mpiexec/srun (one measurement on the ranks it was started with):

    srun -n 16 python benchmarks/bench_scaling.py --layers 256 --csv out.csv

times `--steps` training steps (forward MGRIT + adjoint MGRIT + optimiser
step) of the configured network on one fixed batch and appends one CSV row:
ranks, layers, mode, levels, iterations, median wall time per step and per
solve, and the virtual-clock time of the step (modelled parallel time in
units of one fine-layer step, with the schedule that ran).

Without mpiexec, `--ranks 1,2,4` launches one run per rank count with the
mpiexec beside this Python and plots the results (PNG next to the CSV):

    python benchmarks/bench_scaling.py --ranks 1,2,4 --layers 64           # strong
    python benchmarks/bench_scaling.py --ranks 1,2,4 --layers 16 --weak    # N = 16 * P
"""
import argparse
import csv
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIELDS = ["ranks", "layers", "mode", "max_levels", "cfactor", "fwd_iters", "bwd_iters",
          "batch", "step_s", "forward_s", "backward_s", "virtual_steps", "repeat_id"]


def measure(a):
    import torch
    import torch.nn.functional as Fn
    from mpi4py import MPI

    from layerpar.config import resolve
    from layerpar.data import load_dataset
    from layerpar.training import DTYPES, build_network

    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    sets = [f"model.nlayers={a.layers}", f"data.batch_size={a.batch}"]
    if a.data_dir:
        sets.append(f'data.root="{a.data_dir}"')
    if a.mode:
        sets.append(f'mgrit.mode="{a.mode}"')
    config = resolve(a.config, sets + list(a.set))
    rank, size = comm.Get_rank(), comm.Get_size()
    data = load_dataset(config["data"]["name"], root=config["data"]["root"] or None,
                        dtype=DTYPES[config["data"]["dtype"]], need_inputs=rank == 0,
                        need_labels=rank == size - 1, comm=comm)
    net = build_network(config, data.input_shape, data.num_classes, comm)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x, y = next(iter(data.train.loader(batch_size=a.batch, seed=0, need_inputs=rank == 0,
                                       need_labels=rank == size - 1).epoch(0)))
    body = net.body
    times, fwd, bwd, vt = [], [], [], []
    for k in range(a.steps + 1):  # the first is a warm-up
        comm.Barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        out = net(x)
        t1 = time.perf_counter()
        loss = Fn.cross_entropy(out, y) if net.is_last else out.sum() * 0.0
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        comm.Barrier()
        t3 = time.perf_counter()
        if k:
            times.append(t3 - t0)
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            vt.append(body.last_forward["virtual_time"] + body.last_backward["virtual_time"])
    med = lambda v: comm.allreduce(statistics.median(v), op=MPI.MAX)  # noqa: E731
    row = dict(ranks=size, layers=a.layers, mode=config["mgrit"]["mode"],
               max_levels=body.fwd_options["max_levels"], cfactor=body.fwd_options["cfactor"],
               fwd_iters=body.last_forward["iterations"],
               bwd_iters=body.last_backward["iterations"], batch=a.batch,
               step_s=med(times), forward_s=med(fwd), backward_s=med(bwd),
               virtual_steps=statistics.median(vt), repeat_id=a.repeat_id)
    if rank == 0:
        print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()), flush=True)
        if a.csv:
            new = not os.path.exists(a.csv)
            with open(a.csv, "a", newline="") as fh:
                w = csv.DictWriter(fh, FIELDS)
                if new:
                    w.writeheader()
                w.writerow(row)


def spawn(a):
    ranks = [int(r) for r in a.ranks.split(",")]
    out = a.csv or os.path.join(HERE, "results", "scaling_weak.csv" if a.weak else
                                "scaling_strong.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.exists(out):
        os.remove(out)
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    for p in ranks:
        layers = a.layers * p if a.weak else a.layers
        cmd = [mpiexec, "-n", str(p), sys.executable, os.path.abspath(__file__),
               "--layers", str(layers), "--batch", str(a.batch), "--steps", str(a.steps),
               "--csv", out]
        for flag, val in (("--config", a.config), ("--mode", a.mode),
                          ("--data-dir", a.data_dir)):
            if val:
                cmd += [flag, val]
        for s in a.set:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True)
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        P = [int(r["ranks"]) for r in rows]
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
        ax[0].plot(P, [float(r["step_s"]) for r in rows], "o-", label="measured")
        ax[0].set_xscale("log", base=2)
        ax[0].set_xlabel("ranks")
        ax[0].set_ylabel("seconds per training step")
        ax[0].set_title(("weak" if a.weak else "strong") + " scaling, wall time")
        v1 = float(rows[0]["virtual_steps"])
        ax[1].plot(P, [v1 / float(r["virtual_steps"]) for r in rows], "o-")
        ax[1].set_xscale("log", base=2)
        ax[1].set_xlabel("ranks")
        ax[1].set_title("virtual-clock speedup over the 1st rank count")
        fig.tight_layout()
        fig.savefig(out.replace(".csv", ".png"), dpi=110)
    except ImportError:
        pass
    print(f"wrote {out}")


def main():
    p = argparse.ArgumentParser(description="layer-parallel training step scaling")
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--config", default=None, help="TOML configuration (default: built-in)")
    p.add_argument("--mode", default=None, help="serial, layer-parallel, one-shot")
    p.add_argument("--set", action="append", default=[], help="section.key=value")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeat-id", type=int, default=0)
    p.add_argument("--csv", default=None)
    p.add_argument("--ranks", default=None, help="spawn one run per rank count, e.g. 1,2,4")
    p.add_argument("--weak", action="store_true", help="with --ranks: layers per rank")
    a = p.parse_args()
    if a.ranks:
        spawn(a)
    else:
        measure(a)


if __name__ == "__main__":
    main()
