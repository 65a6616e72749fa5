"""The MGRIT options of a network's two solves, in the network's names.

``LayerParallel`` takes one set of keyword options for both solves, a few of
them per solve (``fwd_iters``/``bwd_iters``, ...) and a few backward-only
overrides (``bwd_max_levels``, ...).  Here they become the two dicts of
``braid_ext.Solver`` options, checked by the core's rules, with the core's
messages spoken in the network's names.
"""
from braid_ext import check_options

# the Solver's option names -> the network's names, per solve
_OPTION_NAMES = {"max_iter": ("fwd_iters", "bwd_iters"), "abs_tol": ("fwd_tol", "bwd_tol"),
                 "rel_tol": ("fwd_rel_tol", "bwd_rel_tol")}
_PER_SOLVE = ("max_levels", "cfactor", "relax", "cycle")


def _message(message, prefix):
    """A Solver's message about its option, in the network's names (the
    backward solve's options start with bwd_)."""
    name = message.split("=", 1)[0]
    if name in _OPTION_NAMES:
        return _OPTION_NAMES[name][1 if prefix else 0] + message[len(name):]
    if prefix and name in _PER_SOLVE:
        return prefix + message
    return message


def check(nlayers, size, fwd, bwd):
    """ValueError in the network's names when an option of either solve is
    bad for ``nlayers`` layers on ``size`` ranks.  Local: every rank checks
    alike."""
    for prefix, opts in (("", fwd), ("bwd_", bwd)):
        try:
            check_options(nlayers, size, **opts)
        except ValueError as e:
            raise ValueError(_message(str(e), prefix)) from None


def solve_options(nlayers, size, *, max_levels, cfactor, relax, cycle, min_coarse, skip,
                  fwd_iters, bwd_iters, fwd_tol, bwd_tol, fwd_rel_tol, bwd_rel_tol,
                  bwd_max_levels, bwd_cfactor, bwd_relax, bwd_cycle, warm_start, timeout):
    """(forward, backward) Solver options, checked."""
    fwd = dict(max_levels=max_levels, cfactor=cfactor, relax=relax, cycle=cycle,
               min_coarse=min_coarse, skip=skip, max_iter=fwd_iters, abs_tol=fwd_tol,
               rel_tol=fwd_rel_tol, warm_start=warm_start, timeout=timeout)
    bwd = dict(fwd, max_iter=bwd_iters, abs_tol=bwd_tol, rel_tol=bwd_rel_tol)
    for key, val in (("max_levels", bwd_max_levels), ("cfactor", bwd_cfactor),
                     ("relax", bwd_relax), ("cycle", bwd_cycle)):
        if val is not None:
            bwd[key] = val
    check(nlayers, size, fwd, bwd)
    return fwd, bwd


def reconfigured(fwd, bwd, *, max_levels=None, bwd_max_levels=None, fwd_iters=None,
                 bwd_iters=None, warm_start=None):
    """New (forward, backward) options with the given ones changed
    (unchecked)."""
    fwd, bwd = dict(fwd), dict(bwd)
    if max_levels is not None:
        fwd["max_levels"] = max_levels
        bwd["max_levels"] = max_levels if bwd_max_levels is None else bwd_max_levels
    elif bwd_max_levels is not None:
        bwd["max_levels"] = bwd_max_levels
    if fwd_iters is not None:
        fwd["max_iter"] = fwd_iters
    if bwd_iters is not None:
        bwd["max_iter"] = bwd_iters
    if warm_start is not None:
        fwd["warm_start"] = bwd["warm_start"] = bool(warm_start)
    return fwd, bwd
