"""Failures on some ranks, raised on every rank.

An exception on one rank of a collective call must not leave the other ranks
waiting for it.  Every entry point that may fail on some ranks only ends with
one agreement: each rank sends what went wrong on it (or nothing) to every
rank, and then every rank raises, the failing rank its own exception and the
others an error that names the rank and what happened there.

    with collective(comm, "loading the data"):
        data = load_here()            # may raise on some ranks

    meta = from_root(comm, root, lambda: check_input(x))   # only root checks

    found = on_root(comm, lambda: look_at_files(path), what="reading the files")

Each helper waits for the other ranks with the communicator's timeout
(``layerpar._watchdog``: ``set_timeout``, $LAYERPAR_TIMEOUT): a rank that
does not arrive within it makes the others raise ``SilentRankError`` naming
it, which no helper turns into an agreement (that would wait again).
"""
import pickle
from contextlib import contextmanager

from mpi4py import MPI

from layerpar._watchdog import SilentRankError, guard


def check_comm(comm, name="comm"):
    """TypeError naming ``name`` unless ``comm`` is an mpi4py
    intracommunicator (not COMM_NULL)."""
    if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
        raise TypeError(f"{name} must be an mpi4py intracommunicator, not {comm!r}")


class RemoteError(RuntimeError):
    """A collective call failed on another rank; ``rank`` is the lowest rank
    where it failed."""

    def __init__(self, message, rank=-1):
        super().__init__(message)
        self.rank = rank


def _describe(error):
    if error is None:
        return None
    if isinstance(error, str):
        return error
    return f"{type(error).__name__}: {error}"


def agree(comm, error=None, *, what=None, error_type=None):
    """Collective over ``comm``: raise on every rank if any rank has an error.

    ``error`` is None (nothing failed here), a message, or the exception
    caught here.  Every rank sends the description of its error (or None) to
    every rank (allgather).  Where an exception was caught it is raised
    again; every other rank raises ``error_type`` (default RemoteError) with
    the lowest failing rank's description, prefixed by "<what> failed on rank
    r: " when ``what`` is given.  A plain message with no ``what`` is raised
    as ``error_type`` (default ValueError) with that message alone, the same
    text on every rank (for argument checks that any rank may make).  A
    SilentRankError (a wait that timed out) is raised at once, without
    agreeing.
    """
    if isinstance(error, SilentRankError):
        raise error
    guard(comm, what or "an agreement over the ranks")
    messages = comm.allgather(_describe(error))
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if not failed:
        return
    if isinstance(error, BaseException):
        raise error
    rank, message = failed[0]
    if what is not None:
        cls = error_type or RemoteError
        text = f"{what} failed on rank {rank}: {message}"
    else:
        cls = error_type or ValueError
        text = message
    if cls is RemoteError:
        raise RemoteError(text, rank)
    raise cls(text)


@contextmanager
def collective(comm, what=None, *, error_type=None):
    """Collective: run the body on every rank, then agree (see ``agree``).
    An exception in the body on any rank makes every rank raise when the
    body has ended everywhere.  The body must not itself wait for the other
    ranks after the point where it may fail."""
    error = None
    try:
        yield
    except SilentRankError:
        raise
    except Exception as exc:  # noqa: BLE001 - raised again below, on every rank
        error = exc
    agree(comm, error, what=what, error_type=error_type)


def from_root(comm, root, compute, *, error_type=None, what=None):
    """Collective: ``compute()`` on ``root`` only, its result broadcast to
    every rank.  If it raises, the root raises its exception and every other
    rank ``error_type`` (default RemoteError) naming the root; one broadcast
    either way.  ``what`` names the broadcast in a timeout's message."""
    payload = None
    error = None
    if comm.Get_rank() == root:
        try:
            payload = (compute(), None)
        except Exception as exc:  # noqa: BLE001 - raised again below, on every rank
            error = exc
            payload = (None, _describe(exc))
    guard(comm, what or "a broadcast from one rank")
    result, message = comm.bcast(payload, root=root)
    if message is None:
        return result
    if error is not None:
        raise error
    cls = error_type or RemoteError
    text = f"failed on rank {root}: {message}"
    if cls is RemoteError:
        raise RemoteError(text, root)
    raise cls(text)


def _portable(exc):
    """``exc`` as it can travel to another rank: the exception itself when
    it survives pickling (same type, same arguments there), else None."""
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - a type that cannot travel: described instead
        return None


def on_root(comm, compute, *, root=0, what=None):
    """Collective: ``compute()`` on ``root`` only (file-system work, say),
    its result on every rank.  If it raises, every rank raises the same
    exception: the root its own, the others a copy of the same type and
    arguments (an ``OSError`` keeps its errno), or ``RemoteError`` naming
    the root when the exception cannot be copied.  One broadcast either
    way; ``what`` names it in a timeout's message."""
    payload = None
    error = None
    if comm.Get_rank() == root:
        try:
            payload = (compute(), None, None)
        except Exception as exc:  # noqa: BLE001 - raised again below, on every rank
            error = exc
            payload = (None, _portable(exc), _describe(exc))
    guard(comm, what or "a result from one rank")
    # root -> every rank: (result, the exception or None, its description)
    result, copied, message = comm.bcast(payload, root=root)
    if message is None:
        return result
    if error is not None:
        raise error
    if copied is not None:
        raise copied
    raise RemoteError(f"{what or 'a computation'} failed on rank {root}: {message}", root)


def any_rank(comm, flag, *, what=None):
    """Collective: whether ``flag`` is true on any rank (every rank sends
    its flag; all learn the maximum).  ``what`` names the agreement in a
    timeout's message."""
    guard(comm, what or "an agreement over the ranks")
    return bool(comm.allreduce(int(bool(flag)), op=MPI.MAX))
