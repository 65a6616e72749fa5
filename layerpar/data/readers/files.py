"""Readers for the user's own data files: NumPy ``.npz``, HDF5 (``.h5``,
``.hdf5``) and CSV (``.csv``), told apart by the file's suffix.

``read_arrays(path, inputs="x", labels="y", need_inputs=True)`` returns
``(x, y, input_shape)``:

``x``            the inputs as stored, ``(n, features)`` or ``(n, C, H, W)``,
                 any real dtype; None when ``need_inputs`` is False (the
                 inputs' shape is then read from the file's metadata: an
                 ``.npz`` member's header, an HDF5 dataset's shape, a CSV
                 header row; the data are not read).
``y``            the labels, int64 ``(n,)``; integers stored as floats are
                 accepted, fractions are not.
``input_shape``  ``x.shape[1:]``.

In ``.npz`` and HDF5 files ``inputs`` and ``labels`` name arrays (an HDF5
name may be a path, ``"group/x"``).  A CSV file needs a header row; the
column named ``labels`` holds the labels and every other column is an input
feature (``inputs`` is not used).  Every problem raises ``DatasetError``
with one line that names the file and the array: a missing file or array, a
file of another format, inputs that are not 2-D or 4-D, labels that are not
1-D or not integers, a different number of inputs and labels, inputs that
hold NaN or Inf (checked where the inputs are read; a CSV file's message
names the column).
"""
import csv
import os
import zipfile

import numpy as np

from layerpar.data.containers import DatasetError
from layerpar.data.prepare import int_labels, refuse_non_finite

__all__ = ["FILE_SUFFIXES", "read_arrays"]

FILE_SUFFIXES = (".npz", ".h5", ".hdf5", ".csv")


def read_arrays(path, *, inputs="x", labels="y", need_inputs=True):
    """``(x or None, y, input_shape)`` from an .npz, HDF5 or CSV file."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FILE_SUFFIXES:
        raise DatasetError(f"{path}: unknown file type {suffix or '(no suffix)'!r}; "
                           f"known: {', '.join(FILE_SUFFIXES)}")
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: file not found")
    columns = None  # a CSV file's input columns, by name
    if suffix == ".npz":
        x, y, shape, dtype = _read_npz(path, inputs, labels, need_inputs)
    elif suffix == ".csv":
        x, y, shape, dtype, columns = _read_csv(path, labels, need_inputs)
        inputs = "the columns other than " + repr(labels)
    else:
        x, y, shape, dtype = _read_h5(path, inputs, labels, need_inputs)
    what_x = inputs if inputs.startswith("the columns") else f"inputs {inputs!r}"
    if len(shape) not in (2, 4):
        raise DatasetError(f"{path}: {what_x} have shape {tuple(shape)}; expected "
                           "(n, features) or (n, C, H, W)")
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
            or dtype == np.bool_):
        raise DatasetError(f"{path}: {what_x} have dtype {dtype}; expected real numbers")
    y = int_labels(y, f"{path}, array {labels!r}")
    if shape[0] != len(y):
        raise DatasetError(f"{path}: {what_x} have {shape[0]} samples but labels "
                           f"{labels!r} have {len(y)}")
    if columns is not None:
        refuse_non_finite(x, path, columns=columns)
    else:
        refuse_non_finite(x, f"{path}: {what_x}")
    return x, y, tuple(int(s) for s in shape[1:])


# --------------------------------------------------------------------------
# NumPy .npz
# --------------------------------------------------------------------------

def _read_npz(path, inputs, labels, need_inputs):
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any failure to open is a malformed file
        raise DatasetError(f"{path}: not a NumPy .npz file ({type(exc).__name__}: {exc})") \
            from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path}: not a NumPy .npz archive (a single .npy array?)")
    with archive:
        for name, role in ((inputs, "inputs"), (labels, "labels")):
            if name not in archive.files:
                raise DatasetError(f"{path}: no array {name!r} (data.{role}); arrays in the "
                                   f"file: {', '.join(archive.files) or 'none'}")
        try:
            y = archive[labels]
            if need_inputs:
                x = archive[inputs]
                return x, y, x.shape, x.dtype
        except Exception as exc:  # noqa: BLE001
            raise DatasetError(f"{path}: cannot read its arrays ({type(exc).__name__}: "
                               f"{exc})") from None
    shape, dtype = _npz_header(path, inputs)
    return None, y, shape, dtype


def _npz_header(path, name):
    """Shape and dtype of an .npz member from its .npy header alone."""
    fmt = np.lib.format
    with zipfile.ZipFile(path) as zf, zf.open(name + ".npy") as fh:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(fh)
        else:  # a newer header format: read the array itself
            fh.seek(0)
            a = fmt.read_array(fh, allow_pickle=False)
            shape, dtype = a.shape, a.dtype
    return shape, dtype


# --------------------------------------------------------------------------
# HDF5
# --------------------------------------------------------------------------

def _read_h5(path, inputs, labels, need_inputs):
    import h5py
    try:
        f = h5py.File(path, "r")
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"{path}: not an HDF5 file ({type(exc).__name__}: {exc})") from None
    with f:
        found = []
        f.visititems(lambda name, obj: found.append(name)
                     if isinstance(obj, h5py.Dataset) else None)
        for name, role in ((inputs, "inputs"), (labels, "labels")):
            if not isinstance(f.get(name), h5py.Dataset):
                raise DatasetError(f"{path}: no dataset {name!r} (data.{role}); datasets in "
                                   f"the file: {', '.join(found) or 'none'}")
        dx = f[inputs]
        y = f[labels][()]
        x = dx[()] if need_inputs else None
        return x, y, dx.shape, dx.dtype


# --------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------

def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv(path, labels, need_inputs):
    try:
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), None)
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read CSV file ({exc})") from None
    if not header:
        raise DatasetError(f"{path}: empty CSV file; expected a header row naming the columns")
    names = [h.strip() for h in header]
    if all(_is_number(h) for h in names):
        raise DatasetError(f"{path}: the first row holds numbers; a CSV file needs a header "
                           "row naming the columns")
    if labels not in names:
        raise DatasetError(f"{path}: no column {labels!r} (data.labels) in the header row; "
                           f"columns: {', '.join(names)}")
    li = names.index(labels)
    cols = [i for i in range(len(names)) if i != li]
    if not cols:
        raise DatasetError(f"{path}: no input columns besides the labels {labels!r}")
    use = [li] + cols if need_inputs else [li]
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, usecols=use, ndmin=2,
                           dtype=np.float64)
    except ValueError as exc:
        detail = " ".join(str(exc).split())
        raise DatasetError(f"{path}: malformed CSV data ({detail})") from None
    y = table[:, 0]
    x = np.ascontiguousarray(table[:, 1:]) if need_inputs else None
    return x, y, (len(y), len(cols)), np.dtype(np.float64), [names[i] for i in cols]
