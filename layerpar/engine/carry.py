"""The context of a batch, carried from the first rank to the ranks whose
layers take it.

A pass may come with a context: a dict ``{name: tensor}`` whose tensors
have the batch as their first dimension (a padding mask, positions:
anything constant across the layers of one pass), given on the first rank
with the input.  ``context_spec`` checks it there and describes it (names,
shapes, dtypes: plain values that travel with the state's shape, so every
rank knows the pass's context before any layer runs).  ``share`` then sends
it, once per pass, from the first rank to each rank that steps with a layer
taking it (``Stage.needs_context``; the last rank too when the closing
takes it); no other rank receives anything, and a pass without a context
sends nothing.  The context is detached: no gradient flows into it.
"""
from collections.abc import Mapping

import torch

from layerpar._tags import tag
from layerpar._watchdog import recv, wait

__all__ = ["context_spec", "share"]


def context_spec(context, batch):
    """``{name: (shape, dtype)}`` of ``context`` given with a batch of
    ``batch`` samples (None: no context).  A context that is not a dict of
    tensors, or an array whose first dimension is not the batch, raises
    naming the array."""
    if context is None:
        return None
    if not isinstance(context, Mapping):
        raise TypeError(f"context must be a dict {{name: tensor}}, not {type(context).__name__}")
    spec = {}
    for name in sorted(context, key=str):
        value = context[name]
        if not isinstance(name, str):
            raise TypeError(f"context: the names of its arrays must be strings, not {name!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"context[{name!r}] is a {type(value).__name__}, not a tensor")
        if value.dim() == 0 or value.shape[0] != batch:
            raise ValueError(f"context[{name!r}] has shape {tuple(value.shape)}: its first "
                             f"dimension must be the batch's {batch} samples")
        spec[name] = (tuple(value.shape), value.dtype)
    return spec


def share(comm, root, context, receivers, device):
    """Collective over ``root`` and the ranks of ``receivers``: the context
    (``root``'s, a checked dict of tensors) on ``device``, detached, on
    the receivers (``root`` among them or not); None elsewhere."""
    rank = comm.Get_rank()
    if rank == root:
        out = {k: v.detach().to(device) for k, v in context.items()} \
            if root in receivers else None
        payload = {k: v.detach().cpu() for k, v in context.items()}
        # root -> each rank that steps with a layer taking the context: the arrays
        requests = [(comm.isend(payload, dest=q, tag=tag("context.batch")), q)
                    for q in receivers if q != root]
        for req, q in requests:
            wait(comm, req, "the batch's context sent to a rank that uses it", q)
        return out
    if rank not in receivers:
        return None
    got = recv(comm, root, tag("context.batch"), "the batch's context from the first rank")
    return {k: v.to(device) for k, v in got.items()}
