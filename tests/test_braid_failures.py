"""A callback that raises on one rank makes every rank leave the solve: the
original exception where it was raised, MGRITError naming that rank
everywhere else; quickly, without a hang, and with the solver usable
afterwards.  A NaN state gives NonFiniteResidualError on every rank.

Each rank catches what its solve raised; the outcomes are then gathered and
checked on every rank, so a failed assertion never leaves another rank
waiting in a collective call.
"""

import numpy as np
import pytest
from mpi4py import MPI

from braid_ext import MGRITError, NonFiniteResidualError, Solver
from braid_ext.examples.dahlquist import Dahlquist

NSTEPS = 64
OPTIONS = dict(max_levels=3, cfactor=2, relax="FCF", abs_tol=1e-12)


class Boom(RuntimeError):
    pass


class FaultyApp(Dahlquist):
    """Dahlquist whose method `method` raises Boom on rank `fail_rank` at its
    `at`-th call there (step: its first fine-level step of iteration `at`).
    Counts the vectors it hands out and gets back, to find leaks."""

    def __init__(self, method, fail_rank, at, rank):
        super().__init__(lam=-1.0)
        self.method, self.fail_rank, self.at, self.rank = method, fail_rank, at, rank
        self.armed = True
        self.calls = 0
        self.raised = None
        self.made = self.freed = 0

    def _maybe_fail(self, method, status=None):
        if not self.armed or method != self.method or self.rank != self.fail_rank:
            return
        if method == "step":
            if status.level != 0 or status.iter != self.at:
                return
            self.calls = self.at
        else:
            self.calls += 1
        if self.calls == self.at:
            self.armed = False  # raise once
            self.raised = Boom(f"boom in {method}")
            raise self.raised

    def step(self, u, status):
        self._maybe_fail("step", status)
        return super().step(u, status)

    def init(self, t, index):
        self._maybe_fail("init")
        self.made += 1
        return super().init(t, index)

    def clone(self, u):
        self._maybe_fail("clone")
        self.made += 1
        return super().clone(u)

    def sum(self, a, x, b, y):
        self._maybe_fail("sum")
        return super().sum(a, x, b, y)

    def norm(self, u):
        self._maybe_fail("norm")
        return super().norm(u)

    def bufsize(self):
        self._maybe_fail("bufsize")
        return super().bufsize()

    def pack(self, u, buf):
        self._maybe_fail("pack")
        super().pack(u, buf)

    def unpack(self, buf):
        self._maybe_fail("unpack")
        self.made += 1
        return super().unpack(buf)

    def access(self, u, status):
        self._maybe_fail("access")

    def free(self, u):
        self.freed += 1


def failing_rank(method, where, size):
    """The rank that will raise: the first or the last rank that calls the
    method at all (only ranks 0..P-2 send, only ranks 1..P-1 receive)."""
    first, last = 0, size - 1
    if method == "pack":
        last = size - 2
    if method == "unpack":
        first = 1
    return first if where == "first" else last


def outcome(exc, app):
    if exc is None:
        return ("none", None)
    if exc is app.raised:
        return ("original", None)
    if isinstance(exc, MGRITError) and type(exc).__name__ == "MGRITError":
        # elsewhere: an MGRITError naming the rank, of the failing type too
        return ("mgrit", (exc.rank, str(exc), isinstance(exc, Boom)))
    return ("other", repr(exc))


# (method, at): raise at the at-th call (step: at iteration `at`)
FAULTS = [("step", 0), ("step", 1), ("init", 1), ("clone", 5), ("sum", 4), ("norm", 2),
          ("pack", 2), ("unpack", 1), ("access", 3), ("bufsize", 1)]


@pytest.mark.mpi
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("method,at", FAULTS, ids=[f"{m}-{a}" for m, a in FAULTS])
def test_failing_callback_raises_on_every_rank(method, at, where):
    comm = MPI.COMM_WORLD
    if method in ("pack", "unpack") and comm.size == 1:
        pytest.skip("pack/unpack are only called for messages between ranks")
    bad = failing_rank(method, where, comm.size)
    app = FaultyApp(method, bad, at, comm.rank)
    solver = Solver(app, comm, 0.0, 1.0, NSTEPS, **OPTIONS)
    exc = None
    try:
        solver.solve()
    except Exception as e:  # noqa: BLE001 - checked below
        exc = e
    # every rank got here (a rank left waiting would hang the test run, which
    # the MPI passes bound with a timeout); what each one raised:
    results = comm.allgather(outcome(exc, app))

    for r, (kind, detail) in enumerate(results):
        if r == bad:
            assert kind == "original", f"rank {r} (the failing one): {kind} {detail}"
        else:
            assert kind == "mgrit", f"rank {r}: {kind} {detail}"
            fail_rank, message, same_type = detail
            assert fail_rank == bad and f"rank {bad}" in message and same_type

    # the same solver solves again once the app stops failing ...
    solver.solve()
    ref = app.sequential(0.0, 1.0, NSTEPS)
    lo, hi = solver.local_range(0)
    err = max(abs(float(solver.get(i)[0]) - ref[i]) / abs(ref[i]) for i in range(lo, hi + 1))
    solver.close()
    # ... every vector it was given is back (free called once for each) ...
    leaks = comm.allgather(app.made - app.freed)
    assert comm.allreduce(err, op=MPI.MAX) <= 1e-12
    assert leaks == [0] * comm.size, f"vectors not freed, per rank: {leaks}"
    # ... and a fresh solver works too
    fresh = Dahlquist(lam=-1.0)
    with Solver(fresh, comm, 0.0, 1.0, NSTEPS, **OPTIONS) as again:
        again.solve()
        lo, hi = again.local_range(0)
        err = max(abs(float(again.get(i)[0]) - ref[i]) / abs(ref[i]) for i in range(lo, hi + 1))
    assert comm.allreduce(err, op=MPI.MAX) <= 1e-12


@pytest.mark.mpi
@pytest.mark.parametrize("max_levels", [1, 2])
def test_one_level_and_two_level_failure_in_step(max_levels):
    """The sequential (one-level) sweep across ranks fails cleanly too."""
    comm = MPI.COMM_WORLD
    bad = comm.size - 1
    app = FaultyApp("step", bad, 0, comm.rank)
    exc = None
    with Solver(app, comm, 0.0, 1.0, NSTEPS, max_levels=max_levels) as solver:
        try:
            solver.solve()
        except Exception as e:  # noqa: BLE001
            exc = e
    kinds = comm.allgather(outcome(exc, app)[0])
    assert kinds == ["mgrit"] * bad + ["original"]


@pytest.mark.mpi
def test_every_rank_failing_raises_its_own_exception():
    comm = MPI.COMM_WORLD

    class AllFail(FaultyApp):
        def _maybe_fail(self, method, status=None):
            if method == "step" and status.iter == 1 and self.armed:
                self.armed = False
                self.raised = Boom(f"rank {self.rank}")
                raise self.raised

    app = AllFail("step", -1, 1, comm.rank)
    exc = None
    with Solver(app, comm, 0.0, 1.0, NSTEPS, **OPTIONS) as solver:
        try:
            solver.solve()
        except Exception as e:  # noqa: BLE001
            exc = e
    assert comm.allgather(outcome(exc, app)[0]) == ["original"] * comm.size


class NaNApp(Dahlquist):
    """Dahlquist whose step into fine point `index + 1` gives `value` at
    iteration `iteration` (on whichever rank owns that point)."""

    def __init__(self, index, iteration, value=np.nan, level=0):
        super().__init__(lam=-1.0)
        self.index, self.iteration, self.value, self.level = index, iteration, value, level

    def step(self, u, status):
        u = super().step(u, status)
        if (status.index, status.iter, status.level) == (self.index, self.iteration, self.level):
            u[:] = self.value
        return u


@pytest.mark.mpi
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf in sum
@pytest.mark.parametrize("max_levels,cfactor,relax,index,iteration,value,level", [
    (2, 4, "F", 10, 0, np.nan, 0),
    (2, 4, "FCF", 11, 0, np.inf, 0),
    (3, 2, "FCF", 13, 1, np.nan, 0),
    (2, 4, "F", 40, 2, -np.inf, 0),
    (3, 2, "F", 16, 1, np.nan, 1),  # a coarse step: lands on fine C-point 18
])
def test_nonfinite_state_raises_on_every_rank(max_levels, cfactor, relax, index, iteration,
                                              value, level):
    comm = MPI.COMM_WORLD
    nsteps = 101
    app = NaNApp(index, iteration, value, level)
    exc = None
    with Solver(app, comm, 0.0, 1.0, nsteps, max_levels=max_levels, cfactor=cfactor,
                relax=relax) as solver:
        try:
            solver.solve()
        except Exception as e:  # noqa: BLE001
            exc = e
    got = comm.allgather(
        ("nonfinite", exc.index) if isinstance(exc, NonFiniteResidualError) else repr(exc))
    # The first residual that sees the bad value is at the first fine C-point
    # at or after the point the bad step produced (index_stop).
    stride = cfactor ** level
    bad_point = index + stride
    expected = -(-bad_point // cfactor) * cfactor
    assert got == [("nonfinite", expected)] * comm.size
    assert isinstance(exc, MGRITError) and isinstance(exc, FloatingPointError)
