"""The run folder of the ``layerpar`` command: chosen, checked, locked.

A fresh run never writes into a folder that holds results of another run
(checkpoints or metrics): the default folder is a new numbered one,
``runs/<name>-<k>``; a named folder with results is refused unless the run
resumes it or ``overwrite`` is given.  An exclusive lock (``flock`` on a file
in the folder, held by rank 0 until the process ends) refuses a second live
run in the same folder; temporary files of saves that died with their run
(``.checkpoint.h5.tmp.*`` manifests, ``checkpoint.parts/.tmp.*`` part
folders) are removed once the lock is held.

Every function here is collective: rank 0 looks at the file system and
every rank gets the same answer or raises the same :class:`RunDirError`.
"""
import errno
import fcntl
import glob
import os
import shutil
import socket

from layerpar._collective import on_root

__all__ = ["RunDirError", "RESULT_FILES", "prepare", "holds_results", "latest_numbered"]

RESULT_FILES = ("checkpoint.h5", "checkpoint.prev.h5", "metrics.h5", "metrics.csv")
_OVERWRITTEN = RESULT_FILES + ("curves.png", "config.toml", "checkpoint.parts")
LOCK_NAME = ".layerpar.lock"

_held_locks = []  # open lock files: closing one releases its lock


class RunDirError(ValueError):
    """A run folder that cannot be used; the message says why and what to do."""


def holds_results(path):
    """Does the folder hold results of a run (checkpoints or metrics)?"""
    return any(os.path.exists(os.path.join(path, f)) for f in RESULT_FILES)


def latest_numbered(base, name):
    """The highest-numbered existing ``<base>/<name>-<k>``, or None."""
    best = None
    for p in glob.glob(os.path.join(glob.escape(base), glob.escape(name) + "-*")):
        suffix = p.rsplit("-", 1)[1]
        if suffix.isdigit() and os.path.isdir(p) and (best is None or int(suffix) > best[0]):
            best = (int(suffix), p)
    return None if best is None else best[1]


def _new_numbered(base, name):
    """Create and return ``<base>/<name>-<k>`` for the first free k
    (mkdir is atomic: two runs starting together get different folders)."""
    os.makedirs(base, exist_ok=True)
    k = 1
    while True:
        path = os.path.join(base, f"{name}-{k}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            k += 1


def _check_writable(path):
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"run.dir {path!r} is a file, not a folder: choose another --run-dir")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"run.dir {path!r} cannot be created: "
                          f"{e.strerror or e}; choose another --run-dir") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunDirError(f"run.dir {path!r} is not writable: choose another --run-dir")


def _lock(path):
    """Take the folder's lock for the life of this process."""
    lock_path = os.path.join(path, LOCK_NAME)
    fh = open(lock_path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            raise RunDirError(f"run.dir {path!r} is in use by a live run ({holder}): wait for "
                              "it to end or choose another --run-dir") from None
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        # a file system without flock: no lock, nothing else to do
        return
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    fh.flush()
    _held_locks.append(fh)


def _remove_stale(path):
    """Temporary files of checkpoint saves whose run died: manifests and
    unfinished part folders (we hold the lock: no live run writes here)."""
    from layerpar.checkpoint.atomic import remove_stale
    remove_stale(path)


def _prepare_rank0(run_dir, default, resume, overwrite):
    if not run_dir:
        base, name = default
        if resume:
            run_dir = latest_numbered(base, name)
        if not run_dir:
            run_dir = _new_numbered(base, name)
    _check_writable(run_dir)
    _lock(run_dir)
    if not resume and holds_results(run_dir):
        if not overwrite:
            raise RunDirError(f"run.dir {run_dir!r} holds the results of an earlier run: "
                              "continue it with --resume, replace it with --overwrite, or "
                              "choose another --run-dir")
        for f in _OVERWRITTEN:
            p = os.path.join(run_dir, f)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
    _remove_stale(run_dir)
    return run_dir


def prepare(comm, run_dir, *, default, resume=False, overwrite=False):
    """Collective: the run folder to use, created, writable and locked.

    ``run_dir``: the folder asked for, or "" for the default: a new
    ``<base>/<name>-<k>`` with ``default = (base, name)`` (when resuming: the
    highest-numbered existing one).  Raises RunDirError on every rank."""
    def on_rank0():
        try:
            return _prepare_rank0(run_dir, default, resume, overwrite)
        except OSError as e:
            raise RunDirError(f"run.dir {run_dir!r}: {e.strerror or e}") from None

    # rank 0 -> every rank: the folder, or why there is none
    return on_root(comm, on_rank0, what="the run folder from rank 0")
