"""The training engine: a configured network, data, optimiser and MGRIT mode,
trained epoch by epoch with metrics, checkpoints and resumption.

Modes (``mgrit.mode``):
  serial          one grid level: exact layer-serial propagation across ranks
  layer-parallel  ``max_levels`` levels, a fixed number of forward and
                  backward MGRIT iterations per batch: inexact gradients
  one-shot        the simultaneous method: forward and adjoint states are
                  kept and warm-started from one design update to the next,
                  by default one forward and one backward iteration each
In both parallel modes a residual monitor raises the number of iterations
when the MGRIT residual stops contracting, and falls back to serial
propagation past ``mgrit.max_iters``.

Every rank runs the same loop on the same batches (the first rank needs the
inputs, the last the labels); losses and counts come from the last rank.

On a process grid of D data-parallel groups x L layer-parallel ranks
(``parallel.data = D``, ``layerpar.grid``) each group holds the network on
its L ranks and trains on its rows of the same global batches; gradients are
averaged over the data axis before every optimiser step, so the groups keep
the same weights and the run follows the global batches as on one group.
Losses and accuracies are the global batch's.  Group 0's layer ranks write
the model and the run's state to the checkpoint (as on one group), and every
group's layer ranks its own solver states (one-shot warm states and the
residual monitor's counts, those of its share of the batches): a run resumed
on a grid of the same number of groups continues as the uninterrupted run;
on another number of groups every group reads the layers and group 0's
monitor counts, and its one-shot solves start cold.  Every group reads its
layers on resume, on any grid shape; metrics, progress and the run folder's
files come from world rank 0; a stop asked on any rank stops every rank.
The work counters (metrics' ``*_work``) and MGRIT statistics are group 0's.
"""
import math
import os
import time

import torch

from layerpar import checkpoint as ckpt
from layerpar._collective import any_rank
from layerpar._watchdog import guard
from layerpar.config import DEFAULTS, check_grid, to_toml
from layerpar.grid import ProcessGrid
from layerpar.metrics import MetricsWriter
from layerpar.training.build import (apply_timeout, learning_rate, load_data,
                                     load_in_groups, make_loaders, saved_group_state)
from layerpar.training.level import Level
from layerpar.training.report import (add_step, batch_len, epoch_sums, format_row,
                                      plot_metrics)


class Trainer:
    """Collective over ``comm``: every rank constructs it and calls run().

    ``log(text)`` receives messages on rank 0 (None: silent); ``progress``
    (rank 0) is called as progress(epoch, step_in_epoch, steps_per_epoch,
    metrics, first) after each step.  ``should_stop()`` (given on every rank
    or on none) is asked after each step; when it is true on any rank, every
    rank stops after that same step, a checkpoint is written and run()
    returns a summary with ``stopped`` true.  ``metrics=False``: no metrics
    files (evaluation only).

    ``grid``: a ``layerpar.grid.ProcessGrid`` over ``comm`` (default: one
    made from ``parallel.data``, freed by ``close()``).

    ``run.timeout`` (else $LAYERPAR_TIMEOUT) is set on ``comm`` and the
    grid's communicators (``layerpar.set_timeout``): a rank that does not
    answer within it makes every other rank raise
    ``braid_ext.MGRITTimeoutError`` (in a solve) or its subclass
    ``layerpar.SilentRankError`` naming it; the job should then end.
    """

    def __init__(self, config, comm, *, log=None, progress=None, should_stop=None,
                 metrics=True, grid=None):
        self.config = config
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._own_grid = grid is None
        apply_timeout(config, comm, grid)  # a grid made below inherits it
        if grid is None:
            check_grid(config, self.size)  # a ConfigError naming parallel.data, everywhere
            grid = ProcessGrid(comm, data=config["parallel"]["data"])
        self.grid = grid
        self.log = log if self.rank == 0 else None
        self.progress = progress if self.rank == 0 else None
        # the place in this rank's group: the first needs inputs, the last labels
        self.first, self.last = grid.layer_rank == 0, grid.layer_rank == grid.layers - 1
        self.data = load_data(config, comm, first=self.first, last=self.last)
        sharded = grid if grid.data > 1 else None
        self.train_loader, self.val_loader = make_loaders(
            config, self.data, grid.layer_rank, grid.layers, grid=sharded)
        self.level = Level(config, self.data, grid.layer_comm, grid=sharded)
        self.run_dir = config["run"]["dir"]
        if not self.run_dir:
            raise ValueError("run.dir = '': name the run's folder")
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.should_stop = should_stop
        self.sums = epoch_sums()  # this epoch's steps so far (checkpointed)
        self.metrics = MetricsWriter(self.run_dir, comm) if metrics else None
        self._first_loss = None

    @property
    def net(self):
        return self.level.net

    @property
    def body(self):
        return self.level.body

    @property
    def optimizer(self):
        return self.level.optimizer

    @property
    def monitor(self):
        return self.level.monitor

    def loader(self, split, *, batch_size):
        """An evaluation loader over ``split`` (in order) for this rank: its
        group's rows of each batch on a grid."""
        if self.grid.data > 1:
            return self.grid.loader(split, batch_size=batch_size, shuffle=False,
                                    need_inputs=self.first, need_labels=self.last)
        return split.loader(batch_size=batch_size, shuffle=False, need_inputs=self.first,
                            need_labels=self.last)

    def evaluate(self, loader, *, exact=True):
        """(mean loss, accuracy) over a loader, collective; ``exact``: with
        the exact network (one grid level), whatever the training mode."""
        return self.level.evaluate(loader, exact=exact)

    def _check_divergence(self, loss):
        """Stop (on every rank: the loss is the same everywhere) when the loss
        is not finite or far above chance level."""
        chance = math.log(self.data.num_classes)
        bound = DIVERGED * max(chance, self._first_loss or 0.0)
        if not math.isfinite(loss) or loss > bound:
            raise FloatingPointError(
                f"training diverged at step {self.step} (epoch {self.epoch + 1}): loss {loss:.4g}"
                f" (chance level {chance:.3g}); lower optim.lr (now "
                f"{self.optimizer.param_groups[0]['lr']:.3g})")

    # ---- checkpoints ---------------------------------------------------------
    def save(self):
        """Collective over every rank of the grid: one checkpoint, in which
        group 0's layer ranks give the model and the run's state and every
        group's layer ranks give that group's solver states (one-shot warm
        states and the residual monitor's counts, which belong to the
        group's share of the batches).  Every rank writes its own part file;
        every rank raises the same CheckpointError if the save fails."""
        ckpt.save_checkpoint(self.checkpoint_path(), self.comm, self._state())

    def _group_state(self):
        """This group's solver states: {"warm": ..., "monitor": ...}."""
        return {"warm": self.level.warm_state(),
                "monitor": self.monitor.state() if self.monitor else {}}

    def _state(self):
        """This rank's part of the checkpoint (collective over the grid)."""
        work = self.level.work_totals()  # collective over the group
        head = {"num_layers": self.body.nlayers, "epoch": self.epoch, "step": self.step,
                "config": self.config}
        if self.grid.data > 1:
            # every group: its own solver states, under its group index
            groups = {"data_groups": self.grid.data,
                      "groups": {self.grid.data_rank: self._group_state()}}
        else:
            groups = {}
        if self.grid.data_rank != 0:
            return dict(head, extra=groups)  # no layers, no RNG state: group 0 gives them
        params = self.level.params()
        state = dict(head, **{
                 "layers": {n: {k: v.detach() for k, v in d.items()}
                            for n, d in params["layers"].items()},
                 "opening": {k: v.detach() for k, v in params["opening"].items()},
                 "closing": {k: v.detach() for k, v in params["closing"].items()},
                 "optimizer": ckpt.optimizer_state(self.optimizer, params),
                 "rng": ckpt.rng_state(),
                 "extra": dict(groups, **{
                     "batch_in_epoch": self.batch_in_epoch, "passes": self.body.passes,
                     "epoch_sums": dict(self.sums),
                     "monitor": self.monitor.state() if self.monitor else {},
                     "work": work,
                     # on a grid of several groups the warm states are in "groups"
                     "warm": self.level.warm_state() if self.grid.data == 1 else {}})})
        return state

    def checkpoint_path(self):
        return os.path.join(self.run_dir, "checkpoint.h5")

    def resume(self, path=None):
        """Load ``path``, or the run directory's checkpoint; False if there is
        none.  A damaged or mismatched checkpoint raises CheckpointError (the
        previous one, checkpoint.prev.h5, is left as it is)."""
        if path is None:
            path = self.checkpoint_path()
            guard(self.comm, "the checkpoint lookup on rank 0")
            exists = self.comm.bcast(os.path.exists(path) if self.rank == 0 else None, root=0)
            if not exists:  # a save interrupted between its renames leaves only .prev
                path = ckpt.find_latest_checkpoint(self.run_dir, self.comm)
                if path is None:
                    return False
            else:
                path = self._usable_checkpoint(path)
        keys = {"model": self.config["model"], "data": {
            k: self.config["data"][k] for k in ("name", "dtype", "seed")}}
        try:
            st = load_in_groups(path, self.grid, self.comm,
                                layer_indices=self.body.layer_indices,
                                num_layers=self.body.nlayers, config=keys, defaults=DEFAULTS)
        except ckpt.CheckpointError as e:
            prev = ckpt.previous_path(path)
            hint = f" (the previous checkpoint {prev} is kept: resume from it with " \
                   f"--resume-from {prev})" if self._verifies(prev) else ""
            raise ckpt.CheckpointError(f"{e}{hint}") from None
        params = self.level.params()
        with torch.no_grad():
            for group in ("opening", "closing"):
                for k, p in params[group].items():
                    p.copy_(st[group][k])
            for n, d in params["layers"].items():
                for k, p in d.items():
                    p.copy_(st["layers"][n][k])
        ckpt.restore_optimizer_state(self.optimizer, params, st["optimizer"])
        if st.get("rng"):
            ckpt.set_rng_state(st["rng"])
        self.epoch, self.step = st["epoch"], st["step"]
        extra = st.get("extra") or {}
        self.batch_in_epoch = extra.get("batch_in_epoch", 0)
        self.sums = dict(epoch_sums(), **extra.get("epoch_sums", {}))
        self.body.passes = extra.get("passes", 0)  # keys the layers' random draws
        mine = saved_group_state(extra, self.grid)
        monitor, warm = mine.get("monitor") or extra.get("monitor"), mine.get("warm")
        if self.monitor and monitor:
            self.monitor.restore(monitor, self.body)
        if warm:
            self.level.restore_warm_state(warm)
        self._restore_work(extra.get("work"))
        if self.metrics:
            self.metrics.truncate(self.epoch)  # rows of epochs finished before the save
        if self.log:
            self.log(f"resumed from {path}: epoch {self.epoch}, step {self.step}")
        return True

    def _verifies(self, path):
        """Collective: does the checkpoint ``path`` exist and verify?"""
        try:
            ckpt.verify_checkpoint(path, comm=self.comm)
        except ckpt.CheckpointError:
            return False
        return True

    def _usable_checkpoint(self, path):
        """``path``, or its previous version when ``path`` is damaged; the
        damaged file is renamed aside so the next save keeps the good one.
        Collective."""
        msg = None
        if self.rank == 0:
            prev = ckpt.previous_path(path)
            try:
                ckpt.verify_checkpoint(path)
            except ckpt.CheckpointError as e:
                try:
                    ckpt.verify_checkpoint(prev)
                except ckpt.CheckpointError:
                    prev = None
                if prev:
                    aside = f"{path}.damaged-{int(time.time())}"
                    os.replace(path, aside)
                    msg = (prev, f"{e}; resuming from the previous checkpoint {prev} "
                                 f"(the damaged file is kept as {aside})")
        # Rank 0 -> every rank: the checkpoint to load instead, and why.
        guard(self.comm, "the checkpoint check on rank 0")
        msg = self.comm.bcast(msg, root=0)
        if msg is None:
            return path
        if self.log:
            self.log(f"warning: {msg[1]}")
        return msg[0]

    def _stop_agreed(self):
        """Collective: does any rank's should_stop() say stop?"""
        if self.should_stop is None:
            return False
        return any_rank(self.comm, self.should_stop(), what="the agreement on stopping")

    # ---- the loop ------------------------------------------------------------
    def run(self):
        o, r = self.config["optim"], self.config["run"]
        every = r["checkpoint_every"]
        steps_per_epoch = len(self.train_loader)
        t_start = time.perf_counter()
        summary = None
        while self.epoch < o["epochs"]:
            self.level.set_lr(learning_rate(self.config, self.epoch))
            t_epoch = time.perf_counter()
            acc = self.sums
            first = self.batch_in_epoch + 1
            batches = self.train_loader.epoch(self.epoch)
            for b, (x, y) in enumerate(batches):
                if b < self.batch_in_epoch:
                    continue  # done before the checkpoint this run resumed from
                size = batch_len(self.train_loader, b)
                s = self.level.step(x, y, size)
                add_step(acc, s, size)
                self.step += 1
                self.batch_in_epoch = b + 1
                if self._first_loss is None:
                    self._first_loss = s["loss"]
                self._check_divergence(s["loss"])
                if s["change"] and self.log:
                    self.log(f"step {self.step}: {s['change']}")
                if self.progress:
                    self.progress(self.epoch, b + 1, steps_per_epoch, s, first)
                if r["log_every"] and self.step % r["log_every"] == 0 and self.log:
                    self.log(f"step {self.step} (epoch {self.epoch + 1}, batch {b + 1}/"
                             f"{steps_per_epoch}): loss {s['loss']:.4f}, accuracy "
                             f"{100 * s['correct'] / max(size, 1):.1f}%, MGRIT iterations "
                             f"{s['fwd_iters']}/{s['bwd_iters']}, residuals "
                             f"{s['fwd_res']:.1e}/{s['bwd_res']:.1e}")
                if self.batch_in_epoch < steps_per_epoch:
                    if self._stop_agreed():
                        self.save()
                        return self._stopped(t_start)
                    if every > 0 and self.step % every == 0:
                        self.save()
            val_loss, val_acc = self.evaluate(self.val_loader)
            n = max(acc["steps"], 1)
            row = {"epoch": self.epoch + 1, "step": self.step,
                   "train_loss": acc["loss"] / max(acc["size"], 1),
                   "train_acc": acc["correct"] / max(acc["size"], 1),
                   "val_loss": val_loss, "val_acc": val_acc,
                   "fwd_iters": acc["fwd_iters"] / n, "bwd_iters": acc["bwd_iters"] / n,
                   "fwd_residual": acc["fwd_res"] / n, "bwd_residual": acc["bwd_res"] / n,
                   "lr": self.optimizer.param_groups[0]["lr"],
                   "wall_time": time.perf_counter() - t_epoch,
                   "virtual_time": acc["vtime"]}
            row.update({f"{k}_work": v for k, v in self.level.work_totals().items()})
            self._rank0_file_work(self.metrics.append, row)
            self.epoch += 1
            self.batch_in_epoch = 0
            self.sums = epoch_sums()
            summary = row
            if self.log:
                self.log(format_row(row))
            stop = self.epoch < o["epochs"] and self._stop_agreed()
            if every >= 0 or stop or self.epoch == o["epochs"]:
                self.save()
            if stop:
                return self._stopped(t_start)
        if summary is None:  # nothing left to train: report the current state
            val_loss, val_acc = self.evaluate(self.val_loader)
            summary = {"epoch": self.epoch, "step": self.step, "val_loss": val_loss,
                       "val_acc": val_acc}
        summary["total_wall_time"] = time.perf_counter() - t_start
        if self.rank == 0 and self.config["run"]["plot"]:
            plot_metrics(self.metrics.rows(), os.path.join(self.run_dir, "curves.png"))
        return summary

    def _stopped(self, t_start):
        return {"stopped": True, "epoch": self.epoch, "step": self.step,
                "total_wall_time": time.perf_counter() - t_start}

    def _restore_work(self, saved):
        """Work counters of a resumed run: the saved totals, held by the first
        rank (so that the totals over the ranks continue on any rank count)."""
        totals = {"fwd": 0, "bwd": 0}
        if saved:
            totals = {k: int(saved.get(k, 0)) for k in totals}
        self.level.work = totals if self.first else {"fwd": 0, "bwd": 0}

    def close(self):
        """Collective: free the network's solvers and the grid's
        communicators (the trainer is not used again)."""
        self.level.close()
        if self._own_grid:
            self.grid.close()

    def write_config(self):
        def write():
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.toml"), "w") as fh:
                fh.write(to_toml(self.config))
        self._rank0_file_work(write)

    def _rank0_file_work(self, fn, *args):
        """Collective: fn(*args) on rank 0; an OSError there (a full disk)
        is raised on every rank."""
        err = None
        if self.rank == 0:
            try:
                fn(*args)
            except OSError as e:
                err = (e.errno, e.strerror or str(e), e.filename)
        # Rank 0 -> every rank: whether its file work failed.
        guard(self.comm, "the file work on rank 0")
        err = self.comm.bcast(err, root=0)
        if err is not None:
            raise OSError(*err)


DIVERGED = 100.0  # a loss this many times chance level (or the first loss) has diverged
