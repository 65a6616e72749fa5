"""The training engine: a configured network, data, optimiser and MGRIT mode,
trained epoch by epoch with metrics, checkpoints and resumption, by one
method (``multilevel.method``): single-level training (``single``), nested
iteration or MG/OPT (``layerpar.multilevel``).  ``Trainer`` runs the epochs,
the stop agreement, the metrics and the checkpoints; the method says which
network to train, what one step on a batch is, when training is over and
what its part of a checkpoint holds (the interface is described in
``layerpar.multilevel.method``).  A loss that is not finite or far above
chance level stops training with every method.

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

from layerpar import checkpoint as ckpt
from layerpar._collective import any_rank, on_root
from layerpar.config import DEFAULTS, check_grid, check_ranks, to_toml
from layerpar.events import TensorBoardEvents
from layerpar.grid import ProcessGrid
from layerpar.metrics import MetricsWriter
from layerpar.multilevel import METHODS
from layerpar.training.build import (apply_timeout, learning_rate, load_data,
                                     load_in_groups, make_loaders, saved_group_state)
from layerpar.training.level import Level
from layerpar.training.report import (add_step, batch_len, controller_columns, epoch_sums,
                                      format_row, plot_metrics)
from layerpar.training.single import SingleLevel


class Trainer:
    """Collective over ``comm``: every rank constructs it and calls run().

    ``log(text)`` receives messages on rank 0 (None: silent); ``progress``
    (rank 0) is called as progress(epoch, step_in_epoch, steps_per_epoch,
    metrics, first) after each step.  ``should_stop()`` (given on every rank
    or on none) is asked after each step; when it is true on any rank, every
    rank stops after that same step, a checkpoint is written and run()
    returns a summary with ``stopped`` true.  ``metrics=False``: no metrics
    files (evaluation only).  The metrics rows go to ``metrics.h5`` and
    ``metrics.csv`` in ``run.dir``, and with ``run.tensorboard`` to
    TensorBoard event files in ``<run.dir>/tensorboard``
    (``layerpar.events``; a warning through ``log`` when the tensorboard
    package is not installed); with ``run.plot`` the curves to
    ``curves.png``, titled by ``title()``.

    ``grid``: a ``layerpar.grid.ProcessGrid`` over ``comm`` (default: one
    made from ``parallel.data``, freed by ``close()``).

    ``run.timeout`` (else $LAYERPAR_TIMEOUT) is set on ``comm`` and the
    grid's communicators (``layerpar.set_timeout``): a rank that does not
    answer within it makes every other rank raise
    ``braid_ext.MGRITTimeoutError`` (in a solve) or its subclass
    ``layerpar.SilentRankError`` naming it; the job should then end.

    ``method`` is the configured method's object (``SingleLevel``,
    ``NestedIteration`` or ``MGOpt``); ``level`` the network it trains now,
    ``levels`` every network it holds.
    """

    def __init__(self, config, comm, *, log=None, progress=None, should_stop=None,
                 metrics=True, grid=None):
        self.config = config
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.run_dir = config["run"]["dir"]
        if not self.run_dir:
            raise ValueError("run.dir = '': name the run's folder")
        self._own_grid = grid is None
        apply_timeout(config, comm, grid)  # a grid made below inherits it
        if grid is None:
            check_grid(config, self.size)  # a ConfigError naming parallel.data, everywhere
        # every rank holds a layer of every level (a ConfigError naming multilevel.levels)
        check_ranks(config, self.size // (grid.data if grid else config["parallel"]["data"]))
        if grid is None:
            grid = ProcessGrid(comm, data=config["parallel"]["data"])
        self.grid = grid
        self.log = log if self.rank == 0 else None
        self.progress = progress if self.rank == 0 else None
        # the place in this rank's group: the first needs inputs, the last labels
        self.first, self.last = grid.layer_rank == 0, grid.layer_rank == grid.layers - 1
        self.data = load_data(config, comm, first=self.first, last=self.last)
        self._sharded = grid if grid.data > 1 else None
        self.train_loader, self.val_loader = make_loaders(
            config, self.data, grid.layer_rank, grid.layers, grid=self._sharded)
        self.method = self._make_method()
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.should_stop = should_stop
        self.sums = epoch_sums(**self.method.sums)  # this epoch's steps so far (checkpointed)
        self.metrics = MetricsWriter(self.run_dir, comm) if metrics else None
        self.events = self._tensorboard() if metrics else None
        self._first_loss = None

    def _tensorboard(self):
        """Collective: the TensorBoard event writer of ``run.tensorboard``
        (None when it is off, or when the tensorboard package is missing,
        which one logged line says)."""
        if not self.config["run"]["tensorboard"]:
            return None
        events = TensorBoardEvents(os.path.join(self.run_dir, "tensorboard"), self.comm)
        if events.missing is None:
            return events
        if self.log:
            self.log(f"warning: run.tensorboard = true, but {events.missing.split(':')[0]}: "
                     "no TensorBoard event files are written (the metrics files are)")
        return None

    def title(self):
        """The run in words, for the plot's title: its folder's name, the
        data set, the mode and the grid."""
        name = os.path.basename(os.path.normpath(self.run_dir))
        mode = self.config["mgrit"]["mode"]
        if mode == "serial" and self.config["mgrit"]["microbatches"] > 1:
            mode = f"pipeline ({self.config['mgrit']['schedule']})"
        ranks = f"{self.size} rank{'s' * (self.size != 1)}"
        if self.grid.data > 1:
            ranks += f" ({self.grid.data} x {self.grid.layers} grid)"
        method = self.config["multilevel"]["method"]
        method = "" if method == "none" else f", {method}"
        return f"{name}: {self.config['data']['name']}, {mode}{method}, {ranks}"

    def _make_method(self):
        name = self.config["multilevel"]["method"]
        if name == "none":
            return SingleLevel(self.config, self._new_level)
        return METHODS[name](self.config, self._new_level, self.grid.layer_comm,
                             batches_per_epoch=len(self.train_loader), loader=self.train_loader)

    def _new_level(self, nlayers, *, reuse=False):
        """A network of ``nlayers`` layers (None: the configured depth) with
        its optimiser, on this group's layer ranks."""
        return Level(self.config, self.data, self.grid.layer_comm, nlayers=nlayers,
                     grid=self._sharded, reuse=reuse)

    @property
    def level(self):
        """The network being trained (MG/OPT: the finest)."""
        return self.method.level

    @property
    def levels(self):
        return self.method.levels

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
        group 0's layer ranks give the model (every level's networks) and
        the run's state and every group's layer ranks give that group's
        solver states (one-shot warm states and the residual monitor's
        counts, which belong to the group's share of the batches).  Every
        rank writes its own part file; every rank raises the same
        CheckpointError if the save fails."""
        ckpt.save_checkpoint(self.checkpoint_path(), self.comm, self._state())

    def _state(self):
        """This rank's part of the checkpoint (collective over the grid)."""
        m = self.method
        work = m.work_state()  # collective over the group
        head = {"num_layers": m.num_layers, "epoch": self.epoch, "step": self.step,
                "config": self.config}
        if self.grid.data > 1:
            # every group: its own solver states, under its group index
            groups = {"data_groups": self.grid.data,
                      "groups": {self.grid.data_rank: m.group_state()}}
        else:
            groups = {}
        if self.grid.data_rank != 0:
            return dict(head, extra=groups)  # no layers, no RNG state: group 0 gives them
        state = dict(head, **m.model_state(), rng=ckpt.rng_state())
        state["extra"] = dict(groups, batch_in_epoch=self.batch_in_epoch,
                              **{m.sums_key: dict(self.sums)},
                              **m.run_state(work, self.grid.data == 1))
        return state

    def checkpoint_path(self):
        return os.path.join(self.run_dir, "checkpoint.h5")

    def resume(self, path=None):
        """Load ``path``, or the run directory's checkpoint; False if there is
        none.  A damaged or mismatched checkpoint raises CheckpointError (the
        previous one, checkpoint.prev.h5, is left as it is).  Any number of
        ranks.  Collective."""
        if path is None:
            path = self.checkpoint_path()
            exists = on_root(self.comm, lambda: os.path.exists(path),
                             what="the checkpoint lookup on rank 0")
            if not exists:  # a save interrupted between its renames leaves only .prev
                path = ckpt.find_latest_checkpoint(self.run_dir, self.comm)
                if path is None:
                    return False
            else:
                path = self._usable_checkpoint(path)
        m = self.method
        keys = m.checkpoint_keys()

        def load(**kw):
            return load_in_groups(path, self.grid, self.comm, config=keys, defaults=DEFAULTS,
                                  **kw)
        try:
            st = m.load(path, load)
        except ckpt.CheckpointError as e:
            prev = ckpt.previous_path(path)
            hint = f" (the previous checkpoint {prev} is kept: resume from it with " \
                   f"--resume-from {prev})" if self._verifies(prev) else ""
            raise ckpt.CheckpointError(f"{e}{hint}") from None
        extra = st.get("extra") or {}
        m.restore(st, extra, saved_group_state(extra, self.grid))
        if st.get("rng"):
            ckpt.set_rng_state(st["rng"])
        self.epoch, self.step = st["epoch"], st["step"]
        self.batch_in_epoch = int(extra.get("batch_in_epoch", 0))
        self.sums = dict(epoch_sums(**m.sums), **extra.get(m.sums_key, {}))
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
        Collective: rank 0 looks, every rank gets its answer (or its error)."""
        def look():
            prev = ckpt.previous_path(path)
            try:
                ckpt.verify_checkpoint(path)
            except ckpt.CheckpointError as e:
                try:
                    ckpt.verify_checkpoint(prev)
                except ckpt.CheckpointError:
                    return None
                aside = f"{path}.damaged-{int(time.time())}"
                os.replace(path, aside)
                return (prev, f"{e}; resuming from the previous checkpoint {prev} "
                              f"(the damaged file is kept as {aside})")
            return None
        found = on_root(self.comm, look, what="the checkpoint check on rank 0")
        if found is None:
            return path
        if self.log:
            self.log(f"warning: {found[1]}")
        return found[0]

    def _stop_agreed(self):
        """Collective: does any rank's should_stop() say stop?"""
        if self.should_stop is None:
            return False
        return any_rank(self.comm, self.should_stop(), what="the agreement on stopping")

    # ---- the loop ------------------------------------------------------------
    def run(self):
        every = self.config["run"]["checkpoint_every"]
        m = self.method
        t_start = time.perf_counter()
        summary = None
        while True:
            change = m.advance()
            if change:  # the method moved to another network: a checkpoint of it
                if self.log:
                    self.log(change)
                self.save()
                continue
            if m.finished(self.epoch):
                break
            row = self._epoch(every)
            if row is None:  # stopped inside the epoch, after a checkpoint
                return self._stopped(t_start)
            summary = row
            m.end_epoch(row)
            stop = not m.finished(self.epoch) and self._stop_agreed()
            if every >= 0 or stop or m.finished(self.epoch):
                self.save()
            if stop:
                return self._stopped(t_start)
        if summary is None:  # nothing left to train: report the current state
            val_loss, val_acc = self.evaluate(self.val_loader)
            summary = {"epoch": self.epoch, "step": self.step, "val_loss": val_loss,
                       "val_acc": val_acc}
        summary["total_wall_time"] = time.perf_counter() - t_start
        if self.rank == 0 and self.metrics and self.config["run"]["plot"]:
            plot_metrics(self.metrics.rows(), os.path.join(self.run_dir, "curves.png"),
                         title=self.title())
        return summary

    def _epoch(self, every):
        """One epoch from ``batch_in_epoch`` on; its metrics row, or None when
        a stop was agreed inside it (after a checkpoint).  Collective."""
        r, m = self.config["run"], self.method
        lr = learning_rate(self.config, min(self.epoch, m.epochs - 1), epochs=m.epochs)
        for lev in m.levels:
            lev.set_lr(lr)
        steps_per_epoch = len(self.train_loader)
        t_epoch = time.perf_counter()
        acc = self.sums
        first = self.batch_in_epoch + 1
        for b, (x, y) in enumerate(self.train_loader.epoch(self.epoch)):
            if b < self.batch_in_epoch:
                continue  # done before the checkpoint this run resumed from
            size = batch_len(self.train_loader, b)
            s = m.step(x, y, size)
            add_step(acc, s, s.get("size", size))  # a method may count a batch later (RMTR)
            for k in m.sums:  # the method's own counts (MG/OPT: corrections accepted)
                acc[k] += s.get(k, 0)
            self.step += 1
            self.batch_in_epoch = b + 1
            if self._first_loss is None:
                self._first_loss = s["loss"]
            self._check_divergence(s["loss"])
            if s.get("change") and self.log:
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
                    return None
                if every > 0 and self.step % every == 0:
                    self.save()
        return self._finish_epoch(acc, t_epoch)

    def _finish_epoch(self, acc, t_epoch):
        """The epoch's metrics row (validation included), written; the
        counters move to the next epoch.  Collective."""
        m = self.method
        val_loss, val_acc = self.evaluate(self.val_loader)
        n = max(acc["steps"], 1)
        row = {"epoch": self.epoch + 1, "step": self.step, **m.head_columns(),
               "train_loss": acc["loss"] / max(acc["size"], 1),
               "train_acc": acc["correct"] / max(acc["size"], 1),
               "val_loss": val_loss, "val_acc": val_acc,
               "fwd_iters": acc["fwd_iters"] / n, "bwd_iters": acc["bwd_iters"] / n,
               "fwd_residual": acc["fwd_res"] / n, "bwd_residual": acc["bwd_res"] / n,
               "lr": self.optimizer.param_groups[0]["lr"],
               "wall_time": time.perf_counter() - t_epoch,
               "virtual_time": acc["vtime"], **m.tail_columns(acc)}
        if m.level.controller is not None:  # the network trained now: the finest
            row.update(controller_columns(acc, m.level.controller))
        if self.metrics:
            self._rank0_file_work(self.metrics.append, row)
        if self.events:
            self._rank0_file_work(self.events.append, row)
        self.epoch += 1
        self.batch_in_epoch = 0
        self.sums = epoch_sums(**m.sums)
        if self.log:
            self.log(format_row(row) + m.describe(row))
        return row

    def _stopped(self, t_start):
        return {"stopped": True, "epoch": self.epoch, "step": self.step,
                "total_wall_time": time.perf_counter() - t_start}

    def close(self):
        """Collective: free the networks' solvers, the method's communicators
        and the grid's (the trainer is not used again)."""
        self.method.close()
        if self.events:
            self.events.close()
        if self._own_grid:
            self.grid.close()

    def write_config(self):
        def write():
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.toml"), "w") as fh:
                fh.write(to_toml(self.config))
        self._rank0_file_work(write)

    def _rank0_file_work(self, fn, *args):
        """Collective: fn(*args) on rank 0; an exception there (an OSError of
        a full disk, with its errno) is raised on every rank."""
        on_root(self.comm, lambda: fn(*args), what="the file work on rank 0")


def make_trainer(config, comm, **kw):
    """The trainer for a configuration (any ``multilevel.method``): a
    ``Trainer``; the keywords are its own."""
    return Trainer(config, comm, **kw)


DIVERGED = 100.0  # a loss this many times chance level (or the first loss) has diverged
