"""The module's collective entry points fail on every rank together, and its
communicators are freed by close(), never left to the garbage collector.

Each rank catches what it raised; the outcomes are gathered and checked on
every rank, so a failed assertion never leaves another rank waiting.
"""
import gc

import pytest
import torch
from mpi4py import MPI
from torch import nn

from layerpar import LayerParallel, Network
from layerpar._collective import RemoteError, agree, check_comm, collective, from_root, on_root
from layerpar.optim import regularize


def tiny_body(comm, nlayers=None, **options):
    nlayers = nlayers or comm.size
    return LayerParallel(lambda n: nn.Linear(3, 3).double(), nlayers, 1.0, comm, **options)


def tiny_net(comm, **options):
    return Network(lambda: nn.Linear(2, 3).double(), lambda n: nn.Linear(3, 3).double(),
                   lambda: nn.Linear(3, 2).double(), nlayers=2 * comm.size, T=1.0, comm=comm,
                   **options)


def outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - compared below
        return (type(e).__name__, str(e))
    return ("none", "")


# ---------------------------------------------------------------------------
# the helper

@pytest.mark.mpi
def test_collective_raises_the_original_here_and_names_the_rank_elsewhere():
    comm = MPI.COMM_WORLD
    bad = comm.size - 1
    caught = None
    try:
        with collective(comm, "reading"):
            if comm.rank == bad:
                raise KeyError("missing")
    except Exception as e:  # noqa: BLE001
        caught = e
    got = comm.allgather((type(caught).__name__, str(caught), getattr(caught, "rank", None)))
    for r, (kind, text, rank) in enumerate(got):
        if r == bad:
            assert kind == "KeyError"
        else:
            assert kind == "RemoteError" and rank == bad
            assert text == f"reading failed on rank {bad}: KeyError: 'missing'"


@pytest.mark.mpi
def test_agree_with_messages_and_no_failure():
    comm = MPI.COMM_WORLD
    agree(comm, None)  # nothing failed: returns everywhere
    got = comm.allgather(outcome(lambda: agree(comm, "bad value" if comm.rank == 0 else None)))
    assert got == [("ValueError", "bad value")] * comm.size


@pytest.mark.mpi
def test_from_root_broadcasts_or_raises_everywhere():
    comm = MPI.COMM_WORLD
    root = comm.size - 1
    assert from_root(comm, root, lambda: 41 + 1) == 42

    def fails():
        raise ZeroDivisionError("x")

    got = comm.allgather(outcome(lambda: from_root(comm, root, fails)))
    for r, (kind, text) in enumerate(got):
        assert kind == ("ZeroDivisionError" if r == root else "RemoteError")
    assert issubclass(RemoteError, RuntimeError)


class _Unpicklable(Exception):
    def __init__(self, message, extra):
        super().__init__(message)
        self.extra = extra

    def __reduce__(self):
        raise TypeError("cannot travel")


@pytest.mark.mpi
def test_on_root_shares_the_result_or_the_same_exception_everywhere():
    comm = MPI.COMM_WORLD
    root = comm.size - 1
    calls = []
    assert on_root(comm, lambda: calls.append(1) or comm.rank * 10, root=root) == root * 10
    assert len(calls) == (1 if comm.rank == root else 0)

    def fails():
        raise FileNotFoundError(2, "No such file or directory", "/nowhere")

    caught = None
    try:
        on_root(comm, fails, root=root)
    except OSError as e:
        caught = (type(e).__name__, e.errno, e.filename)
    assert comm.allgather(caught) == [("FileNotFoundError", 2, "/nowhere")] * comm.size

    def odd():
        raise _Unpicklable("no copy", 1)

    got = comm.allgather(outcome(lambda: on_root(comm, odd, root=root, what="looking")))
    for r, (kind, text) in enumerate(got):
        if r == root:
            assert kind == "_Unpicklable"
        else:
            assert (kind, text) == ("RemoteError", f"looking failed on rank {root}: "
                                                   "_Unpicklable: no copy")


def test_check_comm_names_the_argument():
    check_comm(MPI.COMM_SELF)
    with pytest.raises(TypeError, match="^grid_comm must be an mpi4py intracommunicator"):
        check_comm(None, "grid_comm")
    with pytest.raises(TypeError, match="^comm must be"):
        check_comm(MPI.COMM_NULL)


# ---------------------------------------------------------------------------
# entry points of the module

@pytest.mark.mpi
def test_a_non_tensor_input_on_the_first_rank_raises_everywhere():
    comm = MPI.COMM_WORLD
    with tiny_body(comm) as body:
        got = comm.allgather(outcome(lambda: body([1.0, 2.0] if comm.rank == 0 else None)))
        assert got[0][0] == "TypeError" and "must be a tensor" in got[0][1]
        for kind, text in got[1:]:
            assert kind == "TypeError" and "failed on rank 0" in text
        # the module still works afterwards
        u0 = torch.ones(4, 3, dtype=torch.float64)
        out = body(u0)
        ref = u0
        for F in body.serial_equivalent():
            ref = F(ref)
        if comm.rank == comm.size - 1:
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)


@pytest.mark.mpi
def test_reduce_is_collective_and_checks_the_value():
    comm = MPI.COMM_WORLD
    with tiny_net(comm) as net:
        assert net.reduce(torch.tensor(2.5) if net.is_last else None) == 2.5
        assert net.reduce(3 if net.is_last else "ignored") == 3.0
        bad = torch.ones(2) if net.is_last else None
        got = comm.allgather(outcome(lambda: net.reduce(bad)))
        assert all(kind == "TypeError" for kind, _ in got), got
        assert "shape (2,)" in got[-1][1]


@pytest.mark.mpi
def test_a_closure_failing_on_one_rank_raises_everywhere():
    from layerpar.optim import LBFGS
    comm = MPI.COMM_WORLD
    with tiny_net(comm) as net:
        opt = LBFGS(net.parameters(), net.body.comm)
        x = torch.ones(4, 2, dtype=torch.float64)
        y = torch.zeros(4, dtype=torch.long)

        def closure():
            opt.zero_grad()
            loss = net.loss(x, y, nn.functional.cross_entropy)
            loss.backward()
            value = net.reduce(loss)  # the last collective call of the closure
            if comm.rank == 0:
                raise ArithmeticError("bad loss")
            return value

        got = comm.allgather(outcome(lambda: opt.step(closure)))
    assert got[0] == ("ArithmeticError", "bad loss")
    for kind, text in got[1:]:
        assert kind == "RemoteError" and "the closure failed on rank 0" in text


# ---------------------------------------------------------------------------
# communicators: close(), context managers, no freeing at collection time

def test_closing_frees_every_communicator_so_thousands_of_networks_fit():
    """Each module duplicates three communicators (its own and two
    solvers'); MPICH has room for about 2,000 per process.  700 modules
    made and closed in a row would not fit without close().  (The limit is
    per process: one rank's communicator shows it as well as many.)"""
    comm = MPI.COMM_SELF
    for k in range(700):
        with tiny_body(comm) as body:
            pass
        assert body.closed
    # the limit was never near: one more network works and solves
    with tiny_body(comm) as body:
        body(torch.ones(1, 3, dtype=torch.float64) if comm.rank == 0 else None)


@pytest.mark.mpi
def test_close_frees_the_penalty_communicator_and_refuses_use():
    comm = MPI.COMM_WORLD
    net = tiny_net(comm)
    value = regularize(net, tikhonov=1.0, smoothness=1.0, add_grad=False)
    assert value > 0
    penalty = net.body._comms["penalty"]
    net.close()
    assert net.closed and net.body._comms == {} and penalty == MPI.COMM_NULL
    net.close()  # twice: nothing
    with pytest.raises(RuntimeError, match="closed"):
        net(torch.ones(1, 2, dtype=torch.float64))


@pytest.mark.mpi
def test_an_unclosed_network_is_collected_without_freeing_or_crashing():
    comm = MPI.COMM_WORLD
    net = tiny_net(comm)
    x = torch.ones(2, 2, dtype=torch.float64)
    net.loss(x, torch.zeros(2, dtype=torch.long), nn.functional.cross_entropy).backward()
    del net
    gc.collect()  # the solvers free their states; nothing collective runs
    with tiny_net(comm) as again:
        assert again.reduce(1.0) == 1.0


# ---------------------------------------------------------------------------
# timeout option

def test_timeout_from_the_environment(monkeypatch):
    comm = MPI.COMM_SELF
    monkeypatch.setenv("LAYERPAR_TIMEOUT", "12.5")
    with tiny_body(comm) as body:
        assert body.fwd_options["timeout"] == 12.5 and body.bwd_options["timeout"] == 12.5
        assert body.solvers.fwd.options["timeout"] == 12.5
    with tiny_body(comm, timeout=3) as body:  # the argument wins
        assert body.fwd_options["timeout"] == 3.0
    monkeypatch.setenv("LAYERPAR_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="LAYERPAR_TIMEOUT"):
        tiny_body(comm)
    monkeypatch.delenv("LAYERPAR_TIMEOUT")
    for bad in (-1, float("nan"), "5", True):
        with pytest.raises(ValueError, match="timeout="):
            tiny_body(comm, timeout=bad)
    with tiny_body(comm, timeout=0) as body:  # 0: no limit
        assert body.fwd_options["timeout"] is None
