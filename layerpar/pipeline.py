"""Exact pipelined layer-serial propagation (GPipe schedule).

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

Messages carry a header of two float64 words, [failed flag, sender's virtual
clock], then the micro-batch's values.  A rank whose layer raised (or made
NaN/Inf) sends the header alone from then on, so the schedule of messages
never changes; every rank then learns the failure at one agreement after
the pass and raises.
"""
import numpy as np
import torch
from mpi4py import MPI

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
        self.sends = []  # (request, buffer): a buffer lives until its send completes

    def post_recv(self, source, tag, rows):
        buf = np.empty(_HEADER_BYTES + rows * self.row_bytes, dtype=np.uint8)
        return self.comm.Irecv([buf, MPI.BYTE], source=source, tag=tag), buf, rows

    def finish_recv(self, posted):
        """(tensor or None after a failure upstream, failed, sender's clock)."""
        req, buf, rows = posted
        status = MPI.Status()
        req.Wait(status)
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
        self.sends.append((self.comm.Isend([buf, MPI.BYTE], dest=dest, tag=tag), buf))

    def wait_sends(self):
        MPI.Request.Waitall([req for req, _ in self.sends])
        self.sends.clear()


def _first_nonfinite(net, x):
    """Where a block's output turned NaN/Inf: re-run its layers on x."""
    if not torch.isfinite(x).all():
        return f"the input of layer {net.layer_indices[0]} is NaN or Inf"
    with torch.no_grad():
        for n in net.layer_indices:
            x = torch.add(x, net.layers[str(n)](x), alpha=net.h)
            if not torch.isfinite(x).all():
                return f"layer {n} produced NaN or Inf"
    return f"layer {net.layer_indices[-1]} produced NaN or Inf"


def _agree(comm, error, clock):
    """Collective: the virtual clock's maximum, and every rank raises when a
    rank failed (the original exception there, PipelineFailure elsewhere;
    NaN/Inf as FloatingPointError everywhere, naming the layer)."""
    if isinstance(error, FloatingPointError):
        info = ("nonfinite", str(error))
    elif error is not None:
        info = ("error", f"{type(error).__name__}: {error}")
    else:
        info = None
    parts = comm.allgather((info, clock))
    for rank, (other, _) in enumerate(parts):
        if other is None:
            continue
        if error is not None and not isinstance(error, FloatingPointError):
            raise error
        if other[0] == "nonfinite":
            raise FloatingPointError(other[1])
        raise PipelineFailure(f"pipelined pass: rank {rank} failed: {other[1]}")
    return max(c for _, c in parts)


class Pipeline:
    """The pipelined passes of one ``LayerParallel`` module (``net``), on a
    communicator of its own."""

    def __init__(self, net):
        self.net = net

    @property
    def comm(self):
        """Made at the first pipelined pass (every rank takes part in it) and
        freed by the module's close(): its messages never meet the solvers'
        or the user's."""
        return self.net.communicator("pipeline")

    def _block(self, x, record):
        """This rank's layers on micro-batch x: (input leaf, output)."""
        net = self.net
        with torch.set_grad_enabled(record):
            x_in = x.detach().requires_grad_(record)
            y = x_in
            for n in net.layer_indices:
                y = torch.add(y, net.layers[str(n)](y), alpha=net.h)
        return x_in, y

    def forward(self, u0, shape, dtype, device, record):
        """u_N on the last rank (a placeholder elsewhere) and the kept
        (input, output) graph of every micro-batch's block."""
        net, comm = self.net, self.comm
        rank, size = comm.Get_rank(), comm.Get_size()
        sizes = split_sizes(shape[0], net.microbatches)
        cost = len(net.layer_indices) / len(sizes)  # full-batch layer steps
        msgs = _Messages(comm, shape[1:], dtype, device)
        # receives from the previous rank, posted at once (tag: micro-batch)
        recvs = [msgs.post_recv(rank - 1, i, b) for i, b in enumerate(sizes)] if rank > 0 else []
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
                    x_in, y = self._block(x, record)
                    clock += cost
                    if not torch.isfinite(y).all():
                        error = FloatingPointError(_first_nonfinite(net, x))
                    kept.append((x_in, y))
                except Exception as e:  # reported on every rank by _agree
                    error = e
            failed = failed or error is not None
            if rank < size - 1:
                # the block's output for micro-batch i, to the next rank
                msgs.send(rank + 1, i, y, failed, clock)
            elif not failed:
                outputs.append(y.detach())
        msgs.wait_sends()
        clock = _agree(comm, error, clock)
        net.last_forward = {"iterations": 1, "residual_norms": [],
                            "steps": [len(net.layer_indices)], "virtual_time": clock}
        if rank == size - 1:
            return torch.cat(outputs) if len(outputs) > 1 else outputs[0].clone(), kept
        return torch.zeros(0, dtype=dtype, device=device), kept

    def backward(self, kept, grad_out, shape, dtype, device):
        """(dloss/du_0 on the first rank or None, gradients of the local
        layers' parameters in LayerParallel.forward's order)."""
        net, comm = self.net, self.comm
        rank, size = comm.Get_rank(), comm.Get_size()
        sizes = split_sizes(shape[0], net.microbatches)
        m = len(sizes)
        cost = len(net.layer_indices) / m
        params = tuple(p for F in net.layers.values() for p in F.parameters())
        msgs = _Messages(comm, shape[1:], dtype, device)
        # adjoints from the next rank, in reverse order (tag: m + micro-batch)
        recvs = {i: msgs.post_recv(rank + 1, m + i, sizes[i]) for i in reversed(range(m))} \
            if rank < size - 1 else {}
        if rank == size - 1:
            if grad_out is None or tuple(grad_out.shape) != tuple(shape):
                grad_out = torch.zeros(shape, dtype=dtype, device=device)
            seeds = grad_out.tensor_split(m)
        sums = [None] * len(params)
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
                    grads = torch.autograd.grad(y, (x_in,) + params, grad_outputs=g,
                                                allow_unused=True,
                                                retain_graph=net.retain_graphs)
                    clock += cost
                    gx = grads[0]
                    for k, gp in enumerate(grads[1:]):
                        if gp is not None:
                            sums[k] = gp if sums[k] is None else sums[k].add_(gp)
                except Exception as e:
                    error = e
            failed = failed or error is not None
            if rank > 0:
                # the adjoint of micro-batch i's block input, to the previous rank
                msgs.send(rank - 1, m + i, gx, failed, clock)
            else:
                grad_inputs[i] = gx
        msgs.wait_sends()
        if not net.retain_graphs:
            kept.clear()
        clock = _agree(comm, error, clock)
        net.last_backward = {"iterations": 1, "residual_norms": [],
                             "steps": [len(net.layer_indices)], "virtual_time": clock}
        grad_u0 = torch.cat(grad_inputs) if rank == 0 else None
        return grad_u0, sums


class PipelineFunction(torch.autograd.Function):
    """Forward: the pipelined layer-serial pass.  Backward: the pipelined
    adjoint pass; gradients for the input state (first rank) and the local
    layers' parameters (the trailing inputs)."""

    @staticmethod
    def forward(ctx, net, meta, anchor, u0, *params):
        pipe = net._pipeline
        # autograd is off inside forward: net._record says whether it was on
        out, ctx.kept = pipe.forward(u0, *meta, record=net._record)
        ctx.net, ctx.meta = net, meta
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_u0, grads = ctx.net._pipeline.backward(ctx.kept, grad_out, *ctx.meta)
        if grad_u0 is None or not ctx.needs_input_grad[3]:
            grad_u0 = None
        return (None, None, None, grad_u0, *grads)
