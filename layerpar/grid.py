"""The 2-D process grid: data-parallel groups x layer-parallel ranks.

P = D x L ranks of a communicator form D data-parallel groups of L
consecutive ranks: world rank r = d*L + l is rank l of group d.

    layer rank   0      1     ...   L-1
    group 0    [ 0      1     ...   L-1    ]   <- layer_comm of group 0
    group 1    [ L      L+1   ...   2L-1   ]
    ...
    group D-1  [ (D-1)L ...         DL-1   ]
                 ^ data_comm of layer rank 0 (a column)

Each group holds a whole network, layer-parallel over its ``layer_comm``
(``Network(..., comm=grid.layer_comm)``), and trains on its share of every
global batch: the rows ``share(B)`` of a batch of B samples, the sizes of
``torch.tensor_split(batch, D)`` (contiguous, the first B mod D groups one
row more; a group's share is empty when B < D).  The ranks of a column
(``data_comm``) hold the same layers in every group; their gradients are
averaged there, weighted by the shares, so that the result is the gradient
of the global batch's mean loss:

    grad (1/B) sum_i loss_i  =  sum_d (n_d/B) * grad (1/n_d) sum_{i in d} loss_i

    with ProcessGrid(comm, data=2) as grid:
        net = Network(..., comm=grid.layer_comm)
        loader = grid.loader(split, batch_size=64, seed=0,
                             need_inputs=net.is_first, need_labels=net.is_last)
        for b, (x, y) in enumerate(loader.epoch(epoch)):   # this group's rows
            B = batch_len(loader, b)                         # the global batch's size
            ...mean loss on the share (none when it is empty), backward...
            grid.average_gradients(net.parameters(), grid.weight(B))

``close()`` (collective) frees the two communicators; garbage collection
never frees them.  The timeout set on ``comm`` (``layerpar.set_timeout``,
else $LAYERPAR_TIMEOUT) bounds every wait of the grid's sums: a rank that
does not arrive makes the others raise ``layerpar.SilentRankError``.
"""
import torch
from mpi4py import MPI

from layerpar._collective import agree, check_comm
from layerpar._watchdog import guard, inherit
from layerpar.reducer import BUCKET_BYTES, GradientReducer


def share_bounds(batch_size, parts, index):
    """(start, stop) of part ``index`` of ``batch_size`` rows split into
    ``parts`` contiguous parts of the sizes of torch.tensor_split."""
    q, r = divmod(batch_size, parts)
    start = index * q + min(index, r)
    return start, start + q + (index < r)


class ProcessGrid:
    """D data-parallel groups of L layer-parallel ranks over ``comm``
    (collective: every rank constructs it with the same ``data``).

    Attributes: ``data`` (D), ``layers`` (L), ``size`` (P), ``rank`` (the
    rank in ``comm``), ``data_rank`` (d, the group), ``layer_rank`` (l),
    ``layer_comm`` (the L ranks of this group, in layer order),
    ``data_comm`` (the D ranks holding the same layers, in group order) and
    ``comm`` (``comm`` itself, not owned: the whole world, for agreements
    that span every group).

    ``data`` must be an integer >= 1 that divides comm.size, the same on
    every rank; otherwise every rank raises the same ValueError naming
    ``data``, before any communicator is made.
    """

    def __init__(self, comm: "MPI.Intracomm", *, data: int = 1) -> None:
        check_comm(comm)
        size = comm.Get_size()
        ok = isinstance(data, int) and not isinstance(data, bool)
        # every rank -> every rank: its value of data (they must agree)
        guard(comm, "making the process grid")
        values = comm.allgather(data if ok else repr(data))
        msg = None
        bad = [v for v in values if not isinstance(v, int)]
        if bad:
            msg = f"data={bad[0]}: the number of data-parallel groups must be an integer"
        elif len(set(values)) > 1:
            msg = f"data: the ranks give different values {sorted(set(values))}; " \
                  "give the same number of data-parallel groups everywhere"
        elif data < 1:
            msg = f"data={data}: the number of data-parallel groups must be >= 1"
        elif size % data:
            msg = (f"data={data} does not divide the {size} rank{'s' * (size != 1)}: "
                   f"P = data x layers, "
                   f"choose data among {[k for k in range(1, size + 1) if size % k == 0]}")
        agree(comm, msg)  # the same text on every rank (every rank found it)
        self.comm = comm
        self.size, self.rank = size, comm.Get_rank()
        self.data, self.layers = data, size // data
        self.data_rank, self.layer_rank = divmod(self.rank, self.layers)
        # groups: consecutive ranks; columns: the same position in every group
        self.layer_comm = comm.Split(self.data_rank, self.layer_rank)
        self.data_comm = comm.Split(self.layer_rank, self.data_rank)
        for sub in (self.layer_comm, self.data_comm):
            inherit(sub, comm)  # the timeout set on comm (layerpar.set_timeout)

    # ---- lifetime ------------------------------------------------------------
    def close(self) -> None:
        """Collective: free the two communicators (closing twice does nothing)."""
        if self.layer_comm is None:
            return
        self.layer_comm.Free()
        self.data_comm.Free()
        self.layer_comm = self.data_comm = None

    @property
    def closed(self):
        return self.layer_comm is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"ProcessGrid(data={self.data}, layers={self.layers}, rank={self.rank}: "
                f"group {self.data_rank}, layer rank {self.layer_rank})")

    @property
    def shape(self):
        """(D, L)."""
        return self.data, self.layers

    def describe(self) -> str:
        """The grid's shape in words, e.g. "2 x 4 (data-parallel groups x
        layer-parallel ranks)".  Not collective."""
        return f"{self.data} x {self.layers} (data-parallel groups x layer-parallel ranks)"

    # ---- the batch share -------------------------------------------------------------
    def share(self, batch_size: int) -> "tuple[int, int]":
        """(start, stop): this group's rows of a global batch of
        ``batch_size`` rows (empty when the group has none)."""
        return share_bounds(batch_size, self.data, self.data_rank)

    def share_size(self, batch_size: int) -> int:
        """The number of this group's rows of a global batch of
        ``batch_size`` rows (0 when the group has none).  Not collective."""
        start, stop = self.share(batch_size)
        return stop - start

    def weight(self, batch_size: int) -> float:
        """n_d / B: this group's part of the global batch's mean."""
        return self.share_size(batch_size) / batch_size if batch_size else 0.0

    def shard(self, t: "torch.Tensor | None",
              batch_size: "int | None" = None) -> "torch.Tensor | None":
        """This group's rows of the global batch ``t`` (None stays None)."""
        if t is None:
            return None
        start, stop = self.share(t.shape[0] if batch_size is None else batch_size)
        return t[start:stop]

    def loader(self, split, *, batch_size, seed=0, shuffle=True, need_inputs=True,
               need_labels=True):
        """A ``ShardedLoader``: the global batches of
        ``split.loader(batch_size, seed, shuffle)``, this group's rows of each."""
        return ShardedLoader(split, self, batch_size=batch_size, seed=seed, shuffle=shuffle,
                             need_inputs=need_inputs, need_labels=need_labels)

    # ---- sums over the data axis -----------------------------------------------------
    def sum_values(self, values):
        """Collective over ``data_comm``: the sums over the groups of a few
        numbers, added in group order (the same floats on every rank of every
        column).  Every rank of the column sends its numbers to every other
        (allgather)."""
        values = list(values)
        if self.data == 1:
            return values
        guard(self.data_comm, "a sum over the data-parallel groups")
        parts = self.data_comm.allgather(values)
        out = list(parts[0])
        for p in parts[1:]:
            out = [a + b for a, b in zip(out, p)]
        return out

    def global_batch(self, x, y, *, need_x, need_y):
        """Collective over ``comm`` (every rank of the grid): the number of
        rows of the global batch, from the inputs ``x`` and targets ``y``
        each rank was given (tensors with a batch dimension, or None where
        the rank does not need them: ``need_x``, ``need_y``).  A missing
        one raises TypeError, sizes that differ between ranks ValueError,
        on every rank of the grid.  Every rank sends the sizes it sees to
        every rank (one allgather)."""
        error, sizes = None, []
        for name, t, needed in (("x", x, need_x), ("y", y, need_y)):
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                sizes.append(len(t))
            elif needed or t is not None:
                error = error or TypeError(
                    f"{name} on rank {self.rank} (layer rank {self.layer_rank}) must be a "
                    f"tensor with a batch dimension, not {type(t).__name__}: on a grid every "
                    "rank passes the global batch")
        found = agree(self.comm, error, what="the global batch", payload=sizes)
        every = sorted({s for part in found for s in part})
        if len(every) != 1:
            raise ValueError(f"x, y: the ranks of the grid were given batches of {every} "
                             "rows: every rank passes the same global batch")
        return every[0]

    def sum_over_groups(self, value, error=None, *, what=None):
        """Collective over ``comm`` (every rank of the grid): the sum over
        the groups of ``value`` (one float, the same on every rank of a
        group), added in group order as ``sum_values`` adds: the same float
        on every rank.  ``error`` (an exception or message of this rank, or
        None) raises on every rank of the grid first (``agree``; ``what``
        names the step).  Every rank sends (error, value) to every rank."""
        values = agree(self.comm, error, what=what, payload=value)
        total = values[0]
        for d in range(1, self.data):
            total = total + values[d * self.layers]
        return total

    def average_gradients(self, params, weight, *, bucket_bytes=BUCKET_BYTES):
        """Collective over ``data_comm``: each parameter's ``.grad`` <- the sum
        over the groups of ``weight_d * grad_d`` (``weight`` = n_d/B of this
        group: the gradient of the global batch's mean loss when each group's
        gradient is that of its share's mean), added in group order, so
        that every group gets bitwise the same sum (``layerpar.reducer``).

        ``params``: this rank's parameters, in the same order on every rank
        of the column (the same layers: ``net.parameters()``); those with
        requires_grad False are skipped, a missing ``.grad`` counts as zero
        (a group with an empty share).  The gradients are flattened into
        buckets of at most ``bucket_bytes`` bytes of one dtype and device;
        every rank of the column sends each weighted bucket to every other.
        ``reducer`` does the same while the backward pass runs."""
        GradientReducer(self.data_comm, params, bucket_bytes=bucket_bytes,
                        overlap=False).reduce(weight)

    def reducer(self, params, *, bucket_bytes=BUCKET_BYTES, overlap=True):
        """A ``GradientReducer`` of ``params`` over ``data_comm``: ``start(weight)``
        before backward, ``finish()`` before the optimiser step; each bucket's
        sum starts as soon as backward has made its gradients (a residual
        layer's: as the adjoint solve's final sweep makes it).  The same
        sums, bitwise, as ``average_gradients``."""
        return GradientReducer(self.data_comm, params, bucket_bytes=bucket_bytes,
                               overlap=overlap)


class ShardedLoader:
    """The global batches of ``split.loader(batch_size=..., seed=...,
    shuffle=...)`` (the same order on any grid shape: it depends only on
    the seed, the epoch and the split's size), each cut to this group's rows
    (``ProcessGrid.share``).  ``epoch(e)`` yields ``(inputs, labels)`` of
    the share, None where this rank does not need them (only the first
    layer rank needs inputs, only the last labels).  ``batch_size``,
    ``num_samples`` and ``len()`` are those of the global batches."""

    def __init__(self, split, grid, *, batch_size, seed=0, shuffle=True, need_inputs=True,
                 need_labels=True):
        # the global order: no tensor is indexed by the inner loader
        self._order = split.loader(batch_size=batch_size, seed=seed, shuffle=shuffle,
                                   need_inputs=False, need_labels=False)
        self.grid = grid
        self.batch_size, self.num_samples = self._order.batch_size, self._order.num_samples
        if need_inputs and split.inputs is None:
            raise ValueError("need_inputs=True but the split holds no inputs")
        if need_labels and split.labels is None:
            raise ValueError("need_labels=True but the split holds no labels")
        self._inputs = split.inputs if need_inputs else None
        self._labels = split.labels if need_labels else None

    def __len__(self):
        return len(self._order)

    def epoch(self, epoch):
        for idx in self._order.batch_indices(epoch):
            mine = self.grid.shard(idx)
            x = self._inputs.index_select(0, mine) if self._inputs is not None else None
            y = self._labels.index_select(0, mine) if self._labels is not None else None
            yield x, y
