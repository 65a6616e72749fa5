"""Failures on some ranks, raised on every rank.

An exception on one rank of a collective call must not leave the other ranks
waiting for it.  Every entry point that may fail on some ranks only ends with
one agreement: each rank sends what went wrong on it (or nothing) to every
rank, and then every rank raises, the failing rank its own exception and the
others an error of the same type that names the rank and what happened
there (a ``RemoteError`` that is also, say, a ValueError; see RemoteError).

    with collective(comm, "loading the data"):
        data = load_here()            # may raise on some ranks

    meta = from_root(comm, root, lambda: check_input(x))   # only root checks

    found = on_root(comm, lambda: look_at_files(path), what="reading the files")

    clocks = agree(comm, error, what="a pass", payload=clock)  # one allgather

Each helper waits for the other ranks with the communicator's timeout
(``layerpar._watchdog``: ``set_timeout``, $LAYERPAR_TIMEOUT): a rank that
does not arrive within it makes the others raise ``SilentRankError`` naming
it, which no helper turns into an agreement (that would wait again).
"""
import pickle
import sys
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
    where it failed.

    Raised where nothing failed, it is also of the failing exception's type
    when that type can be rebuilt here (``like``; an instance of a subclass
    of both, named RemoteError too): ``except ValueError`` then catches a
    ValueError raised on one rank on every rank.  Plain (``like`` None) when
    the type is unknown here or cannot be a base class."""

    like = None  # the failing exception's type, in a subclass made for it

    def __init__(self, message, rank=-1):
        super().__init__(message)
        self.rank = rank


_MIXED = {}  # (RemoteError class, the failing type) -> a subclass of both


def _mixed(base, like):
    """``base`` (RemoteError or a subclass) and ``like`` in one class, or
    ``base`` when ``like`` is None, already a base of it, not an Exception,
    or cannot be combined with it."""
    if like is None or not issubclass(like, Exception) or issubclass(base, like):
        return base
    cls = _MIXED.get((base, like))
    if cls is None:
        try:
            cls = type(base.__name__, (base, like), {
                "__module__": base.__module__, "__qualname__": base.__qualname__,
                "__doc__": base.__doc__, "like": like,
                "__str__": BaseException.__str__, "__reduce__": _reduce_mixed})
            cls("a test instance", -1)  # its __new__/__init__ accept ours
        except Exception:  # noqa: BLE001 - e.g. a type that takes no subclass: plain base
            cls = base
        _MIXED[(base, like)] = cls
    return cls


def _reduce_mixed(self):
    # a made class cannot be found by name: pickle how to make it again
    base = next(c for c in type(self).__mro__[1:] if issubclass(c, RemoteError))
    return (_remote, (base, self.like, str(self), self.rank), dict(self.__dict__))


def _remote(base, like, text, rank, attrs=None):
    """The error raised where nothing failed: ``base(text, rank)``, of
    ``like``'s type too where it can be (see RemoteError), with the failing
    exception's plain attributes ``attrs`` (its ``rank`` excepted)."""
    exc = _mixed(base, like)(text, rank)
    for key, value in (attrs or {}).items():
        try:
            setattr(exc, key, value)
        except Exception:  # noqa: BLE001 - a read-only attribute: left out
            pass
    return exc


def _describe(error):
    if error is None:
        return None
    if isinstance(error, str):
        return error
    return f"{type(error).__name__}: {error}"


def _kind(error):
    """How the type of ``error`` travels to another rank: (module,
    qualified name) of each of its exception classes, most derived first
    (the receiver takes the first it can find); None for a message."""
    if not isinstance(error, BaseException):
        return None
    cls = type(error).like if isinstance(error, RemoteError) and type(error).like else type(error)
    return tuple((c.__module__, c.__qualname__) for c in cls.__mro__
                 if issubclass(c, BaseException))


def _resolve(kind):
    """The first class of ``kind`` (see ``_kind``) that exists here, among
    the modules already imported; None when there is none."""
    for module, qualname in kind or ():
        obj = sys.modules.get(module)
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            return obj
    return None


def _plain(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (tuple, list)) and len(value) <= 16 and all(map(_plain, value))


def _attrs(error):
    """The attributes of ``error`` that travel with it: plain values
    (numbers, strings, short tuples of them), not ``rank``."""
    if not isinstance(error, BaseException):
        return None
    return {k: v for k, v in vars(error).items() if k != "rank" and _plain(v)} or None


def _report(error):
    """What a rank tells the others about its ``error``: None, or
    (description, type, attributes)."""
    if error is None:
        return None
    return (_describe(error), _kind(error), _attrs(error))


def _raised_elsewhere(rank, report, what, error_type):
    """The exception for ranks where nothing failed (or only a message):
    ``rank`` failed with ``report``."""
    message, kind, attrs = report
    if what is not None:
        text = f"{what} failed on rank {rank}: {message}"
    elif kind is None:
        text = message  # a message: the same text on every rank
    else:
        text = f"failed on rank {rank}: {message}"
    cls = error_type
    if cls is None:
        cls = ValueError if what is None and kind is None else RemoteError
    if issubclass(cls, RemoteError):
        return _remote(cls, _resolve(kind), text, rank, attrs)
    return cls(text)


def agree(comm, error=None, *, what=None, error_type=None, payload=None, label=None):
    """Collective over ``comm``: raise on every rank if any rank has an error;
    else return ``[payload of rank 0, ..., of the last rank]``.

    ``error`` is None (nothing failed here), a message, or the exception
    caught here; ``payload`` is anything picklable (e.g. the pipeline's
    virtual clocks and a norm).  Every rank sends both to every rank: one
    allgather, none on one rank.

    When a rank failed: where an exception was caught it is raised again.
    Every other rank raises an error naming the lowest failing rank, with
    the text "<what> failed on rank r: <Type>: <message>" ("failed on rank
    r: ..." without ``what``): by default a RemoteError (``rank`` is r) that
    is also of the failing exception's type where that type can be rebuilt
    here, so that a ValueError on one rank is a ValueError on every rank;
    ``error_type`` a subclass of RemoteError (taking (message, rank)) is
    used the same way, any other ``error_type`` is raised plain with that
    text.  A plain message with no ``what`` is raised as ``error_type``
    (default ValueError) with that message alone, the same text on every
    rank (for argument checks that any rank may make).  A SilentRankError
    (a wait that timed out) is raised at once, without agreeing.  ``label``
    names the agreement in a timeout's message (default: ``what``).
    """
    if isinstance(error, SilentRankError):
        raise error
    mine = _report(error)
    if comm.Get_size() == 1:
        gathered = [(mine, payload)]
    else:
        guard(comm, label or what or "an agreement over the ranks")
        # every rank -> every rank: what failed here (or None), and its payload
        gathered = comm.allgather((mine, payload))
    for rank, (report, _) in enumerate(gathered):
        if report is not None:
            if isinstance(error, BaseException):
                raise error
            raise _raised_elsewhere(rank, report, what, error_type)
    return [p for _, p in gathered]


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
    rank ``error_type`` with the text "failed on rank <root>: <Type>:
    <message>" (by default a RemoteError of the same type too, as in
    ``agree``); one broadcast either way.  ``what`` names the broadcast in
    a timeout's message."""
    if comm.Get_size() == 1:  # a communicator of one: nothing to broadcast
        return compute()
    payload = None
    error = None
    if comm.Get_rank() == root:
        try:
            payload = (compute(), None)
        except Exception as exc:  # noqa: BLE001 - raised again below, on every rank
            error = exc
            payload = (None, _report(exc))
    guard(comm, what or "a broadcast from one rank")
    # root -> every rank: (the result, None) or (None, what went wrong)
    result, report = comm.bcast(payload, root=root)
    if report is None:
        return result
    if error is not None:
        raise error
    raise _raised_elsewhere(root, report, None, error_type or RemoteError)


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
    arguments (an ``OSError`` keeps its errno), or, when the exception
    cannot be copied, a RemoteError of the same type where it can be (as in
    ``agree``) with the text "<what> failed on rank <root>: <Type>:
    <message>".  One broadcast either way; ``what`` names it in a timeout's
    message too."""
    payload = None
    error = None
    if comm.Get_rank() == root:
        try:
            payload = (compute(), None, None)
        except Exception as exc:  # noqa: BLE001 - raised again below, on every rank
            error = exc
            payload = (None, _portable(exc), _report(exc))
    guard(comm, what or "a result from one rank")
    # root -> every rank: (result, the exception or None, what went wrong or None)
    result, copied, report = comm.bcast(payload, root=root)
    if report is None:
        return result
    if error is not None:
        raise error
    if copied is not None:
        raise copied
    raise _raised_elsewhere(root, report, what or "a computation", None)


def any_rank(comm, flag, *, what=None):
    """Collective: whether ``flag`` is true on any rank (every rank sends
    its flag; all learn the maximum).  ``what`` names the agreement in a
    timeout's message."""
    guard(comm, what or "an agreement over the ranks")
    return bool(comm.allreduce(int(bool(flag)), op=MPI.MAX))
