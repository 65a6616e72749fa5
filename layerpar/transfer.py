"""Weights, gradients and optimiser state moved between layer layouts.

A network of N residual layers, h = T/N, and one of r*N layers, h/r, with the
same final time T, are two discretisations of the same ODE in layer-time.
Layer n of the N-layer network sits at time n*h; layer k of the r*N-layer
network at time k*h/r.  This module moves per-layer data between them:

    prolong(local, src, dst, comm, kind=...)    N -> r*N layers
        "constant": fine layer k takes coarse layer k // r
        "linear":   fine layer k interpolates linearly in layer-time between
                    coarse layers j = k // r and j + 1 (the last coarse
                    interval extrapolates from j - 1 and j), so weights that
                    are linear in time are reproduced exactly; with one
                    coarse layer it is constant
    restrict(local, src, dst, comm, kind=...)   r*N -> N layers
        "injection":      coarse layer j takes fine layer r*j
        "full-weighting": coarse layer j is the mean of fine layers
                          r*j .. r*j + r - 1
    restrict_gradient(local, src, dst, comm, kind=...)   r*N -> N layers
        the transpose P^T of prolong(kind): <P^T g, e> = <g, P e>

``local`` is a *local layer dict*: {global layer index: {name: tensor}} for
exactly the layers this rank holds in the layout ``src`` (a braid_ext.Layout
over the ranks of ``comm``).  Every function is collective over ``comm`` and
returns the local layer dict of ``dst`` (new tensors, dtype kept).  Each
target layer is a fixed linear combination of source layers, summed in
increasing source index, so the result is the same bit for bit on any number
of ranks.  Data moves only between the owners of source and target layers:
one point-to-point message per pair of ranks that share a stencil, never a
gather of the model.

The network-level helpers (prolong_network, restrict_network, layer_params,
layer_grads) apply these to a ``Network`` or a ``LayerParallel``; opening
and closing layers are copied unchanged (they stay on the first and last
rank).  Optimiser state moves between depths with
``layerpar.multilevel.Hierarchy.move_optimizer_state``.
"""
from functools import lru_cache

import torch
from mpi4py import MPI

from braid_ext import Layout
from layerpar._collective import agree as _agree, check_comm
from layerpar._tags import tag as _tag
from layerpar._watchdog import recv, wait
from layerpar.parallel import LayerParallel

PROLONG_KINDS = ("constant", "linear")
RESTRICT_KINDS = ("injection", "full-weighting")



# ---- stencils: target layer -> ((source layer, coefficient), ...) -----------
def _prolong_row(k, nc, r, kind):
    j = k // r
    if kind == "constant" or nc == 1:
        return ((j, 1.0),)
    j0 = min(j, nc - 2)  # the last coarse interval extrapolates from nc-2, nc-1
    w = (k - r * j0) / r
    return tuple((s, c) for s, c in ((j0, 1.0 - w), (j0 + 1, w)) if c != 0.0)


def _restrict_row(j, r, kind):
    if kind == "injection":
        return ((r * j, 1.0),)
    return tuple((r * j + i, 1.0 / r) for i in range(r))


def _gradient_row(j, nc, r, kind):
    """Row j of P^T: the fine layers k whose prolonged value uses coarse layer
    j, with P's coefficient (they lie in r*(j-1) .. r*(j+2)-1)."""
    out = []
    for k in range(max(0, r * (j - 1)), min(r * nc, r * (j + 2))):
        out += [(k, c) for s, c in _prolong_row(k, nc, r, kind) if s == j]
    return tuple(out)


def _row(op, kind, nsrc, ndst, d):
    if op == "prolong":
        return _prolong_row(d, nsrc, ndst // nsrc, kind)
    if op == "restrict":
        return _restrict_row(d, nsrc // ndst, kind)
    return _gradient_row(d, ndst, nsrc // ndst, kind)


def _nearest(op, nsrc, ndst, d):
    """The source layer whose non-interpolated entries target layer d copies."""
    return d // (ndst // nsrc) if op == "prolong" else d * (nsrc // ndst)


@lru_cache(maxsize=256)
def _plan(op, kind, src, dst, rank):
    """(rows, recv_from, send_to) of this rank: the stencil of each target
    layer it holds; {rank q: source layers q holds that we need};
    {rank q: our source layers that q needs}.  Every rank computes the same
    plan from the two layouts, so sends and receives match."""
    def sources(d):
        need = {s for s, _ in _row(op, kind, src.nlayers, dst.nlayers, d)}
        return need | {_nearest(op, src.nlayers, dst.nlayers, d)}

    rows = {d: _row(op, kind, src.nlayers, dst.nlayers, d) for d in dst.layers(rank)}
    recv_from = {}
    for s in sorted(set().union(*(sources(d) for d in rows))):
        q = src.owner(s)
        if q != rank:
            recv_from.setdefault(q, []).append(s)
    mine = src.layers(rank)
    send_to = {}
    for q in range(dst.size):
        if q == rank:
            continue
        wanted = set().union(*(sources(d) for d in dst.layers(q)))
        held = sorted(s for s in wanted if s in mine)
        if held:
            send_to[q] = held
    return rows, recv_from, send_to


# ---- validation (collective: a failure on one rank raises on every rank) -----


def _problem(local, src, dst, comm, op, kind, kinds, names):
    """The first thing wrong with the arguments on this rank, or None."""
    for name, lay in zip(names, (src, dst)):
        if not isinstance(lay, Layout):
            return f"{name} must be a braid_ext.Layout, not {type(lay).__name__}"
        if lay.size != comm.Get_size():
            return (f"{name}.size={lay.size} but comm has {comm.Get_size()} ranks: a layout "
                    "must have one block per rank of comm")
    if not isinstance(kind, str) or kind not in kinds:
        return f"kind={kind!r}: expected one of {', '.join(repr(k) for k in kinds)}"
    fine, coarse = names[::-1] if op == "prolong" else names
    nf, nc = (dst.nlayers, src.nlayers) if op == "prolong" else (src.nlayers, dst.nlayers)
    if nf % nc:
        return (f"{fine}.nlayers={nf} is not an integer multiple r*{coarse}.nlayers of "
                f"{coarse}.nlayers={nc}: the fine layout must have r times the layers of "
                "the coarse one, r = 1, 2, ...")
    rank = comm.Get_rank()
    held = src.layers(rank)
    if not isinstance(local, dict) or set(local) != set(held):
        got = sorted(local) if isinstance(local, dict) else type(local).__name__
        return (f"local: rank {rank} holds layers {held.start}..{held.stop - 1} of src, "
                f"but the local layer dict has {got}")
    for n, entry in local.items():
        if not isinstance(entry, dict):
            return f"local[{n}] must be a dict of name -> tensor, not {type(entry).__name__}"
    return None


# ---- the exchange ----------------------------------------------------------
def _transfer(local, src, dst, comm, op, kind, kinds, names=("src", "dst")):
    """prolong/restrict/restrict_gradient.  Entries that are not tensors
    are copied from the nearest source layer.  ``names`` are the names of
    src and dst in error messages."""
    check_comm(comm)
    msg = None
    try:
        msg = _problem(local, src, dst, comm, op, kind, kinds, names)
    except Exception as e:  # anything unexpected, reported on every rank
        msg = f"{type(e).__name__}: {e}"
    _agree(comm, msg)

    # one tag per operation, its own (layerpar._tags): the messages share the
    # network's communicator with its ghost exchange and the watchdog's
    rank, tag = comm.Get_rank(), _tag(f"transfer.{op}")
    rows, recv_from, send_to = _plan(op, kind, src, dst, rank)
    # To each rank q: one message with the source layers we hold that q's
    # target layers are made of (detached CPU copies).
    requests = []
    for q, layers in send_to.items():
        part = {s: {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                    for k, v in local[s].items()} for s in layers}
        requests.append((q, comm.isend(part, dest=q, tag=tag)))
    # From each rank q: one message with the source layers q holds that ours
    # are made of.
    got = dict(local)
    for q, layers in recv_from.items():
        got.update(recv(comm, q, tag, f"the layers of rank {q} for a transfer"))
    for q, request in requests:  # each with the communicator's timeout
        wait(comm, request, f"the layers sent to rank {q} for a transfer", q)

    msg, out = None, {}
    try:
        devices = {}
        for entry in local.values():
            for k, v in entry.items():
                if isinstance(v, torch.Tensor):
                    devices.setdefault(k, v.device)
        with torch.no_grad():
            for d, row in rows.items():
                near = _nearest(op, src.nlayers, dst.nlayers, d)
                out[d] = _combine(d, row, near, got, devices)
    except Exception as e:
        msg = f"{op}: {type(e).__name__}: {e}"
    _agree(comm, msg)
    return out


def _combine(d, row, near, got, devices):
    """Target layer d: sum of c * got[s] over its row, name by name."""
    names = list(got[near])
    for s, _ in row:
        if set(got[s]) != set(names):
            raise ValueError(f"layers {near} and {s} hold different entries "
                             f"({sorted(got[near])} and {sorted(got[s])}); "
                             f"target layer {d} needs both")
    entry = {}
    for name in names:
        ref = got[near][name]
        if not isinstance(ref, torch.Tensor):
            entry[name] = ref
            continue
        dev = devices.get(name, ref.device)
        if len(row) == 1 and row[0][1] == 1.0:
            entry[name] = got[row[0][0]][name].detach().to(dev).clone()
            continue
        acc = None
        for s, c in row:
            v = got[s][name].detach().to(dev)
            acc = v * c if acc is None else acc + v * c
        entry[name] = acc.to(ref.dtype)
    return entry


def prolong(local, src, dst, comm, *, kind="constant"):
    """Collective: the layers of ``dst`` (r*N layers) from those of ``src``
    (N layers); kind "constant" or "linear" (see the module doc)."""
    return _transfer(local, src, dst, comm, "prolong", kind, PROLONG_KINDS)


def restrict(local, src, dst, comm, *, kind="injection"):
    """Collective: the layers of ``dst`` (N layers) from those of ``src``
    (r*N layers); kind "injection" or "full-weighting"."""
    return _transfer(local, src, dst, comm, "restrict", kind, RESTRICT_KINDS)


def restrict_gradient(local, src, dst, comm, *, kind="constant"):
    """Collective: P^T applied to fine-layer data (gradients), P the
    prolongation ``kind`` from dst to src: for "constant" the sum of the r
    fine layers r*j .. r*j+r-1 for coarse layer j."""
    return _transfer(local, src, dst, comm, "restrict_gradient", kind, PROLONG_KINDS)


# ---- networks ----------------------------------------------------------------
def _body(net, name):
    body = getattr(net, "body", net)
    if not isinstance(body, LayerParallel):
        raise TypeError(f"{name} must be a layerpar.Network or LayerParallel, "
                        f"not {type(net).__name__}")
    return body


def layer_params(net):
    """The local layer dict of the parameters of ``net``'s residual layers
    (the parameters themselves, not copies)."""
    body = _body(net, "net")
    return body.params_by_layer()


def layer_grads(net):
    """The local layer dict of the parameters' ``.grad`` (zeros where None)."""
    return {n: {k: p.grad if p.grad is not None else torch.zeros_like(p)
                for k, p in entry.items()}
            for n, entry in layer_params(net).items()}


def _pair(src_net, dst_net, names):
    """The bodies of two networks between which ``op`` moves data, checked
    (collectively) to live on the same ranks with the same final time."""
    a, b = _body(src_net, names[0]), _body(dst_net, names[1])
    msg = None
    if (getattr(src_net, "body", None) is None) != (getattr(dst_net, "body", None) is None):
        msg = f"{names[0]} and {names[1]} must both be Networks or both LayerParallel"
    elif MPI.Comm.Compare(a.comm, b.comm) not in (MPI.IDENT, MPI.CONGRUENT):
        msg = f"{names[0]} and {names[1]} must live on the same ranks (congruent communicators)"
    elif a.T != b.T:
        msg = (f"{names[1]}.T={b.T} differs from {names[0]}.T={a.T}: moving layers between "
               "depths keeps the final time T (h changes with the number of layers)")
    _agree(b.comm, msg)
    return a, b


def _ends(net):
    """[(module of the opening layer or None, ...closing)] held on this rank."""
    return [getattr(net, "opening", None), getattr(net, "closing", None)]


def _move_network(src_net, dst_net, op, kind, names):
    a, b = _pair(src_net, dst_net, names)
    states = a.state_by_layer()
    kinds = PROLONG_KINDS if op == "prolong" else RESTRICT_KINDS
    new = _transfer(states, a.layout, b.layout, b.comm, op, kind, kinds, names=names)
    with torch.no_grad():
        b.load_state_by_layer(new)
        # opening (first rank) and closing (last rank) stay where they are
        for m_src, m_dst in zip(_ends(src_net), _ends(dst_net)):
            if m_src is not None and m_dst is not None:
                m_dst.load_state_dict(m_src.state_dict())


def prolong_network(coarse_net, fine_net, *, kind="constant"):
    """Collective: copy the weights of ``coarse_net`` (N layers) into
    ``fine_net`` (r*N layers, same T) in place, prolonged with ``kind``."""
    _move_network(coarse_net, fine_net, "prolong", kind, ("coarse_net", "fine_net"))


def restrict_network(fine_net, coarse_net, *, kind="injection"):
    """Collective: copy the weights of ``fine_net`` (r*N layers) into
    ``coarse_net`` (N layers, same T) in place, restricted with ``kind``."""
    _move_network(fine_net, coarse_net, "restrict", kind, ("fine_net", "coarse_net"))
