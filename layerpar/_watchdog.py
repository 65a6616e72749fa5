"""Deadlines for the waits on other ranks outside the MGRIT solves.

A rank that stops answering (a hang in data loading or in a user callback, a
stopped process) would leave the others waiting in their next collective for
ever.  With a timeout, each of layerpar's waits on other ranks (the
agreements of ``layerpar._collective``, the grid's gradient sums, the
training loop's reductions, the checkpoint protocol, the pipeline's
messages, the command line's exit agreement) ends after that many seconds
with ``SilentRankError`` naming the lowest rank that did not answer.

The limit of a communicator is the one given to ``set_timeout(comm,
seconds)`` (kept by ``comm.Dup()``; ``LayerParallel`` sets its ``timeout``
on its own communicators, the trainers the configuration's ``run.timeout``
on theirs), else ``$LAYERPAR_TIMEOUT``, else none.  It must be the same on
every rank of the communicator.  With no limit a guarded wait is the plain
MPI call and nothing is added.

With a limit, a guarded collective first enters a non-blocking barrier on
the communicator and tests it, sleeping a little between tests, until every
rank has entered or the deadline has passed; the collective itself follows
at once.  A guarded point-to-point wait tests its request the same way.
While it waits a rank answers the others' liveness pings.  At the deadline
it pings every other rank and waits a grace period (one second, or the limit
when shorter) for the answers: the ranks that did not answer are silent (the
awaited peer of a point-to-point wait, when every rank answered).  It sends
the verdict to every other rank (a notice): those waiting end their wait at
once with the same verdict, and a silent rank that wakes up raises at its
next guarded wait instead of entering a collective the others have left.
Pings, answers and notices are point-to-point messages with tags of their
own (``layerpar._tags``: watchdog.ping, .answer, .notice), which no other
message carries.  The MGRIT core runs the same scheme on its own
communicator while a rank waits inside a solve (braid_ext/src/comm.c).

After a timeout the communicator holds unfinished requests, and every later
guarded wait of this process raises the same error at once: the job should
end (``comm.Abort``; the ``layerpar`` command does).
"""
import math
import os
import time

import numpy as np
from mpi4py import MPI

from braid_ext import MGRITTimeoutError
from layerpar._tags import tag

ENV = "LAYERPAR_TIMEOUT"
_TIMEOUT_CODE = 8          # the core's MG_ERR_TIMEOUT: the same kind of failure
_SPINS = 50                # tests of a request before the first nap
_FIRST_NAP, _LONGEST_NAP = 1e-5, 2e-3   # seconds between later tests

_keyval = None             # the communicator attribute holding a limit
_wait_keyval = None        # the communicator attribute saying that waits sleep
_YIELDS = 200              # yields of the core before the first nap (sleeping waits)
_failure = None            # after a timeout: the error every later guarded wait raises
_kept = []                 # send buffers of messages that may never be received
_ONE = np.ones(1, dtype=np.int32)
# "are you alive?", "yes", and the verdict naming the silent ranks
_PING, _ANSWER, _NOTICE = tag("watchdog.ping"), tag("watchdog.answer"), tag("watchdog.notice")


class SilentRankError(MGRITTimeoutError):
    """A rank did not answer within the timeout of a wait outside the MGRIT
    solves.  ``rank``: the lowest silent rank (in COMM_WORLD; -1 when every
    rank answered but not every rank entered the wait), ``silent``: all of
    them, ``what``: the wait, ``limit``: the timeout in seconds.  The job
    should end (``comm.Abort``)."""

    def __init__(self, message: str, rank: int = -1, *, silent: "tuple[int, ...]" = (),
                 what: str = "", limit: float = 0.0) -> None:
        super().__init__(message, _TIMEOUT_CODE, rank)
        self.silent = tuple(silent)
        self.what = what
        self.limit = limit


# ---- the limit ---------------------------------------------------------------

def check_timeout(value, source="timeout"):
    """``value`` as a limit in seconds (None for none: 0 means no limit);
    ValueError naming ``source`` when it is not a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value < 0:
        raise ValueError(f"{source}={value!r}: must be a finite number of seconds >= 0 "
                         "(0: no limit)")
    return float(value) or None


def env_timeout():
    """$LAYERPAR_TIMEOUT as a limit in seconds, or None when it is unset or
    empty; ValueError naming it when it is not a number of seconds >= 0."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{ENV}={text!r}: must be a number of seconds") from None
    return check_timeout(value, ENV)


def set_timeout(comm: "MPI.Comm", seconds: "float | None") -> None:
    """The limit of layerpar's waits on ``comm`` and on its later
    duplicates (``comm.Dup()``): a number of seconds (0: no limit, whatever
    $LAYERPAR_TIMEOUT says), or None to follow $LAYERPAR_TIMEOUT again.
    Local: give every rank the same value."""
    global _keyval
    if seconds is not None:
        seconds = check_timeout(seconds) or 0.0
    if _keyval is None:
        # the attribute is copied to duplicates of the communicator
        _keyval = MPI.Comm.Create_keyval(copy_fn=lambda comm, keyval, value: value)
    if seconds is None:
        comm.Delete_attr(_keyval)
    else:
        comm.Set_attr(_keyval, seconds)


def inherit(child, parent):
    """Give ``child`` (e.g. made by ``parent.Split``, which keeps no
    attributes) the limit set on ``parent``, if one is."""
    if _keyval is not None:
        value = parent.Get_attr(_keyval)
        if value is not None:
            child.Set_attr(_keyval, value)


def set_wait(comm, mode):
    """How layerpar's waits without a limit on ``comm`` (and its later
    duplicates) wait: 'busy' (MPI's own wait) or 'sleep' (tests, yielding
    the core, then naps growing to 2 ms: a waiting rank leaves the core to a
    working one when ranks outnumber cores).  Local."""
    global _wait_keyval
    if mode not in ("busy", "sleep"):
        raise ValueError(f"wait={mode!r}: choose 'busy' or 'sleep'")
    if _wait_keyval is None:
        _wait_keyval = MPI.Comm.Create_keyval(copy_fn=lambda comm, keyval, value: value)
    comm.Set_attr(_wait_keyval, mode == "sleep")


def sleeps(comm):
    """Do waits on ``comm`` sleep (``set_wait``)?"""
    return _wait_keyval is not None and bool(comm.Get_attr(_wait_keyval))


def _sleeping_poll(done):
    """Until ``done()``, without a deadline: test, yield the core, nap."""
    for _ in range(_SPINS):
        if done():
            return
    for _ in range(_YIELDS):
        if done():
            return
        os.sched_yield()
    nap = _FIRST_NAP
    while not done():
        time.sleep(nap)
        nap = min(2 * nap, _LONGEST_NAP)


def timeout_of(comm):
    """The limit of layerpar's waits on ``comm`` in seconds, or None."""
    if _keyval is not None:
        value = comm.Get_attr(_keyval)
        if value is not None:
            return value or None
    return env_timeout()


# ---- guarded waits ---------------------------------------------------------------

def guard(comm, what):
    """Before a blocking collective on ``comm`` (``what`` says which, for
    the message): with a limit, wait until every rank of ``comm`` has
    reached this point, or raise SilentRankError at the deadline.  Every
    rank must guard the same collectives in the same order."""
    limit = timeout_of(comm)
    if limit is None:
        return
    _check_failed(comm, what)
    request = comm.Ibarrier()
    _poll(comm, request.Test, what, limit, None)
    # a rank that gave up entered the barrier too: its notice, if any, is here
    _serve(comm, what, limit)


def wait(comm, request, what, peer, status=None):
    """``request.Wait(status)`` for a message to or from rank ``peer`` of
    ``comm``, with the limit of ``comm``."""
    limit = timeout_of(comm)
    if limit is None:
        if sleeps(comm):
            _sleeping_poll(lambda: request.Test(status))
        else:
            request.Wait(status)
        return
    _check_failed(comm, what)
    _poll(comm, lambda: request.Test(status), what, limit, peer)


def recv(comm, source, tag, what):
    """``comm.recv(source=source, tag=tag)`` (a pickled object), with the
    limit of ``comm``."""
    limit = timeout_of(comm)
    if limit is not None:
        _check_failed(comm, what)
        _poll(comm, lambda: comm.Iprobe(source, tag), what, limit, source)
    elif sleeps(comm):
        _sleeping_poll(lambda: comm.Iprobe(source, tag))
    return comm.recv(source=source, tag=tag)


def sendrecv(comm, obj, dest, source, tag, what):
    """``comm.sendrecv(obj, dest=dest, sendtag=tag, source=source,
    recvtag=tag)`` (pickled objects; MPI.PROC_NULL for no partner), with
    the limit of ``comm``."""
    if timeout_of(comm) is None:
        return comm.sendrecv(obj, dest=dest, sendtag=tag, source=source, recvtag=tag)
    request = comm.isend(obj, dest=dest, tag=tag) if dest != MPI.PROC_NULL else None
    got = recv(comm, source, tag, what) if source != MPI.PROC_NULL else None
    if request is not None:
        wait(comm, request, what, dest)
    return got


def _check_failed(comm, what):
    if _failure is not None:
        raise SilentRankError(str(_failure), _failure.rank, silent=_failure.silent,
                              what=_failure.what, limit=_failure.limit)
    _serve(comm, what, 0.0)  # a notice already here: the others have given up


def _poll(comm, done, what, limit, peer):
    """Until ``done()``: answer pings, and at the deadline name the silent."""
    for _ in range(_SPINS):  # most waits end here: the others are close behind
        if done():
            return
    deadline = time.monotonic() + limit
    nap = _FIRST_NAP
    while not done():
        _serve(comm, what, limit)
        if time.monotonic() > deadline:
            _timed_out(comm, done, what, limit, peer)
            return
        time.sleep(nap)
        nap = min(2 * nap, _LONGEST_NAP)


def _serve(comm, what, limit):
    """Answer every ping that has arrived; raise on a notice (another rank
    has named the silent ranks)."""
    status = MPI.Status()
    got = np.zeros(1, dtype=np.int32)
    while comm.Iprobe(MPI.ANY_SOURCE, _PING, status):
        source = status.Get_source()
        comm.Recv([got, MPI.INT], source=source, tag=_PING)
        # to the rank that asks: this rank is alive
        comm.Isend([_ONE, MPI.INT], dest=source, tag=_ANSWER).Free()
    if comm.Iprobe(MPI.ANY_SOURCE, _NOTICE, status):
        flags = np.zeros(comm.Get_size() + 1, dtype=np.float64)
        source = status.Get_source()
        comm.Recv([flags, MPI.DOUBLE], source=source, tag=_NOTICE)
        silent = [r for r in range(comm.Get_size()) if flags[r]]
        limit = float(flags[-1]) or limit
        _fail(comm, silent, what, limit, f"as rank {_world(comm, source)} found")


def _timed_out(comm, done, what, limit, peer):
    """The deadline has passed: ask every other rank whether it is alive,
    name the ranks that do not answer within the grace period, tell every
    other rank, and raise.  Returns instead when the wait completes within
    the grace period after all (a late rank has arrived)."""
    me, size = comm.Get_rank(), comm.Get_size()
    others = [r for r in range(size) if r != me]
    answers = {r: np.zeros(1, dtype=np.int32) for r in others}
    pending = {}
    for r in others:
        # to every other rank: are you alive?  (answered by its _serve)
        comm.Isend([_ONE, MPI.INT], dest=r, tag=_PING).Free()
        pending[r] = comm.Irecv([answers[r], MPI.INT], source=r, tag=_ANSWER)
    end = time.monotonic() + min(1.0, limit)
    arrived = False
    try:
        while pending and time.monotonic() < end and not arrived:
            pending = {r: q for r, q in pending.items() if not q.Test()}
            _serve(comm, what, limit)
            arrived = done()
            time.sleep(_LONGEST_NAP)
        arrived = arrived or done()
    finally:
        for q in pending.values():
            q.Cancel()
            q.Wait()
    if arrived:
        return
    silent = sorted(pending) or ([peer] if peer is not None else [])
    # to every other rank: the verdict (silent flags, then the limit); the
    # buffer is kept, as a silent rank may never receive it
    flags = np.zeros(size + 1, dtype=np.float64)
    flags[silent] = 1.0
    flags[-1] = limit
    _kept.append(flags)
    sends = [comm.Isend([flags, MPI.DOUBLE], dest=r, tag=_NOTICE) for r in others]
    # drive the notices out (a rank that sleeps after raising moves no
    # message); those to a silent rank may never complete
    end = time.monotonic() + min(1.0, limit)
    while not MPI.Request.Testall(sends) and time.monotonic() < end:
        time.sleep(_LONGEST_NAP)
    for q in sends:
        if q != MPI.REQUEST_NULL:
            q.Free()
    _fail(comm, silent, what, limit, None)


def _world(comm, rank):
    """Rank ``rank`` of ``comm`` as a rank of COMM_WORLD."""
    group, world = comm.Get_group(), MPI.COMM_WORLD.Get_group()
    try:
        out = MPI.Group.Translate_ranks(group, [rank], world)[0]
    finally:
        group.Free()
        world.Free()
    return rank if out == MPI.UNDEFINED else out


def _fail(comm, silent, what, limit, how):
    global _failure
    me = _world(comm, comm.Get_rank())
    silent = [_world(comm, r) for r in silent]
    found = f"; {how}" if how else ""
    if silent:
        more = f" (nor did {', '.join(map(str, silent[1:]))})" if len(silent) > 1 else ""
        text = (f"{what} abandoned on rank {me}: rank {silent[0]}{more} did not answer "
                f"within the timeout of {limit:g} s (it may hang or have died{found})")
    else:
        text = (f"{what} abandoned on rank {me}: every rank answered, but not every rank "
                f"entered it within the timeout of {limit:g} s (the ranks wait in "
                f"different calls{found})")
    _failure = SilentRankError(text, silent[0] if silent else -1, silent=silent, what=what,
                               limit=limit)
    raise _failure
