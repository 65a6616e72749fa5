"""Optimiser and RNG state in a rank-independent form.

``optimizer.state_dict()`` numbers the parameters of one process; a
checkpoint that resumes on another number of ranks needs the state of each
parameter under its name in the layout of the weights (global layer index,
parameter name).  The RNG helpers give this process's global generators.
"""
from collections.abc import Mapping

import numpy as np
import torch

from .errors import CheckpointError

__all__ = ["rng_state", "set_rng_state", "optimizer_state", "restore_optimizer_state"]


def rng_state() -> dict:
    """This process's global torch and numpy RNG states, for ``state["rng"]``."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (e.g. a loaded ``state["rng"]``)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])


def _named_leaves(params, prefix=()):
    """Yield (key path, parameter) of a {"layers": {n: {name: p}}, "opening":
    {name: p}, "closing": {...}} layout (any nesting of dicts)."""
    for k, v in params.items():
        if isinstance(v, Mapping):
            yield from _named_leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _detached(obj):
    """A copy of the tree with tensors detached and on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _detached(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(v) for v in obj)
    return obj


def optimizer_state(optimizer: torch.optim.Optimizer, params: Mapping) -> dict:
    """This rank's optimiser state keyed by parameter names, for
    ``state["optimizer"]``.

    ``params`` names this rank's parameters in the layout of the state's
    weights, e.g. ``{"layers": {n: dict(layer.named_parameters())},
    "opening": {...}, "closing": {...}}``.  Returns the same layout with each
    parameter's optimiser state (``{"exp_avg": ..., "step": ...}``; ``{}``
    before the first step), plus ``"hyper"``: the parameter groups'
    hyper-parameters (a list, one dict per group, without ``"params"``).
    Independent of the number of ranks, unlike ``optimizer.state_dict()``,
    which numbers the parameters of one process.
    """
    out: dict = {}
    for path, p in _named_leaves(params):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = _detached(dict(optimizer.state.get(p, {})))
    if "hyper" in out:
        raise CheckpointError("params may not have a top-level entry 'hyper'")
    out["hyper"] = [{k: _detached(v) for k, v in g.items() if k != "params"}
                    for g in optimizer.param_groups]
    return out


def restore_optimizer_state(optimizer: torch.optim.Optimizer, params: Mapping,
                            saved: Mapping) -> None:
    """Inverse of :func:`optimizer_state`: set the state of each parameter in
    ``params`` from ``saved`` (a loaded ``state["optimizer"]``) and the
    groups' hyper-parameters.  Tensors follow the parameter's device, and
    when floating the dtype of the optimiser's state for that parameter
    (``optimizer.state_dtype(p)`` where the optimiser says, as
    layerpar.optim.Adam does for half-precision parameters; else the
    parameter's dtype); ``step`` counters keep theirs."""
    state_dtype = getattr(optimizer, "state_dtype", lambda p: p.dtype)
    hyper = saved.get("hyper")
    if hyper is not None:
        if len(hyper) != len(optimizer.param_groups):
            raise CheckpointError(f"optimiser has {len(optimizer.param_groups)} parameter groups, "
                                  f"the checkpoint {len(hyper)}")
        for group, h in zip(optimizer.param_groups, hyper):
            group.update({k: v for k, v in h.items() if k != "params"})
    for path, p in _named_leaves(params):
        node = saved
        for k in path:
            if not isinstance(node, Mapping) or k not in node:
                raise CheckpointError(f"checkpoint has no optimiser state for parameter "
                                      f"{'/'.join(map(str, path))}")
            node = node[k]
        st = {}
        for k, v in node.items():
            if isinstance(v, torch.Tensor):
                cast = v.is_floating_point() and k != "step"
                v = v.to(device=p.device, dtype=state_dtype(p) if cast else v.dtype)
            st[k] = v
        if st:
            optimizer.state[p] = st
        else:
            optimizer.state.pop(p, None)
