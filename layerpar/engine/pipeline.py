"""Exact layer-serial propagation across ranks, pipelined: schedules as lists
of actions, run by one interpreter.  It is what ``LayerParallel`` runs with one
level (``max_levels=1``, the exact mode): with one micro-batch (the default)
the whole batch goes through rank 0's block of layers, then rank 1's, ...;
with several the ranks work on different micro-batches at once.

The batch is split along dimension 0 into micro-batches (``torch.tensor_split``
sizes: the first ``B % M`` of them one sample larger).  Each rank runs its
stage (a contiguous block of layers) on micro-batches as its schedule says.
A schedule is, per rank, a list of actions: ``Action("F", i)`` runs the
block forward on micro-batch i (its input received from the previous rank,
or given on the first; its output sent to the next rank), ``Action("B", i)``
runs it backward (the adjoint of its output received from the next rank, or
the loss's on the last; the adjoint of its input sent to the previous rank).
Messages are non-blocking; receives are posted ahead (all of a direction at
once, or ``lookahead`` of them).  A new schedule is a new generator of
actions:

* GPipe: every forward, then (in the backward pass) every backward in
  reverse order; each rank holds all M micro-batches' graphs in between.
  A forward pass alone runs GPipe's forward; the backward pass through its
  result (autograd) runs GPipe's backward.
* 1F1B (one forward, one backward), within one training step: rank r runs
  P - r - 1 forwards (the warm-up), then alternates the forward of the next
  micro-batch with the backward of the oldest one it holds, then runs the
  remaining backwards; it holds at most P - r micro-batches' graphs at once.
  Its backward of micro-batch i needs the loss gradient of micro-batch i
  before later micro-batches have run forward, so the loss and the
  gradients are computed together (``Network.loss_and_backward``), the
  closing layer and the loss applied per micro-batch on the last rank.
  Each micro-batch's backward is an autograd call of its own that
  accumulates into ``.grad``; all but the rank's last run within
  ``gradhooks.partial_sums()`` (not yet the step's gradients: a consumer
  of final gradients, the data-parallel reducer, waits for the last).

``register_schedule(name, generate)`` adds a schedule; ``check_schedule``
tells whether a generator's orders are complete and cannot deadlock.

Every layer sees exactly the operations of the serial network on its
micro-batch, so outputs equal the serial network's and the gradients do up to
the order in which the micro-batches' weight gradients are summed
(round-off).  Layers whose output for one sample depends on other samples of
the batch (batch normalisation in training mode) see micro-batches instead
of the batch.

Messages carry a header of two float64 words, [failed flag, sender's virtual
clock], then the micro-batch's values.  A rank whose layer raised (or made
NaN/Inf) sends the header alone from then on, so the schedule of messages
never changes; every rank then learns the failure at one agreement after
the pass and raises.  Their buffers are the network's transport's
(``layerpar.engine.transport``: host memory, or the state's device on the
device path), taken from a pool per direction and neighbour and kept from
pass to pass: after the first pass of a shape, no message makes a buffer.
A received micro-batch is copied out of its buffer into a tensor of its own.
"""
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from layerpar._collective import RemoteError, agree
from layerpar._tags import tag
from layerpar._watchdog import wait
from layerpar.engine import gradhooks
from layerpar.engine.context import record
from layerpar.engine.transport import Transport, ready

_HEADER = 2                      # float64 words: [failed flag, virtual clock]
_HEADER_BYTES = 8 * _HEADER


def split_sizes(batch, microbatches):
    """Micro-batch sizes of ``torch.tensor_split(x, microbatches)``; fewer
    micro-batches than requested when the batch is smaller (none empty)."""
    m = max(1, min(microbatches, batch))
    q, r = divmod(batch, m)
    return [q + 1] * r + [q] * (m - r)


class PipelineFailure(RemoteError):
    """A layer failed on another rank during a pipelined pass (also of the
    failing exception's type, where it can be rebuilt)."""


# ---- schedules ----------------------------------------------------------------------

@dataclass(frozen=True)
class Action:
    """One step of a rank's schedule: ``kind`` "F" (forward) or "B"
    (backward) of micro-batch ``micro``."""
    kind: str
    micro: int


def gpipe_forward(rank, size, m):
    """GPipe's forward pass: every micro-batch forward, in order."""
    return [Action("F", i) for i in range(m)]


def gpipe_backward(rank, size, m):
    """GPipe's backward pass: every micro-batch backward, in reverse order."""
    return [Action("B", i) for i in reversed(range(m))]


def one_f_one_b(rank, size, m):
    """1F1B: warm-up forwards, then one forward and one backward, then the
    remaining backwards."""
    warm = min(size - rank - 1, m)
    order = [Action("F", i) for i in range(warm)]
    for i in range(m - warm):
        order += [Action("F", warm + i), Action("B", i)]
    order += [Action("B", i) for i in range(m - warm, m)]
    return order


def gpipe_step(rank, size, m):
    """GPipe as one training step: every forward, then every backward."""
    return gpipe_forward(rank, size, m) + gpipe_backward(rank, size, m)


# the schedules by name: (generator of one training step's actions (rank, ranks,
# micro-batches) -> [Action], receives posted ahead per direction (None: all))
SCHEDULES = {"gpipe": (gpipe_step, None), "1f1b": (one_f_one_b, 1)}


def register_schedule(name, generate, *, lookahead=None):
    """Make ``generate(rank, size, m)`` -> [Action] a schedule named
    ``name`` (``LayerParallel(schedule=name)``, ``mgrit.schedule``): each
    rank's actions, every micro-batch forward once and backward once, a
    backward after its forward, in an order the neighbours' orders can
    serve (``check_schedule`` tells).  ``lookahead``: receives posted ahead
    per direction (None: all at once)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r}: a schedule needs a name")
    if not callable(generate):
        raise TypeError("generate must be callable: generate(rank, size, m) -> [Action]")
    if lookahead is not None and (not isinstance(lookahead, int) or lookahead < 1):
        raise ValueError(f"lookahead={lookahead!r}: must be None or an integer >= 1")
    SCHEDULES[name] = (generate, lookahead)


def check_schedule(generate, size, m):
    """The first thing wrong with the schedule ``generate`` on ``size`` ranks
    with ``m`` micro-batches, or None: every rank runs each micro-batch
    forward once and backward once, the backward after the forward, and the
    ranks' orders complete when each action waits for its message (a
    forward for the previous rank's forward of the same micro-batch, a
    backward for the next rank's backward)."""
    orders = [list(generate(r, size, m)) for r in range(size)]
    for r, order in enumerate(orders):
        for kind in ("F", "B"):
            got = sorted(a.micro for a in order if a.kind == kind)
            if got != list(range(m)):
                return f"rank {r}: {kind} actions for micro-batches {got}, not 0..{m - 1}"
        if any(a.kind not in ("F", "B") for a in order):
            return f"rank {r}: an action of unknown kind"
        place = {(a.kind, a.micro): k for k, a in enumerate(order)}
        late = [i for i in range(m) if place[("B", i)] < place[("F", i)]]
        if late:
            return f"rank {r}: micro-batch {late[0]} runs backward before forward"
    done, nxt = set(), [0] * size
    while any(nxt[r] < len(orders[r]) for r in range(size)):
        moved = False
        for r in range(size):
            while nxt[r] < len(orders[r]):
                a = orders[r][nxt[r]]
                peer = r - 1 if a.kind == "F" else r + 1
                if 0 <= peer < size and (peer, a.kind, a.micro) not in done:
                    break
                done.add((r, a.kind, a.micro))
                nxt[r] += 1
                moved = True
        if not moved:
            stuck = {r: orders[r][nxt[r]] for r in range(size) if nxt[r] < len(orders[r])}
            return f"the ranks wait for each other: next actions {stuck}"
    return None


# ---- messages ----------------------------------------------------------------------

class _Messages:
    """Non-blocking messages of one pass between neighbouring ranks: each
    carries one micro-batch (or the header alone after a failure), of at
    most ``rows`` samples.

    Their buffers come from ``transport``'s pools, one per (direction, way,
    peer), kept from pass to pass: a send's buffer goes back when the send
    completes, a receive's once its micro-batch has been copied out (the
    copy is the block's input that autograd saves, so a later message, or
    a later pass, never overwrites it)."""

    def __init__(self, comm, row_shape, dtype, device, transport, rows):
        self.comm = comm
        self.row_shape = tuple(row_shape)
        self.dtype, self.device = dtype, device
        self.transport = transport
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.itemsize
        # every buffer holds the largest micro-batch: a slot serves any of them
        self.capacity = _HEADER_BYTES + rows * self.row_bytes
        self.where = device if transport.device_direct else torch.device("cpu")
        self.sends = []  # (request, pool, slot, dest): a buffer lives until its send completes
        self._pools = {}  # (kind, way, peer) -> the transport's pool, looked up once a pass

    def _pool(self, kind, way, peer):
        pool = self._pools.get((kind, way, peer))
        if pool is None:
            pool = self._pools[kind, way, peer] = self.transport.pool(
                (f"pipeline.{kind}.{way}", peer))
        return pool

    def post_recv(self, kind, source, tag, rows):
        pool = self._pool(kind, "recv", source)
        slot, buf = pool.take(self.capacity, self.where)
        buf = buf[:_HEADER_BYTES + rows * self.row_bytes]
        req = self.comm.Irecv(self.transport.handle(buf), source=source, tag=tag)
        return req, pool, slot, buf, rows, source

    def finish_recv(self, posted):
        """(tensor or None after a failure upstream, failed, sender's clock);
        the wait has the communicator's timeout (layerpar._watchdog)."""
        req, pool, slot, buf, rows, source = posted
        wait(self.comm, req, "a micro-batch from the neighbouring rank", source)
        failed, clock = buf[:_HEADER_BYTES].view(torch.float64).tolist()
        x = None
        if not failed:
            shape = (rows,) + self.row_shape
            if rows * self.row_bytes == 0:
                x = torch.zeros(shape, dtype=self.dtype, device=self.device)
            else:
                # copied out of the buffer, which the pool hands out again
                # (on the device path once the copy has run: MPI may write
                # into it as soon as the next receive is posted)
                body = buf[_HEADER_BYTES:].view(self.dtype).view(shape)
                x = body.to(self.device, copy=True)
                if self.transport.device_direct:
                    ready(buf.device)
        pool.give(slot)
        return x, bool(failed), float(clock)

    def send(self, kind, dest, tag, x, failed, clock):
        """Send micro-batch x (header only when failed) to dest."""
        self.reap()
        nbytes = 0 if failed else x.numel() * self.itemsize
        pool = self._pool(kind, "send", dest)
        slot, buf = pool.take(self.capacity, self.where)
        buf = buf[:_HEADER_BYTES + nbytes]
        header = buf[:_HEADER_BYTES].view(torch.float64)  # written in place
        header[0], header[1] = (1.0 if failed else 0.0), clock
        if nbytes:
            # one copy into the message (from the GPU when x lives there and
            # the message is staged through the host)
            buf[_HEADER_BYTES:].view(self.dtype).view(x.shape).copy_(x.detach())
        if self.transport.device_direct:
            ready(buf.device)
        req = self.comm.Isend(self.transport.handle(buf), dest=dest, tag=tag)
        self.sends.append((req, pool, slot, dest))

    def reap(self):
        """Give back the buffers of the sends that have completed."""
        pending = []
        for sent in self.sends:
            if sent[0].Test():
                sent[1].give(sent[2])
            else:
                pending.append(sent)
        self.sends = pending

    def wait_sends(self):
        """Wait for every send (each with the communicator's timeout)."""
        while self.sends:
            req, pool, slot, dest = self.sends[0]
            wait(self.comm, req, "a micro-batch sent to the neighbouring rank", dest)
            pool.give(slot)
            self.sends.pop(0)


def _agree(comm, error, clocks, norm=None):
    """Collective: (each of the virtual ``clocks``' maxima over the ranks,
    the one ``norm`` given, by the rank holding the pass's given state); when
    a rank failed, every rank raises (the original exception there, a
    PipelineFailure of the same type elsewhere: NaN/Inf is a
    FloatingPointError naming the layer on every rank).  One agreement of
    ``layerpar._collective``; no message on one rank."""
    parts = agree(comm, error, what="pipelined pass", error_type=PipelineFailure,
                  payload=(clocks, norm), label="the agreement after a pipelined pass")
    maxima = tuple(max(c[k] for c, _ in parts) for k in range(len(clocks)))
    return maxima, next((v for _, v in parts if v is not None), 0.0)


# ---- the interpreter ------------------------------------------------------------------

class _Run:
    """One run of a schedule's actions by one rank of ``comm``, with its
    stage, pass context and micro-batch ``sizes``.

    ``source(i)`` (first rank): micro-batch i's input, a tensor whose graph
    the block continues; ``sink(i, y)`` (last rank): what micro-batch i's
    backward starts from (its output, or its loss); ``start(i)`` (last
    rank): the adjoint its backward starts with (None: a loss);
    ``collect``: weight gradients are summed here and returned (the
    autograd function's backward) instead of accumulated in ``.grad``;
    ``transport``: the network's, whose buffers carry the messages."""

    def __init__(self, stage, ctx, comm, sizes, transport, *, source=None, sink=None,
                 start=None, params=(), collect=False):
        self.stage, self.ctx, self.comm = stage, ctx, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.first, self.last = self.rank == 0, self.rank == self.size - 1
        self.sizes, self.m = sizes, len(sizes)
        self.cost = len(stage.indices) / self.m  # full-batch layer steps
        self.several = self.m > 1
        self.source, self.sink, self.start = source, sink, start
        self.params, self.collect = params, collect
        # frozen parameters (requires_grad False) get no gradient: None; a
        # parameter listed twice (a module shared by two layers) is
        # differentiated once and its gradient returned at its first place
        # (autograd would add the places' gradients)
        self.trainable, seen = [], set()
        for k, p in enumerate(params):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.trainable.append(k)
        self.sums = [None] * len(params)
        self.grad_inputs = {}
        meta = ctx.meta
        self.msgs = _Messages(comm, meta.shape[1:], meta.dtype, meta.device,
                              transport, max(sizes))
        self.error, self.clock, self.clock_fwd = None, 0.0, 0.0
        self.peak_held = 0

    # ---- messages: states from the previous rank, adjoints from the next, each
    # tagged with its micro-batch (layerpar._tags: a band per direction)
    def _peer(self, kind):
        return self.rank - 1 if kind == "F" else self.rank + 1

    def _post(self, kind):
        waiting, posted = self.waiting[kind], self.posted[kind]
        purpose = "pipeline.forward" if kind == "F" else "pipeline.backward"
        while waiting and (self.lookahead is None or len(posted) < self.lookahead):
            i = waiting.popleft()
            t = tag(purpose, i)
            posted[i] = self.msgs.post_recv(kind, self._peer(kind), t, self.sizes[i])

    def _receive(self, kind, i):
        """(tensor or None, failed) of micro-batch i from the neighbour."""
        x, failed, sent_at = self.msgs.finish_recv(self.posted[kind].pop(i))
        self._post(kind)
        self.clock = max(self.clock, sent_at)
        return x, failed

    def run(self, actions, lookahead=None):
        """Run ``actions``, posting each direction's receives ahead (all of
        them, or ``lookahead``)."""
        receives = {"F": not self.first, "B": not self.last}
        self.lookahead = lookahead
        self.waiting = {k: deque(a.micro for a in actions if a.kind == k and receives[k])
                        for k in ("F", "B")}
        self.posted = {"F": {}, "B": {}}
        # the micro-batch of this rank's last backward: the earlier ones'
        # accumulations into .grad are partial sums (engine.gradhooks)
        self.final = next((a.micro for a in reversed(actions) if a.kind == "B"), None)
        for kind in ("F", "B"):
            self._post(kind)
        for action in actions:
            if action.kind == "F":
                self._forward(action.micro)
            else:
                self._backward(action.micro)
            self.msgs.reap()
        self.msgs.wait_sends()

    def _forward(self, i):
        failed, y = False, None
        if not self.first:
            x, failed = self._receive("F", i)
        if not failed and self.error is None:
            try:
                part = i if self.several else None
                x_in = self.source(i) if self.first \
                    else x.detach().requires_grad_(self.ctx.record)
                _, y = self.stage.block(x_in, self.ctx, self.ctx.record, detach=False,
                                        part=part)
                self.clock += self.cost
                if not torch.isfinite(y).all():
                    raise FloatingPointError(
                        self.stage.first_nonfinite(x_in.detach(), self.ctx, part))
                self.ctx.graphs[i] = (x_in, self.sink(i, y) if self.last else y)
                self.peak_held = max(self.peak_held, len(self.ctx.graphs))
            except Exception as e:  # reported on every rank by _agree
                self.error, y = e, None
        failed = failed or self.error is not None
        self.clock_fwd = self.clock
        if not self.last:
            # micro-batch i's block output, to the next rank
            t = tag("pipeline.forward", i)
            self.msgs.send("F", self.rank + 1, t, y, failed, self.clock)

    def _backward(self, i):
        failed, gx = False, None
        if self.last:
            g = self.start(i)
        else:
            g, failed = self._receive("B", i)
        graphs = self.ctx.graphs
        graph = graphs.get(i) if self.ctx.retain else graphs.pop(i, None)
        if not failed and self.error is None and graph is not None:
            try:
                x_in, y = graph
                gx = self._differentiate(x_in, y, g, partial=i != self.final)
                self.clock += self.cost
            except Exception as e:
                self.error = e
        # no graph: micro-batch i failed forward, here or upstream
        failed = failed or self.error is not None or graph is None
        del graph
        if not self.first:
            # the adjoint of micro-batch i's block input, to the previous rank
            t = tag("pipeline.backward", i)
            self.msgs.send("B", self.rank - 1, t, gx, failed, self.clock)
        elif gx is not None:
            self.grad_inputs[i] = gx

    def _differentiate(self, x_in, y, g, partial):
        """The adjoint of the block's input; the weight gradients summed
        (``collect``) or accumulated in ``.grad``, as partial sums of the
        pass's (``gradhooks.partial_sums``) unless this is the rank's last
        backward (``partial`` False)."""
        if self.collect:
            wrt = tuple(self.params[k] for k in self.trainable)
            grads = torch.autograd.grad(y, (x_in,) + wrt, grad_outputs=g, allow_unused=True,
                                        retain_graph=self.ctx.retain)
            for k, gp in zip(self.trainable, grads[1:]):
                if gp is not None:
                    self.sums[k] = gp if self.sums[k] is None else self.sums[k].add_(gp)
            return grads[0]
        if partial:
            with gradhooks.partial_sums():
                torch.autograd.backward(y, g)
        else:
            torch.autograd.backward(y, g)
        return None if self.first else x_in.grad


# ---- the passes -----------------------------------------------------------------------

class Pipeline:
    """The pipelined passes of a stage, with ``microbatches`` micro-batches,
    over the communicator ``communicator()`` gives (one of their own, made at
    the first pipelined pass on every rank, so that their messages never
    meet the solvers' or the user's), in buffers of ``transport`` (the
    network's ``layerpar.engine.transport.Transport``; default: host)."""

    def __init__(self, stage, communicator, *, microbatches=1, transport=None):
        self.stage = stage
        self._communicator = communicator
        self.microbatches = microbatches
        self.transport = transport or Transport("host")
        self.peak_held = 0  # most micro-batch graphs held at once in the last pass

    @property
    def comm(self):
        return self._communicator()

    def _sizes(self, ctx):
        """The micro-batch sizes of the pass; its context cut to match."""
        sizes = split_sizes(ctx.meta.shape[0], self.microbatches)
        ctx.split_context(len(sizes))
        return sizes

    def on_graph(self, ctx, u0):
        """The exact pass on one rank with the whole batch: the block
        recorded on the caller's autograd graph, as nn.Sequential records
        it, so that backward is ordinary back-propagation (no autograd
        function of ours, no second engine call); a hook on the output's
        gradient writes the backward pass's record."""
        stage = self.stage
        ctx.plan = stage.plan_calls()
        _, y = stage.block(u0, ctx, torch.is_grad_enabled(), detach=False)
        if not torch.isfinite(y).all():
            raise FloatingPointError(stage.first_nonfinite(u0.detach(), ctx))
        steps = len(stage.indices)
        self.peak_held = int(y.requires_grad)
        norm = float(torch.linalg.vector_norm(u0.detach()))
        records = ctx.records
        records.forward = record(steps, float(steps), norm)
        if y.requires_grad:
            def write(grad):
                records.backward = record(steps, float(steps),
                                          float(torch.linalg.vector_norm(grad)))
            y.register_hook(write)
        return y

    def forward(self, ctx, u0):
        """GPipe's forward pass: u_N on the last rank (a placeholder
        elsewhere); the blocks' graphs stay in ``ctx``."""
        comm, meta = self.comm, ctx.meta
        rank, size = comm.Get_rank(), comm.Get_size()
        sizes = self._sizes(ctx)
        ctx.plan = self.stage.plan_calls()
        ctx.graphs = {}
        inputs = u0.tensor_split(len(sizes)) if rank == 0 else None
        outputs = {}

        def keep(i, y):
            outputs[i] = y.detach()
            return y

        run = _Run(self.stage, ctx, comm, sizes, self.transport,
                   source=lambda i: inputs[i].detach().requires_grad_(ctx.record), sink=keep)
        run.run(gpipe_forward(rank, size, len(sizes)))
        self.peak_held = len(ctx.graphs)
        norm = float(torch.linalg.vector_norm(u0.detach())) if rank == 0 else None
        (clock,), norm = _agree(comm, run.error, (run.clock,), norm)
        ctx.records.forward = record(len(self.stage.indices), clock, norm)
        if rank == size - 1:
            outs = [outputs[i] for i in range(len(sizes))]
            return torch.cat(outs) if len(outs) > 1 else outs[0].clone()
        return torch.zeros(0, dtype=meta.dtype, device=meta.device)

    def diagnose(self, ctx, u0):
        """An exact pass of the whole batch without autograd that leaves
        every buffer as it was: raises on every rank a FloatingPointError
        naming the first layer whose output (or the input of the first
        layer) is NaN or Inf; returns when the exact network is finite.  For
        reports after an MGRIT solve found NaN or Inf."""
        saved = [(b, b.detach().clone()) for b in self.stage.layers.buffers()]
        micro, self.microbatches = self.microbatches, 1
        try:
            with torch.no_grad():
                self.forward(ctx, u0)
        finally:
            self.microbatches = micro
            with torch.no_grad():
                for b, value in saved:
                    b.copy_(value)

    def backward(self, ctx, grad_out, params):
        """GPipe's backward pass: (dloss/du_0 on the first rank or None,
        gradients of ``params``, the local layers' parameters that the
        forward pass was given)."""
        comm, meta = self.comm, ctx.meta
        rank, size = comm.Get_rank(), comm.Get_size()
        sizes = self._sizes(ctx)
        m = len(sizes)
        seeds = None
        if rank == size - 1:
            if grad_out is None or tuple(grad_out.shape) != tuple(meta.shape):
                grad_out = torch.zeros(meta.shape, dtype=meta.dtype, device=meta.device)
            seeds = grad_out.tensor_split(m)
        run = _Run(self.stage, ctx, comm, sizes, self.transport, start=lambda i: seeds[i],
                   params=params, collect=True)
        run.run(gpipe_backward(rank, size, m))
        norm = float(torch.linalg.vector_norm(grad_out.detach())) if rank == size - 1 else None
        (clock,), norm = _agree(comm, run.error, (run.clock,), norm)
        ctx.records.backward = record(len(self.stage.indices), clock, norm)
        grad_u0 = torch.cat([run.grad_inputs[i] for i in range(m)]) if rank == 0 else None
        return grad_u0, run.sums

    def train(self, ctx, first, last, schedule):
        """One training step's forward and backward passes in ``schedule``
        (a name of ``SCHEDULES``).  ``first(i)`` (first
        rank): micro-batch i's input state, with its graph (the opening
        layer); ``last(i, u)`` (last rank): the scalar loss of micro-batch i
        from its final state u, with its graph (closing layer and loss),
        weighted as the step's loss needs.  The gradients of every parameter
        on the graphs accumulate in ``.grad``.  Returns the sum of the
        micro-batches' losses (last rank, else None)."""
        comm = self.comm
        rank, size = comm.Get_rank(), comm.Get_size()
        sizes = self._sizes(ctx)
        ctx.plan = self.stage.plan_calls()
        ctx.graphs = {}
        total = []

        def loss(i, out):
            value = last(i, out)
            total.append(value.detach())
            return value

        generate, lookahead = SCHEDULES[schedule]
        run = _Run(self.stage, ctx, comm, sizes, self.transport, source=first, sink=loss,
                   start=lambda i: None)
        run.run(generate(rank, size, len(sizes)), lookahead)
        ctx.graphs.clear()
        self.peak_held = run.peak_held
        (clock_fwd, clock), _ = _agree(comm, run.error, (run.clock_fwd, run.clock))
        # the passes interleave: the forward's clock is the one at this
        # rank's last forward (backwards before it included), the backward's
        # the rest
        ctx.records.forward = record(len(self.stage.indices), clock_fwd)
        ctx.records.backward = record(len(self.stage.indices), clock - clock_fwd)
        if rank != size - 1:
            return None
        out = total[0]
        for value in total[1:]:
            out = out + value
        return out


class PipelineFunction(torch.autograd.Function):
    """Forward: the pipelined layer-serial pass.  Backward: the pipelined
    adjoint pass; gradients for the input state (first rank) and the local
    layers' parameters (the trailing inputs)."""

    @staticmethod
    def forward(fn_ctx, pipeline, ctx, anchor, u0, *params):
        # autograd is off inside forward: ctx.record says whether it was on
        fn_ctx.pipeline, fn_ctx.ctx, fn_ctx.params = pipeline, ctx, params
        return pipeline.forward(ctx, u0)

    @staticmethod
    def backward(fn_ctx, grad_out):
        grad_u0, grads = fn_ctx.pipeline.backward(fn_ctx.ctx, grad_out, fn_ctx.params)
        if grad_u0 is None or not fn_ctx.needs_input_grad[3]:
            grad_u0 = None
        return (None, None, None, grad_u0, *grads)
