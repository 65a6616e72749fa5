"""One training step in one call and the global gradient norm: the part of
``Network`` that a PyTorch training loop uses (``TrainingStep``, a base
class of ``Network``: ``net.step(x, y, loss_fn)``, ``net.clip_grad_norm_``).

What it needs of the class it is mixed into: ``loss_and_backward``,
``reduce``, ``parameters``, ``grid``, ``comm``, ``body``, ``is_first`` and
``is_last``.
"""
import math
import weakref

import torch

from layerpar._collective import agree
from layerpar._watchdog import SilentRankError


def _norm_order(max_norm, norm_type):
    """The order p of a gradient norm (a float; inf), the arguments checked."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) \
            or not max_norm >= 0:
        raise ValueError(f"max_norm={max_norm!r}: must be a number >= 0")
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) \
            or not norm_type > 0:
        raise ValueError(f"norm_type={norm_type!r}: must be a number > 0 or inf")
    return float(norm_type)


def _local_norm_part(grads, p):
    """This rank's part of the p-norm of ``grads``: the sum of |g|^p (the
    largest |g| for p = inf; NaN where a gradient holds NaN), in float64."""
    part = 0.0
    for g in grads:
        a = g.abs().to(torch.float64)
        if math.isinf(p):
            part = _largest([part, float(a.max())]) if a.numel() else part
        else:
            part += float((a * a).sum()) if p == 2.0 else float(a.pow(p).sum())
    return part


def _largest(values):
    """max(values), NaN when one of them is NaN (Python's max may skip it)."""
    return math.nan if any(v != v for v in values) else max(values)


def _norm_of_parts(parts, p):
    """The p-norm from the ranks' parts (``_local_norm_part``), added in rank
    order: the same float on every rank."""
    if math.isinf(p):
        return _largest(parts)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total ** (1.0 / p)


# network -> (its grid and parameters, the GradientReducer of its steps); not
# an attribute, so that copying or pickling a network never meets a communicator
_STEP_REDUCERS = weakref.WeakKeyDictionary()


class TrainingStep:
    """``step`` and ``clip_grad_norm_`` of ``Network``."""

    def step(self, x, y, loss_fn, *, reduction="mean", context=None):
        """Collective: one training step's loss and gradients, in one call
        (as ``schedule.step`` of torch.distributed.pipelining).

        Runs the forward and backward passes of the batch in the network's
        mode (exact, pipelined GPipe or 1F1B, layer-parallel, one-shot) and
        accumulates the gradients in every parameter's ``.grad`` as
        ``loss.backward()`` would (zero them before, with the optimiser's
        ``zero_grad``); returns the loss as a float, the same on every
        rank.  A loop of plain PyTorch runs unchanged around it::

            for x, y in loader:                 # the same batches on every rank
                opt.zero_grad()
                loss = net.step(x, y, torch.nn.functional.cross_entropy)
                net.clip_grad_norm_(1.0)        # optional: see clip_grad_norm_
                opt.step()
                scheduler.step()

        ``x``: the batch's inputs (needed on the first rank of the layers,
        ignored elsewhere); ``y``: its targets (needed on the last);
        ``loss_fn(scores, y)``: the loss of the batch, one number that is a
        mean over the samples (``reduction='mean'``, e.g. the default of
        ``cross_entropy``) or a sum (``reduction='sum'``); ``context`` (first
        rank): the batch's context for the layers that take it (a dict of
        tensors whose first dimension is the batch; on a grid each group
        takes its share's rows).

        On a grid (``grid=`` given to the constructor, D data-parallel
        groups) every rank passes the global batch (x where its group's
        first rank needs it, y on the last); each group takes its share
        (the rows ``grid.shard`` gives, the sizes of ``torch.tensor_split``;
        none when the batch has fewer rows than groups), the loss returned
        is the global batch's (the shares' means weighted by their sizes,
        ``grid.weight``; with ``reduction='sum'`` the sum) and the new
        gradients are averaged over the data axis with those weights
        (a ``GradientReducer``: each bucket's sum starts as soon as the
        backward pass has made its gradients, the layer-parallel solve's
        final sweep included, and is waited for before this returns; the
        same sums, bitwise, as ``grid.average_gradients``) before they are
        added to ``.grad``:
        every group then holds the gradient of the global batch's loss, and
        an optimiser step keeps the groups' weights the same.  Batch-norm
        statistics (buffers) are each group's, of its shares (as DDP with
        ``broadcast_buffers=False``).

        Raises on every rank (of the grid) alike: ValueError for a bad
        ``reduction``, a loss that is not one number on the graph, batches
        of different sizes on the ranks of a grid; TypeError for inputs or
        targets missing on a grid (``ProcessGrid.global_batch``); any
        failure of a layer, of the opening, closing or loss, with its type
        (see ``_collective``).  On a grid the gradients are then as they
        were.
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r}: choose mean or sum")
        grid = self.grid if self.grid is not None and self.grid.data > 1 else None
        if grid is None:
            loss, _ = self.loss_and_backward(x, y, loss_fn, reduction=reduction,
                                             context=context)
            return self.reduce(loss)
        size = grid.global_batch(x, y, need_x=self.is_first, need_y=self.is_last)
        weight = grid.weight(size) if reduction == "mean" else 1.0
        params = [p for p in self.parameters() if p.requires_grad]
        # the gradients of this step alone are averaged, then added to the
        # ones there were (accumulation, as backward does)
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        reducer = self._step_reducer(grid, params)
        reducer.start(weight)
        error, value = None, 0.0
        try:
            if grid.share_size(size) > 0:
                share = (None if context is None
                         else {k: grid.shard(v, size) for k, v in context.items()})
                loss, _ = self.loss_and_backward(grid.shard(x, size), grid.shard(y, size),
                                                 loss_fn, reduction=reduction, context=share)
                value = self.reduce(loss)
            else:  # no rows here: no pass (it is still counted, for the random draws)
                self.body.passes += 1
        except SilentRankError:
            raise
        except Exception as e:  # noqa: BLE001 - raised on every rank of the grid below
            error = e
        try:
            total = grid.sum_over_groups(weight * value, error, what="a training step")
        except BaseException as e:
            if not isinstance(e, SilentRankError):
                reducer.abandon()  # every rank of the column knows of the failure
            for p, g in zip(params, kept):
                p.grad = g
            raise
        reducer.finish()
        for p, g in zip(params, kept):
            if g is not None:
                p.grad = g if p.grad is None else g.add_(p.grad)
        return total

    def _step_reducer(self, grid, params):
        """The ``GradientReducer`` of ``step`` on ``grid`` for ``params``,
        kept from step to step (its buckets, hooks and the order in which
        gradients become ready) and made again when they change."""
        key = (id(grid), tuple(id(p) for p in params))
        kept = _STEP_REDUCERS.get(self)
        if kept is not None and kept[0] == key:
            return kept[1]
        if kept is not None:
            kept[1].close()
        reducer = grid.reducer(params)
        _STEP_REDUCERS[self] = (key, reducer)
        return reducer

    def clip_grad_norm_(self, max_norm, norm_type=2.0, *, error_if_nonfinite=False):
        """Collective: clip the gradients of the whole network by their
        global norm, as ``torch.nn.utils.clip_grad_norm_`` clips a model on
        one process: the norm over every rank's parameters (the opening and
        closing once; on a grid one group's, which holds the global batch's
        gradient after ``step``), and every ``.grad`` scaled by the same
        factor ``max_norm / (norm + 1e-6)`` where that is below 1.  Returns
        the norm before clipping (a float64 tensor), the same on every rank.

        Why not ``torch.nn.utils.clip_grad_norm_(net.parameters(), ...)``:
        each rank's ``parameters()`` are only its own layers (with the
        opening on the first rank, the closing on the last), so each rank
        would measure a different part of the gradient and scale its part
        by a different factor: the step's direction would no longer be the
        gradient's, and would change with the number of ranks.

        ``max_norm``: a number >= 0; ``norm_type``: p > 0 of the p-norm
        (default 2) or ``inf`` (the largest absolute value).
        ``error_if_nonfinite``: raise RuntimeError (on every rank) when the
        norm is NaN or Inf, leaving the gradients as they are.  Bad
        arguments raise ValueError naming them, on every rank.
        """
        error, local, grads = None, 0.0, []
        try:
            p = _norm_order(max_norm, norm_type)
            grads = [q.grad.detach() for q in self.parameters() if q.grad is not None]
            local = _local_norm_part(grads, p)
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            error = e
        self.body._check_open()
        comm = self.grid.comm if self.grid is not None else self.comm
        # every rank (of the grid) -> every rank: its part of the norm
        parts = agree(comm, error, what="the gradients' norm", payload=local)
        total = _norm_of_parts(parts[:self.body.size], p)  # on a grid: group 0's
        if error_if_nonfinite and not math.isfinite(total):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is "
                               f"{total}: non-finite (error_if_nonfinite=True)")
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            with torch.no_grad():
                for g in grads:
                    g.mul_(coef)
        return torch.tensor(total, dtype=torch.float64)
