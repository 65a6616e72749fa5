"""The module's collective entry points fail on every rank together, and its
communicators are freed by close(), never left to the garbage collector.

Each rank catches what it raised; the outcomes are gathered and checked on
every rank, so a failed assertion never leaves another rank waiting.
"""
import gc
import pickle

import pytest
import torch
from mpi4py import MPI
from torch import nn

from layerpar import LayerParallel, Network
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

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


# ---- agree: the same exception type on every rank, and a payload ----------

class _Custom(ValueError):
    """A user's exception whose constructor takes two arguments."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class _Failure(RemoteError):
    """A caller's own RemoteError (as the pipeline's PipelineFailure)."""


def _make(kind, rank):
    """The error of kind ``kind`` a failing rank has (a message for "message")."""
    text = f"bad on {rank}"

    class _Local(LookupError):  # a type no other rank can name: its base travels
        pass

    return {"value": lambda: ValueError(text), "type": lambda: TypeError(text),
            "key": lambda: KeyError(text), "fpe": lambda: FloatingPointError(text),
            "os": lambda: FileNotFoundError(2, "No such file or directory", f"/{rank}"),
            "custom": lambda: _Custom(text, 7), "local": lambda: _Local(text),
            "arith": lambda: ArithmeticError(text), "message": lambda: text}[kind]()


KINDS = ["value", "type", "key", "fpe", "os", "custom", "local", "arith", "message"]


def _expected_type(kind):
    """The type every rank's exception has when the lowest failing rank's
    error is of ``kind``."""
    return {"local": LookupError, "os": FileNotFoundError, "custom": _Custom,
            "message": Exception}.get(kind) or type(_make(kind, 0))


@pytest.mark.mpi
@settings(derandomize=True, database=None, deadline=None, max_examples=40,
          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
@given(draw=st.fixed_dictionaries({
    "kinds": st.lists(st.one_of(st.none(), st.sampled_from(KINDS)), min_size=4, max_size=4),
    "what": st.one_of(st.none(), st.just("checking the batch")),
    "error_type": st.sampled_from([None, _Failure])}))
def test_agree_raises_the_failing_type_on_every_rank_naming_the_lowest(draw):
    """Any set of failing ranks, any exception types: every rank raises; a
    failing rank its own exception, every other rank one of the lowest
    failing rank's type (a RemoteError too) that names that rank; without a
    failure every rank gets every rank's payload."""
    comm = MPI.COMM_WORLD
    draw = comm.bcast(draw, root=0)  # rank 0's draw on every rank
    kinds = draw["kinds"][:comm.size]
    what, error_type = draw["what"], draw["error_type"]
    mine = None if kinds[comm.rank] is None else _make(kinds[comm.rank], comm.rank)
    caught, returned = None, None
    try:
        returned = agree(comm, mine, what=what, error_type=error_type, payload=comm.rank * 2)
    except Exception as e:  # noqa: BLE001 - checked below, on every rank
        caught = e
    failing = [r for r, k in enumerate(kinds) if k is not None]
    outcomes = comm.allgather(None if caught is None else
                              (type(caught).__name__, str(caught), getattr(caught, "rank", None)))
    assert comm.allreduce(1) == comm.size  # nothing left pending
    if not failing:
        assert caught is None and returned == [2 * r for r in range(comm.size)]
        assert outcomes == [None] * comm.size
        return
    assert None not in outcomes  # every rank raised
    low = failing[0]
    kind = kinds[low]
    if isinstance(mine, BaseException):
        assert caught is mine
        return
    # no exception here (or only a message): the lowest failing rank's error
    if kind == "message":
        assert str(caught) == (f"{what} failed on rank {low}: bad on {low}" if what
                               else f"bad on {low}")
        assert isinstance(caught, error_type or (RemoteError if what else ValueError))
        return
    assert isinstance(caught, error_type or RemoteError)
    assert isinstance(caught, _expected_type(kind)), (kind, type(caught).__mro__)
    assert caught.rank == low
    described = f"{type(_make(kind, low)).__name__}: {_make(kind, low)}"
    assert str(caught) == (f"{what} failed on rank {low}: " if what else
                           f"failed on rank {low}: ") + described
    if kind == "custom":
        assert caught.code == 7  # its plain attributes travel with it


@pytest.mark.mpi
def test_a_users_value_error_on_one_rank_is_a_value_error_on_every_rank():
    comm = MPI.COMM_WORLD
    bad = comm.size - 1
    caught = None
    try:
        with collective(comm, "the opening layer"):
            if comm.rank == bad:
                raise ValueError("expected input of shape (4, 2)")
    except ValueError as e:  # every rank catches it as what the user's layer raised
        caught = (type(e).__name__, str(e), getattr(e, "rank", None),
                  isinstance(e, RemoteError))
    got = comm.allgather(caught)
    assert got[bad] == ("ValueError", "expected input of shape (4, 2)", None, False)
    for r, entry in enumerate(got):
        if r != bad:
            assert entry == ("RemoteError", f"the opening layer failed on rank {bad}: "
                             "ValueError: expected input of shape (4, 2)", bad, True)


def test_a_remote_error_of_another_type_survives_pickling():
    from layerpar._collective import _remote
    e = _remote(RemoteError, KeyError, "reading failed on rank 3: KeyError: 'x'", 3)
    assert isinstance(e, KeyError) and isinstance(e, RemoteError) and e.like is KeyError
    copy = pickle.loads(pickle.dumps(e))
    assert type(copy) is type(e) and str(copy) == str(e) and copy.rank == 3
    # a type that cannot be a base class gives the plain RemoteError
    assert type(_remote(RemoteError, bool, "x", 0)) is RemoteError


def test_silent_rank_errors_are_never_agreed():
    from layerpar import SilentRankError

    class NoMPI:
        def __getattr__(self, name):
            raise AssertionError(f"an MPI call ({name})")

    silent = SilentRankError("a wait abandoned", 1)
    with pytest.raises(SilentRankError) as info:
        agree(NoMPI(), silent)
    assert info.value is silent


def test_agree_on_one_rank_sends_nothing():
    class One:
        def Get_size(self):
            return 1

        def __getattr__(self, name):
            raise AssertionError(f"an MPI call ({name}) on one rank")

    assert agree(One(), None, payload=(1.5, 2)) == [(1.5, 2)]
    with pytest.raises(KeyError):
        agree(One(), KeyError("here"))


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
        try:
            body([1.0, 2.0] if comm.rank == 0 else None)
            caught = None
        except Exception as e:  # noqa: BLE001 - compared below, on every rank
            caught = (isinstance(e, TypeError), type(e).__name__, str(e))
        got = comm.allgather(caught)
        assert got[0] == (True, "TypeError", got[0][2]) and "must be a tensor" in got[0][2]
        for is_type_error, kind, text in got[1:]:
            # a RemoteError that is a TypeError too, naming the first rank
            assert is_type_error and kind == "RemoteError" and "failed on rank 0" in text
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
