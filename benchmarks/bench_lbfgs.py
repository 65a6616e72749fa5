"""Time to accuracy of full-batch L-BFGS on peaks, in the setting of the
layer-parallel ResNet paper (layerpar/configs/peaks-paper.toml: 30 residual
layers, width 8, T = 1, smooth ReLU, one scalar bias per layer, parameters
uniform in [0, 1e-3), Tikhonov 1e-7 on all parameters, float64).

1. Optimisers side by side on the same objective and the same starting
   weights, on one process (the network's serial equivalent, an
   nn.Sequential): layerpar's LBFGS with the Armijo and with the strong Wolfe
   line search, and torch.optim.LBFGS(line_search_fn='strong_wolfe'), all
   with history 10 and trial step 1.  An evaluation at the point evaluated
   last (every step call starts with one) is served from a cache and not
   counted, for every optimiser alike.  Validation accuracy after k
   iterations and after E evaluations, and iterations, evaluations and
   seconds (optimiser only, validation excluded) to target accuracies.
2. With --modes: the layerpar trainer (``layerpar train`` with the same
   configuration) in serial, layer-parallel and one-shot mode, one rank: its
   validation accuracy and wall time per epoch (one L-BFGS iteration).

    python benchmarks/bench_lbfgs.py [--iters 130] [--seeds 0,1,2]
        [--init-scale 1e-3] [--modes serial,layer-parallel,one-shot]
Writes benchmarks/results/lbfgs.csv (and lbfgs_modes.csv) and lbfgs.png
(--tag X: lbfgsX.csv, ...).  The default run (one seed, no trainer modes)
takes about 2 minutes of one core.
"""
import argparse
import csv
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from layerpar.config import resolve
from layerpar.data import load_dataset
from layerpar.optim import LBFGS
from layerpar.training import Trainer, build_network

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "layerpar",
                      "configs", "peaks-paper.toml")
VARIANTS = ("ours-armijo", "ours-strong-wolfe", "torch-strong-wolfe")


def make_optimizer(name, params, history):
    if name == "ours-armijo":
        return LBFGS(params, MPI.COMM_SELF, lr=1.0, history=history, line_search="armijo")
    if name == "ours-strong-wolfe":
        return LBFGS(params, MPI.COMM_SELF, lr=1.0, history=history,
                     line_search="strong-wolfe")
    # max_eval bounds torch's evaluations per step call, the start included:
    # 1 + 25 as in its own line search default; no early stopping
    return torch.optim.LBFGS(params, lr=1.0, history_size=history, max_iter=1, max_eval=26,
                             tolerance_grad=0.0, tolerance_change=0.0,
                             line_search_fn="strong_wolfe")


class Objective:
    """Mean cross-entropy over the training set + tikhonov/2 * ||theta||^2,
    with a one-entry cache: an evaluation at the parameters of the previous
    one returns its loss and gradients without computing (and uncounted)."""

    def __init__(self, model, x, y, tikhonov):
        self.model, self.x, self.y, self.beta = model, x, y, tikhonov
        self.params = list(model.parameters())
        self.evaluations, self.seconds = 0, 0.0
        self._key = self._cached = None

    def closure(self):
        t = time.perf_counter()
        key = torch.cat([p.detach().reshape(-1) for p in self.params])
        if self._key is not None and torch.equal(key, self._key):
            f, grads = self._cached
            for p, g in zip(self.params, grads):
                p.grad = g.clone()
            self.seconds += time.perf_counter() - t
            return f
        for p in self.params:
            p.grad = None
        loss = Fn.cross_entropy(self.model(self.x), self.y)
        loss = loss + 0.5 * self.beta * sum((p * p).sum() for p in self.params)
        loss.backward()
        f = float(loss.detach())
        self._key, self._cached = key, (f, [p.grad.detach().clone() for p in self.params])
        self.evaluations += 1
        self.seconds += time.perf_counter() - t
        return f


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def run_variant(name, config, data, seed, iters):
    """Rows (iteration, evaluations, seconds, loss, val_acc) of one run."""
    config = {s: dict(v) for s, v in config.items()}
    config["model"]["seed"] = seed
    net = build_network(config, data.input_shape, data.num_classes, MPI.COMM_SELF)
    model = net.serial_equivalent()
    obj = Objective(model, data.train.inputs, data.train.labels, config["optim"]["tikhonov"])
    opt = make_optimizer(name, model.parameters(), config["optim"]["lbfgs_history"])
    rows = [dict(iteration=0, evaluations=0, seconds=0.0, loss=float("nan"),
                 val_acc=accuracy(model, data.val.inputs, data.val.labels))]
    spent = 0.0
    for k in range(1, iters + 1):
        t = time.perf_counter()
        opt.step(obj.closure)
        spent += time.perf_counter() - t
        loss = obj.closure()  # cached: the loss at the accepted point
        rows.append(dict(iteration=k, evaluations=obj.evaluations, seconds=spent, loss=loss,
                         val_acc=accuracy(model, data.val.inputs, data.val.labels)))
    return rows


def at_budget(rows, evaluations):
    """Validation accuracy of the last iterate reached within the budget."""
    return [r for r in rows if r["evaluations"] <= evaluations][-1]["val_acc"]


def first_reaching(rows, target):
    for r in rows:
        if r["val_acc"] >= target:
            return r
    return None


def run_modes(config_path, modes, iters, seed):
    """The layerpar trainer, one rank: rows (mode, epoch, val_acc, seconds)."""
    rows = []
    for mode in modes:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = resolve(config_path, [f'mgrit.mode="{mode}"', f"optim.epochs={iters}",
                                        f"model.seed={seed}", f'run.dir="{tmp}"',
                                        "run.plot=false"])
            trainer = Trainer(cfg, MPI.COMM_SELF)
            elapsed = 0.0
            for r in _epochs(trainer):
                elapsed += r["wall_time"]
                rows.append(dict(mode=mode, epoch=r["epoch"], val_acc=r["val_acc"],
                                 seconds=elapsed))
    return rows


def _epochs(trainer):
    """Run the trainer and return its per-epoch metric rows."""
    trainer.run()
    return trainer.metrics.rows()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--iters", type=int, default=130)
    p.add_argument("--seeds", default="0", help="model seeds, comma-separated")
    p.add_argument("--init-scale", type=float, default=None,
                   help="override model.init_scale (0: PyTorch's initialisation)")
    p.add_argument("--targets", default="0.6,0.85,0.89")
    p.add_argument("--budgets", default="50,100,150,200")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--modes", default="", help="trainer modes, e.g. serial,one-shot")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    a = p.parse_args()
    torch.set_num_threads(1)
    overrides = [] if a.init_scale is None else [f"model.init_scale={a.init_scale}"]
    config = resolve(a.config, overrides)
    data = load_dataset("peaks", seed=config["data"]["seed"], dtype=torch.float64)
    seeds = [int(s) for s in a.seeds.split(",")]
    targets = [float(t) for t in a.targets.split(",")]
    budgets = [int(b) for b in a.budgets.split(",")]
    variants = [v for v in a.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"--variants: {v!r} is not one of {VARIANTS}")
    m = config["model"]
    print(f"peaks, {m['nlayers']} layers, width {m['width']}, T = {m['T']}, {m['activation']}, "
          f"bias {m['bias']}, init_scale {m['init_scale']}, tikhonov "
          f"{config['optim']['tikhonov']}, {len(data.train)} training / {len(data.val)} "
          f"validation points, {a.iters} iterations, seeds {seeds}")

    results = {}
    for seed in seeds:
        for v in variants:
            results[v, seed] = run_variant(v, config, data, seed, a.iters)
            last = results[v, seed][-1]
            print(f"  {v:20s} seed {seed}: val {100 * last['val_acc']:.1f}% after "
                  f"{last['iteration']} iterations, {last['evaluations']} evaluations, "
                  f"{last['seconds']:.1f} s", flush=True)

    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"lbfgs{a.tag}.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "seed", "iteration", "evaluations", "seconds", "loss", "val_acc"])
        for (v, seed), rows in results.items():
            for r in rows:
                w.writerow([v, seed, r["iteration"], r["evaluations"], f"{r['seconds']:.4f}",
                            f"{r['loss']:.10g}", f"{r['val_acc']:.4f}"])

    med = statistics.median
    marks = [k for k in (10, 30, 60, 100, 130, a.iters) if k <= a.iters]
    marks = sorted(set(marks))
    print(f"\nValidation accuracy (%) after k iterations, median over {len(seeds)} seed(s); "
          f"evaluations and seconds at k = {a.iters}")
    print(f"{'variant':20s}" + "".join(f"{'k=' + str(k):>8s}" for k in marks)
          + f"{'evals':>8s}{'s':>8s}")
    for v in variants:
        runs = [results[v, s] for s in seeds]
        print(f"{v:20s}" + "".join(f"{100 * med(r[k]['val_acc'] for r in runs):8.1f}"
                                   for k in marks)
              + f"{med(r[-1]['evaluations'] for r in runs):8.0f}"
              + f"{med(r[-1]['seconds'] for r in runs):8.1f}")
    print(f"\nValidation accuracy (%) after E function evaluations (median)")
    print(f"{'variant':20s}" + "".join(f"{'E=' + str(b):>8s}" for b in budgets))
    for v in variants:
        runs = [results[v, s] for s in seeds]
        print(f"{v:20s}" + "".join(f"{100 * med(at_budget(r, b) for r in runs):8.1f}"
                                   for b in budgets))
    print("\nTo a target validation accuracy: iterations/evaluations/seconds, one entry "
          "per seed (- = not reached)")
    print(f"{'variant':20s}" + "".join(f"  {f'{100 * t:.0f}%':>34s}" for t in targets))
    for v in variants:
        cells = []
        for t in targets:
            hits = [first_reaching(results[v, s], t) for s in seeds]
            cells.append(", ".join("-" if h is None else
                                  f"{h['iteration']}/{h['evaluations']}/{h['seconds']:.0f}s"
                                  for h in hits))
        print(f"{v:20s}" + "".join(f"  {c:>34s}" for c in cells))

    mode_rows = []
    if a.modes:
        modes = [s for s in a.modes.split(",") if s]
        mode_rows = run_modes(a.config, modes, a.iters, seeds[0])
        with open(os.path.join(RESULTS, f"lbfgs{a.tag}_modes.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["mode", "epoch", "val_acc", "seconds"])
            for r in mode_rows:
                w.writerow([r["mode"], r["epoch"], f"{r['val_acc']:.4f}", f"{r['seconds']:.3f}"])
        print(f"\nlayerpar train (line_search = {config['optim']['line_search']}), one rank, "
              f"seed {seeds[0]}: validation accuracy (%) after k epochs (= iterations)")
        print(f"{'mode':16s}" + "".join(f"{'k=' + str(k):>8s}" for k in marks) + f"{'s':>8s}"
              + "".join(f"{f'to {100 * t:.0f}%':>12s}" for t in targets))
        for mode in modes:
            rows = [r for r in mode_rows if r["mode"] == mode]
            hits = [next((r for r in rows if r["val_acc"] >= t), None) for t in targets]
            reach = ["-" if h is None else f"{h['epoch']}/{h['seconds']:.0f}s" for h in hits]
            print(f"{mode:16s}" + "".join(f"{100 * rows[k - 1]['val_acc']:8.1f}" for k in marks)
                  + f"{rows[-1]['seconds']:8.1f}" + "".join(f"{c:>12s}" for c in reach))

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v in variants:
        for i, s in enumerate(seeds):
            rows = results[v, s]
            style = dict(color=f"C{variants.index(v)}", alpha=1.0 if i == 0 else 0.4,
                         label=v if i == 0 else None)
            axes[0].plot([r["evaluations"] for r in rows], [r["val_acc"] for r in rows], **style)
            axes[1].plot([r["seconds"] for r in rows], [r["val_acc"] for r in rows], **style)
    for mode in sorted({r["mode"] for r in mode_rows}):
        rows = [r for r in mode_rows if r["mode"] == mode]
        axes[1].plot([r["seconds"] for r in rows], [r["val_acc"] for r in rows], "--",
                     label=f"layerpar train, {mode}")
    axes[0].set_xlabel("function evaluations")
    axes[1].set_xlabel("seconds (one core)")
    for ax in axes:
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"full-batch L-BFGS on peaks ({m['nlayers']} layers, width {m['width']}, "
                 f"bias {m['bias']}, init_scale {m['init_scale']}), seeds {seeds}")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, f"lbfgs{a.tag}.png"), dpi=120)
    print(f"\nwrote {RESULTS}/lbfgs{a.tag}.csv and lbfgs{a.tag}.png")


if __name__ == "__main__":
    main()
