"""The containers every source of data fills: a :class:`Dataset` of
:class:`Split` s, and the :class:`BatchLoader` that draws the same
mini-batches on every rank; :class:`DatasetError`, the one exception of the
data package.

Nothing here reads a file or talks to another rank: a loader's order depends
only on ``(seed, epoch, num_samples)``, so the ranks of a layer-parallel
group agree on each batch without communicating.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

__all__ = ["DatasetError", "Split", "Dataset", "BatchLoader"]


class DatasetError(ValueError):
    """An unknown data set, a data directory or file that is missing or malformed,
    or inputs holding NaN or Inf."""


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
