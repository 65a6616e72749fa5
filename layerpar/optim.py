"""Optimisation for layer-parallel networks: distributed L-BFGS, learning-rate
schedules and the Tikhonov and smoothness-in-time penalties.

Each rank holds only the parameters of its own layers; a global parameter
vector is the concatenation over the ranks.  Every inner product and norm
below is therefore a local sum followed by a sum over the communicator, so
that the iterates do not depend on the number of ranks (up to round-off).

    opt = LBFGS(net.parameters(), net.body.comm, lr=1.0, history=10)

    def closure():                       # collective
        opt.zero_grad()
        loss = net.loss(x, y, torch.nn.functional.cross_entropy)
        loss.backward()
        value = net.reduce(loss)         # the same float on every rank
        return value + regularize(net, tikhonov=1e-4, smoothness=1e-4)

    for epoch in range(epochs):
        opt.step(closure)

``LBFGS(..., line_search="strong-wolfe")`` replaces the backtracking search
by a strong Wolfe search; ``reuse_evaluation=True`` saves the evaluation at
the start of each call when the objective does not change between calls.

Public names: ``LBFGS``, ``LineSearchError``, ``regularize``, ``schedule``,
``scheduler`` (and ``SCHEDULES``, ``LINE_SEARCHES``).
"""
import math
import numbers
import weakref

import numpy as np
import torch
from mpi4py import MPI

from layerpar._collective import agree, check_comm, collective
from layerpar._tags import tag
from layerpar._watchdog import guard, sendrecv

__all__ = ["LBFGS", "LineSearchError", "regularize", "schedule", "scheduler", "SCHEDULES",
           "LINE_SEARCHES"]

_ON_FAILURE = ("reset", "raise")
LINE_SEARCHES = ("armijo", "strong-wolfe")
_OPTIONS = ("lr", "history", "max_iter", "max_backtracks", "c1", "shrink", "grad_tol",
            "curvature_eps", "on_failure", "line_search", "c2", "max_line_evals",
            "reuse_evaluation")


class LineSearchError(RuntimeError):
    """No step length satisfied the line search's sufficient-decrease
    (Armijo) condition, not even along the steepest-descent direction.
    Raised on every rank at once."""


def _allsum(comm, values):
    """The sums over ``comm`` of a few local float64 values, bitwise the same
    on every rank.

    Every rank sends its partial sums to every rank (allgather) and adds them
    in rank order.  An allreduce would do, but the MPI standard does not
    promise every rank the same last bit, and the line-search decisions taken
    from these sums must agree everywhere: a rank that accepted a step while
    another backtracks would wait forever in the collective closure."""
    local = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
    parts = np.empty((comm.Get_size(), local.size), dtype=np.float64)
    guard(comm, "a gather of vector parts")
    comm.Allgather(local, parts)
    total = parts[0].copy()
    for r in range(1, parts.shape[0]):
        total += parts[r]
    return total


def _flat(tensors, dtype, device):
    tensors = [t.reshape(-1) for t in tensors]
    if not tensors:
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.cat(tensors)


def _dot(a, b):
    return float(torch.dot(a, b)) if a.numel() else 0.0


# ---------------------------------------------------------------------------
# L-BFGS
# ---------------------------------------------------------------------------
class LBFGS(torch.optim.Optimizer):
    """Full-batch L-BFGS with a backtracking (Armijo) or a strong Wolfe line
    search, for parameters split over the ranks of ``comm``.

    ``params`` are this rank's parameters (one group); ``comm`` the
    communicator that splits them (``net.body.comm``).  Each rank's slice of
    every vector (iterate, gradient, direction, history pair) stays local;
    inner products are local sums added over ``comm``, so a run on P ranks
    takes the iterates of a run on one rank up to round-off.

    Keyword-only options (also in ``param_groups[0]``, so schedules and
    checkpoints see them):
      lr              initial trial step length.  With history it is tried as
                      is (1.0 = the quasi-Newton step); without history (first
                      iteration, after a reset) the steepest-descent step
                      -g is tried with length lr*min(1, 1/||g||).  Read from
                      ``param_groups[0]['lr']`` at every step, so schedules
                      apply (lr = 0 takes no step)
      history         number of (s, y) pairs kept
      max_iter        L-BFGS iterations per ``step`` call
      line_search     'armijo' (default): backtracking t <- shrink*t from the
                      trial step until f(x+t d) <= f(x) + c1 t g.d.
                      'strong-wolfe': bracketing and zoom with cubic
                      (quadratic, bisection as safeguards) interpolation
                      until also |g(x+t d).d| <= c2 |g.d| (Nocedal & Wright,
                      Algorithms 3.5 and 3.6); the accepted pairs then have
                      y.s > 0, and step lengths above 1 are possible
      max_backtracks  'armijo': step-length halvings before giving up
      c1              sufficient-decrease (Armijo) constant in (0, 1)
      c2              'strong-wolfe': curvature constant in (c1, 1)
      shrink          'armijo': backtracking factor in (0, 1)
      max_line_evals  'strong-wolfe': evaluations per line search.  When they
                      run out, the trial with the lowest loss that satisfies
                      the Armijo condition is accepted (if there is one)
      grad_tol        stop when ||g|| <= grad_tol (0: only at g = 0)
      curvature_eps   skip a pair unless y.s > curvature_eps*||y||*||s||
                      (non-positive or negligible curvature would make the
                      inverse-Hessian approximation indefinite)
      reuse_evaluation  False (default): every ``step`` call starts with an
                      evaluation of the closure.  True: a call that finds the
                      parameters bitwise where the previous call left them
                      starts from that call's last loss and gradient instead
                      (for a closure whose objective does not change between
                      calls, e.g. full-batch training with exact gradients:
                      it saves one evaluation per call)
      on_failure      what happens when no step length decreases the loss:
                      'reset' (default) drops the history and retries along
                      -g; if that fails too, the parameters stay where they
                      were and ``last_step['status']`` is 'failed'.
                      'raise' does the same retry, then raises
                      ``LineSearchError`` on every rank.

    ``step(closure)`` is collective.  The closure zeroes the gradients,
    evaluates the loss, calls backward and returns the loss as a float (or a
    0-d tensor) that is the same on every rank, e.g. ``net.reduce(loss)``
    plus ``regularize(...)``; a closure that returns different values on
    different ranks raises ValueError everywhere.  Each call evaluates the
    closure at the current point (so a changed objective is never mixed
    with an old gradient), then runs ``max_iter`` iterations; an iteration
    costs one evaluation per trial step length, and the accepted trial's
    gradient starts the next iteration of the same call (and, with
    ``reuse_evaluation``, the first iteration of the next call).  Returns the loss
    at the start of the call.  ``last_step`` describes the call: 'loss'
    (start), 'new_loss', 'evaluations', 'backtracks' (line-search
    evaluations after the first of each search), 'step_lengths',
    'pairs', 'skipped_pairs', 'resets', 'status' ('ok', 'reset',
    'converged' or 'failed').  On return the gradients hold the last
    evaluation's (the accepted point's, unless the search failed).

    State and checkpoints: the history is stored per parameter,
    ``state[p] = {'s': (k, *p.shape), 'y': (k, *p.shape)}`` (no entry while
    the history is empty), and nothing else is kept between calls.  So

    * ``state_dict()`` / ``load_state_dict()`` round-trip on the same ranks
      and resume identically (they number this rank's parameters, like any
      torch optimiser; loading another rank's or another layout's state
      raises ValueError, from torch or at the next step);
    * a checkpoint that stores optimiser state by parameter name
      (``layerpar.checkpoint.optimizer_state``) resumes on *any* number of
      ranks: each layer's slices of the pairs move with the layer, i.e. the
      history is re-sliced, not reset.  The inverse-Hessian scalings are
      recomputed from the pairs at every step.
    """

    def __init__(self, params, comm, *, lr=1.0, history=10, max_iter=1, max_backtracks=20,
                 c1=1e-4, shrink=0.5, grad_tol=0.0, curvature_eps=1e-10, on_failure="reset",
                 line_search="armijo", c2=0.9, max_line_evals=25, reuse_evaluation=False):
        check_comm(comm)
        _check_options(lr=lr, history=history, max_iter=max_iter,
                       max_backtracks=max_backtracks, c1=c1, shrink=shrink, grad_tol=grad_tol,
                       curvature_eps=curvature_eps, on_failure=on_failure,
                       line_search=line_search, c2=c2, max_line_evals=max_line_evals,
                       reuse_evaluation=reuse_evaluation)
        params = list(params)
        if params and isinstance(params[0], dict):
            if len(params) != 1:
                raise ValueError(f"LBFGS takes one parameter group, got {len(params)}: pass "
                                 "the parameters as one list")
        elif not params:
            params = [{"params": []}]  # a rank whose layers have no parameters
        defaults = dict(lr=lr, history=history, max_iter=max_iter,
                        max_backtracks=max_backtracks, c1=c1, shrink=shrink, grad_tol=grad_tol,
                        curvature_eps=curvature_eps, on_failure=on_failure,
                        line_search=line_search, c2=c2, max_line_evals=max_line_evals,
                        reuse_evaluation=reuse_evaluation)
        super().__init__(params, defaults)
        kinds = {(p.dtype, p.device) for p in self._params}
        if len(kinds) > 1:
            raise ValueError(f"LBFGS needs all parameters of one dtype and device, got {kinds}: "
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
            raise ValueError("LBFGS takes one parameter group")
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
                raise RuntimeError("LBFGS does not support sparse gradients")
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
        guard(self.comm, "the L-BFGS objective and gradient norm")
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

    # ---- history: the per-parameter state <-> flat matrices ------------------
    def _load_history(self, group):
        """Collective: the history as flat (k, n) matrices S, Y from
        ``self.state``, with rho_i = 1/(y_i.s_i) and gamma = s.y/y.y of the
        newest pair."""
        ks, msg = set(), None
        for i, p in enumerate(self._params):
            st = self.state.get(p)
            if not st:
                ks.add(0)
                continue
            s, y = st.get("s"), st.get("y")
            if not (isinstance(s, torch.Tensor) and isinstance(y, torch.Tensor)):
                msg = (f"parameter {i} has optimiser state {sorted(st)}, not L-BFGS history "
                       "('s', 'y'): load a state saved by LBFGS")
                break
            if s.shape != y.shape or tuple(s.shape[1:]) != tuple(p.shape):
                msg = (f"parameter {i} of shape {tuple(p.shape)} has history pairs of shapes "
                       f"{tuple(s.shape)} and {tuple(y.shape)}: the state belongs to another "
                       "model or another partition of the layers")
                break
            ks.add(s.shape[0])
        if msg is None and len(ks) > 1:
            msg = f"the parameters of one rank have different numbers of history pairs {ks}"
        mine = ks.pop() if (ks and msg is None) else None
        guard(self.comm, "an L-BFGS agreement")
        parts = self.comm.allgather((mine, msg))
        agree(self.comm, next((m for _, m in parts if m), None))
        known = {k for k, _ in parts if k is not None}
        if len(known) > 1:
            raise ValueError(f"the ranks hold different numbers of history pairs "
                             f"{[k for k, _ in parts]}: the optimiser state is inconsistent")
        k = known.pop() if known else 0
        n = sum(self._numels)
        if k == 0:
            empty = torch.zeros(0, n, dtype=self._dtype, device=self._device)
            return empty, empty.clone(), [], 1.0
        S = torch.cat([self.state[p]["s"].reshape(k, -1) for p in self._params], dim=1) \
            if self._params else torch.zeros(k, 0, dtype=self._dtype, device=self._device)
        Y = torch.cat([self.state[p]["y"].reshape(k, -1) for p in self._params], dim=1) \
            if self._params else torch.zeros(k, 0, dtype=self._dtype, device=self._device)
        S = S.to(self._dtype)
        Y = Y.to(self._dtype)
        m = group["history"]
        if k > m:  # loaded with a shorter history: keep the newest pairs
            S, Y, k = S[-m:], Y[-m:], m
        # one sum over the ranks: y_i.s_i for every pair and y.y of the newest
        sums = _allsum(self.comm, [_dot(Y[i], S[i]) for i in range(k)] + [_dot(Y[-1], Y[-1])])
        ys, yy = sums[:k], sums[k]
        if not (np.all(ys > 0) and yy > 0):
            raise ValueError("the optimiser state holds a history pair with y.s <= 0: "
                             "it was not written by LBFGS")
        return S, Y, [1.0 / v for v in ys], float(ys[-1] / yy)

    def _publish(self, S, Y):
        """Write the flat history back into ``self.state``, one contiguous
        (k, *p.shape) copy per parameter."""
        k = S.shape[0]
        for p, s, y in zip(self._params, S.split(self._numels, 1), Y.split(self._numels, 1)):
            if k == 0:
                self.state.pop(p, None)
            else:
                contiguous = torch.contiguous_format  # a copy, never a view of S or Y
                self.state[p] = {"s": s.reshape(k, *p.shape).clone(memory_format=contiguous),
                                 "y": y.reshape(k, *p.shape).clone(memory_format=contiguous)}

    def _add_pair(self, hist, s, y, group):
        """Collective: append (s, y) to the history unless its curvature is
        not positive enough; drop the oldest pair beyond ``history``."""
        S, Y, rho, gamma = hist
        ys, yy, ss = _allsum(self.comm, [_dot(y, s), _dot(y, y), _dot(s, s)])
        if not ys > group["curvature_eps"] * math.sqrt(yy * ss):  # also catches NaN
            self.last_step["skipped_pairs"] += 1
            return hist
        m = group["history"]
        S = torch.cat([S[-(m - 1):] if m > 1 else S[:0], s[None]])
        Y = torch.cat([Y[-(m - 1):] if m > 1 else Y[:0], y[None]])
        rho = (rho[-(m - 1):] if m > 1 else []) + [1.0 / ys]
        return S, Y, rho, float(ys / yy)

    def _direction(self, hist, g):
        """Collective: d = -H g by the two-loop recursion, H0 = gamma*I.
        Each loop takes one sum over the ranks per pair (the coefficients
        depend on each other)."""
        S, Y, rho, gamma = hist
        k = S.shape[0]
        q = g.clone()
        alpha = [0.0] * k
        for i in reversed(range(k)):
            alpha[i] = rho[i] * _allsum(self.comm, [_dot(S[i], q)])[0]
            q.add_(Y[i], alpha=-alpha[i])
        r = q.mul_(gamma)
        for i in range(k):
            beta = rho[i] * _allsum(self.comm, [_dot(Y[i], r)])[0]
            r.add_(S[i], alpha=alpha[i] - beta)
        return r.neg_()

    # ---- the line search ---------------------------------------------------
    def _line_search(self, closure, x0, f0, d, gd, t, group):
        """Collective: a step length along d from x0 by the configured search.
        Returns (t, f, g, ||g||^2) at the accepted point, or Nones if no
        trial decreased the loss enough (the parameters are then at the last
        trial)."""
        if group["line_search"] == "strong-wolfe":
            return self._wolfe_search(closure, x0, f0, d, gd, t, group)
        return self._backtrack(closure, x0, f0, d, gd, t, group)

    def _backtrack(self, closure, x0, f0, d, gd, t, group):
        """Collective backtracking: the first t = t0*shrink^j, j <= max_backtracks,
        with f(x0 + t d) <= f0 + c1 t g.d."""
        for j in range(group["max_backtracks"] + 1):
            self._set_params(torch.add(x0, d, alpha=t))
            f, g, gg = self._evaluate(closure)
            if f <= f0 + group["c1"] * t * gd:  # False for NaN: backtrack
                return t, f, g, gg
            self.last_step["backtracks"] += 1
            t *= group["shrink"]
        return None, None, None, None

    def _trial(self, closure, x0, d, t):
        """Collective: evaluate at x0 + t d; (f, g, ||g||^2, g.d) with the
        sums over all ranks (the same floats everywhere)."""
        self._set_params(torch.add(x0, d, alpha=t))
        f, g, gg = self._evaluate(closure)
        return f, g, gg, float(_allsum(self.comm, [_dot(g, d)])[0])

    def _wolfe_search(self, closure, x0, f0, d, gd0, t, group):
        """Collective strong Wolfe search (Nocedal & Wright, Algorithm 3.5):
        grow the trial step until an interval is known to hold acceptable
        steps, then shrink it (``_zoom``).  phi(t) = f(x0 + t d) and
        phi'(t) = g(x0 + t d).d; every decision below is taken from these
        floats, which are the same on every rank."""
        c1, c2, budget = group["c1"], group["c2"], group["max_line_evals"]
        search = _WolfeState(f0, gd0, c1, c2)
        prev = _Trial(0.0, f0, gd0, None, None)
        while search.evals < budget:
            cur = self._count(search, closure, x0, d, t)
            if not search.armijo(cur) or (search.evals > 1 and cur.f >= prev.f):
                return self._zoom(closure, x0, d, search, prev, cur, budget)
            if search.curvature(cur):
                return self._accept(search, x0, d, cur)
            if cur.dg >= 0:
                return self._zoom(closure, x0, d, search, cur, prev, budget)
            # still descending at t: extrapolate, to at least 2.1 and at
            # most 5 times the last step from the previous trial
            low, high = t + 1.1 * (t - prev.t), t + 4.0 * (t - prev.t)
            guess = _cubic_min(prev, cur)
            prev, t = cur, min(max(guess, low), high) if guess is not None else high
        return self._accept(search, x0, d, search.best)

    def _zoom(self, closure, x0, d, search, lo, hi, budget):
        """Nocedal & Wright, Algorithm 3.6: ``lo`` satisfies the Armijo
        condition with the lowest loss seen in the interval, and the
        interval between ``lo`` and ``hi`` contains strong Wolfe steps.
        The trial is the interpolated minimiser kept at least a tenth of the
        interval away from its ends (bisection otherwise)."""
        while search.evals < budget:
            a, b = min(lo.t, hi.t), max(lo.t, hi.t)
            if not b - a > 1e-14 * b:  # the interval has shrunk to round-off
                break
            guess = _cubic_min(lo, hi)
            if guess is None:
                guess = _quadratic_min(lo, hi)
            margin = 0.1 * (b - a)
            t = guess if guess is not None and a + margin <= guess <= b - margin else 0.5 * (a + b)
            cur = self._count(search, closure, x0, d, t)
            if not search.armijo(cur) or cur.f >= lo.f:
                hi = cur
                continue
            if search.curvature(cur):
                return self._accept(search, x0, d, cur)
            if cur.dg * (hi.t - lo.t) >= 0:
                hi = lo
            lo = cur
        return self._accept(search, x0, d, search.best)

    def _count(self, search, closure, x0, d, t):
        """Collective: one trial of the search, counted."""
        if search.evals > 0:
            self.last_step["backtracks"] += 1
        f, g, gg, dg = self._trial(closure, x0, d, t)
        trial = _Trial(t, f, dg, g, gg)
        search.seen(trial)
        return trial

    def _accept(self, search, x0, d, trial):
        """Move to ``trial`` (None: no trial decreased the loss enough);
        the parameters and their gradients become the trial's."""
        if trial is None:
            return None, None, None, None
        if trial is not search.last:
            self._set_params(torch.add(x0, d, alpha=trial.t))
            self._set_grads(trial.g)
        return trial.t, trial.f, trial.g, trial.gg

    @torch.no_grad()
    def step(self, closure):
        """Collective: ``max_iter`` L-BFGS iterations; the loss at the start."""
        if closure is None or not callable(closure):
            raise TypeError("LBFGS.step needs a closure: it evaluates the loss several times")
        group = self.param_groups[0]
        for k in _OPTIONS:  # a state saved before an option existed
            group.setdefault(k, self.defaults[k])
        _check_options(**{k: group[k] for k in _OPTIONS})
        self.last_step = dict(loss=None, new_loss=None, evaluations=0, backtracks=0,
                              step_lengths=[], pairs=0, skipped_pairs=0, resets=0, status="ok")
        hist = self._load_history(group)
        last, self._last = self._last, None
        if group["reuse_evaluation"] and self._unchanged(last):
            f, g, gg = last[1], last[2].clone(), last[3]
            self._set_grads(g)
        else:
            f, g, gg = self._evaluate(closure)
        self.last_step["loss"] = self.last_step["new_loss"] = f
        try:
            for _ in range(group["max_iter"]):
                if not (math.isfinite(f) and math.isfinite(gg)):
                    raise FloatingPointError(f"the loss ({f}) or its gradient (norm^2 {gg}) is "
                                             "not finite at the current parameters")
                if math.sqrt(gg) <= group["grad_tol"] or gg == 0.0:
                    self.last_step["status"] = "converged"
                    break
                x0 = self._flat_params()
                result, hist = self._iterate(closure, x0, f, g, gg, hist, group)
                if result is None:
                    self._set_params(x0)  # no decrease found: stay where we were
                    self.last_step["status"] = "failed"
                    if group["on_failure"] == "raise":
                        raise LineSearchError(
                            f"no step length ({_budget(group)}) satisfied the Armijo "
                            "condition, not even along -g: the gradient may be wrong or "
                            "inexact (increase the MGRIT iterations), or the line search's "
                            "budget too small")
                    break
                t, f_new, g_new, gg_new, d = result
                hist = self._add_pair(hist, d.mul_(t), g_new - g, group)
                f, g, gg = f_new, g_new, gg_new
                self.last_step["new_loss"] = f
                self.last_step["step_lengths"].append(t)
            self._last = (self._flat_params(), f, g, gg)  # where the parameters are now
        finally:
            self._publish(hist[0], hist[1])
            self.last_step["pairs"] = hist[0].shape[0]
        return self.last_step["loss"]

    def _unchanged(self, last):
        """Collective: whether every rank's parameters are bitwise those of
        ``last`` (each rank sends its yes/no to every rank)."""
        mine = last is not None and torch.equal(self._flat_params(), last[0])
        guard(self.comm, "an L-BFGS agreement")
        return all(self.comm.allgather(mine))

    def _iterate(self, closure, x0, f, g, gg, hist, group):
        """One iteration: direction and line search, with one retry along -g
        after dropping the history.  ((t, f, g, ||g||^2, d) or None, history)."""
        S = hist[0]
        if S.shape[0] > 0:
            d = self._direction(hist, g)
            gd = _allsum(self.comm, [_dot(g, d)])[0]
            if gd < 0:
                t, *new = self._line_search(closure, x0, f, d, gd, group["lr"], group)
                if t is not None:
                    return (t, *new, d), hist
            # not a descent direction (round-off) or no decrease: start afresh
            self.last_step["resets"] += 1
            self.last_step["status"] = "reset"
            hist = (S[:0], hist[1][:0], [], 1.0)
        d = g.neg()
        t0 = group["lr"] * min(1.0, 1.0 / math.sqrt(gg))
        t, *new = self._line_search(closure, x0, f, d, -gg, t0, group)
        if t is None:
            return None, hist
        return (t, *new, d), hist


class _Trial:
    """One point of a line search: t, phi(t), phi'(t), and the local
    gradient and ||g||^2 there (None for the start point)."""
    __slots__ = ("t", "f", "dg", "g", "gg")

    def __init__(self, t, f, dg, g, gg):
        self.t, self.f, self.dg, self.g, self.gg = t, f, dg, g, gg


class _WolfeState:
    """The conditions of a strong Wolfe search from phi(0) = f0, phi'(0) =
    gd0 < 0, its evaluation count, the last trial and the best trial that
    satisfies the Armijo condition (lowest loss, the earliest of equals)."""

    def __init__(self, f0, gd0, c1, c2):
        self.f0, self.gd0, self.c1, self.c2 = f0, gd0, c1, c2
        self.evals, self.best, self.last = 0, None, None

    def armijo(self, trial):
        return trial.f <= self.f0 + self.c1 * trial.t * self.gd0  # False for NaN

    def curvature(self, trial):
        return abs(trial.dg) <= -self.c2 * self.gd0  # False for NaN

    def seen(self, trial):
        self.evals += 1
        self.last = trial
        if (self.armijo(trial) and math.isfinite(trial.dg)
                and (self.best is None or trial.f < self.best.f)):
            self.best = trial


def _cubic_min(p, q):
    """The minimiser of the cubic through (t, phi, phi') at p and q, or None
    when it has none or the numbers are not finite."""
    if not all(math.isfinite(v) for v in (p.t, p.f, p.dg, q.t, q.f, q.dg)) or p.t == q.t:
        return None
    d1 = p.dg + q.dg - 3.0 * (p.f - q.f) / (p.t - q.t)
    disc = d1 * d1 - p.dg * q.dg
    if not disc >= 0:
        return None
    d2 = math.copysign(math.sqrt(disc), q.t - p.t)
    denom = q.dg - p.dg + 2.0 * d2
    if denom == 0:
        return None
    t = q.t - (q.t - p.t) * (q.dg + d2 - d1) / denom
    return t if math.isfinite(t) else None


def _quadratic_min(p, q):
    """The minimiser of the parabola through phi(p.t), phi'(p.t) and
    phi(q.t), or None when it opens downwards."""
    if not all(math.isfinite(v) for v in (p.t, p.f, p.dg, q.t, q.f)) or p.t == q.t:
        return None
    dt = q.t - p.t
    curv = q.f - p.f - p.dg * dt
    if not curv > 0:
        return None
    return p.t - p.dg * dt * dt / (2.0 * curv)


def _budget(group):
    if group["line_search"] == "strong-wolfe":
        return f"strong Wolfe search, {group['max_line_evals']} evaluations"
    return f"t = lr*shrink^j, j <= {group['max_backtracks']}"


def _check_options(*, lr, history, max_iter, max_backtracks, c1, shrink, grad_tol,
                   curvature_eps, on_failure, line_search="armijo", c2=0.9, max_line_evals=25,
                   reuse_evaluation=False):
    def positive_int(name, v, low):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < low:
            raise ValueError(f"{name}={v!r}: must be an integer >= {low}")

    def number(name, v, ok, what):
        if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                and ok(v)):
            raise ValueError(f"{name}={v!r}: must be {what}")

    number("lr", lr, lambda v: v >= 0, "a finite number >= 0")
    positive_int("history", history, 1)
    positive_int("max_iter", max_iter, 1)
    positive_int("max_backtracks", max_backtracks, 0)
    number("c1", c1, lambda v: 0 < v < 1, "in (0, 1)")
    number("shrink", shrink, lambda v: 0 < v < 1, "in (0, 1)")
    number("grad_tol", grad_tol, lambda v: v >= 0, ">= 0")
    number("curvature_eps", curvature_eps, lambda v: v >= 0, ">= 0")
    if on_failure not in _ON_FAILURE:
        raise ValueError(f"on_failure={on_failure!r}: choose one of {_ON_FAILURE}")
    if line_search not in LINE_SEARCHES:
        raise ValueError(f"line_search={line_search!r}: choose one of {LINE_SEARCHES}")
    number("c2", c2, lambda v: c1 < v < 1, f"in (c1, 1) = ({c1}, 1)")
    positive_int("max_line_evals", max_line_evals, 1)
    if not isinstance(reuse_evaluation, bool):
        raise ValueError(f"reuse_evaluation={reuse_evaluation!r}: must be True or False")


# ---------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------
SCHEDULES = ("constant", "step", "cosine")


def schedule(name, *, epochs=None, step_epochs=10, decay=0.5, min_factor=0.0):
    """The factor multiplying the base learning rate, as a function of the
    epoch (0, 1, ...):

      'constant'  1
      'step'      decay ** (epoch // step_epochs)
      'cosine'    min_factor + (1 - min_factor) * (1 + cos(pi*e/epochs)) / 2,
                  e = min(epoch, epochs); needs ``epochs``

    Use it directly (``group['lr'] = lr * f(epoch)``) or through
    ``scheduler``."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule {name!r}: choose one of {SCHEDULES}")
    if name == "constant":
        return lambda epoch: 1.0
    if name == "step":
        if not isinstance(step_epochs, int) or isinstance(step_epochs, bool) or step_epochs < 1:
            raise ValueError(f"step_epochs={step_epochs!r}: must be an integer >= 1")
        if not (isinstance(decay, (int, float)) and 0 < decay <= 1):
            raise ValueError(f"decay={decay!r}: must be in (0, 1]")
        return lambda epoch: float(decay) ** (epoch // step_epochs)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs={epochs!r}: the cosine schedule needs the number of epochs "
                         "(an integer >= 1)")
    if not (isinstance(min_factor, (int, float)) and 0 <= min_factor <= 1):
        raise ValueError(f"min_factor={min_factor!r}: must be in [0, 1]")

    def cosine(epoch):
        e = min(epoch, epochs)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * e / epochs))
    return cosine


def scheduler(optimizer, name, **options):
    """A ``torch.optim.lr_scheduler.LambdaLR`` for ``schedule(name,
    **options)``: call ``.step()`` once per epoch, after the optimiser's
    steps.  Works with ``LBFGS`` and any torch optimiser."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(name, **options))


# ---------------------------------------------------------------------------
# Regularisation
# ---------------------------------------------------------------------------
_PENALTY_COMMS = weakref.WeakKeyDictionary()


def _penalty_comm(body):
    """A duplicate of the body's communicator for the penalty messages, made
    once per network (collective at the first call), so that they never meet
    the MGRIT solver's; a LayerParallel frees it in its close()."""
    if hasattr(body, "communicator"):
        return body.communicator("penalty")
    comm = _PENALTY_COMMS.get(body)
    if comm is None:
        comm = _PENALTY_COMMS[body] = body.comm.Dup()
    return comm


def _layer_params(body, n):
    return dict(body.layer(n).named_parameters())


def _structure_error(a, b, na, nb):
    if list(a) != list(b):
        return (f"layers {na} and {nb} have different parameters ({list(a)} and {list(b)}): "
                "the smoothness penalty needs the same parameters in every layer")
    for k in a:
        if a[k].shape != b[k].shape:
            return (f"parameter {k!r} has shape {tuple(a[k].shape)} in layer {na} and "
                    f"{tuple(b[k].shape)} in layer {nb}: the smoothness penalty needs the "
                    "same shapes in every layer")
    return None


def regularize(net, *, tikhonov=0.0, smoothness=0.0, ends=False, add_grad=True):
    """Collective: the penalty

        tikhonov/2 * sum_n ||theta_n||^2
      + smoothness/2 * sum_{n>=1} ||(theta_n - theta_{n-1}) / h||^2

    over the residual layers n = 0..N-1 of a ``Network`` (or a
    ``LayerParallel``), h = T/N; the difference is taken between parameters
    of the same name in consecutive layers (every layer must have the same
    parameters).  ``ends=True`` adds the opening and closing layers'
    parameters to the Tikhonov term (a ``Network`` only).

    Returns the value, the same float on every rank.  With ``add_grad``
    (default) it also adds the penalty's gradient to each local parameter's
    ``.grad`` (creating it if None): call it after ``loss.backward()`` and
    add the value to the loss.  The smoothness term couples the last layer of
    one rank with the first of the next: each rank sends its first layer's
    parameters to its left neighbour and its last layer's to its right
    neighbour, and nothing else.
    """
    body = getattr(net, "body", net)
    if not all(hasattr(body, a) for a in ("layers", "layer_indices", "comm", "h")):
        raise TypeError(f"regularize needs a layerpar Network or LayerParallel, not "
                        f"{type(net).__name__}")
    for name, v in (("tikhonov", tikhonov), ("smoothness", smoothness)):
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and v >= 0):
            raise ValueError(f"{name}={v!r}: a penalty weight must be a finite number >= 0")
    if ends and body is net:
        raise TypeError("ends=True needs a Network (with opening and closing layers)")
    if tikhonov == 0 and smoothness == 0:
        return 0.0
    comm = _penalty_comm(body)
    beta, gamma, h = float(tikhonov), float(smoothness), body.h
    indices = body.layer_indices
    local = 0.0
    grads = {}  # id(parameter) -> (parameter, gradient of the penalty)

    def add(p, g):
        if id(p) in grads:
            grads[id(p)] = (p, grads[id(p)][1] + g)
        else:
            grads[id(p)] = (p, g)

    with torch.no_grad():
        if beta:
            groups = [body.layer(n) for n in indices]
            if ends:
                groups += [m for m in (net.opening, net.closing) if m is not None]
            for module in groups:
                for p in module.parameters():
                    local += 0.5 * beta * float((p * p).sum())
                    add(p, beta * p)
        if gamma:
            local += _smoothness(body, comm, gamma, h, add)
    value = float(_allsum(comm, [local])[0])
    if add_grad:
        with torch.no_grad():
            for p, g in grads.values():
                if p.grad is None:
                    p.grad = g.detach().clone()
                else:
                    p.grad.add_(g)
    return value


def _smoothness(body, comm, gamma, h, add):
    """The local part of the smoothness penalty (terms n >= 1 of our layers)
    and its gradient for our layers (through ``add``)."""
    rank, size, N = comm.Get_rank(), comm.Get_size(), body.nlayers
    first, last = body.layer_indices[0], body.layer_indices[-1]
    left = rank - 1 if rank > 0 else MPI.PROC_NULL
    right = rank + 1 if rank < size - 1 else MPI.PROC_NULL
    mine = {n: _layer_params(body, n) for n in body.layer_indices}

    def packed(n):
        return {k: p.detach().clone() for k, p in mine[n].items()}

    # our last layer -> right neighbour (theta_{n-1} of its first layer n);
    # the left neighbour's last layer <- left (theta_{first-1} of ours)
    from_left = sendrecv(comm, packed(last), right, left, tag("penalty.from_left"),
                         "a layer from the left neighbour")
    # our first layer -> left neighbour (its last layer's right-hand term
    # needs theta_{n+1}); the right neighbour's first layer <- right
    from_right = sendrecv(comm, packed(first), left, right, tag("penalty.from_right"),
                          "a layer from the right neighbour")

    theta = dict(mine)
    if from_left is not None:
        theta[first - 1] = from_left
    if from_right is not None:
        theta[last + 1] = from_right
    msg = None
    for n in range(max(first - 1, 0), min(last + 1, N - 1)):
        if n in theta and n + 1 in theta:
            msg = msg or _structure_error(theta[n], theta[n + 1], n, n + 1)
    agree(comm, msg)

    local = 0.0
    for n in body.layer_indices:
        for k, p in mine[n].items():
            g = torch.zeros_like(p)
            if n >= 1:  # term n: gamma/2 ||(theta_n - theta_{n-1})/h||^2
                D = (p - theta[n - 1][k]) / h
                local += 0.5 * gamma * float((D * D).sum())
                g += gamma / h * D
            if n <= N - 2:  # term n+1 depends on theta_n too
                g -= gamma / h * ((theta[n + 1][k] - p) / h)
            add(p, g)
    return local
