"""What the training benchmarks share: a temporary run directory on the
benchmark's ranks, a run of layerpar's Trainer in one, and the point of a
curve where it first reaches a target accuracy."""
import contextlib
import math
import shutil
import tempfile


@contextlib.contextmanager
def run_dir(comm, prefix):
    """A fresh folder made on rank 0, its path on every rank; removed once
    every rank has left the block."""
    path = comm.bcast(tempfile.mkdtemp(prefix=prefix) if comm.rank == 0 else None, root=0)
    try:
        yield path
    finally:
        comm.Barrier()
        if comm.rank == 0:
            shutil.rmtree(path, ignore_errors=True)


def train(comm, config, *, prefix, read):
    """Run layerpar's Trainer (``make_trainer``) on ``config(run_dir)`` in a
    temporary run directory, one torch thread a rank; ``read(trainer)``
    after the run, before the trainer closes."""
    import torch

    from layerpar.training import make_trainer
    torch.set_num_threads(1)
    with run_dir(comm, prefix) as path:
        trainer = make_trainer(config(path), comm)
        try:
            trainer.run()
            return read(trainer)
        finally:
            trainer.close()


def to_target(curve, target, *keys):
    """The values of ``keys`` at the first epoch of ``curve`` whose
    ``val_acc`` reaches ``target`` (to 1e-12); NaN for each if none does."""
    for c in curve:
        if c["val_acc"] >= target - 1e-12:
            return tuple(c[k] for k in keys)
    return (math.nan,) * len(keys)


def conv_pipeline_args(p, *, reps):
    """The conv network and batch of the pipeline benchmarks, as options of
    the parser ``p``."""
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--reps", type=int, default=reps)


def chosen(p, flag, value, allowed):
    """The comma-separated names of ``value`` (option ``flag``), each one of
    ``allowed``; else the parser ``p`` stops naming the option."""
    names = [s for s in value.split(",") if s]
    for s in names:
        if s not in allowed:
            p.error(f"{flag}: {s!r} is not one of {', '.join(allowed)}")
    return names
