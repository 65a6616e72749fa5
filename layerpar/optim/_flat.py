"""The base of the full-batch optimisers whose vectors are split over the
ranks of a communicator (``LBFGS``, ``LSR1``): one parameter group of one
dtype and device, each rank's parameters as one flat local slice of the
global vector, and evaluations of the closure whose loss every rank must
agree on (with the squared gradient norm summed over the ranks in rank
order, ``_sums.allsum``'s order).
"""
import math

import numpy as np
import torch

from layerpar._collective import check_comm, collective
from layerpar._watchdog import guard
from layerpar.optim._sums import dot as _dot, flat as _flat

__all__ = ["FlatOptimizer"]


class FlatOptimizer(torch.optim.Optimizer):
    """``params``: this rank's parameters (one group); ``comm``: the
    communicator that splits the global vector.  Subclasses implement
    ``step(closure)``; ``last_step`` describes the last call and holds an
    'evaluations' counter that ``_evaluate`` advances."""

    _what = "optimiser"  # in the watchdog's messages

    def __init__(self, params, comm, defaults):
        check_comm(comm)
        params = list(params)
        name = type(self).__name__
        if params and isinstance(params[0], dict):
            if len(params) != 1:
                raise ValueError(f"{name} takes one parameter group, got {len(params)}: pass "
                                 "the parameters as one list")
        elif not params:
            params = [{"params": []}]  # a rank whose layers have no parameters
        super().__init__(params, defaults)
        kinds = {(p.dtype, p.device) for p in self._params}
        if len(kinds) > 1:
            raise ValueError(f"{name} needs all parameters of one dtype and device, got {kinds}: "
                             "convert the model (e.g. .double())")
        self._dtype, self._device = kinds.pop() if kinds else (torch.float64, torch.device("cpu"))
        self._numels = [p.numel() for p in self._params]
        self.comm = comm
        self.last_step = {}
        self._last = None  # (flat parameters, f, flat gradient, ||g||^2) after a call

    def load_state_dict(self, state_dict):
        self._last = None
        super().load_state_dict(state_dict)

    @property
    def _params(self):
        return self.param_groups[0]["params"]

    def add_param_group(self, param_group):
        if getattr(self, "param_groups", None):
            raise ValueError(f"{type(self).__name__} takes one parameter group")
        super().add_param_group(param_group)

    # ---- flat local slices -------------------------------------------------
    def _flat_params(self):
        return _flat([p.detach() for p in self._params], self._dtype, self._device).clone()

    def _flat_grad(self):
        gs = []
        for p in self._params:
            if p.grad is None:
                gs.append(torch.zeros_like(p))
            elif p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            else:
                gs.append(p.grad.detach())
        return _flat(gs, self._dtype, self._device).clone()

    def _set_params(self, flat):
        for p, piece in zip(self._params, torch.split(flat, self._numels)):
            p.copy_(piece.view_as(p))

    def _set_grads(self, flat):
        for p, piece in zip(self._params, torch.split(flat, self._numels)):
            if p.grad is None:
                p.grad = piece.view_as(p).clone()
            else:
                p.grad.copy_(piece.view_as(p))

    def _evaluate(self, closure):
        """Collective: (f, flat local gradient, ||g||^2 over all ranks) at the
        current parameters."""
        # a closure that fails after its collective work on some ranks only
        # (e.g. in the loss) raises on every rank
        with collective(self.comm, "the closure"), torch.enable_grad():
            value = closure()
        try:
            f = float(value.detach() if isinstance(value, torch.Tensor) else value)
        except (TypeError, ValueError):
            f = None
        g = self._flat_grad()
        # every rank -> every rank: its loss value (they must agree) and its
        # part of ||g||^2, added in rank order as in _allsum
        guard(self.comm, f"the {self._what} objective and gradient norm")
        parts = self.comm.allgather((f, _dot(g, g)))
        values = [v for v, _ in parts]
        if any(v is None for v in values):
            raise TypeError("the closure must return the loss as a float or a 0-d tensor "
                            f"(got {type(value).__name__} on some rank)")
        if any(not (v == f or (math.isnan(v) and math.isnan(f))) for v in values):
            raise ValueError(f"the closure returned different loss values on different ranks "
                             f"({values}): return the same value everywhere, e.g. "
                             "net.reduce(loss)")
        gg = np.float64(parts[0][1])
        for _, part in parts[1:]:
            gg += part
        self.last_step["evaluations"] += 1
        return f, g, float(gg)

    def _unchanged(self, last):
        """Collective: whether every rank's parameters are bitwise those of
        ``last`` (each rank sends its yes/no to every rank)."""
        mine = last is not None and torch.equal(self._flat_params(), last[0])
        guard(self.comm, f"an {self._what} agreement")
        return all(self.comm.allgather(mine))

    def _start(self, closure, group):
        """Collective: (f, flat local gradient, ||g||^2, evaluated) at the
        current parameters: the previous call's last evaluation when
        ``reuse_evaluation`` is on and every rank's parameters are bitwise
        where that call left them (evaluated False), else a new evaluation."""
        last, self._last = self._last, None
        if group["reuse_evaluation"] and self._unchanged(last):
            self._set_grads(last[2])
            return last[1], last[2].clone(), last[3], False
        return (*self._evaluate(closure), True)

    @staticmethod
    def _converged(f, gg, group):
        """Whether ||g|| <= ``grad_tol`` (or g = 0); FloatingPointError when
        the loss or its gradient is not finite."""
        if not (math.isfinite(f) and math.isfinite(gg)):
            raise FloatingPointError(f"the loss ({f}) or its gradient (norm^2 {gg}) is "
                                     "not finite at the current parameters")
        return math.sqrt(gg) <= group["grad_tol"] or gg == 0.0
