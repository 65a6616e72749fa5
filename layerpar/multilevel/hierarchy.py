"""The hierarchy of a multilevel run: networks of depths N, N/r, N/r^2, ...
over the same final time T, on the same ranks, and the transfers between
them.

    hierarchy = Hierarchy(comm, depths(config), prolong="linear", restrict="injection")
    x_H0, ends_H0 = hierarchy.restrict_level(fine, coarse)   # coarse weights = R x_h
    e_h = hierarchy.prolong(e_H, coarse, fine)               # P e_H, a local layer dict
    g_H = hierarchy.restrict_gradient(g_h, fine, coarse)     # P^T g_h
    hierarchy.prolong_level(coarse, fine)                    # fine weights = P x_H
    hierarchy.move_optimizer_state(coarse, fine)

A *level* here is any object with ``net`` (a ``layerpar.Network``) and
``optimizer`` (its optimiser over this rank's parameters), such as
``layerpar.training.Level``.  The residual layers' data moves with
``layerpar.transfer`` (collective over the hierarchy's communicator, bitwise
the same on any number of ranks); the opening and closing layers belong to
every level with identity transfers (same rank, same weights).  Every
method is collective.
"""
import torch

from layerpar import transfer
from layerpar._collective import agree, check_comm
from layerpar.optim._flat import FlatOptimizer

# optimiser state that scales like a gradient (a layer's gradient is
# proportional to h), and like its square
_GRADIENT_LIKE = ("exp_avg", "momentum_buffer")
_SQUARES = ("exp_avg_sq", "max_exp_avg_sq")


def depths(config):
    """The depth of each level of a configured run, coarsest first: N /
    r^(L-1), ..., N (N = ``model.nlayers``, r = ``multilevel.factor``, L =
    ``multilevel.levels``)."""
    ml, n = config["multilevel"], config["model"]["nlayers"]
    return [n // ml["factor"] ** (ml["levels"] - 1 - i) for i in range(ml["levels"])]


def _layers(level):
    """{n: {name: parameter}} of this rank's residual layers."""
    return level.net.body.params_by_layer()


def _layout(level):
    return level.net.body.layout


def end_params(level):
    """{("opening"|"closing", name): parameter or buffer} of the opening and
    closing layers this rank holds."""
    out = {}
    for sec in ("opening", "closing"):
        module = getattr(level.net, sec)
        if module is not None:
            tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
            out.update({(sec, k): v for k, v in tensors.items()})
    return out


def values(layers, what="data"):
    """A detached copy of a local layer dict of parameters (what="data") or
    of their gradients (what="grad", zeros where there is none)."""
    out = {}
    for n, ps in layers.items():
        out[n] = {}
        for k, p in ps.items():
            t = p.detach() if what == "data" else p.grad
            out[n][k] = torch.zeros_like(p) if t is None else t.detach().clone()
    return out


def assign(layers, new):
    """Copy the local layer dict ``new`` into the parameters ``layers``."""
    with torch.no_grad():
        for n, ps in layers.items():
            for k, p in ps.items():
                p.copy_(new[n][k])


# ---- a level's weights as one vector: (local layer dict, {end key: tensor}) -----------
def point(level):
    """A detached copy of this rank's weights of ``level`` (a ``Level``)."""
    return (values(level.body.params_by_layer()),
            {k: p.detach().clone() for k, p in level.end_params().items()})


def set_point(level, new):
    """Copy the vector ``new`` (``point``'s form) into ``level``'s weights."""
    layers, ends = new
    assign(level.body.params_by_layer(), layers)
    with torch.no_grad():
        for k, p in level.end_params().items():
            p.copy_(ends[k])


def gradient(level):
    """A copy of the gradients of this rank's weights of ``level``, in
    ``point``'s form (zeros where there is none)."""
    return (values(level.body.params_by_layer(), "grad"),
            {k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
             for k, p in level.end_params().items()})


def linear_term(level, v):
    """The vector ``v`` (``point``'s form) as ``Level.set_linear_term`` takes
    it: {parameter: tensor}."""
    linear = {}
    for n, ps in level.body.params_by_layer().items():
        for k, p in ps.items():
            linear[p] = v[0][n][k]
    for key, p in level.end_params().items():
        linear[p] = v[1][key]
    return linear


def _copy_ends(src, dst):
    with torch.no_grad():
        ends = end_params(src)
        for key, p in end_params(dst).items():
            p.copy_(ends[key])


class Hierarchy:
    """The depths of a multilevel run (``depths``, coarsest first, each
    dividing the next) and the transfers between its levels, over ``comm``:
    the ranks every level's network lives on.  ``prolong``: "constant" or
    "linear" in layer-time; ``restrict``: "injection" or "full-weighting"
    (``layerpar.transfer``).  Collective; ``close()`` frees its
    communicator (a duplicate of ``comm``, so that the transfers' messages
    never meet the networks')."""

    def __init__(self, comm, depths, *, prolong="constant", restrict="injection"):
        check_comm(comm)
        depths = list(depths)
        if not depths or any(not isinstance(n, int) or n < 1 for n in depths):
            raise ValueError(f"depths={depths!r}: a list of layer counts >= 1, coarsest first")
        if any(b % a for a, b in zip(depths, depths[1:])):
            raise ValueError(f"depths={depths!r}: each depth must divide the next")
        if prolong not in transfer.PROLONG_KINDS:
            raise ValueError(f"prolong={prolong!r}: choose one of {transfer.PROLONG_KINDS}")
        if restrict not in transfer.RESTRICT_KINDS:
            raise ValueError(f"restrict={restrict!r}: choose one of {transfer.RESTRICT_KINDS}")
        self.depths = depths
        self.prolong_kind, self.restrict_kind = prolong, restrict
        self.comm = comm.Dup()

    def close(self):
        """Collective: free the hierarchy's communicator."""
        if self.comm is not None:
            self.comm.Free()
            self.comm = None

    # ---- local layer dicts between two levels ----------------------------------------
    def restrict(self, local, fine, coarse):
        """R applied to a local layer dict of ``fine``'s layers."""
        return transfer.restrict(local, _layout(fine), _layout(coarse), self.comm,
                                 kind=self.restrict_kind)

    def prolong(self, local, coarse, fine):
        """P applied to a local layer dict of ``coarse``'s layers."""
        return transfer.prolong(local, _layout(coarse), _layout(fine), self.comm,
                                kind=self.prolong_kind)

    def restrict_gradient(self, local, fine, coarse):
        """P^T applied to a local layer dict of ``fine``'s layers (gradients):
        <P^T g, e> = <g, P e>."""
        return transfer.restrict_gradient(local, _layout(fine), _layout(coarse), self.comm,
                                          kind=self.prolong_kind)

    # ---- weights -----------------------------------------------------------------------
    def restrict_level(self, fine, coarse):
        """``coarse``'s weights become R times ``fine``'s (opening and
        closing: copied).  Returns the coarse starting point: (local layer
        dict, {end key: tensor}), copies."""
        x_H0 = self.restrict(values(_layers(fine)), fine, coarse)
        assign(_layers(coarse), x_H0)
        _copy_ends(fine, coarse)
        return x_H0, {k: p.detach().clone() for k, p in end_params(coarse).items()}

    def prolong_level(self, coarse, fine):
        """``fine``'s weights become P times ``coarse``'s (opening and
        closing: copied)."""
        assign(_layers(fine), self.prolong(values(_layers(coarse)), coarse, fine))
        _copy_ends(coarse, fine)

    # ---- optimiser state -----------------------------------------------------------------
    def move_optimizer_state(self, src, dst):
        """``dst.optimizer``'s state for ``dst``'s parameters from
        ``src.optimizer``'s state for the corresponding parameters of
        ``src`` (a deeper level: restricted; a shallower one: prolonged).

        State shaped like its parameter moves with it, scaled as the
        gradient scales with h = T/N: momentum buffers and Adam's first
        moments by h_dst/h_src, Adam's second moments by its square (and
        kept >= 0 where linear prolongation extrapolates).  Other state
        (step counters) is copied from this rank's layers, parameter by
        name; the opening and closing layers keep theirs.  L-BFGS state is
        not moved (nor L-SR1's): its curvature pairs describe another
        problem, and the destination starts with an empty history."""
        msg = None
        try:
            owned = {id(p) for g in dst.optimizer.param_groups for p in g["params"]}
            stray = [(n, k) for n, ps in _layers(dst).items() for k, p in ps.items()
                     if id(p) not in owned]
            if stray:
                msg = (f"dst.optimizer does not optimise the parameter {stray[0][1]!r} of "
                       f"layer {stray[0][0]} of dst")
        except Exception as e:  # noqa: BLE001 - reported on every rank
            msg = f"dst.optimizer: {type(e).__name__}: {e}"
        agree(self.comm, msg)
        if isinstance(src.optimizer, FlatOptimizer):  # L-BFGS, L-SR1: curvature pairs
            return
        n_src, n_dst = src.net.body.nlayers, dst.net.body.nlayers
        if n_dst >= n_src:
            r = n_dst // n_src
            scale = {k: 1.0 / r for k in _GRADIENT_LIKE}
            scale.update({k: 1.0 / r ** 2 for k in _SQUARES})
            move = self.prolong
        else:
            r = n_src // n_dst
            scale = {k: float(r) for k in _GRADIENT_LIKE}
            scale.update({k: float(r ** 2) for k in _SQUARES})
            move = self.restrict
        state = src.optimizer.state
        packed = {}   # {n: {"param/key": tensor}}: state shaped like its parameter
        scalars = {}  # {(param, key): value}: e.g. step counters, the same for every layer
        for n, ps in _layers(src).items():
            packed[n] = {}
            for name, p in ps.items():
                for key, v in state.get(p, {}).items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                        packed[n][f"{name}/{key}"] = v.detach() * scale.get(key, 1.0)
                    else:
                        scalars[(name, key)] = v
        # ranks holding no state still take part in the collective transfer
        moved = move(packed, src, dst)
        for n, ps in _layers(dst).items():
            for name, p in ps.items():
                st = {key: (v.clone() if isinstance(v, torch.Tensor) else v)
                      for (pn, key), v in scalars.items() if pn == name}
                for k, t in moved[n].items():
                    pname, key = k.split("/", 1)
                    if pname == name:
                        # linear extrapolation may take a second moment below 0
                        st[key] = t.clamp(min=0) if key in _SQUARES else t.clone()
                if st:
                    dst.optimizer.state[p] = st
        src_ends = end_params(src)
        for key, p in end_params(dst).items():
            st = state.get(src_ends[key])
            if st:
                dst.optimizer.state[p] = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                          for k, v in st.items()}
