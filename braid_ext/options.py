"""The vocabulary of the solver's options, defined once: their defaults, the
relaxation grammar ('F', 'FCF', 'FCFCF', ...: an F sweep, then CF sweeps)
and the check of every option, local (no communication), with a message
that names the option.

``Solver`` checks its options here, and layerpar's configuration, layout
and cost model use the same functions, so that a value the solver refuses is
refused everywhere for the same reason.  The grid hierarchy that options
give is the core's own computation, ``braid_ext.hierarchy`` (its levels are
``Level`` tuples, defined here).

Pure Python: imports nothing of braid_ext, torch or layerpar.
"""
import math
from collections import namedtuple

# MG_MAX_LEVELS of src/mgrit.h: the binding refuses to load if they differ
MAX_LEVELS = 32

# every Solver option and its default
DEFAULTS = dict(max_levels=2, cfactor=2, min_coarse=2, relax="FCF", cycle="V", skip=False,
                abs_tol=1e-10, rel_tol=0.0, max_iter=100, tnorm="l2", store="all",
                reverse=False, warm_start=True, step_cost=1.0, latency=0.0,
                final_sweep=False, timeout=None, wait="busy")
WAITS = ("busy", "sleep")
CYCLES = ("V", "F")
TNORMS = ("l2", "inf")
STORES = ("all", "C")
# options that take one value for all levels or a list per level (its last
# entry holds for the levels below)
PER_LEVEL = ("cfactor", "relax", "step_cost")

Level = namedtuple("Level", "n stride cfactor")
Level.__doc__ = """One grid level: points 0..n, point j is fine point j*stride;
cfactor is the coarsening factor to the next level (0 on the coarsest)."""


class OptionError(ValueError):
    """A bad option value.  ``option`` names it, ``value`` is what was given
    and ``reason`` says what it must be; the message is
    ``option=value: reason``."""

    def __init__(self, option, value, reason):
        super().__init__(f"{option}={value!r}: {reason}")
        self.option, self.value, self.reason = option, value, reason

    def __reduce__(self):  # pickled with its fields (it crosses ranks)
        return (type(self), (self.option, self.value, self.reason))


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _need(cond, option, value, reason):
    if not cond:
        raise OptionError(option, value, reason)


def relax_sweeps(relax, option="relax"):
    """The CF sweeps that follow the first F sweep of the relaxation
    ``relax``: 'F' -> 0, 'FCF' -> 1, 'FCFCF' -> 2, ...  OptionError naming
    ``option`` for anything else."""
    _need(isinstance(relax, str) and len(relax) % 2 == 1 and
          relax == "F" + "CF" * (len(relax) // 2), option, relax,
          "expected 'F', 'FCF', 'FCFCF', ... (F-relaxation followed by CF sweeps)")
    return len(relax) // 2


def _check_max_levels(v, option="max_levels"):
    _need(_is_int(v) and 1 <= v <= MAX_LEVELS, option, v,
          f"must be an integer in [1, {MAX_LEVELS}]")
    return v


def _check_cfactor(v, option="cfactor"):
    _need(_is_int(v) and v >= 2, option, v, "the coarsening factor must be an integer >= 2")
    return v


def _check_min_coarse(v, option="min_coarse"):
    _need(_is_int(v) and v >= 1, option, v, "must be an integer >= 1")
    return v


def _check_cycle(v, option="cycle"):
    _need(v in CYCLES, option, v, "must be 'V' or 'F'")
    return v


def _check_tolerance(v, option):
    _need(_is_number(v) and math.isfinite(v) and v >= 0, option, v,
          "must be a finite number >= 0")
    return v


def _check_max_iter(v, option="max_iter"):
    _need(_is_int(v) and v >= 1, option, v, "must be an integer >= 1")
    return v


def _check_flag(v, option):
    _need(isinstance(v, (bool, int)) and v in (0, 1), option, v, "must be True or False")
    return v


def _check_step_cost(v, option="step_cost"):
    _need(_is_number(v) and math.isfinite(v) and v >= 0, option, v,
          "must be a finite number >= 0")
    return v


def _check_timeout(v, option="timeout"):
    _need(v is None or (_is_number(v) and math.isfinite(v) and v >= 0), option, v,
          "must be None or a finite number of seconds >= 0")
    return v


# the check of one value of each option (of one level's, for PER_LEVEL)
_CHECKS = {
    "max_levels": _check_max_levels,
    "cfactor": _check_cfactor,
    "min_coarse": _check_min_coarse,
    "relax": relax_sweeps,
    "cycle": _check_cycle,
    "skip": _check_flag,
    "abs_tol": _check_tolerance,
    "rel_tol": _check_tolerance,
    "max_iter": _check_max_iter,
    "tnorm": lambda v, option: _need(v in TNORMS, option, v, "must be 'l2' or 'inf'"),
    "store": lambda v, option: _need(v in STORES, option, v, "must be 'all' or 'C'"),
    "reverse": _check_flag,
    "warm_start": _check_flag,
    "step_cost": _check_step_cost,
    "latency": _check_tolerance,
    "final_sweep": _check_flag,
    "timeout": _check_timeout,
    "wait": lambda v, option: _need(v in WAITS, option, v, "must be 'busy' or 'sleep'"),
}
assert set(_CHECKS) == set(DEFAULTS)


def per_level(option, value, *, name=None):
    """The per-level list of a PER_LEVEL option (one value: a list of one),
    every entry checked; ``name`` (default ``option``) is the name the
    message gives."""
    name = name or option
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise OptionError(name, value, "give a value or a non-empty list of per-level values")
    if len(values) > MAX_LEVELS:
        raise OptionError(name, value, f"at most {MAX_LEVELS} per-level values")
    for v in values:
        _CHECKS[option](v, name)
    return values


def check_option(option, value, *, name=None):
    """Check one Solver option alone (a PER_LEVEL option: one value or a
    list); OptionError naming ``name`` (default ``option``) if it is bad,
    KeyError for an option that does not exist."""
    if option not in _CHECKS:
        raise KeyError(option)
    if option in PER_LEVEL:
        per_level(option, value, name=name)
    else:
        _CHECKS[option](value, name or option)


def check_options(nsteps, nranks, *, t_start=0.0, t_stop=1.0, **options):
    """Check Solver options for ``nsteps`` steps on ``nranks`` ranks, as
    Solver does, without any communication: ValueError (an OptionError for
    an option) naming the first bad value, TypeError for an unknown option.
    Returns every option (defaults filled in), the PER_LEVEL ones as
    per-level lists, and ``nrelax``: the CF sweeps of each level's
    relaxation."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown Solver option(s) {', '.join(unknown)}; the options are "
                        f"{', '.join(DEFAULTS)}")
    _need(_is_int(nranks) and nranks >= 1, "nranks", nranks, "must be an integer >= 1")
    if not (_is_number(t_start) and _is_number(t_stop)):
        raise ValueError(f"t_start={t_start!r}, t_stop={t_stop!r}: must be numbers")
    _need(_is_int(nsteps) and nsteps >= 1, "nsteps", nsteps, "must be an integer >= 1")
    if nranks > nsteps:
        raise ValueError(f"nsteps={nsteps} is smaller than the number of ranks ({nranks}): "
                         "each rank must own at least one step; use fewer ranks or more steps")
    if not (math.isfinite(t_start) and math.isfinite(t_stop) and t_start != t_stop):
        raise ValueError(f"t_start={t_start}, t_stop={t_stop}: must be finite and different")
    out = dict(DEFAULTS, **options)
    for option, value in out.items():
        if option in PER_LEVEL:
            out[option] = per_level(option, value)
        else:
            _CHECKS[option](value, option)
    out["nrelax"] = [relax_sweeps(r) for r in out["relax"]]
    return out
