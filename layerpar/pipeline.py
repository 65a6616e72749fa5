"""Exact layer-serial propagation across ranks, pipelined: GPipe and 1F1B
schedules.  It is what ``LayerParallel`` runs with one level (``max_levels=1``,
the exact mode): with one micro-batch (the default) the whole batch goes
through rank 0's block of layers, then rank 1's, ...; with several the ranks
work on different micro-batches at once.

The batch is split along dimension 0 into micro-batches (``torch.tensor_split``
sizes: the first ``B % M`` of them one sample larger).  Rank r holds the
layers ``LayerParallel.layer_indices`` (a contiguous block) and runs them on
micro-batch i as soon as rank r-1 has sent it; it sends the block's output on
to rank r+1 with a non-blocking message and goes on with micro-batch i+1, so
that the P ranks work on P micro-batches at once.  Backward runs the other way:
micro-batches in reverse order, the adjoint of the block's output from rank
r+1, ``torch.autograd.grad`` through the block's kept graph, the adjoint of its
input to rank r-1.  Every layer sees exactly the operations of the serial
network on its micro-batch, so outputs equal the serial network's and the
gradients do up to the order in which the micro-batches' weight gradients
are summed (round-off).  Layers whose output for one sample depends on other
samples of the batch (batch normalisation in training mode) see micro-batches
instead of the batch.

GPipe runs every forward before every backward, so each rank holds the
graphs of all M micro-batches between the two passes.  The 1F1B schedule
(one forward, one backward: ``Pipeline.train_1f1b``) interleaves them within
one training step: rank r runs P - r - 1 forwards (the warm-up), then
alternates the forward of the next micro-batch with the backward of the
oldest one it holds, then runs the remaining backwards; it holds at most
P - r micro-batches' graphs at once (``peak_held``).  Its backward of
micro-batch i needs the loss gradient of micro-batch i before the later
micro-batches have run forward, so it computes the loss and the gradients
together (``Network.loss_and_backward``), the closing layer and the loss
applied per micro-batch on the last rank.

Messages carry a header of two float64 words, [failed flag, sender's virtual
clock], then the micro-batch's values.  A rank whose layer raised (or made
NaN/Inf) sends the header alone from then on, so the schedule of messages
never changes; every rank then learns the failure at one agreement after
the pass and raises.
"""
import numpy as np
import torch
from mpi4py import MPI

from layerpar._tags import tag
from layerpar._watchdog import guard, wait

SCHEDULES = ("gpipe", "1f1b")
_HEADER = 2                      # float64 words: [failed flag, virtual clock]
_HEADER_BYTES = 8 * _HEADER


def split_sizes(batch, microbatches):
    """Micro-batch sizes of ``torch.tensor_split(x, microbatches)``; fewer
    micro-batches than requested when the batch is smaller (none empty)."""
    m = max(1, min(microbatches, batch))
    q, r = divmod(batch, m)
    return [q + 1] * r + [q] * (m - r)


class PipelineFailure(RuntimeError):
    """A layer failed on another rank during a pipelined pass."""


class _Messages:
    """Non-blocking messages of one pass between neighbouring ranks: each
    carries one micro-batch (or the header alone after a failure)."""

    def __init__(self, comm, row_shape, dtype, device):
        self.comm = comm
        self.row_shape = tuple(row_shape)
        self.dtype, self.device = dtype, device
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.itemsize
        self.sends = []  # (request, buffer, dest): a buffer lives until its send completes

    def post_recv(self, source, tag, rows):
        buf = np.empty(_HEADER_BYTES + rows * self.row_bytes, dtype=np.uint8)
        return self.comm.Irecv([buf, MPI.BYTE], source=source, tag=tag), buf, rows, source

    def finish_recv(self, posted):
        """(tensor or None after a failure upstream, failed, sender's clock);
        the wait has the communicator's timeout (layerpar._watchdog)."""
        req, buf, rows, source = posted
        wait(self.comm, req, "a micro-batch from the neighbouring rank", source)
        failed, clock = np.frombuffer(buf, dtype=np.float64, count=_HEADER)
        if failed:
            return None, True, float(clock)
        if rows * self.row_bytes == 0:
            return torch.zeros((rows,) + self.row_shape, dtype=self.dtype,
                               device=self.device), False, float(clock)
        # a view of the receive buffer: no copy on the CPU
        x = torch.frombuffer(memoryview(buf)[_HEADER_BYTES:], dtype=self.dtype)
        return x.view((rows,) + self.row_shape).to(self.device), False, float(clock)

    def send(self, dest, tag, x, failed, clock):
        """Send micro-batch x (header only when failed) to dest."""
        nbytes = 0 if failed else x.numel() * self.itemsize
        buf = np.empty(_HEADER_BYTES + nbytes, dtype=np.uint8)
        buf[:_HEADER_BYTES].view(np.float64)[:] = (1.0 if failed else 0.0, clock)
        if nbytes:
            # one copy into the message (from the GPU when x lives there)
            body = torch.frombuffer(memoryview(buf)[_HEADER_BYTES:], dtype=self.dtype)
            body.view(x.shape).copy_(x.detach())
        self.sends.append((self.comm.Isend([buf, MPI.BYTE], dest=dest, tag=tag), buf, dest))

    def reap(self):
        """Release the buffers of the sends that have completed."""
        self.sends = [(req, buf, dest) for req, buf, dest in self.sends if not req.Test()]

    def wait_sends(self):
        """Wait for every send (each with the communicator's timeout)."""
        for req, _, dest in self.sends:
            wait(self.comm, req, "a micro-batch sent to the neighbouring rank", dest)
        self.sends.clear()


def _first_nonfinite(net, x, part=None):
    """Where a block's output turned NaN/Inf: re-run its layers on x (with
    the pass's random draws, buffers left as they are)."""
    if not torch.isfinite(x).all():
        return f"the input of layer {net.layer_indices[0]} is NaN or Inf"
    with torch.no_grad():
        for n in net.layer_indices:
            x = torch.add(x, net._call_step(n, net.layers[str(n)], x, final=False, part=part),
                          alpha=net.h)
            if not torch.isfinite(x).all():
                return f"layer {n} produced NaN or Inf"
    return f"layer {net.layer_indices[-1]} produced NaN or Inf"


def _agree(comm, error, clocks, norm=None):
    """Collective: (each of the virtual ``clocks``' maxima over the ranks,
    the one ``norm`` given, by the rank holding the pass's given state), and
    every rank raises when a rank failed (the original exception there,
    PipelineFailure elsewhere; NaN/Inf as FloatingPointError everywhere,
    naming the layer).  On one rank there is nothing to agree on: no
    message."""
    if isinstance(error, FloatingPointError):
        info = ("nonfinite", str(error))
    elif error is not None:
        info = ("error", f"{type(error).__name__}: {error}")
    else:
        info = None
    if comm.Get_size() == 1:
        parts = [(info, clocks, norm)]
    else:
        guard(comm, "the agreement after a pipelined pass")
        parts = comm.allgather((info, clocks, norm))
    for rank, (other, _, _) in enumerate(parts):
        if other is None:
            continue
        if error is not None and not isinstance(error, FloatingPointError):
            raise error
        if other[0] == "nonfinite":
            raise FloatingPointError(other[1])
        raise PipelineFailure(f"pipelined pass: rank {rank} failed: {other[1]}")
    maxima = tuple(max(c[k] for _, c, _ in parts) for k in range(len(clocks)))
    return maxima, next((v for _, _, v in parts if v is not None), 0.0)


def _record(steps, clock, norm=None):
    """``last_forward``/``last_backward`` of a pass that ran ``steps`` layer
    steps on this rank, ``clock`` on the virtual clock; ``norm``: the 2-norm
    of the state the pass was given (None: not measured)."""
    out = {"iterations": 1, "residual_norms": [], "steps": [steps], "virtual_time": clock}
    if norm is not None:
        out["input_norm"] = norm
    return out


class Pipeline:
    """The pipelined passes of one ``LayerParallel`` module (``net``), on a
    communicator of its own."""

    def __init__(self, net):
        self.net = net
        self.peak_held = 0  # most micro-batch graphs held at once in the last pass

    @property
    def comm(self):
        """Made at the first pipelined pass (every rank takes part in it) and
        freed by the module's close(): its messages never meet the solvers'
        or the user's."""
        return self.net.communicator("pipeline")

    def _block(self, x, record, *, detach=True, part=None):
        """This rank's layers on micro-batch x (number ``part`` of several;
        None: the whole batch): (input leaf, output); with ``detach=False``
        x itself is the input (its graph continues).  The layers run under
        the module-state policy of the final sweep (``_call_step``)."""
        net = self.net
        call, h = net._call_step, net.h
        with torch.set_grad_enabled(record):
            x_in = x.detach().requires_grad_(record) if detach else x
            y = x_in
            for n, (F, _, _) in zip(net.layer_indices, net._layer_modules):
                y = torch.add(y, call(n, F, y, True, part), alpha=h)
        return x_in, y

    def on_graph(self, u0):
        """The exact pass on one rank with the whole batch: the block
        recorded on the caller's autograd graph, as nn.Sequential records
        it, so that backward is ordinary back-propagation (no autograd
        function of ours, no second engine call); a hook on the output's
        gradient writes the backward pass's record."""
        net = self.net
        net._plan_calls()
        _, y = self._block(u0, torch.is_grad_enabled(), detach=False)
        if not torch.isfinite(y).all():
            raise FloatingPointError(_first_nonfinite(net, u0.detach()))
        steps = len(net.layer_indices)
        self.peak_held = int(y.requires_grad)
        norm = float(torch.linalg.vector_norm(u0.detach()))
        net.last_forward = _record(steps, float(steps), norm)
        if y.requires_grad:
            def record(grad):
                net.last_backward = _record(steps, float(steps),
                                            float(torch.linalg.vector_norm(grad)))
            y.register_hook(record)
        return y

    def forward(self, u0, shape, dtype, device, record):
        """u_N on the last rank (a placeholder elsewhere) and the kept
        (input, output) graph of every micro-batch's block."""
        net, comm = self.net, self.comm
        rank, size = comm.Get_rank(), comm.Get_size()
        sizes = split_sizes(shape[0], net.microbatches)
        cost = len(net.layer_indices) / len(sizes)  # full-batch layer steps
        net._plan_calls()
        several = len(sizes) > 1
        msgs = _Messages(comm, shape[1:], dtype, device)
        # receives from the previous rank, posted at once (tag: micro-batch)
        recvs = [msgs.post_recv(rank - 1, tag("pipeline.forward", i), b)
                 for i, b in enumerate(sizes)] if rank > 0 else []
        inputs = u0.tensor_split(len(sizes)) if rank == 0 else None
        kept, outputs, error, clock = [], [], None, 0.0
        for i in range(len(sizes)):
            if rank == 0:
                x, failed = inputs[i], False
            else:
                x, failed, sent_at = msgs.finish_recv(recvs[i])
                clock = max(clock, sent_at)
            y = None
            if not failed and error is None:
                try:
                    part = i if several else None
                    x_in, y = self._block(x, record, part=part)
                    clock += cost
                    if not torch.isfinite(y).all():
                        error = FloatingPointError(_first_nonfinite(net, x, part))
                    kept.append((x_in, y))
                except Exception as e:  # reported on every rank by _agree
                    error = e
            failed = failed or error is not None
            if rank < size - 1:
                # the block's output for micro-batch i, to the next rank
                msgs.send(rank + 1, tag("pipeline.forward", i), y, failed, clock)
            elif not failed:
                outputs.append(y.detach())
        msgs.wait_sends()
        self.peak_held = len(kept)
        norm = float(torch.linalg.vector_norm(u0.detach())) if rank == 0 else None
        (clock,), norm = _agree(comm, error, (clock,), norm)
        net.last_forward = _record(len(net.layer_indices), clock, norm)
        if rank == size - 1:
            return torch.cat(outputs) if len(outputs) > 1 else outputs[0].clone(), kept
        return torch.zeros(0, dtype=dtype, device=device), kept

    def backward(self, kept, grad_out, shape, dtype, device, params):
        """(dloss/du_0 on the first rank or None, gradients of ``params``,
        the local layers' parameters that the forward pass was given)."""
        net, comm = self.net, self.comm
        rank, size = comm.Get_rank(), comm.Get_size()
        sizes = split_sizes(shape[0], net.microbatches)
        m = len(sizes)
        cost = len(net.layer_indices) / m
        msgs = _Messages(comm, shape[1:], dtype, device)
        # adjoints from the next rank, in reverse order (tag: micro-batch)
        recvs = {i: msgs.post_recv(rank + 1, tag("pipeline.backward", i), sizes[i])
                 for i in reversed(range(m))} if rank < size - 1 else {}
        if rank == size - 1:
            if grad_out is None or tuple(grad_out.shape) != tuple(shape):
                grad_out = torch.zeros(shape, dtype=dtype, device=device)
            seeds = grad_out.tensor_split(m)
        sums = [None] * len(params)
        # frozen parameters (requires_grad False) get no gradient: None
        trainable = [k for k, p in enumerate(params) if p.requires_grad]
        wrt = tuple(params[k] for k in trainable)
        grad_inputs = [None] * m
        error, clock = None, 0.0
        for i in reversed(range(m)):
            if rank == size - 1:
                g, failed = seeds[i], False
            else:
                g, failed, sent_at = msgs.finish_recv(recvs[i])
                clock = max(clock, sent_at)
            gx = None
            if not failed and error is None:
                try:
                    x_in, y = kept[i]
                    grads = torch.autograd.grad(y, (x_in,) + wrt, grad_outputs=g,
                                                allow_unused=True,
                                                retain_graph=net.retain_graphs)
                    clock += cost
                    gx = grads[0]
                    for k, gp in zip(trainable, grads[1:]):
                        if gp is not None:
                            sums[k] = gp if sums[k] is None else sums[k].add_(gp)
                except Exception as e:
                    error = e
            failed = failed or error is not None
            if rank > 0:
                # the adjoint of micro-batch i's block input, to the previous rank
                msgs.send(rank - 1, tag("pipeline.backward", i), gx, failed, clock)
            else:
                grad_inputs[i] = gx
        msgs.wait_sends()
        if not net.retain_graphs:
            kept.clear()
        norm = float(torch.linalg.vector_norm(grad_out.detach())) if rank == size - 1 else None
        (clock,), norm = _agree(comm, error, (clock,), norm)
        net.last_backward = _record(len(net.layer_indices), clock, norm)
        grad_u0 = torch.cat(grad_inputs) if rank == 0 else None
        return grad_u0, sums

    def train_1f1b(self, first, last, shape, dtype, device):
        """One training step's forward and backward passes in the 1F1B
        schedule.  ``first(i)`` (first rank): micro-batch i's input state,
        with its graph (the opening layer); ``last(i, u)`` (last rank): the
        scalar loss of micro-batch i from its final state u, with its graph
        (closing layer and loss), weighted as the step's loss needs.  The
        gradients of every parameter on the graphs accumulate in ``.grad``.
        Returns the sum of the micro-batches' losses (last rank, else None)."""
        net, comm = self.net, self.comm
        rank, size = comm.Get_rank(), comm.Get_size()
        is_first, is_last = rank == 0, rank == size - 1
        sizes = split_sizes(shape[0], net.microbatches)
        m = len(sizes)
        cost = len(net.layer_indices) / m  # full-batch layer steps
        warm = min(size - rank - 1, m)
        order = [("f", i) for i in range(warm)]
        for i in range(m - warm):
            order += [("f", warm + i), ("b", i)]
        order += [("b", i) for i in range(m - warm, m)]
        msgs = _Messages(comm, shape[1:], dtype, device)
        net._plan_calls()
        several = m > 1

        # one receive posted ahead per direction: states from the previous
        # rank (tag: micro-batch), adjoints from the next one (tag: micro-batch)
        def post(direction, i):
            if i >= m:
                return None
            if direction == "f":
                if is_first:
                    return None
                return msgs.post_recv(rank - 1, tag("pipeline.forward", i), sizes[i])
            if is_last:
                return None
            return msgs.post_recv(rank + 1, tag("pipeline.backward", i), sizes[i])

        posted = {"f": post("f", 0), "b": post("b", 0)}
        held, self.peak_held = {}, 0
        total, error, clock, clock_fwd = None, None, 0.0, 0.0
        for kind, i in order:
            failed = False
            if posted[kind] is not None:
                x, failed, sent_at = msgs.finish_recv(posted[kind])
                posted[kind] = post(kind, i + 1)
                clock = max(clock, sent_at)
            if kind == "f":
                out = None
                if not failed and error is None:
                    try:
                        x_in = first(i) if is_first else x.detach().requires_grad_(True)
                        part = i if several else None
                        _, out = self._block(x_in, True, detach=False, part=part)
                        clock += cost
                        if not torch.isfinite(out).all():
                            raise FloatingPointError(_first_nonfinite(net, x_in.detach(), part))
                        if is_last:  # the graph ends in micro-batch i's loss
                            loss = last(i, out)
                            total = loss.detach() if total is None else total + loss.detach()
                            held[i] = (x_in, loss)
                        else:
                            held[i] = (x_in, out)
                        self.peak_held = max(self.peak_held, len(held))
                    except Exception as e:  # reported on every rank by _agree
                        error, out = e, None
                failed = failed or error is not None
                clock_fwd = clock
                if not is_last:
                    # micro-batch i's block output, to the next rank
                    msgs.send(rank + 1, tag("pipeline.forward", i), out, failed, clock)
            else:
                gx = None
                graph = held.pop(i, None)  # released after its backward
                if not failed and error is None and graph is not None:
                    try:
                        x_in, out = graph
                        torch.autograd.backward(out, None if is_last else x)
                        clock += cost
                        gx = None if is_first else x_in.grad
                    except Exception as e:
                        error = e
                # no graph: micro-batch i failed forward, here or upstream
                failed = failed or error is not None or graph is None
                del graph
                if not is_first:
                    # the adjoint of micro-batch i's block input, to the previous rank
                    msgs.send(rank - 1, tag("pipeline.backward", i), gx, failed, clock)
            msgs.reap()
        msgs.wait_sends()
        held.clear()
        (clock_fwd, clock), _ = _agree(comm, error, (clock_fwd, clock))
        # the passes interleave: the forward's clock is the one at this
        # rank's last forward (backwards before it included), the backward's
        # the rest
        net.last_forward = _record(len(net.layer_indices), clock_fwd)
        net.last_backward = _record(len(net.layer_indices), clock - clock_fwd)
        return total if is_last else None


class PipelineFunction(torch.autograd.Function):
    """Forward: the pipelined layer-serial pass.  Backward: the pipelined
    adjoint pass; gradients for the input state (first rank) and the local
    layers' parameters (the trailing inputs)."""

    @staticmethod
    def forward(ctx, net, meta, anchor, u0, *params):
        pipe = net._pipeline
        # autograd is off inside forward: net._record says whether it was on
        out, ctx.kept = pipe.forward(u0, *meta, record=net._record)
        ctx.net, ctx.meta, ctx.params = net, meta, params
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_u0, grads = ctx.net._pipeline.backward(ctx.kept, grad_out, *ctx.meta, ctx.params)
        if grad_u0 is None or not ctx.needs_input_grad[3]:
            grad_u0 = None
        return (None, None, None, grad_u0, *grads)
