"""The residual monitor of the parallel modes: more MGRIT iterations when
the residual stops contracting, serial propagation past a ceiling.  It
holds the MGRIT setting of a network in training (iterations, the exact
fallback), which the gradient-accuracy controller
(``layerpar.training.controller``) raises through it too."""
import math


_SOLVES = {"fwd": "forward solve", "bwd": "adjoint solve"}


class ResidualMonitor:
    """Watches the residual history of each solve.  A solve is stalled when
    its k iterations cut the residual by less than ``factor`` per iteration
    on average, or when its last residual exceeds ``max_residual`` times the
    norm of the state it is given (the input state of the forward solve, the
    loss gradient of the adjoint; the solves' ``input_norm``): the level
    matters as well as the contraction, since a warm-started solve may
    contract well from a residual that has grown.  A solve stalled
    ``patience`` updates in a row gets one more iteration; past ``max_iters``
    the network falls back to serial (exact) propagation.  ``max_residual``
    0 watches contraction only.

    ``watch=False``: the residuals are not watched (``update`` and the
    line search's escalation do nothing); the monitor only holds the
    setting that ``controller`` (a ``GradientController``, or None) raises.
    Its state (``state()``) holds the controller's."""

    def __init__(self, factor, patience, max_iters, fwd_iters, bwd_iters, max_residual=0.0,
                 *, watch=True, controller=None):
        self.factor, self.patience, self.max_iters = factor, patience, max_iters
        self.max_residual = max_residual
        self.watch = bool(watch)
        self.controller = controller
        self.iters = {"fwd": fwd_iters, "bwd": bwd_iters}
        self.stalls = {"fwd": 0, "bwd": 0}
        self.serial = False

    @staticmethod
    def rate(norms):
        if len(norms) < 2:
            return 0.0
        if not all(math.isfinite(r) for r in norms):
            return math.inf
        if norms[0] <= 0:
            return 0.0
        return (norms[-1] / norms[0]) ** (1.0 / (len(norms) - 1))

    def too_large(self, info):
        """Does the solve end with a residual above ``max_residual`` times
        the norm of its given state?"""
        norms = info["residual_norms"]
        if not self.max_residual or not norms:
            return False
        return not norms[-1] <= self.max_residual * info.get("input_norm", 0.0)

    def update(self, body):
        """Look at the last solves; returns a description of a change made to
        ``body`` (collective: every rank sees the same norms), or None."""
        if self.serial or not self.watch:
            return None
        change = {}
        for key, info in (("fwd", body.last_forward), ("bwd", body.last_backward)):
            if self.rate(info["residual_norms"]) > self.factor or self.too_large(info):
                self.stalls[key] += 1
            else:
                self.stalls[key] = 0
            if self.stalls[key] >= self.patience:
                self.stalls[key] = 0
                if self.iters[key] < self.max_iters:
                    self.iters[key] += 1
                    change[f"{key}_iters"] = self.iters[key]
                else:
                    self.serial = True
        if self.serial:
            body.reconfigure(max_levels=1)
            return (f"MGRIT converged too slowly even with {self.max_iters} iterations per "
                    "step (mgrit.max_iters): exact serial propagation from now on")
        if change:
            body.reconfigure(**change)
            return "MGRIT converged too slowly (" + "; ".join(
                f"{_SOLVES[k[:3]]}: {v} iterations per step from now on, {k} -> {v}"
                for k, v in change.items()) + ")"
        return None

    def escalate(self, body, reason):
        """One more iteration for both solves (serial propagation past the
        ceiling), e.g. when a line search finds no decrease on the inexact
        loss.  Collective."""
        if self.serial:
            return None
        if max(self.iters.values()) >= self.max_iters:
            self.serial = True
            body.reconfigure(max_levels=1)
            return f"{reason}: serial propagation from now on"
        self.iters = {k: min(v + 1, self.max_iters) for k, v in self.iters.items()}
        body.reconfigure(fwd_iters=self.iters["fwd"], bwd_iters=self.iters["bwd"])
        return (f"{reason}: MGRIT iterations per step from now on: {self.iters['fwd']} "
                f"forward, {self.iters['bwd']} adjoint")

    def to_exact(self, body, reason):
        """Exact (serial or pipelined) propagation from now on.  Collective."""
        if self.serial:
            return None
        self.serial = True
        body.reconfigure(max_levels=1)
        return f"{reason}: exact propagation from now on"

    def state(self):
        out = {"iters": dict(self.iters), "stalls": dict(self.stalls), "serial": self.serial}
        if self.controller is not None:
            out["controller"] = self.controller.state()
        return out

    def restore(self, state, body):
        self.iters = dict(state["iters"])
        self.stalls = dict(state["stalls"])
        self.serial = bool(state["serial"])
        if self.controller is not None and state.get("controller"):
            self.controller.restore(state["controller"])
        if self.serial:
            body.reconfigure(max_levels=1)
        else:
            body.reconfigure(fwd_iters=self.iters["fwd"], bwd_iters=self.iters["bwd"])
