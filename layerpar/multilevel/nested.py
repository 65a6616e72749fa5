"""Nested iteration (``multilevel.method = "nested"``).

The depth schedule is N_0 = N / r^(L-1), r*N_0, ..., N (L =
``multilevel.levels``, r = ``multilevel.factor``).  Each depth trains for
its epoch budget (``epochs_per_level``), or until the validation accuracy
reaches ``target_accuracy`` (the last depth always uses its whole budget),
and is then prolonged to the next depth in layer-time (T fixed, so h shrinks
by r; ``prolong`` constant or linear).  The optimiser state moves with its
parameters (``Hierarchy.move_optimizer_state``: gradient-like state divided
by r, Adam's second moments by r^2, step counters copied; L-BFGS starts a
fresh history at each depth).  The deeper network's MGRIT solvers start
cold: their hierarchy is not warm-started from the shallower network's
states.  The learning-rate schedule runs over the sum of the epoch budgets.
"""
from layerpar.multilevel.method import MultilevelMethod


def epoch_budgets(config):
    """Epochs at each depth of nested iteration, coarsest first."""
    ml = config["multilevel"]
    e = ml["epochs_per_level"] or [config["optim"]["epochs"]]
    return list(e) * ml["levels"] if len(e) == 1 else list(e)


class NestedIteration(MultilevelMethod):
    """Collective over ``comm`` (this group's layer ranks): one network at a
    time, the current depth's (``level``), refined by ``advance()`` between
    epochs when its budget is spent or its target reached."""

    name = "nested"

    def __init__(self, config, new_level, comm, **_):
        super().__init__(config, new_level, comm)
        self.budgets = epoch_budgets(config)
        self.epochs = sum(self.budgets)
        self.target = config["multilevel"]["target_accuracy"]
        self.depth, self.depth_epoch, self.depth_done = 0, 0, False
        self.levels = [self.new_level(self.hierarchy.depths[0])]

    @property
    def level_index(self):
        return self.depth

    def _last_depth(self):
        return self.depth == len(self.hierarchy.depths) - 1

    def _depth_over(self):
        return self.depth_done or self.depth_epoch >= self.budgets[self.depth]

    def finished(self, epoch):
        return self._last_depth() and self._depth_over()

    def advance(self):
        """Refine when the current depth is over (and is not the last)."""
        if self._last_depth() or not self._depth_over():
            return None
        return self.refine()

    def step(self, x, y, size):
        s = self.level.step(x, y, size)
        self.cycle += 1
        return s

    def end_epoch(self, row):
        self.depth_epoch += 1
        if not self._last_depth() and self.target > 0 and row["val_acc"] >= self.target:
            self.depth_done = True

    def refine(self):
        """Prolong the current depth's network and optimiser state to the
        next depth (collective); what was done, in words."""
        old = self.level
        new = self.new_level(self.hierarchy.depths[self.depth + 1])
        # the residual layers' weights, prolonged in layer-time; the opening
        # and closing layers stay where they are, unchanged
        self.hierarchy.prolong_level(old, new)
        self.hierarchy.move_optimizer_state(old, new)
        tot = old.work_totals()
        self.done_work[self.depth] = {k: self.done_work[self.depth][k] + tot[k] for k in tot}
        old.close()
        self.levels = [new]
        self.depth += 1
        self.depth_epoch, self.depth_done = 0, False
        return (f"nested iteration: {old.nlayers} -> {new.nlayers} layers "
                f"({self.hierarchy.prolong_kind} prolongation)")

    # ---- checkpoints -----------------------------------------------------------------
    def _position(self):
        return self.depth, self.depth_epoch, self.depth_done

    def _before_load(self, extra):
        self.depth = int(extra["depth"])
        if self.levels[0].nlayers != self.hierarchy.depths[self.depth]:
            self.levels[0].close()
            self.levels = [self.new_level(self.hierarchy.depths[self.depth])]

    def _restore_position(self, extra):
        self.depth_epoch = int(extra["depth_epoch"])
        self.depth_done = bool(extra["depth_done"])
