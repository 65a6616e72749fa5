"""Readers: files (or a generator) in, plain numpy arrays out.

A reader knows one format and nothing of splits, normalisation, ranks or
torch tensors; ``layerpar.data.loading`` decides which rank calls which
reader, and ``layerpar.data.prepare`` turns what they return into a
``Dataset``.

``generated``  the sets made here: ``peaks`` (from the seed) and
               scikit-learn's ``digits``
``idx``        IDX files (``read_idx``) and the ``mnist``/``fashion-mnist``
               directories
``cifar``      CIFAR-10 Python batches (``read_cifar_batch``) and their
               directory
``files``      the user's ``.npz``, HDF5 and CSV files (``read_arrays``)

The readers of the known sets return a :class:`RawSet`.
"""
import os
from typing import NamedTuple, Optional, Sequence

import numpy as np

from layerpar.data.containers import DatasetError

__all__ = ["RawSet", "check_root"]


class RawSet(NamedTuple):
    """A known set as stored: ``x_train`` the training file's inputs (uint8
    images; peaks' float64 points), ``x_train / scale`` the inputs before
    normalisation (images in [0, 1]); the inputs are None where they were
    not needed; ``x_test``/``y_test`` None for a set without a test split."""
    x_train: Optional[np.ndarray]
    y_train: np.ndarray
    x_test: Optional[np.ndarray]
    y_test: Optional[np.ndarray]
    input_shape: tuple
    num_classes: int
    scale: float


def check_root(root, what: str, expected: Sequence[str]) -> str:
    """``root`` as a path, or DatasetError naming ``what`` and the
    ``expected`` files when it is None or not a directory."""
    if root is None:
        raise DatasetError(f"{what} is read from files: pass root=DIRECTORY holding "
                           + ", ".join(expected))
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"{what}: data directory {root!r} does not exist or is not a "
                           f"directory; expected a directory holding {', '.join(expected)}")
    return root
