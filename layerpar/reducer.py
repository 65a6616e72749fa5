"""Gradient sums over the data-parallel groups, bucket by bucket, started
while the backward pass still runs.

The determinism rule: after every step the groups hold bitwise the same
weights.  So every rank of a column must obtain bitwise the same gradient
sum, and MPI's sum (whose order of additions the standard leaves open, and
may differ between a blocking and a non-blocking call or from rank to rank)
is not used: every rank gathers the column's weighted buckets and adds them
itself in group order, ``((w_0 g_0 + w_1 g_1) + w_2 g_2) + ...``.  The sum
is therefore the same on every rank, with or without overlap, and for any
bucketing.  For two groups the traffic equals an allreduce's; for D groups
it is (D - 1) buckets in, against about 2 (D - 1)/D for a ring allreduce
(``layerpar.perfmodel`` models it so).  Half-precision gradients are weighted
and summed in float32 and rounded once.

Buckets hold consecutive parameters of one dtype and device in reverse
order (the last layers' gradients exist first).  A parameter's gradient is
ready when it is final:

* in a layer-parallel backward pass (the MGRIT adjoint solve, layer-parallel
  or one-shot), as soon as the solve's final sweep has made its layer's
  weight gradient (``layerpar.engine.gradhooks``), long before the solve
  returns; the value summed is the ``.grad`` autograd will then hold
  (``.grad + grad``, or ``grad`` when there was none);
* elsewhere (the opening and closing layers, the one-rank graph path, the
  exact pipeline) once autograd has accumulated it (a post-accumulate hook)
  for the last time in the pass: where a pipeline schedule differentiates
  each micro-batch on its own (1F1B: one backward call per micro-batch,
  each accumulating into ``.grad``), the accumulations of all but the
  rank's last micro-batch are partial sums (``gradhooks.partial_sums``) and
  are let pass, so that a bucket starts during the last micro-batch's
  backward, when its gradients are final.

Buckets are started in bucket order, each as soon as it and every bucket
before it are ready, so that every rank of the column starts the same
gathers in the same order whatever the order in which its gradients came
(a group with no rows runs no backward pass and starts them all in
``finish``).  The first bucketing takes the parameters in reverse; after
the first backward pass the buckets are made again in the order in which
its gradients became ready (that of the lowest rank of the column that ran
one, so the same on every rank), as the network's layers come in
``parameters()`` in an order of their own (the opening's may come before
the residual layers' although its gradient is made last).  ``finish``
waits for all of them before the optimiser step.

Before it sums, ``finish`` checks that every bucket started early is
bitwise the one the final ``.grad``s give: it is not where a parameter
took gradients more than once in one backward pass in a way the engine
does not announce (two passes through the network before one backward, a
layer module shared by two positions in a layer-parallel pass); the column
agrees on the check (one small allgather per step), and where it failed on
any rank every rank sends every bucket again from ``.grad`` and starts no
sum early from then on.  The result is therefore always bitwise that of
the reducer that starts after backward.
"""
import torch
from mpi4py import MPI

from layerpar._collective import agree
from layerpar._watchdog import guard, wait
from layerpar.engine import gradhooks
from layerpar.engine.vectors import HALF

# gradients are sent in buckets of at most this many bytes (one gather each)
BUCKET_BYTES = 1 << 22


def buckets_of(params, bucket_bytes):
    """Consecutive parameters of one dtype and device, at most
    ``bucket_bytes`` bytes per bucket (a larger parameter alone)."""
    out, cur, nbytes = [], [], 0
    for p in params:
        size = p.numel() * p.element_size()
        if cur and (p.dtype != cur[0].dtype or p.device != cur[0].device
                    or nbytes + size > bucket_bytes):
            out.append(cur)
            cur, nbytes = [], 0
        cur.append(p)
        nbytes += size
    if cur:
        out.append(cur)
    return out


class GradientReducer:
    """Each parameter's ``.grad`` <- the sum over the ranks of ``comm`` (the
    data-parallel column) of ``weight_d * grad_d``, in rank order.

    ``params``: this rank's parameters, the same on every rank of ``comm``
    (frozen ones are skipped; a missing ``.grad`` counts as zero).  With
    ``overlap`` (default), call ``start(weight)`` before the backward pass
    and ``finish()`` after it: each bucket's gather starts when its
    gradients are final (made by the final sweep of a layer-parallel
    backward solve, or accumulated by autograd).  Without, ``finish`` does
    all the work.  One backward pass between ``start`` and ``finish``.
    ``close()`` removes the hooks.

    ``early`` counts, for the last ``finish``, the buckets started before
    it (during the backward pass); ``early_gradients`` whether sums still
    start during the backward pass (False after a failed check)."""

    def __init__(self, comm, params, *, bucket_bytes=BUCKET_BYTES, overlap=True):
        self.comm = comm
        self.params = [p for p in params if p.requires_grad]
        self.bucket_bytes = bucket_bytes
        self.overlap = overlap
        self._make_buckets(list(reversed(self.params)))
        self._rebuilt = False  # the buckets follow the order of readiness
        self._position = {id(p): i for i, p in enumerate(self.params)}
        self._hooks, self._sweep_hooks = [], []
        if overlap and comm.Get_size() > 1:
            self._hooks = [p.register_post_accumulate_grad_hook(self._accumulated)
                           for p in self.params]
            self._sweep_hooks = [gradhooks.register_gradient_hook(p, self._made)
                                 for p in self.params]
        self._armed = False
        self.weight = 1.0
        self.early = 0
        self._missing = []
        self._state = {}    # id(p) -> "made" (by the sweep), "done" (accumulated)
        self._value = {}    # id(p) -> the .grad the sweep's gradient will give
        self._posted = {}   # bucket -> (request, send buffer, receive buffer)
        self._next = 0      # the first bucket not started
        self._order = []    # the parameters' positions in the order they became ready
        self._abandoned = []  # gathers of a pass that never finished (kept alive)

    def _make_buckets(self, params):
        self.buckets = buckets_of(params, self.bucket_bytes)
        self._bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}

    @property
    def early_gradients(self):
        return bool(self._hooks)

    def close(self):
        for h in self._hooks + self._sweep_hooks:
            h.remove()
        self._hooks, self._sweep_hooks = [], []

    def start(self, weight):
        """Arm for one backward pass whose gradients are weighted by
        ``weight`` (n_d/B of this group)."""
        if self._posted:  # a pass that never finished: MPI may still use its buffers
            self._abandoned.extend(self._posted.values())
        self.weight = float(weight)
        self._missing = [len(bucket) for bucket in self.buckets]
        self._state, self._value, self._posted = {}, {}, {}
        self._next, self._order = 0, []
        self._armed = True

    # ---- readiness -------------------------------------------------------------
    def _made(self, p, grad):
        """The final sweep made ``grad``, which autograd will add to p.grad."""
        key = id(p)
        if not self._armed or key not in self._bucket_of:
            return
        if key in self._state:  # a second gradient in this pass: finish's check sees it
            return
        with torch.no_grad():
            value = p.grad if grad is None else grad if p.grad is None else p.grad + grad
        self._state[key], self._value[key] = "made", value
        self._ready(p)

    def _accumulated(self, p):
        """Autograd accumulated p.grad (ready unless a later backward call
        of this pass adds to it: ``gradhooks.partial_sums``)."""
        key = id(p)
        if not self._armed or gradhooks.in_partial_sums():
            return
        state = self._state.get(key)
        self._state[key] = "done"
        if state is None:
            self._ready(p)

    def _ready(self, p):
        self._order.append(p)
        b = self._bucket_of[id(p)]
        self._missing[b] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._post(self._next)
            self._next += 1
        # let MPI move the buckets started so far along
        MPI.Request.Testall([req for req, _, _ in self._posted.values()])

    def _flat(self, b):
        """Bucket b's gradients, weighted, as one host tensor: while armed,
        those the final sweep made where it made them, else the ``.grad``s."""
        bucket = self.buckets[b]
        dtype = torch.float32 if bucket[0].dtype in HALF else bucket[0].dtype
        parts = []
        for p in bucket:
            g = self._value.get(id(p), p.grad) if self._armed else p.grad
            parts.append((g if g is not None else torch.zeros_like(p))
                         .detach().reshape(-1).to(dtype))
        return torch.cat(parts).mul_(self.weight).cpu()

    def _post(self, b):
        """Start bucket b's gather: every rank of the column -> every rank of
        the column: its weighted bucket."""
        send = self._flat(b)
        dtype = send.dtype
        recv = torch.empty((self.comm.Get_size(), send.numel()), dtype=dtype)
        req = self.comm.Iallgather(send.view(torch.uint8).numpy(),
                                   recv.view(torch.uint8).numpy())
        self._posted[b] = (req, send, recv)

    # ---- the sums ------------------------------------------------------------------
    def finish(self):
        """Collective over the column: wait for every bucket (starting those
        not started) and write the sums into the ``.grad``s."""
        if self.comm.Get_size() == 1:  # one group: its gradient is the batch's
            self._armed = False
            return
        if not self._armed:
            raise RuntimeError("GradientReducer.finish() without start(weight)")
        what = "the gradient sum over the data-parallel groups"
        self._armed = False  # from here on every bucket is read from .grad
        self.early = len(self._posted)
        guard(self.comm, what)
        order = None
        if self._hooks:  # overlapping: the same on every rank of the column
            # every rank of the column -> every rank: whether every bucket it
            # started early is bitwise the one the .grads now give, and (until
            # the buckets are made again) the order in which its gradients
            # became ready
            ok = all(torch.equal(self._flat(b), send) for b, (_, send, _) in self._posted.items())
            if not self._rebuilt and self._order:
                seen = {id(p) for p in self._order}
                order = [self._position[id(p)] for p in self._order] + [
                    self._position[id(p)] for bucket in self.buckets for p in bucket
                    if id(p) not in seen]
            found = agree(self.comm, None, payload=(ok, order), what=what)
            if not all(ok for ok, _ in found):
                for req, _, _ in self._posted.values():
                    wait(self.comm, req, what, None)
                self._posted, self._next = {}, 0
                self.close()  # no early sums from now on
            order = next((o for _, o in found if o is not None), None)
        self._value = {}
        for b in range(self._next, len(self.buckets)):
            self._post(b)
        self._next = len(self.buckets)
        for b, bucket in enumerate(self.buckets):
            req, _, parts = self._posted.pop(b)
            wait(self.comm, req, what, None)
            total = parts[0].clone()
            for d in range(1, parts.shape[0]):
                total += parts[d]
            with torch.no_grad():
                for p, piece in zip(bucket, torch.split(total, [p.numel() for p in bucket])):
                    value = piece.view_as(p).to(device=p.device, dtype=p.dtype)
                    if p.grad is None:
                        p.grad = value.clone()
                    else:
                        p.grad.copy_(value)
        if order is not None and not self._rebuilt:
            self._make_buckets([self.params[i] for i in order])
            self._rebuilt = True

    def abandon(self):
        """Collective over the column, in place of ``finish`` after a
        backward pass that failed on some rank (every rank of the column
        knows it: the failure was agreed): the gathers not yet started are
        started, in bucket order as on every rank, and every gather is
        waited for, so that the column's later gathers match theirs.  The
        ``.grad``s are left as they are; nothing is summed."""
        armed, self._armed = self._armed, False
        if self.comm.Get_size() == 1 or not armed:
            return
        what = "the gradient sums of a failed step"
        for b in range(self._next, len(self.buckets)):
            self._post(b)
        for req, _, _ in self._posted.values():
            wait(self.comm, req, what, None)
        self._posted, self._next, self._value = {}, len(self.buckets), {}

    def reduce(self, weight):
        """``start(weight)`` and ``finish()`` at once (no overlap): after a
        backward pass that ran without the reducer armed."""
        self.start(weight)
        self.finish()
