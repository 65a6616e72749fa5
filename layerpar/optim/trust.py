"""The trust-region rules of the globalised multilevel method (``RMTR``) and
of the L-SR1 optimiser (``LSR1``), as plain functions of floats (no torch, no communication): every rank
computes the same floats, so every rank takes the same decision.

    rho = ratio(actual, predicted)
    accepted, radius = update(radius, rho, step_norm, bound)

A coarse correction s predicts the decrease ``predicted`` = m_H(y0) -
m_H(y) of its coarse model and achieves ``actual`` = f(x) - f(x + s) on
the fine level.  It is accepted when rho = actual / predicted >= ``accept``
(eta_1); then, when rho >= ``grow_at`` (eta_2) and the step reached the
bound it was given (|s| >= ``boundary`` * bound), the radius grows by
``grow`` (gamma_2), up to ``max_radius``; a rejected correction shrinks it
by ``shrink`` (gamma_1), down to ``min_radius``; otherwise it stays.  This
is the update of Gratton, Sartenaer and Toint's recursive multilevel trust
region (RMTR, SIAM J. Optim. 19, 2008), Algorithm 2.1, with the constants
named as there.
"""
import math

ACCEPT = 0.1     # eta_1: the least ratio of an accepted correction
GROW_AT = 0.75   # eta_2: a ratio at least this, at the boundary, grows the radius
SHRINK = 0.5     # gamma_1: the radius after a rejection, relative
GROW = 2.0       # gamma_2: the radius after a very successful correction, relative
BOUNDARY = 0.9   # a step of at least this fraction of its bound reached the boundary


def ratio(actual, predicted, noise=0.0):
    """actual / predicted decrease; -inf when the model predicts no decrease
    (predicted <= 0) or a value is not finite: such a step is rejected.

    ``noise`` > 0 (the round-off of the objective's values, e.g. a few
    machine epsilons times |f|) is added to both decreases, so that steps
    whose decreases are both lost in round-off have a ratio near 1 instead
    of a random one (Conn, Gould & Toint, Trust-Region Methods, 2000,
    Section 17.4.2)."""
    if not (math.isfinite(actual) and math.isfinite(predicted)) or predicted <= 0:
        return -math.inf
    return (actual + noise) / (predicted + noise)


def update(radius, rho, step_norm, bound, *, accept=ACCEPT, grow_at=GROW_AT, shrink=SHRINK,
           grow=GROW, boundary=BOUNDARY, min_radius=0.0, max_radius=math.inf):
    """(accepted, new radius) after a correction of norm ``step_norm`` that
    was bounded by ``bound`` (<= radius) and achieved the ratio ``rho``."""
    if not rho >= accept:  # NaN and -inf included
        return False, max(shrink * radius, min_radius)
    if rho >= grow_at and step_norm >= boundary * bound:
        return True, min(grow * radius, max_radius)
    return True, radius
