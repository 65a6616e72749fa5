"""The entry points that load a data set, collectively over the ranks of a
communicator: ``load_dataset`` (a known set by name), ``load_files`` (the
user's file) and ``load_configured`` (a ``[data]`` configuration section).

Which rank reads what: every rank reads the labels (they give the split and
the number of classes); only a rank that asks for the inputs
(``need_inputs``; the first rank of a layer-parallel group) reads them, the
others learn only their shape from the files' headers.  So a problem in the
inputs (a truncated image file, NaN in a user's array) is found on the
reading rank alone: with ``comm`` given, every load ends in one agreement
(``layerpar._collective``) and a failure on any rank raises DatasetError on
every rank, the failing rank its own one-line message and the others that
message prefixed with the failing rank.
"""
import dataclasses
import os
from typing import Optional

import numpy as np
import torch

from layerpar._collective import collective
from layerpar.data.containers import Dataset, DatasetError
from layerpar.data.prepare import assemble, assemble_known
from layerpar.data.readers import cifar, generated, idx
from layerpar.data.readers.files import read_arrays

__all__ = ["KNOWN_DATASETS", "DEFAULT_VAL_FRACTION", "load_dataset", "load_files", "load_configured"]

KNOWN_DATASETS = ("peaks", "digits", "recall", "mnist", "fashion-mnist", "cifar10")

DEFAULT_VAL_FRACTION = {"peaks": 1 / 6, "digits": 0.2, "recall": 1 / 6, "mnist": 1 / 6,
                         "fashion-mnist": 1 / 6, "cifar10": 0.1, "files": 0.2}
_DTYPES = {"float32": torch.float32, "float64": torch.float64,
           "bfloat16": torch.bfloat16}


def load_dataset(name: str, *, root=None, seed: int = 0,
                 val_fraction: Optional[float] = None, dtype=torch.float32,
                 normalize: bool = True, need_inputs: bool = True,
                 need_labels: bool = True, num_samples: Optional[int] = None,
                 comm=None) -> Dataset:
    """Load data set ``name`` (one of ``KNOWN_DATASETS``).

    ``root``          directory of the files (mnist, fashion-mnist, cifar10).
    ``seed``          seeds the train/validation split (and peaks' points).
    ``val_fraction``  part of the training file held out for validation;
                      None takes the set's default.
    ``dtype``         floating dtype of the inputs (float32 or float64).
    ``normalize``     subtract the mean and divide by the standard deviation
                      of the training split (per channel or feature).
    ``need_inputs``, ``need_labels``
                      False returns None for them (image files are then only
                      checked by their headers, not read).
    ``num_samples``   peaks only: the number of generated points.
    ``comm``          an mpi4py communicator: the load becomes collective and
                      a failure on any rank raises DatasetError on every rank.
    """
    return _collective(comm, repr(name), lambda: _load_known(
        name, root, seed, val_fraction, dtype, normalize, need_inputs, need_labels,
        num_samples))


def load_files(path, *, val_path=None, inputs: str = "x", labels: str = "y",
               num_classes: Optional[int] = None, seed: int = 0,
               val_fraction: Optional[float] = None, dtype=torch.float32,
               normalize: bool = True, need_inputs: bool = True, need_labels: bool = True,
               tokens: bool = False, mask: Optional[str] = None, comm=None) -> Dataset:
    """A :class:`Dataset` from the user's ``.npz``, HDF5 or CSV file (see
    ``layerpar.data.readers.files`` for the formats).

    ``inputs``, ``labels``  the arrays' names (CSV: the label column; the
                    other columns are the inputs).
    ``val_path``    a validation file with the same arrays; without it
                    ``val_fraction`` (default 0.2) of ``path`` is held out,
                    chosen by ``seed``.
    ``num_classes`` None: the largest label + 1.
    The inputs are read only where ``need_inputs`` (their shape is read from
    the file's metadata elsewhere); the labels are read on every rank (they
    give the split and the number of classes) and kept where
    ``need_labels``.  Inputs holding NaN or Inf are refused where they are
    read, naming the file and the array.  ``tokens``: the inputs are
    ``(n, L)`` integer token ids ``t >= 0``, stored as ``t + 1`` with 0 for
    padding where the array named ``mask`` (same shape; nonzero: a token)
    is 0, never normalised (``layerpar.transformer.TokenOpening``).  Other
    arguments as for :func:`load_dataset`.
    """
    def read(where):
        x, y, shape = read_arrays(where, inputs=inputs, labels=labels, need_inputs=need_inputs)
        if tokens:
            x = _tokens(where, x, shape, inputs, mask, labels, need_inputs)
        return x, y, shape

    def load():
        x, y, shape = read(path)
        xv = yv = None
        if val_path is not None:
            xv, yv, vshape = read(val_path)
            if vshape != shape:
                raise DatasetError(f"{os.fspath(val_path)}: inputs of shape {vshape} but "
                                   f"{os.fspath(path)} has inputs of shape {shape}")
        # read_arrays has checked the inputs for NaN and Inf, naming the file
        return assemble(x, y, val_inputs=xv, val_labels=yv, input_shape=shape,
                        num_classes=num_classes, seed=seed, val_fraction=val_fraction,
                        dtype=dtype, normalize=normalize and not tokens,
                        need_labels=need_labels,
                        name="files", source=os.fspath(path),
                        val_source=None if val_path is None else os.fspath(val_path))
    return _collective(comm, repr(os.fspath(path)), load)


def load_configured(d, *, need_inputs=True, need_labels=True, comm=None) -> Dataset:
    """The data set of a ``[data]`` configuration section ``d`` (a dict as in
    ``layerpar.config.DEFAULTS``); collective when ``comm`` is given."""
    val_fraction = None if d["val_fraction"] < 0 else d["val_fraction"]
    dtype = _DTYPES[d["dtype"]]
    if dtype == torch.bfloat16:  # read and normalised in float32, then rounded once
        data = load_configured(dict(d, dtype="float32"), need_inputs=need_inputs,
                               need_labels=need_labels, comm=comm)
        return _rounded(data, dtype)
    normalize = d.get("normalize", True)
    if d["name"] == "files":
        return load_files(d["path"], val_path=d["val_path"] or None, inputs=d["inputs"],
                          labels=d["labels"], num_classes=d["num_classes"] or None,
                          seed=d["seed"], val_fraction=val_fraction, dtype=dtype,
                          normalize=normalize, need_inputs=need_inputs,
                          need_labels=need_labels, tokens=d.get("tokens", False),
                          mask=d.get("mask") or None, comm=comm)
    return load_dataset(d["name"], root=d["root"] or None, seed=d["seed"],
                        val_fraction=val_fraction, dtype=dtype, normalize=normalize,
                        need_inputs=need_inputs, need_labels=need_labels,
                        num_samples=d.get("num_samples") or None, comm=comm)


def _tokens(path, x, shape, inputs, mask, labels, need_inputs):
    """Token inputs as stored: ids t as t + 1, 0 where ``mask`` pads."""
    where = f"{os.fspath(path)}: array {inputs!r}"
    if len(shape) != 1:
        raise DatasetError(f"{where} has shape (n, {', '.join(map(str, shape))}); token "
                           "inputs must be (n, length)")
    if not need_inputs:
        return None
    if not (np.issubdtype(x.dtype, np.integer) or np.array_equal(x, np.round(x))):
        raise DatasetError(f"{where}: token ids must be integers")
    if x.size and x.min() < 0:
        raise DatasetError(f"{where}: token id {int(x.min())} is negative")
    keep = np.ones(x.shape, dtype=bool)
    if mask:
        m, _, _ = read_arrays(path, inputs=mask, labels=labels)
        if tuple(m.shape) != tuple(x.shape):
            raise DatasetError(f"{os.fspath(path)}: mask array {mask!r} has shape "
                               f"{tuple(m.shape)}; the token array {inputs!r} has "
                               f"{tuple(x.shape)}")
        keep = m != 0
    return np.where(keep, x.astype(np.int64) + 1, 0)


def _rounded(data, dtype):
    """``data`` with its inputs in ``dtype``."""
    def split(sp):
        if sp is None or sp.inputs is None:
            return sp
        return dataclasses.replace(sp, inputs=sp.inputs.to(dtype))
    return dataclasses.replace(data, train=split(data.train), val=split(data.val),
                               test=split(data.test))


def _collective(comm, what, load):
    """load() on this rank; with a communicator, a failure on any rank
    raises on every rank (the original exception where it happened)."""
    if comm is None:
        return load()
    result = None
    # all ranks leave together instead of some waiting in the training loop
    with collective(comm, f"loading data set {what}", error_type=DatasetError):
        result = load()
    return result


def _load_known(name, root, seed, val_fraction, dtype, normalize,
                need_inputs, need_labels, num_samples) -> Dataset:
    key = _canonical_name(name)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if val_fraction is None:
        val_fraction = DEFAULT_VAL_FRACTION[key]
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if num_samples is not None and key not in ("peaks", "recall"):
        raise ValueError("num_samples applies to the generated 'peaks' and 'recall' sets only")
    if key == "peaks":
        raw = generated.peaks(seed, generated.PEAKS_DEFAULT_SAMPLES if num_samples is None
                              else num_samples)
    elif key == "recall":  # stored token ids (0: padding): never normalised
        raw = generated.recall(seed, generated.RECALL_DEFAULT_SAMPLES if num_samples is None
                               else num_samples)
        normalize = False
    elif key == "digits":
        raw = generated.digits()
    elif key in ("mnist", "fashion-mnist"):
        raw = idx.mnist(key, root, need_inputs)
    else:
        raw = cifar.cifar10(root, need_inputs)
    return assemble_known(raw, name=key, seed=seed, val_fraction=val_fraction, dtype=dtype,
                          need_inputs=need_inputs, need_labels=need_labels,
                          normalize=normalize)


def _canonical_name(name) -> str:
    key = str(name).strip().lower().replace("_", "-")
    aliases = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}
    key = aliases.get(key, key)
    if key not in KNOWN_DATASETS:
        raise DatasetError(f"unknown data set {name!r}; known data sets: "
                           + ", ".join(KNOWN_DATASETS))
    return key
