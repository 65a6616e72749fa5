"""Line searches as free functions over phi(t), the objective along a line.

The caller owns the line: ``phi(t)`` moves its variables to x0 + t*d,
evaluates there and returns a ``Trial`` (t, phi(t), phi'(t) when the search
needs it, and whatever the caller wants back for the accepted point).  The
searches only choose the trial steps and decide from the floats phi
returns, so when phi returns the same floats on every rank (sums over the
ranks, as in ``LBFGS``) every rank takes the same trials, and a search is
collective exactly when phi is.

    search = backtracking(phi, 1.0, armijo(f0, slope, c1), shrink=0.5, max_trials=21)
    search = backtracking(phi, 1.0, decrease(f0), shrink=0.5, max_trials=4)
    search = strong_wolfe(phi, 1.0, f0=f0, slope=slope, c1=1e-4, c2=0.9, max_evals=25)

Each returns a ``Search``: ``best`` (the accepted trial, None when there is
none), ``last`` (the trial evaluated last: where phi left the variables)
and ``evals``.  A caller whose accepted trial is not the last one moves its
variables back to it (the strong Wolfe search may accept an earlier trial).

No torch here: the searches work on floats.
"""
import math

LINE_SEARCHES = ("armijo", "strong-wolfe")


class LineSearchError(RuntimeError):
    """No step length satisfied the line search's sufficient-decrease
    (Armijo) condition, not even along the steepest-descent direction.
    Raised on every rank at once."""


class Trial:
    """One point of a line search: ``t``, ``f`` = phi(t), ``dg`` = phi'(t)
    (NaN when not evaluated) and the caller's ``data``."""
    __slots__ = ("t", "f", "dg", "data")

    def __init__(self, t, f, dg=math.nan, data=None):
        self.t, self.f, self.dg, self.data = t, f, dg, data


class Search:
    """The outcome of a line search: ``best`` (the accepted trial or None),
    ``last`` (the trial evaluated last) and ``evals`` (calls of phi)."""
    __slots__ = ("best", "last", "evals")

    def __init__(self, best, last, evals):
        self.best, self.last, self.evals = best, last, evals


# ---- acceptance tests for backtracking -----------------------------------------
def armijo(f0, slope, c1):
    """The sufficient-decrease (Armijo) test phi(t) <= f0 + c1*t*slope, with
    ``slope`` = phi'(0) < 0; false for NaN."""
    return lambda trial: trial.f <= f0 + c1 * trial.t * slope


def decrease(f0):
    """The test phi(t) < f0 (any decrease; false for NaN and for no change)."""
    return lambda trial: trial.f < f0


def backtracking(phi, t, accept, *, shrink=0.5, max_trials):
    """The first trial t, t*shrink, t*shrink^2, ... (at most ``max_trials``
    of them) that passes ``accept(trial)``."""
    if not 0 < shrink < 1:
        raise ValueError(f"shrink={shrink!r}: must be in (0, 1)")
    if max_trials < 1:
        raise ValueError(f"max_trials={max_trials!r}: must be >= 1")
    last = None
    for j in range(max_trials):
        last = phi(t)
        if accept(last):
            return Search(last, last, j + 1)
        t *= shrink
    return Search(None, last, max_trials)


# ---- strong Wolfe ----------------------------------------------------------------
class _Wolfe:
    """A strong Wolfe search from phi(0) = f0, phi'(0) = slope < 0: the
    conditions, the evaluations, the last trial and the best trial that
    satisfies the Armijo condition (lowest loss, the earliest of equals)."""

    def __init__(self, phi, f0, slope, c1, c2, max_evals):
        self.phi, self.f0, self.slope, self.c1, self.c2 = phi, f0, slope, c1, c2
        self.max_evals = max_evals
        self.evals, self.best, self.last = 0, None, None

    def armijo(self, trial):
        return trial.f <= self.f0 + self.c1 * trial.t * self.slope  # False for NaN

    def curvature(self, trial):
        return abs(trial.dg) <= -self.c2 * self.slope  # False for NaN

    def evaluate(self, t):
        trial = self.phi(t)
        self.evals += 1
        self.last = trial
        if (self.armijo(trial) and math.isfinite(trial.dg)
                and (self.best is None or trial.f < self.best.f)):
            self.best = trial
        return trial

    def result(self, trial):
        return Search(trial, self.last, self.evals)

    def zoom(self, lo, hi):
        """Nocedal & Wright, Algorithm 3.6: ``lo`` satisfies the Armijo
        condition with the lowest loss seen in the interval, and the
        interval between ``lo`` and ``hi`` contains strong Wolfe steps.
        The trial is the interpolated minimiser kept at least a tenth of the
        interval away from its ends (bisection otherwise)."""
        while self.evals < self.max_evals:
            a, b = min(lo.t, hi.t), max(lo.t, hi.t)
            if not b - a > 1e-14 * b:  # the interval has shrunk to round-off
                break
            guess = _cubic_min(lo, hi)
            if guess is None:
                guess = _quadratic_min(lo, hi)
            margin = 0.1 * (b - a)
            t = guess if guess is not None and a + margin <= guess <= b - margin else 0.5 * (a + b)
            cur = self.evaluate(t)
            if not self.armijo(cur) or cur.f >= lo.f:
                hi = cur
                continue
            if self.curvature(cur):
                return self.result(cur)
            if cur.dg * (hi.t - lo.t) >= 0:
                hi = lo
            lo = cur
        return self.result(self.best)


def strong_wolfe(phi, t, *, f0, slope, c1=1e-4, c2=0.9, max_evals=25):
    """A step satisfying the strong Wolfe conditions phi(t) <= f0 +
    c1*t*slope and |phi'(t)| <= c2*|slope| (Nocedal & Wright, Algorithm
    3.5): grow the trial step from ``t`` until an interval is known to hold
    acceptable steps, then shrink it.  ``phi(t)`` must give ``dg`` =
    phi'(t).  When ``max_evals`` run out, the trial with the lowest loss
    that satisfies the Armijo condition is accepted (if there is one)."""
    if not 0 < c1 < c2 < 1:
        raise ValueError(f"c1={c1!r}, c2={c2!r}: need 0 < c1 < c2 < 1")
    if max_evals < 1:
        raise ValueError(f"max_evals={max_evals!r}: must be >= 1")
    search = _Wolfe(phi, f0, slope, c1, c2, max_evals)
    prev = Trial(0.0, f0, slope)
    while search.evals < max_evals:
        cur = search.evaluate(t)
        if not search.armijo(cur) or (search.evals > 1 and cur.f >= prev.f):
            return search.zoom(prev, cur)
        if search.curvature(cur):
            return search.result(cur)
        if cur.dg >= 0:
            return search.zoom(cur, prev)
        # still descending at t: extrapolate, to at least 2.1 and at
        # most 5 times the last step from the previous trial
        low, high = t + 1.1 * (t - prev.t), t + 4.0 * (t - prev.t)
        guess = _cubic_min(prev, cur)
        prev, t = cur, min(max(guess, low), high) if guess is not None else high
    return search.result(search.best)


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
