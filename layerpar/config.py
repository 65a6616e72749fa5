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

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from layerpar.data import KNOWN_DATASETS
from layerpar.optim import LINE_SEARCHES
from layerpar.steps import ACTIVATIONS, BIASES

MODES = ("serial", "layer-parallel", "one-shot")
OPTIMIZERS = ("sgd", "adam", "lbfgs")
SCHEDULES = ("constant", "step", "cosine")

DEFAULTS = {
    "data": {
        "name": "peaks",       # peaks, digits, mnist, fashion-mnist, cifar10
        "root": "",            # directory of the data files (mnist, cifar10)
        "seed": 0,             # split and batch order
        "val_fraction": -1.0,  # < 0: the data set's default
        "batch_size": 100,
        "dtype": "float64",    # float32 or float64
    },
    "model": {
        "kind": "dense",       # dense or conv
        "width": 8,            # state width (dense) or channels (conv)
        "nlayers": 32,
        "T": 5.0,              # final time: h = T / nlayers
        "activation": "tanh",
        "kernel_size": 3,
        "bias": "vector",      # dense: vector (one per channel) or scalar (one per layer)
        "init_scale": 0.0,     # 0: PyTorch's initialisation; > 0: uniform in [0, init_scale)
        "seed": 0,             # weight initialisation
    },
    "mgrit": {
        "mode": "layer-parallel",  # serial, layer-parallel, one-shot
        "max_levels": 3,
        "cfactor": 4,
        "relax": "FCF",
        "cycle": "V",
        "fwd_iters": 0,        # 0: the mode's default (layer-parallel 2, one-shot 1)
        "bwd_iters": 0,        # 0: the mode's default (1)
        "fwd_tol": 0.0,
        "bwd_tol": 0.0,
        "monitor": True,       # raise iterations when the residual stalls
        "monitor_factor": 0.5, # a solve must cut its residual by this per iteration
        "monitor_patience": 3, # stalled updates in a row before acting
        "max_iters": 8,        # the monitor's ceiling; past it: serial propagation
    },
    "optim": {
        "name": "adam",        # sgd, adam, lbfgs
        "lr": 0.01,
        "momentum": 0.9,       # sgd
        "epochs": 40,
        "schedule": "cosine",  # constant, step, cosine
        "step_epochs": 10,     # step schedule: decay every this many epochs
        "decay": 0.5,          # step schedule: factor
        "tikhonov": 0.0,       # beta/2 * sum ||theta_n||^2
        "smoothness": 0.0,     # gamma/2 * sum ||(theta_n - theta_{n-1})/h||^2
        "lbfgs_history": 10,
        "line_search": "armijo",  # lbfgs: armijo or strong-wolfe
        "tikhonov_ends": False,   # the Tikhonov term also on the opening and closing layers
    },
    "run": {
        "dir": "runs/latest",
        "checkpoint_every": 0,  # steps between checkpoints; 0 = each epoch
        "log_every": 0,         # steps between progress lines; 0 = per epoch
        "plot": True,
    },
}


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names it."""


def _type_name(v):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[type(v)]


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

    need(d["name"] in KNOWN_DATASETS, "data.name",
         f"unknown data set; known: {', '.join(KNOWN_DATASETS)}")
    need(d["seed"] >= 0, "data.seed", "must be >= 0")
    need(d["val_fraction"] < 0 or 0 < d["val_fraction"] < 1, "data.val_fraction",
         "must be in (0, 1), or negative for the data set's default")
    need(d["batch_size"] >= 1, "data.batch_size", "must be >= 1")
    need(d["dtype"] in ("float32", "float64"), "data.dtype", "must be float32 or float64")
    need(m["kind"] in ("dense", "conv"), "model.kind", "must be dense or conv")
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
    need(g["max_levels"] >= 1, "mgrit.max_levels", "must be >= 1")
    need(g["cfactor"] >= 2, "mgrit.cfactor", "the coarsening factor must be >= 2")
    relax = g["relax"]
    need(relax.startswith("F") and relax[1:] == "CF" * ((len(relax) - 1) // 2)
         and len(relax) % 2 == 1, "mgrit.relax", "must be F, FCF, FCFCF, ...")
    need(g["cycle"] in ("V", "F"), "mgrit.cycle", "must be V or F")
    need(g["fwd_iters"] >= 0, "mgrit.fwd_iters", "must be >= 1 (or 0 for the mode's default)")
    need(g["bwd_iters"] >= 0, "mgrit.bwd_iters", "must be >= 1 (or 0 for the mode's default)")
    need(g["fwd_tol"] >= 0, "mgrit.fwd_tol", "must be >= 0")
    need(g["bwd_tol"] >= 0, "mgrit.bwd_tol", "must be >= 0")
    need(0 < g["monitor_factor"] < 1, "mgrit.monitor_factor", "must be in (0, 1)")
    need(g["monitor_patience"] >= 1, "mgrit.monitor_patience", "must be >= 1")
    need(g["max_iters"] >= max(g["fwd_iters"], g["bwd_iters"], 2), "mgrit.max_iters",
         "must be >= 2 and >= fwd_iters and bwd_iters")
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
    need(o["line_search"] in LINE_SEARCHES, "optim.line_search",
         f"choose one of {', '.join(LINE_SEARCHES)}")
    need(r["dir"] != "", "run.dir", "must name a directory")
    need(r["checkpoint_every"] >= 0, "run.checkpoint_every", "must be >= 0")
    need(r["log_every"] >= 0, "run.log_every", "must be >= 0")
    if d["name"] in ("mnist", "fashion-mnist", "cifar10"):
        need(d["root"] != "", "data.root", f"data set {d['name']} needs its directory")
    return config


def mode_iterations(config):
    """(fwd_iters, bwd_iters) after the mode's defaults."""
    g = config["mgrit"]
    fwd_default = 1 if g["mode"] == "one-shot" else 2
    return g["fwd_iters"] or fwd_default, g["bwd_iters"] or 1


def _get(config, dotted):
    section, key = dotted.split(".", 1)
    return config[section][key]


def resolve(path=None, overrides=()):
    """DEFAULTS <- TOML file at ``path`` <- ``section.key=value`` overrides."""
    config = copy.deepcopy(DEFAULTS)
    if path:
        try:
            with open(path, "rb") as fh:
                loaded = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path!r} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"configuration file {path!r} is not valid TOML: {e}") from None
        merge(config, loaded, path)
    for text in overrides:
        merge(config, parse_override(text), f"--set {text}")
    return check(config)


def to_toml(config):
    """The configuration as TOML text (values of the types above only)."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
        lines.append("")
    return "\n".join(lines)
