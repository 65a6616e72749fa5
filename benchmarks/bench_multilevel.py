"""Single-level training vs nested iteration vs MG/OPT, by wall time and by
work to a validation accuracy.

    python benchmarks/bench_multilevel.py                 # peaks and digits, seeds 0 1 2
    mpiexec -n 2 python benchmarks/bench_multilevel.py    # the same, layer-parallel on 2 ranks
    python benchmarks/bench_multilevel.py --datasets peaks --seeds 0 --epochs 2
    python benchmarks/bench_multilevel.py --suite deterministic   # full-batch peaks, N = 64

Suite ``stochastic`` (the default): Adam on mini-batches, short runs.

Suite ``deterministic``: the regime MG/OPT is meant for.  Peaks, dense,
width 8, N = 64, T = 5, tanh, float64, full-batch gradient descent (one
unshuffled batch of the 5000 training points, learning rate 0.3, no
momentum, no schedule), 120 steps single-level.  Nested iteration over 3
depths (16, 32, 64) with budgets of 30, 60 and 120 steps.  MG/OPT: 3 levels
(64, 32, 16 layers, r = 2), V-cycles with no pre-smoothing, one
post-smoothing step, 8 gradient-descent steps on the coarsest level,
recursion on the middle one, the line search's first trial evaluated with
its gradient and evaluations at unchanged weights reused
(``multilevel.reuse``), 24 cycles (about the single-level run's work);
``mgopt-noreuse`` is the same cycle without reuse.  ``--optimizer`` picks
another smoother for every method (momentum, adam, lbfgs).

For each data set and seed, the three methods train the same network
(same configuration, seed and batches).  The target of a seed is the final
validation accuracy of its single-level run; for each method the wall time
and the work (forward + adjoint layer-step evaluations, all levels, summed
over ranks) until the first epoch whose validation accuracy reaches the
target are recorded (empty when never reached).  Printed: medians over the
seeds and the ratios single-level / method (> 1: the method is faster).

Writes under benchmarks/results/: multilevel.csv (one row per run),
multilevel_curves.csv (one row per epoch of each run) and multilevel.png
(validation accuracy against work and against wall time); the
deterministic suite multilevel_deterministic{,_curves}.csv and
multilevel_deterministic.png (with ``--optimizer`` X other than gd:
multilevel_deterministic_X...).
"""
import argparse
import csv
import math
import os
import shutil
import statistics
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# small problems: the default run stays within minutes on two cores
PROBLEMS = {
    "peaks": ['data.name="peaks"', "data.batch_size=200", 'model.kind="dense"', "model.width=8",
              "model.nlayers=32", "model.T=5.0", 'model.activation="tanh"', "optim.lr=0.01"],
    "digits": ['data.name="digits"', "data.batch_size=100", 'data.dtype="float32"',
               'model.kind="conv"', "model.width=8", "model.nlayers=16", "model.T=2.0",
               'model.activation="relu"', "optim.lr=0.005"],
}
EPOCHS = {"peaks": 6, "digits": 4}
METHODS = ("single", "nested", "mgopt")

# the deterministic suite: one problem, full batch, every method with the
# same smoother
FULL_BATCH = ['data.name="peaks"', "data.batch_size=5000", 'data.dtype="float64"',
              'model.kind="dense"', "model.width=8", "model.nlayers=64", "model.T=5.0",
              'model.activation="tanh"', 'optim.schedule="constant"']
SMOOTHERS = {"gd": ['optim.name="sgd"', "optim.momentum=0.0", "optim.lr=0.3"],
             "momentum": ['optim.name="sgd"', "optim.momentum=0.9", "optim.lr=0.03"],
             "adam": ['optim.name="adam"', "optim.lr=0.01"],
             "lbfgs": ['optim.name="lbfgs"', "optim.lr=1.0"]}
DET_STEPS, DET_CYCLES = 120, 24
DET_METHODS = ("single", "nested", "mgopt", "mgopt-noreuse")
DET_MGOPT = ['multilevel.method="mgopt"', "multilevel.levels=3", "multilevel.factor=2",
             "multilevel.pre_steps=0", "multilevel.post_steps=1", "multilevel.coarse_steps=8"]
RUN_FIELDS = ["dataset", "seed", "method", "ranks", "epochs", "target_acc", "final_val_acc",
              "best_val_acc", "time_to_target", "work_to_target", "total_time", "total_work"]
CURVE_FIELDS = ["dataset", "seed", "method", "epoch", "nlayers", "val_acc", "time", "work"]


def _config(a, dataset, seed, method, run_dir):
    from layerpar.config import resolve
    if a.suite == "deterministic":
        return resolve(None, _deterministic(a, seed, method, run_dir) + list(a.set))
    e = a.epochs or EPOCHS[dataset]
    sets = PROBLEMS[dataset] + [
        f'mgrit.mode="{a.mode}"', f"model.seed={seed}", f"data.seed={seed}",
        'optim.name="adam"', f"optim.epochs={e}", 'optim.schedule="cosine"', "run.plot=false",
        f'run.dir="{run_dir}"', f"multilevel.factor={a.factor}",
        f"multilevel.levels={a.mg_levels if method == 'mgopt' else a.levels}"]
    if method == "nested":
        # the coarser depths get half the epochs of the next finer one
        budgets = [max(1, e // 2 ** (a.levels - 1 - i)) for i in range(a.levels)]
        sets += ['multilevel.method="nested"', f"multilevel.epochs_per_level={budgets}",
                 f'multilevel.prolong="{a.prolong}"']
    elif method == "mgopt":
        sets += ['multilevel.method="mgopt"', f'multilevel.prolong="{a.prolong}"',
                 f"multilevel.pre_steps={a.pre}", f"multilevel.post_steps={a.post}",
                 f"multilevel.coarse_steps={a.coarse}"]
    return resolve(None, sets + list(a.set))


def _deterministic(a, seed, method, run_dir):
    e = a.epochs or DET_STEPS
    sets = FULL_BATCH + SMOOTHERS[a.optimizer] + [
        f'mgrit.mode="{a.mode}"', f"model.seed={seed}", f"data.seed={seed}",
        "run.plot=false", f'run.dir="{run_dir}"', "run.checkpoint_every=-1"]
    if method == "single":
        return sets + [f"optim.epochs={e}"]
    if method == "nested":
        return sets + [f"optim.epochs={e}", 'multilevel.method="nested"', "multilevel.levels=3",
                       f"multilevel.epochs_per_level={[e // 4, e // 2, e]}"]
    return sets + DET_MGOPT + [f"optim.epochs={a.cycles or DET_CYCLES}",
                               f"multilevel.reuse={str(method == 'mgopt').lower()}"]


def _train(a, comm, dataset, seed, method):
    import torch
    from layerpar.training import make_trainer
    torch.set_num_threads(1)
    tmp = comm.bcast(tempfile.mkdtemp(prefix="lp-bench-ml-") if comm.rank == 0 else None, root=0)
    try:
        trainer = make_trainer(_config(a, dataset, seed, method, tmp), comm)
        trainer.run()
        rows = trainer.metrics.rows()
    finally:
        comm.Barrier()
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    if comm.rank != 0:
        return None
    curve, t = [], 0.0
    for r in rows:
        t += r["wall_time"]
        curve.append({"dataset": dataset, "seed": seed, "method": method, "epoch": r["epoch"],
                      "nlayers": r.get("nlayers", _nlayers(dataset)), "val_acc": r["val_acc"],
                      "time": t, "work": r["fwd_work"] + r["bwd_work"]})
    return curve


def _nlayers(dataset):
    return int(next(s for s in PROBLEMS[dataset] if s.startswith("model.nlayers=")).split("=")[1])


def _to_target(curve, target):
    for c in curve:
        if c["val_acc"] >= target - 1e-12:
            return c["time"], c["work"]
    return math.nan, math.nan


def _median(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def _plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datasets = sorted({c["dataset"] for c in curves})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 3.6 * len(datasets)), squeeze=False)
    colors = {"single": "C0", "nested": "C1", "mgopt": "C2", "mgopt-noreuse": "C3"}
    for i, ds in enumerate(datasets):
        for (method, seed) in sorted({(c["method"], c["seed"]) for c in curves if c["dataset"] == ds}):
            cs = [c for c in curves if c["dataset"] == ds and c["method"] == method
                  and c["seed"] == seed]
            label = method if seed == min(c["seed"] for c in curves) else None
            axes[i][0].plot([c["work"] for c in cs], [100 * c["val_acc"] for c in cs], "o-",
                            color=colors[method], alpha=0.7, label=label, ms=3)
            axes[i][1].plot([c["time"] for c in cs], [100 * c["val_acc"] for c in cs], "o-",
                            color=colors[method], alpha=0.7, label=label, ms=3)
        axes[i][0].set_xlabel("work [layer-step evaluations, forward + adjoint]")
        axes[i][1].set_xlabel("wall time [s]")
        for ax in axes[i]:
            ax.set_ylabel(f"{ds}: validation accuracy [%]")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="stochastic", choices=["stochastic", "deterministic"])
    p.add_argument("--optimizer", default="gd", choices=sorted(SMOOTHERS),
                   help="deterministic suite: the smoother of every method")
    p.add_argument("--cycles", type=int, default=0,
                   help=f"deterministic suite: MG/OPT cycles (0: {DET_CYCLES})")
    p.add_argument("--datasets", nargs="+", default=["peaks", "digits"], choices=sorted(PROBLEMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=0, help="epochs (0: the data set's default)")
    p.add_argument("--mode", default="serial", choices=["serial", "layer-parallel", "one-shot"])
    p.add_argument("--levels", type=int, default=3, help="depths of nested iteration")
    p.add_argument("--mg-levels", type=int, default=2, help="levels of MG/OPT")
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--prolong", default="constant", choices=["constant", "linear"])
    p.add_argument("--pre", type=int, default=1)
    p.add_argument("--post", type=int, default=1)
    p.add_argument("--coarse", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    say = print if comm.rank == 0 else (lambda *x, **k: None)
    methods, stem = METHODS, "multilevel"
    if a.suite == "deterministic":
        a.datasets, methods = ["peaks"], DET_METHODS
        stem = "multilevel_deterministic" + ("" if a.optimizer == "gd" else f"_{a.optimizer}")

    curves, runs = [], []
    for ds in a.datasets:
        for seed in a.seeds:
            by_method = {}
            for method in methods:
                by_method[method] = _train(a, comm, ds, seed, method)
                if comm.rank == 0:
                    c = by_method[method]
                    say(f"{ds} seed {seed} {method:13s}: val {100 * c[-1]['val_acc']:.1f}% in "
                        f"{c[-1]['time']:.1f}s, work {c[-1]['work']:.3g}", flush=True)
            if comm.rank != 0:
                continue
            target = by_method["single"][-1]["val_acc"]
            for method, c in by_method.items():
                t, w = _to_target(c, target)
                runs.append({"dataset": ds, "seed": seed, "method": method,
                             "ranks": comm.size, "epochs": len(c), "target_acc": target,
                             "final_val_acc": c[-1]["val_acc"],
                             "best_val_acc": max(x["val_acc"] for x in c),
                             "time_to_target": t, "work_to_target": w,
                             "total_time": c[-1]["time"], "total_work": c[-1]["work"]})
                curves += c
    if comm.rank != 0:
        return 0
    os.makedirs(a.out, exist_ok=True)
    for name, fields, rows in ((f"{stem}.csv", RUN_FIELDS, runs),
                               (f"{stem}_curves.csv", CURVE_FIELDS, curves)):
        with open(os.path.join(a.out, name), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    _plot(curves, os.path.join(a.out, f"{stem}.png"))

    what = f"suite {a.suite}" + (f", smoother {a.optimizer}" if a.suite == "deterministic" else "")
    say(f"\nmedians over seeds {a.seeds} on {comm.size} rank(s), mode {a.mode}, {what}; target = "
        "the single-level run's final validation accuracy; ratio = single / method")
    say(f"{'data':7s} {'method':13s} {'final acc':>9s} {'reached':>7s} {'time to':>8s} "
        f"{'work to':>10s} {'time ratio':>10s} {'work ratio':>10s} {'total work':>10s}")
    for ds in a.datasets:
        med = {}
        for method in methods:
            rs = [r for r in runs if r["dataset"] == ds and r["method"] == method]
            med[method] = (_median([r["time_to_target"] for r in rs]),
                           _median([r["work_to_target"] for r in rs]))
            reached = sum(not math.isnan(r["time_to_target"]) for r in rs)
            t, w = med[method]
            say(f"{ds:7s} {method:13s} {100 * _median([r['final_val_acc'] for r in rs]):8.1f}% "
                f"{reached:>4d}/{len(rs)} {t:7.1f}s {w:10.4g} "
                f"{med['single'][0] / t:10.2f} {med['single'][1] / w:10.2f} "
                f"{_median([r['total_work'] for r in rs]):10.4g}")
    say(f"results in {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
