"""Optimisation for layer-parallel networks: distributed L-BFGS and L-SR1
(in a trust region), line searches, learning-rate schedules and the Tikhonov and smoothness-in-time
penalties.

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
by a strong Wolfe search; ``curvature="damped"`` damps a curvature pair
with little or negative curvature (Powell) and keeps it instead of dropping
it;
``reuse_evaluation=True`` saves the evaluation at
the start of each call when the objective does not change between calls.
``LSR1(net.parameters(), net.body.comm, lr=1.0)`` takes the same closure:
symmetric-rank-one pairs (negative curvature kept) and a trust region of
initial radius ``lr`` instead of a line search.

Modules, one per job:
  lbfgs        ``LBFGS`` (and ``history``: its curvature pairs and two-loop recursion)
  lsr1         ``LSR1``: the SR1 model over the same stored pairs, its trust-region
               step exact in span{g, S, Y} after one sum over the ranks
  trust        the trust region's ratio test and radius update (also RMTR's)
  linesearch   ``backtracking`` and ``strong_wolfe``: free functions over
               phi(t), the objective along a line, used by L-BFGS and by
               MG/OPT's coarse-correction search
  schedules    ``schedule``, ``scheduler``
  penalties    ``regularize``
  master       ``SGD`` and ``Adam`` that step bfloat16/float16 parameters
               through float32 copies ("master weights"); the torch
               optimisers' steps, bit for bit, for other dtypes

Public names: ``LBFGS``, ``LSR1``, ``LineSearchError``, ``regularize``, ``schedule``,
``scheduler``, ``SGD``, ``Adam`` (and ``SCHEDULES``, ``LINE_SEARCHES``, ``CURVATURE_RULES``,
``STRONG_WOLFE_C2``).
"""
from layerpar.optim.lbfgs import CURVATURE_RULES, LBFGS, STRONG_WOLFE_C2
from layerpar.optim.linesearch import LINE_SEARCHES, LineSearchError
from layerpar.optim.lsr1 import LSR1
from layerpar.optim.master import SGD, Adam
from layerpar.optim.penalties import regularize
from layerpar.optim.schedules import SCHEDULES, schedule, scheduler

__all__ = ["LBFGS", "LSR1", "LineSearchError", "regularize", "schedule", "scheduler", "SGD", "Adam",
           "SCHEDULES", "LINE_SEARCHES", "CURVATURE_RULES", "STRONG_WOLFE_C2"]
