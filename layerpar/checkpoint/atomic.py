"""Atomic writes: temporary names, fsync, rename, the previous version, full disks.

Names next to a checkpoint ``<dir>/<stem>.h5``:

``<stem>.prev.h5``
    the checkpoint it replaced (:func:`previous_path`);
``<stem>.parts/<save id>/part-<rank>.h5``
    the parts of one save (:func:`parts_root`); the manifest names its
    folder relative to ``<dir>``;
``<stem>.parts/.tmp.<save id>/``
    the parts of a save in progress, renamed to ``<save id>`` once every
    rank has written and fsynced its part;
``.<stem>.h5.tmp.<pid>.<random>``
    the manifest being written, renamed over ``<stem>.h5``.

A crash leaves at most names that start with ``.tmp.`` or ``.``: ``layerpar
train`` removes them (:func:`remove_stale`) when it next starts in the run
folder, and a successful save removes the parts of every save that neither
the checkpoint nor its previous version names.
"""
import errno
import os
import shutil
import time
import uuid

__all__ = ["previous_path", "parts_root", "new_save_id", "PartFile", "write_at", "write_bytes",
           "install", "fsync_path", "is_disk_full", "remove_stale", "TMP_PREFIX"]

TMP_PREFIX = ".tmp."


def previous_path(path) -> str:
    """Where ``save_checkpoint(path, ...)`` keeps the checkpoint it replaces."""
    stem, ext = os.path.splitext(os.fspath(path))
    return f"{stem}.prev{ext or '.h5'}"


def parts_root(path) -> str:
    """The folder that holds the parts of the saves to ``path``."""
    stem, _ = os.path.splitext(os.path.abspath(os.fspath(path)))
    return f"{stem}.parts"


def new_save_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:10]}"


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_at(fd: int, data, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (the one place a part's bytes
    reach the operating system)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class PartFile:
    """A new file that HDF5 writes through (h5py's file-object driver).

    An error of a write (a full disk, an interrupt) is kept in ``error``
    and the write reported done, so HDF5 never runs its own error paths
    half-way through a file; :meth:`finish` raises it, or fsyncs the file.
    Only the caller's data and HDF5's small buffers are in memory at once.
    """

    def __init__(self, path: str):
        self.path = path
        self.error = None
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        self._pos = 0
        self._size = 0

    def seek(self, offset, whence=0):
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self):
        return self._pos

    def write(self, data):
        n = memoryview(data).nbytes
        if self.error is None:
            try:
                write_at(self._fd, data, self._pos)
            except BaseException as exc:  # noqa: BLE001 - raised by finish(), outside HDF5
                self.error = exc
        self._pos += n
        self._size = max(self._size, self._pos)
        return n

    def readinto(self, buf):
        view = memoryview(buf).cast("B")
        data = os.pread(self._fd, len(view), self._pos) if self.error is None else b""
        view[:len(data)] = data
        view[len(data):] = bytes(len(view) - len(data))
        self._pos += len(view)
        return len(view)

    def read(self, size=-1):
        size = max(self._size - self._pos, 0) if size is None or size < 0 else size
        buf = bytearray(size)
        self.readinto(buf)
        return bytes(buf)

    def truncate(self, size=None):
        size = self._pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self._fd, size)
            except BaseException as exc:  # noqa: BLE001 - raised by finish(), outside HDF5
                self.error = exc
        self._size = size
        return size

    def flush(self):
        pass

    def finish(self) -> None:
        """Raise the kept error, else fsync; the descriptor is closed."""
        try:
            if self.error is not None:
                raise self.error
            os.fsync(self._fd)
        finally:
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_bytes(path: str, data) -> None:
    """Write ``data`` to a new file and fsync it."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def install(tmp: str, path: str, keep_previous: bool) -> None:
    """Move the finished temporary file to ``path``, keeping the old one."""
    if keep_previous and os.path.exists(path):
        prev, link = previous_path(path), tmp + ".prev"
        try:
            # A hard link keeps ``path`` in place until the final rename, so
            # some complete checkpoint has the name ``path`` at every moment.
            os.link(path, link)
            os.replace(link, prev)
        except OSError:
            try:
                os.unlink(link)
            except OSError:
                pass
            os.replace(path, prev)  # no hard links on this file system
    os.replace(tmp, path)


def fsync_path(p: str) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def remove_quietly(p: str) -> None:
    """Remove a file or a folder tree; what cannot be removed stays."""
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            os.unlink(p)
        except OSError:
            pass


def remove_stale(directory: str) -> None:
    """Remove what saves that died left in ``directory``: temporary
    manifests (``.*.tmp.*``) and unfinished parts (``*.parts/.tmp.*``).
    Only when no save to this folder is running (``layerpar train`` holds
    the run folder's lock)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        p = os.path.join(directory, name)
        if name.startswith(".") and ".tmp." in name and os.path.isfile(p):
            remove_quietly(p)
        elif name.endswith(".parts") and os.path.isdir(p):
            for sub in os.listdir(p):
                if sub.startswith(TMP_PREFIX):
                    remove_quietly(os.path.join(p, sub))
