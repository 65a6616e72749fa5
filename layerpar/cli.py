"""The ``layerpar`` command: train, eval, info.

    mpiexec -n 4 layerpar train --config peaks.toml --set optim.lr=0.05
    srun layerpar train --config digits.toml --resume
    mpiexec -n 2 layerpar eval --checkpoint runs/latest/checkpoint.h5 --split test
    layerpar info

Rank 0 alone prints.  Errors in the configuration, the data or a checkpoint
end every rank with one line ``layerpar: error: ...`` (printed by rank 0) and
a non-zero exit status.
"""
import argparse
import os
import sys
import time


def _threads_per_rank(comm):
    """Cores per rank on this node, unless OMP_NUM_THREADS says otherwise."""
    from mpi4py import MPI
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    n = local.Get_size()
    local.Free()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // n)


class Printer:
    """Rank-0 output with verbosity levels and a one-line progress display."""

    def __init__(self, rank, verbosity):
        self.on = rank == 0
        self.verbosity = verbosity
        self.tty = sys.stdout.isatty()
        self._open_line = False

    def __call__(self, text, level=1):
        if self.on and self.verbosity >= level:
            if self._open_line:
                sys.stdout.write("\n")
                self._open_line = False
            print(text, flush=True)

    def progress(self, epoch, step, steps, s):
        if not self.on or self.verbosity < 1:
            return
        line = (f"epoch {epoch + 1} [{'#' * int(20 * step / steps):<20}] {step}/{steps}  "
                f"loss {s['loss']:.4f}  acc {100 * s['correct'] / max(s['size'], 1):5.1f}%  "
                f"mgrit {s['fwd_iters']}/{s['bwd_iters']}")
        if self.verbosity >= 2:
            print(line, flush=True)
        elif self.tty:
            sys.stdout.write("\r" + line)
            sys.stdout.flush()
            self._open_line = step < steps
            if step == steps:
                sys.stdout.write("\r" + " " * len(line) + "\r")


def _parser():
    p = argparse.ArgumentParser(prog="layerpar", description="Layer-parallel training of "
                                "deep residual networks with MGRIT over MPI.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a network")
    t.add_argument("--config", help="TOML configuration file (default: built-in peaks)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a configuration value (repeatable)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest valid checkpoint in the run directory")
    t.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint")
    t.add_argument("--run-dir", help="output directory (run.dir)")
    e = sub.add_parser("eval", help="evaluate a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--split", choices=("val", "test", "train"), default="val")
    e.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a stored configuration value (e.g. data.root=...)")
    sub.add_parser("info", help="versions, MPI library, ranks, threads, build options")
    for s in (t, e):
        s.add_argument("-q", "--quiet", action="store_true", help="only the summary line")
        s.add_argument("-v", "--verbose", action="store_true", help="a line per step")
    return p


def _info(comm, out):
    import numpy
    import torch
    import mpi4py
    from mpi4py import MPI

    import braid_ext
    import layerpar
    threads = _threads_per_rank(comm)
    build = braid_ext.build_info()
    lines = [
        f"layerpar {layerpar.__version__}",
        f"python {sys.version.split()[0]}, torch {torch.__version__}, numpy {numpy.__version__}, "
        f"mpi4py {mpi4py.__version__}",
        f"MPI library: {MPI.Get_library_version().splitlines()[0].strip()}",
        f"MPI standard: {'.'.join(map(str, MPI.Get_version()))}",
        f"ranks: {comm.Get_size()}, threads per rank: {threads}",
        f"braid_ext build: compiler {build['compiler']}, MPI headers {build['mpi_version']}",
    ]
    for line in lines:
        out(line)
    return 0


def _train(args, comm, out):
    from layerpar.config import resolve, to_toml
    from layerpar.training.multilevel import make_trainer

    overrides = list(args.set)
    if args.run_dir:
        overrides.append(f'run.dir="{args.run_dir}"')
    config = resolve(args.config, overrides)
    out("resolved configuration:\n" + to_toml(config).rstrip(), 1)
    trainer = make_trainer(config, comm, log=lambda s: out(s, 1), progress=out.progress)
    if args.resume_from:
        trainer.resume(args.resume_from)
    elif args.resume:
        if not trainer.resume():
            out(f"no checkpoint in {config['run']['dir']}: starting afresh", 1)
    trainer.write_config()
    summary = trainer.run()
    trainer.close()  # collective: solvers freed before MPI finalises
    g, method = config["mgrit"], config["multilevel"]["method"]
    out(f"layerpar: {config['data']['name']} {config['model']['kind']} N={config['model']['nlayers']} "
        f"on {comm.Get_size()} ranks, {g['mode']}"
        f"{'' if method == 'none' else ', ' + method}: epoch {summary['epoch']}, "
        f"validation accuracy {100 * summary['val_acc']:.2f}%, "
        f"loss {summary['val_loss']:.4f}, {summary['total_wall_time']:.1f}s; "
        f"results in {config['run']['dir']}", 0)
    return 0


def _eval(args, comm, out):
    from layerpar import checkpoint as ckpt
    from layerpar.config import merge, parse_override, check
    from layerpar.training.multilevel import make_trainer

    header = ckpt.load_checkpoint(args.checkpoint, comm, layer_indices=[])
    config = header["config"]
    for text in args.set:
        merge(config, parse_override(text), f"--set {text}")
    check(config)
    config["run"]["plot"] = False
    trainer = make_trainer(config, comm)
    trainer.resume(args.checkpoint)
    split = {"val": trainer.data.val, "test": trainer.data.test, "train": trainer.data.train}[args.split]
    if split is None:
        raise ValueError(f"--split test: data set {config['data']['name']} has no test split")
    loader = split.loader(batch_size=1000, shuffle=False, need_inputs=trainer.first,
                          need_labels=trainer.last)
    t = time.perf_counter()
    loss, acc = trainer.evaluate(loader)
    out(f"layerpar eval: {args.checkpoint} (epoch {trainer.epoch}) on {args.split} "
        f"({len(split)} samples, {comm.Get_size()} ranks): accuracy {100 * acc:.2f}%, "
        f"loss {loss:.4f}, {time.perf_counter() - t:.1f}s", 0)
    return 0


def _all_failed(exit_comm, grace=30.0):
    """Did every rank reach this point (every rank stopped with an error)?
    A barrier on a communicator used for nothing else, given ``grace``
    seconds: ranks still at work elsewhere mean the error was this rank's
    alone."""
    req = exit_comm.Ibarrier()
    deadline = time.monotonic() + grace
    while not req.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def main(argv=None):
    args = _parser().parse_args(argv)
    from mpi4py import MPI
    import torch

    comm = MPI.COMM_WORLD
    exit_comm = comm.Dup()  # only for agreeing on how to stop
    torch.set_num_threads(_threads_per_rank(comm))
    verbosity = 0 if getattr(args, "quiet", False) else 2 if getattr(args, "verbose", False) else 1
    out = Printer(comm.Get_rank(), verbosity)

    from braid_ext import MGRITError
    from layerpar.checkpoint import CheckpointError
    from layerpar.config import ConfigError
    from layerpar.data import DatasetError
    known = (ConfigError, DatasetError, CheckpointError, MGRITError, ValueError,
             FloatingPointError, FileNotFoundError)
    try:
        run = {"train": _train, "eval": _eval, "info": lambda a, c, o: _info(c, o)}[args.command]
        return run(args, comm, out)
    except known as e:
        code = 2 if isinstance(e, (ConfigError, ValueError)) else 1
        if _all_failed(exit_comm):
            # the usual case: collective checks raise on every rank; rank 0 says it
            out(f"layerpar: error: {e}", 0)
            return code
        sys.stderr.write(f"layerpar: error on rank {comm.Get_rank()}: {e}\n")
        sys.stderr.flush()
        comm.Abort(code)
    except KeyboardInterrupt:
        return 130
    except BaseException:
        # unexpected, and perhaps on this rank only: never leave the others waiting
        import traceback
        traceback.print_exc()
        sys.stderr.write(f"layerpar: internal error on rank {comm.Get_rank()}; aborting all ranks\n")
        sys.stderr.flush()
        comm.Abort(1)


if __name__ == "__main__":
    sys.exit(main())
