"""Layer-parallel networks from the modules a PyTorch user already has.

A ResNet is a stem, N residual blocks and a head.  ``parallelize`` makes
them a ``layerpar.Network`` in one call: the blocks become its N residual
layers, split over the ranks, the stem its opening layer (first rank) and
the head its closing layer (last rank)::

    model = nn.Sequential(stem, *blocks, head)       # as usual, on every rank
    net = layerpar.parallelize(model[0], blocks=model[1:-1], head=model[-1],
                               comm=MPI.COMM_WORLD)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for x, y in loader:                              # the same batches on every rank
        opt.zero_grad()
        loss = net.step(x, y, torch.nn.functional.cross_entropy)
        opt.step()
    net.close()

The ODE view: a residual layer u -> u + h*F(u) is a forward Euler step of
du/dt = F(u) with step h, and N of them cover [0, T], T = N*h.  A plain
ResNet, u -> u + f(u), is h = 1.  A block of the ``blocks=`` form
(u -> block(u), any module that keeps the shape, e.g. ``relu(u + f(u))``)
becomes the step F(u) = block(u) - u (``BlockStep``), so that u + h*F(u) is
block(u) for h = 1 up to round-off; a branch of the ``branches=`` form
(f of u -> u + f(u)) is the step itself (``BranchStep``).  With more than
one MGRIT level the layers' propagation is inexact, as it is for the
factory form ``Network(opening, step, closing, nlayers=N, T=N*h, ...)``.
"""
import copy
import math

import torch
from torch import nn

from layerpar._collective import agree, check_comm, collective
from layerpar._watchdog import guard
from layerpar.grid import ProcessGrid
from layerpar.parallel import Network

__all__ = ["parallelize", "BlockStep", "BranchStep"]


class _Residual(nn.Module):
    """A step built from a user's module; ``source`` names it in errors
    (e.g. "blocks[3]")."""

    def __init__(self, source):
        super().__init__()
        self.source = source

    def _checked(self, u, v):
        if not isinstance(v, torch.Tensor) or v.shape != u.shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{self.source} maps a state of shape {tuple(u.shape)} to {got}: "
                             "a residual block must keep the state's shape (a change of "
                             "shape belongs in the stem or the head)")
        return v

    def extra_repr(self):
        return self.source


class BlockStep(_Residual):
    """The step F(u) = block(u) - u of a residual block u -> block(u)
    (``blocks=`` of ``parallelize``): u + h*F(u) is block(u) for h = 1, up
    to round-off.  ``block``: the user's module itself (not a copy);
    ``source``: its name in error messages.  Raises ValueError naming
    ``source`` when the block changes the state's shape."""

    def __init__(self, block, source="block"):
        super().__init__(source)
        self.block = block

    def forward(self, u):
        return self._checked(u, self.block(u)) - u


class BranchStep(_Residual):
    """The step F(u) = branch(u) of the residual block u -> u + branch(u)
    (``branches=`` of ``parallelize``).  ``branch``: the user's module
    itself; ``source``: its name in error messages.  Raises ValueError
    naming ``source`` when the branch changes the state's shape."""

    def __init__(self, branch, source="branch"):
        super().__init__(source)
        self.branch = branch

    def forward(self, u):
        return self._checked(u, self.branch(u))


class _Structure:
    """A module's structure without its values: a copy whose parameters and
    persistent buffers live on the meta device (no storage); non-persistent
    buffers (values no state dict carries) are copied.  ``build()`` makes a
    module of the same structure, dtypes and devices, the parameters and
    persistent buffers uninitialised (``Module.to_empty`` as it were), for
    the owner's state to be loaded into."""

    def __init__(self, module):
        memo, self._devices = {}, {}
        for m in module.modules():
            skip = m._non_persistent_buffers_set
            tables = ((m._parameters, ()), (m._buffers, skip))
            for table, keep in tables:
                for name, t in table.items():
                    if t is None or name in keep or id(t) in memo:
                        continue
                    meta = t.detach().to("meta")
                    if isinstance(t, nn.Parameter):
                        meta = nn.Parameter(meta, requires_grad=t.requires_grad)
                    memo[id(t)] = meta
                    self._devices[id(meta)] = t.device
        self.module = copy.deepcopy(module, memo)

    def build(self):
        memo = {}
        for m in self.module.modules():
            for table in (m._parameters, m._buffers):
                for t in table.values():
                    device = self._devices.get(id(t)) if t is not None else None
                    if device is None or id(t) in memo:
                        continue
                    real = torch.empty_like(t, device=device)
                    if isinstance(t, nn.Parameter):
                        real = nn.Parameter(real, requires_grad=t.requires_grad)
                    memo[id(t)] = real
        return copy.deepcopy(self.module, memo)


def _builder(structure):
    return lambda *_: structure.build()


def _layer_builder(structures):
    return lambda n: structures[n].build()


def parallelize(stem, *, blocks=None, branches=None, head, comm=None, grid=None, h=1.0,
                **options):
    """Collective (over ``comm``, or every rank of ``grid``): a
    layer-parallel ``Network`` from a model's stem, residual blocks (or
    their residual branches) and head, in one call.

    ``stem``: the module before the blocks (the opening layer, first rank;
    None: the identity).  ``blocks``: the N residual blocks u -> block(u),
    an ``nn.Sequential``, ``nn.ModuleList``, list or tuple of modules that
    keep the state's shape (e.g. ``model[1:-1]``); each becomes the step
    F(u) = block(u) - u (``BlockStep``).  Or ``branches``: the residual
    branches f of blocks u -> u + f(u); each is the step itself
    (``BranchStep``).  Give exactly one of the two: ``blocks=`` takes a
    model as it is written (any block, e.g. ``relu(u + f(u))``);
    ``branches=`` says that the model is u + h*f(u), for which MGRIT's
    coarse steps (h times the coarsening factor) are meant.  ``head``: the
    module after them (the closing layer, last rank; None: the identity).
    ``comm``: the ranks the layers are split over, or ``grid``: a
    ``layerpar.ProcessGrid`` (data-parallel groups of layer-parallel
    ranks; ``net.step`` then splits each global batch over the groups).
    ``h``: the step size (a plain ResNet is forward Euler with h = 1);
    T = N*h (the layers step with T/N, which is h up to round-off).
    ``options``: those of ``Network`` and ``LayerParallel`` (``max_levels``,
    ``cfactor``, ``relax``, ``fwd_iters``, ..., ``microbatches``,
    ``schedule``, ``timeout``, ``seed``: the seed of the layers' random
    draws, such as dropout masks, per pass), the same on every rank.

    Every rank calls it with the same model, built as PyTorch users build
    it.  The network uses the given modules themselves, not copies: this
    rank's blocks become its layers (the stem on the first rank, the head on
    the last), registered in the network (``net.parameters()`` is this
    rank's part, for its optimiser).  The values are rank 0's, as DDP
    broadcasts rank 0's state at construction: rank 0 sends every rank the
    parameters and buffers of the blocks (stem, head) it holds, which are
    loaded into them, so ranks that built the model with different random
    seeds end with one consistent network.  Dtypes and devices are those of
    the given modules (the input state's must match the blocks': convert
    the model, e.g. ``.double()``, before).

    Memory: the network keeps no reference to other ranks' blocks; of each
    block it keeps a structure-only copy on the meta device (no storage),
    from which the ghost copies that coarse MGRIT grids step with (and
    ``serial_equivalent``) are built and then loaded with the owner's
    weights.  When the whole model was built on every rank, the other
    ranks' blocks stay in memory only as long as the caller holds them:
    ``del model`` after this call (or building the model in a function
    whose result is not kept) frees them, leaving each rank with its own
    blocks.  Each rank still holds the whole model while it is built; for a
    model that does not fit on one process, use the factory form
    ``Network(opening_factory, step_factory, closing_factory, nlayers=N,
    T=N*h, comm=...)``, which builds only each rank's layers.

    Returns the ``Network`` (close it on every rank when done; the grid
    stays the caller's).  Raises on every rank alike, naming the argument:
    ValueError for both or neither of ``blocks`` and ``branches``, an empty
    sequence, fewer blocks than layer ranks, modules that share a parameter
    (tied weights cannot be split), ``h`` not a finite number > 0, ranks
    that give different numbers of blocks, values of ``h`` or options, and
    a bad option; TypeError for a block, ``stem`` or ``head`` that is not a
    module, ``comm`` or ``grid`` of the wrong type, ``nlayers`` or ``T``
    among the options (they follow from the blocks and ``h``);
    RuntimeError for a rank whose model does not have rank 0's structure.
    A block that changes the state's shape raises ValueError naming it
    (``blocks[n]``) on every rank at the first pass, where the state's
    shape is known.
    """
    world = _world(comm, grid)
    error = payload = None
    try:
        kind, given = _which(blocks, branches)
        stem, head = _end(stem, "stem"), _end(head, "head")
        h = _step_size(h)
        clash = {"nlayers", "T", "modules"} & set(options)
        if clash:
            raise TypeError(f"{', '.join(sorted(clash))}: not options of parallelize (the "
                            f"number of layers is that of the {kind}, T = N*h)")
        _check_unshared(stem, kind, given, head)
        wrap = BlockStep if kind == "blocks" else BranchStep
        steps = [wrap(m, f"{kind}[{n}]") for n, m in enumerate(given)]
        structures = [_Structure(s) for s in steps]
        ends = (_Structure(stem), _Structure(head))
        payload = (kind, len(steps), h, _described(options))
    except Exception as e:  # noqa: BLE001 - raised on every rank below
        error = e
    found = agree(world, error, payload=payload)
    _check_same(found)
    N = len(steps)
    layer_ranks = grid.layers if grid is not None else comm.Get_size()
    if N < layer_ranks:
        raise ValueError(f"{kind}: {N} for {layer_ranks} layer-parallel ranks; every rank "
                         f"must hold at least one (use at most {N} ranks per network)")
    net = Network(_builder(ends[0]), _layer_builder(structures), _builder(ends[1]),
                  nlayers=N, T=N * h, comm=comm, grid=grid, modules=(stem, steps, head),
                  **options)
    try:
        _take_rank0_values(net, grid.comm if grid is not None else net.comm, stem, steps, head)
    except BaseException:
        net.close()  # every rank raises here alike
        raise
    return net


# ---- the arguments ------------------------------------------------------------------

def _world(comm, grid):
    """The communicator every rank of the call is on: the grid's whole
    communicator, else ``comm`` (checked here: no agreement is possible
    before)."""
    if grid is not None:
        if not isinstance(grid, ProcessGrid):
            raise TypeError(f"grid must be a layerpar.ProcessGrid, not {type(grid).__name__}")
        if grid.closed:
            raise ValueError("grid: the process grid is closed")
        return grid.comm
    if comm is None:
        raise TypeError("comm or grid must be given: the ranks to split the layers over")
    check_comm(comm)
    return comm


def _which(blocks, branches):
    """("blocks" or "branches", the list of modules given)."""
    if (blocks is None) == (branches is None):
        raise ValueError("blocks, branches: give exactly one of them: blocks= for residual "
                         "blocks u -> u + f(u) as they are, branches= for their branches f")
    kind, given = ("blocks", blocks) if blocks is not None else ("branches", branches)
    if not isinstance(given, (nn.Sequential, nn.ModuleList, list, tuple)):
        raise TypeError(f"{kind} must be an nn.Sequential, nn.ModuleList, list or tuple of "
                        f"modules, not {type(given).__name__}")
    given = list(given)
    if not given:
        raise ValueError(f"{kind}: empty; a network needs at least one residual block")
    for n, m in enumerate(given):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{kind}[{n}] is {type(m).__name__}, not an nn.Module")
    return kind, given


def _end(module, name):
    if module is None:
        return nn.Identity()
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name} is {type(module).__name__}, not an nn.Module (or None)")
    return module


def _step_size(h):
    if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) \
            or h <= 0:
        raise ValueError(f"h={h!r}: the step size must be a finite number > 0 (a plain "
                         "ResNet is h = 1)")
    return float(h)


def _check_unshared(stem, kind, given, head):
    """ValueError when two of the modules share a parameter or buffer: they
    would live on different ranks (tied weights cannot be split)."""
    owner = {}
    named = [("stem", stem)] + [(f"{kind}[{n}]", m) for n, m in enumerate(given)] \
        + [("head", head)]
    for name, module in named:
        mine = {id(t) for t in list(module.parameters()) + list(module.buffers())}
        for key in mine:
            other = owner.setdefault(key, name)
            if other != name:
                raise ValueError(f"{other} and {name} share a parameter or buffer: tied "
                                 "weights cannot be split over ranks")


def _check_same(found):
    """ValueError (on every rank alike: every rank has ``found``) when the
    ranks gave different arguments."""
    kinds = sorted({f[0] for f in found})
    if len(kinds) > 1:
        raise ValueError(f"blocks, branches: the ranks give {' and '.join(kinds)}; "
                         "give the same on every rank")
    counts = sorted({f[1] for f in found})
    if len(counts) > 1:
        raise ValueError(f"{kinds[0]}: the ranks give {counts} of them; every rank gives "
                         "the whole model")
    steps = sorted({f[2] for f in found})
    if len(steps) > 1:
        raise ValueError(f"h: the ranks give {steps}; give the same step size everywhere")
    options = {f[3] for f in found}
    if len(options) > 1:
        raise ValueError(f"options: the ranks give different options "
                         f"({' and '.join(sorted(options))}); give the same everywhere")


def _described(options):
    """The options as text, to compare them between ranks."""
    return ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))


# ---- rank 0's values ----------------------------------------------------------------

def _cpu_state(module):
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _values_for(stem, steps, head, layers, first, last):
    """What rank 0 sends a rank holding ``layers`` (and the opening,
    closing when ``first``, ``last``): the state dicts of rank 0's modules."""
    return {"layers": {n: _cpu_state(steps[n]) for n in layers},
            "opening": _cpu_state(stem) if first else None,
            "closing": _cpu_state(head) if last else None}


def _take_rank0_values(net, world, stem, steps, head):
    """Collective over ``world``: load rank 0's parameters and buffers into
    this rank's blocks, stem (first rank) and head (last rank)."""
    rank = world.Get_rank()
    held = (list(net.body.layer_indices), net.is_first, net.is_last)
    guard(world, "collecting which layers the ranks hold")
    # every rank -> rank 0: the layers (and ends) it holds
    wanted = world.gather(held, root=0)
    parts = error = None
    if rank == 0:
        try:
            parts = [None] + [_values_for(stem, steps, head, *w) for w in wanted[1:]]
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            error, parts = e, [None] * world.Get_size()
    guard(world, "sending rank 0's weights")
    # rank 0 -> every rank: the state dicts of the modules it holds
    mine = world.scatter(parts, root=0)
    with collective(world, "loading rank 0's weights"):
        if error is not None:
            raise error
        if mine is not None:
            loads = [(steps[n].source, steps[n], s) for n, s in mine["layers"].items()]
            loads += [(name, module, mine[end]) for name, module, end in
                      (("stem", stem, "opening"), ("head", head, "closing"))
                      if mine[end] is not None]
            with torch.no_grad():
                for name, module, state in loads:
                    try:
                        module.load_state_dict(state)
                    except RuntimeError as e:
                        raise RuntimeError(f"{name} on rank {rank} does not have rank 0's "
                                           f"structure: {e}") from None
