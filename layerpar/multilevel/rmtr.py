"""The globalised multilevel method (``multilevel.method = "rmtr"``): V-cycles
whose coarse corrections a trust region controls, after the recursive
multilevel trust-region method (RMTR) of Gratton, Sartenaer and Toint
(SIAM J. Optim. 19, 2008) as Kopaničáková and Krause use it to train
residual networks (SIAM J. Sci. Comput. 45, 2023).

Level 0 is the finest network (N layers), level l has N / r^l.  A cycle on
level l minimises the level's model m_l(x) = f_l(x; B) - <v_l, x> (v_0 = 0)
on the cycle's batch B, the same batch on every level:

  1. ``pre_steps`` optimiser steps on m_l;
  2. the coarse model: y0 = R x (``restrict``), v_{l+1} = grad f_{l+1}(y0)
     - P^T grad m_l(x), so that grad m_{l+1}(y0) = P^T grad m_l(x) (first
     order coherence, as in MG/OPT); on the coarsest level ``coarse_steps``
     optimiser steps on it, on the others a cycle of its own (recursion).
     Every coarse iterate y stays in the trust region |P (y - y0)| <=
     bound, measured in the norm of the finest level (a displacement is
     prolonged to the finest level, so every level measures alike), with
     bound = the radius of level l's corrections, and no more than what the
     level above left of its own bound: a coarse step that leaves the
     region is scaled back onto its boundary and ends the coarse iterations;
  3. the ratio test: s = P (y - y0) is accepted when rho = (m_l(x) - m_l(x +
     s)) / (m_{l+1}(y0) - m_{l+1}(y)) >= eta_1 (``accept_ratio``), the two
     decreases on the same batch; the radius then grows (rho >= eta_2 with
     the step on the boundary), shrinks (rejected) or stays
     (``layerpar.optim.trust``); a correction whose coarse model
     predicts no decrease is rejected without a fine evaluation;
  4. ``post_steps`` optimiser steps on m_l.

The smoothing steps are the configured optimiser's (Adam, SGD with or
without momentum, L-BFGS); on coarse levels they stay in the region.  The
coarse levels' optimiser state (``coarse_state``): "restrict" sets it at the
start of each coarse problem from the finer level's
(``Hierarchy.move_optimizer_state``: momenta and first moments scaled like
the gradient, by r, second moments by r^2; fresh where the finer level has
none), so the coarse steps continue the fine optimiser's momentum and
scaling rather than a state left by earlier cycles, whose linear terms were
other batches'; "keep" keeps each level's own state (as MG/OPT does).

Evaluations are reused where they are the same evaluation: the coarse
model's gradient at y0 is P^T grad m_l(x), so its first step takes that
without a solve; the trial point's evaluation (with its gradient when a
post-smoothing step follows) serves that step after an accepted correction,
and the evaluation at x after a rejected one.

The cycle's batch (``layerpar.multilevel.batching``): ``cycle_batches``
consecutive loader batches, concatenated, growing by ``batch_growth``
("schedule" or "norm-test") up to ``max_cycle_batches``.  The work
counters count layer steps whatever the batch's size; the metrics'
``samples_work`` also weighs each step by its batch's samples.

With ``start = "nested"`` the cycles begin after nested iteration has
reached the finest depth, with ``"full-multigrid"`` from its second depth
on (``CyclingMethod``).

The radii (one per pair of neighbouring depths), the cycle batches' state,
the norm test's last gradient and the counters are in the checkpoint's
``extra``, so a run resumes on any number of ranks.
"""
import math

import torch

from layerpar.optim import trust
from layerpar.multilevel.batching import CycleBatches
from layerpar.multilevel.cycling import CyclingMethod
from layerpar.multilevel.hierarchy import gradient, linear_term, point, set_point


def _ordered_sum(comm, local):
    """The sum of {key: float} over the ranks of ``comm`` (each key held by
    one rank), added in the order of the keys: bitwise the same on any
    number of ranks.  Every rank sends its values to every rank."""
    merged = {}
    for part in comm.allgather(local):
        merged.update(part)
    total = 0.0
    for k in sorted(merged):
        total += merged[k]
    return total


def _end_key(key):
    # the opening before every layer, the closing after
    sec, name = key
    return (0, -1, name) if sec == "opening" else (2, 0, name)


# ---- vectors of a level: ``hierarchy.point``'s form ------------------------------------
def _set_grads(lev, grads):
    layers, ends = grads
    for n, ps in lev.body.params_by_layer().items():
        for k, p in ps.items():
            p.grad = layers[n][k].clone()
    for k, p in lev.end_params().items():
        if p.requires_grad:
            p.grad = ends[k].clone()


def _combine(a, b, scale=1.0):
    """a + scale * b."""
    return ({n: {k: t + scale * b[0][n][k] for k, t in d.items()} for n, d in a[0].items()},
            {k: t + scale * b[1][k] for k, t in a[1].items()})


def _saved_vector(v):
    """A vector of this rank's layers and ends for a checkpoint's ``extra``
    (every rank gives its own layers, by global index)."""
    layers, ends = v
    return {"layers": {n: dict(d) for n, d in layers.items()},
            "ends": {f"{sec}.{k}": t for (sec, k), t in ends.items()}}


def _loaded_vector(lev, saved):
    """This rank's part of a vector saved by ``_saved_vector`` on any
    number of ranks."""
    layers = {n: {k: saved["layers"][n][k].clone() for k in ps}
              for n, ps in lev.body.params_by_layer().items()}
    ends = {key: saved["ends"][f"{key[0]}.{key[1]}"].clone() for key in lev.end_params()}
    return layers, ends


class RMTR(CyclingMethod):
    """Collective over ``comm`` (this group's layer ranks): every level's
    network, finest first (``levels``), one cycle per group of batches
    (``step``); ``last_cycle`` describes the finest level's correction."""

    name = "rmtr"

    def __init__(self, config, new_level, comm, *, batches_per_epoch, loader=None, **_):
        super().__init__(config, new_level, comm, batches_per_epoch=batches_per_epoch)
        ml = config["multilevel"]
        # radius[j - 1]: the trust radius of the corrections of depth j from depth j - 1
        self.radius = [float(ml["radius"])] * (len(self.hierarchy.depths) - 1)
        self.batches = CycleBatches(first=ml["cycle_batches"], growth=ml["batch_growth"],
                                    most=ml["max_cycle_batches"], every=ml["growth_epochs"],
                                    theta=ml["norm_test"], batches_per_epoch=batches_per_epoch)
        self.loader = loader
        self.seen = 0         # batches of the current epoch given to step
        self.epochs_done = 0  # epochs ended: the loader's epoch of the pending batches
        self.samples_work = 0  # layer steps times their batch's samples, all levels
        self.last_grad = None  # the norm test's previous fine gradient
        self.carried = None    # one batch per epoch: (value, gradient, statistics) at the
        self.last_correct = 0  #   finest level's point, for the next cycle
        self.last_cycle = {}
        self.last_loss = 0.0

    def new_level(self, nlayers):
        # the cycle reuses its own evaluations where they are the same
        return self._make_level(nlayers, reuse=False)

    def refined(self, new):
        self.last_grad = None  # another problem: the norm test starts again
        self.carried = None

    # ---- norms --------------------------------------------------------------------------
    def _dot(self, a, b):
        """<a, b> over every rank, added in global layer order."""
        local = {(1, n, ""): float(sum(torch.sum(t * b[0][n][k]) for k, t in d.items()))
                 for n, d in a[0].items()}
        for key, t in a[1].items():
            local[_end_key(key)] = float(torch.sum(t * b[1][key]))
        return _ordered_sum(self.hierarchy.comm, local)

    def fine_norm(self, l, e):
        """|P_0 ... P_{l-1} e|: the norm of level l's displacement ``e``
        prolonged to the finest level (opening and closing: identity)."""
        layers = e[0]
        for j in range(l, 0, -1):
            layers = self.hierarchy.prolong(layers, self.levels[j], self.levels[j - 1])
        fine = (layers, e[1])
        return math.sqrt(max(self._dot(fine, fine), 0.0))

    def _radius_index(self, l):
        # the pair (level l, level l + 1): depth index of level l, minus one
        return self.depth - l - 1

    # ---- evaluations ---------------------------------------------------------------------
    def _count(self, lev, before, samples):
        done = lev.work["fwd"] + lev.work["bwd"] - before
        self.samples_work += done * samples

    def _evaluate(self, lev, x, y, size):
        """(value, gradient, statistics) of the level's model at its current
        weights; the residual monitor looks at the solves.  Collective."""
        before = lev.work["fwd"] + lev.work["bwd"]
        value, correct = lev._evaluate_with_grad(x, y, size)
        self._count(lev, before, size)
        f, b = lev.body.last_forward, lev.body.last_backward
        change = lev.monitor.update(lev.body) if lev.monitor else None
        stats = dict(loss=value, correct=correct, size=size,
                     fwd_iters=f["iterations"], bwd_iters=b["iterations"],
                     fwd_res=f["residual_norms"][-1] if f["residual_norms"] else 0.0,
                     bwd_res=b["residual_norms"][-1] if b["residual_norms"] else 0.0,
                     vtime=f["virtual_time"] + b["virtual_time"], change=change)
        return value, gradient(lev), stats

    def _value(self, lev, x, y, size):
        before = lev.work["fwd"] + lev.work["bwd"]
        value = lev.loss(x, y, size)
        self._count(lev, before, size)
        return value

    def _smooth(self, l, count, x, y, size, known, start, bound):
        """``count`` optimiser steps on level l's model, from the known
        evaluation (value, gradient) when there is one; with a finite
        ``bound``, the level's displacement from ``start`` stays within it
        (a step beyond is scaled back onto the boundary and ends the
        steps).  Returns (the known evaluation now or None, the first
        evaluation's statistics or None, whether it reached the boundary,
        the fine norm of the displacement from ``start``: 0 without a bound
        or a step)."""
        lev = self.levels[l]
        first, norm = None, 0.0
        for _ in range(count):
            if lev.closure_driven:  # closure-driven: it evaluates where it needs to
                before = lev.work["fwd"] + lev.work["bwd"]
                s = lev.step(x, y, size)
                self._count(lev, before, size)
                first = first or s
            else:
                if known is None:
                    value, grads, stats = self._evaluate(lev, x, y, size)
                    known = (value, grads)
                    first = first or stats
                _set_grads(lev, known[1])
                lev.optimizer.step()
            known = None
            if math.isfinite(bound):
                d = _combine(point(lev), start, -1.0)
                norm = self.fine_norm(l, d)
                if norm > bound:
                    set_point(lev, _combine(start, d, bound / norm))
                    return None, first, True, bound
        return known, first, False, norm

    # ---- the cycle ------------------------------------------------------------------------
    def step(self, x, y, size):
        if not self.cycling:  # nested iteration's depths
            lev = self.level
            before = lev.work["fwd"] + lev.work["bwd"]
            s = super().step(x, y, size)
            self._count(lev, before, size)
            return s
        return super().step(x, y, size)

    def cycle_step(self, x, y, size):
        b = self.seen
        self.seen = (self.seen + 1) % self.batches_per_epoch
        group = self.batches.add(b, x, y, size)
        if group is None:  # gathering the cycle's batch: nothing counted yet
            return dict(loss=self.last_loss, correct=0, size=0, fwd_iters=0, bwd_iters=0,
                        fwd_res=0.0, bwd_res=0.0, vtime=0.0, change=None, corrections=0,
                        accepted=False)
        s = self.cycle_on(*group)
        self.last_loss = s["loss"]
        return dict(s, corrections=1, accepted=self.last_cycle.get("accepted", False))

    def cycle_on(self, x, y, size):
        """One cycle on the batch (x, y) of ``size`` samples; the statistics
        of the finest level's first evaluation.  Collective."""
        carried, self.carried = self.carried, None
        known = carried[:2] if carried else None
        known, stats, _ = self._cycle(0, x, y, size, known, math.inf)
        if stats is None:  # the carried evaluation was the first
            stats = carried[2]
        if known is not None and self.batches_per_epoch == 1:
            # one batch per epoch, the same every time: the next cycle starts here
            self.carried = known + (dict(stats, loss=known[0], correct=self.last_correct,
                                         fwd_iters=0, bwd_iters=0, vtime=0.0, change=None),)
        self.cycle += 1
        return stats

    def _cycle(self, l, x, y, size, known, bound):
        """A cycle on level l from its current point, with the known
        evaluation there (or None), within ``bound`` (the fine norm of the
        level's displacement; inf on the finest level).  Returns (the known
        evaluation at the end or None, statistics of the level's first
        evaluation, whether it reached the boundary)."""
        ml = self.config["multilevel"]
        lev = self.levels[l]
        start = point(lev) if math.isfinite(bound) else None
        if l == len(self.levels) - 1:
            return self._smooth(l, ml["coarse_steps"], x, y, size, known, start, bound)[:3]
        known, first, hit, used = self._smooth(l, ml["pre_steps"], x, y, size, known, start,
                                               bound)
        if hit:
            return known, first, True
        if known is None:
            value, grads, stats = self._evaluate(lev, x, y, size)
            known = (value, grads)
            first = first or stats
        if l == 0:
            if first is not None:
                self.last_correct = first["correct"]
            self._norm_test(known[1])
        radius = self.radius[self._radius_index(l)]
        known = self._correct(l, x, y, size, known, min(radius, bound - used))
        known, post, hit, _ = self._smooth(l, ml["post_steps"], x, y, size, known, start, bound)
        return known, first or post, hit

    def _coarse_problem(self, l, x, y, size, grads):
        """Level l+1's model at y0 = R x_l: its weights restricted, its
        linear term set, its optimiser state (``coarse_state`` "restrict")
        from level l.  Returns (y0, the model's value and gradient at y0)."""
        fine, coarse = self.levels[l], self.levels[l + 1]
        y0 = self.hierarchy.restrict_level(fine, coarse)
        if self.coarse_state == "restrict":
            coarse.optimizer.state.clear()  # fresh where the finer level has none
            self.hierarchy.move_optimizer_state(fine, coarse)
        coarse.set_linear_term(None)
        f0, g_H, _ = self._evaluate(coarse, x, y, size)
        Pt_g = (self.hierarchy.restrict_gradient(grads[0], fine, coarse), grads[1])
        v = _combine(g_H, Pt_g, -1.0)
        coarse.set_linear_term(linear_term(coarse, v))
        return y0, (f0 - self._dot(v, y0), Pt_g)

    @property
    def coarse_state(self):
        return self.config["multilevel"]["coarse_state"]

    def _correct(self, l, x, y, size, known, bound):
        """The trust-region-controlled coarse correction of level l at its
        current point (``known``: its evaluation there), the coarse
        displacement within ``bound``.  Returns the known evaluation after
        it: the trial point's when accepted and evaluated with its gradient,
        the old one when rejected, else None.  Collective."""
        ml = self.config["multilevel"]
        lev, coarse = self.levels[l], self.levels[l + 1]
        ri = self._radius_index(l)
        outcome = {"level": l, "f_before": known[0], "f_after": known[0], "bound": bound,
                   "rho": -math.inf, "accepted": False, "predicted": 0.0, "step": 0.0}
        if l == 0:
            self.last_cycle = outcome
        if not bound > 0:  # no room left for a correction
            return known
        y0, coarse_known = self._coarse_problem(l, x, y, size, known[1])
        self._cycle(l + 1, x, y, size, coarse_known, bound)
        e = _combine(point(coarse), y0, -1.0)
        s = (self.hierarchy.prolong(e[0], coarse, lev), e[1])
        norm = self.fine_norm(l, s)
        predicted = coarse_known[0] - self._value(coarse, x, y, size) if norm > 0 else 0.0
        coarse.set_linear_term(None)
        outcome.update(predicted=predicted, step=norm)
        if not predicted > 0:
            _, self.radius[ri] = trust.update(self.radius[ri], -math.inf, norm, bound,
                                              accept=ml["accept_ratio"])
            return known
        x0 = point(lev)
        set_point(lev, _combine(x0, s))
        # the trial's gradient serves a post-smoothing step, or (one batch per
        # epoch) the next cycle
        with_grad = (ml["post_steps"] > 0 or (l == 0 and self.batches_per_epoch == 1)) \
            and not lev.closure_driven
        if with_grad:
            f1, grads, stats = self._evaluate(lev, x, y, size)
            correct = stats["correct"]
        else:
            f1 = self._value(lev, x, y, size)
        rho = trust.ratio(known[0] - f1, predicted)
        accepted, self.radius[ri] = trust.update(self.radius[ri], rho, norm, bound,
                                                 accept=ml["accept_ratio"])
        outcome.update(rho=rho, accepted=accepted)
        if not accepted:
            set_point(lev, x0)
            return known
        outcome["f_after"] = f1
        if l == 0 and with_grad:
            self.last_correct = correct
        return (f1, grads) if with_grad else None

    def _norm_test(self, grads):
        """Give the batch rule the norm test's estimates from this cycle's
        fine gradient and the previous one (``batch_growth`` "norm-test")."""
        if self.batches.growth != "norm-test":
            return
        if self.last_grad is not None:
            diff = _combine(grads, self.last_grad, -1.0)
            mean = _combine(grads, self.last_grad, 1.0)
            self.batches.record(self._dot(diff, diff) / 2, self._dot(mean, mean) / 4)
        self.last_grad = grads

    # ---- epochs, metrics and checkpoints -----------------------------------------------
    def end_epoch(self, row):
        super().end_epoch(row)
        self.epochs_done += 1
        self.seen = 0
        if self.cycling:  # cycles: the schedule's clock runs
            self.batches.end_epoch()

    def head_columns(self):
        radius = self.radius[self.depth - 1] if self.cycling and self.depth > 0 else 0.0
        return dict(super().head_columns(), radius=radius, cycle_batches=self.batches.size)

    def tail_columns(self, sums):
        # samples_work: layer steps times samples, summed over the ranks
        total = self.hierarchy.comm.allreduce(self.samples_work)
        return dict(super().tail_columns(sums), samples_work=total)

    def run_state(self, work, one_group):
        st = dict(super().run_state(work, one_group), radius=list(self.radius),
                  batches=self.batches.state(), seen=self.seen, last_loss=self.last_loss,
                  epochs_done=self.epochs_done, last_correct=self.last_correct,
                  samples_work=self.hierarchy.comm.allreduce(self.samples_work))
        if self.last_grad is not None:  # every rank its layers (and ends)
            st["last_grad"] = _saved_vector(self.last_grad)
        if self.carried is not None:
            st["carried"] = dict(_saved_vector(self.carried[1]), value=self.carried[0],
                                 stats=dict(self.carried[2]))
        return st

    def restore(self, st, extra, mine):
        super().restore(st, extra, mine)
        self.radius = [float(r) for r in extra["radius"]]
        self.seen = int(extra["seen"])
        self.epochs_done = int(extra["epochs_done"])
        self.last_correct = int(extra["last_correct"])
        self.last_loss = float(extra["last_loss"])
        # the saved total continues on the first rank
        self.samples_work = int(extra["samples_work"]) if self.levels[0].first else 0
        self.batches.restore(extra["batches"], self._fetch)
        saved = extra.get("last_grad")
        self.last_grad = _loaded_vector(self.levels[0], saved) if saved else None
        saved = extra.get("carried")
        self.carried = None
        if saved:
            self.carried = (float(saved["value"]), _loaded_vector(self.levels[0], saved),
                            dict(saved["stats"]))

    def _fetch(self, indices):
        """The loader's batches ``indices`` of the current epoch, as
        (x, y, size)."""
        if self.loader is None:
            raise RuntimeError("resuming a cycle's pending batches needs the training loader")
        wanted, out = set(indices), {}
        for b, (x, y) in enumerate(self.loader.epoch(self.epochs_done)):
            if b in wanted:
                size = self.loader.batch_size
                out[b] = (x, y, min(size, self.loader.num_samples - b * size))
            if b >= max(indices):
                break
        return [out[b] for b in indices]
