"""Time to accuracy: the final validation accuracy of each setting, and the
work and the wall time it takes to reach the exact single-level run's final
validation accuracy, side by side with that run.

    python benchmarks/bench_accuracy.py                 # every suite, seeds 0-4 (hours)
    python benchmarks/bench_accuracy.py --quick         # the quick rows, 2 seeds: < 10 min
    mpiexec -n 2 python benchmarks/bench_accuracy.py    # every run on the 2 ranks
    python benchmarks/bench_accuracy.py --suite controller --problems peaks --only controller

Every run goes through layerpar's ``Trainer`` in this process, on the ranks
the command was started on (one after another).  A *setting* is a row: a
problem (a configuration file and overrides, and its epochs: ``PROBLEMS``),
an optimiser (``OPTIMIZERS``: mini-batch Adam, SGD with momentum, full-batch
L-BFGS and gradient descent), a mode, a multilevel method (``METHODS``), the
gradient-accuracy controller on or off, and any further ``section.key=value``
overrides: every row is configuration, nothing else.  A row whose
configuration the engine refuses (a method that has not landed yet, such as
the globalised multilevel method or full multigrid) is skipped with a line
saying why, and its summary row says so.  Each setting runs once per seed
(``model.seed`` = ``data.seed`` = the seed).  Its *baseline* is the exact
single-level run (mode serial, no multilevel method) of the same problem and
optimiser with the same seed, run first.

Measured per run: the final validation accuracy; the work (``fwd_work +
bwd_work`` of the metrics: forward and adjoint layer-step evaluations over
the ranks, every level, the controller's exact passes included) and the wall
time (the epochs' ``wall_time``, validation included) until the end of the
first epoch whose validation accuracy reaches the seed's baseline final
accuracy (empty if never); the fraction of steps with exact propagation and
the controller's own work (``check_work``).  Per setting: medians and
spreads (min-max) over the seeds, the seeds that reached the target, the
change of the median final accuracy against the baseline's and the median of
the per-seed differences, the ratios baseline / setting of the median work
and time to the target (> 1: the setting is faster), and the total work
against the baseline's (the overhead).  Work is a measure that the load of
other jobs cannot change; wall times on a shared machine can.

Suites: ``controller`` (exact, layer-parallel and one-shot with and without
the controller; mini-batch Adam on peaks N = 32 and digits-conv N = 16),
``multilevel`` (single level, nested iteration, MG/OPT with its line search,
the globalised method, full multigrid; peaks N = 64 and 256 and
digits-conv; four optimisers) and ``all``.  Adding a row: a ``Setting`` in a
suite, e.g. ``Setting("peaks-64", "MG/OPT, 3 levels", method="MG/OPT",
sets=("multilevel.levels=3",))``; a new method is an entry of ``METHODS``
(its overrides), a new problem of ``PROBLEMS``.  ``--quick`` runs the
settings marked ``quick`` (the controller suite and the peaks N = 64 Adam
rows), seeds 0 1, with short epochs: a check that everything runs, not a
measurement.

Writes benchmarks/results/accuracy_<suite>.csv (one row per setting),
accuracy_<suite>_runs.csv (one per run), accuracy_<suite>_curves.csv (one
per epoch of each run) and accuracy_<suite>.png (validation accuracy
against work), after every run; ``--quick`` writes accuracy_<suite>_quick*.
"""
import argparse
import csv
import math
import os
import statistics
from dataclasses import dataclass, field

import _common as common

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CONFIGS = os.path.join(HERE, os.pardir, "layerpar", "configs")

# problem -> its configuration file (and overrides), epochs, and the
# --quick epochs; "peaks-64" / "peaks-256": the peaks network at N = 64 / 256
PROBLEMS = {
    "peaks": dict(config="peaks.toml", sets=(), epochs=40, quick_epochs=2),
    "peaks-64": dict(config="peaks.toml", sets=("model.nlayers=64",), epochs=40,
                     quick_epochs=2),
    "peaks-256": dict(config="peaks.toml", sets=("model.nlayers=256",), epochs=40,
                      quick_epochs=1),
    "digits-conv": dict(config="digits-conv.toml", sets=(), epochs=15, quick_epochs=2),
}
FULL_BATCH = "data.batch_size=1000000"  # one batch: every training sample
# optimiser -> its overrides and, for full-batch optimisers (one step an
# epoch), its own epochs (steps) and --quick epochs
OPTIMIZERS = {
    "adam": dict(sets=()),  # the configuration file's: mini-batch Adam, cosine schedule
    "momentum": dict(sets=('optim.name="sgd"', "optim.momentum=0.9", "optim.lr=0.03")),
    "lbfgs": dict(sets=('optim.name="lbfgs"', "optim.lr=1.0", 'optim.schedule="constant"',
                        FULL_BATCH), epochs=130, quick_epochs=10),
    "gd": dict(sets=('optim.name="sgd"', "optim.momentum=0.0", "optim.lr=0.3",
                     'optim.schedule="constant"', FULL_BATCH), epochs=200, quick_epochs=20),
}
# multilevel method -> its overrides (a method the engine does not know yet
# is a row that is skipped with a line until it lands)
METHODS = {
    "single level": (),
    "nested": ('multilevel.method="nested"',),
    "MG/OPT": ('multilevel.method="mgopt"',),
    "globalised": ('multilevel.method="rmtr"',),
    "full multigrid": ('multilevel.method="rmtr"', 'multilevel.start="full-multigrid"'),
}


@dataclass(frozen=True)
class Setting:
    """One row: ``label`` names it in the tables; ``quick``: in --quick."""
    problem: str
    label: str
    mode: str = "serial"
    method: str = "single level"
    optimizer: str = "adam"
    controller: bool = False  # the gradient-accuracy controller (parallel modes)
    sets: tuple = field(default=())
    quick: bool = True

    @property
    def group(self):
        """Settings of one group share their baseline."""
        return (self.problem, self.optimizer)

    @property
    def is_baseline(self):
        return self.mode == "serial" and self.method == "single level" and not self.sets

    def epochs(self, quick):
        """This setting's epochs (optimiser steps for a full-batch optimiser)."""
        src = OPTIMIZERS[self.optimizer] if "epochs" in OPTIMIZERS[self.optimizer] \
            else PROBLEMS[self.problem]
        return src["quick_epochs" if quick else "epochs"]

    def overrides(self, seed, epochs, run_dir, quick):
        sets = [*PROBLEMS[self.problem]["sets"], f'mgrit.mode="{self.mode}"',
                f"model.seed={seed}", f"data.seed={seed}", f"optim.epochs={epochs}",
                'run.plot=false', f'run.dir="{run_dir}"', "run.checkpoint_every=-1",
                *OPTIMIZERS[self.optimizer]["sets"], *METHODS[self.method]]
        if self.mode != "serial":
            sets.append(f"mgrit.controller={str(self.controller).lower()}")
            if self.controller and quick:
                sets.append("mgrit.controller_every=10")  # short runs: measure sooner
        return sets + list(self.sets)


def baseline(setting):
    return Setting(setting.problem, f"exact, {setting.optimizer}",
                   optimizer=setting.optimizer, quick=setting.quick)


def _controller_rows(problem, quick=True):
    rows = [Setting(problem, "exact, adam", quick=quick)]
    for mode in ("layer-parallel", "one-shot"):
        rows.append(Setting(problem, mode, mode=mode, quick=quick))
        rows.append(Setting(problem, f"{mode} + controller", mode=mode, controller=True,
                            quick=quick))
        # a tighter bound than the default 0.2 (full runs only)
        rows.append(Setting(problem, f"{mode} + controller, tol 0.05", mode=mode,
                            controller=True, sets=("mgrit.controller_tol=0.05",), quick=False))
    return rows


def _multilevel_rows(problem, optimizers, quick_optimizers=("adam",)):
    rows = []
    for opt in optimizers:
        q = problem == "peaks-64" and opt in quick_optimizers
        rows += [Setting(problem, f"{m}, {opt}" if m != "single level" else f"exact, {opt}",
                         method=m, optimizer=opt, quick=q) for m in METHODS]
    return rows


SUITES = {
    # the gradient-accuracy controller: exact training, layer-parallel and
    # one-shot with and without it, mini-batch Adam on the configurations'
    # networks (peaks N = 32, digits-conv N = 16)
    "controller": _controller_rows("peaks") + _controller_rows("digits-conv"),
    # multilevel methods (serial propagation) against single-level training:
    # peaks N = 64 and 256, digits-conv; mini-batch Adam and SGD with
    # momentum, full-batch L-BFGS and gradient descent
    "multilevel": [r for prob in ("peaks-64", "peaks-256", "digits-conv")
                   for r in _multilevel_rows(prob, OPTIMIZERS)],
}
SUITES["all"] = SUITES["controller"] + SUITES["multilevel"]

RUN_FIELDS = ["problem", "label", "mode", "method", "optimizer", "controller", "seed",
              "ranks", "epochs", "target_acc", "final_val_acc", "best_val_acc", "work_to_target",
              "time_to_target", "total_work", "total_time", "check_work", "exact_fraction",
              "grad_checks", "grad_actions"]
CURVE_FIELDS = ["problem", "label", "seed", "epoch", "val_acc", "work", "time", "exact_steps",
                "grad_error"]
SUMMARY_FIELDS = ["problem", "label", "seeds", "ranks", "final_acc_median", "final_acc_min",
                  "final_acc_max", "delta_acc_median", "delta_acc_paired", "reached",
                  "work_to_target_median", "work_to_target_min", "work_to_target_max",
                  "time_to_target_median", "time_to_target_min", "time_to_target_max",
                  "work_ratio", "time_ratio", "total_work_median",
                  "total_work_vs_exact", "exact_fraction_median", "check_work_share", "status"]


# ---- one run ----------------------------------------------------------------------------

def train(comm, setting, seed, epochs, quick):
    """The run's per-epoch curve (rank 0; None elsewhere)."""
    from layerpar.config import resolve
    path = os.path.join(CONFIGS, PROBLEMS[setting.problem]["config"])
    rows = common.train(comm, lambda tmp: resolve(path, setting.overrides(seed, epochs, tmp,
                                                                          quick)),
                        prefix="lp-bench-acc-", read=lambda trainer: trainer.metrics.rows())
    if comm.rank != 0:
        return None
    curve, t = [], 0.0
    for r in rows:
        t += r["wall_time"]
        curve.append({"problem": setting.problem, "label": setting.label, "seed": seed,
                      "epoch": r["epoch"], "val_acc": r["val_acc"],
                      "work": r["fwd_work"] + r["bwd_work"], "time": t,
                      "exact_steps": r.get("exact_steps", 1.0 if setting.mode == "serial"
                                           else 0.0),
                      "grad_error": r.get("grad_error", math.nan),
                      "check_work": r.get("check_work", 0), "grad_checks": r.get("grad_checks", 0),
                      "grad_actions": r.get("grad_actions", 0)})
    return curve


def run_record(setting, seed, curve, target, ranks):
    work, time = common.to_target(curve, target, "work", "time")
    last = curve[-1]
    return {"problem": setting.problem, "label": setting.label, "mode": setting.mode,
            "method": setting.method, "optimizer": setting.optimizer,
            "controller": int(setting.controller),
            "seed": seed, "ranks": ranks, "epochs": len(curve), "target_acc": target,
            "final_val_acc": last["val_acc"], "best_val_acc": max(c["val_acc"] for c in curve),
            "work_to_target": work, "time_to_target": time, "total_work": last["work"],
            "total_time": last["time"], "check_work": last["check_work"],
            "exact_fraction": statistics.fmean(c["exact_steps"] for c in curve),
            "grad_checks": sum(c["grad_checks"] for c in curve),
            "grad_actions": sum(c["grad_actions"] for c in curve)}


# ---- summaries ----------------------------------------------------------------------------

def _finite(xs):
    return [x for x in xs if not math.isnan(x)]


def _median(xs):
    xs = _finite(xs)
    return statistics.median(xs) if xs else math.nan


def _ratio(a, b):
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan


def summarise(settings, runs, skipped=None):
    """One summary row per setting (its runs against its baseline's); a
    setting in ``skipped`` ({setting: why}) gets a row with its reason."""
    out = []
    for s in settings:
        if s in (skipped or {}):
            out.append({"problem": s.problem, "label": s.label, "seeds": 0,
                        "status": f"skipped: {skipped[s]}"})
            continue
        mine = [r for r in runs if r["problem"] == s.problem and r["label"] == s.label]
        base = {r["seed"]: r for r in runs if r["problem"] == s.problem
                and r["label"] == baseline(s).label and r["optimizer"] == s.optimizer}
        if not mine or not base:
            continue
        final = [r["final_val_acc"] for r in mine]
        bfinal = [base[r["seed"]]["final_val_acc"] for r in mine]
        works = [r["work_to_target"] for r in mine]
        bwork = _median([base[r["seed"]]["work_to_target"] for r in mine])
        btime = _median([base[r["seed"]]["time_to_target"] for r in mine])
        btotal = _median([base[r["seed"]]["total_work"] for r in mine])
        total = _median([r["total_work"] for r in mine])
        out.append({
            "problem": s.problem, "label": s.label, "seeds": len(mine), "ranks": mine[0]["ranks"],
            "final_acc_median": _median(final), "final_acc_min": min(final),
            "final_acc_max": max(final),
            "delta_acc_median": _median(final) - _median(bfinal),
            "delta_acc_paired": _median([a - b for a, b in zip(final, bfinal)]),
            "reached": sum(not math.isnan(w) for w in works),
            "work_to_target_median": _median(works),
            "work_to_target_min": min(_finite(works), default=math.nan),
            "work_to_target_max": max(_finite(works), default=math.nan),
            "time_to_target_median": _median([r["time_to_target"] for r in mine]),
            "time_to_target_min": min(_finite([r["time_to_target"] for r in mine]),
                                      default=math.nan),
            "time_to_target_max": max(_finite([r["time_to_target"] for r in mine]),
                                      default=math.nan),
            "work_ratio": _ratio(bwork, _median(works)),
            "time_ratio": _ratio(btime, _median([r["time_to_target"] for r in mine])),
            "total_work_median": total, "total_work_vs_exact": _ratio(total, btotal),
            "exact_fraction_median": _median([r["exact_fraction"] for r in mine]),
            "check_work_share": _median([r["check_work"] / r["total_work"] for r in mine]),
            "status": "ran",
        })
    return out


def table(rows, *, markdown=False):
    """The summary as text (or a Markdown table)."""
    head = ["problem", "setting", "final val acc (median, min-max)", "vs exact",
            "reached", "work to target", "work ratio", "time ratio", "total work",
            "exact steps", "check work"]
    lines = []
    for r in rows:
        if r["status"] != "ran":
            lines.append([r["problem"], r["label"], r["status"]] + [""] * (len(head) - 3))
            continue
        lines.append([
            r["problem"], r["label"],
            f"{100 * r['final_acc_median']:.2f}% ({100 * r['final_acc_min']:.1f}-"
            f"{100 * r['final_acc_max']:.1f})",
            f"{100 * r['delta_acc_median']:+.2f} ({100 * r['delta_acc_paired']:+.2f})",
            f"{r['reached']}/{r['seeds']}", f"{r['work_to_target_median']:.3g}",
            f"{r['work_ratio']:.2f}", f"{r['time_ratio']:.2f}",
            f"{r['total_work_vs_exact']:.2f}x", f"{100 * r['exact_fraction_median']:.0f}%",
            f"{100 * r['check_work_share']:.1f}%"])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(row) + " |" for row in lines])
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{w}s}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*row) for row in lines])


def plot(curves, settings, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    problems = list(dict.fromkeys(s.problem for s in settings))
    fig, axes = plt.subplots(1, len(problems), figsize=(6.5 * len(problems), 4.5), squeeze=False)
    labels = list(dict.fromkeys(s.label for s in settings))
    for ax, prob in zip(axes[0], problems):
        for i, label in enumerate(labels):
            seeds = sorted({c["seed"] for c in curves if c["problem"] == prob
                            and c["label"] == label})
            for k, seed in enumerate(seeds):
                cs = [c for c in curves if c["problem"] == prob and c["label"] == label
                      and c["seed"] == seed]
                ax.plot([c["work"] for c in cs], [100 * c["val_acc"] for c in cs],
                        color=f"C{i}", alpha=0.6, lw=1, label=label if k == 0 else None)
        ax.set_xscale("log")
        ax.set_xlabel("work [forward + adjoint layer steps]")
        ax.set_ylabel("validation accuracy [%]")
        ax.set_title(prob)
        top = max((100 * c["val_acc"] for c in curves if c["problem"] == prob), default=100)
        ax.set_ylim(max(0, top - 15), min(100, top + 1))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_csv(path, fields, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


# ---- the command ------------------------------------------------------------------------------

def unavailable(setting, quick):
    """Why the engine cannot run ``setting`` (its configuration is refused:
    a method or key that has not landed yet), or None."""
    from layerpar.config import ConfigError, resolve
    path = os.path.join(CONFIGS, PROBLEMS[setting.problem]["config"])
    try:
        resolve(path, setting.overrides(0, setting.epochs(quick), "unused", quick))
    except ConfigError as e:
        return str(e)
    return None


def write_results(out, stem, settings, runs, curves, skipped):
    """The summary, the runs and the curves as CSV and the plot (rank 0;
    after every run, so that a stopped benchmark leaves what it measured)."""
    summary = summarise(settings, runs, skipped)
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, f"{stem}.csv"), SUMMARY_FIELDS, summary)
    write_csv(os.path.join(out, f"{stem}_runs.csv"), RUN_FIELDS, runs)
    write_csv(os.path.join(out, f"{stem}_curves.csv"), CURVE_FIELDS, curves)
    plot(curves, [s for s in settings if s not in skipped], os.path.join(out, f"{stem}.png"))
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="all", choices=sorted(SUITES))
    p.add_argument("--quick", action="store_true",
                   help="the settings marked quick, seeds 0 1, the quick epochs (< 10 min)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 3 4")
    p.add_argument("--problems", nargs="+", default=None, choices=sorted(PROBLEMS))
    p.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                   help="only the settings whose label contains one of these (and baselines)")
    p.add_argument("--epochs", type=int, default=0, help="every setting's epochs (0: its own)")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown too")
    a = p.parse_args(argv)
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    say = print if comm.rank == 0 else (lambda *x, **k: None)
    seeds = a.seeds if a.seeds is not None else ([0, 1] if a.quick else [0, 1, 2, 3, 4])
    settings = [s for s in SUITES[a.suite] if (a.problems is None or s.problem in a.problems)
                and (s.quick or not a.quick)
                and (a.only is None or s.is_baseline or any(o in s.label for o in a.only))]
    settings = list(dict.fromkeys(settings))
    for s in list(settings):  # every group's baseline, first
        if baseline(s) not in settings:
            settings.insert(settings.index(s), baseline(s))
    stem = f"accuracy_{a.suite}" + ("_quick" if a.quick else "")
    skipped = {}
    for s in settings:  # (every rank alike: the same configuration checks)
        why = unavailable(s, a.quick)
        if why is not None:
            skipped[s] = why
            say(f"{s.problem} {s.label}: skipped ({why})", flush=True)

    runs, curves = [], []
    targets = {}  # (group, seed) -> the baseline's final accuracy
    order = sorted((s for s in settings if s not in skipped),
                   key=lambda s: not s.is_baseline)  # baselines first
    for s in order:
        epochs = a.epochs or s.epochs(a.quick)
        for seed in seeds:
            curve = train(comm, s, seed, epochs, a.quick)
            if comm.rank != 0:
                continue
            if s.is_baseline:
                targets[(s.group, seed)] = curve[-1]["val_acc"]
            rec = run_record(s, seed, curve, targets[(s.group, seed)], comm.size)
            runs.append(rec)
            curves += curve
            say(f"{s.problem} {s.label} seed {seed}: val {100 * rec['final_val_acc']:.2f}% "
                f"(target {100 * rec['target_acc']:.2f}%), work {rec['total_work']:.4g}, "
                f"{rec['total_time']:.0f}s, exact steps {100 * rec['exact_fraction']:.0f}%",
                flush=True)
            write_results(a.out, stem, settings, runs, curves, skipped)
    if comm.rank != 0:
        return 0
    summary = write_results(a.out, stem, settings, runs, curves, skipped)
    say(f"\nsuite {a.suite}, seeds {seeds}, {comm.size} rank(s); target: the exact "
        "single-level run's final validation accuracy (same seed); vs exact: median final "
        "accuracy minus the exact run's (median of the per-seed differences); ratios: "
        "exact / setting (> 1: faster); total work: setting / exact\n")
    say(table(summary))
    if a.markdown:
        say("\n" + table(summary, markdown=True))
    say(f"\nresults in {a.out}/{stem}*")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
