"""CIFAR-10's Python batches (``read_cifar_batch``, unpickled with only
arrays, dicts and numbers allowed) and the ``cifar10`` directory:
``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` in ``root`` or in
``root/cifar-10-batches-py``; 3x32x32 uint8 images, labels 0..9."""
import os
import pickle

import numpy as np

from layerpar.data.containers import DatasetError
from layerpar.data.readers import RawSet, check_root

__all__ = ["CIFAR10_DIRNAME", "CIFAR10_TRAIN_FILES", "CIFAR10_TEST_FILE", "read_cifar_batch",
           "cifar10"]

CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays only: the
    batch files come from a user's directory, and plain pickle would run any
    code a crafted file names."""
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def read_cifar_batch(path):
    """Read one CIFAR-10 Python batch: returns ``(images, labels)``, uint8
    ``(n, 3, 32, 32)`` and int64 ``(n,)``.  Raises DatasetError when the file
    is missing, not a pickle, or lacks well-formed ``b'data'``/``b'labels'``."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            obj = _ArrayUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found") from exc
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a malformed file
        raise DatasetError(f"{path}: not a CIFAR-10 batch file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: not a CIFAR-10 batch (a {type(obj).__name__}, not a dict)")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if data is None or labels is None:
        raise DatasetError(f"{path}: CIFAR-10 batch lacks b'data' or b'labels' "
                           f"(keys: {sorted(map(repr, obj))})")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: b'data' must be uint8 of shape (n, 3072), "
                           f"got {data.dtype} {data.shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: b'labels' must be {data.shape[0]} integers, "
                           f"got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{path}: labels outside 0..9")
    # Rows are channel-major: 1024 red, 1024 green, 1024 blue values.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def cifar10(root, need_inputs: bool) -> RawSet:
    """The five training batches and the test batch under ``root``; both
    images and labels are read (they share a pickle), the images dropped
    where ``need_inputs`` is False."""
    expected = list(CIFAR10_TRAIN_FILES) + [CIFAR10_TEST_FILE]
    what = f"cifar10 (directory {CIFAR10_DIRNAME} or its parent)"
    root = check_root(root, what, expected)
    if os.path.isdir(os.path.join(root, CIFAR10_DIRNAME)):
        root = os.path.join(root, CIFAR10_DIRNAME)
    for f in expected:
        if not os.path.isfile(os.path.join(root, f)):
            raise DatasetError(f"cifar10: {f} not found in directory {root!r}; "
                               f"expected files: {', '.join(expected)}")
    xs, ys = [], []
    for f in CIFAR10_TRAIN_FILES:   # data and labels share a pickle: both are read
        x, y = read_cifar_batch(os.path.join(root, f))
        xs.append(x if need_inputs else None)
        ys.append(y)
    x_test, y_test = read_cifar_batch(os.path.join(root, CIFAR10_TEST_FILE))
    x_train = np.concatenate(xs) if need_inputs else None
    y_train = np.concatenate(ys)
    return RawSet(x_train, y_train, x_test if need_inputs else None, y_test, (3, 32, 32), 10,
                  255.0)
