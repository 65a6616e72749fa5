"""How arrays become a :class:`Dataset`: the checks every source shares
(labels, finite inputs), the seeded train/validation split, the
normalisation statistics, and :func:`assemble` and :func:`assemble_known`,
which turn checked arrays into splits.

Every function here works on arrays this rank already holds; none reads a
file or talks to another rank.  The readers, the adapters and the loading
entry points all end here, so a data set is split and normalised the same
way whichever source it came from.
"""
from typing import Optional

import numpy as np
import torch

from layerpar.data.containers import Dataset, DatasetError, Split

__all__ = ["as_numpy", "int_labels", "non_finite", "refuse_non_finite", "split_indices",
           "stats", "standardize_inplace", "assemble", "assemble_known"]


def as_numpy(a):
    """A numpy view of a numpy array, a torch tensor (detached, on the CPU)
    or anything ``np.asarray`` takes."""
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def int_labels(labels, source):
    """Labels as int64 (n,): integers (or whole numbers stored as floats),
    >= 0; DatasetError naming ``source`` otherwise."""
    y = as_numpy(labels)
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


# --------------------------------------------------------------------------
# NaN and Inf in the inputs
# --------------------------------------------------------------------------

def non_finite(x):
    """None when every entry of ``x`` is finite (integer and boolean arrays
    always are), else ``(count, kinds, sample, entry)``: how many entries are
    NaN or Inf, which of the two occur ("NaN", "Inf" or "NaN and Inf"), the
    first sample (index along axis 0) holding one, and that entry's index
    within the sample (flattened)."""
    if x is None or not np.issubdtype(x.dtype, np.floating) or x.size == 0:
        return None
    # A NaN or an Inf makes the float64 sum NaN or Inf, so a finite sum
    # clears the array without a full-size mask; a sum that overflows on
    # finite values falls through to the exact look below.
    if np.isfinite(x.sum(dtype=np.float64)):
        return None
    bad = ~np.isfinite(x.reshape(len(x), -1))
    count = int(np.count_nonzero(bad))
    if count == 0:
        return None
    sample = int(np.argmax(bad.any(axis=1)))
    entry = int(np.argmax(bad[sample]))
    nan = bool(np.isnan(x).any())
    inf = bool(np.isinf(x).any())
    kinds = "NaN and Inf" if nan and inf else "NaN" if nan else "Inf"
    return count, kinds, sample, entry


def refuse_non_finite(x, what, *, unit="sample", columns=None):
    """DatasetError when ``x`` holds NaN or Inf, one line: ``what`` (the file
    and array, or the argument) with the kinds, the count and the first
    ``unit`` (sample, item) holding one.  ``columns`` names the features of
    a 2-D ``x`` (a CSV file's header): the message then names the column of
    the first such entry instead of ``what``'s array."""
    found = non_finite(x)
    if found is None:
        return
    count, kinds, sample, entry = found
    where = f"in {unit} {sample}" if count == 1 else \
        f"{count} values, the first in {unit} {sample}"
    if columns is not None:
        raise DatasetError(f"{what}: input column {columns[entry]!r} holds {kinds} ({where}); "
                           "inputs must be finite numbers")
    raise DatasetError(f"{what} hold {kinds} ({where}); inputs must be finite numbers")


# --------------------------------------------------------------------------
# Split and normalisation
# --------------------------------------------------------------------------

def split_indices(n: int, val_fraction: float, seed: int):
    """Deterministic split of range(n): a permutation from the seed, the first
    round(val_fraction*n) to validation; both index sets sorted."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x73706C6974]))  # "split"
    perm = rng.permutation(n)
    n_val = int(round(val_fraction * n))
    if n - n_val < 1:
        raise ValueError(f"val_fraction={val_fraction} leaves no training samples of {n}")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def stats(x: np.ndarray):
    """Mean and standard deviation (accumulated in float64, returned in x's
    dtype) over all axes but the channel/feature axis 1."""
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, dtype=np.float64)
    std = x.std(axis=axes, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)  # a constant channel is left unscaled
    return mean.astype(x.dtype), std.astype(x.dtype)


def standardize_inplace(x, mean, std):
    """``x = (x - mean) / std`` per channel/feature (axis 1), in place."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x -= mean.reshape(shape)
    x /= std.reshape(shape)


# --------------------------------------------------------------------------
# Arrays -> Dataset
# --------------------------------------------------------------------------

def assemble(inputs, labels, *, val_inputs=None, val_labels=None, input_shape=None,
             num_classes: Optional[int] = None, seed: int = 0,
             val_fraction: Optional[float] = None, dtype=torch.float32,
             normalize: bool = True, need_labels: bool = True, name: str = "arrays",
             source: str = "inputs/labels", val_source: Optional[str] = None) -> Dataset:
    """The :class:`Dataset` of arrays whose inputs are already known to be
    finite (arguments as for ``layerpar.data.from_arrays``): labels and
    shapes checked, split (``val_labels`` or ``val_fraction`` from ``seed``),
    converted to ``dtype`` and normalised with the training split's
    statistics.  Errors name ``source`` (``val_source``)."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    y = int_labels(labels, source)
    x = None if inputs is None else as_numpy(inputs)
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
        yv = int_labels(val_labels, val_source)
        xv = None if val_inputs is None else as_numpy(val_inputs)
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
        train_idx, val_idx = split_indices(len(y), vf, seed)
        xv, yv = (None if x is None else x[val_idx]), y[val_idx]
        x = None if x is None else x[train_idx]
        y = y[train_idx]
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    if x is not None:
        x = x.astype(np_dtype)
        xv = xv.astype(np_dtype) if xv is not None else None
    mean = std = None
    if normalize and x is not None:
        mean, std = stats(x)
        for a in (x, xv):
            if a is not None:
                standardize_inplace(a, mean, std)

    def split(xa, ya):
        xt = None if xa is None else torch.from_numpy(np.ascontiguousarray(xa))
        yt = torch.from_numpy(np.ascontiguousarray(ya)) if need_labels else None
        return Split(xt, yt, len(ya))

    to_t = (lambda a: None if a is None else torch.from_numpy(a))
    return Dataset(name=name, input_shape=tuple(int(s) for s in input_shape),
                   num_classes=int(num_classes), train=split(x, y), val=split(xv, yv),
                   test=None, mean=to_t(mean), std=to_t(std))


def assemble_known(raw, *, name: str, seed: int, val_fraction: float, dtype,
                   need_inputs: bool, need_labels: bool, normalize: bool) -> Dataset:
    """The :class:`Dataset` of a known set's ``raw`` arrays (a
    ``readers.RawSet``): the training file split by ``seed``, inputs divided
    by ``raw.scale`` in ``dtype`` and normalised with the training split's
    statistics (the test split too)."""
    x_all, y_all, x_test, y_test, input_shape, num_classes, scale = raw
    np_dtype = np.float32 if dtype == torch.float32 else np.float64

    def scaled(x):  # converted only after indexing: one full-size copy at most
        if x is None:
            return None
        x = x.astype(np_dtype)
        x /= np_dtype(scale)
        return x

    train_idx, val_idx = split_indices(len(y_all), float(val_fraction), seed)
    x_train = scaled(x_all[train_idx]) if need_inputs else None
    x_val = scaled(x_all[val_idx]) if need_inputs else None
    x_test = scaled(x_test) if need_inputs else None
    del x_all
    mean = std = None
    if normalize and need_inputs:
        mean, std = stats(x_train)
        for x in (x_train, x_val, x_test):
            if x is not None:
                standardize_inplace(x, mean, std)

    def split(x, y, size):
        xt = torch.from_numpy(np.ascontiguousarray(x)) if need_inputs else None
        yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)) if need_labels else None
        return Split(xt, yt, size)

    test = None if y_test is None else split(x_test, y_test, len(y_test))
    to_t = (lambda a: None if a is None else torch.from_numpy(a))
    return Dataset(name=name, input_shape=tuple(input_shape), num_classes=num_classes,
                   train=split(x_train, y_all[train_idx], len(train_idx)),
                   val=split(x_val, y_all[val_idx], len(val_idx)),
                   test=test, mean=to_t(mean), std=to_t(std))
