"""The gradient-accuracy controller of the parallel modes.

Layer-parallel and one-shot training step along MGRIT gradients: a few
iterations of an iterative solve, so the gradient of a step differs from the
exact one by an error that does not average out over the batches (a bias).
Far from a minimum the step still descends; near one the error can be as
large as the gradient itself, and the inexact steps stop making progress or
drift.  The controller measures the error on a schedule and raises the
accuracy of the solves when it is too large.

Measurement (``every`` = k): before steps k, 2k, 3k, ... (never before step
k, so a run shorter than k steps is the run without a controller) the level
evaluates the objective's gradient once more with exact propagation
(``LayerParallel.reconfigure(max_levels=1)``: the serial or pipelined pass,
at the same weights, on the same batch, with the same random draws); the
step's own inexact gradient g is then compared with the exact one g*:

    error  = ||g - g*|| / ||g*||        cosine = <g, g*> / (||g|| ||g*||)

over every parameter of the network (the sums of each rank's parameters,
added in rank order on every rank: the same numbers and the same decision
on every rank).  The exact pass leaves the network as it found it: the
options (the solver cache keeps the inexact solvers and their warm states),
the pass counter, the buffers and the gradients; only its layer steps are
counted (``Level.work`` and the controller's own ``work``), so measuring
costs about two exact passes' work (N forward + N adjoint layer steps) every
k steps and changes nothing else.

Decision: a measurement whose error exceeds ``tol`` is a miss; ``patience``
misses in a row act, and a measurement within ``tol`` starts the count
again.  The action (``action``):

  auto        one more iteration each way while that keeps the step's
              modelled time below the exact pass's (the virtual clocks of
              the measured step and of the exact pass, maxima over the
              ranks; a step of f + b iterations that took V is taken to
              cost V (f + b + 2) / (f + b) with one more each way) and
              within ``mgrit.max_iters``; exact propagation otherwise.
              Inexact gradients are worth having only while they are
              cheaper than exact ones: on a few ranks (where MGRIT's extra
              work is not paid back by parallelism) this is exact
              propagation at once, at scale more iterations first
  iterations  one more forward and one more backward MGRIT iteration per
              solve, up to ``mgrit.max_iters``; past it, exact propagation
  exact       exact (serial, or pipelined with micro-batches) propagation
              at once

Exact propagation is kept for the rest of training (and measurements stop:
the gradient is then the exact one).  The MGRIT setting itself (iterations,
exact fallback) is the residual monitor's (``ResidualMonitor``), which the
controller raises through it, so the two never disagree; a checkpoint holds
both states.
"""
import math

import torch

from layerpar._watchdog import guard
from layerpar.config import CONTROLLER_ACTIONS as ACTIONS


def _check(name, value, ok, what):
    if not ok:
        raise ValueError(f"{name}={value!r}: {what}")


class GradientController:
    """Collective over the level's communicator where it measures (every
    rank of the level makes the same calls).

    ``every``: steps between measurements (an integer >= 1); ``tol``: the
    largest relative gradient error accepted (> 0); ``patience``: misses in
    a row before acting (>= 1); ``action``: "auto", "iterations" or
    "exact"."""

    def __init__(self, *, every=50, tol=0.2, patience=1, action="auto"):
        _check("every", every, isinstance(every, int) and not isinstance(every, bool)
               and every >= 1, "the steps between measurements must be an integer >= 1")
        _check("tol", tol, isinstance(tol, (int, float)) and not isinstance(tol, bool)
               and math.isfinite(tol) and tol > 0, "the error bound must be a finite number > 0")
        _check("patience", patience, isinstance(patience, int)
               and not isinstance(patience, bool) and patience >= 1,
               "the measurements above the bound before acting must be an integer >= 1")
        _check("action", action, action in ACTIONS, f"choose one of {', '.join(ACTIONS)}")
        self.every, self.tol, self.patience, self.action = every, float(tol), patience, action
        self.steps = 0       # steps taken by the level
        self.checks = 0      # measurements made
        self.misses = 0      # measurements above tol in a row
        self.actions = 0     # times it raised the accuracy
        self.last = {}       # the last measurement: error, cosine, step
        self.work = {"fwd": 0, "bwd": 0}  # the measurements' layer steps, over the ranks

    # ---- the schedule --------------------------------------------------------------
    def due(self, body):
        """Is the next step measured?  Steps k, 2k, ... while the
        propagation is inexact."""
        return (self.steps + 1) % self.every == 0 and not body.pipelined

    # ---- the measurement ---------------------------------------------------------------
    def measure(self, comm, grads, exact, spent, vtimes=(0.0, 0.0)):
        """Collective over ``comm``: {"error", "cosine", "fwd_work",
        "bwd_work", "vtime", "exact_vtime"} of the gradients ``grads``
        against ``exact`` (lists of tensors, or None for a parameter without
        a gradient: this rank's parameters in the same order); ``spent``:
        the exact pass's layer steps on this rank ({"fwd", "bwd"}), summed
        over the ranks and added to the controller's ``work``; ``vtimes``:
        the virtual times of the inexact and the exact pass on this rank
        (their maxima over the ranks).  Every rank's numbers are gathered
        and combined in rank order, so every rank gets the same."""
        error, cosine, work, clocks = gradient_error(comm, grads, exact, spent, vtimes)
        for k in self.work:
            self.work[k] += work[k]
        return {"error": error, "cosine": cosine, "fwd_work": work["fwd"],
                "bwd_work": work["bwd"], "vtime": clocks[0], "exact_vtime": clocks[1]}

    # ---- the decision --------------------------------------------------------------------
    def step_done(self, monitor, body, measured=None):
        """After a step: count it, and with its measurement ``measured``
        (``measure``'s) decide; a description of what was done to ``body``
        (through ``monitor``), or None.  Every rank decides alike (the
        numbers are the same everywhere)."""
        self.steps += 1
        if measured is None:
            return None
        self.checks += 1
        error, cosine = measured["error"], measured["cosine"]
        self.last = {"error": error, "cosine": cosine, "step": self.steps}
        if error <= self.tol:  # (a NaN error is a miss)
            self.misses = 0
            return None
        self.misses += 1
        if self.misses < self.patience:
            return None
        self.misses = 0
        self.actions += 1
        reason = (f"gradient error {error:.3g} (cosine {cosine:.4f}) above "
                  f"{self.tol:g}" + (f" in {self.patience} checks" if self.patience > 1 else ""))
        if self.action == "exact" or (self.action == "auto"
                                      and not self.iterations_pay(monitor, measured)):
            return monitor.to_exact(body, reason)
        return monitor.escalate(body, reason)

    @staticmethod
    def iterations_pay(monitor, measured):
        """Does one more iteration each way keep the step's modelled time
        (virtual clock) below the exact pass's, within ``max_iters``?  A
        step of f + b iterations that took V is taken to cost
        V (f + b + 2) / (f + b) with one more each way."""
        f, b = monitor.iters["fwd"], monitor.iters["bwd"]
        if max(f, b) >= monitor.max_iters:
            return False
        return measured["vtime"] * (f + b + 2) / (f + b) < measured["exact_vtime"]

    # ---- checkpoints ------------------------------------------------------------------
    def state(self):
        """The controller's counters, the same on every rank."""
        return {"steps": self.steps, "checks": self.checks, "misses": self.misses,
                "actions": self.actions, "work": dict(self.work), "last": dict(self.last)}

    def restore(self, state):
        self.steps = int(state["steps"])
        self.checks = int(state["checks"])
        self.misses = int(state["misses"])
        self.actions = int(state["actions"])
        self.work = {k: int(v) for k, v in state["work"].items()}
        self.last = dict(state.get("last") or {})


def gradient_error(comm, grads, exact, spent=None, clocks=(0.0, 0.0)):
    """Collective over ``comm``: (error, cosine, {"fwd", "bwd"}, clocks) where
    error = ||g - g*|| / ||g*|| and cosine = <g, g*> / (||g|| ||g*||) over
    every rank's parameters (``grads``: g, ``exact``: g*, lists of this
    rank's tensors or None in the same order), and the layer steps
    ``spent`` ({"fwd", "bwd"} on this rank) summed over the ranks, and the
    numbers ``clocks`` (this rank's) maximised over the ranks.  The
    partial sums of every rank are gathered and added in rank order
    (``math.fsum``): every rank gets the same numbers."""
    sums = [0.0, 0.0, 0.0, 0.0]  # <g, g*>, ||g||^2, ||g*||^2, ||g - g*||^2
    for g, e in zip(grads, exact):
        if g is None and e is None:
            continue
        g = torch.zeros_like(e) if g is None else g.detach()
        e = torch.zeros_like(g) if e is None else e.detach()
        g, e = g.double(), e.double()
        sums[0] += float(torch.sum(g * e))
        sums[1] += float(torch.sum(g * g))
        sums[2] += float(torch.sum(e * e))
        sums[3] += float(torch.sum((g - e) ** 2))
    spent = spent or {"fwd": 0, "bwd": 0}
    # every rank -> every rank: its four partial sums and its layer steps
    guard(comm, "the gradient error's sums")
    parts = comm.allgather((sums, spent["fwd"], spent["bwd"], tuple(clocks)))
    dot, gg, ee, dd = (math.fsum(p[0][i] for p in parts) for i in range(4))
    work = {"fwd": sum(p[1] for p in parts), "bwd": sum(p[2] for p in parts)}
    clocks = tuple(max(p[3][i] for p in parts) for i in range(len(clocks)))
    if ee == 0.0:
        error = 0.0 if dd == 0.0 else math.inf
    else:
        error = math.sqrt(dd / ee)
    if gg > 0.0 and ee > 0.0:
        cosine = dot / math.sqrt(gg * ee)
    else:
        cosine = 1.0 if dd == 0.0 else 0.0
    return error, cosine, work, clocks
