"""Transformer blocks on the built-in recall task: exact propagation vs
layer-parallel (MGRIT, default settings, with and without the accuracy
controller) vs nested iteration, by final accuracy and by work and wall
time to the exact run's accuracy.

    python benchmarks/bench_transformer.py                      # N = 32 and 128, seeds 0 1 2
    mpiexec -n 2 python benchmarks/bench_transformer.py         # the same on 2 ranks
    nice -n 10 python benchmarks/bench_transformer.py --quick   # a check that every method runs

The runs are independent: on a shared machine they may go one process per
seed and method (``--seeds 0 --methods nested --name s0-nested``, ...),
joined afterwards by ``--merge s0-exact s0-nested ... --name transformer``,
which takes each depth and seed's target from its exact run.

The problem: ``layerpar/configs/recall.toml``'s task (associative recall,
sequences of 13 tokens with per-sample padding carried as the batch's
context), transformer blocks of width ``--width`` (4 heads, MLP ratio 2),
T = 4, Adam with a cosine schedule, ``--epochs`` epochs.  Methods:

* ``exact``          one level (``mgrit.mode = "serial"``)
* ``layer-parallel`` MGRIT with the configuration's defaults (2 levels,
                     cfactor 4, F-relaxation, 2 forward / 1 adjoint
                     iterations, the residual monitor and the accuracy
                     controller on)
* ``lp-nocontroller`` the same without the controller
                     (``mgrit.controller = false``)
* ``nested``         nested iteration over depths N/4, N/2, N (exact
                     propagation; the coarser depths get fewer epochs)

For each depth and seed the target is the exact run's final validation
accuracy; for each method the work (forward + adjoint layer steps, all
levels, summed over ranks) and the wall time until the first epoch that
reaches it are recorded (empty when never reached).  Wall times on a loaded
machine are indicative only; work and accuracy are not affected by load.

Writes benchmarks/results/transformer.csv (one row per run; ``--quick``:
transformer_quick.csv), the runs' per-epoch curves (transformer_curves.csv),
the summary per depth and method over the seeds (transformer_summary.csv:
final accuracy, its difference to exact, the seeds that reached exact's
accuracy, work and time ratios exact / method to it, total work, the
fraction of exact steps; also printed by ``--merge``) and the PNG beside
them (accuracy against work).
"""
import argparse
import csv
import math
import os

import _common as common

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
METHODS = ("exact", "layer-parallel", "lp-nocontroller", "nested")
FIELDS = ["depth", "seed", "method", "ranks", "epochs", "steps", "width", "batch", "lr", "dtype",
          "target_acc", "final_val_acc", "work_to_target", "time_to_target", "total_work",
          "total_time", "exact_steps"]


def _config(a, depth, seed, method, run_dir):
    from layerpar.config import resolve
    sets = ['data.name="recall"', f"data.batch_size={a.batch}", f"data.seed={seed}",
            f'data.dtype="{a.dtype}"', f"data.num_samples={a.samples}",
            'model.kind="transformer"', f"model.width={a.width}", "model.heads=4",
            "model.mlp_ratio=2.0", f"model.nlayers={depth}", "model.T=4.0", 'model.pool="first"',
            f"model.seed={seed}", 'optim.name="adam"', f"optim.lr={a.lr}",
            f"optim.epochs={a.epochs}", 'optim.schedule="cosine"', "run.plot=false",
            f'run.dir="{run_dir}"', "run.checkpoint_every=-1"]
    if method in ("exact", "nested"):
        sets.append('mgrit.mode="serial"')
    else:
        sets.append('mgrit.mode="layer-parallel"')
        if method == "lp-nocontroller":
            sets.append("mgrit.controller=false")
    if method == "nested":
        budgets = [max(1, a.epochs // 4), max(1, a.epochs // 2), a.epochs]
        sets += ['multilevel.method="nested"', "multilevel.levels=3",
                 f"multilevel.epochs_per_level={budgets}"]
    return resolve(None, sets)


def _train(a, comm, depth, seed, method):
    rows = common.train(comm, lambda tmp: _config(a, depth, seed, method, tmp),
                        prefix="lp-bench-tf-",
                        read=lambda tr: comm.bcast(tr.metrics.rows(), root=0))  # written on rank 0
    curve, t, exact, steps = [], 0.0, 0.0, 0
    for r in rows:
        t += r["wall_time"]
        n, steps = r["step"] - steps, r["step"]
        exact += r.get("exact_steps", 1.0 if method in ("exact", "nested") else math.nan) * n
        curve.append({"val_acc": r["val_acc"], "time": t, "work": r["fwd_work"] + r["bwd_work"],
                      "steps": steps, "exact_steps": exact / max(steps, 1)})
    return curve


def _plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    depths = sorted({d for d, _, _ in curves})
    fig, axes = plt.subplots(1, len(depths), figsize=(5.5 * len(depths), 3.8), squeeze=False)
    colors = dict(zip(METHODS, ("C0", "C1", "C2", "C3")))
    for ax, depth in zip(axes[0], depths):
        labelled = set()
        for (d, seed, method), cs in sorted(curves.items()):
            if d != depth:
                continue
            ax.plot([c["work"] for c in cs], [100 * c["val_acc"] for c in cs], "o-", ms=3,
                    color=colors[method], alpha=0.7,
                    label=None if method in labelled else method)
            labelled.add(method)
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
    p.add_argument("--samples", type=int, default=0,
                   help="data.num_samples: sequences generated (0: the set's default, 6000)")
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    p.add_argument("--quick", action="store_true",
                   help="N = 8 and 16, width 16, batch 500, 3 epochs, lr 0.01: a check "
                        "that every method runs")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--name", default="",
                   help="the files' name in --out (default transformer, transformer_quick)")
    p.add_argument("--merge", nargs="+", default=[], metavar="NAME",
                   help="run nothing: join the CSVs of these names in --out (runs split over "
                        "processes, e.g. one seed or method each) into --name's CSVs and PNG, "
                        "the targets taken from the exact runs")
    a = p.parse_args(argv)
    if a.quick:
        a.depths, a.width, a.batch, a.epochs, a.lr = [8, 16], 16, 500, 3, 0.01
    name = a.name or ("transformer_quick" if a.quick else "transformer")
    if a.merge:
        _merge(a, name)
        return
    comm = MPI.COMM_WORLD
    curves, rows = {}, []
    for seed in a.seeds:  # each seed's depths and methods, the CSV rewritten after each run
        for depth in a.depths:
            for method in [m for m in METHODS if m in a.methods]:  # exact first: the target
                cs = curves[(depth, seed, method)] = _train(a, comm, depth, seed, method)
                rows.append({"depth": depth, "seed": seed, "method": method,
                             "ranks": comm.size, "epochs": a.epochs,
                             "steps": cs[-1]["steps"], "width": a.width, "batch": a.batch,
                             "lr": a.lr, "dtype": a.dtype, "exact_steps": cs[-1]["exact_steps"],
                             "final_val_acc": cs[-1]["val_acc"],
                             "total_work": cs[-1]["work"], "total_time": cs[-1]["time"]})
                _targets(rows, curves)
                if comm.rank == 0:
                    r = rows[-1]
                    print(f"N={depth} seed={seed} {method:15s} acc {100 * r['final_val_acc']:.1f}% "
                          f"(target {100 * r['target_acc']:.1f}%) work to target "
                          f"{r['work_to_target']} time {r['time_to_target']:.1f}s", flush=True)
                    _write(a, name, rows, curves)


def _targets(rows, curves):
    """Each row's target (its depth and seed's exact run's final validation
    accuracy; NaN before that run is in) and the work and time to reach it."""
    for r in rows:
        exact = curves.get((int(r["depth"]), int(r["seed"]), "exact"))
        target = exact[-1]["val_acc"] if exact else math.nan
        work, time = common.to_target(curves[(int(r["depth"]), int(r["seed"]), r["method"])],
                                      target, "work", "time")
        r.update(target_acc=target, work_to_target=work, time_to_target=time)


CURVE_FIELDS = ["depth", "seed", "method", "epoch", "steps", "work", "time", "val_acc",
                "exact_steps"]


def _write(a, name, rows, curves):
    """The runs' CSV, their per-epoch curves (``<name>_curves.csv``) and the PNG."""
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, name + ".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(a.out, name + "_curves.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CURVE_FIELDS)
        w.writeheader()
        for (depth, seed, method), cs in curves.items():
            for e, c in enumerate(cs, 1):
                w.writerow({"depth": depth, "seed": seed, "method": method, "epoch": e, **c})
    _plot(curves, os.path.join(a.out, name + ".png"))
    summary = _summary([{k: str(v) for k, v in r.items()} for r in rows])
    with open(os.path.join(a.out, name + "_summary.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS)
        w.writeheader()
        w.writerows(summary)
    return summary


SUMMARY_FIELDS = ["depth", "method", "seeds", "final_acc_median", "final_acc_min",
                  "final_acc_max", "delta_vs_exact_median", "reached", "work_ratio_median",
                  "work_ratio_worst", "time_ratio_median", "total_work_vs_exact",
                  "exact_steps_median"]


def _median(values):
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return math.nan
    m = len(values) // 2
    return values[m] if len(values) % 2 else 0.5 * (values[m - 1] + values[m])


def _summary(rows):
    """Per depth and method over the seeds: final accuracy (median, min,
    max), its difference to the same seed's exact run (median), the seeds
    that reached the exact run's accuracy, the work and time ratios to it
    (exact / method over the seeds that reached it: > 1 is less work; the
    worst counts a seed that never reached it as 0), the total work against
    exact's and the fraction of steps propagated exactly."""
    f = lambda r, k: float(r[k]) if r[k] not in ("", None) else math.nan
    exact = {(int(r["depth"]), int(r["seed"])): r for r in rows if r["method"] == "exact"}
    out = []
    for depth in sorted({int(r["depth"]) for r in rows}):
        for method in METHODS:
            mine = [r for r in rows if int(r["depth"]) == depth and r["method"] == method
                    and (depth, int(r["seed"])) in exact]
            if not mine:
                continue
            ref = [exact[(depth, int(r["seed"]))] for r in mine]
            ratios = [f(e, "work_to_target") / f(r, "work_to_target") for r, e in zip(mine, ref)]
            times = [f(e, "time_to_target") / f(r, "time_to_target") for r, e in zip(mine, ref)]
            accs = [f(r, "final_val_acc") for r in mine]
            out.append({
                "depth": depth, "method": method, "seeds": len(mine),
                "final_acc_median": _median(accs), "final_acc_min": min(accs),
                "final_acc_max": max(accs),
                "delta_vs_exact_median": _median([f(r, "final_val_acc") - f(e, "final_val_acc")
                                                  for r, e in zip(mine, ref)]),
                "reached": sum(not math.isnan(x) for x in ratios),
                "work_ratio_median": _median(ratios),
                "work_ratio_worst": min(0.0 if math.isnan(x) else x for x in ratios),
                "time_ratio_median": _median(times),
                "total_work_vs_exact": _median([f(r, "total_work") / f(e, "total_work")
                                                for r, e in zip(mine, ref)]),
                "exact_steps_median": _median([f(r, "exact_steps") for r in mine])})
    return out


def _print_summary(summary):
    print("depth method           seeds final acc (min-max)   vs exact reached work ratio "
          "(worst) time ratio total work exact steps")
    for s in summary:
        print(f"{s['depth']:5d} {s['method']:16s} {s['seeds']:5d} "
              f"{100 * s['final_acc_median']:5.1f}% ({100 * s['final_acc_min']:.1f}-"
              f"{100 * s['final_acc_max']:.1f}) {100 * s['delta_vs_exact_median']:+6.1f} pts "
              f"{s['reached']}/{s['seeds']}     {s['work_ratio_median']:5.2f} "
              f"({s['work_ratio_worst']:.2f})    {s['time_ratio_median']:5.2f} "
              f"{s['total_work_vs_exact']:9.2f}x {s['exact_steps_median']:.2f}")


def _merge(a, name):
    rows, curves = [], {}
    for part in a.merge:
        with open(os.path.join(a.out, part + ".csv"), newline="") as fh:
            rows += list(csv.DictReader(fh))
        with open(os.path.join(a.out, part + "_curves.csv"), newline="") as fh:
            for r in csv.DictReader(fh):
                key = (int(r["depth"]), int(r["seed"]), r["method"])
                curves.setdefault(key, []).append(
                    {k: float(r[k]) for k in ("steps", "work", "time", "val_acc", "exact_steps")})
    rows.sort(key=lambda r: (int(r["seed"]), int(r["depth"]), METHODS.index(r["method"])))
    _targets(rows, curves)
    _print_summary(_write(a, name, rows, curves))


if __name__ == "__main__":
    main()
