"""Distributed limited-memory SR1 in a trust region (``LSR1``,
``optim.name = "lsr1"``).

At the iterate x with gradient g the model

    m(p) = f(x) + g.p + 1/2 p.B p,    |p| <= radius,

takes B from the symmetric-rank-one (SR1) update over the newest
``history`` pairs (s_i, y_i) = (step, change of the gradient), starting from
B_0 = gamma I with gamma = s.y / s.s of the newest pair of positive
curvature (its curvature along s; 1 without one):

    u_i = y_i - B_{i-1} s_i,   B_i = B_{i-1} + u_i u_i^T / (u_i.s_i),

a pair skipped when |u_i.s_i| < skip_eps |u_i| |s_i| (Nocedal & Wright,
Numerical Optimization, 2nd ed., (6.24)-(6.26)).  gamma is the smaller of
the usual scalings (s.y/s.s <= y.y/s.y): B_0 acts on the directions no pair
has explored, where the larger one made the steps needlessly short (on the
paper's peaks problem, 130 iterations, seeds 0-2: training loss 0.98 / 1.02
/ 0.98 against 1.16 / 1.20 / 1.23); the trust region bounds them.  Unlike BFGS, SR1 keeps
pairs of negative curvature, so B may be indefinite and follows a loss that
is not convex; a trust region keeps the step safe where a line search could
not (Byrd, Khalfan & Schnabel, SIAM J. Optim. 6, 1996).  Each iteration
minimises m exactly in the ball, takes p, and accepts x + p when the ratio
of actual to predicted decrease reaches ``accept``; the radius then follows
``layerpar.optim.trust.update`` (grows after a very successful step on
the boundary, shrinks after a rejected one); both decreases get 10 machine
epsilons times max(1, |f|) added, so that steps whose decreases are lost in
the round-off of f are accepted rather than judged by noise.  Every pair is
kept, whether its step was accepted or not: it still measures curvature.

The step is exact and costs one sum over the ranks.  B - gamma I has its
range in span{S, Y}, so the minimiser of m in the ball lies in span{g, S, Y}
(at most 2 history + 1 vectors).  The ranks sum the Gram matrix of those
vectors (one ``allsum``); from it every rank builds the same SR1
recursion, an orthonormal basis of the span and the model's Hessian in it
(a small dense matrix), solves the trust-region subproblem there by
eigen-decomposition and the secular equation (the hard case included;
Nocedal & Wright, Section 4.3), and combines its slices of g, S and Y with
the solution's coefficients.  The iterates therefore do not depend on the
number of ranks beyond round-off.

State and checkpoints as for ``LBFGS``: the pairs are stored per parameter
(``state[p] = {'s', 'y'}``, so a checkpoint by parameter name resumes on any
number of ranks), and the radius is the parameter group's ``'radius'``
(saved with the group's hyper-parameters).
"""
import math
import numbers

import numpy as np
import torch

from layerpar.optim import trust
from layerpar.optim import history
from layerpar.optim._flat import FlatOptimizer
from layerpar.optim._sums import allsum

__all__ = ["LSR1", "sr1_model", "trust_region_step"]

_OPTIONS = ("lr", "history", "max_iter", "accept", "max_radius", "skip_eps", "grad_tol",
            "reuse_evaluation")


class LSR1(FlatOptimizer):
    """Full-batch L-SR1 with a trust region, for parameters split over the
    ranks of ``comm`` (``params``: this rank's, one group; ``comm``:
    ``net.body.comm``).

    Keyword-only options (also in ``param_groups[0]``):
      lr                the initial trust radius (the first step's largest
                        length); the radius then follows the ratio test, so
                        a learning-rate schedule does not apply
      history           number of (s, y) pairs kept
      max_iter          iterations per ``step`` call
      accept            the least ratio actual / predicted decrease of an
                        accepted step, in (0, 1)
      max_radius        the largest radius (> 0; inf: none)
      skip_eps          a pair is left out of B when |u.s| < skip_eps*|u|*|s|
      grad_tol          stop when ||g|| <= grad_tol (0: only at g = 0)
      reuse_evaluation  as for ``LBFGS``: a call that finds the parameters
                        where the previous call left them starts from its
                        last loss and gradient

    ``step(closure)`` is collective; the closure is ``LBFGS``'s (zeroes the
    gradients, evaluates, calls backward, returns the loss that is the same
    on every rank).  An iteration costs one evaluation (the trial point);
    an accepted trial's gradient starts the next iteration.  Returns the
    loss at the start of the call.  ``last_step``: 'loss', 'new_loss',
    'evaluations', 'ratios', 'accepted', 'rejected', 'radius' (after the
    call), 'pairs', 'skipped_pairs' (left out of B in the last model),
    'status' ('ok', 'rejected': the last trial was, 'converged'),
    'point_evaluation' (which of the call's closure evaluations, from 0,
    was at the point where the call leaves the parameters; None when that
    point's evaluation came from the previous call).
    """

    _what = "L-SR1"

    def __init__(self, params, comm, *, lr=1.0, history=10, max_iter=1,
                 accept=trust.ACCEPT, max_radius=math.inf, skip_eps=1e-8, grad_tol=0.0,
                 reuse_evaluation=False):
        options = dict(lr=lr, history=history, max_iter=max_iter, accept=accept,
                       max_radius=max_radius, skip_eps=skip_eps, grad_tol=grad_tol,
                       reuse_evaluation=reuse_evaluation)
        _check_options(**options)
        super().__init__(params, comm, options)
        # the round-off of the objective's values, relative
        self._noise = 10 * torch.finfo(self._dtype).eps

    @torch.no_grad()
    def step(self, closure):
        """Collective: ``max_iter`` trust-region iterations; the loss at the start."""
        if closure is None or not callable(closure):
            raise TypeError("LSR1.step needs a closure: it evaluates the loss at each trial")
        group = self.param_groups[0]
        _check_options(**{k: group[k] for k in _OPTIONS})
        radius = group.setdefault("radius", float(group["lr"]))
        if not (isinstance(radius, numbers.Real) and radius > 0):
            raise ValueError(f"the trust radius in the optimiser state is {radius!r}: "
                             "it must be a number > 0")
        self.last_step = dict(loss=None, new_loss=None, evaluations=0, ratios=[], accepted=0,
                              rejected=0, radius=radius, pairs=0, skipped_pairs=0,
                              status="ok", point_evaluation=None)
        S, Y = history.load(self.comm, self._params, self.state, self._dtype, self._device,
                            keep=group["history"], curvature=False)
        f, g, gg, evaluated = self._start(closure, group)
        if evaluated:
            self.last_step["point_evaluation"] = 0
        self.last_step["loss"] = self.last_step["new_loss"] = f
        try:
            for _ in range(group["max_iter"]):
                if self._converged(f, gg, group):
                    self.last_step["status"] = "converged"
                    break
                coef, norm, predicted, skipped = self._model_step(g, S, Y, radius, group)
                self.last_step["skipped_pairs"] = skipped
                k = S.shape[0]
                p = g.mul(float(coef[0]))
                for i in range(k):
                    p.add_(S[i], alpha=float(coef[1 + i])).add_(Y[i], alpha=float(coef[1 + k + i]))
                x0 = self._flat_params()
                self._set_params(x0 + p)
                f_new, g_new, gg_new = self._evaluate(closure)
                # the decreases at the round-off of f count as equal
                rho = trust.ratio(f - f_new, predicted, noise=self._noise * max(1.0, abs(f)))
                accepted, radius = trust.update(radius, rho, norm, radius,
                                                accept=group["accept"],
                                                max_radius=group["max_radius"])
                group["radius"] = radius
                self.last_step["ratios"].append(rho)
                if norm > 0:  # the pair, accepted or not
                    m = group["history"]
                    S = torch.cat([S[-(m - 1):] if m > 1 else S[:0], p[None]])
                    Y = torch.cat([Y[-(m - 1):] if m > 1 else Y[:0], (g_new - g)[None]])
                if accepted:
                    f, g, gg = f_new, g_new, gg_new
                    self.last_step["point_evaluation"] = self.last_step["evaluations"] - 1
                    self.last_step["accepted"] += 1
                    self.last_step["new_loss"] = f
                    self.last_step["status"] = "ok"
                else:
                    self._set_params(x0)
                    self._set_grads(g)
                    self.last_step["rejected"] += 1
                    self.last_step["status"] = "rejected"
            self._last = (self._flat_params(), f, g, gg)
        finally:
            history.publish(self._params, self.state, S, Y)
            self.last_step["pairs"] = S.shape[0]
            self.last_step["radius"] = group["radius"]
        return self.last_step["loss"]

    def _model_step(self, g, S, Y, radius, group):
        """Collective (one sum): the minimiser of the model in the ball as
        coefficients of [g, S, Y], its norm, the predicted decrease and the
        number of pairs left out of B."""
        V = torch.cat([g[None], S, Y]).to(torch.float64)
        local = (V @ V.T).cpu().numpy()
        q = local.shape[0]
        G = allsum(self.comm, local.reshape(-1)).reshape(q, q)
        G = 0.5 * (G + G.T)
        k = S.shape[0]
        gamma, us, cs, skipped = sr1_model(G, k, group["skip_eps"])
        coef, norm, predicted = subspace_step(G, gamma, us, cs, radius,
                                              rank_tol=_rank_tol(self._dtype))
        return coef, norm, predicted, skipped


def _rank_tol(dtype):
    # the Gram matrix's eigenvalues below this fraction of its largest are
    # round-off of (nearly) dependent vectors: directions left out
    return 1e3 * torch.finfo(dtype).eps


def sr1_model(G, k, skip_eps):
    """The L-SR1 matrix of the pairs whose Gram matrix with g is ``G``
    (order g, s_1..s_k, y_1..y_k; oldest pair first), as (gamma, us, cs,
    skipped): B = gamma I + sum_j u_j u_j^T / c_j with each u_j a
    coefficient vector over those 2k + 1 vectors (inner products <a, b> =
    a^T G b)."""
    q = 2 * k + 1
    gamma = 1.0
    for i in reversed(range(k)):
        sy, yy, ss = G[1 + i, 1 + k + i], G[1 + k + i, 1 + k + i], G[1 + i, 1 + i]
        if sy > 1e-12 * math.sqrt(max(yy * ss, 0.0)) and ss > 0:
            gamma = float(sy / ss)
            break
    us, cs, skipped = [], [], 0
    for i in range(k):
        s = np.zeros(q)
        s[1 + i] = 1.0
        bs = gamma * s
        for u, c in zip(us, cs):
            bs = bs + u * (u @ G @ s) / c
        u = -bs
        u[1 + k + i] += 1.0  # y_i - B s_i
        c = float(u @ G @ s)
        uu = max(float(u @ G @ u), 0.0)
        ss = max(float(G[1 + i, 1 + i]), 0.0)
        if uu == 0.0 or not abs(c) >= skip_eps * math.sqrt(uu * ss):  # NaN skipped too
            skipped += 1
            continue
        us.append(u)
        cs.append(c)
    return gamma, us, cs, skipped


def subspace_step(G, gamma, us, cs, radius, *, rank_tol=1e-12):
    """The trust-region step in span{g, S, Y} (``sr1_model``'s vectors):
    (coefficients over those vectors, the step's norm, the predicted
    decrease -(g.p + 1/2 p.B p))."""
    q = G.shape[0]
    # the vectors scaled to unit length first: a small g beside long old
    # steps is a direction like any other, not round-off to drop
    d = np.sqrt(np.clip(np.diag(G), 0.0, None))
    inv = np.divide(1.0, d, out=np.zeros(q), where=d > 0)
    lam, U = np.linalg.eigh(inv[:, None] * G * inv[None, :])
    keep = lam > rank_tol * max(lam[-1], 0.0)
    if not keep.any():  # g = 0 and no pairs: no step
        return np.zeros(q), 0.0, 0.0
    # an orthonormal basis w_a = sum_i Q[i, a] e_i of the span
    Q = inv[:, None] * (U[:, keep] / np.sqrt(lam[keep]))
    gw = Q.T @ G[:, 0]
    Bw = gamma * np.eye(Q.shape[1])
    for u, c in zip(us, cs):
        a = Q.T @ (G @ u)
        Bw += np.outer(a, a) / c
    Bw = 0.5 * (Bw + Bw.T)
    cw = trust_region_step(Bw, gw, radius)
    predicted = -float(gw @ cw + 0.5 * cw @ Bw @ cw)
    return Q @ cw, float(np.linalg.norm(cw)), predicted


def trust_region_step(B, g, radius):
    """The exact minimiser of g.p + 1/2 p.B p over |p| <= radius for a small
    dense symmetric B (any inertia): p = -(B + sigma I)^-1 g with sigma >= 0,
    B + sigma I positive semi-definite, sigma (|p| - radius) = 0; sigma from
    the secular equation by bisection, and the hard case (g orthogonal to
    B's lowest eigenvectors) by a step along one of them to the boundary
    (Nocedal & Wright, Theorem 4.1 and Section 4.3)."""
    mu, W = np.linalg.eigh(B)
    gh = W.T @ g
    gnorm = float(np.linalg.norm(g))
    scale = max(1.0, float(np.max(np.abs(mu))))
    if mu[0] > 1e-14 * scale:
        p = -gh / mu
        if np.linalg.norm(p) <= radius:
            return W @ p
    lo = max(0.0, -float(mu[0]))
    low = mu <= mu[0] + 1e-12 * scale
    if mu[0] <= 1e-14 * scale and np.linalg.norm(gh[low]) <= 1e-12 * max(gnorm, 1e-300):
        # the hard case, if the step at sigma = -mu_min stays inside
        p = np.zeros_like(gh)
        rest = ~low
        p[rest] = -gh[rest] / (mu[rest] + lo)
        inside = float(np.linalg.norm(p))
        if inside <= radius:
            p[np.argmax(low)] = math.sqrt(max(radius ** 2 - inside ** 2, 0.0))
            return W @ p

    def norm_at(sigma):
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.linalg.norm(gh / (mu + sigma)))

    # |p(sigma)| falls from above radius at lo to at most gnorm/(mu_min+sigma)
    hi = max(lo, gnorm / radius - float(mu[0])) + 1e-12 * scale
    while norm_at(hi) > radius:  # round-off: widen
        hi = 2.0 * hi + 1e-12 * scale
    a, b = lo, hi
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mid <= a or mid >= b:
            break
        if norm_at(mid) > radius or not math.isfinite(norm_at(mid)):
            a = mid
        else:
            b = mid
    p = -gh / (mu + b)
    n = float(np.linalg.norm(p))
    if n > 0:
        p *= min(1.0, radius / n)
    return W @ p


def _check_options(*, lr, history, max_iter, accept, max_radius, skip_eps, grad_tol,
                   reuse_evaluation):
    def positive_int(name, v, low):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < low:
            raise ValueError(f"{name}={v!r}: must be an integer >= {low}")

    def number(name, v, ok, what, finite=True):
        if not (isinstance(v, numbers.Real) and not isinstance(v, bool)
                and (math.isfinite(v) or not finite) and not math.isnan(v) and ok(v)):
            raise ValueError(f"{name}={v!r}: must be {what}")

    number("lr", lr, lambda v: v > 0, "a finite number > 0 (the initial trust radius)")
    positive_int("history", history, 1)
    positive_int("max_iter", max_iter, 1)
    number("accept", accept, lambda v: 0 < v < 1, "in (0, 1)")
    number("max_radius", max_radius, lambda v: v > 0, "> 0 (inf: no bound)", finite=False)
    number("skip_eps", skip_eps, lambda v: v >= 0, ">= 0")
    number("grad_tol", grad_tol, lambda v: v >= 0, ">= 0")
    if not isinstance(reuse_evaluation, bool):
        raise ValueError(f"reuse_evaluation={reuse_evaluation!r}: must be True or False")
