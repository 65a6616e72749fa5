"""Data sets for layer-parallel training, and a rank-invariant batch iterator.

Nothing here touches the network: the built-in sets are generated (``peaks``)
or shipped with scikit-learn (``digits``); the others are read from standard
files in a directory the user names.

Public names
------------
``load_dataset(name, *, root=None, seed=0, val_fraction=None, ...)``
    Returns a :class:`Dataset`: ``train`` and ``val`` splits (and ``test`` for
    the sets that have one), each a :class:`Split` of ``inputs`` (float
    tensor, ``(n, *input_shape)``) and ``labels`` (int64 tensor, ``(n,)``),
    plus ``input_shape``, ``num_classes`` and the normalisation ``mean`` and
    ``std`` (per channel or per feature, from the training split only).
``Split.loader(batch_size=..., seed=..., need_inputs=..., need_labels=...)``
    A :class:`BatchLoader`: ``loader.epoch(e)`` yields ``(inputs, labels)``
    mini-batches in an order that depends only on ``seed``, ``e`` and the
    split size, so every rank of a layer-parallel group draws the same
    batches.  In layer-parallel training only the first rank needs inputs and
    only the last rank needs labels; a rank that does not need one of them
    gets ``None`` in its place (and can skip loading it with
    ``load_dataset(..., need_inputs=False)``).
``load_files(path, *, val_path=None, inputs="x", labels="y", ...)``
    The user's own data: an ``.npz``, HDF5 or CSV file with named input and
    label arrays (readers in ``layerpar.datafiles``); validation from
    ``val_path`` or ``val_fraction`` of the file.  ``[data] name = "files"``
    with ``data.path`` in a configuration.
``from_arrays(inputs, labels, ...)``, ``from_torch_dataset(dataset, ...)``
    The same :class:`Dataset` from arrays or from any map-style
    ``torch.utils.data.Dataset`` whose items are ``(input, label)``.  In a
    Python training loop with :class:`layerpar.Network`::

        data = from_torch_dataset(ds, val_fraction=0.1, seed=0, dtype=torch.float64)
        loader = data.train.loader(batch_size=64, seed=0,
                                   need_inputs=net.is_first, need_labels=net.is_last)
        for epoch in range(epochs):
            for x, y in loader.epoch(epoch):   # the same batches on every rank
                opt.zero_grad()
                net.loss(x, y, torch.nn.functional.cross_entropy).backward()
                opt.step()

    (``data.input_shape`` and ``data.num_classes`` size the opening and
    closing modules.)
``load_configured(data_config, *, need_inputs, need_labels, comm)``
    The data set of a ``[data]`` configuration section.
``read_idx(path)``, ``read_cifar_batch(path)``
    The file readers, public for tests and for user tools.
``DatasetError``
    A ``ValueError`` for an unknown name, a missing or malformed directory or
    file; the message names the directory and the files expected there.

Known sets (``KNOWN_DATASETS``)
-------------------------------
``peaks``          2-D points in [-3, 3]^2, 5 classes from level sets of the
                   MATLAB ``peaks`` function (Haber & Ruthotto 2017; Guenther
                   et al., SIMODS 2020).  Default: 6000 points, 1/6 for
                   validation (5000 + 1000).
``digits``         scikit-learn's 8x8 handwritten digits (1797 images, 10
                   classes), as 1x8x8 images in [0, 1]; 20% for validation.
``mnist``, ``fashion-mnist``
                   IDX files ``train-images-idx3-ubyte``,
                   ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
                   ``t10k-labels-idx1-ubyte`` (or the same names + ``.gz``) in
                   ``root``; 1x28x28, 10 classes; 1/6 of the training file for
                   validation; the t10k files are the test split.
``cifar10``        the Python batches ``data_batch_1`` .. ``data_batch_5`` and
                   ``test_batch`` in ``root`` or in ``root/cifar-10-batches-py``;
                   3x32x32, 10 classes; 10% for validation.
``files``          the user's file (``load_files``); 20% for validation
                   unless ``val_path`` names a validation file.
"""
from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from layerpar._collective import collective

__all__ = [
    "KNOWN_DATASETS", "DEFAULT_VAL_FRACTION", "DatasetError", "Dataset", "Split", "BatchLoader",
    "load_dataset", "load_files", "load_configured", "from_arrays", "from_torch_dataset",
    "peaks_function", "read_idx", "read_cifar_batch",
]

KNOWN_DATASETS = ("peaks", "digits", "mnist", "fashion-mnist", "cifar10")

# Level-set thresholds of the peaks function: the 5 classes are
# f < -0.3, [-0.3, 0), [0, 0.15), [0.15, 1.3), f >= 1.3.  On uniform points in
# [-3, 3]^2 this gives class fractions of about 20/16/24/20/20 %.
PEAKS_THRESHOLDS = (-0.3, 0.0, 0.15, 1.3)
PEAKS_DEFAULT_SAMPLES = 6000

DEFAULT_VAL_FRACTION = {"peaks": 1 / 6, "digits": 0.2, "mnist": 1 / 6,
                        "fashion-mnist": 1 / 6, "cifar10": 0.1, "files": 0.2}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"


class DatasetError(ValueError):
    """An unknown data set, or a data directory/file that is missing or malformed."""


# --------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """One split of a data set.  ``inputs`` or ``labels`` is None when the
    caller asked not to load it; ``size`` is always the number of samples."""
    inputs: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    size: int

    def __len__(self) -> int:
        return self.size

    def loader(self, *, batch_size: int, seed: int = 0, shuffle: bool = True,
               drop_last: bool = False, need_inputs: bool = True,
               need_labels: bool = True) -> "BatchLoader":
        """A :class:`BatchLoader` over this split (see there)."""
        return BatchLoader(self.inputs if need_inputs else None,
                           self.labels if need_labels else None,
                           num_samples=self.size, batch_size=batch_size, seed=seed,
                           shuffle=shuffle, drop_last=drop_last,
                           need_inputs=need_inputs, need_labels=need_labels)


@dataclass(frozen=True)
class Dataset:
    """A loaded data set: splits plus what a model needs to know about it."""
    name: str
    input_shape: tuple
    num_classes: int
    train: Split
    val: Split
    test: Optional[Split]
    mean: Optional[torch.Tensor]   # per channel/feature, None if not normalised
    std: Optional[torch.Tensor]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Apply this set's normalisation to a batch ``(n, *input_shape)`` of
        raw inputs scaled like the loaded ones (images in [0, 1]); for data
        from outside the loaded splits."""
        if self.mean is None:
            return x
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.reshape(shape)) / self.std.reshape(shape)


class BatchLoader:
    """Mini-batches whose order depends only on ``(seed, epoch, num_samples)``.

    Every rank that builds a loader with the same seed and size and asks for
    the same epoch gets the same sequence of index sets, so the ranks of a
    layer-parallel group agree on each batch without communicating.  A rank
    whose ``need_inputs``/``need_labels`` is False gets ``None`` in that place
    and never indexes (copies) the tensor.  ``shuffle=False`` gives the
    samples in order (for evaluation).  Every sample appears exactly once per
    epoch, except that ``drop_last=True`` leaves out the final short batch.
    """

    def __init__(self, inputs: Optional[torch.Tensor], labels: Optional[torch.Tensor], *,
                 batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, need_inputs: bool = True,
                 need_labels: bool = True, num_samples: Optional[int] = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        sizes = {int(t.shape[0]) for t in (inputs, labels) if t is not None}
        if num_samples is not None:
            sizes.add(int(num_samples))
        if len(sizes) != 1:
            raise ValueError("BatchLoader needs inputs/labels of one common length, or "
                             f"num_samples when both are None (got sizes {sorted(sizes)})")
        if need_inputs and inputs is None:
            raise ValueError("need_inputs=True but no inputs were given (loaded with "
                             "need_inputs=False?)")
        if need_labels and labels is None:
            raise ValueError("need_labels=True but no labels were given (loaded with "
                             "need_labels=False?)")
        self.num_samples = sizes.pop()
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._inputs = inputs if need_inputs else None
        self._labels = labels if need_labels else None

    def __len__(self) -> int:
        """Number of batches per epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def batch_indices(self, epoch: int) -> list:
        """The sample indices of each batch of ``epoch`` (int64 tensors)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        if self.shuffle:
            # A fresh stream per (seed, epoch): no state carried between epochs,
            # so a resumed run draws the same batches as an uninterrupted one.
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            order = rng.permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        order = torch.from_numpy(order.astype(np.int64))
        return [order[i * self.batch_size:(i + 1) * self.batch_size]
                for i in range(len(self))]

    def epoch(self, epoch: int) -> Iterator[tuple]:
        """Yield ``(inputs, labels)`` for each batch of ``epoch``; either is
        None where this rank does not need it."""
        for idx in self.batch_indices(epoch):
            x = self._inputs.index_select(0, idx) if self._inputs is not None else None
            y = self._labels.index_select(0, idx) if self._labels is not None else None
            yield x, y


# --------------------------------------------------------------------------
# The common entry point
# --------------------------------------------------------------------------

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
    return _collective(comm, repr(name), lambda: _load_local(
        name, root, seed, val_fraction, dtype, normalize, need_inputs, need_labels,
        num_samples))


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


def load_configured(d, *, need_inputs=True, need_labels=True, comm=None) -> Dataset:
    """The data set of a ``[data]`` configuration section ``d`` (a dict as in
    ``layerpar.config.DEFAULTS``); collective when ``comm`` is given."""
    val_fraction = None if d["val_fraction"] < 0 else d["val_fraction"]
    dtype = _DTYPES[d["dtype"]]
    normalize = d.get("normalize", True)
    if d["name"] == "files":
        return load_files(d["path"], val_path=d["val_path"] or None, inputs=d["inputs"],
                          labels=d["labels"], num_classes=d["num_classes"] or None,
                          seed=d["seed"], val_fraction=val_fraction, dtype=dtype,
                          normalize=normalize, need_inputs=need_inputs,
                          need_labels=need_labels, comm=comm)
    return load_dataset(d["name"], root=d["root"] or None, seed=d["seed"],
                        val_fraction=val_fraction, dtype=dtype, normalize=normalize,
                        need_inputs=need_inputs, need_labels=need_labels, comm=comm)


# --------------------------------------------------------------------------
# The user's data: files, arrays, torch data sets
# --------------------------------------------------------------------------

def load_files(path, *, val_path=None, inputs: str = "x", labels: str = "y",
               num_classes: Optional[int] = None, seed: int = 0,
               val_fraction: Optional[float] = None, dtype=torch.float32,
               normalize: bool = True, need_inputs: bool = True, need_labels: bool = True,
               comm=None) -> Dataset:
    """A :class:`Dataset` from the user's ``.npz``, HDF5 or CSV file (see
    ``layerpar.datafiles`` for the formats).

    ``inputs``, ``labels``  the arrays' names (CSV: the label column; the
                    other columns are the inputs).
    ``val_path``    a validation file with the same arrays; without it
                    ``val_fraction`` (default 0.2) of ``path`` is held out,
                    chosen by ``seed``.
    ``num_classes`` None: the largest label + 1.
    The inputs are read only where ``need_inputs`` (their shape is read from
    the file's metadata elsewhere); the labels are read on every rank (they
    give the split and the number of classes) and kept where
    ``need_labels``.  Other arguments as for :func:`load_dataset`.
    """
    def load():
        from layerpar.datafiles import read_arrays
        x, y, shape = read_arrays(path, inputs=inputs, labels=labels, need_inputs=need_inputs)
        xv = yv = None
        if val_path is not None:
            xv, yv, vshape = read_arrays(val_path, inputs=inputs, labels=labels,
                                         need_inputs=need_inputs)
            if vshape != shape:
                raise DatasetError(f"{os.fspath(val_path)}: inputs of shape {vshape} but "
                                   f"{os.fspath(path)} has inputs of shape {shape}")
        return from_arrays(x, y, val_inputs=xv, val_labels=yv, input_shape=shape,
                           num_classes=num_classes, seed=seed, val_fraction=val_fraction,
                           dtype=dtype, normalize=normalize, need_labels=need_labels,
                           name="files", source=os.fspath(path),
                           val_source=None if val_path is None else os.fspath(val_path))
    return _collective(comm, repr(os.fspath(path)), load)


def from_arrays(inputs, labels, *, val_inputs=None, val_labels=None, input_shape=None,
                num_classes: Optional[int] = None, seed: int = 0,
                val_fraction: Optional[float] = None, dtype=torch.float32,
                normalize: bool = True, need_labels: bool = True, name: str = "arrays",
                source: str = "inputs/labels", val_source: Optional[str] = None) -> Dataset:
    """A :class:`Dataset` from arrays (numpy or torch): ``inputs`` of shape
    ``(n, features)`` or ``(n, C, H, W)`` (None where the inputs are not
    needed: then give ``input_shape``) and integer ``labels`` ``(n,)`` in
    0..K-1.  Validation: ``val_inputs``/``val_labels``, or ``val_fraction``
    (default 0.2) of the samples chosen by ``seed``.  ``num_classes`` None
    takes the largest label + 1.  Errors name ``source`` (``val_source``)."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    y = _int_labels(labels, source)
    x = None if inputs is None else _as_numpy(inputs)
    if x is not None:
        input_shape = tuple(x.shape[1:])
        if len(x) != len(y):
            raise DatasetError(f"{source}: {len(x)} inputs but {len(y)} labels")
    if input_shape is None:
        raise ValueError("from_arrays: give the inputs or their input_shape")
    if len(input_shape) not in (1, 3):
        raise DatasetError(f"{source}: inputs of shape (n, {', '.join(map(str, input_shape))}); "
                           "expected (n, features) or (n, C, H, W)")
    have_val = val_labels is not None
    if have_val:
        val_source = val_source or source
        yv = _int_labels(val_labels, val_source)
        xv = None if val_inputs is None else _as_numpy(val_inputs)
        if xv is not None and (len(xv) != len(yv) or tuple(xv.shape[1:]) != tuple(input_shape)):
            raise DatasetError(f"{val_source}: validation inputs of shape {tuple(xv.shape)} "
                               f"for {len(yv)} labels and inputs of shape {tuple(input_shape)}")
    top = int(max(y.max(initial=-1), yv.max(initial=-1) if have_val else -1))
    if num_classes is None:
        num_classes = top + 1
    elif top >= num_classes:
        where = source if y.max(initial=-1) == top else val_source
        raise DatasetError(f"{where}: label {top} is out of range for num_classes = "
                           f"{num_classes} (labels must be 0..{num_classes - 1})")
    if num_classes < 1:
        raise DatasetError(f"{source}: no labels")
    if have_val:
        if val_fraction not in (None, 0):
            raise ValueError("give a validation set or val_fraction, not both")
        train_idx, val_idx = np.arange(len(y)), None
    else:
        vf = 0.2 if val_fraction is None else float(val_fraction)
        if not 0.0 <= vf < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        train_idx, val_idx = _split_indices(len(y), vf, seed)
        xv, yv = (None if x is None else x[val_idx]), y[val_idx]
        x = None if x is None else x[train_idx]
        y = y[train_idx]
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    if x is not None:
        x = x.astype(np_dtype)
        xv = xv.astype(np_dtype) if xv is not None else None
    mean = std = None
    if normalize and x is not None:
        mean, std = _stats(x)
        for a in (x, xv):
            if a is not None:
                _apply_inplace(a, mean, std)

    def split(xa, ya):
        xt = None if xa is None else torch.from_numpy(np.ascontiguousarray(xa))
        yt = torch.from_numpy(np.ascontiguousarray(ya)) if need_labels else None
        return Split(xt, yt, len(ya))

    to_t = (lambda a: None if a is None else torch.from_numpy(a))
    return Dataset(name=name, input_shape=tuple(int(s) for s in input_shape),
                   num_classes=int(num_classes), train=split(x, y), val=split(xv, yv),
                   test=None, mean=to_t(mean), std=to_t(std))


def from_torch_dataset(dataset, *, val_dataset=None, val_fraction: Optional[float] = None,
                       seed: int = 0, dtype=torch.float32, normalize: bool = False,
                       num_classes: Optional[int] = None, need_inputs: bool = True,
                       need_labels: bool = True) -> Dataset:
    """A :class:`Dataset` (the splits and loaders the Trainer uses) from a
    map-style ``torch.utils.data.Dataset`` whose items are ``(input,
    label)``: inputs tensors of shape ``(features,)`` or ``(C, H, W)``,
    labels integers.  Every item is read once, here; ``need_inputs`` False
    drops the inputs after reading.  Validation: ``val_dataset`` or
    ``val_fraction`` (default 0.2) of ``dataset`` chosen by ``seed``.
    ``normalize`` is off by default (a torch data set usually brings its own
    transforms)."""
    x, y = _stack_items(dataset, "dataset")
    xv = yv = None
    if val_dataset is not None:
        xv, yv = _stack_items(val_dataset, "val_dataset")
    return from_arrays(x if need_inputs else None, y, input_shape=tuple(x.shape[1:]),
                       val_inputs=xv if need_inputs else None, val_labels=yv,
                       num_classes=num_classes, seed=seed, val_fraction=val_fraction,
                       dtype=dtype, normalize=normalize, need_labels=need_labels,
                       name=type(dataset).__name__, source="dataset",
                       val_source="val_dataset")


def _stack_items(dataset, what):
    try:
        n = len(dataset)
    except TypeError:
        raise DatasetError(f"{what}: a map-style Dataset with __len__ is needed, not "
                           f"{type(dataset).__name__}") from None
    if n < 1:
        raise DatasetError(f"{what} is empty")
    xs, ys = [], []
    for i in range(n):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            got = f"a {type(item).__name__}" + (f" of {len(item)}" if isinstance(
                item, (tuple, list)) else "")
            raise DatasetError(f"{what}[{i}] is {got}; expected a pair (input, label)")
        xi = torch.as_tensor(item[0])
        yi = item[1] if isinstance(item[1], torch.Tensor) else torch.from_numpy(np.asarray(item[1]))
        if xs and xi.shape != xs[0].shape:
            raise DatasetError(f"{what}[{i}]: input of shape {tuple(xi.shape)}, but item 0 "
                               f"has shape {tuple(xs[0].shape)}")
        if yi.numel() != 1:
            raise DatasetError(f"{what}[{i}]: label of shape {tuple(yi.shape)}; expected one "
                               "integer")
        xs.append(xi.detach().cpu())
        ys.append(yi.detach().cpu().reshape(()))
    return torch.stack(xs).numpy(), torch.stack(ys).numpy()


def _as_numpy(a):
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _int_labels(labels, source):
    """Labels as int64 (n,): integers (or whole numbers stored as floats),
    >= 0; DatasetError naming ``source`` otherwise."""
    y = _as_numpy(labels)
    if y.ndim != 1:
        raise DatasetError(f"{source}: labels of shape {y.shape}; expected (n,)")
    if len(y) < 1:
        raise DatasetError(f"{source}: no samples")
    if np.issubdtype(y.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if bad.size:
            raise DatasetError(f"{source}: labels are not integers (label {y[bad[0]].item()!r} at "
                               f"index {int(bad[0])})")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{source}: labels of dtype {y.dtype}; expected integers")
    y = y.astype(np.int64)
    if y.min() < 0:
        i = int(np.argmin(y))
        raise DatasetError(f"{source}: negative label {int(y[i])} at index {i}; labels must be "
                           "0..K-1")
    return y


def _load_local(name, root, seed, val_fraction, dtype, normalize,
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
    if num_samples is not None and key != "peaks":
        raise ValueError("num_samples applies to the generated 'peaks' set only")

    # Each reader returns (x_train_file, y_train_file, x_test, y_test, count,
    # input_shape, num_classes, scale): x as stored (uint8 images; peaks'
    # float64 points), None when inputs are not needed; x / scale is the
    # input before normalisation (images in [0, 1]).
    if key == "peaks":
        parts = _peaks(seed, PEAKS_DEFAULT_SAMPLES if num_samples is None else num_samples)
    elif key == "digits":
        parts = _digits()
    elif key in ("mnist", "fashion-mnist"):
        parts = _mnist(key, root, need_inputs)
    else:
        parts = _cifar10(root, need_inputs)
    x_all, y_all, x_test, y_test, n, input_shape, num_classes, scale = parts
    np_dtype = np.float32 if dtype == torch.float32 else np.float64

    def scaled(x):  # converted only after indexing: one full-size copy at most
        if x is None:
            return None
        x = x.astype(np_dtype)
        x /= np_dtype(scale)
        return x

    train_idx, val_idx = _split_indices(n, float(val_fraction), seed)
    x_train = scaled(x_all[train_idx]) if need_inputs else None
    x_val = scaled(x_all[val_idx]) if need_inputs else None
    x_test = scaled(x_test) if need_inputs else None
    del x_all
    mean = std = None
    if normalize and need_inputs:
        mean, std = _stats(x_train)
        for x in (x_train, x_val, x_test):
            if x is not None:
                _apply_inplace(x, mean, std)

    def split(x, y, size):
        xt = torch.from_numpy(np.ascontiguousarray(x)) if need_inputs else None
        yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)) if need_labels else None
        return Split(xt, yt, size)

    test = None if y_test is None else split(x_test, y_test, len(y_test))
    to_t = (lambda a: None if a is None else torch.from_numpy(a))
    return Dataset(name=key, input_shape=tuple(input_shape), num_classes=num_classes,
                   train=split(x_train, y_all[train_idx], len(train_idx)),
                   val=split(x_val, y_all[val_idx], len(val_idx)),
                   test=test, mean=to_t(mean), std=to_t(std))


def _canonical_name(name) -> str:
    key = str(name).strip().lower().replace("_", "-")
    aliases = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}
    key = aliases.get(key, key)
    if key not in KNOWN_DATASETS:
        raise DatasetError(f"unknown data set {name!r}; known data sets: "
                           + ", ".join(KNOWN_DATASETS))
    return key


def _split_indices(n: int, val_fraction: float, seed: int):
    """Deterministic split of range(n): a permutation from the seed, the first
    round(val_fraction*n) to validation; both index sets sorted."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x73706C6974]))  # "split"
    perm = rng.permutation(n)
    n_val = int(round(val_fraction * n))
    if n - n_val < 1:
        raise ValueError(f"val_fraction={val_fraction} leaves no training samples of {n}")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _stats(x: np.ndarray):
    """Mean and standard deviation (accumulated in float64, returned in x's
    dtype) over all axes but the channel/feature axis 1."""
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, dtype=np.float64)
    std = x.std(axis=axes, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)  # a constant channel is left unscaled
    return mean.astype(x.dtype), std.astype(x.dtype)


def _apply_inplace(x, mean, std):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x -= mean.reshape(shape)
    x /= std.reshape(shape)


# --------------------------------------------------------------------------
# peaks
# --------------------------------------------------------------------------

def peaks_function(x, y):
    """MATLAB's ``peaks``: 3(1-x)^2 e^{-x^2-(y+1)^2}
    - 10(x/5 - x^3 - y^5) e^{-x^2-y^2} - 1/3 e^{-(x+1)^2-y^2}."""
    return (3.0 * (1.0 - x) ** 2 * np.exp(-x ** 2 - (y + 1.0) ** 2)
            - 10.0 * (x / 5.0 - x ** 3 - y ** 5) * np.exp(-x ** 2 - y ** 2)
            - 1.0 / 3.0 * np.exp(-(x + 1.0) ** 2 - y ** 2))


def _peaks(seed: int, n: int):
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {n!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7065616B73]))  # "peaks"
    pts = rng.uniform(-3.0, 3.0, size=(n, 2))
    labels = np.digitize(peaks_function(pts[:, 0], pts[:, 1]), PEAKS_THRESHOLDS)
    return pts, labels.astype(np.int64), None, None, n, (2,), 5, 1.0


# --------------------------------------------------------------------------
# digits (scikit-learn, offline)
# --------------------------------------------------------------------------

def _digits():
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x = bunch.data.reshape(-1, 1, 8, 8)   # pixel values 0..16
    y = bunch.target.astype(np.int64)
    return x, y, None, None, len(y), (1, 8, 8), 10, 16.0


# --------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------

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


def _check_root(root, what: str, expected: Sequence[str]) -> str:
    if root is None:
        raise DatasetError(f"{what} is read from files: pass root=DIRECTORY holding "
                           + ", ".join(expected))
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"{what}: data directory {root!r} does not exist or is not a "
                           f"directory; expected a directory holding {', '.join(expected)}")
    return root


def _mnist(key: str, root, need_inputs: bool):
    expected = list(MNIST_FILES.values())
    root = _check_root(root, key, expected)
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
    return x_train, y_train, x_test, y_test, len(y_train), (1, 28, 28), 10, 255.0


# --------------------------------------------------------------------------
# CIFAR-10 (Python batches)
# --------------------------------------------------------------------------

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


def _cifar10(root, need_inputs: bool):
    expected = list(CIFAR10_TRAIN_FILES) + [CIFAR10_TEST_FILE]
    what = f"cifar10 (directory {CIFAR10_DIRNAME} or its parent)"
    root = _check_root(root, what, expected)
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
    return x_train, y_train, x_test if need_inputs else None, y_test, len(y_train), (3, 32, 32), 10, 255.0
