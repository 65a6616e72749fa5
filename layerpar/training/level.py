"""One network of a training run, with what an outer method needs to drive
it: its optimiser, residual monitor and work counters.

    level = Level(config, data, comm, nlayers=16)
    stats = level.step(x, y, size)           # one optimiser step on a batch
    value = level.loss_and_grad(x, y)        # objective and .grad at the current weights
    value = level.loss(x, y)                 # objective only (forward solve only)
    val_loss, val_acc = level.evaluate(loader)

The objective is the mean cross-entropy plus the configured penalties,
minus ``<v, x>`` when a linear term ``v`` is set (``set_linear_term``), as in
the coarse problems of MG/OPT.  Values are the last rank's, on every rank.

Work: every forward and adjoint solve of a training or line-search
evaluation adds the layer steps it took on this rank, on every MGRIT grid
level (the solver's step counts), to ``work["fwd"]`` / ``work["bwd"]``.  A
layer step costs the same on networks of any depth (same width, same
module), so one step is one fine-layer-equivalent step evaluation; an exact
forward pass of a network of N layers costs N.  Validation passes are not
counted.  ``work_totals()`` sums the counters over the ranks.

Reuse (``reuse=True``, where it is exact): the last two evaluations of the
objective and its gradient are kept, and a later request at the same weights (equal
values on every rank), on the same batch (equal values) and with the same
linear term returns it instead of solving again, uncounted.  Exact only
when an evaluation is a function of the weights and the batch alone, so it
is switched off when the solves are warm-started (one-shot), when a layer
draws random numbers (dropout) and when the network has buffers (running
statistics that every forward pass updates); ``reusing`` says whether it is
on.  Whether a request hits is agreed over every rank (of the grid).

On a process grid (``grid``: a ``layerpar.grid.ProcessGrid``; ``comm`` is
then ``grid.layer_comm``) the batches given are this group's shares of the
global batches, and ``size`` the global batch's size: the loss of each group
is its share's mean, the gradients are averaged over the data axis weighted
by the shares (before the penalties and the linear term, which every group
adds alike), and the values returned (objective, correct count) are those of
the global batch, the same on every rank of the grid.  A group whose share
is empty runs no solve and contributes nothing.  The work counters and the
solves' statistics are this group's.
"""
import json
import math

import torch
import torch.nn.functional as Fn

from layerpar._watchdog import guard
from layerpar.config import FULL_BATCH_OPTIMIZERS
from layerpar.engine.policy import is_stochastic
from layerpar.optim import regularize
from layerpar.training.build import build_network, make_monitor, make_optimizer
from layerpar.training.report import batch_len


KEPT = 2  # evaluations kept for reuse: e.g. MG/OPT's at x_h and at its first trial point


class Level:
    """Collective over ``comm``: every rank builds the same levels and calls
    the same methods in the same order."""

    def __init__(self, config, data, comm, *, nlayers=None, grid=None, reuse=False):
        self.config = config
        self.comm = comm
        if grid is not None and grid.data == 1:
            grid = None  # one group: nothing to share or average
        self.grid = grid
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.first, self.last = self.rank == 0, self.rank == self.size - 1
        self.net = build_network(config, data.input_shape, data.num_classes, comm,
                                 nlayers=nlayers)
        self.body = self.net.body
        self.nlayers = self.body.nlayers
        self.optimizer = make_optimizer(config, self.net)
        self.monitor = make_monitor(config)
        # the gradient-accuracy controller (layerpar.training.controller), or None
        self.controller = self.monitor.controller if self.monitor else None
        # L-BFGS and L-SR1 evaluate through a closure, where they need to
        self.closure_driven = config["optim"]["name"] in FULL_BATCH_OPTIMIZERS
        self.work = {"fwd": 0, "bwd": 0}
        self._linear = None  # {parameter: tensor v}: the objective gets -<v, x>
        self.reusing = bool(reuse) and not (self.body.fwd_options["warm_start"]
                                            or is_stochastic(self.net)
                                            or any(True for _ in self.net.buffers()))
        self._memo = []  # the last KEPT evaluations with their gradients, newest first
        self._reused = False  # did the last evaluation come from the memo
        self._point_stats = None  # (loss, correct) at the weights a closure-driven step left

    # ---- the objective ---------------------------------------------------------
    def set_linear_term(self, v):
        """``v``: {parameter of this rank: tensor of its shape}, or None.
        The objective becomes f(x) - <v, x> (collective in its evaluation)."""
        self._linear = v

    def _linear_value(self):
        if not self._linear:
            local = 0.0
        else:
            local = float(sum(torch.sum(v * p.detach()) for p, v in self._linear.items()))
        guard(self.comm, "the sum of the linear term")
        return self.comm.allreduce(local)

    def forward_loss(self, x, y, size=None):
        """(loss tensor for backward, loss value, correct count), the values
        from the last rank on every rank.  Counts the forward solve.  On a
        grid (``size``: the global batch's size) the values are those of the
        global batch, the loss tensor this group's (None for an empty share)."""
        if self.grid is not None:
            return self._grid_forward_loss(x, y, size)
        return self._share_forward_loss(x, y)

    def _grid_forward_loss(self, x, y, size):
        if size is None:
            raise ValueError("on a process grid the global batch size must be given")
        n = self.grid.share_size(size)
        if n > 0:
            loss, value, correct = self._share_forward_loss(x, y)
        else:  # no rows here: no solve (the pass is still counted for the random draws)
            self.body.passes += 1
            loss, value, correct = None, 0.0, 0
        value, correct = self.grid.sum_values([self.grid.weight(size) * value, correct])
        return loss, value, int(correct)

    def _share_forward_loss(self, x, y):
        out = self.net(x)
        self.work["fwd"] += sum(self.body.last_forward["steps"])
        loss = Fn.cross_entropy(out, y) if self.last else out.sum() * 0.0
        return (loss,) + self._values(loss, out, y)

    def _values(self, loss, out, y):
        """(loss value, correct count) from the last rank, on every rank."""
        if self.last:
            value, correct = float(loss.detach()), int((out.argmax(1) == y).sum())
        else:
            value, correct = 0.0, 0
        guard(self.comm, "the loss and accuracy from the last rank")
        return self.comm.bcast((value, correct), root=self.size - 1)

    def _penalty(self, add_grad):
        o = self.config["optim"]
        if o["tikhonov"] == 0 and o["smoothness"] == 0:
            return 0.0
        return regularize(self.net, tikhonov=o["tikhonov"], smoothness=o["smoothness"],
                          ends=o["tikhonov_ends"], add_grad=add_grad)

    # ---- reuse of an evaluation ------------------------------------------------------
    def _memo_hit(self, x, y, size):
        """Collective: the kept evaluation at the current weights, on this
        batch, with this linear term, on every rank (of the grid), or None."""
        if not self.reusing:
            return None
        params = [p.detach() for p in self.net.parameters()]
        here = [m["size"] == size and m["linear"] is self._linear and _same(x, m["x"])
                and _same(y, m["y"])
                and all(torch.equal(p, w) for p, w in zip(params, m["weights"]))
                for m in self._memo]
        # every rank -> every rank of the grid: which kept evaluations match
        # its part; a hit is one that matches on all ranks (every rank keeps
        # the same evaluations in the same order)
        comm = self.grid.comm if self.grid is not None else self.comm
        guard(comm, "the match of kept evaluations")
        everywhere = [all(col) for col in zip(*comm.allgather(here))]
        return self._memo[everywhere.index(True)] if any(everywhere) else None

    def _keep(self, x, y, size, value, correct):
        if self.reusing:
            params = list(self.net.parameters())
            m = {"x": x, "y": y, "size": size, "linear": self._linear,
                 "weights": [p.detach().clone() for p in params],
                 "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
                 "value": value, "correct": correct}
            self._memo = [m] + self._memo[:KEPT - 1]

    def _evaluate_with_grad(self, x, y, size=None):
        """Objective value and correct count; the objective's gradient in .grad."""
        m = self._memo_hit(x, y, size)
        self._reused = m is not None
        if self._reused:
            for p, g in zip(self.net.parameters(), m["grads"]):
                p.grad = None if g is None else g.clone()
            return m["value"], m["correct"]
        value, correct = self._solve_with_grad(x, y, size)
        self._keep(x, y, size, value, correct)
        return value, correct

    def _solve_with_grad(self, x, y, size=None):
        self.optimizer.zero_grad()
        if self.grid is not None and size is None:
            raise ValueError("on a process grid the global batch size must be given")
        reducer = None
        if self.grid is not None:  # the gradient sums start while backward runs
            reducer = self._reducer()
            reducer.start(self.grid.weight(size))
        if self.grid is None or self.grid.share_size(size) > 0:
            # forward and backward together (the pipeline's 1F1B schedule
            # interleaves them); otherwise loss.backward() after the forward pass
            loss, out = self.net.loss_and_backward(x, y, Fn.cross_entropy)
            self.work["fwd"] += sum(self.body.last_forward["steps"])
            self.work["bwd"] += sum(self.body.last_backward["steps"])
            value, correct = self._values(loss, out, y)
        else:  # no rows here: no solve (the pass is still counted for the random draws)
            self.body.passes += 1
            value, correct = 0.0, 0
        if self.grid is not None:
            value, correct = self.grid.sum_values([self.grid.weight(size) * value, correct])
            correct = int(correct)
            reducer.finish()  # the same sums, bitwise, as grid.average_gradients
        value += self._penalty(add_grad=True)
        if self._linear:
            for p, v in self._linear.items():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.sub_(v)
            value -= self._linear_value()
        return value, correct

    def _reducer(self):
        """The data-parallel ``GradientReducer`` of the network's parameters,
        kept from pass to pass and made again when they change."""
        params = [p for p in self.net.parameters() if p.requires_grad]
        key = tuple(id(p) for p in params)
        kept = getattr(self, "_kept_reducer", None)
        if kept is not None and kept[0] == key:
            return kept[1]
        if kept is not None:
            kept[1].close()
        self._kept_reducer = (key, self.grid.reducer(params))
        return self._kept_reducer[1]

    def loss_and_grad(self, x, y, size=None):
        """The objective at the current weights; its gradient in the
        parameters' ``.grad``.  Collective (``size``: on a grid, the global
        batch's size)."""
        return self._evaluate_with_grad(x, y, size)[0]

    def loss(self, x, y, size=None):
        """The objective at the current weights (a forward solve only, or
        the kept evaluation's value where reuse applies).  Collective."""
        m = self._memo_hit(x, y, size)
        if m is not None:
            return m["value"]
        with torch.no_grad():
            _, value, _ = self.forward_loss(x, y, size)
            value += self._penalty(add_grad=False)
            if self._linear:
                value -= self._linear_value()
        return value

    # ---- optimiser steps -----------------------------------------------------------
    def step(self, x, y, size):
        """One optimiser step on the batch (x, y) of ``size`` samples; then the
        residual monitor looks at the solves and, on its schedule, the
        gradient-accuracy controller compares the step's gradient with the
        exact one.  Returns the step's statistics (the objective before the
        step, the correct count, MGRIT iterations and residuals, virtual
        time, ``exact``: whether the step's propagation was exact, the
        controller's measurement ``grad_error``, ``grad_cosine`` and
        ``check_work`` (NaN, NaN, 0 when it did not measure), ``grad_acted``
        (1 when it raised the accuracy), and ``change``: what the monitor
        or the controller did)."""
        stats = {}
        solves = dict(fwd_iters=0, bwd_iters=0, vtime=0.0, solved=0)
        ctl = self.controller
        exact = self.body.pipelined
        # the exact gradient at the weights of the step, before the step
        reference = self.exact_gradient(x, y, size) if ctl and ctl.due(self.body) else None
        measured = {}

        evaluations = []  # (loss, correct) of each evaluation of the step

        def closure():
            value, correct = self._evaluate_with_grad(x, y, size)
            first = not stats
            stats.update(loss=value, correct=correct)
            evaluations.append(dict(stats))
            if reference is not None and first:  # the step's gradient at the step's weights
                vtime = 0.0 if self._reused else \
                    self.body.last_forward["virtual_time"] + self.body.last_backward["virtual_time"]
                measured.update(ctl.measure(self.comm, self._grads(), reference["grads"],
                                            reference["work"], (vtime, reference["vtime"])))
            if self._reused:  # no solve ran: nothing to count or monitor
                return value
            solves["solved"] += 1
            # every solve of the step counts (L-BFGS evaluates several times)
            f, b = self.body.last_forward, self.body.last_backward
            solves["fwd_iters"] += f["iterations"]
            solves["bwd_iters"] += b["iterations"]
            solves["vtime"] += f["virtual_time"] + b["virtual_time"]
            return value

        if self.closure_driven:
            self.optimizer.step(closure)
            if not stats:  # the step reused the last evaluation and took no trial
                closure()
            # the statistics of the point the step ends at: L-SR1 may have
            # rejected its last trial (L-BFGS ends at its last evaluation)
            at = getattr(self.optimizer, "last_step", {}).get("point_evaluation", -1)
            if at is not None and at >= 0:
                stats.update(evaluations[at])
            elif at is None and self.optimizer.last_step["evaluations"] and self._point_stats:
                stats.update(self._point_stats)  # evaluated by the step before
            self._point_stats = dict(stats)
        else:
            closure()
            self.optimizer.step()
        f, b = self.body.last_forward, self.body.last_backward
        change = None
        if self.monitor and self.monitor.watch and solves["solved"]:
            change = self.monitor.update(self.body)
            status = getattr(self.optimizer, "last_step", {}).get("status")
            if change is None and status == "failed":
                change = self.monitor.escalate(self.body, "no decrease along the inexact gradient")
        acted = ctl.step_done(self.monitor, self.body, measured or None) if ctl else None
        if acted:
            change = f"{change}; {acted}" if change else acted
        if reference is not None:
            solves["vtime"] += reference["vtime"]
        return dict(loss=stats["loss"], correct=stats["correct"], size=size,
                    fwd_iters=solves["fwd_iters"], bwd_iters=solves["bwd_iters"],
                    fwd_res=f["residual_norms"][-1] if f["residual_norms"] else 0.0,
                    bwd_res=b["residual_norms"][-1] if b["residual_norms"] else 0.0,
                    vtime=solves["vtime"], exact=int(exact),
                    grad_error=measured.get("error", math.nan),
                    grad_cosine=measured.get("cosine", math.nan),
                    check_work=measured.get("fwd_work", 0) + measured.get("bwd_work", 0),
                    grad_acted=int(acted is not None), change=change)

    def _grads(self):
        """This rank's parameters' gradients (None where there is none)."""
        return [None if p.grad is None else p.grad.detach().clone()
                for p in self.net.parameters()]

    def exact_gradient(self, x, y, size=None):
        """Collective: the objective's gradient at the current weights on the
        batch with exact propagation (one grid level both ways: serial, or
        the pipeline with micro-batches), as {"grads": this rank's
        gradients by parameter (None where there is none), "value": the
        objective, "work": this rank's layer steps {"fwd", "bwd"}, "vtime":
        the pass's virtual time}.  The network is left as it was: its MGRIT
        options (the solver cache keeps the inexact solvers and their warm
        states), its pass counter (the next pass draws the same random
        numbers as this one), its buffers (running statistics), the
        gradients in ``.grad`` and the last passes' records; the layer
        steps are added to ``work``.  Kept evaluations are neither used nor
        replaced."""
        body = self.body
        params = list(self.net.parameters())
        held = [p.grad for p in params]
        buffers = [b.detach().clone() for b in self.net.buffers()]
        levels = (body.fwd_options["max_levels"], body.bwd_options["max_levels"])
        passes, records = body.passes, (body.records.forward, body.records.backward)
        work = dict(self.work)
        switch = max(levels) > 1
        if switch:
            body.reconfigure(max_levels=1)
        try:
            value, _ = self._solve_with_grad(x, y, size)
            grads = self._grads()
            vtime = body.last_forward["virtual_time"] + body.last_backward["virtual_time"]
        finally:
            if switch:
                body.reconfigure(max_levels=levels[0], bwd_max_levels=levels[1])
            body.passes = passes
            body.records.forward, body.records.backward = records
            with torch.no_grad():
                for b, saved in zip(self.net.buffers(), buffers):
                    b.copy_(saved)
            for p, g in zip(params, held):
                p.grad = g
        spent = {k: self.work[k] - work[k] for k in work}
        return {"grads": grads, "value": value, "work": spent, "vtime": vtime}

    def steps(self, k, batches):
        """k optimiser steps, cycling through ``batches`` (a list of
        (x, y, size)); the list of their statistics."""
        return [self.step(*batches[i % len(batches)]) for i in range(k)]

    def set_lr(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ---- evaluation and bookkeeping ----------------------------------------------------
    def evaluate(self, loader, *, exact=True):
        """(mean loss, accuracy) over a loader, collective; not counted as
        work.  ``exact``: with the exact network (one grid level), whatever
        the training mode."""
        work = dict(self.work)
        total, loss_sum, correct = 0, 0.0, 0
        modes = {name: m.training for name, m in self.net.named_modules()}
        levels = (self.body.fwd_options["max_levels"], self.body.bwd_options["max_levels"])
        switch = exact and max(levels) > 1
        if switch:
            self.body.reconfigure(max_levels=1)
        self.net.eval()  # no dropout, running statistics
        try:
            with torch.no_grad():
                for b, (x, y) in enumerate(loader.epoch(0)):
                    n = batch_len(loader, b)
                    _, value, c = self.forward_loss(x, y, n)
                    total += n
                    loss_sum += value * n
                    correct += c
        finally:
            for name, m in self.net.named_modules():
                m.training = modes[name]
            if switch:
                self.body.reconfigure(max_levels=levels[0], bwd_max_levels=levels[1])
        self.work = work
        return loss_sum / max(total, 1), correct / max(total, 1)

    def work_totals(self):
        """{"fwd", "bwd"}: layer-step evaluations summed over the ranks.
        Collective."""
        # every rank -> every rank: its two counters
        guard(self.comm, "the work counters")
        parts = self.comm.allgather((self.work["fwd"], self.work["bwd"]))
        return {"fwd": sum(f for f, _ in parts), "bwd": sum(b for _, b in parts)}

    def params(self):
        """This rank's parameters and buffers (running statistics) in the
        checkpoint layout: {"layers": {n: {name: tensor}}, "opening": {...},
        "closing": {...}}."""
        return {"layers": self.body.params_by_layer(buffers=True),
                "opening": _tensors(self.net.opening) if self.first else {},
                "closing": _tensors(self.net.closing) if self.last else {}}

    def warm_state(self):
        """One-shot mode: the network's solver pairs by position, each with
        its state meta and options (JSON) and {point index: tensor} per
        solve; every rank gives its own points (a checkpoint merges them
        into one set).  Otherwise {} (the solves start cold anyway)."""
        if not self.body.fwd_options["warm_start"]:
            return {}
        out = {}
        for j, (meta, fwd, bwd, held) in enumerate(self.body.warm_states()):
            out[j] = {"shape": list(meta[0]), "dtype": str(meta[1]).replace("torch.", ""),
                      "device": meta[2], "options": json.dumps([fwd, bwd], sort_keys=True),
                      "fwd": held["fwd"], "bwd": held["bwd"]}
        return out

    def restore_warm_state(self, saved):
        """Collective: the solver pairs of ``warm_state()``, each rank keeping
        the points it owns (saved on any number of ranks: every point is in
        ``saved``)."""
        pairs = []
        for j in sorted(saved):
            p = saved[j]
            fwd, bwd = json.loads(p["options"])
            meta = (tuple(p["shape"]), getattr(torch, p["dtype"]), p["device"])
            device = torch.device(p["device"])
            held = {k: {int(i): u.to(device) for i, u in p[k].items()} for k in ("fwd", "bwd")}
            pairs.append((meta, fwd, bwd, held))
        self.body.load_warm_states(pairs, owned_only=True)

    def close(self):
        """Collective: free the network's solvers (the level is not used again)."""
        self.body.close()

    def end_params(self):
        """{("opening"|"closing", name): parameter} of this rank."""
        p = self.params()
        return {(sec, k): v for sec in ("opening", "closing") for k, v in p[sec].items()}


def _same(a, b):
    """Equal batches: both absent, or tensors of equal shape, type and values."""
    if a is None or b is None:
        return a is None and b is None
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


def _tensors(module):
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}
