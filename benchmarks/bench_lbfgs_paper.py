"""Full-batch L-BFGS on the layer-parallel paper's peaks problem: the final
training loss and validation accuracy after 130 iterations, per seed, for
each curvature rule of ``optim.lbfgs_curvature`` ('skip': the default, a
pair of little or negative curvature dropped; 'damped': Powell-damped and
kept), for L-SR1 in a trust region (rule 'lsr1': ``optim.name = "lsr1"``,
every pair kept, no line search) and each Armijo constant ``optim.lbfgs_c1`` (1e-4: the default; 0.5:
the paper's code, whose backtracking factor 0.5 is also its Armijo
constant).

The problem is layerpar/configs/peaks-paper.toml (Guenther et al., SIMODS
2020): built-in peaks with raw inputs, an opening dense layer 2 -> 8 with the
activation, 30 residual layers (h = 1/30, T = 1, smooth ReLU), a classifier
8 -> 5, one scalar bias per opening and residual layer, every parameter
uniform in [0, 1e-3), Tikhonov 1e-7 on every layer including the ends,
history 10, backtracking Armijo, float64.  Each run is ``layerpar train``'s
Trainer with that configuration on every rank of COMM_WORLD:

    python benchmarks/bench_lbfgs_paper.py --mode serial
    mpiexec -n 2 python benchmarks/bench_lbfgs_paper.py --mode one-shot

    [--seeds 0,1,2] [--rules skip,damped,lsr1] [--c1 1e-4] [--iters 130]

Rows are merged into benchmarks/results/lbfgs_paper.csv (a row of the same
mode, ranks, rule, c1 and seed is replaced): mode, ranks, rule, c1 (empty for
lsr1), seed, iters,
train_loss (mean cross-entropy over the training set at the final weights,
exact network), objective (train_loss + the Tikhonov term), val_acc,
evaluations (fine forward+backward work: the metrics' fwd_work + bwd_work,
where the mode reports it), wall seconds (under load, for orientation
only).  One run of 130 iterations takes 1-3 minutes of one idle core.
"""
import argparse
import csv
import os
import time

import torch
from mpi4py import MPI

from layerpar.config import resolve
from layerpar.training import Trainer

import _common as common

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CONFIG = os.path.join(HERE, os.pardir, "layerpar", "configs", "peaks-paper.toml")
FIELDS = ["mode", "ranks", "rule", "c1", "seed", "iters", "train_loss", "objective", "val_acc",
          "work", "seconds"]


def tikhonov_term(trainer, beta):
    """beta/2 * ||theta||^2 over every rank's parameters (collective)."""
    net = trainer.level.net
    local = sum(float((p.detach().double() ** 2).sum()) for p in net.parameters())
    return 0.5 * beta * trainer.comm.allreduce(local)


def run(comm, mode, rule, c1, seed, iters):
    with common.run_dir(comm, "lp-lbfgs-paper-") as run_dir:
        opt = ['optim.name="lsr1"'] if rule == "lsr1" else \
            [f'optim.lbfgs_curvature="{rule}"', f"optim.lbfgs_c1={c1!r}"]
        cfg = resolve(CONFIG, [f'mgrit.mode="{mode}"', *opt,
                               f"optim.epochs={iters}", f"model.seed={seed}",
                               f'run.dir="{run_dir}"', "run.plot=false",
                               "run.checkpoint_every=-1"])
        trainer = Trainer(cfg, comm)
        try:
            t0 = time.perf_counter()
            trainer.run()
            seconds = time.perf_counter() - t0
            train_loss, _ = trainer.evaluate(trainer.train_loader)
            val_loss, val_acc = trainer.evaluate(trainer.val_loader)
            rows = trainer.metrics.rows() if trainer.metrics is not None else []
            work = sum(r.get("fwd_work", 0) + r.get("bwd_work", 0) for r in rows) \
                if rows and "fwd_work" in rows[-1] else float("nan")
            objective = train_loss + tikhonov_term(trainer, cfg["optim"]["tikhonov"])
        finally:
            trainer.close()
    return dict(mode=mode, ranks=comm.size, rule=rule, c1="" if rule == "lsr1" else f"{c1:g}",
                seed=seed, iters=iters,
                train_loss=f"{train_loss:.6f}", objective=f"{objective:.6f}",
                val_acc=f"{val_acc:.4f}", work=f"{work:.0f}", seconds=f"{seconds:.1f}")


def merge(path, new):
    key = lambda r: (r["mode"], str(r["ranks"]), r["rule"], r["c1"], str(r["seed"]))
    old = []
    if os.path.exists(path):
        with open(path, newline="") as fh:
            old = [dict(r, c1=r.get("c1") or ("" if r["rule"] == "lsr1" else "0.0001"))
                   for r in csv.DictReader(fh)]
    fresh = {key(r) for r in new}
    rows = [r for r in old if key(r) not in fresh] + new
    rows.sort(key=lambda r: (r["mode"], int(r["ranks"]), r["rule"], float(r["c1"] or 0),
                             int(r["seed"])))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="serial", choices=("serial", "one-shot", "layer-parallel"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rules", default="skip,damped",
                   help="L-BFGS curvature rules, and lsr1 (L-SR1 in a trust region, "
                        "optim.name = \"lsr1\"), comma-separated")
    p.add_argument("--c1", default="1e-4", help="Armijo constants, comma-separated")
    p.add_argument("--iters", type=int, default=130)
    p.add_argument("--out", default=os.path.join(RESULTS, "lbfgs_paper.csv"))
    a = p.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    for seed in (int(s) for s in a.seeds.split(",")):
        runs = [(r, float(c)) for r in a.rules.split(",") if r != "lsr1"
                for c in a.c1.split(",")]
        runs += [("lsr1", 0.0)] if "lsr1" in a.rules.split(",") else []
        for rule, c1 in runs:
            row = run(comm, a.mode, rule, c1, seed, a.iters)
            if comm.rank == 0:  # merged at once: a stopped run keeps what it measured
                os.makedirs(os.path.dirname(a.out), exist_ok=True)
                merge(a.out, [row])
                c1_text = "" if rule == "lsr1" else f"c1 {c1:g} "
                print(f"{a.mode:9s} {comm.size} rank(s)  {rule:7s} {c1_text}seed {seed}: "
                      f"train loss "
                      f"{row['train_loss']}  val {100 * float(row['val_acc']):.1f}%  "
                      f"({row['seconds']} s), merged into {a.out}", flush=True)


if __name__ == "__main__":
    main()
