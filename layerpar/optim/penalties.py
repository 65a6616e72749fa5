"""Penalties on the residual layers' weights: Tikhonov and smoothness in
layer-time.  The smoothness term couples neighbouring layers, so each rank
exchanges its first and last layer's parameters with its neighbours."""
import math
import weakref

import torch
from mpi4py import MPI

from layerpar._collective import agree
from layerpar._tags import tag
from layerpar._watchdog import sendrecv
from layerpar.optim._sums import allsum

_PENALTY_COMMS = weakref.WeakKeyDictionary()


def _penalty_comm(body):
    """A duplicate of the body's communicator for the penalty messages, made
    once per network (collective at the first call), so that they never meet
    the MGRIT solver's; a LayerParallel frees it in its close()."""
    if hasattr(body, "communicator"):
        return body.communicator("penalty")
    comm = _PENALTY_COMMS.get(body)
    if comm is None:
        comm = _PENALTY_COMMS[body] = body.comm.Dup()
    return comm


def _layer_params(body, n):
    return dict(body.layer(n).named_parameters())


def _structure_error(a, b, na, nb):
    if list(a) != list(b):
        return (f"layers {na} and {nb} have different parameters ({list(a)} and {list(b)}): "
                "the smoothness penalty needs the same parameters in every layer")
    for k in a:
        if a[k].shape != b[k].shape:
            return (f"parameter {k!r} has shape {tuple(a[k].shape)} in layer {na} and "
                    f"{tuple(b[k].shape)} in layer {nb}: the smoothness penalty needs the "
                    "same shapes in every layer")
    return None


def regularize(net, *, tikhonov=0.0, smoothness=0.0, ends=False, add_grad=True):
    """Collective: the penalty::

        tikhonov/2 * sum_n ||theta_n||^2
          + smoothness/2 * sum_{n>=1} ||(theta_n - theta_{n-1}) / h||^2

    over the residual layers n = 0..N-1 of a ``Network`` (or a
    ``LayerParallel``), h = T/N; the difference is taken between parameters
    of the same name in consecutive layers (every layer must have the same
    parameters).  ``ends=True`` adds the opening and closing layers'
    parameters to the Tikhonov term (a ``Network`` only).

    Returns the value, the same float on every rank.  With ``add_grad``
    (default) it also adds the penalty's gradient to each local parameter's
    ``.grad`` (creating it if None): call it after ``loss.backward()`` and
    add the value to the loss.  The smoothness term couples the last layer of
    one rank with the first of the next: each rank sends its first layer's
    parameters to its left neighbour and its last layer's to its right
    neighbour, and nothing else.
    """
    body = getattr(net, "body", net)
    if not all(hasattr(body, a) for a in ("layers", "layer_indices", "comm", "h")):
        raise TypeError(f"regularize needs a layerpar Network or LayerParallel, not "
                        f"{type(net).__name__}")
    for name, v in (("tikhonov", tikhonov), ("smoothness", smoothness)):
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and v >= 0):
            raise ValueError(f"{name}={v!r}: a penalty weight must be a finite number >= 0")
    if ends and body is net:
        raise TypeError("ends=True needs a Network (with opening and closing layers)")
    if tikhonov == 0 and smoothness == 0:
        return 0.0
    comm = _penalty_comm(body)
    beta, gamma, h = float(tikhonov), float(smoothness), body.h
    indices = body.layer_indices
    local = 0.0
    grads = {}  # id(parameter) -> (parameter, gradient of the penalty)

    def add(p, g):
        if id(p) in grads:
            grads[id(p)] = (p, grads[id(p)][1] + g)
        else:
            grads[id(p)] = (p, g)

    with torch.no_grad():
        if beta:
            groups = [body.layer(n) for n in indices]
            if ends:
                groups += [m for m in (net.opening, net.closing) if m is not None]
            for module in groups:
                for p in module.parameters():
                    local += 0.5 * beta * float((p * p).sum())
                    add(p, beta * p)
        if gamma:
            local += _smoothness(body, comm, gamma, h, add)
    value = float(allsum(comm, [local])[0])
    if add_grad:
        with torch.no_grad():
            for p, g in grads.values():
                if p.grad is None:
                    p.grad = g.detach().clone()
                else:
                    p.grad.add_(g)
    return value


def _smoothness(body, comm, gamma, h, add):
    """The local part of the smoothness penalty (terms n >= 1 of our layers)
    and its gradient for our layers (through ``add``)."""
    rank, size, N = comm.Get_rank(), comm.Get_size(), body.nlayers
    first, last = body.layer_indices[0], body.layer_indices[-1]
    left = rank - 1 if rank > 0 else MPI.PROC_NULL
    right = rank + 1 if rank < size - 1 else MPI.PROC_NULL
    mine = {n: _layer_params(body, n) for n in body.layer_indices}

    def packed(n):
        return {k: p.detach().clone() for k, p in mine[n].items()}

    # our last layer -> right neighbour (theta_{n-1} of its first layer n);
    # the left neighbour's last layer <- left (theta_{first-1} of ours)
    from_left = sendrecv(comm, packed(last), right, left, tag("penalty.from_left"),
                         "a layer from the left neighbour")
    # our first layer -> left neighbour (its last layer's right-hand term
    # needs theta_{n+1}); the right neighbour's first layer <- right
    from_right = sendrecv(comm, packed(first), left, right, tag("penalty.from_right"),
                          "a layer from the right neighbour")

    theta = dict(mine)
    if from_left is not None:
        theta[first - 1] = from_left
    if from_right is not None:
        theta[last + 1] = from_right
    msg = None
    for n in range(max(first - 1, 0), min(last + 1, N - 1)):
        if n in theta and n + 1 in theta:
            msg = msg or _structure_error(theta[n], theta[n + 1], n, n + 1)
    agree(comm, msg)

    local = 0.0
    for n in body.layer_indices:
        for k, p in mine[n].items():
            g = torch.zeros_like(p)
            if n >= 1:  # term n: gamma/2 ||(theta_n - theta_{n-1})/h||^2
                D = (p - theta[n - 1][k]) / h
                local += 0.5 * gamma * float((D * D).sum())
                g += gamma / h * D
            if n <= N - 2:  # term n+1 depends on theta_n too
                g -= gamma / h * ((theta[n + 1][k] - p) / h)
            add(p, g)
    return local
