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
order (the last layers' gradients exist first); a bucket's gather starts as
soon as its last gradient has been accumulated (a post-accumulate hook), and
``finish`` waits for all of them before the optimiser step.
"""
import torch

from layerpar._watchdog import guard, wait
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
    gradients are accumulated.  Without, ``finish`` does all the work.
    ``close()`` removes the hooks."""

    def __init__(self, comm, params, *, bucket_bytes=BUCKET_BYTES, overlap=True):
        self.comm = comm
        self.params = [p for p in params if p.requires_grad]
        self.buckets = buckets_of(list(reversed(self.params)), bucket_bytes)
        self.overlap = overlap
        self._bucket_of = {}
        for b, bucket in enumerate(self.buckets):
            for p in bucket:
                self._bucket_of[id(p)] = b
        self._hooks = []
        if overlap and comm.Get_size() > 1:
            self._hooks = [p.register_post_accumulate_grad_hook(self._ready)
                           for p in self.params]
        self._armed = False
        self.weight = 1.0
        self._missing = []
        self._posted = {}

    def close(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def start(self, weight):
        """Arm for one backward pass whose gradients are weighted by
        ``weight`` (n_d/B of this group)."""
        self.weight = float(weight)
        self._missing = [len(bucket) for bucket in self.buckets]
        self._posted = {}
        self._armed = True

    def _ready(self, p):
        if not self._armed:
            return
        b = self._bucket_of[id(p)]
        self._missing[b] -= 1
        if self._missing[b] == 0:
            self._post(b)

    def _post(self, b):
        """Start bucket b's gather: every rank of the column -> every rank of
        the column: its weighted bucket."""
        bucket = self.buckets[b]
        dtype = torch.float32 if bucket[0].dtype in HALF else bucket[0].dtype
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                          .detach().reshape(-1).to(dtype) for p in bucket])
        send = flat.mul_(self.weight).cpu()
        parts = torch.empty((self.comm.Get_size(), send.numel()), dtype=dtype)
        req = self.comm.Iallgather(send.view(torch.uint8).numpy(),
                                   parts.view(torch.uint8).numpy())
        self._posted[b] = (req, send, parts)

    def finish(self):
        """Collective over the column: wait for every bucket (starting those
        not started) and write the sums into the ``.grad``s."""
        if self.comm.Get_size() == 1:  # one group: its gradient is the batch's
            self._armed = False
            return
        if not self._armed:
            raise RuntimeError("GradientReducer.finish() without start(weight)")
        guard(self.comm, "the gradient sum over the data-parallel groups")
        for b in range(len(self.buckets)):
            if b not in self._posted:
                self._post(b)
        self._armed = False
        for b, bucket in enumerate(self.buckets):
            req, _, parts = self._posted.pop(b)
            wait(self.comm, req, "the gradient sum over the data-parallel groups", None)
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

    def reduce(self, weight):
        """``start(weight)`` and ``finish()`` at once (no overlap): after a
        backward pass that ran without the reducer armed."""
        self.start(weight)
        self.finish()
