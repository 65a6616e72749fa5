"""What the multilevel methods share: their levels and hierarchy, their
metrics columns, and the checkpoint layout of a run with several networks.

A *method* is what ``layerpar.training.Trainer`` drives, epoch by epoch and
batch by batch (the interface, in the order the trainer calls it)::

    levels, level       every network the method holds; the one trained now
    epochs              the length of the learning-rate schedule
    advance()           between epochs: move to another network when the
                        method's schedule says so (a message), else None
    finished(epoch)     training is over
    step(x, y, size)    one step on a batch: statistics as ``Level.step``'s,
                        and counts of the method's own epoch sums (``sums``)
    end_epoch(row)      after each epoch's metrics row
    head_columns(), tail_columns(sums), describe(row)   the metrics row
    checkpoint_keys(), num_layers, work_state(), group_state(), model_state(),
    run_state(work, one_group), load(path, load), restore(st, extra, mine)
                        the method's part of a checkpoint
    close()

Checkpoints of a multilevel run hold every level in one file: level l's
layers are stored under global index offset_l + n (offset_l = the layers of
the levels before it), its opening and closing parameters under
``level<l>.<name>``, its optimiser state alongside, and the method's
counters in ``extra``; so a run resumes on any number of ranks.
"""
import torch

from layerpar import checkpoint as ckpt
from layerpar.multilevel.hierarchy import Hierarchy, depths


class MultilevelMethod:
    """The part of ``NestedIteration`` and ``MGOpt`` that is the same:
    ``new_level(nlayers, reuse=...)`` builds a network of a depth (with its
    optimiser) on ``comm``, this group's layer ranks."""

    name = None  # "nested" or "mgopt", as in multilevel.method
    sums = {"accepted": 0, "corrections": 0}  # this method's epoch counters
    sums_key = "acc"  # their name in a checkpoint

    def __init__(self, config, new_level, comm):
        ml = config["multilevel"]
        self.config = config
        self.hierarchy = Hierarchy(comm, depths(config), prolong=ml["prolong"],
                                   restrict=ml["restrict"])
        self._reuse = ml["reuse"]
        self._make_level = new_level
        self.levels = []
        self.cycle = 0  # steps (cycles) taken
        # per depth (coarsest first): cumulative work of levels no longer built
        self.done_work = [{"fwd": 0, "bwd": 0} for _ in self.hierarchy.depths]

    def new_level(self, nlayers):
        """A network of ``nlayers`` layers on this group's layer ranks."""
        return self._make_level(nlayers, reuse=self._reuse)

    @property
    def level(self):
        """The network being trained: the current depth, or MG/OPT's finest."""
        return self.levels[0]

    def close(self):
        """Collective: free the networks' solvers and the hierarchy's
        communicator."""
        for lev in self.levels:
            lev.close()
        self.hierarchy.close()

    # ---- metrics ---------------------------------------------------------------------
    level_index = 0  # the metrics' "level": the depth index of the trained network

    def head_columns(self):
        return {"cycle": self.cycle, "level": self.level_index, "nlayers": self.level.nlayers}

    def tail_columns(self, sums):
        """Collective: the acceptance rate of coarse corrections and the work
        columns."""
        return {"accepted": sums["accepted"] / max(sums["corrections"], 1),
                **self.work_columns()}

    def work_columns(self):
        """Cumulative work, total and per depth (``fwd_work_l<j>``, j = 0
        the coarsest).  Collective."""
        per = [dict(w) for w in self.done_work]
        for lev in self.levels:
            j = self.hierarchy.depths.index(lev.nlayers)
            cur = lev.work_totals()
            per[j] = {k: per[j][k] + cur[k] for k in cur}
        cols = {"fwd_work": sum(w["fwd"] for w in per), "bwd_work": sum(w["bwd"] for w in per)}
        for j, w in enumerate(per):
            cols[f"fwd_work_l{j}"] = w["fwd"]
            cols[f"bwd_work_l{j}"] = w["bwd"]
        return cols

    def describe(self, row):
        """What the epoch's log line adds to the row."""
        return f"  N={row['nlayers']}  work {row['fwd_work']:.0f}/{row['bwd_work']:.0f}"

    # ---- checkpoints -----------------------------------------------------------------
    def _position(self):
        """(depth, depth_epoch, depth_done) in nested iteration's schedule."""
        return 0, 0, False

    def _restore_position(self, extra):
        pass

    def _before_load(self, extra):
        """Rebuild the levels the checkpoint holds (nested iteration: its
        depth), before their layers are read."""

    def checkpoint_keys(self):
        """The configuration a checkpoint must share with this run."""
        c, ml = self.config, self.config["multilevel"]
        return {"model": c["model"],
                "multilevel": {k: ml[k] for k in ("method", "levels", "factor")},
                "data": {k: c["data"][k] for k in ("name", "dtype", "seed")},
                "optim": {"name": c["optim"]["name"]}}

    def _offsets(self):
        out, off = [], 0
        for lev in self.levels:
            out.append(off)
            off += lev.nlayers
        return out, off

    @property
    def num_layers(self):
        return self._offsets()[1]

    def work_state(self):
        """Every level's work totals (collective over the group)."""
        return [lev.work_totals() for lev in self.levels]

    def group_state(self):
        """This group's solver states: every level's warm states and
        residual monitor counts."""
        return {"warm": {i: lev.warm_state() for i, lev in enumerate(self.levels)},
                "monitors": [lev.monitor.state() if lev.monitor else {} for lev in self.levels]}

    def model_state(self):
        """Every level's weights and optimiser state, in one checkpoint's
        sections."""
        state = {"layers": {}, "opening": {}, "closing": {},
                 "optimizer": {"layers": {}, "opening": {}, "closing": {}, "hyper": {}}}
        for i, (lev, off) in enumerate(zip(self.levels, self._offsets()[0])):
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
        return state

    def run_state(self, work, one_group):
        """The method's counters for ``extra`` (``work``: ``work_state()``;
        ``one_group``: the warm states go here, not in the groups' part)."""
        depth, depth_epoch, depth_done = self._position()
        return {"method": self.name, "nlayers": [lev.nlayers for lev in self.levels],
                "cycle": self.cycle, "depth": depth, "depth_epoch": depth_epoch,
                "depth_done": depth_done, "done_work": [dict(w) for w in self.done_work],
                "work": work,
                "monitors": [lev.monitor.state() if lev.monitor else {} for lev in self.levels],
                "passes": [lev.body.passes for lev in self.levels],
                "warm": self.group_state()["warm"] if one_group else {}}

    def load(self, path, load):
        """The checkpoint's state for this rank's layers of every level
        (``load(**kw)``: ``load_checkpoint`` of ``path`` in every group).
        Collective."""
        header = load(layer_indices=[])
        extra = header.get("extra") or {}
        if extra.get("method") != self.name:
            raise ckpt.CheckpointError(f"checkpoint {path} is not of a {self.name} run")
        self._before_load(extra)
        offsets, total = self._offsets()
        wanted = [off + n for lev, off in zip(self.levels, offsets)
                  for n in lev.body.layer_indices]
        return load(layer_indices=wanted, num_layers=total)

    def restore(self, st, extra, mine):
        """Every level's weights, optimiser state, work counters, monitor,
        random-draw counter and warm states from a loaded checkpoint
        (``mine``: this group's saved solver states)."""
        sopt = st["optimizer"]
        for i, (lev, off) in enumerate(zip(self.levels, self._offsets()[0])):
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
            lev.work = dict(extra["work"][i]) if lev.first else {"fwd": 0, "bwd": 0}
            mon = (mine.get("monitors") or extra["monitors"])[i]
            if lev.monitor and mon:
                lev.monitor.restore(mon, lev.body)
            if "passes" in extra:  # keys the layers' random draws
                lev.body.passes = int(extra["passes"][i])
            warm = (mine.get("warm") or {}).get(i)
            if warm:
                lev.restore_warm_state(warm)
        self.cycle = int(extra["cycle"])
        self.done_work = [dict(w) for w in extra["done_work"]]
        self._restore_position(extra)
