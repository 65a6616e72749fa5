"""Multilevel training over networks of depths N, N/r, N/r^2, ...: nested
iteration and MG/OPT, each network layer-parallel on the same ranks.

Nested iteration (``multilevel.method = "nested"``)
    The depth schedule is N_0 = N / r^(L-1), r*N_0, ..., N (L =
    ``multilevel.levels``, r = ``multilevel.factor``).  Each depth trains
    for its epoch budget (``epochs_per_level``), or until the validation
    accuracy reaches ``target_accuracy`` (the last depth always uses its
    whole budget), and is then prolonged to the next depth in layer-time
    (T fixed, so h shrinks by r; ``prolong`` constant or linear).  The
    optimiser state moves with its parameters: a layer's gradient is
    proportional to h, so gradient-like state of the residual layers
    (momentum buffers, Adam's first moments) is prolonged and divided by r,
    Adam's second moments divided by r^2 (and kept >= 0 where linear
    prolongation extrapolates), step counters copied; opening and
    closing layers keep theirs.  L-BFGS starts a fresh history at each
    depth (the curvature pairs of the shallower problem do not describe the
    deeper one).  The deeper network's MGRIT solvers start cold: their
    hierarchy is not warm-started from the shallower network's states.
    The learning-rate schedule runs over the sum of the epoch budgets.

MG/OPT (``multilevel.method = "mgopt"``)
    One V-cycle per training batch.  Level 0 is the network of N layers,
    level l has N / r^l.  On level l (objective f_l(x) - <v_l, x>, v_0 = 0):
    ``pre_steps`` optimiser steps; the coarse problem: x_H0 = R x_h (weights
    restricted by ``restrict``), v_{l+1} = grad f_{l+1}(x_H0) -
    P^T (grad f_l(x_h) - v_l), with P^T the transpose of the prolongation,
    so that the coarse objective's gradient at x_H0 equals P^T times the
    fine one (first-order coherence); on the coarsest level
    ``coarse_steps`` optimiser steps, on the others a recursive cycle;
    then the correction x_h <- x_h + alpha * P (x_H - x_H0), alpha = 1,
    1/2, ... (``line_search_steps`` tries) the first that decreases the
    level's objective, the correction rejected if none does; then
    ``post_steps`` optimiser steps.  Every evaluation of a cycle uses that
    cycle's mini-batch: with one fixed batch the coarse objective and the
    fine objective are the same function of the batch, so the coherence
    above holds exactly and the line search compares like with like.  The
    opening and closing layers belong to every level with identity
    transfers (same rank, same weights).  Each level has its own optimiser
    of the configured kind (SGD, Adam or L-BFGS), kept from cycle to cycle;
    the linear term is added to that level's gradients before each step.
    With ``multilevel.reuse`` every level keeps its last evaluations
    (``Level``, where that is exact) and the line search's first trial also
    evaluates the gradient, which the next evaluation at the accepted point
    (a post-smoothing step, or with one batch per epoch the next cycle's
    fine gradient) takes instead of solving again.

Work: each Level counts its layer-step evaluations (forward and adjoint,
every solve, line-search evaluations included; see ``layerpar.training.
level``).  Metrics rows carry ``fwd_work`` and ``bwd_work`` (cumulative,
all levels, summed over ranks) and per level ``fwd_work_l<l>``,
``bwd_work_l<l>``, with ``level`` (the depth index of nested iteration,
coarsest 0; 0 for MG/OPT's fine level), ``nlayers`` and ``cycle``.

Checkpoints hold every level of the run in one file: level l's layers are
stored under global index offset_l + n (offset_l = the layers of the levels
before it), its opening and closing parameters under ``level<l>.<name>``,
its optimiser state alongside, and the method's counters in ``extra``; so
a run resumes on any number of ranks.

On a process grid of D data-parallel groups (``parallel.data``, as for
``Trainer``) every level's network is layer-parallel on its group's ranks
and the transfers between levels stay in the group; every evaluation takes
the group's share of the batch, gradients are averaged over the data axis
(``Level``), so losses, gradients, linear terms and line-search decisions
are the global batch's and the groups keep the same weights.  Group 0's
ranks write the levels to the checkpoint and every group's ranks its own
solver states (warm states and monitor counts of every level); a resume on
the same number of groups restores them, on another the solves start cold.
The work counters are group 0's.
"""
import os
import time

import torch

from layerpar import checkpoint as ckpt
from layerpar._collective import any_rank
from layerpar import transfer
from layerpar.config import DEFAULTS, check_grid, check_ranks, to_toml
from layerpar.grid import ProcessGrid
from layerpar.metrics import MetricsWriter
from layerpar.training.build import (apply_timeout, learning_rate, load_data,
                                     load_in_groups, make_loaders, saved_group_state)
from layerpar.training.level import Level
from layerpar.training.report import (add_step, batch_len, epoch_sums, format_row,
                                      plot_metrics)


def depths(config):
    """The depth of each level, coarsest first: N / r^(L-1), ..., N."""
    ml, n = config["multilevel"], config["model"]["nlayers"]
    return [n // ml["factor"] ** (ml["levels"] - 1 - i) for i in range(ml["levels"])]


def epoch_budgets(config):
    """Epochs at each depth of nested iteration, coarsest first."""
    ml = config["multilevel"]
    e = ml["epochs_per_level"] or [config["optim"]["epochs"]]
    return list(e) * ml["levels"] if len(e) == 1 else list(e)


# ---- parameters as local layer dicts ----------------------------------------------
def _layers(level):
    """{n: {name: parameter}} of this rank's residual layers."""
    return level.body.params_by_layer()


def _values(d, what="data"):
    """A detached copy of a layer dict of parameters (what="data") or of
    their gradients (what="grad", zeros where there is none)."""
    out = {}
    for n, ps in d.items():
        out[n] = {}
        for k, p in ps.items():
            t = p.detach() if what == "data" else p.grad
            out[n][k] = torch.zeros_like(p) if t is None else t.detach().clone()
    return out


def _assign(d, values):
    with torch.no_grad():
        for n, ps in d.items():
            for k, p in ps.items():
                p.copy_(values[n][k])


_SQUARES = ("exp_avg_sq", "max_exp_avg_sq")


def _layout(level):
    return level.body.layout


class MultilevelTrainer:
    """Collective over ``comm``, with the interface of ``Trainer``:
    ``run()``, ``resume()``, ``save()``, ``evaluate(loader)``,
    ``write_config()``, ``close()``.  ``log``, ``progress``, ``should_stop``,
    ``metrics`` and ``grid`` as for ``Trainer``; ``comm`` is then this
    group's layer ranks (a duplicate: the transfers' messages) and ``world``
    every rank of the grid."""

    def __init__(self, config, comm, *, log=None, progress=None, should_stop=None,
                 metrics=True, grid=None):
        ml = config["multilevel"]
        if ml["method"] not in ("nested", "mgopt"):
            raise ValueError(f"multilevel.method = {ml['method']!r}: MultilevelTrainer runs "
                             "'nested' or 'mgopt' (use Trainer for single-level training)")
        self._own_grid = grid is None
        apply_timeout(config, comm, grid)  # a grid made below inherits it
        if grid is None:
            check_grid(config, comm.Get_size())  # a ConfigError naming parallel.data
        check_ranks(config, comm.Get_size() // (grid.data if grid else config["parallel"]["data"]))
        if grid is None:
            grid = ProcessGrid(comm, data=config["parallel"]["data"])
        self.grid = grid
        sharded = grid if grid.data > 1 else None
        self.config, self.method = config, ml["method"]
        self.world = comm
        self.comm = grid.layer_comm.Dup()  # the transfers' messages never meet the networks'
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        # the place in this rank's group: the first needs inputs, the last labels
        self.first, self.last = grid.layer_rank == 0, grid.layer_rank == grid.layers - 1
        self.log = log if self.rank == 0 else None
        self.progress = progress if self.rank == 0 else None
        self.data = load_data(config, comm, first=self.first, last=self.last)
        self.train_loader, self.val_loader = make_loaders(
            config, self.data, grid.layer_rank, grid.layers, grid=sharded)
        self._sharded = sharded
        self.depths = depths(config)
        self.run_dir = config["run"]["dir"]
        self.metrics = MetricsWriter(self.run_dir, comm) if metrics else None
        self.should_stop = should_stop
        self.epoch, self.step, self.cycle, self.batch_in_epoch = 0, 0, 0, 0
        # per level: cumulative work of levels no longer built (nested), as totals
        self.done_work = [{"fwd": 0, "bwd": 0} for _ in self.depths]
        if self.method == "nested":
            self.depth, self.depth_epoch, self.depth_done = 0, 0, False
            self.levels = [self._new_level(self.depths[0])]
        else:  # finest first
            self.levels = [self._new_level(n) for n in self.depths[::-1]]
        self.last_cycle = {}
        # this epoch's steps so far (checkpointed)
        self.acc = epoch_sums(accepted=0, corrections=0)

    # ---- shared helpers ---------------------------------------------------------------
    def _new_level(self, nlayers):
        """A network of ``nlayers`` layers on this group's layer ranks."""
        return Level(self.config, self.data, self.grid.layer_comm, nlayers=nlayers,
                     grid=self._sharded, reuse=self.config["multilevel"]["reuse"])

    @property
    def level(self):
        """The network being trained: the current depth, or MG/OPT's finest."""
        return self.levels[0]

    @property
    def net(self):
        return self.level.net

    def evaluate(self, loader):
        return self.level.evaluate(loader)

    def _work_columns(self):
        """Cumulative work, total and per level (collective)."""
        per = [dict(w) for w in self.done_work]
        if self.method == "nested":
            cur = self.level.work_totals()
            per[self.depth] = {k: per[self.depth][k] + cur[k] for k in cur}
        else:
            for i, lev in enumerate(self.levels):
                # MG/OPT level i has depth index L-1-i (coarsest 0)
                cur = lev.work_totals()
                j = len(self.depths) - 1 - i
                per[j] = {k: per[j][k] + cur[k] for k in cur}
        cols = {"fwd_work": sum(w["fwd"] for w in per), "bwd_work": sum(w["bwd"] for w in per)}
        for j, w in enumerate(per):
            cols[f"fwd_work_l{j}"] = w["fwd"]
            cols[f"bwd_work_l{j}"] = w["bwd"]
        return cols

    def _row(self, acc, t_epoch, level_index):
        val_loss, val_acc = self.evaluate(self.val_loader)
        n = max(acc["steps"], 1)
        row = {"epoch": self.epoch + 1, "step": self.step, "cycle": self.cycle,
               "level": level_index, "nlayers": self.level.nlayers,
               "train_loss": acc["loss"] / max(acc["size"], 1),
               "train_acc": acc["correct"] / max(acc["size"], 1),
               "val_loss": val_loss, "val_acc": val_acc,
               "fwd_iters": acc["fwd_iters"] / n, "bwd_iters": acc["bwd_iters"] / n,
               "fwd_residual": acc["fwd_res"] / n, "bwd_residual": acc["bwd_res"] / n,
               "lr": self.level.optimizer.param_groups[0]["lr"],
               "wall_time": time.perf_counter() - t_epoch, "virtual_time": acc["vtime"],
               "accepted": acc["accepted"] / max(acc["corrections"], 1)}
        row.update(self._work_columns())
        return row

    def _report(self, s, b, steps_per_epoch):
        if s.get("change") and self.log:
            self.log(f"step {self.step}: {s['change']}")
        if self.progress:
            self.progress(self.epoch, b + 1, steps_per_epoch, s)

    def _finish_epoch(self, acc, t_epoch, level_index):
        row = self._row(acc, t_epoch, level_index)
        self.acc = epoch_sums(accepted=0, corrections=0)  # the next epoch's sums
        if self.metrics:
            self.metrics.append(row)
        self.epoch += 1
        self.batch_in_epoch = 0
        if self.log:
            self.log(format_row(row) + f"  N={row['nlayers']}  work {row['fwd_work']:.0f}/"
                     f"{row['bwd_work']:.0f}")
        return row

    # ---- nested iteration -------------------------------------------------------------
    def _run_nested(self):
        budgets = epoch_budgets(self.config)
        total = sum(budgets)
        target = self.config["multilevel"]["target_accuracy"]
        every = self.config["run"]["checkpoint_every"]
        steps_per_epoch = len(self.train_loader)
        summary = None
        while True:
            last_depth = self.depth == len(self.depths) - 1
            while not self.depth_done and self.depth_epoch < budgets[self.depth]:
                lev = self.level
                lev.set_lr(learning_rate(self.config, min(self.epoch, total - 1), epochs=total))
                t_epoch, acc = time.perf_counter(), self.acc
                for b, (x, y) in enumerate(self.train_loader.epoch(self.epoch)):
                    if b < self.batch_in_epoch:
                        continue  # done before the checkpoint this run resumed from
                    size = batch_len(self.train_loader, b)
                    s = lev.step(x, y, size)
                    add_step(acc, s, size)
                    self.step += 1
                    self.cycle += 1
                    self.batch_in_epoch = b + 1
                    self._report(s, b, steps_per_epoch)
                    if self._stop_or_save(steps_per_epoch, every):
                        return self._stopped()
                summary = self._finish_epoch(acc, t_epoch, self.depth)
                self.depth_epoch += 1
                if not last_depth and target > 0 and summary["val_acc"] >= target:
                    self.depth_done = True
                stop = self._stop_agreed()
                if every >= 0 or stop:
                    self.save()
                if stop:
                    return self._stopped()
            if last_depth:
                if every < 0:  # no checkpoint per epoch: the final one
                    self.save()
                return summary
            self._refine()
            self.save()

    def _refine(self):
        """Prolong the current depth's network and optimiser state to the
        next depth (collective)."""
        kind = self.config["multilevel"]["prolong"]
        old = self.level
        new = self._new_level(self.depths[self.depth + 1])
        src, dst = _layout(old), _layout(new)
        r = new.nlayers // old.nlayers
        # the residual layers' weights, prolonged in layer-time
        fine = transfer.prolong(_values(_layers(old)), src, dst, self.comm, kind=kind)
        _assign(_layers(new), fine)
        # the opening and closing layers stay where they are, unchanged
        with torch.no_grad():
            for key, p in new.end_params().items():
                p.copy_(old.end_params()[key])
        if not old.lbfgs:
            self._prolong_optimizer_state(old, new, src, dst, r, kind)
        tot = old.work_totals()
        self.done_work[self.depth] = {k: self.done_work[self.depth][k] + tot[k] for k in tot}
        old.close()
        self.levels = [new]
        self.depth += 1
        self.depth_epoch, self.depth_done = 0, False
        if self.log:
            self.log(f"nested iteration: {old.nlayers} -> {new.nlayers} layers ({kind} "
                     "prolongation)")

    def _prolong_optimizer_state(self, old, new, src, dst, r, kind):
        scale = {"exp_avg": 1.0 / r, "momentum_buffer": 1.0 / r, "exp_avg_sq": 1.0 / r ** 2,
                 "max_exp_avg_sq": 1.0 / r ** 2}
        packed = {}   # {n: {"param/key": tensor}}: state shaped like its parameter
        scalars = {}  # {(param, key): value}: e.g. step counters, the same for every layer
        for n, ps in _layers(old).items():
            packed[n] = {}
            for name, p in ps.items():
                for key, v in old.optimizer.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                        packed[n][f"{name}/{key}"] = v.detach() * scale.get(key, 1.0)
                    else:
                        scalars[(name, key)] = v
        # ranks holding no state still take part in the collective transfer
        moved = transfer.prolong(packed, src, dst, self.comm, kind=kind)
        for n, ps in _layers(new).items():
            for name, p in ps.items():
                st = {key: (v.clone() if isinstance(v, torch.Tensor) else v)
                      for (pn, key), v in scalars.items() if pn == name}
                for k, t in moved[n].items():
                    pname, key = k.split("/", 1)
                    if pname == name:
                        # linear extrapolation may take a second moment below 0
                        st[key] = t.clamp(min=0) if key in _SQUARES else t.clone()
                if st:
                    new.optimizer.state[p] = st
        for key, p in new.end_params().items():
            st = old.optimizer.state.get(old.end_params()[key])
            if st:
                new.optimizer.state[p] = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                          for k, v in st.items()}

    # ---- MG/OPT ---------------------------------------------------------------------------
    def coarse_problem(self, l, x, y, size=None):
        """Set up the coarse problem of level l+1 at the current weights of
        level l on the batch (x, y): restrict the weights into level l+1 and
        set its linear term v.  Returns (x_H0 layer dict, x_H0 ends, level l's
        objective at x_h).  Collective (``size``: the global batch's size,
        needed on a grid of several groups)."""
        ml = self.config["multilevel"]
        fine, coarse = self.levels[l], self.levels[l + 1]
        src, dst = _layout(fine), _layout(coarse)
        f_h = fine.loss_and_grad(x, y, size)
        g_h = _values(_layers(fine), "grad")
        g_h_ends = {k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                    for k, p in fine.end_params().items()}
        # x_H0 = R x_h; opening and closing: identity
        x_H0 = transfer.restrict(_values(_layers(fine)), src, dst, self.comm,
                                 kind=ml["restrict"])
        _assign(_layers(coarse), x_H0)
        with torch.no_grad():
            for key, p in coarse.end_params().items():
                p.copy_(fine.end_params()[key])
        ends_H0 = {k: p.detach().clone() for k, p in coarse.end_params().items()}
        # v = grad f_H(x_H0) - P^T grad f_h(x_h)
        coarse.set_linear_term(None)
        coarse.loss_and_grad(x, y, size)
        Pt_g = transfer.restrict_gradient(g_h, src, dst, self.comm, kind=ml["prolong"])
        v = {}
        for n, ps in _layers(coarse).items():
            for k, p in ps.items():
                v[p] = p.grad.detach() - Pt_g[n][k]
        for key, p in coarse.end_params().items():
            v[p] = p.grad.detach() - g_h_ends[key]
        coarse.set_linear_term(v)
        return x_H0, ends_H0, f_h

    def _vcycle(self, l, x, y, size):
        """One V-cycle from level l on the batch (x, y); the statistics of
        level l's first optimiser step (or of its first evaluation)."""
        ml = self.config["multilevel"]
        lev = self.levels[l]
        if l == len(self.levels) - 1:
            out = lev.steps(ml["coarse_steps"], [(x, y, size)])
            return out[0] if out else None
        pre = lev.steps(ml["pre_steps"], [(x, y, size)])
        x_H0, ends_H0, f0 = self.coarse_problem(l, x, y, size)
        first = pre[0] if pre else None
        self._vcycle(l + 1, x, y, size)
        coarse = self.levels[l + 1]
        coarse.set_linear_term(None)
        # the correction e = P (x_H - x_H0); opening and closing: identity
        e_H = {n: {k: p.detach() - x_H0[n][k] for k, p in ps.items()}
               for n, ps in _layers(coarse).items()}
        e = transfer.prolong(e_H, _layout(coarse), _layout(lev), self.comm, kind=ml["prolong"])
        e_ends = {k: p.detach() - ends_H0[k] for k, p in coarse.end_params().items()}
        # with reuse, the first trial's gradient serves the next evaluation at
        # the accepted point: a post-smoothing step, or (one batch per epoch:
        # the same batch again) the next cycle's first fine evaluation
        grad_first = lev.reusing and (ml["post_steps"] > 0
                                      or (l == 0 and len(self.train_loader) == 1))
        alpha = self._line_search(lev, x, y, size, f0, e, e_ends, grad_first)
        if l == 0:
            self.last_cycle = {"f_before": f0, "f_after": self._f_after, "alpha": alpha}
        post = lev.steps(ml["post_steps"], [(x, y, size)])
        if first is None:
            first = post[0] if post else None
        return first

    def _line_search(self, lev, x, y, size, f0, e, e_ends, grad_first=False):
        """x <- x + alpha*e for the first alpha = 1, 1/2, ... that decreases
        the objective below f0; the weights unchanged if none does.  Returns
        alpha (0 when rejected).  ``grad_first``: the trial alpha = 1 also
        evaluates the gradient (kept for reuse).  Collective."""
        layers, ends = _layers(lev), lev.end_params()
        x0 = _values(layers)
        x0_ends = {k: p.detach().clone() for k, p in ends.items()}
        alpha = 1.0
        for i in range(self.config["multilevel"]["line_search_steps"]):
            with torch.no_grad():
                for n, ps in layers.items():
                    for k, p in ps.items():
                        p.copy_(x0[n][k] + alpha * e[n][k])
                for key, p in ends.items():
                    p.copy_(x0_ends[key] + alpha * e_ends[key])
            f = lev.loss_and_grad(x, y, size) if grad_first and i == 0 else lev.loss(x, y, size)
            if f < f0:
                self._f_after = f
                return alpha
            alpha /= 2
        _assign(layers, x0)
        with torch.no_grad():
            for key, p in ends.items():
                p.copy_(x0_ends[key])
        self._f_after = f0
        return 0.0

    def mgopt_cycle(self, x, y, size):
        """One MG/OPT V-cycle on the batch (x, y).  Collective."""
        s = self._vcycle(0, x, y, size)
        self.step += 1
        self.cycle += 1
        return s

    def _run_mgopt(self):
        o, every = self.config["optim"], self.config["run"]["checkpoint_every"]
        steps_per_epoch = len(self.train_loader)
        summary = None
        while self.epoch < o["epochs"]:
            for lev in self.levels:
                lev.set_lr(learning_rate(self.config, self.epoch))
            t_epoch, acc = time.perf_counter(), self.acc
            for b, (x, y) in enumerate(self.train_loader.epoch(self.epoch)):
                if b < self.batch_in_epoch:
                    continue
                size = batch_len(self.train_loader, b)
                s = self.mgopt_cycle(x, y, size)
                if s is None:  # no fine optimiser step in the cycle: its evaluation
                    s = dict(loss=self.last_cycle["f_before"], correct=0, fwd_iters=0,
                             bwd_iters=0, fwd_res=0.0, bwd_res=0.0, vtime=0.0, size=size)
                add_step(acc, s, size)
                acc["corrections"] += 1
                acc["accepted"] += self.last_cycle["alpha"] > 0
                self.batch_in_epoch = b + 1
                self._report(s, b, steps_per_epoch)
                if self._stop_or_save(steps_per_epoch, every):
                    return self._stopped()
            summary = self._finish_epoch(acc, t_epoch, 0)
            stop = self.epoch < o["epochs"] and self._stop_agreed()
            if every >= 0 or stop or self.epoch == o["epochs"]:
                self.save()
            if stop:
                return self._stopped()
        return summary

    def _stop_or_save(self, steps_per_epoch, every):
        """After a step inside an epoch: True, after a checkpoint, when any
        rank asks to stop; else the periodic checkpoint.  Collective."""
        if self.batch_in_epoch >= steps_per_epoch:
            return False
        if self._stop_agreed():
            self.save()
            return True
        if every > 0 and self.step % every == 0:
            self.save()
        return False

    def _stop_agreed(self):
        """Collective: does any rank's should_stop() say stop?"""
        if self.should_stop is None:
            return False
        return any_rank(self.world, self.should_stop(), what="the agreement on stopping")

    def _stopped(self):
        return {"stopped": True, "epoch": self.epoch, "step": self.step}

    # ---- the loop ---------------------------------------------------------------------------
    def run(self):
        t_start = time.perf_counter()
        summary = self._run_nested() if self.method == "nested" else self._run_mgopt()
        if summary is None:  # nothing left to train: report the current state
            val_loss, val_acc = self.evaluate(self.val_loader)
            summary = {"epoch": self.epoch, "step": self.step, "val_loss": val_loss,
                       "val_acc": val_acc}
        summary["total_wall_time"] = time.perf_counter() - t_start
        if self.rank == 0 and self.metrics and self.config["run"]["plot"]:
            plot_metrics(self.metrics.rows(), os.path.join(self.run_dir, "curves.png"))
        return summary

    def close(self):
        """Collective: free the networks' solvers, this trainer's
        communicator and its own grid's (the trainer is not used again)."""
        for lev in self.levels:
            lev.close()
        self.comm.Free()
        if self._own_grid:
            self.grid.close()

    def write_config(self):
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.toml"), "w") as fh:
                fh.write(to_toml(self.config))

    # ---- checkpoints ------------------------------------------------------------------------
    def checkpoint_path(self):
        return os.path.join(self.run_dir, "checkpoint.h5")

    def _offsets(self):
        out, off = [], 0
        for lev in self.levels:
            out.append(off)
            off += lev.nlayers
        return out, off

    def _group_state(self):
        """This group's solver states: every level's warm states and
        residual monitor counts."""
        return {"warm": {i: lev.warm_state() for i, lev in enumerate(self.levels)},
                "monitors": [lev.monitor.state() if lev.monitor else {} for lev in self.levels]}

    def save(self):
        """Collective over every rank of the grid: every level's weights and
        optimiser state, and the method's counters, in one checkpoint (given
        by group 0's ranks); on a grid of several groups every group's
        solver states under its group index.  Every rank writes its own part
        file and raises the same CheckpointError if the save fails."""
        offsets, total = self._offsets()
        levels_work = [lev.work_totals() for lev in self.levels]  # collective over the group
        head = {"num_layers": total, "epoch": self.epoch, "step": self.step,
                "config": self.config}
        groups = {}
        if self.grid.data > 1:
            groups = {"data_groups": self.grid.data,
                      "groups": {self.grid.data_rank: self._group_state()}}
        if self.grid.data_rank != 0:  # the model and the counters: group 0's
            ckpt.save_checkpoint(self.checkpoint_path(), self.world, dict(head, extra=groups))
            return
        state = dict(head, **{"layers": {}, "opening": {}, "closing": {},
                 "optimizer": {"layers": {}, "opening": {}, "closing": {}, "hyper": {}},
                 "rng": ckpt.rng_state()})
        for i, (lev, off) in enumerate(zip(self.levels, offsets)):
            params = lev.params()
            opt = ckpt.optimizer_state(lev.optimizer, params)
            for n, d in params["layers"].items():
                state["layers"][off + n] = {k: v.detach() for k, v in d.items()}
                state["optimizer"]["layers"][off + n] = opt["layers"][n]
            for sec in ("opening", "closing"):
                for k, v in params[sec].items():
                    state[sec][f"level{i}.{k}"] = v.detach()
                    state["optimizer"][sec][f"level{i}.{k}"] = opt[sec][k]
            state["optimizer"]["hyper"][i] = opt["hyper"]
        state["extra"] = dict(groups, **{
            "method": self.method, "nlayers": [lev.nlayers for lev in self.levels],
            "cycle": self.cycle, "batch_in_epoch": self.batch_in_epoch, "acc": dict(self.acc),
            "depth": getattr(self, "depth", 0), "depth_epoch": getattr(self, "depth_epoch", 0),
            "depth_done": getattr(self, "depth_done", False),
            "done_work": [dict(w) for w in self.done_work], "work": levels_work,
            "monitors": [lev.monitor.state() if lev.monitor else {} for lev in self.levels],
            "passes": [lev.body.passes for lev in self.levels],
            # on a grid of several groups the warm states are in "groups"
            "warm": (self._group_state()["warm"] if self.grid.data == 1 else {})})
        ckpt.save_checkpoint(self.checkpoint_path(), self.world, state)

    def resume(self, path=None):
        """Load ``path`` or the run directory's newest checkpoint (False if
        there is none); any number of ranks.  Collective."""
        if path is None:
            path = ckpt.find_latest_checkpoint(self.run_dir, self.world)
            if path is None:
                return False
        ml = self.config["multilevel"]
        keys = {"model": self.config["model"],
                "multilevel": {k: ml[k] for k in ("method", "levels", "factor")},
                "data": {k: self.config["data"][k] for k in ("name", "dtype", "seed")},
                "optim": {"name": self.config["optim"]["name"]}}
        header = load_in_groups(path, self.grid, self.world, layer_indices=[], config=keys,
                                defaults=DEFAULTS)
        extra = header.get("extra") or {}
        if extra.get("method") != self.method:
            raise ckpt.CheckpointError(f"checkpoint {path} is not of a {self.method} run")
        if self.method == "nested":
            self.depth = int(extra["depth"])
            if self.levels[0].nlayers != self.depths[self.depth]:
                self.levels[0].close()
                self.levels = [self._new_level(self.depths[self.depth])]
        offsets, total = self._offsets()
        wanted = [off + n for lev, off in zip(self.levels, offsets)
                  for n in lev.body.layer_indices]
        st = load_in_groups(path, self.grid, self.world, layer_indices=wanted,
                            num_layers=total, config=keys,
                            defaults=DEFAULTS)
        mine = saved_group_state(extra, self.grid)
        sopt = st["optimizer"]
        for i, (lev, off) in enumerate(zip(self.levels, offsets)):
            params = lev.params()
            saved = {"layers": {}, "opening": {}, "closing": {}, "hyper": sopt["hyper"][i]}
            with torch.no_grad():
                for n, d in params["layers"].items():
                    for k, p in d.items():
                        p.copy_(st["layers"][off + n][k])
                    saved["layers"][n] = sopt["layers"][off + n]
                for sec in ("opening", "closing"):
                    for k, p in params[sec].items():
                        p.copy_(st[sec][f"level{i}.{k}"])
                        saved[sec][k] = sopt[sec][f"level{i}.{k}"]
            ckpt.restore_optimizer_state(lev.optimizer, params, saved)
            # the saved totals continue on the first rank
            lev.work = dict(extra["work"][i]) if self.first else {"fwd": 0, "bwd": 0}
            mon = (mine.get("monitors") or extra["monitors"])[i]
            if lev.monitor and mon:
                lev.monitor.restore(mon, lev.body)
            if "passes" in extra:  # keys the layers' random draws
                lev.body.passes = int(extra["passes"][i])
            warm = (mine.get("warm") or {}).get(i)
            if warm:
                lev.restore_warm_state(warm)
        if st.get("rng"):
            ckpt.set_rng_state(st["rng"])
        self.epoch, self.step = st["epoch"], st["step"]
        self.cycle, self.batch_in_epoch = int(extra["cycle"]), int(extra["batch_in_epoch"])
        self.acc = dict(epoch_sums(accepted=0, corrections=0), **extra.get("acc", {}))
        self.done_work = [dict(w) for w in extra["done_work"]]
        if self.method == "nested":
            self.depth_epoch = int(extra["depth_epoch"])
            self.depth_done = bool(extra["depth_done"])
        if self.metrics:
            self.metrics.truncate(self.epoch)
        if self.log:
            self.log(f"resumed from {path}: epoch {self.epoch}, step {self.step}")
        return True


def make_trainer(config, comm, **kw):
    """The trainer for the configured method: ``Trainer`` (single level) or
    ``MultilevelTrainer``."""
    if config["multilevel"]["method"] == "none":
        from layerpar.training.loop import Trainer
        return Trainer(config, comm, **kw)
    return MultilevelTrainer(config, comm, **kw)
