"""The layer-parallel residual network: forward propagation by MGRIT across
ranks, back-propagation by adjoint MGRIT backward in layer-time.

``LayerParallel`` is the residual part  u_N = Phi_{N-1}( ... Phi_0(u_0)),
Phi_n(u) = u + h*F_n(u), h = T/N, with the layers split over the ranks of a
communicator.  ``Network`` adds an opening layer (on the first rank) and a
closing layer and the loss (on the last rank), so that an ordinary training
loop runs on every rank:

    net = Network(opening, step, closing, nlayers=64, T=4.0, comm=comm)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for x, y in batches:
        opt.zero_grad()
        loss = net.loss(x, y, torch.nn.functional.cross_entropy)
        loss.backward()
        opt.step()
        value = net.reduce(loss)        # the loss value on every rank
    net.close()                         # collective: frees the communicators

or, in one call per step (any mode, and on a data x layer grid with
``grid=``), ``value = net.step(x, y, torch.nn.functional.cross_entropy)``.
``layerpar.parallelize`` (``layerpar.dropin``) makes a ``Network`` from the
stem, blocks and head of a model that is already written.

A network holds MPI communicators: close it (or use it in a ``with``
block) on every rank when done; garbage collection never frees them.

Both classes are facades: the passes themselves live in ``layerpar.engine``
(stage, pass context, MGRIT passes, pipeline, ghosts, solver pairs).  Every
entry point that may fail on some ranks agrees before it returns: a failure
on one rank (a bad input, a layer that raises, a loss that cannot be
computed) raises an exception of the same type on every rank, and the
network stays usable.
"""
import math

import torch
from mpi4py import MPI
from torch import nn

from layerpar._collective import agree, check_comm, collective, from_root
from layerpar._watchdog import check_timeout, set_timeout, set_wait, timeout_of
from layerpar.engine import options as solve_options
from layerpar.engine.carry import context_spec, share
from layerpar.engine.context import PassContext, PassRecords, StateMeta
from layerpar.engine.ghosts import Ghosts
from layerpar.engine import waiting
from layerpar.engine.mgrit import AdjointApp, ForwardApp, MGRITFunction, MGRITPasses
from layerpar.engine.transport import Transport
from layerpar.engine.pipeline import SCHEDULES, Pipeline, PipelineFunction, split_sizes
from layerpar.engine.policy import CallKinds, layer_rng, takes_context, training_flags
from layerpar.engine.solvers import SolverPairs
from layerpar.engine.layers import LayersByIndex, collect as _collect
from layerpar.engine.stage import Stage, load_state
from layerpar.grid import ProcessGrid
from layerpar.stepping import TrainingStep
from layerpar.steps import SerialStack


def _seeded(seed, n, make):
    """make() under the torch RNG seeded by (seed, n), leaving the global RNG
    as it was: the same layer gets the same weights on any number of ranks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + n) % (2**63))
        return make()


def _split_context(context, m):
    """The context of each of ``m`` micro-batches (``torch.tensor_split``
    rows), or m Nones."""
    if context is None:
        return [None] * m
    cut = {k: v.tensor_split(m) for k, v in context.items()}
    return [{k: v[i] for k, v in cut.items()} for i in range(m)]


def _timeout(value, comm):
    """The timeout: the argument, else the limit set on ``comm``
    (``layerpar.set_timeout``), else $LAYERPAR_TIMEOUT, else none."""
    if value is None:
        return timeout_of(comm)
    return check_timeout(value)


def _given(module, name):
    """A module given to use as it is (the drop-in form), checked."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name} is {type(module).__name__}, not an nn.Module")
    return module


def _layer_comm(comm, grid):
    """The communicator the layers are split over: ``comm``, or the layer
    communicator of ``grid`` (a ProcessGrid)."""
    if grid is None:
        return comm  # checked by LayerParallel
    if not isinstance(grid, ProcessGrid):
        raise TypeError(f"grid must be a layerpar.ProcessGrid, not {type(grid).__name__}")
    if grid.closed:
        raise ValueError("grid: the process grid is closed")
    if comm is not None:
        check_comm(comm)
        if MPI.Comm.Compare(comm, grid.layer_comm) not in (MPI.IDENT, MPI.CONGRUENT):
            raise ValueError("comm: with grid= the layers are split over grid.layer_comm; "
                             "give comm=grid.layer_comm or leave comm out")
    return grid.layer_comm


def _scalar_loss(value):
    """``value``, a loss that backward can start from: a one-element tensor
    on autograd's graph (TypeError/ValueError otherwise)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"loss_fn returned {type(value).__name__}, not a tensor")
    if value.numel() != 1:
        raise ValueError(f"loss_fn returned a tensor of shape {tuple(value.shape)}: the loss "
                         "must be one number (a mean or a sum over the samples, e.g. "
                         "reduction='mean')")
    if not value.requires_grad:
        raise ValueError("loss_fn returned a tensor without a gradient (detached, or no "
                         "trainable parameter): backward cannot start from it")
    return value


def _count(value, name, what):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}: {what} must be an integer >= 1")
    return value


class LayerParallel(LayersByIndex, nn.Module):
    """N residual layers u <- u + h*F_n(u), h = T/N, split over ``comm``.

    step_factory(n) builds F_n, an ``nn.Module`` that keeps the state's
    shape; each rank builds only the layers it holds (``layer_indices``),
    seeded per layer so the weights do not depend on the number of ranks.

    Keyword-only MGRIT options, for both solves unless prefixed:
      max_levels   1 = exact layer-serial propagation across ranks (default:
                   each rank runs its block of layers as one autograd graph,
                   forward and back, layerpar.engine.pipeline); more levels =
                   layer-parallel (MGRIT)
      cfactor, relax ('F', 'FCF', ...), cycle ('V', 'F'), min_coarse
      skip         no relaxation on the first down-cycle of a cold solve; the
                   residual history (last_forward["residual_norms"]) then
                   starts at r_1
      fwd_iters, bwd_iters     iterations per solve (default 2 and 1)
      fwd_tol, bwd_tol         absolute residual tolerances (default 0: run
                               exactly the given iterations)
      fwd_rel_tol, bwd_rel_tol relative tolerances
      bwd_max_levels, bwd_cfactor, bwd_relax, bwd_cycle  backward-only values
      warm_start   start each solve from the previous one's states (one-shot)
      retain_graphs  keep the layers' autograd graphs after backward, so that
                   backward may run again for the same forward (gradcheck)
      seed         seed of the layer initialisation
      microbatches with max_levels=1 (both solves): the batch (dimension 0)
                   is split into this many micro-batches (torch.tensor_split
                   sizes; fewer when the batch is smaller) that flow rank to
                   rank, forward and backward, so that the ranks work at
                   once (the exact pipeline, GPipe schedule; default 1: the
                   whole batch, layer-serial)
      schedule     the pipeline's schedule: 'gpipe' (default), '1f1b'
                   (one forward, one backward: at most P micro-batches'
                   graphs held per rank instead of all of them) or one
                   added with ``layerpar.engine.pipeline.register_schedule``;
                   schedules other than GPipe run in
                   ``Network.loss_and_backward``, which computes the loss
                   and the gradients together; a forward pass alone, or
                   backward through its result, runs GPipe
      solver_cache how many solver pairs (forward and adjoint) to keep, each
                   for one state shape/dtype/device and set of options
                   (default 4): a pass with another batch size or with
                   other options (an exact evaluation pass) and back returns
                   to the same solvers, warm states included
      timeout      seconds any wait for other ranks may last, in the solves
                   and in the module's other collectives and messages
                   (default: the limit set on ``comm`` with
                   ``layerpar.set_timeout``, else $LAYERPAR_TIMEOUT, else no
                   limit; 0: no limit); a rank that stops answering then
                   makes the others raise ``braid_ext.MGRITTimeoutError``
                   (in a solve) or its subclass ``layerpar.SilentRankError``
                   (elsewhere) naming it, after which the job should end
                   (``comm.Abort``)
      modules      the drop-in form (``layerpar.parallelize``): a sequence of
                   the N step modules, of which each rank takes its own
                   layers' entries as they are (no copy, no seeding);
                   step_factory(n) then builds only modules of layer n's
                   structure (ghost copies, ``serial_equivalent``), whose
                   values are always loaded from the owner.  Only this
                   rank's entries are read; no reference to the sequence
                   is kept.
      transport    how states and weights travel: 'host' (staged through
                   host buffers kept between messages), 'device' (MPI reads
                   the tensors' device memory; needs a CUDA-aware MPI) or
                   'auto' (default: 'device' when the MPI library reports
                   CUDA support and CUDA is available); the results are
                   bitwise the same
      wait         how a rank waits for messages: 'busy' (MPI_Wait), 'sleep'
                   (tests with growing naps, leaving the core to ranks that
                   work) or 'auto' (default: 'sleep' when this node runs more
                   ranks than it has cores)

    Step modules may hold frozen parameters (no gradient), buffers and
    train/eval behaviour (dropout, batch norm): they run under the policy of
    ``layerpar.engine.policy`` (ghost copies in the owner's mode, random
    draws seeded per forward pass and layer, buffers updated once per pass
    in the final sweep).  ``passes`` counts the forward passes (it keys the
    random draws; a checkpoint stores it).

    forward(u0, context=None): u0 is the input state on rank 0 (other ranks
    may pass None).  Returns u_N on the last rank and a zero-size
    placeholder elsewhere; call backward on every rank (``Network`` does
    this for you).  ``context`` (first rank): the batch's context, a dict
    of tensors whose first dimension is the batch (a padding mask,
    positions), given to every step module whose ``forward`` takes a
    ``context`` keyword (``layerpar.engine.policy``); it is sent once per
    pass to the ranks whose layers take it (``layerpar.engine.carry``),
    sliced per micro-batch in the pipeline, and no gradient flows into it.
    Plain steps are called without it.

    ``close()`` (collective) frees the solvers and the communicators the
    module duplicated; ``with LayerParallel(...) as body:`` closes at the end.

    The module is a facade over ``layerpar.engine``: its ``stage`` (the
    local layers and how they are called), its ``solvers`` (the cache of
    MGRIT solver pairs with their warm states), its ghosts (coarse-grid
    weights from other ranks) and its ``pipeline`` (the exact passes).
    """


    _store = "C"  # the solvers' storage (layerpar.engine.solvers)

    def __init__(self, step_factory, nlayers, T, comm, *, max_levels=1, cfactor=4,
                 relax="FCF", cycle="V", min_coarse=2, skip=False, fwd_iters=2,
                 bwd_iters=1, fwd_tol=0.0, bwd_tol=0.0, fwd_rel_tol=0.0,
                 bwd_rel_tol=0.0, bwd_max_levels=None, bwd_cfactor=None,
                 bwd_relax=None, bwd_cycle=None, warm_start=False, retain_graphs=False,
                 seed=0, microbatches=1, schedule="gpipe", solver_cache=4, timeout=None,
                 modules=None, transport="auto", wait="auto"):
        super().__init__()
        check_comm(comm)
        if not callable(step_factory):
            raise TypeError("step_factory must be callable: step_factory(n) -> nn.Module")
        if not isinstance(nlayers, int) or isinstance(nlayers, bool) or nlayers < 1:
            raise ValueError(f"nlayers={nlayers!r}: the number of layers must be an integer >= 1")
        if modules is not None and len(modules) != nlayers:
            raise ValueError(f"modules: {len(modules)} modules for nlayers={nlayers} layers")
        if comm.Get_size() > nlayers:
            raise ValueError(f"nlayers={nlayers} is smaller than the number of ranks "
                             f"({comm.Get_size()}): every rank must hold at least one layer")
        if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
            raise ValueError(f"T={T!r}: the final time must be a finite number > 0")
        self.microbatches = _count(microbatches, "microbatches", "the number of micro-batches")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
        self.schedule = schedule
        self.solver_cache = _count(solver_cache, "solver_cache",
                                   "the number of solver pairs to keep")
        timeout = _timeout(timeout, comm)
        self.transport = Transport(transport)
        waiting.check(wait)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed={seed!r}: must be an integer")
        for name, v in (("warm_start", warm_start), ("retain_graphs", retain_graphs)):
            if not isinstance(v, (bool, int)) or v not in (0, 1):
                raise ValueError(f"{name}={v!r}: must be True or False")
        # every option is checked here, on every rank alike, before any message
        fwd, bwd = solve_options.solve_options(
            nlayers, comm.Get_size(), max_levels=max_levels, cfactor=cfactor, relax=relax,
            cycle=cycle, min_coarse=min_coarse, skip=skip, fwd_iters=fwd_iters,
            bwd_iters=bwd_iters, fwd_tol=fwd_tol, bwd_tol=bwd_tol, fwd_rel_tol=fwd_rel_tol,
            bwd_rel_tol=bwd_rel_tol, bwd_max_levels=bwd_max_levels, bwd_cfactor=bwd_cfactor,
            bwd_relax=bwd_relax, bwd_cycle=bwd_cycle, warm_start=warm_start, timeout=timeout)
        self.comm = comm.Dup()  # our own messages never meet the user's
        # the limit of every wait on it and its duplicates, outside the solves too
        set_timeout(self.comm, timeout or 0.0)
        # 'auto' is agreed collectively: only once every option passed its checks
        wait = waiting.resolve(wait, self.comm)
        set_wait(self.comm, wait)
        self.wait = wait
        self._comms = {}  # further duplicates by purpose (communicator())
        self.solvers = None
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.nlayers, self.T, self.h = nlayers, float(T), float(T) / nlayers
        self.step_factory = step_factory
        self.seed = seed
        self.retain_graphs = bool(retain_graphs)
        self.fwd_options, self.bwd_options = fwd, bwd
        self.layers = nn.ModuleDict()
        self.stage = Stage(self.layers, range(0), nlayers, self.h, seed, self._make_layer)
        apps = (ForwardApp(self.stage), AdjointApp(self.stage))
        for app in apps:
            app.set_transport(self.transport.kind)
        try:
            # both solvers now: a bad option raises here, on every rank
            self.solvers = SolverPairs(apps, self.comm, nlayers, self.T, fwd, bwd,
                                       capacity=solver_cache, store=self._store, wait=wait)
            self.layout = self.solvers.layout()  # which rank holds which layer
            self.layer_indices = self.stage.indices = self.layout.layers(self.rank)
            with collective(self.comm, "building the layers"):
                for n in self.layer_indices:
                    self.layers[str(n)] = (self._make_layer(n) if modules is None
                                           else _given(modules[n], f"modules[{n}]"))
        except BaseException:
            self.close()  # every rank raises here alike
            raise
        self._ghosts = Ghosts(self.stage, self.comm, self.layout, self.transport)
        self._ghosts.plan(fwd)
        self.pipeline = Pipeline(self.stage, lambda: self.communicator("pipeline"),
                                 microbatches=microbatches, transport=self.transport)
        self._mgrit = MGRITPasses(self.stage, self.comm, self.solvers, self._ghosts, apps,
                                  diagnose=self.pipeline.diagnose)
        self._anchor = torch.zeros((), requires_grad=True)  # keeps every rank in autograd
        self.records = PassRecords()
        self._state_meta = None
        self._context_users = None     # (pipelined, ranks whose layers take the context)
        self.closing_takes_context = False  # the last rank's closing does (Network)
        self.last_context = None       # this rank's context of the last pass
        self.passes = 0          # forward passes so far: keys the layers' random draws

    # ---- lifetime -----------------------------------------------------------
    def close(self) -> None:
        """Collective: free the solvers (and every state they hold) and the
        duplicated communicators.  Using the module afterwards raises;
        closing twice does nothing."""
        if self.comm is None:
            return
        if self.solvers is not None:
            self.solvers.close()
        for comm in self._comms.values():
            comm.Free()
        self._comms = {}
        self.comm.Free()
        self.comm = None

    @property
    def closed(self):
        return self.comm is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self.comm is None:
            raise RuntimeError("this LayerParallel is closed")

    def communicator(self, purpose):
        """A duplicate of the module's communicator for ``purpose`` (a name),
        made at the first call (collective then) and freed by ``close()``, so
        that other messages about this network never meet the solvers'."""
        self._check_open()
        comm = self._comms.get(purpose)
        if comm is None:
            comm = self._comms[purpose] = self.comm.Dup()
        return comm

    def _make_layer(self, n):
        F = _seeded(self.seed, n, lambda: self.step_factory(n))
        if not isinstance(F, nn.Module):
            raise TypeError(f"step_factory({n}) returned {type(F).__name__}, not an nn.Module")
        return F

    # ---- options and warm states ------------------------------------------------
    def reconfigure(self, *, max_levels=None, bwd_max_levels=None, fwd_iters=None,
                    bwd_iters=None, warm_start=None):
        """Change MGRIT options between passes (e.g. more iterations, or
        max_levels=1 for exact propagation), checked here.  The next pass
        takes the solvers for the new options from the cache of solver pairs
        or builds them (collective then); switching back to earlier options
        finds their solvers again, with their warm states (``solver_cache``)."""
        self._check_open()
        fwd, bwd = solve_options.reconfigured(
            self.fwd_options, self.bwd_options, max_levels=max_levels,
            bwd_max_levels=bwd_max_levels, fwd_iters=fwd_iters, bwd_iters=bwd_iters,
            warm_start=warm_start)
        solve_options.check(self.nlayers, self.size, fwd, bwd)
        self.fwd_options, self.bwd_options = fwd, bwd
        self._ghosts.plan(fwd)
        self._context_users = None

    def warm_states(self):
        """This rank's solver states, for a checkpoint: a list of (state meta,
        forward options, backward options, {"fwd": {index: tensor}, "bwd":
        {index: tensor}}), one per solver pair used for a state shape (see
        ``layerpar.engine.solvers``).  Local; ``load_warm_states`` on the
        same number of ranks restores them."""
        self._check_open()
        return self.solvers.warm_states()

    def load_warm_states(self, states, *, owned_only=False):
        """Collective: rebuild the solver pairs of ``warm_states()`` with
        their states, the last one in use; the options stay as they are.
        ``owned_only``: the states may hold other ranks' points too; only
        this rank's stored points are installed."""
        self._check_open()
        self.solvers.load_warm_states(states, self.fwd_options, self.bwd_options,
                                      owned_only=owned_only)

    @property
    def last_forward(self):
        """The statistics of the last forward pass: iterations, residual_norms,
        steps (layer steps per level on this rank), virtual_time, input_norm."""
        return self.records.forward

    @property
    def last_backward(self):
        """The statistics of the last backward pass (as ``last_forward``)."""
        return self.records.backward


    @property
    def first_rank(self):
        return 0

    @property
    def last_rank(self):
        return self.size - 1

    # ---- passes ----------------------------------------------------------------
    def _prepare(self, u0, failure=None, context=None):
        """Collective: agree on the state's shape, dtype and device (from the
        rank holding the input) and on the arrays of its ``context``, and
        rebuild what depends on them: (``StateMeta``, {name: (shape, dtype)}
        of the context or None).  A bad input or context on the first rank
        (or its ``failure``, an exception raised there before: in the
        opening layer) raises an exception of the same type on every rank."""
        self._check_open()

        def meta_of_input():
            if failure is not None:
                raise failure
            if not isinstance(u0, torch.Tensor):
                raise TypeError(f"the input state on rank {self.rank} must be a tensor, "
                                f"not {type(u0).__name__}")
            spec = context_spec(context, u0.shape[0] if u0.dim() else 0)
            return (tuple(u0.shape), u0.dtype, str(u0.device)), spec

        key, spec = from_root(self.comm, self.first_rank, meta_of_input,
                              what="the input state's shape from the first rank")
        if self._state_meta is None or (key, spec) != self._state_meta[:2]:
            meta = StateMeta.of(key)
            agree(self.comm, self.stage.check_state(meta, spec))
            self._state_meta = (key, spec, meta)
        # the solvers (and warm states) for this state and the current options
        self.solvers.use(key, self.fwd_options, self.bwd_options)
        return self._state_meta[2], spec

    def _context_ranks(self):
        """Collective: the ranks whose layers (local, or ghosts of the
        coarse grids) or closing take the context, for the current options;
        found once per set of options."""
        if self._context_users is None or self._context_users[0] != self.pipelined:
            ghosts = () if self.pipelined else self._ghosts.receives
            need, error = False, None
            try:
                need = self.closing_takes_context or self.stage.needs_context(ghosts)
            except Exception as e:  # noqa: BLE001 - a ghost that cannot be built: every rank
                error = e
            # every rank -> every rank: whether it uses the context
            flags = agree(self.comm, error, payload=bool(need),
                          what="which ranks take the context")
            self._context_users = (self.pipelined,
                                   tuple(r for r, f in enumerate(flags) if f))
        return self._context_users[1]

    def start_pass(self, u0, *, record, failure=None, retain=None, context=None):
        """Collective: the context of the next forward pass (and of the
        backward pass through its result), the state's meta agreed from the
        first rank (``_prepare``); ``record``: autograd records the pass;
        ``retain``: keep its graphs after backward (default
        ``retain_graphs``); ``context`` (first rank): the batch's context,
        carried to the ranks that use it.  For schedules that run a whole
        training step (``Network.loss_and_backward``); ``forward`` uses it
        too."""
        meta, spec = self._prepare(u0, failure, context)
        ctx = PassContext(index=self.passes, meta=meta, record=record, records=self.records,
                          retain=self.retain_graphs if retain is None else retain)
        if spec is not None:
            users = self._context_ranks()
            ctx.context = share(self.comm, self.first_rank, context, users, meta.device)
        self.last_context = ctx.context
        self.passes += 1
        return ctx

    def forward(self, u0: "torch.Tensor | None" = None, *,
                failure: "BaseException | None" = None, context=None) -> torch.Tensor:
        """u_N on the last rank, a placeholder elsewhere; ``failure``: an
        exception raised on the first rank before (the opening layer's),
        raised on every rank instead of a pass; ``context`` (first rank):
        the batch's context for the layers that take it."""
        # without autograd (evaluation) no layer graphs are kept
        ctx = self.start_pass(u0, record=torch.is_grad_enabled(), failure=failure,
                              context=context)
        meta = ctx.meta
        if self.rank != self.first_rank or u0 is None:
            u0 = torch.zeros((), dtype=meta.dtype, device=meta.device)
        if self.pipelined and self.size == 1 and self.microbatches == 1 \
                and not self.retain_graphs:
            # nothing to send: the layers go on the caller's graph (backward
            # twice then needs retain_graph=True, hence not with retain_graphs)
            return self.pipeline.on_graph(ctx, u0)
        params = self.stage.params()
        if self.pipelined:
            return PipelineFunction.apply(self.pipeline, ctx, self._anchor, u0, *params)
        return MGRITFunction.apply(self._mgrit, ctx, self._anchor, u0, *params)

    @property
    def pipelined(self):
        """Whether passes are exact, layer-serial across the ranks
        (``layerpar.engine.pipeline``, with ``microbatches`` micro-batches):
        one level both ways.  Each rank then runs its layers as one block,
        one autograd graph per micro-batch, instead of through the solvers."""
        return self.fwd_options["max_levels"] == 1 and self.bwd_options["max_levels"] == 1


    def extra_repr(self):
        return (f"nlayers={self.nlayers}, T={self.T}, ranks={self.size}, "
                f"local layers={self.layer_indices.start}..{self.layer_indices.stop - 1}, "
                f"max_levels={self.fwd_options['max_levels']}")


class Network(TrainingStep, nn.Module):
    """Opening layer (first rank) + LayerParallel + closing layer (last rank).

    opening_factory() and closing_factory() build the opening and closing
    modules (seeded, on the rank that uses them); the remaining arguments are
    those of LayerParallel, and:

      comm     the ranks the layers are split over (an mpi4py
               intracommunicator; the network works on a duplicate)
      grid     a ``layerpar.ProcessGrid`` instead of ``comm``: the layers
               are split over ``grid.layer_comm`` (give ``comm`` too only
               as that communicator), and ``step`` trains each data-parallel
               group on its share of the global batch, averaging the
               gradients over the groups (see ``step``).  The grid stays
               the caller's: close it after the network.
      modules  (opening, steps, closing): modules to use as they are
               instead of building them: the opening on the first rank,
               ``steps[n]`` for this rank's layers, the closing on the last
               rank; the factories then build only modules of the same
               structure (ghost copies, ``serial_equivalent``).  This is
               the drop-in form that ``layerpar.parallelize`` builds.

    The factory form builds only this rank's layers, so a model too large
    for one process can be built at all; ``layerpar.parallelize`` turns a
    model that is already built into a network.

    Raises on every rank alike: TypeError (``comm`` not a communicator,
    ``grid`` not a ProcessGrid, a factory that does not build a module),
    ValueError (an option out of range, ``comm`` not the grid's layer
    communicator, a closed grid).  Collective: every rank constructs it
    with the same arguments.

    Context: ``net(x, context=c)``, ``net.loss(x, y, loss_fn, context=c)``
    and ``loss_and_backward(..., context=c)`` take the batch's context on the
    first rank (see ``LayerParallel``); the opening and the closing take it
    too when their ``forward`` has a ``context`` keyword.  An opening may
    also derive it from the input: returning ``(state, context)`` (a
    padding mask from the pad token, say), its context joins the given one
    (given arrays win), so that a training loop that knows only ``(x, y)``
    carries a mask to every rank.
    """

    def __init__(self, opening_factory, step_factory, closing_factory, *, nlayers, T,
                 comm=None, grid=None, seed=0, modules=None, **mgrit_options):
        super().__init__()
        comm = _layer_comm(comm, grid)
        opening = steps = closing = None
        if modules is not None:
            if not isinstance(modules, (tuple, list)) or len(modules) != 3:
                raise ValueError("modules: give (opening, steps, closing), the opening and "
                                 "closing modules and the sequence of the N step modules")
            opening, steps, closing = modules
        self.body = LayerParallel(step_factory, nlayers, T, comm, seed=seed, modules=steps,
                                  **mgrit_options)
        self.comm = self.body.comm
        self.grid = grid
        self.rank = self.body.rank
        self.opening = self.closing = None
        try:
            with collective(self.comm, "building the opening and closing layers"):
                if self.rank == self.body.first_rank:
                    self.opening = (_seeded(seed, -1, opening_factory) if modules is None
                                    else _given(opening, "modules[0] (the opening)"))
                if self.rank == self.body.last_rank:
                    self.closing = (_seeded(seed, -2, closing_factory) if modules is None
                                    else _given(closing, "modules[2] (the closing)"))
                    self.body.closing_takes_context = takes_context(self.closing)
        except BaseException:
            self.body.close()
            raise
        self._opening_factory, self._closing_factory = opening_factory, closing_factory
        self._tail = self._tail_value = None  # a loss computed within forward (_with_tail)
        self._end_kinds = CallKinds()  # the opening's and closing's, read once

    @property
    def is_first(self):
        return self.rank == self.body.first_rank

    @property
    def is_last(self):
        return self.rank == self.body.last_rank

    def forward(self, x: "torch.Tensor | None" = None, *, context=None) -> torch.Tensor:
        """Class scores on the last rank; a placeholder elsewhere.
        ``context`` (first rank): the batch's context."""
        tail, self._tail = self._tail, None
        out, self._tail_value = self._run(x, tail, context)
        return out

    def _with_tail(self, x, tail, context=None):
        """Collective: (``self(x)``, ``tail(scores)`` on the last rank or
        None): the call goes through the module's hooks, and a failure of
        the tail is agreed with the forward pass's own agreement."""
        self._tail = tail
        try:
            out = self(x) if context is None else self(x, context=context)
        finally:
            self._tail = None
        value, self._tail_value = self._tail_value, None
        return out, value

    def _run(self, x, tail=None, context=None):
        """Collective: (class scores on the last rank or the body's
        placeholder, ``tail(scores)`` on the last rank or None).  A failure
        of the opening layer (first rank), of the closing layer or of
        ``tail`` (last rank) raises on every rank."""
        p = self.body.passes  # the pass the body is about to run
        u0, failure = None, None
        if self.is_first:
            try:
                u0, context = self._open(x, p, context)
            except Exception as e:  # noqa: BLE001 - raised on every rank by the body
                failure = e
        uN = self.body(u0, failure=failure, context=context)
        out, value, error = uN, None, None
        if self.is_last:
            try:
                out = self._call_end(self.closing, uN, p, -2, self.body.last_context)
                if tail is not None:
                    value = tail(out)
            except Exception as e:  # noqa: BLE001 - raised on every rank below
                error = e
        if self.body.size > 1:
            agree(self.comm, error, what="the closing layer and the loss")
        elif error is not None:
            raise error
        return out, value

    def _open(self, x, pass_index, context):
        """(the opening's state of ``x``, the context: the given one, joined
        by the one the opening derives when it returns ``(state, context)``)."""
        out = self._call_end(self.opening, x, pass_index, -1, context)
        if isinstance(out, tuple):
            if len(out) != 2 or not isinstance(out[1], dict):
                raise TypeError("the opening returned a tuple: it must be (state, context) "
                                "with the context a dict {name: tensor}")
            out, derived = out
            context = {**derived, **(context or {})}
        return out, context

    def _call_end(self, module, x, pass_index, layer, context=None):
        """The opening (layer -1) or closing (-2), with its random draws
        seeded like a layer's: the same on any number of ranks; given the
        context when it takes it."""
        kinds = self._end_kinds
        kwargs = {"context": context} if kinds.takes_context(module) else {}
        if kinds.is_stochastic(module) and any(training_flags(module)):
            with layer_rng(self.body.seed, pass_index, layer, x.device):
                return module(x, **kwargs)
        return module(x, **kwargs)

    def loss_and_backward(self, x: "torch.Tensor | None", y: "torch.Tensor | None", loss_fn,
                          *, reduction: str = "mean",
                          context=None) -> "tuple[torch.Tensor, torch.Tensor]":
        """Collective: the loss of the batch and its gradient, accumulated in
        every parameter's ``.grad`` as ``self.loss(x, y, loss_fn).backward()``
        does.  Returns (loss, class scores), both detached: on the last rank
        the loss and the scores of the batch, elsewhere a zero and a
        placeholder.  Only the first rank needs ``x`` and only the last ``y``.

        With the pipeline (one level) and a schedule other than GPipe
        (``schedule='1f1b'``, or one of ``register_schedule``) the forward
        and backward passes of the micro-batches interleave in one step
        (``layerpar.engine.pipeline``): the closing layer and the loss run
        per micro-batch, so ``loss_fn`` must be a mean
        (``reduction='mean'``, like ``cross_entropy``'s default: micro-batch
        losses weighted by their share of the batch) or a sum
        (``reduction='sum'``) over the samples.  ``context`` (first rank):
        the batch's context."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r}: choose mean or sum")
        body = self.body
        if not (body.pipelined and body.schedule != "gpipe"):
            # the loss is checked within the pass's agreement: a loss that
            # backward cannot start from fails on every rank, not on the last
            out, loss = self._with_tail(x, lambda out: _scalar_loss(loss_fn(out, y)),
                                          context)
            if not self.is_last:
                loss = out.sum() * 0.0
            loss.backward()
            return loss.detach(), out.detach()
        return self._train_step(x, y, loss_fn, reduction, context)

    def _train_step(self, x, y, loss_fn, reduction, context=None):
        body = self.body
        p = body.passes  # the pass the body is about to run
        parts = head = probe = failure = None
        heads, given = None, None
        if self.is_first:
            try:
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"the input on rank {self.rank} must be a tensor, "
                                    f"not {type(x).__name__}")
                m = len(split_sizes(len(x), body.microbatches))
                parts = x.tensor_split(m)
                context_spec(context, len(x))  # refused here, naming the array
                given = _split_context(context, m)
                head, c0 = self._open(parts[0], p, given[0])  # its state's shape
                if c0 is not given[0]:
                    # the opening derives the context: every micro-batch's now,
                    # so that the pass carries the whole batch's
                    opened = [(head, c0)] + [self._open(parts[i], p, given[i])
                                             for i in range(1, m)]
                    heads = [o[0] for o in opened]
                    context = {k: torch.cat([o[1][k] for o in opened]) for k in c0}
                # a state of the batch's shape (no storage): what the body checks
                probe = head.detach().new_zeros(()).expand((len(x),) + tuple(head.shape[1:]))
            except Exception as e:  # noqa: BLE001 - raised on every rank by the body
                failure = e
        ctx = body.start_pass(probe, record=True, failure=failure, retain=False,
                              context=context)
        B = ctx.meta.shape[0]
        labels, scores = [], []

        def first(i):
            if heads is not None:
                return heads[i]
            return head if i == 0 else self._open(parts[i], p, given[i])[0]

        def last(i, u):
            if not labels:  # here, inside the pass: a bad label fails it on every rank
                labels.extend(y.tensor_split(len(split_sizes(B, body.microbatches))))
            out = self._call_end(self.closing, u, p, -2, ctx.context_of(i))
            scores.append(out.detach())
            loss = _scalar_loss(loss_fn(out, labels[i]))
            return loss * (len(labels[i]) / B) if reduction == "mean" else loss

        total = body.pipeline.train(ctx, first, last, body.schedule)
        if self.is_last:
            return total, torch.cat(scores)
        meta = ctx.meta
        return (torch.zeros((), dtype=meta.dtype, device=meta.device),
                torch.zeros(0, dtype=meta.dtype, device=meta.device))


    def loss(self, x, y, loss_fn, *, context=None):
        """The loss on the last rank; elsewhere a zero connected to the
        layer-parallel pass, so that ``loss.backward()`` on every rank runs
        the adjoint solve everywhere.  Only the first rank needs ``x`` (and
        ``context``) and only the last ``y``."""
        out, value = self._with_tail(x, lambda out: loss_fn(out, y), context)
        if self.is_last:
            return value
        return out.sum() * 0.0

    def reduce(self, value: "torch.Tensor | float | int | None") -> float:
        """Collective: the last rank's value (a one-element tensor or a real
        number) as a float on every rank; call it on every rank (the value
        of the other ranks is ignored).  A value that is not a number raises
        TypeError on every rank."""
        def number():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise TypeError(f"reduce: the value is a tensor of shape "
                                    f"{tuple(value.shape)}; give one number (e.g. the loss)")
                return float(value.detach())
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"reduce: the value must be a number or a one-element "
                                f"tensor, not {type(value).__name__}")
            return float(value)

        self.body._check_open()
        return from_root(self.comm, self.body.last_rank, number, error_type=TypeError,
                         what="a value from the last rank")

    def close(self) -> None:
        """Collective: free the layer-parallel body's solvers and
        communicators (see ``LayerParallel.close``)."""
        self.body.close()
        self.comm = None

    @property
    def closed(self):
        return self.body.closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def serial_equivalent(self, root: "int | None" = None) -> "nn.Sequential | None":
        """Collective: opening + N residual layers + closing as one
        ``nn.Sequential`` with the same weights."""
        layers = self.body.serial_layers(root)
        ends = _collect(self.comm, (self.opening.state_dict() if self.is_first else None,
                                    self.closing.state_dict() if self.is_last else None), root)
        if layers is None:
            return None
        opening = load_state(_seeded(self.body.seed, -1, self._opening_factory),
                             ends[self.body.first_rank][0])
        closing = load_state(_seeded(self.body.seed, -2, self._closing_factory),
                             ends[self.body.last_rank][1])
        return SerialStack(opening, *layers, closing)
