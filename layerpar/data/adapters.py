"""Data the user already holds, as a :class:`Dataset`: arrays
(:func:`from_arrays`) and map-style ``torch.utils.data.Dataset`` s of
``(input, label)`` items (:func:`from_torch_dataset`).

Both check their inputs for NaN and Inf and refuse them naming the argument,
then split and normalise like every other source (``prepare.assemble``).
Neither talks to another rank: every rank that is given the same arrays
builds the same splits.
"""
from typing import Optional

import numpy as np
import torch

from layerpar.data.containers import Dataset, DatasetError
from layerpar.data.prepare import as_numpy, assemble, refuse_non_finite

__all__ = ["from_arrays", "from_torch_dataset"]

_SOURCE = "inputs/labels"  # from_arrays' default name of the arrays in its messages


def from_arrays(inputs, labels, *, val_inputs=None, val_labels=None, input_shape=None,
                num_classes: Optional[int] = None, seed: int = 0,
                val_fraction: Optional[float] = None, dtype=torch.float32,
                normalize: bool = True, need_labels: bool = True, name: str = "arrays",
                source: str = _SOURCE, val_source: Optional[str] = None) -> Dataset:
    """A :class:`Dataset` from arrays (numpy or torch): ``inputs`` of shape
    ``(n, features)`` or ``(n, C, H, W)`` (None where the inputs are not
    needed: then give ``input_shape``) and integer ``labels`` ``(n,)`` in
    0..K-1.  Validation: ``val_inputs``/``val_labels``, or ``val_fraction``
    (default 0.2) of the samples chosen by ``seed``.  ``num_classes`` None
    takes the largest label + 1.  Inputs holding NaN or Inf raise
    DatasetError naming the argument (``inputs`` or ``val_inputs``).  Errors
    name ``source`` (``val_source``)."""
    for arg, value, where in (("inputs", inputs, source),
                              ("val_inputs", val_inputs, val_source or source)):
        if value is not None:
            what = arg if where == _SOURCE else f"{where}: {arg}"
            refuse_non_finite(as_numpy(value), what)
    return assemble(inputs, labels, val_inputs=val_inputs, val_labels=val_labels,
                    input_shape=input_shape, num_classes=num_classes, seed=seed,
                    val_fraction=val_fraction, dtype=dtype, normalize=normalize,
                    need_labels=need_labels, name=name, source=source, val_source=val_source)


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
    transforms).  Inputs holding NaN or Inf raise DatasetError naming
    ``dataset`` or ``val_dataset`` and the item, wherever they are read
    (before ``need_inputs`` drops them)."""
    x, y = _stack_items(dataset, "dataset")
    refuse_non_finite(x, "dataset: inputs", unit="item")
    xv = yv = None
    if val_dataset is not None:
        xv, yv = _stack_items(val_dataset, "val_dataset")
        refuse_non_finite(xv, "val_dataset: inputs", unit="item")
    return assemble(x if need_inputs else None, y, input_shape=tuple(x.shape[1:]),
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
