"""Per-epoch training metrics as TensorBoard event files, written by rank 0,
when the ``tensorboard`` package is installed (layerpar does not require it)."""
from __future__ import annotations

import numbers
from typing import Optional

__all__ = ["TensorBoardEvents", "tensorboard_missing"]

INSTALL = "pip install tensorboard"


def tensorboard_missing() -> Optional[str]:
    """Why TensorBoard event files cannot be written here (the import's
    error, with how to install the package), or None when they can.  Not
    collective: imports ``torch.utils.tensorboard`` in this process."""
    try:
        import torch.utils.tensorboard  # noqa: F401 - needs the tensorboard package
    except ImportError as e:
        return f"the tensorboard package is not installed ({INSTALL}): {e}"
    return None


class TensorBoardEvents:
    """The metrics rows of a run as TensorBoard scalars in ``directory``
    (``tensorboard --logdir <directory or a folder above it>`` shows them).

    ``append(row)`` writes each number of the row (ints and floats; not
    bools, strings or sequences) as a scalar whose tag is its column name
    (``train_loss``, ``val_acc``, ``fwd_iters``, ...) at the step
    ``row["epoch"]``: the x axis is the epoch, as in the CSV and the plot.
    TensorBoard stores a scalar as float32.  The first row appended drops,
    for TensorBoard's reader, the events of earlier writers in the folder
    at that epoch and after (``purge_step``): a run resumed from an earlier
    checkpoint shows each epoch once, as its metrics files do.  Every row is
    flushed to disk when written.

    Only rank 0 of ``comm`` writes; on the other ranks every method does
    nothing.  The constructor is collective over ``comm``: rank 0 looks
    for the ``tensorboard`` package and every rank gets ``missing`` (None,
    or why there will be no event files: then every method does nothing on
    every rank; the caller says so, a library does not print).  The other
    methods are not collective; an OSError of the writer (a full disk)
    raises on rank 0.
    """

    def __init__(self, directory, comm):
        from layerpar._collective import on_root
        self.directory = str(directory)
        self._active = comm.Get_rank() == 0
        self._writer = None
        self.missing = on_root(comm, tensorboard_missing,
                               what="looking for the tensorboard package")
        self._active = self._active and self.missing is None

    def append(self, row) -> None:
        """Write the numbers of one metrics row (a dict with an ``epoch``)
        at the step ``row["epoch"]``; KeyError without one."""
        if not self._active:
            return
        step = int(row["epoch"])
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(self.directory, purge_step=step)
        for key, value in row.items():
            if key == "epoch" or isinstance(value, bool) \
                    or not isinstance(value, numbers.Real):
                continue
            self._writer.add_scalar(str(key), float(value), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file (rank 0); appending after it opens
        a new one."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
