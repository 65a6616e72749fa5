"""The L-BFGS history: curvature pairs (s_i, y_i) as flat local matrices,
the two-loop recursion, and the per-parameter optimiser state they are kept
in between calls.

A history is the tuple (S, Y, rho, gamma): S and Y of shape (k, n) hold
this rank's slices of the k newest pairs (oldest first), rho_i =
1/(y_i.s_i) and gamma = s.y/y.y of the newest pair (the scaling of the
initial inverse Hessian).  Every inner product is a sum over the ranks
(``_sums.allsum``), so every rank holds the same rho and gamma.
"""
import math

import numpy as np
import torch

from layerpar._collective import agree
from layerpar._watchdog import guard
from layerpar.optim._sums import allsum, dot


def load(comm, params, state, dtype, device, *, keep, curvature=True):
    """Collective: the history held in ``state`` (an optimiser's state:
    ``state[p] = {'s': (k, *p.shape), 'y': (k, *p.shape)}``, no entry while
    it is empty) for ``params``, the newest ``keep`` pairs at most.

    With ``curvature`` (L-BFGS) every pair must have y.s > 0 and the
    history is (S, Y, rho, gamma); without it (L-SR1, whose pairs may have
    any curvature) it is (S, Y) and nothing is summed over the ranks
    beyond the agreement on the number of pairs."""
    ks, msg = set(), None
    for i, p in enumerate(params):
        st = state.get(p)
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
    # every rank -> every rank: its number of pairs, or what is wrong with them
    guard(comm, "an L-BFGS agreement")
    parts = comm.allgather((mine, msg))
    agree(comm, next((m for _, m in parts if m), None))
    known = {k for k, _ in parts if k is not None}
    if len(known) > 1:
        raise ValueError(f"the ranks hold different numbers of history pairs "
                         f"{[k for k, _ in parts]}: the optimiser state is inconsistent")
    k = known.pop() if known else 0
    n = sum(p.numel() for p in params)
    if k == 0:
        empty = torch.zeros(0, n, dtype=dtype, device=device)
        return (empty, empty.clone(), [], 1.0) if curvature else (empty, empty.clone())
    S = torch.cat([state[p]["s"].reshape(k, -1) for p in params], dim=1) \
        if params else torch.zeros(k, 0, dtype=dtype, device=device)
    Y = torch.cat([state[p]["y"].reshape(k, -1) for p in params], dim=1) \
        if params else torch.zeros(k, 0, dtype=dtype, device=device)
    S = S.to(dtype)
    Y = Y.to(dtype)
    if k > keep:  # loaded with a shorter history: keep the newest pairs
        S, Y, k = S[-keep:], Y[-keep:], keep
    if not curvature:
        return S, Y
    # one sum over the ranks: y_i.s_i for every pair and y.y of the newest
    sums = allsum(comm, [dot(Y[i], S[i]) for i in range(k)] + [dot(Y[-1], Y[-1])])
    ys, yy = sums[:k], sums[k]
    if not (np.all(ys > 0) and yy > 0):
        raise ValueError("the optimiser state holds a history pair with y.s <= 0: "
                         "it was not written by LBFGS")
    return S, Y, [1.0 / v for v in ys], float(ys[-1] / yy)


def publish(params, state, S, Y):
    """Write the flat history back into ``state``, one contiguous
    (k, *p.shape) copy per parameter (no entry when it is empty)."""
    k = S.shape[0]
    numels = [p.numel() for p in params]
    for p, s, y in zip(params, S.split(numels, 1), Y.split(numels, 1)):
        if k == 0:
            state.pop(p, None)
        else:
            contiguous = torch.contiguous_format  # a copy, never a view of S or Y
            state[p] = {"s": s.reshape(k, *p.shape).clone(memory_format=contiguous),
                        "y": y.reshape(k, *p.shape).clone(memory_format=contiguous)}


def add_pair(comm, hist, s, y, *, keep, curvature_eps, bs=None, damping=0.0):
    """Collective: (history, kept, damped): the history with (s, y) appended
    and the oldest pair beyond ``keep`` dropped (kept True), or unchanged
    when the pair's curvature is not positive enough (y.s <=
    curvature_eps*||y||*||s||; kept False); damped says whether y was
    damped.

    With ``damping`` > 0 and ``bs`` = B s (the current Hessian
    approximation times s), Powell's damping comes first: when y.s <
    damping * s.Bs, y is replaced by theta*y + (1 - theta)*Bs with theta
    chosen so that y.s = damping * s.Bs (Nocedal & Wright, Procedure 18.2)."""
    S, Y, rho, gamma = hist
    damped = False
    if damping > 0 and bs is not None:
        # one collective for the damping test and an undamped pair's curvature
        ys, yy, ss, sbs = allsum(comm, [dot(y, s), dot(y, y), dot(s, s), dot(s, bs)])
        if sbs > 0 and ys < damping * sbs:  # False for NaN
            theta = (1.0 - damping) * sbs / (sbs - ys)
            y = y.mul(theta).add_(bs, alpha=1.0 - theta)
            damped = True
            ys, yy, ss = allsum(comm, [dot(y, s), dot(y, y), dot(s, s)])
    else:
        ys, yy, ss = allsum(comm, [dot(y, s), dot(y, y), dot(s, s)])
    if not ys > curvature_eps * math.sqrt(yy * ss):  # also catches NaN
        return hist, False, damped
    m = keep
    S = torch.cat([S[-(m - 1):] if m > 1 else S[:0], s[None]])
    Y = torch.cat([Y[-(m - 1):] if m > 1 else Y[:0], y[None]])
    rho = (rho[-(m - 1):] if m > 1 else []) + [1.0 / ys]
    return (S, Y, rho, float(ys / yy)), True, damped


def direction(comm, hist, g):
    """Collective: d = -H g by the two-loop recursion, H0 = gamma*I.  Each
    loop takes one sum over the ranks per pair (the coefficients depend on
    each other)."""
    S, Y, rho, gamma = hist
    k = S.shape[0]
    q = g.clone()
    alpha = [0.0] * k
    for i in reversed(range(k)):
        alpha[i] = rho[i] * allsum(comm, [dot(S[i], q)])[0]
        q.add_(Y[i], alpha=-alpha[i])
    r = q.mul_(gamma)
    for i in range(k):
        beta = rho[i] * allsum(comm, [dot(Y[i], r)])[0]
        r.add_(S[i], alpha=alpha[i] - beta)
    return r.neg_()
