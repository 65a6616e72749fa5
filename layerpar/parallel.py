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

A network holds MPI communicators: close it (or use it in a ``with``
block) on every rank when done; garbage collection never frees them.
"""
import math

import torch
from mpi4py import MPI
from torch import nn

from braid_ext import MGRITError, Solver, check_options
from layerpar import partition
from layerpar._collective import agree, check_comm, from_root
from layerpar._tags import tag
from layerpar._watchdog import check_timeout, guard, recv, set_timeout, timeout_of
from layerpar.apps import AdjointApp, ForwardApp
from layerpar.pipeline import SCHEDULES, Pipeline, PipelineFunction, split_sizes
from layerpar.models import (call_module, is_stochastic, layer_rng, set_training_flags,
                             training_flags)
from layerpar.steps import ResidualLayer


def _seeded(seed, n, make):
    """make() under the torch RNG seeded by (seed, n), leaving the global RNG
    as it was: the same layer gets the same weights on any number of ranks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + n) % (2**63))
        return make()


def _load(module, state, device=None):
    """Load a state dict into a module built with default dtype, taking the
    state's dtype (and ``device``)."""
    ref = next(iter(state.values()), None)
    if ref is not None:
        module.to(dtype=ref.dtype, device=device)
    module.load_state_dict(state)
    return module


def _collect(comm, obj, root):
    """Collective: every rank's obj, on ``root`` (None = every rank); None
    on the other ranks."""
    guard(comm, "collecting the layers")
    return comm.allgather(obj) if root is None else comm.gather(obj, root=root)


# the Solver's option names -> this module's names, per solve
_OPTION_NAMES = {"max_iter": ("fwd_iters", "bwd_iters"), "abs_tol": ("fwd_tol", "bwd_tol"),
                 "rel_tol": ("fwd_rel_tol", "bwd_rel_tol")}


def _option_message(message, prefix):
    """A Solver's message about its option, in this module's names (the
    backward solve's options start with bwd_)."""
    name = message.split("=", 1)[0]
    if name in _OPTION_NAMES:
        return _OPTION_NAMES[name][1 if prefix else 0] + message[len(name):]
    if prefix and name in ("max_levels", "cfactor", "relax", "cycle"):
        return prefix + message
    return message


def _timeout(value, comm):
    """The timeout: the argument, else the limit set on ``comm``
    (``layerpar.set_timeout``), else $LAYERPAR_TIMEOUT, else none."""
    if value is None:
        return timeout_of(comm)
    return check_timeout(value)


class LayerParallel(nn.Module):
    """N residual layers u <- u + h*F_n(u), h = T/N, split over ``comm``.

    step_factory(n) builds F_n, an ``nn.Module`` that keeps the state's
    shape; each rank builds only the layers it holds (``layer_indices``),
    seeded per layer so the weights do not depend on the number of ranks.

    Keyword-only MGRIT options, for both solves unless prefixed:
      max_levels   1 = exact layer-serial propagation across ranks (default:
                   each rank runs its block of layers as one autograd graph,
                   forward and back, layerpar.pipeline); more levels =
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
      schedule     the pipeline's schedule: 'gpipe' (default) or '1f1b'
                   (one forward, one backward: at most P micro-batches'
                   graphs held per rank instead of all of them); 1F1B runs
                   in ``Network.loss_and_backward``, which computes the loss
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

    Step modules may hold frozen parameters (no gradient), buffers and
    train/eval behaviour (dropout, batch norm): they run under the policy of
    ``layerpar.models`` (ghost copies in the owner's mode, random draws seeded
    per forward pass and layer, buffers updated once per pass in the final
    sweep).  ``passes`` counts the forward passes (it keys the random draws;
    a checkpoint stores it).

    forward(u0): u0 is the input state on rank 0 (other ranks may pass None).
    Returns u_N on the last rank and a zero-size placeholder elsewhere; call
    backward on every rank (``Network`` does this for you).

    ``close()`` (collective) frees the solvers and the communicators the
    module duplicated; ``with LayerParallel(...) as body:`` closes at the end.
    """

    _store = "C"  # the solvers' storage (see _new_solver)

    def __init__(self, step_factory, nlayers, T, comm, *, max_levels=1, cfactor=4,
                 relax="FCF", cycle="V", min_coarse=2, skip=False, fwd_iters=2,
                 bwd_iters=1, fwd_tol=0.0, bwd_tol=0.0, fwd_rel_tol=0.0,
                 bwd_rel_tol=0.0, bwd_max_levels=None, bwd_cfactor=None,
                 bwd_relax=None, bwd_cycle=None, warm_start=False, retain_graphs=False,
                 seed=0, microbatches=1, schedule="gpipe", solver_cache=4, timeout=None):
        super().__init__()
        check_comm(comm)
        if not callable(step_factory):
            raise TypeError("step_factory must be callable: step_factory(n) -> nn.Module")
        if not isinstance(nlayers, int) or isinstance(nlayers, bool) or nlayers < 1:
            raise ValueError(f"nlayers={nlayers!r}: the number of layers must be an integer >= 1")
        if comm.Get_size() > nlayers:
            raise ValueError(f"nlayers={nlayers} is smaller than the number of ranks "
                             f"({comm.Get_size()}): every rank must hold at least one layer")
        if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
            raise ValueError(f"T={T!r}: the final time must be a finite number > 0")
        if not isinstance(microbatches, int) or isinstance(microbatches, bool) \
                or microbatches < 1:
            raise ValueError(f"microbatches={microbatches!r}: the number of micro-batches "
                             "must be an integer >= 1")
        self.microbatches = microbatches
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
        self.schedule = schedule
        if not isinstance(solver_cache, int) or isinstance(solver_cache, bool) \
                or solver_cache < 1:
            raise ValueError(f"solver_cache={solver_cache!r}: the number of solver pairs "
                             "to keep must be an integer >= 1")
        self.solver_cache = solver_cache
        timeout = _timeout(timeout, comm)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed={seed!r}: must be an integer")
        for name, v in (("warm_start", warm_start), ("retain_graphs", retain_graphs)):
            if not isinstance(v, (bool, int)) or v not in (0, 1):
                raise ValueError(f"{name}={v!r}: must be True or False")
        fwd = dict(max_levels=max_levels, cfactor=cfactor, relax=relax, cycle=cycle,
                   min_coarse=min_coarse, skip=skip, max_iter=fwd_iters, abs_tol=fwd_tol,
                   rel_tol=fwd_rel_tol, warm_start=warm_start, timeout=timeout)
        bwd = dict(fwd, max_iter=bwd_iters, abs_tol=bwd_tol, rel_tol=bwd_rel_tol)
        for key, val in (("max_levels", bwd_max_levels), ("cfactor", bwd_cfactor),
                         ("relax", bwd_relax), ("cycle", bwd_cycle)):
            if val is not None:
                bwd[key] = val
        # every option is checked here, on every rank alike, before any message
        for prefix, opts in (("", fwd), ("bwd_", bwd)):
            try:
                check_options(nlayers, comm.Get_size(), **opts)
            except ValueError as e:
                raise ValueError(_option_message(str(e), prefix)) from None
        self.comm = comm.Dup()  # our own messages never meet the user's
        # the limit of every wait on it and its duplicates, outside the solves too
        set_timeout(self.comm, timeout or 0.0)
        self._comms = {}  # further duplicates by purpose (communicator())
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.nlayers, self.T, self.h = nlayers, float(T), float(T) / nlayers
        self.step_factory = step_factory
        self.seed = seed
        self.retain_graphs = bool(retain_graphs)

        self.fwd_options, self.bwd_options = fwd, bwd
        # Build both solvers now: a bad option raises here, on every rank.
        self._fwd_app, self._bwd_app = ForwardApp(self), AdjointApp(self)
        self._fwd_solver = self._bwd_solver = None
        # solver pairs not in use, by _pair_key (least recently used first);
        # the pair in use is bound to a state meta at the first pass
        self._pairs = {}
        try:
            self._fwd_solver = self._new_solver(self._fwd_app, fwd, reverse=False)
            self._bwd_solver = self._new_solver(self._bwd_app, bwd, reverse=True)
        except BaseException:
            self.close()  # every rank raises here alike (options are checked everywhere)
            raise
        self._pair_in_use = self._pair_key(None, fwd, bwd)
        self._key_options = {self._pair_in_use: (fwd, bwd)}  # key -> (fwd, bwd) options
        self.layout = self._fwd_solver.layout()  # which rank holds which layer
        self.layer_indices = self.layout.layers(self.rank)
        self.layers = nn.ModuleDict()
        for n in self.layer_indices:
            self.layers[str(n)] = self._make_layer(n)
        self._layer_modules = None  # per local layer (module, submodules, shares a parameter)
        self._ghosts = {}
        self._plan_ghosts()
        self._pipeline = Pipeline(self)
        self._anchor = torch.zeros((), requires_grad=True)  # keeps every rank in autograd
        self._graphs = {}
        self._record = True
        self._grads = {}
        self._state_meta = None
        self.passes = 0          # forward passes so far: keys the layers' random draws
        self._pass_index = 0
        self._call_plan = {}
        self._kinds = {}
        self.last_forward = {"iterations": 0, "residual_norms": [], "steps": [],
                             "virtual_time": 0.0, "input_norm": 0.0}
        self.last_backward = dict(self.last_forward)

    # ---- lifetime -----------------------------------------------------------
    def close(self):
        """Collective: free the solvers (and every state they hold) and the
        duplicated communicators.  Using the module afterwards raises;
        closing twice does nothing."""
        if self.comm is None:
            return
        pairs = list(self._pairs.values()) + [(self._fwd_solver, self._bwd_solver)]
        self._pairs = {}
        for pair in pairs:
            for solver in pair:
                if solver is not None:
                    solver.close()
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

    # ---- construction helpers ------------------------------------------
    def _make_layer(self, n):
        F = _seeded(self.seed, n, lambda: self.step_factory(n))
        if not isinstance(F, nn.Module):
            raise TypeError(f"step_factory({n}) returned {type(F).__name__}, not an nn.Module")
        return F

    def _new_solver(self, app, opts, reverse):
        # opts holds exactly the Solver options the user may choose.  Between
        # sweeps the solvers keep only the points read later (store='C'): the
        # C-points (a warm start's F-relaxation recomputes the F-points from
        # them), the last point (u_N, or the adjoint's dloss/du_0) and on one
        # level the two ends.  The forward F-points the adjoint needs live in
        # the layers' graphs (their inputs) until backward frees them, and an
        # adjoint point is only read by the next step.
        t0, t1 = (self.T, 0.0) if reverse else (0.0, self.T)
        return Solver(app, self.comm, t0, t1, self.nlayers, **opts, reverse=reverse,
                      store=self._store, final_sweep=True)

    def _plan_ghosts(self):
        """Which layer weights go where before each forward solve: the layers
        this rank steps with on coarse grids but does not hold (received), and
        those of its own layers that other ranks step with (sent)."""
        fwd = self.fwd_options
        levels = partition.hierarchy(self.nlayers, fwd["max_levels"], fwd["cfactor"],
                                     fwd["min_coarse"])
        mine = set(self.layer_indices)
        self._ghost_indices = []
        self._ghost_sends = []  # (rank, layer)
        if len(levels) < 2:
            return
        self._ghost_indices = sorted(
            partition.coarse_step_layers(self.nlayers, self.size, self.rank, levels) - mine)
        for q in range(self.size):
            if q != self.rank:
                wanted = partition.coarse_step_layers(self.nlayers, self.size, q, levels)
                self._ghost_sends += [(q, n) for n in sorted(wanted & mine)]

    def reconfigure(self, *, max_levels=None, bwd_max_levels=None, fwd_iters=None,
                    bwd_iters=None, warm_start=None):
        """Change MGRIT options between passes (e.g. more iterations, or
        max_levels=1 for exact propagation), checked here.  The next pass
        takes the solvers for the new options from the cache of solver pairs
        or builds them (collective then); switching back to earlier options
        finds their solvers again, with their warm states (``solver_cache``)."""
        self._check_open()
        fwd, bwd = dict(self.fwd_options), dict(self.bwd_options)
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
        for prefix, opts in (("", fwd), ("bwd_", bwd)):
            try:
                check_options(self.nlayers, self.size, **opts)
            except ValueError as e:
                raise ValueError(_option_message(str(e), prefix)) from None
        self.fwd_options, self.bwd_options = fwd, bwd
        self._plan_ghosts()

    @staticmethod
    def _pair_key(meta, fwd, bwd):
        return (meta, repr(sorted(fwd.items())), repr(sorted(bwd.items())))

    def _use_pair(self, meta):
        """Collective: make the solver pair for the state ``meta`` and the
        current options the one in use: from the cache, with its warm
        states, or new.  The pair in use goes to the cache (unless it never
        solved); past ``solver_cache`` pairs the least recently used is
        closed.  Every rank switches alike (same calls, same order)."""
        key = self._pair_key(meta, self.fwd_options, self.bwd_options)
        if key == self._pair_in_use:
            return
        if self._pair_in_use[0] is None and key[1:] == self._pair_in_use[1:]:
            self._key_options[key] = self._key_options.pop(self._pair_in_use)
            self._pair_in_use = key  # the pair built at construction: still unused
            return
        pair = self._pairs.pop(key, None)
        if pair is None:
            new_fwd = self._new_solver(self._fwd_app, self.fwd_options, reverse=False)
            try:
                new_bwd = self._new_solver(self._bwd_app, self.bwd_options, reverse=True)
            except BaseException:
                new_fwd.close()
                raise
            pair = (new_fwd, new_bwd)
            if meta == self._pair_in_use[0]:  # same states, other options (e.g. iterations)
                self._carry_states((self._fwd_solver, self._bwd_solver), pair)
        self._key_options[key] = (self.fwd_options, self.bwd_options)
        old = (self._fwd_solver, self._bwd_solver)
        if self._pair_in_use[0] is None:
            for solver in old:
                solver.close()
            self._key_options.pop(self._pair_in_use, None)
        else:
            self._pairs[self._pair_in_use] = old
        while len(self._pairs) >= self.solver_cache:
            gone = next(iter(self._pairs))
            for solver in self._pairs.pop(gone):
                solver.close()
            self._key_options.pop(gone, None)
        self._fwd_solver, self._bwd_solver = pair
        self._pair_in_use = key

    @staticmethod
    def _carry_states(old, new):
        """Local: the warm states of a pair, copied into a new pair for the
        same states that warm-starts on more than one level (a change of
        the iteration count keeps a one-shot run warm)."""
        for src, dst in zip(old, new):
            if not (dst.options["warm_start"] and dst.options["max_levels"] > 1):
                continue
            lo, hi = src.local_range(0)
            try:
                held = {i: src.get(i) for i in range(lo, hi + 1) if src.is_stored(i)}
            except ValueError:  # no solution held
                continue
            for i, u in held.items():
                dst.set(i, u.detach().clone())

    # ---- warm states (one-shot): saved and restored ----------------------
    def warm_states(self):
        """This rank's solver states, for a checkpoint: a list of (state meta,
        forward options, backward options, {"fwd": {index: tensor}, "bwd":
        {index: tensor}} at each solver's stored points, the C-points and the
        last point), one per solver pair used for a state shape, the cached
        pairs from the least recently used, the pair in use last; the same
        pairs on every rank, with no points where a solver holds no solution
        or keeps no point on this rank.  Local; ``load_warm_states`` on the
        same number of ranks restores them."""
        self._check_open()
        out = []
        pairs = list(self._pairs.items()) + \
            [(self._pair_in_use, (self._fwd_solver, self._bwd_solver))]
        for key, pair in pairs:
            if key[0] is None:
                continue
            held = {}
            for name, solver in zip(("fwd", "bwd"), pair):
                lo, hi = solver.local_range(0)
                try:
                    held[name] = {i: solver.get(i).detach().clone()
                                  for i in range(lo, hi + 1) if solver.is_stored(i)}
                except ValueError:  # no solution held (e.g. no adjoint solve yet)
                    held[name] = {}
            # listed even without points: a rank that keeps no point (store
            # 'C') lists the pairs the others list
            out.append((key[0], dict(self._key_options[key][0]),
                        dict(self._key_options[key][1]), held))
        return out

    def load_warm_states(self, states, *, owned_only=False):
        """Collective: rebuild the solver pairs of ``warm_states()`` (saved on
        the same number of ranks) with their states, the last one in use;
        the pairs held so far are closed.  The options stay as they are.
        ``owned_only``: the states may hold other ranks' points too (merged
        from every rank); only this rank's stored points are installed.
        States that hold F-points too (saved by solvers that kept every
        point) load alike: the warm start recomputes the F-points."""
        self._check_open()
        old = list(self._pairs.values()) + [(self._fwd_solver, self._bwd_solver)]
        self._pairs = {}
        self._fwd_solver = self._bwd_solver = None
        for pair in old:
            for solver in pair:
                solver.close()
        pair = key = None
        for meta, fwd, bwd, held in states:
            if pair is not None:
                self._pairs[key] = pair
            pair = (self._new_solver(self._fwd_app, fwd, reverse=False),
                    self._new_solver(self._bwd_app, bwd, reverse=True))
            key = self._pair_key(meta, fwd, bwd)
            self._key_options[key] = (fwd, bwd)
            for name, solver in zip(("fwd", "bwd"), pair):
                lo, hi = solver.local_range(0)
                for i, u in held[name].items():
                    try:
                        solver.set(int(i), u.detach().clone())
                    except ValueError:
                        # an F-point of this rank (saved by a solver that kept
                        # every point; the warm start recomputes it), or with
                        # owned_only another rank's point
                        if not (owned_only or lo <= int(i) <= hi):
                            raise
        if pair is None:  # nothing saved: a fresh pair for the current options
            pair = (self._new_solver(self._fwd_app, self.fwd_options, reverse=False),
                    self._new_solver(self._bwd_app, self.bwd_options, reverse=True))
            key = self._pair_key(None, self.fwd_options, self.bwd_options)
            self._key_options[key] = (self.fwd_options, self.bwd_options)
        self._fwd_solver, self._bwd_solver = pair
        self._pair_in_use = key

    def _local_params(self):
        """The parameters of the local layers in ``parameters()`` order,
        layer by layer, read from each submodule's own table: the layers'
        module structure is fixed at construction (a parameter replaced on
        a submodule is seen), so the walk through the module tree is done
        once, not at every pass."""
        if self._layer_modules is None:
            mods = []
            for n in self.layer_indices:
                F = self.layers[str(n)]
                subs = tuple(F.modules())
                # a parameter shared by two submodules: parameters() lists it once
                shared = len(tuple(F.parameters())) != sum(
                    p is not None for m in subs for p in m._parameters.values())
                mods.append((F, subs, shared))
            self._layer_modules = mods
        out = []
        for F, subs, shared in self._layer_modules:
            if shared:
                out.extend(F.parameters())
            else:
                out.extend(p for m in subs for p in m._parameters.values() if p is not None)
        return tuple(out)

    # ---- the local layers by global index ----------------------------------
    def layer(self, n):
        """The module of local layer ``n`` (a global index this rank holds)."""
        try:
            return self.layers[str(n)]
        except KeyError:
            raise KeyError(f"layer {n} is not held by rank {self.rank} (it holds "
                           f"{self.layer_indices.start}..{self.layer_indices.stop - 1})") from None

    def params_by_layer(self, *, buffers=False):
        """{global layer index: {name: tensor}} of the local layers'
        parameters themselves (for optimisers and gradients), and with
        ``buffers`` their buffers too (running statistics)."""
        out = {}
        for n in self.layer_indices:
            F = self.layers[str(n)]
            d = dict(F.named_parameters())
            if buffers:
                d.update(F.named_buffers())
            out[n] = d
        return out

    def state_by_layer(self):
        """{global layer index: state dict} of the local layers (detached
        parameters and persistent buffers): what a checkpoint or a transfer
        between depths moves."""
        return {n: self.layers[str(n)].state_dict() for n in self.layer_indices}

    def load_state_by_layer(self, states):
        """Load {global layer index: state dict} into the local layers: every
        local layer must be given (other layers are ignored)."""
        missing = [n for n in self.layer_indices if n not in states]
        if missing:
            raise KeyError(f"load_state_by_layer: no state for local layers {missing} on "
                           f"rank {self.rank}")
        with torch.no_grad():
            for n in self.layer_indices:
                self.layers[str(n)].load_state_dict(states[n])

    def _step_module(self, n):
        key = str(n)
        if key in self.layers:
            return self.layers[key]
        return self._ghosts[n]

    @property
    def first_rank(self):
        return 0

    @property
    def last_rank(self):
        return self.size - 1

    # ---- coarse-grid weights from other ranks ----------------------------
    def _exchange_ghosts(self):
        """Send the weights of our layers that other ranks step with on coarse
        grids; receive the ones we step with but do not hold."""
        requests = []
        for q, n in self._ghost_sends:
            F = self.layers[str(n)]
            # to rank q: layer n's weights and buffers, and its submodules' train/eval flags
            state = {k: v.detach().cpu() for k, v in F.state_dict().items()}
            requests.append(self.comm.isend((state, training_flags(F)), dest=q,
                                            tag=tag("ghost.layer", n)))
        for n in self._ghost_indices:
            state, flags = recv(self.comm, self.layout.owner(n), tag("ghost.layer", n),
                                f"the coarse-grid weights of layer {n}")
            if n not in self._ghosts:
                self._ghosts[n] = self._make_layer(n)
            ghost = _load(self._ghosts[n], state, self._state_meta[2]).requires_grad_(False)
            set_training_flags(ghost, flags)  # a ghost runs in its owner's mode
        MPI.Request.waitall(requests)

    # ---- module state (the policy of layerpar.models) ----------------------
    def _plan_calls(self):
        """For this pass: which step modules draw random numbers (random and
        in training mode) and which must keep their buffers outside the final
        sweep (buffers and in training mode; ghosts' buffers are replaced
        before every solve).  Modules that do neither are left out."""
        self._local_params()  # the local layers' submodules
        plan = {}
        for n, (F, subs, _) in zip(self.layer_indices, self._layer_modules):
            kind = self._kind(n, F)
            if kind[0] or kind[1]:
                training = any(m.training for m in subs)
                plan[n] = (training and kind[0], training and kind[1])
        for n, F in self._ghosts.items():
            kind = self._kind(n, F)
            if kind[0]:
                plan[n] = (any(training_flags(F)), False)
        self._call_plan = plan

    def _kind(self, n, F):
        """(random, has buffers) of step module n: fixed by its build."""
        kind = self._kinds.get(n)
        if kind is None:
            kind = self._kinds[n] = (is_stochastic(F), next(F.buffers(), None) is not None)
        return kind

    def _call_step(self, n, F, u, final, part=None):
        """F_n(u) under the module-state policy: random draws seeded by
        (seed, pass, n) (and the micro-batch ``part`` of a pipelined pass
        with several); buffers restored after a call outside the final
        sweep."""
        stochastic, buffered = self._call_plan.get(n, (False, False))
        if not stochastic and not (buffered and not final):
            return F(u)
        rng = (self.seed, self._pass_index, n, u.device, part) if stochastic else None
        return call_module(F, u, rng=rng, keep_buffers=buffered and not final)

    # ---- checks at the first call and when the state shape changes -------
    def _check_shapes(self, shape, dtype, device):
        msg = None
        try:
            probe = torch.zeros(shape, dtype=dtype, device=device)
            for n in self.layer_indices:
                F = self.layers[str(n)]
                for p in F.parameters():
                    if p.dtype != dtype:
                        raise ValueError(f"dtype mismatch: the input state is {dtype} but layer "
                                         f"{n} has parameters of {p.dtype}; convert the model "
                                         "(e.g. .double()) or the input")
                with torch.no_grad():  # leaves buffers and the global RNG as they were
                    out = call_module(F, probe, rng=(self.seed, 0, n, device),
                                      keep_buffers=True)
                if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ValueError(f"layer {n}: step_factory's module maps a state of shape "
                                     f"{tuple(shape)} to {got}; a residual step must keep the "
                                     "shape")
        except ValueError as e:
            msg = str(e)
        except Exception as e:  # any failure of a user module, reported everywhere
            msg = f"{type(e).__name__}: {e}"
        agree(self.comm, msg)

    def _prepare(self, u0):
        """Collective: agree on the state's shape, dtype and device (from the
        rank holding the input) and rebuild what depends on them.  A bad
        input on the first rank raises there and TypeError everywhere else."""
        self._check_open()

        def meta_of_input():
            if not isinstance(u0, torch.Tensor):
                raise TypeError(f"the input state on rank {self.rank} must be a tensor, "
                                f"not {type(u0).__name__}")
            return (tuple(u0.shape), u0.dtype, str(u0.device))

        meta = from_root(self.comm, self.first_rank, meta_of_input, error_type=TypeError,
                         what="the input state's shape from the first rank")
        shape, dtype, device = meta[0], meta[1], torch.device(meta[2])
        if meta != self._state_meta:
            self._check_shapes(shape, dtype, device)
            self._state_meta = meta
        # the solvers (and warm states) for this state and the current options
        self._use_pair(meta)
        return shape, dtype, device

    # ---- the solves ---------------------------------------------------------
    def _input_norm(self, v, root):
        """Collective: the 2-norm of a solve's given state (the input state,
        or the adjoint's final value), held on ``root``, on every rank."""
        # root -> every rank: one number
        guard(self.comm, "the norm of a solve's given state")
        return self.comm.bcast(float(torch.linalg.vector_norm(v.detach()))
                               if self.rank == root else None, root=root)

    @staticmethod
    def _solve(solver):
        solver.solve()
        st = solver.stats()  # the clock is agreed over the ranks at the end of a solve
        return {"iterations": solver.iterations, "residual_norms": solver.residual_norms,
                "steps": st["steps"], "virtual_time": st["virtual_time"]}

    def forward(self, u0=None):
        shape, dtype, device = self._prepare(u0)
        if self.rank != self.first_rank or u0 is None:
            u0 = torch.zeros((), dtype=dtype, device=device)
        # without autograd (evaluation) no layer graphs are kept
        self._record = torch.is_grad_enabled()
        self._pass_index, self.passes = self.passes, self.passes + 1
        if self.pipelined and self.size == 1 and self.microbatches == 1 \
                and not self.retain_graphs:
            # nothing to send: the layers go on the caller's graph (backward
            # twice then needs retain_graph=True, hence not with retain_graphs)
            return self._pipeline.on_graph(u0)
        params = self._local_params()
        if self.pipelined:
            return PipelineFunction.apply(self, (shape, dtype, device), self._anchor, u0,
                                          *params)
        return _MGRITFunction.apply(self, (shape, dtype, device), self._anchor, u0, *params)

    @property
    def pipelined(self):
        """Whether passes are exact, layer-serial across the ranks
        (``layerpar.pipeline``, with ``microbatches`` micro-batches): one
        level both ways.  Each rank then runs its layers as one block, one
        autograd graph per micro-batch, instead of through the solvers."""
        return self.fwd_options["max_levels"] == 1 and self.bwd_options["max_levels"] == 1

    def _forward_solve(self, u0, shape, dtype, device):
        """u_N (last rank) or a placeholder, and the layers' graphs of this
        pass (kept by the autograd context: each forward has its own)."""
        self._exchange_ghosts()
        self._plan_calls()
        self._graphs = graphs = {}
        self._fwd_app.configure(shape, dtype, device)
        self._fwd_app.u0 = u0
        try:
            self.last_forward = self._solve(self._fwd_solver)
        finally:
            self._fwd_app.u0 = None
        self.last_forward["input_norm"] = self._input_norm(u0, self.first_rank)
        self._graphs = {}
        if self.rank == self.last_rank:
            return self._fwd_solver.get(self.nlayers).clone(), graphs
        return torch.zeros(0, dtype=dtype, device=device), graphs

    def _backward_solve(self, graphs, grad_out, shape, dtype, device):
        self._grads.clear()
        lam = None
        if self.rank == self.last_rank:
            lam = grad_out if grad_out is not None and grad_out.shape == shape \
                else torch.zeros(shape, dtype=dtype, device=device)
        self._bwd_app.configure(shape, dtype, device)
        self._bwd_app.lam_final = lam
        self._graphs = graphs
        try:
            self.last_backward = self._solve(self._bwd_solver)
        finally:
            if not self.retain_graphs:
                graphs.clear()
            self._graphs = {}
            self._bwd_app.lam_final = None
        self.last_backward["input_norm"] = self._input_norm(lam, self.last_rank)
        grad_u0 = None
        if self.rank == self.first_rank:
            grad_u0 = self._bwd_solver.get(self.nlayers).clone()
        grads = []
        for n in self.layer_indices:
            gs = self._grads.get(n)
            if gs is None:
                raise MGRITError(f"no gradient was computed for layer {n}")
            grads.extend(gs)
        return grad_u0, grads

    # ---- whole-model helpers ------------------------------------------------
    def gather_layers(self, root=None):
        """Collective: {global layer index: state_dict} of all layers, on
        ``root`` (None = every rank)."""
        mine = {n: {k: v.detach().cpu().clone() for k, v in self.layers[str(n)].state_dict().items()}
                for n in self.layer_indices}
        parts = _collect(self.comm, mine, root)
        if parts is None:
            return None
        out = {}
        for p in parts:
            out.update(p)
        return out

    def serial_layers(self, root=None):
        """Collective: the N layers as ordinary ``ResidualLayer`` modules with
        the same weights, on ``root`` (None = every rank)."""
        states = self.gather_layers(root)
        if states is None:
            return None
        layers = []
        for n in range(self.nlayers):
            layers.append(ResidualLayer(_load(self._make_layer(n), states[n]), self.h))
        return layers

    def serial_equivalent(self, root=None):
        """Collective: an ``nn.Sequential`` of the N residual layers with the
        same weights, for checking and for inference on one process."""
        layers = self.serial_layers(root)
        return None if layers is None else nn.Sequential(*layers)

    def extra_repr(self):
        return (f"nlayers={self.nlayers}, T={self.T}, ranks={self.size}, "
                f"local layers={self.layer_indices.start}..{self.layer_indices.stop - 1}, "
                f"max_levels={self.fwd_options['max_levels']}")


class _MGRITFunction(torch.autograd.Function):
    """Forward: MGRIT across ranks.  Backward: adjoint MGRIT, backward in
    layer-time; gradients for the input state (rank 0) and the local layers'
    parameters (the trailing inputs)."""

    @staticmethod
    def forward(ctx, net, meta, anchor, u0, *params):
        out, ctx.graphs = net._forward_solve(u0, *meta)
        ctx.net, ctx.meta = net, meta
        return out

    @staticmethod
    def backward(ctx, grad_out):
        net = ctx.net
        grad_u0, grads = net._backward_solve(ctx.graphs, grad_out, *ctx.meta)
        if grad_u0 is None or not ctx.needs_input_grad[3]:
            grad_u0 = None
        return (None, None, None, grad_u0, *grads)


class Network(nn.Module):
    """Opening layer (first rank) + LayerParallel + closing layer (last rank).

    opening_factory() and closing_factory() build the opening and closing
    modules (seeded, on the rank that uses them); the remaining arguments are
    those of LayerParallel.
    """

    def __init__(self, opening_factory, step_factory, closing_factory, *, nlayers, T, comm,
                 seed=0, **mgrit_options):
        super().__init__()
        self.body = LayerParallel(step_factory, nlayers, T, comm, seed=seed, **mgrit_options)
        self.comm = self.body.comm
        self.rank = self.body.rank
        self.opening = _seeded(seed, -1, opening_factory) \
            if self.rank == self.body.first_rank else None
        self.closing = _seeded(seed, -2, closing_factory) \
            if self.rank == self.body.last_rank else None
        self._opening_factory, self._closing_factory = opening_factory, closing_factory

    @property
    def is_first(self):
        return self.rank == self.body.first_rank

    @property
    def is_last(self):
        return self.rank == self.body.last_rank

    def forward(self, x=None):
        """Class scores on the last rank; a placeholder elsewhere."""
        p = self.body.passes  # the pass the body is about to run
        u0 = self._call_end(self.opening, x, p, -1) if self.is_first else None
        uN = self.body(u0)
        return self._call_end(self.closing, uN, p, -2) if self.is_last else uN

    def _call_end(self, module, x, pass_index, layer):
        """The opening (layer -1) or closing (-2), with its random draws
        seeded like a layer's: the same on any number of ranks."""
        if is_stochastic(module) and any(training_flags(module)):
            with layer_rng(self.body.seed, pass_index, layer, x.device):
                return module(x)
        return module(x)

    def loss_and_backward(self, x, y, loss_fn, *, reduction="mean"):
        """Collective: the loss of the batch and its gradient, accumulated in
        every parameter's ``.grad`` as ``self.loss(x, y, loss_fn).backward()``
        does.  Returns (loss, class scores), both detached: on the last rank
        the loss and the scores of the batch, elsewhere a zero and a
        placeholder.  Only the first rank needs ``x`` and only the last ``y``.

        With the pipeline (``microbatches`` > 1, one level) and
        ``schedule='1f1b'`` the forward and backward passes of the
        micro-batches interleave (``layerpar.pipeline``): the closing layer
        and the loss run per micro-batch, so ``loss_fn`` must be a mean
        (``reduction='mean'``, like ``cross_entropy``'s default: micro-batch
        losses weighted by their share of the batch) or a sum
        (``reduction='sum'``) over the samples."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r}: choose mean or sum")
        body = self.body
        if not (body.pipelined and body.schedule == "1f1b"):
            out = self(x)
            loss = loss_fn(out, y) if self.is_last else out.sum() * 0.0
            loss.backward()
            return loss.detach(), out.detach()
        return self._train_1f1b(x, y, loss_fn, reduction)

    def _train_1f1b(self, x, y, loss_fn, reduction):
        body = self.body
        p = body.passes  # the pass the body is about to run
        parts, head = None, None
        if self.is_first:
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"the input on rank {self.rank} must be a tensor, "
                                f"not {type(x).__name__}")
            parts = x.tensor_split(len(split_sizes(len(x), body.microbatches)))
            head = self._call_end(self.opening, parts[0], p, -1)  # its state's shape
            # a state of the batch's shape (no storage): what the body checks
            probe = head.detach().new_zeros(()).expand((len(x),) + tuple(head.shape[1:]))
        shape, dtype, device = body._prepare(probe if self.is_first else None)
        body._record = True
        body._pass_index, body.passes = p, p + 1
        B = shape[0]
        labels = y.tensor_split(len(split_sizes(B, body.microbatches))) if self.is_last else None
        scores = []

        def first(i):
            return head if i == 0 else self._call_end(self.opening, parts[i], p, -1)

        def last(i, u):
            out = self._call_end(self.closing, u, p, -2)
            scores.append(out.detach())
            loss = loss_fn(out, labels[i])
            return loss * (len(labels[i]) / B) if reduction == "mean" else loss

        total = body._pipeline.train_1f1b(first, last, shape, dtype, device)
        if self.is_last:
            return total, torch.cat(scores)
        return torch.zeros((), dtype=dtype, device=device), torch.zeros(0, dtype=dtype,
                                                                         device=device)

    def loss(self, x, y, loss_fn):
        """The loss on the last rank; elsewhere a zero connected to the
        layer-parallel pass, so that ``loss.backward()`` on every rank runs
        the adjoint solve everywhere.  Only the first rank needs ``x`` and
        only the last ``y``."""
        out = self(x)
        if self.is_last:
            return loss_fn(out, y)
        return out.sum() * 0.0

    def reduce(self, value):
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

    def close(self):
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

    def serial_equivalent(self, root=None):
        """Collective: opening + N residual layers + closing as one
        ``nn.Sequential`` with the same weights."""
        layers = self.body.serial_layers(root)
        ends = _collect(self.comm, (self.opening.state_dict() if self.is_first else None,
                                    self.closing.state_dict() if self.is_last else None), root)
        if layers is None:
            return None
        opening = _load(_seeded(self.body.seed, -1, self._opening_factory),
                        ends[self.body.first_rank][0])
        closing = _load(_seeded(self.body.seed, -2, self._closing_factory),
                        ends[self.body.last_rank][1])
        return nn.Sequential(opening, *layers, closing)
