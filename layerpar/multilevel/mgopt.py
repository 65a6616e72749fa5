"""MG/OPT (``multilevel.method = "mgopt"``): one V-cycle per training batch.

Level 0 is the network of N layers, level l has N / r^l.  On level l
(objective f_l(x) - <v_l, x>, v_0 = 0): ``pre_steps`` optimiser steps; the
coarse problem: x_H0 = R x_h (weights restricted by ``restrict``), v_{l+1} =
grad f_{l+1}(x_H0) - P^T (grad f_l(x_h) - v_l), with P^T the transpose of
the prolongation, so that the coarse objective's gradient at x_H0 equals P^T
times the fine one (first-order coherence); on the coarsest level
``coarse_steps`` optimiser steps, on the others a recursive cycle; then the
correction x_h <- x_h + alpha * P (x_H - x_H0), alpha = 1, 1/2, ...
(``line_search_steps`` tries of ``layerpar.optim.linesearch.backtracking``)
the first that decreases the level's objective, the correction rejected if
none does; then ``post_steps`` optimiser steps.  Every evaluation of a cycle
uses that cycle's mini-batch: with one fixed batch the coarse objective and
the fine objective are the same function of the batch, so the coherence
above holds exactly and the line search compares like with like.  The
opening and closing layers belong to every level with identity transfers
(same rank, same weights).  Each level has its own optimiser of the
configured kind (SGD, Adam or L-BFGS), kept from cycle to cycle; the linear
term is added to that level's gradients before each step.  With
``multilevel.reuse`` every level keeps its last evaluations (``Level``,
where that is exact) and the line search's first trial also evaluates the
gradient, which the next evaluation at the accepted point (a post-smoothing
step, or with one batch per epoch the next cycle's fine gradient) takes
instead of solving again.
"""
import torch

from layerpar.multilevel.cycling import CyclingMethod
from layerpar.multilevel.hierarchy import gradient, linear_term, point, set_point
from layerpar.optim.linesearch import Trial, backtracking, decrease


class MGOpt(CyclingMethod):
    """Collective over ``comm`` (this group's layer ranks): every level's
    network, finest first (``levels``), and one V-cycle per batch
    (``step``; ``last_cycle`` describes the fine level's correction).
    With ``multilevel.start = "nested"`` or ``"full-multigrid"`` the cycles
    begin after nested iteration has built the depths (``CyclingMethod``)."""

    name = "mgopt"

    def __init__(self, config, new_level, comm, *, batches_per_epoch, **_):
        super().__init__(config, new_level, comm, batches_per_epoch=batches_per_epoch)
        self.last_cycle = {}

    def cycle_step(self, x, y, size):
        """One V-cycle: the statistics of the fine level's first optimiser
        step (or of its evaluation, when the cycle takes none there), with
        the correction counted."""
        s = self.v_cycle(x, y, size)
        if s is None:  # no fine optimiser step in the cycle: its evaluation
            s = dict(loss=self.last_cycle["f_before"], correct=0, fwd_iters=0, bwd_iters=0,
                     fwd_res=0.0, bwd_res=0.0, vtime=0.0, size=size, change=None)
        return dict(s, corrections=1, accepted=self.last_cycle["alpha"] > 0)

    def v_cycle(self, x, y, size):
        """One MG/OPT V-cycle on the batch (x, y).  Collective."""
        s = self._cycle(0, x, y, size)
        self.cycle += 1
        return s

    def coarse_problem(self, l, x, y, size=None):
        """Set up the coarse problem of level l+1 at the current weights of
        level l on the batch (x, y): restrict the weights into level l+1 and
        set its linear term v.  Returns (x_H0 layer dict, x_H0 ends, level l's
        objective at x_h).  Collective (``size``: the global batch's size,
        needed on a grid of several groups)."""
        fine, coarse = self.levels[l], self.levels[l + 1]
        f_h = fine.loss_and_grad(x, y, size)
        g_h, g_h_ends = gradient(fine)
        # x_H0 = R x_h; opening and closing: identity
        x_H0, ends_H0 = self.hierarchy.restrict_level(fine, coarse)
        # v = grad f_H(x_H0) - P^T grad f_h(x_h)
        coarse.set_linear_term(None)
        coarse.loss_and_grad(x, y, size)
        Pt_g = self.hierarchy.restrict_gradient(g_h, fine, coarse)
        v = ({n: {k: p.grad.detach() - Pt_g[n][k] for k, p in ps.items()}
              for n, ps in coarse.body.params_by_layer().items()},
             {key: p.grad.detach() - g_h_ends[key] for key, p in coarse.end_params().items()})
        coarse.set_linear_term(linear_term(coarse, v))
        return x_H0, ends_H0, f_h

    def _cycle(self, l, x, y, size):
        """One V-cycle from level l on the batch (x, y); the statistics of
        level l's first optimiser step (or None when it takes none)."""
        ml = self.config["multilevel"]
        lev = self.levels[l]
        if l == len(self.levels) - 1:
            out = lev.steps(ml["coarse_steps"], [(x, y, size)])
            return out[0] if out else None
        pre = lev.steps(ml["pre_steps"], [(x, y, size)])
        x_H0, ends_H0, f0 = self.coarse_problem(l, x, y, size)
        first = pre[0] if pre else None
        self._cycle(l + 1, x, y, size)
        coarse = self.levels[l + 1]
        coarse.set_linear_term(None)
        # the correction e = P (x_H - x_H0); opening and closing: identity
        e_H = {n: {k: p.detach() - x_H0[n][k] for k, p in ps.items()}
               for n, ps in coarse.body.params_by_layer().items()}
        e = self.hierarchy.prolong(e_H, coarse, lev)
        e_ends = {k: p.detach() - ends_H0[k] for k, p in coarse.end_params().items()}
        # with reuse, the first trial's gradient serves the next evaluation at
        # the accepted point: a post-smoothing step, or (one batch per epoch:
        # the same batch again) the next cycle's first fine evaluation
        grad_first = lev.reusing and (ml["post_steps"] > 0
                                      or (l == 0 and self.batches_per_epoch == 1))
        alpha, f_after = self._correct(lev, x, y, size, f0, e, e_ends, grad_first)
        if l == 0:
            self.last_cycle = {"f_before": f0, "f_after": f_after, "alpha": alpha}
        post = lev.steps(ml["post_steps"], [(x, y, size)])
        if first is None:
            first = post[0] if post else None
        return first

    def _correct(self, lev, x, y, size, f0, e, e_ends, grad_first=False):
        """x <- x + alpha*e for the first alpha = 1, 1/2, ... that decreases
        the objective below f0 (``backtracking`` over phi(alpha)); the
        weights unchanged if none does.  Returns (alpha, objective there):
        (0, f0) when rejected.  ``grad_first``: the trial alpha = 1 also
        evaluates the gradient (kept for reuse).  Collective."""
        layers, ends = lev.body.params_by_layer(), lev.end_params()
        start = point(lev)
        x0, x0_ends = start
        trials = []

        def phi(alpha):
            with torch.no_grad():
                for n, ps in layers.items():
                    for k, p in ps.items():
                        p.copy_(x0[n][k] + alpha * e[n][k])
                for key, p in ends.items():
                    p.copy_(x0_ends[key] + alpha * e_ends[key])
            with_grad = grad_first and not trials
            trials.append(alpha)
            f = lev.loss_and_grad(x, y, size) if with_grad else lev.loss(x, y, size)
            return Trial(alpha, f)

        search = backtracking(phi, 1.0, decrease(f0), shrink=0.5,
                              max_trials=self.config["multilevel"]["line_search_steps"])
        if search.best is not None:
            return search.best.t, search.best.f
        set_point(lev, start)
        return 0.0, f0
