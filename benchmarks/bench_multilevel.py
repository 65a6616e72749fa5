"""Single-level training vs nested iteration vs MG/OPT vs the globalised
multilevel method (RMTR) vs full multigrid, by the work to a validation
accuracy.

    python benchmarks/bench_multilevel.py --suite adam            # peaks N=64, N=256, digits
    python benchmarks/bench_multilevel.py --suite adam --problems peaks64 --seeds 0 1 2
    python benchmarks/bench_multilevel.py --suite deterministic   # full-batch peaks, N = 64
    python benchmarks/bench_multilevel.py --suite stochastic      # the first suite (short runs)
    mpiexec -n 2 python benchmarks/bench_multilevel.py ...        # layer-parallel on 2 ranks

For each problem and seed every method trains the same network (same
configuration, seed and batches).  The target of a seed is the final
validation accuracy of its single-level run; for each method the work
(forward + adjoint layer-step evaluations, all levels, summed over ranks:
the metrics' ``fwd_work + bwd_work``) and the wall time until the first
epoch whose validation accuracy reaches the target are recorded (empty when
never reached), and the ratio single-level / method of the work (> 1: the
method needs less).  Printed per problem and method: the median and the
worst ratio over the seeds and how many seeds reached the target.

The work counts layer steps whatever the number of samples they carry.  A
method that evaluates larger batches (RMTR with several loader batches per
cycle) is therefore also measured by ``samples_work``: each layer step
weighed by its batch's samples, reported relative to the single-level run's
(exact for RMTR, from its metrics column; for the other methods, whose
evaluations all take one loader batch, the work times the mean batch size).

Suite ``adam``: mini-batch Adam (cosine schedule) on
  peaks64   peaks, dense, width 8, N = 64, T = 5, tanh, float64, batches of
            200, learning rate 0.01, 10 epochs
  peaks256  the same with N = 256
  digits    digits, conv, width 8, N = 16, T = 2, ReLU, float32, batches of
            100, learning rate 0.005, 8 epochs
methods: ``single``; ``nested`` (3 depths, r = 2, budgets of 1/4, 1/2 and 1
of the epochs); ``mgopt`` (MG/OPT with its line search, 2 levels, r = 2, one
pre- and one post-smoothing step, 2 coarse steps, as the first suite);
``rmtr`` (see RMTR below); ``nested-rmtr`` (nested iteration to the
finest depth, then RMTR cycles: ``multilevel.start = "nested"``); ``fmg``
(full multigrid: RMTR's cycles from nested iteration's second depth on,
``multilevel.start = "full-multigrid"``).

Suite ``deterministic``: the regime MG/OPT is meant for.  Peaks, dense,
width 8, N = 64, T = 5, tanh, float64, full-batch gradient descent (one
unshuffled batch of the 5000 training points, learning rate 0.3, no
momentum, no schedule), 120 steps single-level.  Nested iteration over 3
depths (16, 32, 64) with budgets of 30, 60 and 120 steps.  MG/OPT: 3 levels,
no pre-smoothing, one post-smoothing step, 8 coarsest steps, ``reuse``, 24
cycles; ``mgopt-noreuse`` the same without reuse; ``rmtr``,
``nested-rmtr`` and ``fmg`` as below.  ``--optimizer`` picks another smoother for every method
(gd, momentum, adam, lbfgs, lsr1: L-SR1 in its own trust region on every level).

Suite ``stochastic``: the first suite, short runs (peaks N = 32, 6 epochs;
digits N = 16, 4 epochs) of single, nested and MG/OPT.

RMTR (``RMTR_SETS``, per suite).  Adam: 2 levels, r = 4, no pre-smoothing,
8 coarse steps, one post-smoothing step, one loader batch per cycle (so
``work`` and ``samples_work`` say the same), 2/5 of the epochs (a cycle
costs about 4 fine evaluations: about the single-level run's work).
Deterministic: 3 levels, r = 2, 8 coarsest steps, no smoothing, 24 cycles.
Full multigrid (``FMG_SETS``): 3 depths, r = 2; Adam: the coarsest depth
1/4 of the epochs with plain steps, then RMTR cycles for 1/5 and 2/5 of
them (one post-smoothing step, 4 coarsest steps); deterministic: 30 plain
steps, then 60 and 24 cycles.  ``--rmtr-set`` adds settings to both.

Writes under benchmarks/results/: multilevel_<suite>.csv (one row per run),
multilevel_<suite>_curves.csv (one row per epoch of each run) and
multilevel_<suite>.png (validation accuracy against work); the first suite
keeps its names multilevel{,_curves}.csv, the deterministic one with
``--optimizer`` X other than gd multilevel_deterministic_X...
"""
import argparse
import csv
import math
import os
import statistics

import _common as common

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
# what a curve gives at the first epoch that reaches the target
TARGET_KEYS = ("time", "work", "samples_work")

PEAKS = ['data.name="peaks"', 'data.dtype="float64"', 'model.kind="dense"', "model.width=8",
         "model.T=5.0", 'model.activation="tanh"']
PROBLEMS = {
    # the first suite
    "peaks": PEAKS + ["data.batch_size=200", "model.nlayers=32", "optim.lr=0.01"],
    "digits-short": ['data.name="digits"', "data.batch_size=100", 'data.dtype="float32"',
                     'model.kind="conv"', "model.width=8", "model.nlayers=16", "model.T=2.0",
                     'model.activation="relu"', "optim.lr=0.005"],
    # the adam suite
    "peaks64": PEAKS + ["data.batch_size=200", "model.nlayers=64", "optim.lr=0.01"],
    "peaks256": PEAKS + ["data.batch_size=200", "model.nlayers=256", "optim.lr=0.01"],
    "digits": ['data.name="digits"', "data.batch_size=100", 'data.dtype="float32"',
               'model.kind="conv"', "model.width=8", "model.nlayers=16", "model.T=2.0",
               'model.activation="relu"', "optim.lr=0.005"],
}
EPOCHS = {"peaks": 6, "digits-short": 4, "peaks64": 10, "peaks256": 10, "digits": 8}
SUITES = {"stochastic": (["peaks", "digits-short"], ("single", "nested", "mgopt")),
          "adam": (["peaks64", "peaks256", "digits"],
                   ("single", "nested", "mgopt", "rmtr", "nested-rmtr", "fmg")),
          "deterministic": (["det"], ("single", "nested", "mgopt", "mgopt-noreuse", "rmtr",
                                      "nested-rmtr", "fmg"))}

# the globalised method's cycle, per suite (full multigrid takes the same)
RMTR_SETS = {
    "adam": ['multilevel.method="rmtr"', "multilevel.levels=2", "multilevel.factor=4",
             "multilevel.pre_steps=0", "multilevel.post_steps=1", "multilevel.coarse_steps=8",
             "multilevel.cycle_batches=1"],
    "deterministic": ['multilevel.method="rmtr"', "multilevel.levels=3", "multilevel.factor=2",
                      "multilevel.pre_steps=0", "multilevel.post_steps=0",
                      "multilevel.coarse_steps=8"],
}
FMG_SETS = {
    "adam": ['multilevel.method="rmtr"', 'multilevel.start="full-multigrid"', "multilevel.levels=3",
             "multilevel.factor=2", "multilevel.pre_steps=0", "multilevel.post_steps=1",
             "multilevel.coarse_steps=4", "multilevel.cycle_batches=1"],
    "deterministic": ['multilevel.method="rmtr"', 'multilevel.start="full-multigrid"',
                      "multilevel.levels=3", "multilevel.factor=2", "multilevel.pre_steps=0",
                      "multilevel.post_steps=0", "multilevel.coarse_steps=8"],
}

# the deterministic suite: one problem, full batch, every method with the
# same smoother
FULL_BATCH = PEAKS + ["data.batch_size=5000", "model.nlayers=64", 'optim.schedule="constant"']
SMOOTHERS = {"gd": ['optim.name="sgd"', "optim.momentum=0.0", "optim.lr=0.3"],
             "momentum": ['optim.name="sgd"', "optim.momentum=0.9", "optim.lr=0.03"],
             "adam": ['optim.name="adam"', "optim.lr=0.01"],
             "lbfgs": ['optim.name="lbfgs"', "optim.lr=1.0"],
             "lsr1": ['optim.name="lsr1"', "optim.lr=1.0"]}
DET_STEPS, DET_CYCLES = 120, 24
DET_MGOPT = ['multilevel.method="mgopt"', "multilevel.levels=3", "multilevel.factor=2",
             "multilevel.pre_steps=0", "multilevel.post_steps=1", "multilevel.coarse_steps=8"]
RUN_FIELDS = ["problem", "seed", "method", "ranks", "epochs", "target_acc", "final_val_acc",
              "best_val_acc", "time_to_target", "work_to_target", "work_ratio",
              "samples_work_ratio", "total_time", "total_work", "total_samples_work",
              "accepted"]
CURVE_FIELDS = ["problem", "seed", "method", "epoch", "nlayers", "val_acc", "time", "work",
                "samples_work", "accepted", "radius", "cycle_batches"]


def _nested_budgets(e, levels):
    # the coarser depths get half the epochs of the next finer one
    return [max(1, e // 2 ** (levels - 1 - i)) for i in range(levels)]


def _config(a, problem, seed, method, run_dir):
    from layerpar.config import resolve
    run_sets = [f'mgrit.mode="{a.mode}"', f"model.seed={seed}", f"data.seed={seed}",
              "run.plot=false", f'run.dir="{run_dir}"', "run.checkpoint_every=-1"]
    if a.suite == "deterministic":
        return resolve(None, _deterministic(a, method) + run_sets + list(a.set))
    e = a.epochs or EPOCHS[problem]
    sets = PROBLEMS[problem] + run_sets + ['optim.name="adam"', f"optim.epochs={e}",
                                         'optim.schedule="cosine"']
    if method == "nested":
        sets += ['multilevel.method="nested"', "multilevel.levels=3", "multilevel.factor=2",
                 f"multilevel.epochs_per_level={_nested_budgets(e, 3)}"]
    elif method == "mgopt":
        sets += ['multilevel.method="mgopt"', "multilevel.levels=2", "multilevel.factor=2",
                 "multilevel.pre_steps=1", "multilevel.post_steps=1",
                 "multilevel.coarse_steps=2"]
    elif method == "rmtr":
        # a cycle costs about 4 fine evaluations: 2/5 of the epochs give
        # about the single-level run's work (cosine schedule over them)
        sets += RMTR_SETS[a.suite] + [f"optim.epochs={max(1, round(0.4 * e))}"]
        sets += list(a.rmtr_set)
    elif method == "fmg":
        # nested iteration's coarsest budget, then cycles: 1/5 and 2/5 of the epochs
        fmg = [max(1, e // 4), max(1, round(0.2 * e)), max(1, round(0.4 * e))]
        sets += FMG_SETS[a.suite] + [f"multilevel.epochs_per_level={fmg}"]
        sets += list(a.rmtr_set)
    elif method == "nested-rmtr":
        # nested iteration's budgets, then cycles for 2/5 of the epochs
        fmg = [max(1, e // 4), max(1, e // 2), max(1, round(0.4 * e))]
        sets += FMG_SETS[a.suite] + ['multilevel.start="nested"',
                                     f"multilevel.epochs_per_level={fmg}"]
        sets += list(a.rmtr_set)
    return resolve(None, sets + list(a.set))


def _deterministic(a, method):
    e = a.epochs or DET_STEPS
    sets = FULL_BATCH + SMOOTHERS[a.optimizer]
    if method == "single":
        return sets + [f"optim.epochs={e}"]
    if method == "nested":
        return sets + [f"optim.epochs={e}", 'multilevel.method="nested"', "multilevel.levels=3",
                       f"multilevel.epochs_per_level={[e // 4, e // 2, e]}"]
    if method == "rmtr":
        return sets + RMTR_SETS["deterministic"] + [f"optim.epochs={a.cycles or DET_CYCLES}"] \
            + list(a.rmtr_set)
    if method in ("fmg", "nested-rmtr"):
        start = "nested" if method == "nested-rmtr" else "full-multigrid"
        return sets + FMG_SETS["deterministic"] + [f'multilevel.start="{start}"',
            f"multilevel.epochs_per_level={[e // 4, e // 2, a.cycles or DET_CYCLES]}"] \
            + list(a.rmtr_set)
    return sets + DET_MGOPT + [f"optim.epochs={a.cycles or DET_CYCLES}",
                               f"multilevel.reuse={str(method == 'mgopt').lower()}"]


def _train(a, comm, problem, seed, method):
    rows, train_size, batches = common.train(
        comm, lambda tmp: _config(a, problem, seed, method, tmp), prefix="lp-bench-ml-",
        read=lambda tr: (tr.metrics.rows(), len(tr.data.train), len(tr.train_loader)))
    if comm.rank != 0:
        return None
    curve, t = [], 0.0
    for r in rows:
        t += r["wall_time"]
        work = r["fwd_work"] + r["bwd_work"]
        # one loader batch per evaluation: the work times the mean batch size
        samples = r.get("samples_work", work * train_size / batches)
        curve.append({"problem": problem, "seed": seed, "method": method, "epoch": r["epoch"],
                      "nlayers": r.get("nlayers", 0), "val_acc": r["val_acc"], "time": t,
                      "work": work, "samples_work": samples, "accepted": r.get("accepted", ""),
                      "radius": r.get("radius", ""), "cycle_batches": r.get("cycle_batches", "")})
    return curve


def _median(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def _plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    problems = sorted({c["problem"] for c in curves})
    fig, axes = plt.subplots(1, len(problems), figsize=(5.5 * len(problems), 4), squeeze=False)
    colors = {"single": "C0", "nested": "C1", "mgopt": "C2", "mgopt-noreuse": "C3",
              "rmtr": "C4", "fmg": "C5", "nested-rmtr": "C6"}
    for ax, pr in zip(axes[0], problems):
        first = min(c["seed"] for c in curves if c["problem"] == pr)
        for (method, seed) in sorted({(c["method"], c["seed"]) for c in curves
                                      if c["problem"] == pr}):
            cs = [c for c in curves if c["problem"] == pr and c["method"] == method
                  and c["seed"] == seed]
            ax.plot([c["work"] for c in cs], [100 * c["val_acc"] for c in cs], "o-", ms=2,
                    color=colors[method], alpha=0.6, label=method if seed == first else None)
        ax.set_xscale("log")
        ax.set_xlabel("work [layer-step evaluations, forward + adjoint]")
        ax.set_ylabel(f"{pr}: validation accuracy [%]")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write(a, stem, runs, curves):
    os.makedirs(a.out, exist_ok=True)
    for name, fields, rows in ((f"{stem}.csv", RUN_FIELDS, runs),
                               (f"{stem}_curves.csv", CURVE_FIELDS, curves)):
        with open(os.path.join(a.out, name), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    _plot(curves, os.path.join(a.out, f"{stem}.png"))


def _summary(say, problems, methods, runs):
    say(f"{'problem':9s} {'method':13s} {'final acc':>9s} {'reached':>7s} {'work to':>9s} "
        f"{'ratio med':>9s} {'worst':>6s} {'samples ratio':>13s} {'per seed':s}")
    for pr in problems:
        for method in methods:
            rs = [r for r in runs if r["problem"] == pr and r["method"] == method]
            if not rs:
                continue
            ratios = [r["work_ratio"] for r in rs]
            reached = sum(not math.isnan(r["work_to_target"]) for r in rs)
            worst = min((0.0 if math.isnan(x) else x) for x in ratios)
            say(f"{pr:9s} {method:13s} {100 * _median([r['final_val_acc'] for r in rs]):8.1f}% "
                f"{reached:>4d}/{len(rs)} {_median([r['work_to_target'] for r in rs]):9.4g} "
                f"{_median(ratios):9.2f} {worst:6.2f} "
                f"{_median([r['samples_work_ratio'] for r in rs]):13.2f} "
                + " ".join(f"{x:.2f}" for x in ratios))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="adam", choices=sorted(SUITES))
    p.add_argument("--problems", nargs="+", default=None, choices=sorted(PROBLEMS) + ["det"])
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--optimizer", default="gd", choices=sorted(SMOOTHERS),
                   help="deterministic suite: the smoother of every method")
    p.add_argument("--cycles", type=int, default=0,
                   help=f"deterministic suite: MG/OPT and RMTR cycles (0: {DET_CYCLES})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=0, help="epochs (0: the problem's default)")
    p.add_argument("--mode", default="serial", choices=["serial", "layer-parallel", "one-shot"])
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a setting for every run")
    p.add_argument("--rmtr-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a setting for the rmtr and fmg runs")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--stem", default="", help="the result files' name (default: the suite's)")
    a = p.parse_args(argv)
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    say = print if comm.rank == 0 else (lambda *x, **k: None)
    problems, methods = SUITES[a.suite]
    problems = a.problems or problems
    methods = tuple(a.methods) if a.methods else methods
    if "single" not in methods:
        raise SystemExit("--methods: the single-level run gives the target; include single")
    stem = a.stem or {"stochastic": "multilevel", "adam": "multilevel_adam",
                      "deterministic": "multilevel_deterministic"
                      + ("" if a.optimizer == "gd" else f"_{a.optimizer}")}[a.suite]

    curves, runs = [], []
    for pr in problems:
        for seed in a.seeds:
            by_method = {}
            for method in ("single",) + tuple(m for m in methods if m != "single"):
                by_method[method] = _train(a, comm, pr, seed, method)
                if comm.rank == 0:
                    c = by_method[method]
                    say(f"{pr} seed {seed} {method:13s}: val {100 * c[-1]['val_acc']:.1f}% in "
                        f"{c[-1]['time']:.1f}s, work {c[-1]['work']:.4g}", flush=True)
            if comm.rank != 0:
                continue
            target = by_method["single"][-1]["val_acc"]
            _, w_single, s_single = common.to_target(by_method["single"], target, *TARGET_KEYS)
            for method, c in by_method.items():
                t, w, s = common.to_target(c, target, *TARGET_KEYS)
                runs.append({"problem": pr, "seed": seed, "method": method,
                             "ranks": comm.size, "epochs": len(c), "target_acc": target,
                             "final_val_acc": c[-1]["val_acc"],
                             "best_val_acc": max(x["val_acc"] for x in c),
                             "time_to_target": t, "work_to_target": w,
                             "work_ratio": w_single / w, "samples_work_ratio": s_single / s,
                             "total_time": c[-1]["time"], "total_work": c[-1]["work"],
                             "total_samples_work": c[-1]["samples_work"],
                             "accepted": c[-1]["accepted"]})
                curves += c
            _write(a, stem, runs, curves)  # after every seed: partial results survive
    if comm.rank != 0:
        return 0
    what = f"suite {a.suite}" + (f", smoother {a.optimizer}" if a.suite == "deterministic" else "")
    say(f"\nover seeds {a.seeds} on {comm.size} rank(s), mode {a.mode}, {what}; target = the "
        "single-level run's final validation accuracy; ratio = single-level work / method work "
        "to the target (nan or 0: not reached); samples ratio: the same for the samples_work")
    _summary(say, problems, methods, runs)
    say(f"results in {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
