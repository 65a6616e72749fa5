"""Training configuration: defaults, TOML files, command-line overrides and
validation.

A configuration is a dict of sections.  ``resolve(path, overrides)`` starts
from ``DEFAULTS``, merges the TOML file and then ``section.key=value``
overrides, and checks every value: an unknown section or key, a value of the
wrong type or out of range raises ``ConfigError`` naming it.
"""
import copy
import json
import math
import re

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from braid_ext import OptionError, hierarchy
from braid_ext.options import check_option
from layerpar.data import DEFAULT_VAL_FRACTION, FILE_SUFFIXES, KNOWN_DATASETS
from layerpar.optim import CURVATURE_RULES, LINE_SEARCHES, STRONG_WOLFE_C2
from layerpar.engine.pipeline import SCHEDULES as PIPELINE_SCHEDULES
from layerpar.steps import ACTIVATIONS, BIASES
from layerpar.transformer import POOLS

MODES = ("serial", "layer-parallel", "one-shot")
OPTIMIZERS = ("sgd", "adam", "lbfgs", "lsr1")
SCHEDULES = ("constant", "step", "cosine")
MULTILEVEL_METHODS = ("none", "nested", "mgopt", "rmtr")
COARSE_STATES = ("restrict", "keep")
STARTS = ("fine", "nested", "full-multigrid")
BATCH_GROWTH = ("none", "schedule", "norm-test")
CONTROLLER_ACTIONS = ("auto", "iterations", "exact")
MODEL_KINDS = ("dense", "conv", "transformer")

DEFAULTS = {
    "data": {
        "name": "peaks",       # peaks, digits, recall, mnist, fashion-mnist, cifar10, files
        "root": "",            # directory of the data files (mnist, cifar10)
        "path": "",            # files: the .npz, .h5/.hdf5 or .csv file
        "val_path": "",        # files: a validation file ("": val_fraction of path)
        "inputs": "x",         # files: the inputs' array (npz, HDF5)
        "labels": "y",         # files: the labels' array, or CSV column
        "num_classes": 0,      # files: 0 = the largest label + 1
        "tokens": False,       # files: the inputs are (n, L) token ids 0..model.vocab-1
        "mask": "",            # files with tokens: the (n, L) padding mask's array
                               #   (nonzero: a token, 0: padding); "": no padding
        "normalize": True,     # per feature/channel, from the training split
        "seed": 0,             # split and batch order
        "num_samples": 0,      # peaks, recall: samples generated (0: the set's default)
        "val_fraction": -1.0,  # < 0: the data set's default
        "batch_size": 100,     # samples per batch (the global batch on a data x layer grid)
        "dtype": "float64",    # float32, float64 or bfloat16
    },
    "model": {
        "kind": "dense",       # dense, conv or transformer
        "width": 8,            # state width (dense) or channels (conv)
        "nlayers": 32,         # N, the number of residual layers
        "T": 5.0,              # final time: h = T / nlayers
        "activation": "tanh",  # of the built-in steps
        "kernel_size": 3,      # conv: odd, >= 1
        "bias": "vector",      # dense: vector (one per channel) or scalar (one per layer)
        "init_scale": 0.0,     # 0: PyTorch's initialisation; > 0: uniform in [0, init_scale)
        "seed": 0,             # weight initialisation
        "step": "",            # "package.module:Name" of the residual step ("": kind)
        "step_kwargs": {},     # its keyword arguments (a TOML table)
        "opening": "",         # "package.module:Name" of the opening ("": kind)
        "opening_kwargs": {},  # its keyword arguments (a TOML table)
        "closing": "",         # "package.module:Name" of the closing ("": kind)
        "closing_kwargs": {},  # its keyword arguments (a TOML table)
        "heads": 4,            # transformer: attention heads (must divide width)
        "mlp_ratio": 4.0,      # transformer: MLP hidden features / width
        "dropout": 0.0,        # transformer: on attention weights and MLP outputs
        "max_length": 0,       # transformer: positions (0: the data's sequence length)
        "vocab": 0,            # transformer: token ids (0: the built-in data set's)
        "pool": "mean",        # transformer closing: mean (over tokens), first or last
        "causal": False,       # transformer: attend only to earlier positions
    },
    "mgrit": {
        "mode": "layer-parallel",  # serial, layer-parallel, one-shot
        # 2 levels, cfactor 4, F-relaxation, skipped first down-cycle: the
        # fastest measured setting on one rank, 1.3-1.6x the exact mode's
        # time per step (benchmarks/bench_mgrit_settings.py --defaults; the
        # documentation's results, "Why these defaults")
        "max_levels": 2,       # MGRIT grid levels (1: exact propagation)
        "cfactor": 4,          # coarsening factor between levels (>= 2)
        "relax": "F",          # F, FCF, FCFCF, ... (F-relaxation and CF sweeps)
        "cycle": "V",          # V or F
        "skip": True,          # skip the first down-cycle's relaxation (cold solves)
        "fwd_iters": 0,        # 0: the mode's default (layer-parallel 2, one-shot 1)
        "bwd_iters": 0,        # 0: the mode's default (1)
        "fwd_tol": 0.0,        # forward solve: stop below this residual (0: run fwd_iters)
        "bwd_tol": 0.0,        # adjoint solve: stop below this residual (0: run bwd_iters)
        "monitor": True,       # raise iterations when the residual stalls
        "monitor_factor": 0.5, # a solve must cut its residual by this per iteration
        "monitor_patience": 3, # stalled updates in a row before acting
        "monitor_max_residual": 1.0,  # also stalled: a last residual above this times
                               # the norm of the solve's given state (0: off)
        "max_iters": 8,        # the monitor's ceiling; past it: serial propagation
        "controller": True,    # measure the gradient's error on a schedule (one
                               # exact pass at the same weights and batch) and
                               # raise the accuracy when it is too large
        "controller_every": 50,  # steps between measurements (the first at this step)
        "controller_tol": 0.2,   # the largest relative gradient error accepted
        "controller_patience": 1,  # measurements above it in a row before acting
        "controller_action": "auto",  # iterations: one more MGRIT iteration per
                               # solve (exact past max_iters); exact: exact
                               # propagation at once (for the rest of training);
                               # auto: iterations while the step's modelled time
                               # stays below the exact pass's, else exact
        "microbatches": 1,     # > 1: serial propagation is the exact pipeline
                               # (the batch split into micro-batches that flow
                               # rank to rank, forward and backward)
        "schedule": "gpipe",   # the pipeline's schedule: gpipe (all forwards, then
                               # all backwards) or 1f1b (one forward, one
                               # backward: at most P micro-batches held per rank)
    },
    "optim": {
        "name": "adam",        # sgd, adam, lbfgs, lsr1 (L-SR1 in a trust region)
        "lr": 0.01,            # learning rate (L-BFGS: the first trial step, default 1;
                               #   L-SR1: the initial trust radius, default 1)
        "momentum": 0.9,       # sgd
        "epochs": 40,          # L-BFGS, L-SR1: iterations on the whole training set
        "schedule": "cosine",  # constant, step, cosine
        "step_epochs": 10,     # step schedule: decay every this many epochs
        "decay": 0.5,          # step schedule: factor
        "tikhonov": 0.0,       # beta/2 * sum ||theta_n||^2
        "smoothness": 0.0,     # gamma/2 * sum ||(theta_n - theta_{n-1})/h||^2
        "lbfgs_history": 10,   # lbfgs, lsr1: pairs of updates kept
        "line_search": "armijo",  # lbfgs: armijo or strong-wolfe
        "lbfgs_curvature": "skip",  # lbfgs: a pair with little or negative curvature is
                                  #   skipped or damped (Powell)
        "lbfgs_c1": 1e-4,      # lbfgs: the sufficient-decrease (Armijo) constant
        "tikhonov_ends": False,   # the Tikhonov term also on the opening and closing layers
        "master_weights": True,   # sgd, adam: bfloat16 weights stepped through float32
                                  #   copies (no effect on float32/float64 weights)
    },
    "multilevel": {
        "method": "none",       # none, nested (nested iteration), mgopt (MG/OPT V-cycles),
                                #   rmtr (V-cycles with trust-region corrections)
        "levels": 2,            # depths model.nlayers / factor^l, l = 0..levels-1
        "factor": 2,            # depth ratio r between neighbouring levels
        "prolong": "constant",  # constant or linear in layer-time
        "restrict": "injection",  # injection or full-weighting (MG/OPT, RMTR weights)
        "pre_steps": 1,         # MG/OPT, RMTR: optimiser steps on a level before its coarse
                                #   correction
        "post_steps": 1,        # MG/OPT, RMTR: optimiser steps after it
        "coarse_steps": 2,      # MG/OPT, RMTR: optimiser steps on the coarsest level
        "epochs_per_level": [],  # nested: epochs at each depth (one value, or one per
                                 #   depth, coarsest first); [] = optim.epochs at each
        "target_accuracy": 0.0,  # nested: leave a depth at this validation accuracy; 0 = off
        "line_search_steps": 4,  # MG/OPT: step lengths 1, 1/2, ... tried on the correction
        "reuse": False,         # reuse an evaluation at unchanged weights and batch (where
                                #   exact); MG/OPT: the line search's first trial then
                                #   also gives the gradient for the step after it
        "radius": 1.0,          # RMTR: the initial trust radius of the coarse correction
                                #   (the norm of its step in the finest level's weights)
        "accept_ratio": 0.1,    # RMTR: a correction is accepted when its actual decrease
                                #   is at least this fraction of the coarse model's
        "coarse_state": "restrict",  # RMTR: the coarse levels' optimiser state, restricted
                                #   from the finer level in every cycle, or keep their own
        "start": "fine",        # MG/OPT, RMTR: cycles from the start (fine); nested
                                #   iteration to the finest depth, then cycles (nested);
                                #   cycles from nested iteration's second depth on
                                #   (full-multigrid); epochs_per_level and target_accuracy
                                #   as for nested
        "cycle_batches": 1,     # RMTR: loader batches in the batch of one cycle (at first)
        "batch_growth": "none",  # RMTR: none, schedule (double cycle_batches every
                                #   growth_epochs) or norm-test (double when the gradient's
                                #   noise exceeds norm_test times the gradient)
        "max_cycle_batches": 0,  # RMTR: the most loader batches in a cycle (0: an epoch's)
        "growth_epochs": 1,     # RMTR, batch_growth = schedule: epochs between doublings
        "norm_test": 0.5,       # RMTR, batch_growth = norm-test: theta of the test
    },
    "parallel": {
        "data": 1,              # data-parallel groups D: the P ranks form D groups of
                                # P/D layer-parallel ranks (D must divide P)
    },
    "run": {
        "dir": "",              # "": a new folder runs/<config name>-<k>
        "checkpoint_every": 0,  # steps between checkpoints; 0 = each epoch; -1 = only the last
        "log_every": 0,         # steps between progress lines; 0 = per epoch
        "plot": True,          # curves.png in the run folder, titled with the run
        "tensorboard": False,  # TensorBoard event files in <run dir>/tensorboard (needs
                               #   the tensorboard package; without it, one line says so)
        "timeout": 0.0,         # seconds a rank may wait for the others before the job
                                # ends naming the silent rank; 0: $LAYERPAR_TIMEOUT, else none
    },
}


# Defaults that differ by optimiser, used where the configuration does not
# set the key: L-BFGS takes unit trial steps with a line search, and a
# decaying schedule would only shorten them; L-SR1's radius starts at 1 and
# then follows its ratio test.
OPTIMIZER_DEFAULTS = {"lbfgs": {"lr": 1.0, "schedule": "constant"},
                      "lsr1": {"lr": 1.0, "schedule": "constant"}}
# the optimisers that evaluate the loss through a closure, on the full batch
FULL_BATCH_OPTIMIZERS = ("lbfgs", "lsr1")
GENERATED_DATASETS = ("peaks", "digits", "recall")  # need no files: data.root does not apply
# the MGRIT solves' min_coarse: LayerParallel's default, which the command uses
MIN_COARSE = 2
# mgrit keys that are Solver options of the same name: braid_ext checks them
SOLVER_KEYS = ("max_levels", "cfactor", "relax", "cycle")

# Keys that apply only in some settings: (section, key) -> (the key that
# decides, the values of it where the key applies).  Such a key set to
# anything but its default where it does not apply is refused, so that a
# configuration written out with every default still loads.
_PIPELINE = ("mgrit.mode", ("serial",))
_MULTILEVEL = ("multilevel.method", ("nested", "mgopt", "rmtr"))
_REUSE = ("multilevel.method", ("nested", "mgopt"))
_NESTED = ("multilevel.method", ("nested",))
_CYCLES = ("multilevel.method", ("mgopt", "rmtr"))
_MGOPT = ("multilevel.method", ("mgopt",))
_RMTR = ("multilevel.method", ("rmtr",))
_CONTROLLER = ("mgrit.controller", (True,))
_TRANSFORMER = ("model.kind", ("transformer",))
_FILES = ("data.name", ("files",))
APPLIES = {
    **{("mgrit", k): _CONTROLLER for k in ("controller_every", "controller_tol",
                                           "controller_patience", "controller_action")},
    ("mgrit", "microbatches"): _PIPELINE,
    ("mgrit", "schedule"): _PIPELINE,
    **{("multilevel", k): _MULTILEVEL for k in ("levels", "factor", "prolong")},
    ("multilevel", "reuse"): _REUSE,
    **{("multilevel", k): _CYCLES for k in ("restrict", "pre_steps", "post_steps",
                                            "coarse_steps", "start")},
    ("multilevel", "line_search_steps"): _MGOPT,
    **{("multilevel", k): _RMTR for k in ("radius", "accept_ratio", "coarse_state",
                                          "cycle_batches", "batch_growth", "max_cycle_batches",
                                          "growth_epochs", "norm_test")},
    **{("model", k): _TRANSFORMER for k in ("heads", "mlp_ratio", "dropout", "max_length",
                                            "vocab", "pool", "causal")},
    **{("data", k): _FILES for k in ("tokens", "mask")},
    ("data", "num_samples"): ("data.name", ("peaks", "recall")),
}
# nested iteration's keys: for multilevel.method = "nested", and for the cycling
# methods with multilevel.start = "nested" (full multigrid)
NESTED_KEYS = ("epochs_per_level", "target_accuracy")


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names it."""


def _type_name(v):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            dict: "a table (e.g. {width = 8, p = 0.1})", list: "a list of integers"}[type(v)]


def _coerce(section, key, value, default):
    where = f"{section}.{key}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list):
        items = value if isinstance(value, list) else [value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return list(items)
        raise ConfigError(f"{where} = {value!r}: expected an integer or a list of integers")
    elif isinstance(default, dict):
        if isinstance(value, str):  # an inline table given as text
            try:
                value = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                pass
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{where} = {value!r}: expected {_type_name(default)}")


def merge(config, updates, origin):
    """Merge {section: {key: value}} into config, checking names and types."""
    for section, values in updates.items():
        if section not in DEFAULTS:
            raise ConfigError(f"unknown section [{section}] in {origin}; "
                              f"known: {', '.join(DEFAULTS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] in {origin} must be a table of key = value")
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                raise ConfigError(f"unknown key {section}.{key} in {origin}; known: "
                                  f"{', '.join(DEFAULTS[section])}")
            config[section][key] = _coerce(section, key, value, DEFAULTS[section][key])
    return config


def parse_override(text):
    """'section.key=value' -> {section: {key: value}} (value as TOML if it
    parses, else the string)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. optim.lr=0.05")
    name, raw = text.split("=", 1)
    section, key = name.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return {section: {key: value}}


def check(config):
    """Range and choice checks; raises ConfigError naming the value."""
    d, m, g, o, r = (config[s] for s in ("data", "model", "mgrit", "optim", "run"))

    def need(cond, where, what):
        if not cond:
            raise ConfigError(f"{where} = {_get(config, where)!r}: {what}")

    _check_finite(config)
    need(d["name"] in KNOWN_DATASETS + ("files",), "data.name",
         f"unknown data set; known: {', '.join(KNOWN_DATASETS)}, files")
    need(d["seed"] >= 0, "data.seed", "must be >= 0")
    need(d["num_samples"] == 0 or d["num_samples"] >= 2, "data.num_samples",
         "must be >= 2 (0: the data set's default)")
    need(d["val_fraction"] < 0 or 0 < d["val_fraction"] < 1, "data.val_fraction",
         "must be in (0, 1), or negative for the data set's default")
    need(d["batch_size"] >= 1, "data.batch_size", "must be >= 1")
    need(d["dtype"] in ("float32", "float64", "bfloat16"), "data.dtype",
         "must be float32, float64 or bfloat16")
    need(m["kind"] in MODEL_KINDS, "model.kind", f"choose one of {', '.join(MODEL_KINDS)}")
    for role in ("step", "opening", "closing"):
        spec = m[role].strip()
        need(spec == "" or (spec.count(":") == 1 and all(spec.split(":"))), f"model.{role}",
             "expected 'package.module:Name' (or empty for the built-in kind)")
    need(m["width"] >= 1, "model.width", "must be >= 1")
    need(m["nlayers"] >= 1, "model.nlayers", "must be >= 1")
    need(math.isfinite(m["T"]) and m["T"] > 0, "model.T", "must be > 0")
    need(m["activation"] in ACTIVATIONS, "model.activation",
         f"choose one of {', '.join(ACTIVATIONS)}")
    need(m["kernel_size"] >= 1 and m["kernel_size"] % 2 == 1, "model.kernel_size",
         "must be odd and >= 1")
    need(m["seed"] >= 0, "model.seed", "must be >= 0")
    need(m["bias"] in BIASES, "model.bias", f"choose one of {', '.join(BIASES)}")
    need(m["bias"] == "vector" or m["kind"] == "dense", "model.bias",
         "a scalar bias is for model.kind = 'dense' only")
    need(math.isfinite(m["init_scale"]) and m["init_scale"] >= 0, "model.init_scale",
         "must be >= 0 (0: PyTorch's initialisation)")
    need(g["mode"] in MODES, "mgrit.mode", f"choose one of {', '.join(MODES)}")
    for key in SOLVER_KEYS:  # the solver's own checks and grammar
        try:
            check_option(key, g[key])
        except OptionError as e:
            raise ConfigError(f"mgrit.{key} = {g[key]!r}: {e.reason}") from None
    need(g["fwd_iters"] >= 0, "mgrit.fwd_iters", "must be >= 1 (or 0 for the mode's default)")
    need(g["bwd_iters"] >= 0, "mgrit.bwd_iters", "must be >= 1 (or 0 for the mode's default)")
    need(g["fwd_tol"] >= 0, "mgrit.fwd_tol", "must be >= 0")
    need(g["bwd_tol"] >= 0, "mgrit.bwd_tol", "must be >= 0")
    need(0 < g["monitor_factor"] < 1, "mgrit.monitor_factor", "must be in (0, 1)")
    need(g["monitor_patience"] >= 1, "mgrit.monitor_patience", "must be >= 1")
    need(math.isfinite(g["monitor_max_residual"]) and g["monitor_max_residual"] >= 0,
         "mgrit.monitor_max_residual", "must be a finite number >= 0 (0: off)")
    need(g["max_iters"] >= max(g["fwd_iters"], g["bwd_iters"], 2), "mgrit.max_iters",
         "must be >= 2 and >= fwd_iters and bwd_iters")
    need(g["controller_every"] >= 1, "mgrit.controller_every",
         "the steps between measurements must be >= 1")
    need(g["controller_tol"] > 0, "mgrit.controller_tol",
         "the largest relative gradient error accepted must be > 0")
    need(g["controller_patience"] >= 1, "mgrit.controller_patience", "must be >= 1")
    need(g["controller_action"] in CONTROLLER_ACTIONS, "mgrit.controller_action",
         f"choose one of {', '.join(CONTROLLER_ACTIONS)}")
    need(g["microbatches"] >= 1, "mgrit.microbatches", "the number of micro-batches must be >= 1")
    need(g["schedule"] in PIPELINE_SCHEDULES, "mgrit.schedule",
         f"choose one of {', '.join(PIPELINE_SCHEDULES)}")
    need(o["name"] in OPTIMIZERS, "optim.name", f"choose one of {', '.join(OPTIMIZERS)}")
    need(math.isfinite(o["lr"]) and o["lr"] > 0, "optim.lr", "the learning rate must be > 0")
    need(0 <= o["momentum"] < 1, "optim.momentum", "must be in [0, 1)")
    need(o["epochs"] >= 1, "optim.epochs", "must be >= 1")
    need(o["schedule"] in SCHEDULES, "optim.schedule", f"choose one of {', '.join(SCHEDULES)}")
    need(o["step_epochs"] >= 1, "optim.step_epochs", "must be >= 1")
    need(0 < o["decay"] <= 1, "optim.decay", "must be in (0, 1]")
    need(o["tikhonov"] >= 0, "optim.tikhonov", "must be >= 0")
    need(o["smoothness"] >= 0, "optim.smoothness", "must be >= 0")
    need(o["lbfgs_history"] >= 1, "optim.lbfgs_history", "must be >= 1")
    need(o["name"] != "lsr1" or o["schedule"] == "constant", "optim.schedule",
         "lsr1's trust radius follows its ratio test: only \"constant\" applies")
    need(r["checkpoint_every"] >= -1, "run.checkpoint_every",
         "must be >= 0 (0: each epoch), or -1 for only the last checkpoint")
    need(o["line_search"] in LINE_SEARCHES, "optim.line_search",
         f"choose one of {', '.join(LINE_SEARCHES)}")
    need(o["lbfgs_curvature"] in CURVATURE_RULES, "optim.lbfgs_curvature",
         f"choose one of {', '.join(CURVATURE_RULES)}")
    need(math.isfinite(o["lbfgs_c1"]) and 0 < o["lbfgs_c1"] < 1, "optim.lbfgs_c1",
         "the Armijo constant must be in (0, 1)")
    need(o["line_search"] != "strong-wolfe" or o["lbfgs_c1"] < STRONG_WOLFE_C2, "optim.lbfgs_c1",
         f"the strong Wolfe search needs it below its curvature constant {STRONG_WOLFE_C2}")
    need(r["log_every"] >= 0, "run.log_every", "must be >= 0")
    need(math.isfinite(r["timeout"]) and r["timeout"] >= 0, "run.timeout",
         "must be a number of seconds >= 0 (0: $LAYERPAR_TIMEOUT, else no limit)")
    if d["name"] in ("mnist", "fashion-mnist", "cifar10"):
        need(d["root"] != "", "data.root", f"data set {d['name']} needs its directory")
    _check_multilevel(config, need)
    _check_parallel(config, need)
    _check_applies(config)
    _check_mgrit_fits(config, need)
    if d["name"] == "files":
        need(d["path"] != "", "data.path", "data set 'files' needs the file to read")
        for key in ("path", "val_path"):
            need(d[key] == "" or d[key].lower().endswith(FILE_SUFFIXES), f"data.{key}",
                 f"the file type is told by its suffix: {', '.join(FILE_SUFFIXES)}")
        need(d["labels"] != "", "data.labels", "must name the labels' array or column")
        need(d["num_classes"] >= 0, "data.num_classes", "must be >= 0 (0: the largest label + 1)")
    if m["kind"] == "transformer":
        _check_transformer(config, need)
    elif d["name"] == "recall":
        need(m["opening"] != "", "model.kind",
             "the recall set's inputs are token ids: use model.kind = \"transformer\" or "
             "give model.opening")
    need(d["mask"] == "" or d["tokens"], "data.mask", "a padding mask is for token inputs: "
         "set data.tokens = true")
    if d["name"] in GENERATED_DATASETS:
        need(d["root"] == "", "data.root",
             f"data set {d['name']} is built in and reads no files: remove data.root")
    return config


def _check_transformer(config, need):
    # the transformer kind's keys (layerpar.transformer)
    d, m = config["data"], config["model"]
    need(m["heads"] >= 1 and m["width"] % m["heads"] == 0, "model.heads",
         f"must divide model.width = {m['width']} (each head takes width / heads features)")
    need(m["mlp_ratio"] > 0 and m["mlp_ratio"] * m["width"] >= 1, "model.mlp_ratio",
         "must be > 0 (the MLP's hidden features / width)")
    need(0 <= m["dropout"] < 1, "model.dropout", "must be in [0, 1)")
    need(m["max_length"] >= 0, "model.max_length", "must be >= 0 (0: the data's length)")
    need(m["vocab"] >= 0, "model.vocab", "must be >= 0 (0: the built-in data set's)")
    need(m["pool"] in POOLS, "model.pool", f"choose one of {', '.join(POOLS)}")
    tokens = d["name"] == "recall" or (d["name"] == "files" and d["tokens"])
    need(tokens or m["opening"] != "", "model.kind",
         f"the transformer needs token inputs, and data set {d['name']!r} has none: use "
         "data.name = \"recall\", or \"files\" with data.tokens = true, or give model.opening")
    need(m["vocab"] > 0 or d["name"] != "files" or m["opening"] != "", "model.vocab",
         "token files need the number of token ids (the largest id + 1)")


def _check_multilevel(config, need):
    # a configuration written before the section existed: single-level training
    ml = config.setdefault("multilevel", copy.deepcopy(DEFAULTS["multilevel"]))
    m = config["model"]
    need(ml["method"] in MULTILEVEL_METHODS, "multilevel.method",
         f"choose one of {', '.join(MULTILEVEL_METHODS)}")
    need(ml["levels"] >= 1, "multilevel.levels", "must be >= 1")
    need(ml["factor"] >= 2, "multilevel.factor", "the depth ratio must be >= 2")
    need(ml["prolong"] in ("constant", "linear"), "multilevel.prolong",
         "must be constant or linear")
    need(ml["restrict"] in ("injection", "full-weighting"), "multilevel.restrict",
         "must be injection or full-weighting")
    need(ml["pre_steps"] >= 0, "multilevel.pre_steps", "must be >= 0")
    need(ml["post_steps"] >= 0, "multilevel.post_steps", "must be >= 0")
    need(ml["coarse_steps"] >= 0, "multilevel.coarse_steps", "must be >= 0")
    need(ml["line_search_steps"] >= 1, "multilevel.line_search_steps", "must be >= 1")
    need(ml["radius"] > 0, "multilevel.radius", "the initial trust radius must be > 0")
    need(0 < ml["accept_ratio"] < 1, "multilevel.accept_ratio", "must be in (0, 1)")
    need(ml["coarse_state"] in COARSE_STATES, "multilevel.coarse_state",
         f"choose one of {', '.join(COARSE_STATES)}")
    need(ml["start"] in STARTS, "multilevel.start", f"choose one of {', '.join(STARTS)}")
    need(ml["cycle_batches"] >= 1, "multilevel.cycle_batches", "must be >= 1")
    need(ml["batch_growth"] in BATCH_GROWTH, "multilevel.batch_growth",
         f"choose one of {', '.join(BATCH_GROWTH)}")
    need(ml["max_cycle_batches"] == 0 or ml["max_cycle_batches"] >= ml["cycle_batches"],
         "multilevel.max_cycle_batches", "must be 0 (an epoch's batches) or >= cycle_batches")
    need(ml["growth_epochs"] >= 1, "multilevel.growth_epochs", "must be >= 1")
    need(ml["norm_test"] > 0, "multilevel.norm_test", "must be > 0")
    grouped = ml["cycle_batches"] > 1 or ml["batch_growth"] != "none"
    groups = config.get("parallel", {}).get("data", 1)
    need(not grouped or config["data"]["batch_size"] % groups == 0, "data.batch_size",
         f"a cycle of several batches (multilevel.cycle_batches, batch_growth) on "
         f"parallel.data = {groups} groups needs a batch size that the groups divide")
    need(0.0 <= ml["target_accuracy"] <= 1.0, "multilevel.target_accuracy",
         "must be in [0, 1] (0 = off)")
    e = ml["epochs_per_level"]
    need(len(e) in (0, 1, ml["levels"]), "multilevel.epochs_per_level",
         f"give one value or one per level ({ml['levels']})")
    need(all(v >= 1 for v in e), "multilevel.epochs_per_level", "epochs must be >= 1")
    if ml["method"] != "none":
        n, r, levels = m["nlayers"], ml["factor"], ml["levels"]
        most = most_levels(n, r)
        power = f"{r}^{levels - 1}"
        if (levels - 1) * math.log10(r) < 6:
            power += f" = {r ** (levels - 1)}"
        need(levels <= most, "model.nlayers",
             f"multilevel.levels = {levels} with multilevel.factor = {r} needs a depth "
             f"divisible by {power}; {n} layers allow at most {most} level"
             f"{'s' * (most > 1)} with this factor")


def most_levels(nlayers, factor):
    """The most multilevel levels ``nlayers`` layers allow with depth ratio
    ``factor``: every depth nlayers / factor^l must be whole."""
    most = 1
    while nlayers % factor == 0:
        nlayers //= factor
        most += 1
    return most


def _check_finite(config):
    # every float key: inf and NaN are refused before any range check
    for section, values in DEFAULTS.items():
        for key, default in values.items():
            v = config.get(section, {}).get(key)
            if isinstance(default, float) and isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{section}.{key} = {v!r}: must be a finite number")


def _check_applies(config):
    # a key set where it does not apply (APPLIES, NESTED_KEYS)
    ml = config["multilevel"]
    nested = ml["method"] == "nested" or (ml["method"] in _CYCLES[1] and ml["start"] != "fine")
    for key in NESTED_KEYS:
        if ml[key] != DEFAULTS["multilevel"][key] and not nested:
            raise ConfigError(
                f"multilevel.{key} = {_toml_value(ml[key])}: does not apply with "
                f"multilevel.method = {json.dumps(ml['method'])}"
                + (f" and multilevel.start = {json.dumps(ml['start'])}"
                   if ml["method"] in _CYCLES[1] else "")
                + ": it is for nested iteration (multilevel.method = \"nested\", or "
                  "multilevel.start = \"nested\" or \"full-multigrid\" with mgopt or rmtr); "
                  "remove it (its default: "
                  f"{_toml_value(DEFAULTS['multilevel'][key])})")
    for (section, key), (decider, where) in APPLIES.items():
        value, default = config[section][key], DEFAULTS[section][key]
        here = _get(config, decider)
        if value != default and here not in where:
            choices = " or ".join(json.dumps(w) for w in where)
            raise ConfigError(f"{section}.{key} = {_toml_value(value)}: does not apply with "
                              f"{decider} = {json.dumps(here)}: it is for {decider} = "
                              f"{choices}; remove it (its default: {_toml_value(default)}) "
                              f"or change {decider}")


def _check_mgrit_fits(config, need):
    # values that cannot work with the network and the batch
    d, m, g = config["data"], config["model"], config["mgrit"]
    n = m["nlayers"]
    # a coarsening factor chosen (not the default, which a small network may
    # leave as one level: exact propagation) that the layers cannot coarsen
    if g["mode"] != "serial" and g["max_levels"] > 1 and \
            g["cfactor"] != DEFAULTS["mgrit"]["cfactor"]:
        levels = hierarchy(n, max_levels=g["max_levels"], cfactor=g["cfactor"],
                           min_coarse=MIN_COARSE)
        largest = n // MIN_COARSE
        fix = f"use cfactor <= {largest}" if largest >= 2 else "use more layers"
        need(len(levels) > 1, "mgrit.cfactor",
             f"with model.nlayers = {n} there is no coarse grid (it needs nlayers // cfactor "
             f">= {MIN_COARSE}), so MGRIT could not work; {fix}, or mgrit.mode = \"serial\"")
    groups = config["parallel"]["data"]
    rows = d["batch_size"] // groups  # the smallest share of a batch
    where = f"a batch (data.batch_size = {d['batch_size']})" if groups == 1 else \
        (f"a data-parallel group's share of a batch (data.batch_size = {d['batch_size']} "
         f"over parallel.data = {groups} groups)")
    need(g["microbatches"] <= max(rows, 1), "mgrit.microbatches",
         f"more micro-batches than the {rows} samples of {where}; at most {max(rows, 1)}")


def _check_parallel(config, need):
    # a configuration written before the section existed: one group
    p = config.setdefault("parallel", copy.deepcopy(DEFAULTS["parallel"]))
    need(p["data"] >= 1, "parallel.data", "the number of data-parallel groups must be >= 1")


def check_grid(config, size):
    """Refuse a number of data-parallel groups that does not divide the
    ``size`` ranks, or leaves a group fewer ranks than layers."""
    d, n = config["parallel"]["data"], config["model"]["nlayers"]
    if size % d:
        divisors = [k for k in range(1, size + 1) if size % k == 0]
        raise ConfigError(f"parallel.data = {d} (--data-parallel) does not divide the {size} "
                          f"ranks: the ranks form data x layer-parallel groups; choose one of "
                          f"{', '.join(map(str, divisors))}")
    if size // d > n:
        raise ConfigError(f"parallel.data = {d}: each data-parallel group has {size // d} "
                          f"ranks, more than the {n} layers (model.nlayers); use more "
                          "data-parallel groups or fewer ranks")


def check_ranks(config, size):
    """Refuse a multilevel hierarchy whose coarsest network has fewer layers
    than there are ranks (every rank must hold a layer at every level)."""
    ml, m = config["multilevel"], config["model"]
    if ml["method"] == "none":
        return
    coarsest = m["nlayers"] // ml["factor"] ** (ml["levels"] - 1)
    if coarsest < size:
        raise ConfigError(f"multilevel.levels = {ml['levels']}: the coarsest network has "
                          f"{coarsest} layers, fewer than the {size} ranks; use fewer levels, "
                          "a smaller multilevel.factor or fewer ranks")


def mode_iterations(config):
    """(fwd_iters, bwd_iters) after the mode's defaults."""
    g = config["mgrit"]
    fwd_default = 1 if g["mode"] == "one-shot" else 2
    return g["fwd_iters"] or fwd_default, g["bwd_iters"] or 1


def effective(config):
    """A copy of ``config`` with the values that stand for a default
    resolved: ``mgrit.fwd_iters``/``bwd_iters`` (0: the mode's) and
    ``data.val_fraction`` (negative: the data set's; unchanged where
    ``data.val_path`` names the validation file).  The configuration a run
    uses, as the command shows it."""
    out = copy.deepcopy(config)
    out["mgrit"]["fwd_iters"], out["mgrit"]["bwd_iters"] = mode_iterations(config)
    d = out["data"]
    if d["val_fraction"] < 0 and not (d["name"] == "files" and d["val_path"]):
        d["val_fraction"] = DEFAULT_VAL_FRACTION[d["name"]]
    return out


def _get(config, dotted):
    section, key = dotted.split(".", 1)
    return config[section][key]


def load_file(path):
    """The {section: {key: value}} of a TOML file; ConfigError if it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path!r} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"configuration file {path!r} is a directory; --config names a "
                          "TOML file") from None
    except PermissionError:
        raise ConfigError(f"configuration file {path!r} cannot be read (permission "
                          "denied)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"configuration file {path!r} is not valid TOML: {e}") from None


def resolve(path=None, overrides=(), *, base=None, notes=None):
    """``base`` (default DEFAULTS) <- TOML file at ``path`` <- ``section.key=value``
    overrides.  Keys of OPTIMIZER_DEFAULTS that neither the file nor the
    overrides set take the chosen optimiser's default (without ``base``);
    a sentence per such change is appended to ``notes`` (a list)."""
    config = copy.deepcopy(DEFAULTS if base is None else base)
    given = set()
    updates = [(load_file(path), path)] if path else []
    updates += [(parse_override(text), f"--set {text}") for text in overrides]
    for values, origin in updates:
        merge(config, values, origin)
        given |= {(s, k) for s, v in values.items() if isinstance(v, dict) for k in v}
    if base is None:
        for key, value in OPTIMIZER_DEFAULTS.get(config["optim"]["name"], {}).items():
            if ("optim", key) not in given and config["optim"][key] != value:
                config["optim"][key] = value
                if notes is not None:
                    notes.append(f"optim.{key} = {json.dumps(value)} "
                                 f"(the default for optim.name = \"{config['optim']['name']}\")")
    return check(config)


def _toml_string(text):
    """``text`` as a TOML basic string: quote, backslash and control
    characters escaped, every other character as it is (TOML has no escapes
    for the surrogate halves JSON writes for characters beyond U+FFFF)."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _toml_value(value):
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, dict):
        items = (f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', k) else _toml_string(k)} = "
                 f"{_toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def to_toml(config):
    """The configuration as TOML text (values of the types above only)."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
