"""IDX files (the format of MNIST and Fashion-MNIST, plain or
gzip-compressed) and the ``mnist``/``fashion-mnist`` directories: the four
files of ``MNIST_FILES`` (or the same names + ``.gz``), 1x28x28 uint8
images, labels 0..9; the t10k files are the test split."""
import gzip
import os
from typing import Sequence

import numpy as np

from layerpar.data.containers import DatasetError
from layerpar.data.readers import RawSet, check_root

__all__ = ["MNIST_FILES", "read_idx", "mnist"]

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type code (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open_maybe_gz(path):
    with open(path, "rb") as fh:
        head = fh.read(2)
    return gzip.open(path, "rb") if head == b"\x1f\x8b" else open(path, "rb")


def read_idx(path, *, header_only: bool = False):
    """Read an IDX file (plain or gzip-compressed).

    Returns a numpy array in native byte order, or with ``header_only`` the
    tuple ``(shape, dtype)`` read from the header without reading the data.
    Raises DatasetError for a bad magic number, an unknown type code, or a
    data section shorter or longer than the header says.
    """
    path = os.fspath(path)
    try:
        with _open_maybe_gz(path) as fh:
            magic = fh.read(4)
            if len(magic) < 4:
                raise DatasetError(f"{path}: not an IDX file (shorter than its 4-byte magic number)")
            if magic[0] != 0 or magic[1] != 0:
                raise DatasetError(f"{path}: not an IDX file (magic number {magic.hex()} "
                                   "does not start with two zero bytes)")
            code, ndim = magic[2], magic[3]
            if code not in _IDX_DTYPES:
                raise DatasetError(f"{path}: unknown IDX type code 0x{code:02x} "
                                   f"(known: {', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)})")
            if ndim < 1:
                raise DatasetError(f"{path}: IDX header declares {ndim} dimensions")
            raw_dims = fh.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DatasetError(f"{path}: truncated IDX header ({ndim} dimensions declared)")
            shape = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
            dtype = np.dtype(_IDX_DTYPES[code])
            if header_only:
                return shape, dtype.newbyteorder("=")
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            data = fh.read(expected)
            if len(data) < expected:
                raise DatasetError(f"{path}: truncated IDX file: header says shape {shape} "
                                   f"({expected} data bytes), file has {len(data)}")
            if fh.read(1):
                raise DatasetError(f"{path}: IDX file is longer than its header says "
                                   f"(shape {shape}, {expected} data bytes)")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        if isinstance(exc, FileNotFoundError):
            raise DatasetError(f"{path}: file not found") from exc
        raise DatasetError(f"{path}: cannot read IDX file ({exc})") from exc
    return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _find_file(root: str, base: str, expected: Sequence[str], what: str) -> str:
    for cand in (base, base + ".gz", base.replace("-idx", ".idx"),
                 base.replace("-idx", ".idx") + ".gz"):
        p = os.path.join(root, cand)
        if os.path.isfile(p):
            return p
    raise DatasetError(f"{what}: {base} (or {base}.gz) not found in directory {root!r}; "
                       f"expected files: {', '.join(expected)}")


def mnist(key: str, root, need_inputs: bool) -> RawSet:
    """The ``mnist`` or ``fashion-mnist`` (``key``) directory ``root``; the
    image files are only checked by their headers where ``need_inputs`` is
    False."""
    expected = list(MNIST_FILES.values())
    root = check_root(root, key, expected)
    files = {k: _find_file(root, v, expected, key) for k, v in MNIST_FILES.items()}

    def labels(path):
        y = read_idx(path)
        if y.ndim != 1 or y.dtype != np.uint8:
            raise DatasetError(f"{path}: expected a 1-D uint8 IDX label file, "
                               f"got shape {y.shape} dtype {y.dtype}")
        if y.size and y.max() > 9:
            raise DatasetError(f"{path}: label {int(y.max())} outside 0..9")
        return y.astype(np.int64)

    def images(path, n):
        shape, dtype = read_idx(path, header_only=True)
        if len(shape) != 3 or shape[1:] != (28, 28) or dtype != np.uint8:
            raise DatasetError(f"{path}: expected uint8 images of shape (n, 28, 28), "
                               f"header says shape {shape} dtype {dtype}")
        if shape[0] != n:
            raise DatasetError(f"{path}: {shape[0]} images but the label file has {n} labels")
        if not need_inputs:
            return None
        return read_idx(path).reshape(n, 1, 28, 28)

    y_train, y_test = labels(files["train_labels"]), labels(files["test_labels"])
    x_train = images(files["train_images"], len(y_train))
    x_test = images(files["test_images"], len(y_test))
    return RawSet(x_train, y_train, x_test, y_test, (1, 28, 28), 10, 255.0)
