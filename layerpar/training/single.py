"""Single-level training as a method of ``Trainer``: one network, one
optimiser step per batch (the interface is ``layerpar.multilevel.method``'s).

Its checkpoint layout is the plain one of ``layerpar.checkpoint``: the
layers under their global index, the opening and closing parameters under
their names, the optimiser state alongside, and in ``extra`` the random-draw
counter (``passes``), the residual monitor's counts, the work totals and the
one-shot warm states.
"""
import torch

from layerpar import checkpoint as ckpt


class SingleLevel:
    """The trivial method: ``new_level(None, reuse=False)`` is the
    configured network, trained for ``optim.epochs``."""

    name = "none"
    sums = {}  # no epoch counters of its own
    sums_key = "epoch_sums"  # the name of the epoch's sums in a checkpoint

    def __init__(self, config, new_level):
        self.config = config
        self.levels = [new_level(None, reuse=False)]
        self.epochs = config["optim"]["epochs"]

    @property
    def level(self):
        return self.levels[0]

    def close(self):
        self.level.close()

    def finished(self, epoch):
        return epoch >= self.epochs

    def advance(self):
        return None

    def step(self, x, y, size):
        return self.level.step(x, y, size)

    def end_epoch(self, row):
        pass

    # ---- metrics ---------------------------------------------------------------------
    def head_columns(self):
        return {}

    def tail_columns(self, sums):
        """Collective: the work columns."""
        return {f"{k}_work": v for k, v in self.level.work_totals().items()}

    def describe(self, row):
        return ""

    # ---- checkpoints -----------------------------------------------------------------
    def checkpoint_keys(self):
        c = self.config
        return {"model": c["model"], "data": {k: c["data"][k] for k in ("name", "dtype", "seed")}}

    @property
    def num_layers(self):
        return self.level.body.nlayers

    def work_state(self):
        return self.level.work_totals()  # collective over the group

    def group_state(self):
        """This group's solver states: {"warm": ..., "monitor": ...}."""
        monitor = self.level.monitor
        return {"warm": self.level.warm_state(), "monitor": monitor.state() if monitor else {}}

    def model_state(self):
        params = self.level.params()
        return {"layers": {n: {k: v.detach() for k, v in d.items()}
                           for n, d in params["layers"].items()},
                "opening": {k: v.detach() for k, v in params["opening"].items()},
                "closing": {k: v.detach() for k, v in params["closing"].items()},
                "optimizer": ckpt.optimizer_state(self.level.optimizer, params)}

    def run_state(self, work, one_group):
        monitor = self.level.monitor
        return {"passes": self.level.body.passes,
                "monitor": monitor.state() if monitor else {},
                "work": work,
                # on a grid of several groups the warm states are in "groups"
                "warm": self.level.warm_state() if one_group else {}}

    def load(self, path, load):
        body = self.level.body
        return load(layer_indices=body.layer_indices, num_layers=body.nlayers)

    def restore(self, st, extra, mine):
        lev = self.level
        params = lev.params()
        with torch.no_grad():
            for group in ("opening", "closing"):
                for k, p in params[group].items():
                    p.copy_(st[group][k])
            for n, d in params["layers"].items():
                for k, p in d.items():
                    p.copy_(st["layers"][n][k])
        ckpt.restore_optimizer_state(lev.optimizer, params, st["optimizer"])
        lev.body.passes = extra.get("passes", 0)  # keys the layers' random draws
        monitor, warm = mine.get("monitor") or extra.get("monitor"), mine.get("warm")
        if lev.monitor and monitor:
            lev.monitor.restore(monitor, lev.body)
        if warm:
            lev.restore_warm_state(warm)
        # work counters: the saved totals, held by the first rank (so that the
        # totals over the ranks continue on any rank count)
        saved, totals = extra.get("work"), {"fwd": 0, "bwd": 0}
        if saved:
            totals = {k: int(saved.get(k, 0)) for k in totals}
        lev.work = totals if lev.first else {"fwd": 0, "bwd": 0}
