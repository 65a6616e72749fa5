"""The ``layerpar`` command: train, eval, info.

    mpiexec -n 4 layerpar train --config peaks.toml --set optim.lr=0.05
    srun layerpar train --run-dir runs/peaks-1 --resume
    mpiexec -n 2 layerpar eval --checkpoint runs/peaks-1/checkpoint.h5 --split test
    mpiexec -n 8 layerpar train --data-parallel 2 ...   # 2 groups x 4 layer ranks
    layerpar info

Rank 0 alone prints.  Errors in the configuration, the data, the run folder
or a checkpoint end every rank with one line ``layerpar: error: ...`` on
stderr (printed by rank 0) and a non-zero exit status (2 for a bad setting,
1 otherwise).  SIGINT and SIGTERM stop training at the next step on every
rank together, with a final checkpoint, and every rank exits 130 or 143 (a
signal that reaches some ranks only stops them all, with its status).  NaN
or Inf in a layer is one error line naming the layer.  With a
timeout (``run.timeout`` or $LAYERPAR_TIMEOUT) a rank that stops answering
is named in one line by the lowest rank still answering, and the job ends
(``MPI_Abort``, exit status 1).
"""
import argparse
import errno
import math
import os
import signal
import sys
import time

def _threads_per_rank(comm, width=None):
    """Torch threads per rank: OMP_NUM_THREADS if set; else the cores per
    rank on this node, but one thread for layers too narrow to share (a
    matrix of width 64 or less costs less than waking a second thread)."""
    from mpi4py import MPI
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    if width is not None and width <= SMALL_WIDTH:
        return 1
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    n = local.Get_size()
    local.Free()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // n)


SMALL_WIDTH = 64


class StopRequest:
    """Signal handlers that only record the signal; the training loop asks
    (``requested()``) after each step, and the ranks agree on stopping.  A
    second signal ends the process at once (the default action)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None

    def install(self):
        self._saved = {s: signal.getsignal(s) for s in self.SIGNALS}
        for s in self.SIGNALS:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def uninstall(self):
        """Put back the handlers found by install()."""
        for s, handler in getattr(self, "_saved", {}).items():
            signal.signal(s, handler)

    def requested(self):
        return self.signum is not None

    def agree(self, comm):
        """Collective: the signal that stopped the run, the same on every
        rank (a signal may reach some ranks only: ``kill`` of one rank's
        process, Ctrl-C delivered to rank 0): the one received by the lowest
        rank that received one, or None.  It becomes this rank's signal."""
        from layerpar._collective import agree
        # every rank -> every rank: the signal it received, or None
        received = agree(comm, payload=self.signum, label="the agreement on the stopping signal")
        self.signum = next((s for s in received if s is not None), None)
        return self.signum

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else "a stop request"

    @property
    def exit_status(self):
        return 128 + self.signum if self.signum else 1


class Printer:
    """Rank-0 output with verbosity levels and progress within an epoch
    (a rewritten line on a terminal; otherwise, at -v a line per step, else
    a line every PLAIN_EVERY seconds), on stderr."""

    PLAIN_EVERY = 30.0

    def __init__(self, rank, verbosity):
        self.on = rank == 0
        self.verbosity = verbosity
        self.tty = sys.stderr.isatty()
        self._open_line = False
        self._epoch_start = None
        self._last_plain = 0.0

    def _close_line(self):
        if self._open_line:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._open_line = False

    def __call__(self, text, level=1):
        if self.on and self.verbosity >= level:
            self._close_line()
            print(text, flush=True)

    def error(self, text):
        """One line on stderr (rank 0)."""
        if self.on:
            self._close_line()
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def progress(self, epoch, step, steps, s, first=1):
        """After step ``step`` of ``steps`` (``first``: the first this run takes)."""
        if not self.on or self.verbosity < 1:
            return
        now = time.perf_counter()
        if step <= first or self._epoch_start is None:
            self._epoch_start, self._first = now, step
        done = step - self._first
        rate = done / (now - self._epoch_start) if done > 0 and now > self._epoch_start else 0.0
        eta = f"  ETA {_duration((steps - step) / rate)}" if rate > 0 else ""
        line = (f"epoch {epoch + 1} [{'#' * int(20 * step / steps):<20}] {step}/{steps}  "
                f"{rate:.1f} it/s{eta}  loss {s['loss']:.4f}  "
                f"acc {100 * s['correct'] / max(s['size'], 1):5.1f}%  "
                f"mgrit {s['fwd_iters']}/{s['bwd_iters']}")
        if not math.isnan(s.get("grad_error", math.nan)):  # the controller measured
            line += f"  grad err {s['grad_error']:.2g}"
        if self.verbosity >= 2:
            self._close_line()
            sys.stderr.write(line + "\n")
        elif self.tty:
            sys.stderr.write("\r" + line)
            self._open_line = step < steps
            if step == steps:
                sys.stderr.write("\r" + " " * len(line) + "\r")
        elif now - self._last_plain >= self.PLAIN_EVERY and step < steps:
            if self._last_plain:
                sys.stderr.write(line + "\n")
            self._last_plain = now
        sys.stderr.flush()


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class _Version(argparse.Action):
    """--version: one line, ``layerpar <version>``, printed by the first rank
    alone when a launcher started several (told by the launcher's
    environment: MPI is not started for it)."""

    RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from layerpar import __version__
        rank = next((os.environ[v] for v in self.RANK_VARIABLES if v in os.environ), "0")
        if rank.strip() in ("", "0"):
            print(f"layerpar {__version__}", flush=True)
        parser.exit()


def _parser():
    p = argparse.ArgumentParser(prog="layerpar", description="Layer-parallel training of "
                                "deep residual networks with MGRIT over MPI.")
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a network")
    t.add_argument("--config", help="TOML configuration file (default: built-in peaks)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a configuration value (repeatable)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in the run folder from its newest valid checkpoint "
                   "(checkpoint.prev.h5 when checkpoint.h5 is damaged), with the run's own "
                   "config.toml; --config/--set may change optim, mgrit and run keys")
    t.add_argument("--resume-from", metavar="CHECKPOINT",
                   help="continue from this checkpoint, with its configuration")
    t.add_argument("--run-dir", help="output folder (run.dir; default: a new runs/<name>-<k>)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in the run folder")
    e = sub.add_parser("eval", help="evaluate a checkpoint with the exact network")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--split", choices=("val", "test", "train"), default="val")
    e.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a stored configuration value (e.g. data.root=...)")
    i = sub.add_parser("info", help="versions, MPI library, ranks, threads, build options")
    pl = sub.add_parser("plan", help="predicted time per training step of each mode on P "
                        "ranks, and the fastest")
    pl.add_argument("--config", help="TOML configuration file (default: built-in peaks)")
    pl.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a configuration value (repeatable)")
    pl.add_argument("--ranks", type=int, required=True, help="ranks available")
    pl.add_argument("--calibration", metavar="FILE",
                    help="a stored calibration (JSON); default: calibrate now")
    pl.add_argument("--save-calibration", metavar="FILE",
                    help="store the calibration made now (JSON)")
    for s in (t, e, i):
        s.add_argument("--data-parallel", type=int, metavar="D",
                       help="D data-parallel groups of P/D layer-parallel ranks each "
                       "(parallel.data; D must divide the number of ranks P)")
    for s in (t, e):
        s.add_argument("-q", "--quiet", action="store_true", help="only the summary line")
        s.add_argument("-v", "--verbose", action="store_true", help="a line per step")
    return p


def _grid_text(size, data):
    layers = size // data if data >= 1 and size % data == 0 else None
    if layers is None:
        return f"grid: --data-parallel {data} does not divide the {_ranks(size)}"
    return (f"grid: {data} x {layers} (data-parallel groups x layer-parallel ranks per "
            "group)")


def _info(comm, out, data=None):
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
        _grid_text(comm.Get_size(), data or 1),
        f"braid_ext build: compiler {build['compiler']}, MPI headers {build['mpi_version']}",
    ]
    for line in lines:
        out(line)
    return 0


# Keys a resumed run may not change: they define the network, its data and
# the meaning of the stored optimiser state.
FIXED_ON_RESUME = {"model": None, "data": ("name", "seed", "val_fraction", "batch_size", "dtype"),
                   "optim": ("name",)}


def _checkpoint_config(comm, path):
    """Collective: ("where", the configuration stored in the checkpoint
    ``path``), which every rank verifies (its share of the parts); a missing
    or damaged checkpoint raises the same CheckpointError on every rank."""
    from layerpar import checkpoint as ckpt
    return path, ckpt.verify_checkpoint(path, comm=comm)["config"]


def _run_config(comm, run_dir):
    """Collective: ("where", the configuration of the run in ``run_dir``)
    from its config.toml (read on rank 0), or None when it has none; an
    unreadable file raises the same error on every rank."""
    from layerpar._collective import on_root
    from layerpar.config import load_file
    path = os.path.join(run_dir, "config.toml")
    return on_root(comm, lambda: (path, load_file(path)) if os.path.isfile(path) else None,
                   what=f"the run's configuration {path}")


def _resumed_config(args, stored):
    """The stored configuration with --config/--set applied, refusing a
    change to a key in FIXED_ON_RESUME."""
    import copy
    from layerpar.config import DEFAULTS, ConfigError, check, merge, resolve
    where, values = stored
    base = merge(copy.deepcopy(DEFAULTS), values, where)
    check(base)
    config = resolve(args.config, args.set, base=base)
    for section, keys in FIXED_ON_RESUME.items():
        for key in keys or DEFAULTS[section]:
            if config[section][key] != base[section][key]:
                raise ConfigError(f"{section}.{key} = {config[section][key]!r}: the run being "
                                  f"resumed has {base[section][key]!r} ({where}); it cannot "
                                  "change within a run: drop the setting, or start a new run")
    return config


def _train(args, comm, out, stop):
    from layerpar import rundir
    from layerpar.config import effective, resolve, to_toml
    from layerpar.training import make_trainer

    if args.resume and args.resume_from:
        raise ValueError("--resume and --resume-from: give one of them")
    resuming = bool(args.resume or args.resume_from)
    if args.data_parallel is not None:  # the run's shape: may change on --resume
        args.set = [*args.set, f"parallel.data={args.data_parallel}"]
    notes = []
    config = resolve(args.config, args.set, notes=notes)
    from layerpar.training.build import apply_timeout
    apply_timeout(config, comm)  # from here on every wait for other ranks is bounded
    asked = args.run_dir or config["run"]["dir"]
    if not asked and args.resume_from:
        asked = os.path.dirname(os.path.abspath(args.resume_from))
    name = os.path.splitext(os.path.basename(args.config))[0] if args.config \
        else config["data"]["name"]
    # the checkpoint is checked before the run folder is made or locked
    stored = _checkpoint_config(comm, args.resume_from) if args.resume_from else None
    run_dir = rundir.prepare(comm, asked, default=("runs", name), resume=resuming,
                             overwrite=args.overwrite)
    if args.resume:
        stored = _run_config(comm, run_dir)
    if stored is not None:
        config, notes = _resumed_config(args, stored), []
        apply_timeout(config, comm)
    config["run"]["dir"] = run_dir
    for note in notes:
        out(f"layerpar: {note}", 1)
    out("resolved configuration:\n" + to_toml(effective(config)).rstrip(), 1)
    from layerpar.config import check_grid
    check_grid(config, comm.Get_size())
    out(_grid_text(comm.Get_size(), config["parallel"]["data"]), 1)
    import torch
    torch.set_num_threads(_threads_per_rank(comm, config["model"]["width"]))
    trainer = make_trainer(config, comm, log=lambda s: out(s, 1), progress=out.progress,
                           should_stop=stop.requested)
    if args.resume_from:
        trainer.resume(args.resume_from)
    elif args.resume:
        if not trainer.resume():
            out(f"no checkpoint in {run_dir}: starting afresh", 1)
    trainer.write_config()
    from layerpar.training.report import EPOCH_HEADER
    out(EPOCH_HEADER, 1)
    summary = trainer.run()
    trainer.close()  # collective: solvers freed before MPI finalises
    if summary.get("stopped"):
        stop.agree(comm)  # the signal may have reached some ranks only
        out.error(f"layerpar: stopped by {stop.name} after step {trainer.step} "
                  f"({trainer.epoch} of {config['optim']['epochs']} epochs complete); "
                  f"checkpoint saved in {run_dir}; continue with: "
                  f"layerpar train --run-dir {run_dir} --resume")
        return stop.exit_status
    g, method = config["mgrit"], config["multilevel"]["method"]
    out(f"layerpar: {config['data']['name']} {config['model']['kind']} N={config['model']['nlayers']} "
        f"on {_ranks(comm.Get_size())} ({_grid_shape(comm, config)} grid), {g['mode']}"
        f"{'' if method == 'none' else ', ' + method}: epoch {summary['epoch']}, "
        f"validation accuracy {100 * summary['val_acc']:.2f}% (exact network), "
        f"loss {summary['val_loss']:.4f}, {summary['total_wall_time']:.1f}s; "
        f"results in {run_dir}", 0)
    return 0


def _ranks(n):
    return f"{n} rank" if n == 1 else f"{n} ranks"


def _grid_shape(comm, config):
    d = config["parallel"]["data"]
    return f"{d} x {comm.Get_size() // d}"


def _eval(args, comm, out, stop):
    from layerpar import checkpoint as ckpt
    import copy
    from layerpar.config import DEFAULTS, merge, parse_override, check
    from layerpar.training import make_trainer

    header = ckpt.load_checkpoint(args.checkpoint, comm, layer_indices=[])
    # keys added after the checkpoint was written take their defaults
    config = merge(copy.deepcopy(DEFAULTS), header["config"], args.checkpoint)
    for text in args.set:
        merge(config, parse_override(text), f"--set {text}")
    # the evaluation's own shape, not the training run's
    config["parallel"]["data"] = 1 if args.data_parallel is None else args.data_parallel
    check(config)
    config["run"]["plot"] = False
    import torch
    torch.set_num_threads(_threads_per_rank(comm, config["model"]["width"]))
    trainer = make_trainer(config, comm, metrics=False)
    trainer.resume(args.checkpoint)
    split = {"val": trainer.data.val, "test": trainer.data.test, "train": trainer.data.train}[args.split]
    if split is None:
        raise ValueError(f"--split test: data set {config['data']['name']} has no test split")
    loader = trainer.loader(split, batch_size=1000)
    t = time.perf_counter()
    loss, acc = trainer.evaluate(loader)
    trainer.close()  # collective: solvers freed before MPI finalises
    if stop.agree(comm):  # a signal on any rank: every rank exits with its status
        out.error(f"layerpar: stopped by {stop.name}")
        return stop.exit_status
    out(f"layerpar eval: {args.checkpoint} (epoch {trainer.epoch}) on {args.split} "
        f"({len(split)} samples, {_ranks(comm.Get_size())}, {_grid_shape(comm, config)} "
        f"grid): accuracy {100 * acc:.2f}% "
        f"(exact network), loss {loss:.4f}, {time.perf_counter() - t:.1f}s", 0)
    return 0


def _plan(args, comm, out, stop):
    from layerpar.plan import main as plan_main
    return plan_main(config_path=args.config, ranks=args.ranks, overrides=args.set,
                     calibration=args.calibration, save=args.save_calibration, comm=comm,
                     out=out)


# what to change when a layer's states turn NaN or Inf
NONFINITE_HINT = "lower optim.lr or model.T, or use data.dtype = \"float64\""


def _describe(e):
    """The one line for an error a user can cause."""
    from braid_ext import NonFiniteResidualError
    if isinstance(e, NonFiniteResidualError):  # the solve's agreement: on every rank
        if hasattr(e, "layer"):  # the engine's: the message names the layer
            return f"{e}: {NONFINITE_HINT}"
        return f"NaN or Inf at point {e.index} of an MGRIT solve: {NONFINITE_HINT}"
    if isinstance(e, FloatingPointError):  # the engine names the layer; training the key
        text = str(e)
        return text if "optim." in text else f"{text}: {NONFINITE_HINT}"
    if _out_of_memory(e):
        import re
        size = re.search(r"allocate (\d+) bytes", str(e))
        what = f" allocating {int(size.group(1)) / 2**30:.3g} GiB" if size else ""
        return (f"out of memory{what}: choose a smaller model.width, model.nlayers or "
                "data.batch_size, or more ranks")
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        where = f" ({e.filename})" if e.filename else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"disk full{where}: free space or choose another --run-dir"
        return f"{e.strerror or e}{where}"
    return str(e)


def _out_of_memory(e):
    text = str(e)
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
        "can't allocate memory" in text or "not enough memory" in text
        or "out of memory" in text.lower()))


def _relayed(e, rank):
    """Is ``e`` another rank's failure told to this rank (a collective that
    failed there: an MGRIT solve, an agreement, a pipelined pass)?"""
    from braid_ext import MGRITError
    from layerpar._collective import RemoteError  # the pipeline's failures are ones too
    if isinstance(e, MGRITError):  # also one of the failing callback's type there
        return 0 <= e.rank != rank
    return isinstance(e, RemoteError)


def _classify(e, rank):
    """(exit status, relayed) for an error the command reports in one line,
    or None for an internal error."""
    from braid_ext import MGRITError
    from layerpar.checkpoint import CheckpointError
    from layerpar.data import DatasetError
    relayed = _relayed(e, rank)
    if isinstance(e, FloatingPointError) or _out_of_memory(e):
        return 1, relayed
    if isinstance(e, MGRITError):  # a solve that failed here (MPI) or elsewhere
        return (1, relayed) if e.rank >= 0 else None
    if relayed:
        return 1, True
    if isinstance(e, RuntimeError):
        return None
    if isinstance(e, ValueError) and not isinstance(e, (CheckpointError, DatasetError)):
        return 2, False  # a setting to change
    if isinstance(e, (ValueError, OSError)):
        return 1, False  # data, checkpoint, disk
    return None


def _first_cause(exit_comm, line, code, relayed):
    """Collective over ``exit_comm`` (every rank failed): the line and exit
    status of the lowest rank whose error is its own, not another rank's
    relayed (else rank 0's), the same on every rank."""
    # every rank -> every rank: (relayed, line, status)
    told = exit_comm.allgather((relayed, line, code))
    _, line, code = next((t for t in told if not t[0]), told[0])
    return line, code


def _all_failed(exit_comm, grace=30.0):
    """Did every rank reach this point (every rank stopped with an error)?
    A barrier on a communicator used for nothing else, given ``grace``
    seconds (the run's timeout when it has one): ranks still at work
    elsewhere mean the error was this rank's alone."""
    req = exit_comm.Ibarrier()
    deadline = time.monotonic() + grace
    while not req.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def main(argv=None, *, comm=None):
    """The command with arguments ``argv`` (default: sys.argv[1:]) on the
    ranks of ``comm`` (default: MPI.COMM_WORLD); returns the exit status."""
    args = _parser().parse_args(argv)
    stop = StopRequest().install()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    exit_comm = comm.Dup()  # only for agreeing on how to stop
    try:
        code = _run(args, comm, exit_comm, stop)
    finally:
        stop.uninstall()
    exit_comm.Free()
    return code


def _run(args, comm, exit_comm, stop):
    verbosity = 0 if getattr(args, "quiet", False) else 2 if getattr(args, "verbose", False) else 1
    out = Printer(comm.Get_rank(), verbosity)

    from braid_ext import MGRITError, MGRITTimeoutError
    from layerpar.checkpoint import CheckpointError
    from layerpar.config import ConfigError
    from layerpar.data import DatasetError
    known = (ConfigError, DatasetError, CheckpointError, MGRITError, ValueError,
             FloatingPointError, OSError, MemoryError, RuntimeError)
    try:
        run = {"train": _train, "eval": _eval,
               "info": lambda a, c, o, s: _info(c, o, a.data_parallel),
               "plan": _plan}[args.command]
        return run(args, comm, out, stop)
    except MGRITTimeoutError as e:  # a rank stopped answering (in a solve or elsewhere)
        _end_silent(comm, e)
    except known as e:
        how = _classify(e, comm.Get_rank())
        if how is None:
            return _internal_error(comm)
        # 2: a setting to change; 1: anything else (data, checkpoint, disk, numbers)
        code, relayed = how
        if _all_failed(exit_comm, _grace(comm)):
            # the usual case: collective checks raise on every rank; rank 0
            # says what went wrong where it went wrong
            line, code = _first_cause(exit_comm, _describe(e), code, relayed)
            out.error(f"layerpar: error: {line}")
            return code
        sys.stderr.write(f"layerpar: error on rank {comm.Get_rank()}: {_describe(e)}\n")
        _abort(comm, code)
    except BaseException:
        return _internal_error(comm)


def _grace(comm):
    """Seconds to wait for the other ranks at an error: the timeout set on
    ``comm`` (run.timeout, $LAYERPAR_TIMEOUT), else 30."""
    from layerpar._watchdog import timeout_of
    try:
        return timeout_of(comm) or 30.0
    except ValueError:  # a bad $LAYERPAR_TIMEOUT: the error being reported
        return 30.0


# seconds the other ranks give the reporting rank to print before they end the job
REPORT_GRACE = 2.0
# seconds a rank waits between writing its last line and ending the job: a
# launcher tears the job down at the abort, and may drop output not yet forwarded
FORWARD_GRACE = 1.0


def _abort(comm, code):
    """End every rank with ``code``, after giving the launcher time to pass
    on what this rank has written."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(FORWARD_GRACE)
    comm.Abort(code)


def _end_silent(comm, e):
    """A rank did not answer within the timeout: the lowest rank that is
    not silent prints one line naming it and ends every rank; the others
    end the job themselves if it has not after REPORT_GRACE seconds."""
    silent = set(getattr(e, "silent", ()) or ([e.rank] if e.rank >= 0 else []))
    rank = comm.Get_rank()
    reporter = min([r for r in range(comm.Get_size()) if r not in silent] or [rank])
    if rank != reporter:
        time.sleep(REPORT_GRACE)
    sys.stderr.write(f"layerpar: error: {e}; ending every rank\n")
    _abort(comm, 1)


def _internal_error(comm):
    """Unexpected, and perhaps on this rank only: never leave the others waiting."""
    import traceback
    traceback.print_exc()
    sys.stderr.write(f"layerpar: internal error on rank {comm.Get_rank()}; aborting all ranks\n")
    _abort(comm, 1)


if __name__ == "__main__":
    sys.exit(main())
