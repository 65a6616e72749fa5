"""Transformer blocks on the built-in recall task: exact propagation vs
layer-parallel (MGRIT, default settings, with and without the residual
monitor) vs nested iteration, by final accuracy and by work and wall time
to the exact run's accuracy.

    python benchmarks/bench_transformer.py                      # N = 32 and 128, seeds 0 1 2
    mpiexec -n 2 python benchmarks/bench_transformer.py         # the same on 2 ranks
    nice -n 10 mpiexec -n 2 python benchmarks/bench_transformer.py --quick   # a 2-core machine

The problem: ``layerpar/configs/recall.toml``'s task (associative recall,
sequences of 13 tokens with per-sample padding carried as the batch's
context), transformer blocks of width ``--width`` (4 heads, MLP ratio 2),
T = 4, Adam with a cosine schedule, ``--epochs`` epochs.  Methods:

* ``exact``          one level (``mgrit.mode = "serial"``)
* ``layer-parallel`` MGRIT with the configuration's defaults (2 levels,
                     cfactor 4, F-relaxation, 2 forward / 1 adjoint
                     iterations, the residual monitor on)
* ``lp-nomonitor``   the same without the monitor (fixed iterations)
* ``nested``         nested iteration over depths N/4, N/2, N (exact
                     propagation; the coarser depths get fewer epochs)

For each depth and seed the target is the exact run's final validation
accuracy; for each method the work (forward + adjoint layer steps, all
levels, summed over ranks) and the wall time until the first epoch that
reaches it are recorded (empty when never reached).  Wall times on a loaded
machine are indicative only; work and accuracy are not affected by load.

Writes benchmarks/results/transformer.csv (one row per run; ``--quick``:
transformer_quick.csv) and the PNG beside it (accuracy against work).
"""
import argparse
import csv
import os

import _common as common

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
METHODS = ("exact", "layer-parallel", "lp-nomonitor", "nested")
FIELDS = ["depth", "seed", "method", "ranks", "epochs", "width", "target_acc", "final_val_acc",
          "work_to_target", "time_to_target", "total_work", "total_time"]


def _config(a, depth, seed, method, run_dir):
    from layerpar.config import resolve
    sets = ['data.name="recall"', f"data.batch_size={a.batch}", f"data.seed={seed}",
            'model.kind="transformer"', f"model.width={a.width}", "model.heads=4",
            "model.mlp_ratio=2.0", f"model.nlayers={depth}", "model.T=4.0", 'model.pool="first"',
            f"model.seed={seed}", 'optim.name="adam"', f"optim.lr={a.lr}",
            f"optim.epochs={a.epochs}", 'optim.schedule="cosine"', "run.plot=false",
            f'run.dir="{run_dir}"', "run.checkpoint_every=-1"]
    if method in ("exact", "nested"):
        sets.append('mgrit.mode="serial"')
    else:
        sets.append('mgrit.mode="layer-parallel"')
        if method == "lp-nomonitor":
            sets.append("mgrit.monitor=false")
    if method == "nested":
        budgets = [max(1, a.epochs // 4), max(1, a.epochs // 2), a.epochs]
        sets += ['multilevel.method="nested"', "multilevel.levels=3",
                 f"multilevel.epochs_per_level={budgets}"]
    return resolve(None, sets)


def _train(a, comm, depth, seed, method):
    rows = common.train(comm, lambda tmp: _config(a, depth, seed, method, tmp),
                        prefix="lp-bench-tf-",
                        read=lambda tr: comm.bcast(tr.metrics.rows(), root=0))  # written on rank 0
    curve, t = [], 0.0
    for r in rows:
        t += r["wall_time"]
        curve.append({"val_acc": r["val_acc"], "time": t, "work": r["fwd_work"] + r["bwd_work"]})
    return curve


def _plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    depths = sorted({d for d, _, _ in curves})
    fig, axes = plt.subplots(1, len(depths), figsize=(5.5 * len(depths), 3.8), squeeze=False)
    colors = dict(zip(METHODS, ("C0", "C1", "C2", "C3")))
    for ax, depth in zip(axes[0], depths):
        for (d, seed, method), cs in sorted(curves.items()):
            if d != depth:
                continue
            ax.plot([c["work"] for c in cs], [100 * c["val_acc"] for c in cs], "o-", ms=3,
                    color=colors[method], alpha=0.7, label=method if seed == 0 else None)
        ax.set_xlabel("work [layer steps, forward + adjoint]")
        ax.set_ylabel(f"N = {depth}: validation accuracy [%]")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    from mpi4py import MPI
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", nargs="+", type=int, default=[32, 128])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--quick", action="store_true",
                   help="N = 8 and 16, width 16, batch 500, 3 epochs, lr 0.01, without "
                        "lp-nomonitor: what a loaded 2-core machine allows")
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    if a.quick:
        a.depths, a.width, a.batch, a.epochs, a.lr = [8, 16], 16, 500, 3, 0.01
        a.methods = [m for m in a.methods if m != "lp-nomonitor"]
    comm = MPI.COMM_WORLD
    name = "transformer_quick" if a.quick else "transformer"
    curves, rows = {}, []
    for seed in a.seeds:  # each seed's depths and methods, the CSV rewritten after each run
        for depth in a.depths:
            target = None
            for method in ("exact",) + tuple(m for m in a.methods if m != "exact"):
                cs = curves[(depth, seed, method)] = _train(a, comm, depth, seed, method)
                if method == "exact":
                    target = cs[-1]["val_acc"]
                work, time = common.to_target(cs, target, "work", "time")
                rows.append({"depth": depth, "seed": seed, "method": method,
                             "ranks": comm.size, "epochs": a.epochs, "width": a.width,
                             "target_acc": target, "final_val_acc": cs[-1]["val_acc"],
                             "work_to_target": work, "time_to_target": time,
                             "total_work": cs[-1]["work"], "total_time": cs[-1]["time"]})
                if comm.rank == 0:
                    r = rows[-1]
                    print(f"N={depth} seed={seed} {method:15s} acc {100 * r['final_val_acc']:.1f}% "
                          f"(target {100 * target:.1f}%) work to target {work} "
                          f"time {time:.1f}s", flush=True)
                    _write(a, name, rows, curves)


def _write(a, name, rows, curves):
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, name + ".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    _plot(curves, os.path.join(a.out, name + ".png"))


if __name__ == "__main__":
    main()
