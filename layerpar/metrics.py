"""Per-epoch training metrics in HDF5 and CSV, written by rank 0."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Mapping
from typing import Optional

import h5py
import numpy as np
import torch

__all__ = ["MetricsWriter"]


def _h5(path: str, mode: str) -> h5py.File:
    # one writer (rank 0); no HDF5 file locks (unsupported on some parallel
    # file systems)
    return h5py.File(path, mode, locking=False)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MetricsWriter:
    """Per-epoch metrics in ``<directory>/<name>.h5`` and ``<name>.csv``.

    ``append(row)`` adds one row: a dict with the same keys every time (the
    first row, or the existing file, fixes them).  Values are ints (and
    bools), floats, strings, or 1-D sequences of numbers (e.g. MGRIT residual
    histories; a JSON list in the CSV, a variable-length float64 array in
    HDF5).  Only rank 0 of ``comm`` writes; on the other ranks every method
    does nothing (``rows()`` returns None).  Not collective.

    The HDF5 file is the record (one resizable dataset per key); every
    change is written to a copy that then replaces it, so a crash (a
    ``kill -9`` in the middle of a write) leaves the file as it was before
    or after the row, never half-written.  The CSV mirrors it and is rebuilt
    from it when they disagree.  Reopening an existing directory appends
    after the rows there; ``truncate(n)`` drops the rows after the first n
    (when resuming from an earlier checkpoint).  An HDF5 file that cannot be
    read (written by something else, or damaged on disk) is rebuilt from the
    CSV, its damaged copy kept beside it.

    The constructor is collective over ``comm`` (rank 0 opens the files; a
    failure there raises on every rank); the other methods are not.
    """

    def __init__(self, directory, comm, *, name: str = "metrics"):
        from layerpar._collective import on_root
        directory = os.fspath(directory)
        self.h5_path = os.path.join(directory, name + ".h5")
        self.csv_path = os.path.join(directory, name + ".csv")
        self._active = comm.Get_rank() == 0
        self._columns = None   # list of (key, kind)
        self._num_rows = 0
        on_root(comm, lambda: self._open(directory), what="opening the metrics files")

    def _open(self, directory):
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(self.h5_path):
            try:
                with _h5(self.h5_path, "r") as f:
                    self._columns = [tuple(c) for c in json.loads(f.attrs["columns"])]
                    self._num_rows = min((len(f[k]) for k, _ in self._columns), default=0)
            except (OSError, KeyError, ValueError):
                self._recover()
            if not self._csv_matches():
                self._rewrite_csv()
        elif os.path.exists(self.csv_path):
            raise ValueError(f"{self.csv_path} exists without {self.h5_path}; move it away "
                             "or restore the HDF5 file before appending")

    def _recover(self):
        """The HDF5 file cannot be read: keep it as ``<name>.h5.damaged``
        and rebuild the record from the CSV's complete lines (an empty record
        without a CSV)."""
        os.replace(self.h5_path, self.h5_path + ".damaged")
        self._columns, self._num_rows = None, 0
        if not os.path.exists(self.csv_path):
            return
        with open(self.csv_path, newline="") as fh:
            text = fh.read()
        lines = list(csv.reader(io.StringIO(text)))
        if not text.endswith("\n"):
            lines = lines[:-1]  # a line cut short by the crash
        if len(lines) < 2:
            os.remove(self.csv_path)
            return
        keys, body = lines[0], [r for r in lines[1:] if len(r) == len(lines[0])]
        kinds = [_csv_kind([r[j] for r in body]) for j in range(len(keys))]
        for r in body:
            self.append({k: _csv_value(kind, cell) for k, kind, cell in zip(keys, kinds, r)})

    @property
    def num_rows(self) -> Optional[int]:
        return self._num_rows if self._active else None

    @property
    def columns(self) -> Optional[list]:
        return None if self._columns is None else [k for k, _ in self._columns]

    def append(self, row: Mapping) -> None:
        if not self._active:
            return
        if self._columns is None:
            self._columns = [(str(k), _column_kind(k, v)) for k, v in row.items()]
        keys = [k for k, _ in self._columns]
        if set(map(str, row)) != set(keys):
            missing, extra = set(keys) - set(map(str, row)), set(map(str, row)) - set(keys)
            raise ValueError(f"metrics row keys differ from the columns {keys}: "
                             f"missing {sorted(missing)}, extra {sorted(extra)}")
        values = {str(k): v for k, v in row.items()}
        values = {k: _convert(k, kind, values[k]) for k, kind in self._columns}
        with self._changing() as f:
            if "columns" not in f.attrs:
                f.attrs["columns"] = json.dumps(self._columns)
            for k, kind in self._columns:
                if k not in f:
                    f.create_dataset(k, shape=(0,), maxshape=(None,), chunks=(64,),
                                     dtype=_H5_DTYPES[kind]())
                ds = f[k]
                ds.resize((self._num_rows + 1,))
                ds[self._num_rows] = values[k]
        new_file = not os.path.exists(self.csv_path) or self._num_rows == 0
        with open(self.csv_path, "w" if new_file else "a", newline="") as fh:
            w = csv.writer(fh)
            if new_file:
                w.writerow(keys)
            w.writerow([_csv_cell(kind, values[k]) for k, kind in self._columns])
            fh.flush()
            os.fsync(fh.fileno())
        self._num_rows += 1

    def _changing(self):
        """The HDF5 record opened for a change on a copy, which replaces it
        when the change is complete (synced to disk first)."""
        writer = self

        class _Change:
            def __enter__(self):
                self.tmp = writer.h5_path + ".tmp"
                if os.path.exists(writer.h5_path):
                    shutil.copyfile(writer.h5_path, self.tmp)
                self.f = _h5(self.tmp, "a")
                return self.f

            def __exit__(self, kind, *rest):
                self.f.close()
                if kind is not None:
                    os.remove(self.tmp)
                    return False
                _fsync(self.tmp)
                os.replace(self.tmp, writer.h5_path)
                return False

        return _Change()

    def rows(self) -> Optional[list]:
        """All rows so far, read back from the HDF5 file, as dicts."""
        if not self._active:
            return None
        if self._columns is None or not os.path.exists(self.h5_path):
            return []
        with _h5(self.h5_path, "r") as f:
            cols = {k: f[k][:self._num_rows] for k, _ in self._columns}
        out = []
        for i in range(self._num_rows):
            out.append({k: _from_h5(kind, cols[k][i]) for k, kind in self._columns})
        return out

    def truncate(self, num_rows: int) -> None:
        """Keep only the first ``num_rows`` rows."""
        if not self._active or num_rows >= self._num_rows:
            return
        if num_rows < 0:
            raise ValueError(f"num_rows must be >= 0, got {num_rows}")
        with self._changing() as f:
            for k, _ in self._columns:
                f[k].resize((num_rows,))
        self._num_rows = num_rows
        self._rewrite_csv()

    def _csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([k for k, _ in self._columns])
        for row in self.rows():
            w.writerow([_csv_cell(kind, row[k]) for k, kind in self._columns])
        return buf.getvalue()

    def _csv_matches(self) -> bool:
        """True if the CSV holds exactly the HDF5 rows (no partial last line)."""
        try:
            with open(self.csv_path, newline="") as fh:
                return fh.read() == self._csv_text()
        except (OSError, UnicodeDecodeError):
            return False

    def _rewrite_csv(self) -> None:
        tmp = self.csv_path + ".tmp"
        with open(tmp, "w", newline="") as fh:
            fh.write(self._csv_text())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.csv_path)


_H5_DTYPES = {"int": lambda: np.int64, "float": lambda: np.float64,
              "str": h5py.string_dtype, "seq": lambda: h5py.vlen_dtype(np.float64)}


def _column_kind(key, v) -> str:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, (bool, np.bool_, int, np.integer)):
        return "int"
    if isinstance(v, (float, np.floating)):
        return "float"
    if isinstance(v, str):
        return "str"
    if isinstance(v, (list, tuple, np.ndarray, torch.Tensor)):
        return "seq"
    raise TypeError(f"metrics value {key!r} must be a number, str or sequence of numbers, "
                    f"got {type(v).__name__}")


def _convert(key, kind, v):
    if isinstance(v, torch.Tensor) and kind != "seq":
        v = v.item()
    if kind == "int":
        if isinstance(v, (float, np.floating)) or not isinstance(v, (bool, np.bool_, int, np.integer)):
            raise ValueError(f"metrics column {key!r} holds integers, got {v!r}")
        return int(v)
    if kind == "float":
        if not isinstance(v, (bool, int, float, np.integer, np.floating)):
            raise ValueError(f"metrics column {key!r} holds numbers, got {v!r}")
        return float(v)
    if kind == "str":
        return str(v)
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    arr = np.asarray(v, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"metrics column {key!r} holds 1-D sequences, got shape {arr.shape}")
    return arr


def _csv_kind(cells) -> str:
    """The column kind of a CSV column's cells (as ``_csv_cell`` wrote them)."""
    def all_parse(parse):
        try:
            for c in cells:
                parse(c)
            return True
        except ValueError:
            return False
    if all_parse(int):
        return "int"
    if all_parse(float):
        return "float"
    if cells and all(c.startswith("[") for c in cells) and all_parse(json.loads):
        return "seq"
    return "str"


def _csv_value(kind, cell):
    return {"int": int, "float": float, "seq": json.loads, "str": str}[kind](cell)


def _csv_cell(kind, v) -> str:
    if kind == "float":
        return repr(float(v))
    if kind == "seq":
        return json.dumps([float(x) for x in v])
    return str(v)


def _from_h5(kind, v):
    if kind == "int":
        return int(v)
    if kind == "float":
        return float(v)
    if kind == "str":
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)
    return [float(x) for x in v]
