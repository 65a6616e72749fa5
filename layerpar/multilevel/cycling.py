"""What the cycling methods (MG/OPT and RMTR) share: their networks, finest
first, and where the cycles start (``multilevel.start``).

  "fine"    every depth's network from the start; every batch a cycle over
            all of them, from the finest network's initial weights
  "nested"  nested iteration reaches the finest depth, then cycles: the
            coarsest depth N_0 trains alone with optimiser steps; at each
            depth change (its epoch budget spent, or its
            ``target_accuracy`` reached, as in ``NestedIteration``) the
            trained network is prolonged in layer-time to a new, r times
            deeper network (its optimiser state moved with it) and stays
            below it as a coarse level; every depth but the finest trains
            with plain optimiser steps, as in nested iteration, and on the
            finest every batch is a cycle over all the depths, finest first.
            The epoch budgets are ``epochs_per_level``'s and the
            learning-rate schedule runs over their sum.
  "full-multigrid"  the same, with cycles from the second depth on: every
            batch of a depth after the first is a cycle over the depths
            built so far.

A subclass gives ``name`` and ``cycle_step(x, y, size)``: one cycle over
``levels`` (finest first), returning the statistics of ``Level.step`` with
its counters (``corrections``, ``accepted``).  Before the cycles start (a
single network) a step is the network's optimiser step.
"""
from layerpar.multilevel.method import MultilevelMethod
from layerpar.multilevel.nested import epoch_budgets


class CyclingMethod(MultilevelMethod):
    """Collective over ``comm`` (this group's layer ranks)."""

    def __init__(self, config, new_level, comm, *, batches_per_epoch, **_):
        super().__init__(config, new_level, comm)
        ml = config["multilevel"]
        self.start = ml["start"]
        self.batches_per_epoch = batches_per_epoch
        self.target = ml["target_accuracy"]
        depths = self.hierarchy.depths
        # the first depth (index) whose batches are cycles
        self.cycles_from = {"fine": 0, "nested": len(depths) - 1, "full-multigrid": 1}[self.start]
        if self.start == "fine":
            self.levels = [self.new_level(n) for n in depths[::-1]]
            self.depth = len(depths) - 1
            self.budgets = None
            self.epochs = config["optim"]["epochs"]
        else:
            self.levels = [self.new_level(depths[0])]
            self.depth = 0
            self.budgets = epoch_budgets(config)
            self.epochs = sum(self.budgets)
        self.depth_epoch, self.depth_done = 0, False

    @property
    def level_index(self):
        # MG/OPT's rows say 0 (the finest level); full multigrid's the depth,
        # as nested iteration's
        return 0 if self.start == "fine" else self.depth

    # ---- the schedule of depths (full multigrid) ----------------------------------------
    def _last_depth(self):
        return self.depth == len(self.hierarchy.depths) - 1

    def _depth_over(self):
        return self.depth_done or self.depth_epoch >= self.budgets[self.depth]

    def finished(self, epoch):
        if self.start == "fine":
            return epoch >= self.epochs
        return self._last_depth() and self._depth_over()

    def advance(self):
        """Full multigrid: a new finest depth when the current one is over
        (and is not the last); what was done, in words, or None."""
        if self.start == "fine" or self._last_depth() or not self._depth_over():
            return None
        return self.refine()

    def end_epoch(self, row):
        if self.start == "fine":
            return
        self.depth_epoch += 1
        if not self._last_depth() and self.target > 0 and row["val_acc"] >= self.target:
            self.depth_done = True

    def refine(self):
        """Prolong the finest network and its optimiser state to a new
        network of the next depth, which becomes the finest level; the old
        one stays as its coarse level.  Collective."""
        old = self.level
        new = self.new_level(self.hierarchy.depths[self.depth + 1])
        self.hierarchy.prolong_level(old, new)
        self.hierarchy.move_optimizer_state(old, new)
        self.levels.insert(0, new)
        self.depth += 1
        self.depth_epoch, self.depth_done = 0, False
        self.refined(new)
        return (f"full multigrid: {old.nlayers} -> {new.nlayers} layers "
                f"({self.hierarchy.prolong_kind} prolongation), cycles over "
                f"{len(self.levels)} levels")

    def refined(self, new):
        """A subclass's part of a refinement (``new``: the new finest level)."""

    # ---- steps --------------------------------------------------------------------------
    @property
    def cycling(self):
        """Whether this depth's batches are cycles (else plain steps)."""
        return self.depth >= self.cycles_from

    def step(self, x, y, size):
        if not self.cycling:  # nested iteration's depths
            s = self.level.step(x, y, size)
            self.cycle += 1
            return dict(s, corrections=0, accepted=False)
        return self.cycle_step(x, y, size)

    def cycle_step(self, x, y, size):
        raise NotImplementedError

    # ---- checkpoints -----------------------------------------------------------------
    def checkpoint_keys(self):
        keys = super().checkpoint_keys()
        if self.start != "fine":
            keys["multilevel"]["start"] = self.start
        return keys

    def _position(self):
        return self.depth, self.depth_epoch, self.depth_done

    def _before_load(self, extra):
        if self.start == "fine":
            return
        depth = int(extra["depth"])
        if depth != self.depth:
            for lev in self.levels:
                lev.close()
            self.levels = [self.new_level(n) for n in self.hierarchy.depths[:depth + 1][::-1]]
            self.depth = depth

    def _restore_position(self, extra):
        if self.start == "fine":
            return
        self.depth_epoch = int(extra["depth_epoch"])
        self.depth_done = bool(extra["depth_done"])
