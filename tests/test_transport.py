"""Messages: buffers kept from solve to solve (none allocated per message),
app-owned buffers with the header apart (the device-direct path), messages
longer than one MPI count (a derived datatype; tested with a shrunken
limit), and the network's two transports giving bitwise the same results.

MPI tests run on COMM_WORLD (1, 2 and 4 ranks); outcomes are gathered before
any assertion so that a failure on one rank never leaves another waiting."""
import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from braid_ext import Solver
from braid_ext.examples.rotation import DampedRotation
from layerpar import DenseClosing, DenseOpening, DenseStep, Network

WORLD = MPI.COMM_WORLD


class OwnedBuffers(DampedRotation):
    """DampedRotation whose message buffers it owns (numpy arrays), as the
    device path's app does with device tensors."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.made = []

    def alloc_buffer(self, nbytes):
        buf = np.zeros(max(nbytes, 1), dtype=np.uint8)
        self.made.append(nbytes)
        return buf, buf.ctypes.data

    def pack(self, u, buf):
        assert isinstance(buf, np.ndarray)  # the buffer object itself, not a view
        super().pack(u, memoryview(buf))

    def unpack(self, buf):
        return super().unpack(memoryview(buf))


OPTS = dict(max_levels=3, cfactor=2, abs_tol=1e-9, max_iter=30)


def solve_twice(app, comm, max_count=None, **opts):
    with Solver(app, comm, 0.0, 4.0, 40, **dict(OPTS, **opts)) as s:
        if max_count is not None:
            s._set_max_count(max_count)
        runs = []
        for _ in range(2):
            norms = s.solve()
            lo, hi = s.local_range(0)
            states = {i: s.get(i).copy() for i in range(lo, hi + 1) if s.is_stored(i)}
            st = s.stats()
            runs.append((norms, states, st["buffers"], st["messages"]))
    return runs


def gathered(comm, value):
    """Every rank's value (so that every rank asserts alike)."""
    return comm.allgather(value)


@pytest.mark.mpi
def test_no_buffer_allocated_per_message():
    for app in (DampedRotation(), OwnedBuffers()):
        (n1, s1, b1, m1), (n2, s2, b2, m2) = solve_twice(app, WORLD, warm_start=False)
        out = gathered(WORLD, (b1, m1, b2, m2))
        # the first solve makes the receive buffer and one send buffer per
        # send in flight at once; the second, the same size, makes none
        assert all(b2 == 0 for _, _, b2, _ in out), out
        assert all(b1 <= 3 for b1, _, _, _ in out), out
        if WORLD.size > 1:
            assert sum(m for _, m, _, _ in out) > 3 * WORLD.size, out
        assert n1 == n2


@pytest.mark.mpi
@pytest.mark.parametrize("max_count", [1, 5, 16, 24])
def test_long_messages_split_into_a_derived_type_bitwise(max_count):
    # the state is 16 bytes and a message 32 (header + payload, or 16 and 16
    # with the header apart): limits of 1..24 bytes take the large-count path
    for make in (DampedRotation, OwnedBuffers):
        ref = solve_twice(make(), WORLD)
        got = solve_twice(make(), WORLD, max_count=max_count)
        same = [r[0] == g[0] and r[1].keys() == g[1].keys()
                and all(np.array_equal(r[1][i], g[1][i]) for i in r[1])
                for r, g in zip(ref, got)]
        assert all(all(x) for x in gathered(WORLD, same))


@pytest.mark.mpi
def test_app_owned_buffers_give_the_same_bits():
    ref = solve_twice(DampedRotation(), WORLD)
    app = OwnedBuffers()
    got = solve_twice(app, WORLD)
    same = [r[0] == g[0] and all(np.array_equal(r[1][i], g[1][i]) for i in r[1])
            for r, g in zip(ref, got)]
    assert all(all(x) for x in gathered(WORLD, same))
    # what the app allocated, it allocated before the second solve
    assert all(n == 16 for n in app.made)


def test_max_count_is_checked():
    with Solver(DampedRotation(), MPI.COMM_SELF, 0.0, 1.0, 4) as s:
        with pytest.raises(ValueError, match="max_count"):
            s._set_max_count(0)


def net(transport, comm=WORLD, dtype=torch.float64):
    return Network(lambda: DenseOpening(2, 4), lambda n: DenseStep(4, "tanh"),
                   lambda: DenseClosing(4, 3), nlayers=8, T=1.0, comm=comm, seed=5,
                   max_levels=3, cfactor=2, fwd_iters=2, bwd_iters=2, min_coarse=1,
                   transport=transport).to(dtype)


def passes(model, steps=2):
    """Two training passes: losses, residual histories, gradients, and the
    message buffers the solvers allocated in the second pass."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, generator=g, dtype=next(model.parameters()).dtype)
    y = torch.randint(0, 3, (5,), generator=g)
    out = []
    for _ in range(steps):
        model.zero_grad()
        loss = model.loss(x, y, Fn.cross_entropy)
        loss.backward()
        body = model.body
        out.append((model.reduce(loss), body.last_forward["residual_norms"],
                    body.last_backward["residual_norms"],
                    [p.grad.clone() for p in model.parameters()],
                    body.solvers.fwd.stats()["buffers"] + body.solvers.bwd.stats()["buffers"]))
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_host_and_device_paths_bitwise_equal(dtype):
    host, device = net("host", dtype=dtype), net("device", dtype=dtype)
    try:
        a, b = passes(host), passes(device)
    finally:
        host.close()
        device.close()
    same = all(x[0] == y[0] and x[1] == y[1] and x[2] == y[2]
               and all(torch.equal(g, h) for g, h in zip(x[3], y[3]))
               for x, y in zip(a, b))
    # the second pass reuses the first one's buffers
    reused = a[1][4] == 0 and b[1][4] == 0
    assert gathered(WORLD, (same, reused)) == [(True, True)] * WORLD.size


def test_transport_option_is_checked():
    with pytest.raises(ValueError, match="transport="):
        net("pigeon", comm=MPI.COMM_SELF)


# ---- the pipeline's messages -------------------------------------------------

def pipe_net(transport, schedule, microbatches=3):
    return Network(lambda: DenseOpening(2, 4), lambda n: DenseStep(4, "tanh"),
                   lambda: DenseClosing(4, 3), nlayers=8, T=1.0, comm=WORLD, seed=5,
                   microbatches=microbatches, schedule=schedule,
                   transport=transport).double()


def pipelined_steps(model, steps=3):
    """Steps of one batch shape (10 samples: uneven micro-batches), each a
    forward pass without autograd and a training step (loss_and_backward):
    per step the scores, loss, gradients, and the message buffers the
    network's transport has made so far."""
    out = []
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(10, 2, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (10,), generator=g)
        model.zero_grad()
        with torch.no_grad():
            scores = model(x)
        loss, _ = model.loss_and_backward(x, y, Fn.cross_entropy)
        out.append((scores, loss, [p.grad.clone() for p in model.parameters()],
                    model.body.transport.allocations))
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("microbatches", [1, 3, 4])
def test_pipeline_makes_no_buffer_after_the_first_pass(schedule, microbatches):
    """The pipeline's messages travel in the transport's buffers, kept from
    pass to pass: once a pass of a shape has run, later passes of that
    shape (forward, backward; GPipe, 1F1B) make none.  A pool holds no
    more buffers than there were messages of its direction in flight."""
    model = pipe_net("host", schedule, microbatches)
    try:
        made = [step[3] for step in pipelined_steps(model, steps=4)]
        slots = model.body.transport.pool_sizes()
    finally:
        model.close()
    out = gathered(WORLD, (made, slots))
    for rank, (made, slots) in enumerate(out):
        assert made[1:] == made[:-1], made  # nothing made after the first step
        # a pool per direction (forward, backward) and way (send, receive)
        # with each neighbour: two on the first and last rank, four between
        assert len(slots) == (0 if WORLD.size == 1 else 4 if 0 < rank < WORLD.size - 1
                              else 2), slots
        # never more than a direction's messages in a pass; one buffer each
        assert all(1 <= n <= microbatches for n in slots.values()), slots
        assert made[0] == sum(slots.values()), (made, slots)
    if WORLD.size > 1:
        assert all(made[0] > 0 for made, _ in out), out


@pytest.mark.mpi
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_host_and_device_paths_bitwise_equal(schedule):
    """The pipeline's messages staged through host buffers and handed to
    MPI as tensors (the device path, here on CPU tensors) give bitwise the
    same scores, losses and gradients."""
    host, device = pipe_net("host", schedule), pipe_net("device", schedule)
    try:
        a, b = pipelined_steps(host), pipelined_steps(device)
    finally:
        host.close()
        device.close()
    same = all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
               and all(torch.equal(g, h) for g, h in zip(x[2], y[2]))
               for x, y in zip(a, b))
    steady = a[-1][3] == a[0][3] and b[-1][3] == b[0][3]
    assert gathered(WORLD, (same, steady)) == [(True, True)] * WORLD.size
