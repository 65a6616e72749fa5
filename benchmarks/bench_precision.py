"""The main job in bfloat16 against float32: final validation accuracy and
training loss per seed, with the float32 master weights of the optimiser
(``optim.master_weights``, the default) and without them.

    mpiexec -n 2 python benchmarks/bench_precision.py               # seeds 0 1 2, 40 epochs
    mpiexec -n 2 python benchmarks/bench_precision.py --quick       # 1 seed, 4 epochs

The run is the built-in default (peaks, dense ResNet of 32 layers, width 8,
layer-parallel, Adam with a cosine schedule over 40 epochs) with
``data.dtype`` and ``model.seed``/``data.seed`` set; the weights, the states
and the messages are in the data's dtype.  Prints, per seed, each setting's
accuracy and its difference to float32, and writes
benchmarks/results/precision_train.csv (``--quick``: precision_train_quick.csv)
with one row per run and epoch.
"""
import argparse
import csv
import os
import statistics
import time

from mpi4py import MPI

import _common as common

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SETTINGS = {  # name -> (data.dtype, optim.master_weights)
    "float32": ("float32", True),
    "bfloat16": ("bfloat16", True),
    "bfloat16-plain": ("bfloat16", False),
}
FIELDS = ["setting", "dtype", "master_weights", "seed", "ranks", "epoch", "train_loss",
          "val_acc", "time"]


def run(comm, setting, seed, epochs):
    from layerpar.config import resolve
    dtype, master = SETTINGS[setting]

    def config(run_dir):
        return resolve(None, [f'data.dtype="{dtype}"', f"optim.master_weights={str(master).lower()}",
                              f"model.seed={seed}", f"data.seed={seed}", f"optim.epochs={epochs}",
                              "run.plot=false", f'run.dir="{run_dir}"'])

    t0 = time.perf_counter()
    rows = common.train(comm, config, prefix="lp-precision-",
                        read=lambda tr: comm.bcast(tr.metrics.rows() if comm.rank == 0 else None,
                                                   root=0))
    wall = time.perf_counter() - t0
    return [{"setting": setting, "dtype": dtype, "master_weights": master, "seed": seed,
             "ranks": comm.size, "epoch": int(r["epoch"]), "train_loss": float(r["train_loss"]),
             "val_acc": float(r["val_acc"]), "time": wall} for r in rows]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--quick", action="store_true", help="seed 0, 4 epochs")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    settings = common.chosen(p, "--settings", a.settings, SETTINGS)
    if a.quick:
        a.seeds, a.epochs = [0], 4
    out = a.out or os.path.join(RESULTS, "precision_train_quick.csv" if a.quick
                                else "precision_train.csv")
    comm = MPI.COMM_WORLD
    rows = []
    for seed in a.seeds:
        for s in settings:
            rows += run(comm, s, seed, a.epochs)
    if comm.rank:
        return
    final = {(r["setting"], r["seed"]): r for r in rows if r["epoch"] == a.epochs}
    print(f"main job, {a.epochs} epochs, {comm.size} ranks: final validation accuracy "
          f"(difference to float32, points) and training loss")
    for s in settings:
        line = []
        for seed in a.seeds:
            r, f32 = final[(s, seed)], final.get(("float32", seed))
            diff = f" ({100 * (r['val_acc'] - f32['val_acc']):+.1f})" if f32 else ""
            line.append(f"seed {seed}: {100 * r['val_acc']:.1f}%{diff} {r['train_loss']:.4f}")
        if "float32" in settings:
            med = statistics.median(100 * (final[(s, k)]["val_acc"] - final[("float32", k)]
                                           ["val_acc"]) for k in a.seeds)
            line.append(f"median difference {med:+.2f} points")
        print(f"  {s:15s} " + "; ".join(line))
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
