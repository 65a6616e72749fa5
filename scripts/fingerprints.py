"""Fingerprints of the engine: outputs, losses, gradients, residual
histories, virtual clocks and warm states of every mode, hashed bit for bit.

A change that only reshapes the engine must leave every fingerprint as it
was on the same number of ranks.  Record them once on a known-good commit,
then check after the change:

    mpiexec -n P python scripts/fingerprints.py record   # writes tests/data/fingerprints/npP.json
    mpiexec -n P python scripts/fingerprints.py check    # compares; exit 1 on any difference

for P = 1, 2 and 4.  ``--only NAME`` runs the cases whose name contains
NAME.  Each case's values are gathered to rank 0 in global layer order, so a
fingerprint says nothing about which rank held what; each value is stored as
the SHA-256 of its bytes (with dtype and shape) and, to help find where a
difference starts, its float64 sum of absolute values.

Cases: serial (one level); the exact pipeline, GPipe and 1F1B with 1, 3 and 8
micro-batches; layer-parallel with 2 and 3 levels, F and FCF relaxation;
one-shot (warm-started solves over several optimiser steps, warm states);
random and buffered layers (dropout, batch norm) in layer-parallel and
pipelined passes; trainers: single-level, one-shot L-BFGS, nested iteration,
MG/OPT, and process grids 2x1 (2 ranks) and 2x2 (4 ranks).
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

torch.set_num_threads(1)
WORLD = MPI.COMM_WORLD
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = os.path.join(HERE, "..", "tests", "data", "fingerprints")


# ---- values -> fingerprints ---------------------------------------------------

def _digest(value):
    """(sha256 hex, float64 sum of |x|) of a tensor, array, number or list."""
    if isinstance(value, torch.Tensor):
        a = value.detach().cpu().contiguous()
        head = f"{a.dtype}{tuple(a.shape)}".encode()
        raw = a.numpy().tobytes() if a.numel() else b""
        mag = float(a.double().abs().sum()) if a.numel() else 0.0
    else:
        a = np.asarray(value, dtype=np.float64)
        head = f"float64{a.shape}".encode()
        raw = a.tobytes()
        mag = float(np.abs(a).sum()) if a.size else 0.0
    return hashlib.sha256(head + raw).hexdigest()[:24], mag


def _record_of(info):
    """A pass record (last_forward/last_backward) as numbers."""
    out = {"iterations": float(info["iterations"]),
           "residual_norms": [float(r) for r in info["residual_norms"]],
           "virtual_time": float(info["virtual_time"]),
           "input_norm": float(info.get("input_norm", 0.0))}
    return out


class Case:
    """The values of one case on this rank: ``add(name, value)`` for values
    every rank computes alike (or only rank 0 needs), ``add_layers`` for
    per-layer values held by their owners (gathered to rank 0)."""

    def __init__(self):
        self.values = {}
        self.layers = {}

    def add(self, name, value):
        self.values[name] = value

    def add_record(self, name, info):
        for k, v in _record_of(info).items():
            self.values[f"{name}.{k}"] = v

    def add_layers(self, name, per_layer):
        """per_layer: {global layer index: {param name: tensor}}."""
        for n, d in per_layer.items():
            for k, t in d.items():
                self.layers[f"{name}[{n}].{k}"] = t.detach().cpu().clone()

    def digests(self, comm):
        parts = comm.gather(self.layers, root=0)
        if comm.Get_rank() != 0:
            return None
        merged = {}
        for p in parts:
            merged.update(p)
        merged.update(self.values)
        return {k: _digest(v) for k, v in sorted(merged.items())}


# ---- the networks ---------------------------------------------------------------

WIDTH, NLAYERS, BATCH, CLASSES = 4, 16, 12, 3


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    return x, y


class RandomStep(nn.Module):
    """A dense step with dropout (random draws per pass and layer)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)
        self.drop = nn.Dropout(0.25)

    def forward(self, u):
        return self.drop(torch.tanh(self.lin(u)))


class BufferedStep(nn.Module):
    """A dense step with batch norm (running statistics as buffers)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)
        self.bn = nn.BatchNorm1d(WIDTH)

    def forward(self, u):
        return torch.tanh(self.bn(self.lin(u)))


def _network(comm, step="dense", **opts):
    from layerpar import DenseClosing, DenseOpening, DenseStep, Network
    steps = {"dense": lambda n: DenseStep(WIDTH, "tanh"), "random": lambda n: RandomStep(),
             "buffered": lambda n: BufferedStep()}
    net = Network(lambda: DenseOpening(5, WIDTH, "tanh"), steps[step],
                  lambda: DenseClosing(WIDTH, CLASSES), nlayers=NLAYERS, T=2.0, comm=comm,
                  seed=3, **opts)
    return net.double()


def _params(net):
    """{n: {name: tensor}} of the local layers and the ends (-1 opening, -2 closing)."""
    body = net.body
    out = {n: dict(body.layer(n).state_dict(keep_vars=True)) for n in body.layer_indices}
    if net.is_first:
        out[-1] = dict(net.opening.state_dict(keep_vars=True))
    if net.is_last:
        out[-2] = dict(net.closing.state_dict(keep_vars=True))
    return out


def _grads(net):
    return {n: {k: (t.grad if isinstance(t, nn.Parameter) and t.grad is not None
                    else torch.zeros(0)) for k, t in d.items()}
            for n, d in _params(net).items()}


def _warm(case, net):
    for j, (meta, fwd, bwd, held) in enumerate(net.body.warm_states()):
        for side in ("fwd", "bwd"):
            case.add_layers(f"warm{j}.{side}", {i: {"u": u} for i, u in held[side].items()})


def _train_steps(case, net, steps, *, one_f_one_b=False, lr=0.05):
    """``steps`` SGD steps on fixed batches: losses, outputs, gradients and
    pass records of every step."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for k in range(steps):
        x, y = _batch(100 + k)
        opt.zero_grad()
        if one_f_one_b:
            loss, out = net.loss_and_backward(x if net.is_first else None,
                                              y if net.is_last else None,
                                              torch.nn.functional.cross_entropy)
        else:
            out = net(x if net.is_first else None)
            loss = torch.nn.functional.cross_entropy(out, y) if net.is_last \
                else out.sum() * 0.0
            loss.backward()
        if net.is_last:
            case.layers[f"step{k}.loss"] = loss.detach().clone()
            case.layers[f"step{k}.out"] = out.detach().clone()
        case.add_layers(f"step{k}.grad", _grads(net))
        case.add_record(f"step{k}.fwd", net.body.last_forward)
        case.add_record(f"step{k}.bwd", net.body.last_backward)
        opt.step()
    case.add_layers("final", _params(net))


def _net_case(comm, steps=2, step="dense", one_f_one_b=False, train_mode=True, **opts):
    case = Case()
    with _network(comm, step, **opts) as net:
        net.train(train_mode)
        _train_steps(case, net, steps, one_f_one_b=one_f_one_b)
        if opts.get("warm_start"):
            _warm(case, net)
        # an evaluation pass without autograd
        with torch.no_grad():
            x, _ = _batch(7)
            net.eval()
            out = net(x if net.is_first else None)
            if net.is_last:
                case.layers["eval.out"] = out.clone()
        return case


LP = dict(fwd_iters=2, bwd_iters=1)
NET_CASES = {
    "serial": dict(max_levels=1),
    "gpipe-mb1": dict(max_levels=1, microbatches=1, schedule="gpipe"),
    "gpipe-mb3": dict(max_levels=1, microbatches=3, schedule="gpipe"),
    "gpipe-mb8": dict(max_levels=1, microbatches=8, schedule="gpipe"),
    "1f1b-mb1": dict(max_levels=1, microbatches=1, schedule="1f1b", one_f_one_b=True),
    "1f1b-mb3": dict(max_levels=1, microbatches=3, schedule="1f1b", one_f_one_b=True),
    "1f1b-mb8": dict(max_levels=1, microbatches=8, schedule="1f1b", one_f_one_b=True),
    "lp2-F-skip": dict(max_levels=2, cfactor=4, relax="F", skip=True, **LP),
    "lp2-FCF": dict(max_levels=2, cfactor=4, relax="FCF", **LP),
    "lp3-F": dict(max_levels=3, cfactor=2, relax="F", **LP),
    "lp3-FCF": dict(max_levels=3, cfactor=2, relax="FCF", cycle="F", **LP),
    "lp2-tol": dict(max_levels=2, cfactor=2, relax="FCF", fwd_iters=20, bwd_iters=20,
                    fwd_tol=1e-9, bwd_tol=1e-9),
    "one-shot": dict(max_levels=2, cfactor=2, relax="F", fwd_iters=1, bwd_iters=1,
                     warm_start=True, steps=4),
    "one-shot-3level": dict(max_levels=3, cfactor=2, relax="FCF", fwd_iters=1, bwd_iters=1,
                            warm_start=True, steps=3),
    "random-lp2": dict(step="random", max_levels=2, cfactor=2, relax="FCF", **LP),
    "random-gpipe-mb3": dict(step="random", max_levels=1, microbatches=3),
    "random-1f1b-mb3": dict(step="random", max_levels=1, microbatches=3, schedule="1f1b",
                            one_f_one_b=True),
    "buffered-lp2": dict(step="buffered", max_levels=2, cfactor=2, relax="F", **LP),
    "buffered-serial": dict(step="buffered", max_levels=1),
}


# ---- trainers ---------------------------------------------------------------------

def _config(run_dir, **sets):
    from layerpar.config import resolve
    overrides = ["model.nlayers=8", "model.width=4", "optim.epochs=1", "data.batch_size=250",
                 'data.dtype="float64"', "run.plot=false", 'optim.schedule="constant"',
                 f'run.dir="{run_dir}"', "run.checkpoint_every=-1"]
    overrides += [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in sets.items()]
    return resolve(None, overrides)


def _trainer_case(comm, **sets):
    from layerpar.training import make_trainer
    case = Case()
    run_dir = comm.bcast(tempfile.mkdtemp(prefix="lp-fp-") if comm.rank == 0 else None)
    try:
        trainer = make_trainer(_config(run_dir, **sets), comm)
        try:
            summary = trainer.run()
            for k in ("val_loss", "val_acc", "train_loss", "train_acc", "fwd_iters",
                      "bwd_iters", "fwd_residual", "bwd_residual", "virtual_time",
                      "fwd_work", "bwd_work"):
                if k in summary:
                    case.add(f"summary.{k}", float(summary[k]))
            level = trainer.level
            grid = getattr(trainer, "grid", None)
            in_group0 = grid is None or grid.data_rank == 0
            if in_group0:
                p = level.params()
                case.add_layers("final", p["layers"])
                if p["opening"]:
                    case.add_layers("final", {-1: p["opening"]})
                if p["closing"]:
                    case.add_layers("final", {-2: p["closing"]})
        finally:
            trainer.close()
    finally:
        comm.Barrier()
        if comm.rank == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
    return case


TRAINER_CASES = {
    "trainer-lp": dict(),
    "trainer-serial-adam": {"mgrit.mode": "serial"},
    "trainer-one-shot-lbfgs": {"mgrit.mode": "one-shot", "optim.name": "lbfgs",
                               "data.batch_size": 1000, "optim.epochs": 2},
    "trainer-nested": {"multilevel.method": "nested", "multilevel.levels": 2,
                       "mgrit.mode": "layer-parallel"},
    "trainer-nested-linear": {"multilevel.method": "nested", "multilevel.levels": 3,
                              "multilevel.prolong": "linear", "mgrit.mode": "serial",
                              "model.nlayers": 16,
                              "optim.name": "sgd", "optim.lr": 0.05},
    "trainer-mgopt": {"multilevel.method": "mgopt", "multilevel.levels": 2,
                      "mgrit.mode": "serial", "optim.name": "sgd", "optim.lr": 0.05},
    "trainer-mgopt-3": {"multilevel.method": "mgopt", "multilevel.levels": 3,
                        "multilevel.restrict": "full-weighting", "mgrit.mode": "layer-parallel",
                        "model.nlayers": 16,
                        "multilevel.reuse": False},
    "trainer-grid": {"parallel.data": 2},
    "trainer-grid-one-shot": {"parallel.data": 2, "mgrit.mode": "one-shot"},
}


def cases(size):
    out = {}
    for name, opts in NET_CASES.items():
        out[name] = (_net_case, dict(opts))
    for name, sets in TRAINER_CASES.items():
        if "parallel.data" in sets and size % 2:
            continue  # a grid of 2 data-parallel groups needs an even number of ranks
        out[name] = (_trainer_case, dict(sets))
    return out


# ---- record / check ---------------------------------------------------------------

def run_all(only):
    size = WORLD.Get_size()
    results = {}
    for name, (fn, kw) in cases(size).items():
        if only and not any(o in name for o in only):
            continue
        comm = WORLD.Dup()
        try:
            results[name] = fn(comm, **kw).digests(comm)
        finally:
            comm.Free()
        if WORLD.rank == 0:
            print(f"  {name}: {len(results[name])} values", flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("record", "check"))
    ap.add_argument("--dir", default=DEFAULT_DIR)
    ap.add_argument("--only", action="append", default=[])
    args = ap.parse_args(argv)
    size = WORLD.Get_size()
    path = os.path.join(args.dir, f"np{size}.json")
    results = run_all(args.only)
    if WORLD.rank != 0:
        return 0
    if args.action == "record":
        if args.only and os.path.exists(path):
            with open(path) as fh:
                old = json.load(fh)
            old.update(results)
            results = old
        os.makedirs(args.dir, exist_ok=True)
        with open(path, "w") as fh:
            json.dump(results, fh, indent=0, sort_keys=True)
            fh.write("\n")
        print(f"recorded {len(results)} cases in {path}")
        return 0
    with open(path) as fh:
        ref = json.load(fh)
    bad = 0
    for name, got in results.items():
        want = ref.get(name)
        if want is None:
            print(f"{name}: not recorded")
            bad += 1
            continue
        diffs = [k for k in sorted(set(want) | set(got)) if want.get(k, [None])[0] !=
                 (got.get(k) or [None])[0]]
        if diffs:
            bad += 1
            print(f"{name}: {len(diffs)} of {len(want)} values differ, e.g.")
            for k in diffs[:6]:
                w, g = want.get(k), got.get(k)
                print(f"    {k}: recorded |x|={w[1] if w else None!r}, now "
                      f"|x|={g[1] if g else None!r}")
        else:
            print(f"{name}: {len(got)} values identical")
    ranks = "1 rank" if size == 1 else f"{size} ranks"
    print(f"{len(results) - bad} of {len(results)} cases bit-identical on {ranks}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
