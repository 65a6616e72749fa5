"""Distributed L-BFGS for parameters split over the ranks of a communicator.

Each rank holds only the parameters of its own layers; a global parameter
vector is the concatenation over the ranks.  Every inner product and norm
below is therefore a local sum followed by a sum over the communicator, so
that the iterates do not depend on the number of ranks (up to round-off).
The line searches are ``layerpar.optim.linesearch``'s free functions over
the objective along the search direction.
"""
import math
import numbers

import torch

from layerpar.optim import history
from layerpar.optim._flat import FlatOptimizer
from layerpar.optim._sums import allsum as _allsum, dot as _dot
from layerpar.optim.linesearch import (LINE_SEARCHES, LineSearchError, Trial, armijo,
                                       backtracking, strong_wolfe)

__all__ = ["LBFGS", "CURVATURE_RULES", "STRONG_WOLFE_C2"]

_ON_FAILURE = ("reset", "raise")
STRONG_WOLFE_C2 = 0.9  # the default curvature constant of the strong Wolfe search
# the curvature rules and their Powell damping threshold (0: none)
CURVATURE_RULES = {"skip": 0.0, "damped": 0.2}
_OPTIONS = ("lr", "history", "max_iter", "max_backtracks", "c1", "shrink", "grad_tol",
            "curvature_eps", "on_failure", "line_search", "c2", "max_line_evals",
            "reuse_evaluation", "curvature")


class LBFGS(FlatOptimizer):
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
      curvature       what a new pair (s, y) with little or negative curvature
                      becomes.  'skip' (default): dropped when y.s <=
                      curvature_eps*||y||*||s||.  'damped': Powell's damping
                      first (Nocedal & Wright, Procedure 18.2): when y.s <
                      0.2 s.Bs, y is replaced by theta*y + (1-theta)*Bs so
                      that y.s = 0.2 s.Bs, with B the inverse of the H that
                      gave the step (B s = -t g, no extra work); the pair is
                      kept, so the history keeps learning where the loss is
                      not convex.  Then the 'skip' test (for pairs s.Bs
                      cannot rescue, e.g. NaN)
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
    'pairs', 'skipped_pairs', 'damped_pairs', 'resets', 'status' ('ok', 'reset',
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

    _what = "L-BFGS"

    def __init__(self, params, comm, *, lr=1.0, history=10, max_iter=1, max_backtracks=20,
                 c1=1e-4, shrink=0.5, grad_tol=0.0, curvature_eps=1e-10, on_failure="reset",
                 line_search="armijo", c2=STRONG_WOLFE_C2, max_line_evals=25,
                 reuse_evaluation=False, curvature="skip"):
        _check_options(lr=lr, history=history, max_iter=max_iter,
                       max_backtracks=max_backtracks, c1=c1, shrink=shrink, grad_tol=grad_tol,
                       curvature_eps=curvature_eps, on_failure=on_failure,
                       line_search=line_search, c2=c2, max_line_evals=max_line_evals,
                       reuse_evaluation=reuse_evaluation, curvature=curvature)
        defaults = dict(lr=lr, history=history, max_iter=max_iter,
                        max_backtracks=max_backtracks, c1=c1, shrink=shrink, grad_tol=grad_tol,
                        curvature_eps=curvature_eps, on_failure=on_failure,
                        line_search=line_search, c2=c2, max_line_evals=max_line_evals,
                        reuse_evaluation=reuse_evaluation, curvature=curvature)
        super().__init__(params, comm, defaults)

    # ---- history: the per-parameter state <-> flat matrices ------------------
    def _load_history(self, group):
        """Collective: the history from ``self.state`` (``history.load``)."""
        return history.load(self.comm, self._params, self.state, self._dtype, self._device,
                            keep=group["history"])

    def _publish(self, S, Y):
        history.publish(self._params, self.state, S, Y)

    def _add_pair(self, hist, s, y, group, bs=None):
        hist, kept, damped = history.add_pair(self.comm, hist, s, y, keep=group["history"],
                                      curvature_eps=group["curvature_eps"], bs=bs,
                                      damping=CURVATURE_RULES[group["curvature"]])
        self.last_step["skipped_pairs"] += not kept
        self.last_step["damped_pairs"] += damped
        return hist

    def _direction(self, hist, g):
        return history.direction(self.comm, hist, g)

    # ---- the line search ---------------------------------------------------
    def _line_search(self, closure, x0, f0, d, gd, t, group):
        """Collective: a step length along d from x0 by the configured search
        over phi(t) = f(x0 + t d).  Returns (t, f, g, ||g||^2) at the
        accepted point, or Nones if no trial decreased the loss enough (the
        parameters are then at the last trial)."""
        wolfe = group["line_search"] == "strong-wolfe"

        def phi(t):
            # every rank evaluates at its slice of x0 + t d; f and (for the
            # strong Wolfe search) phi'(t) = g.d are the same on every rank
            self._set_params(torch.add(x0, d, alpha=t))
            f, g, gg = self._evaluate(closure)
            dg = float(_allsum(self.comm, [_dot(g, d)])[0]) if wolfe else math.nan
            return Trial(t, f, dg, (g, gg))

        if wolfe:
            search = strong_wolfe(phi, t, f0=f0, slope=gd, c1=group["c1"], c2=group["c2"],
                                  max_evals=group["max_line_evals"])
        else:
            search = backtracking(phi, t, armijo(f0, gd, group["c1"]), shrink=group["shrink"],
                                  max_trials=group["max_backtracks"] + 1)
        self.last_step["backtracks"] += search.evals - 1
        best = search.best
        if best is None:
            return None, None, None, None
        if best is not search.last:  # an earlier trial: back to it
            self._set_params(torch.add(x0, d, alpha=best.t))
            self._set_grads(best.data[0])
        return (best.t, best.f) + best.data

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
                              step_lengths=[], pairs=0, skipped_pairs=0, damped_pairs=0, resets=0,
                              status="ok")
        hist = self._load_history(group)
        f, g, gg, evaluated = self._start(closure, group)
        self.last_step["loss"] = self.last_step["new_loss"] = f
        try:
            for _ in range(group["max_iter"]):
                if self._converged(f, gg, group):
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
                # d = -H g, so B s = -t g for the s = t d taken (B = H^-1)
                hist = self._add_pair(hist, d.mul_(t), g_new - g, group, bs=g.mul(-t))
                f, g, gg = f_new, g_new, gg_new
                self.last_step["new_loss"] = f
                self.last_step["step_lengths"].append(t)
            self._last = (self._flat_params(), f, g, gg)  # where the parameters are now
        finally:
            self._publish(hist[0], hist[1])
            self.last_step["pairs"] = hist[0].shape[0]
        return self.last_step["loss"]

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


def _budget(group):
    if group["line_search"] == "strong-wolfe":
        return f"strong Wolfe search, {group['max_line_evals']} evaluations"
    return f"t = lr*shrink^j, j <= {group['max_backtracks']}"


def _check_options(*, lr, history, max_iter, max_backtracks, c1, shrink, grad_tol,
                   curvature_eps, on_failure, line_search="armijo", c2=0.9, max_line_evals=25,
                   reuse_evaluation=False, curvature="skip"):
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
    if not isinstance(curvature, str) or curvature not in CURVATURE_RULES:
        raise ValueError(f"curvature={curvature!r}: choose one of {tuple(CURVATURE_RULES)}")


