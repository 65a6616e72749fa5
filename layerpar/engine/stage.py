"""A rank's stage: its block of residual layers and how they are called.

The stage holds the modules of the layers this rank owns (a contiguous block
of global indices) and the ghost copies of other ranks' layers that its
coarse-grid steps use (filled by ``layerpar.engine.ghosts``).  Every call of
a layer goes through ``Stage.call``, which applies the module-state policy
(``layerpar.engine.policy``) of the pass: random draws seeded by (seed, pass,
layer[, micro-batch]), buffers kept outside the final sweep, the pass's
context given to the layers that take it.  Both the MGRIT
apps and the pipeline step through a stage and a pass context; neither knows
the network around them.
"""
import torch

from layerpar.engine.policy import (call_module, is_stochastic, structure, takes_context,
                                    training_flags)

_PLAIN = (False, False, False)  # the call plan of a plain layer: F(u)


def load_state(module, state, device=None):
    """Load a state dict into a module built with the default dtype, taking
    the state's dtype (and ``device``)."""
    ref = next(iter(state.values()), None)
    if ref is not None:
        module.to(dtype=ref.dtype, device=device)
    module.load_state_dict(state)
    return module


class Stage:
    """The layers ``indices`` of a network of ``nlayers`` layers with step
    ``h``, seeded by ``seed``.  ``layers``: {str(n): module} (the network's
    ``nn.ModuleDict``, which registers them); ``make_layer(n)`` builds layer
    n as it was built (for ghost copies)."""

    def __init__(self, layers, indices, nlayers, h, seed, make_layer):
        self.layers = layers
        self.indices = indices
        self.nlayers = nlayers
        self.h = h
        self.seed = seed
        self.make_layer = make_layer
        self.ghosts = {}      # {n: module} of other ranks' layers stepped with here
        self._modules = None  # per local layer (module, submodules, shares a parameter)
        self._params = None   # the local layers' parameters, in parameters() order
        self._special = None  # [(n, F, submodules, kind)] of the local layers not plain
        self._kinds = {}      # {n: (random, has buffers, takes context)}
        self._version = None  # the module structure (policy.structure) they were read at

    # ---- modules and parameters ------------------------------------------------
    def module(self, n):
        """The module of layer n: a local layer or a ghost copy."""
        key = str(n)
        if key in self.layers:
            return self.layers[key]
        return self.ghosts[n]

    def _local_modules(self):
        """Per local layer (module, submodules, shares a parameter), walked
        again only after a module somewhere registered or replaced a
        submodule, parameter or buffer (a layer replaced in the network's
        ``ModuleDict`` too)."""
        if self._modules is None or self._version != structure():
            self._version = structure()
            mods = []
            for n in self.indices:
                F = self.layers[str(n)]
                subs = tuple(F.modules())
                # a parameter shared by two submodules: parameters() lists it once
                shared = len(tuple(F.parameters())) != sum(
                    p is not None for m in subs for p in m._parameters.values())
                mods.append((F, subs, shared))
            self._modules = mods
            self._params = self._special = None
            self._kinds = {}
        return self._modules

    def params(self):
        """The parameters of the local layers in ``parameters()`` order,
        layer by layer: a tuple kept until the module structure changes
        (``_local_modules``), so that a pass does not walk the modules."""
        mods = self._local_modules()
        if self._params is None:
            out = []
            for F, subs, shared in mods:
                if shared:
                    out.extend(F.parameters())
                else:
                    out.extend(p for m in subs for p in m._parameters.values() if p is not None)
            self._params = tuple(out)
        return self._params

    # ---- the module-state policy ------------------------------------------------
    def _kind(self, n, F):
        kind = self._kinds.get(n)
        if kind is None:
            kind = self._kinds[n] = (is_stochastic(F), next(F.buffers(), None) is not None,
                                     takes_context(F))
        return kind

    def plan_calls(self):
        """For a pass: {n: (draws random numbers, keeps its buffers outside
        the final sweep, takes the context)} for the step modules that do
        any (random and in training mode; buffers and in training mode;
        ghosts' buffers are replaced before every solve).  Modules that do
        none are left out."""
        mods = self._local_modules()
        if self._special is None:
            self._special = [(n, F, subs, self._kind(n, F))
                             for n, (F, subs, _) in zip(self.indices, mods)]
            self._special = [entry for entry in self._special if any(entry[3])]
        plan = {}
        for n, F, subs, kind in self._special:
            training = any(m.training for m in subs)
            plan[n] = (training and kind[0], training and kind[1], kind[2])
        for n, F in self.ghosts.items():
            kind = self._kind(n, F)
            if kind[0] or kind[2]:
                plan[n] = (kind[0] and any(training_flags(F)), False, kind[2])
        return plan

    def needs_context(self, ghost_layers=()):
        """Whether a layer this rank steps with takes the context: a local
        layer, or one of ``ghost_layers`` (other ranks' layers its coarse
        grids step with; their ghost copies are built now if not yet)."""
        for n in self.indices:
            if self._kind(n, self.layers[str(n)])[2]:
                return True
        for n in ghost_layers:
            if n not in self.ghosts:
                self.ghosts[n] = self.make_layer(n)
            if self._kind(n, self.ghosts[n])[2]:
                return True
        return False

    def call(self, n, u, ctx, *, final, part=None):
        """F_n(u) under the module-state policy of pass ``ctx``: random
        draws seeded by (seed, pass, n) (and the micro-batch ``part`` of a
        pipelined pass with several); buffers restored after a call outside
        the final sweep."""
        return self._call(n, self.module(n), u, ctx, final, part)

    def _call(self, n, F, u, ctx, final, part):
        stochastic, buffered, context = ctx.plan.get(n, _PLAIN)
        if not stochastic and not (buffered and not final):
            return F(u, context=ctx.context_of(part)) if context else F(u)
        rng = (self.seed, ctx.index, n, u.device, part) if stochastic else None
        kwargs = {"context": ctx.context_of(part)} if context else None
        return call_module(F, u, rng=rng, keep_buffers=buffered and not final, kwargs=kwargs)

    # ---- the block ----------------------------------------------------------------
    def block(self, x, ctx, record, *, detach=True, part=None):
        """The local layers on x (micro-batch ``part`` of several; None: the
        whole batch), as the final sweep runs them: (input leaf, output);
        with ``detach=False`` x itself is the input (its graph continues)."""
        h = self.h
        plan = ctx.plan
        with torch.set_grad_enabled(record):
            x_in = x.detach().requires_grad_(record) if detach else x
            y = x_in
            if not plan:
                # every local layer plain: F(u), nothing else to decide per layer
                for F, _, _ in self._local_modules():
                    y = torch.add(y, F(y), alpha=h)
            else:
                for n, (F, _, _) in zip(self.indices, self._local_modules()):
                    y = torch.add(y, self._call(n, F, y, ctx, True, part), alpha=h)
        return x_in, y

    def first_nonfinite(self, x, ctx, part=None):
        """Where the block's output turned NaN/Inf: the layers re-run on x
        (with the pass's random draws, buffers left as they are)."""
        if not torch.isfinite(x).all():
            return f"the input of layer {self.indices[0]} is NaN or Inf"
        with torch.no_grad():
            for n in self.indices:
                x = torch.add(x, self.call(n, x, ctx, final=False, part=part), alpha=self.h)
                if not torch.isfinite(x).all():
                    return f"layer {n} produced NaN or Inf"
        return f"layer {self.indices[-1]} produced NaN or Inf"

    # ---- checks --------------------------------------------------------------------
    def check_state(self, meta, context=None):
        """The first thing wrong with states of ``meta`` for the local
        layers (a parameter of another dtype, a layer that changes the
        shape or raises, given a context of the arrays ``context``: {name:
        (shape, dtype)}, filled with ones), or None.  Local; leaves buffers
        and the global RNG as they were."""
        shape, dtype, device = meta.shape, meta.dtype, meta.device
        try:
            probe = torch.zeros(shape, dtype=dtype, device=device)
            given = None if context is None else {
                k: torch.ones(s, dtype=d, device=device) for k, (s, d) in context.items()}
            for n in self.indices:
                F = self.layers[str(n)]
                for p in F.parameters():
                    if p.dtype != dtype:
                        return (f"dtype mismatch: the input state is {dtype} but layer "
                                f"{n} has parameters of {p.dtype}; convert the model "
                                "(e.g. .double()) or the input")
                kwargs = {"context": given} if takes_context(F) else None
                with torch.no_grad():
                    out = call_module(F, probe, rng=(self.seed, 0, n, device),
                                      keep_buffers=True, kwargs=kwargs)
                if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    return (f"layer {n}: step_factory's module maps a state of shape "
                            f"{tuple(shape)} to {got}; a residual step must keep the shape")
        except ValueError as e:
            return str(e)
        except Exception as e:  # any failure of a user module, reported everywhere
            return f"{type(e).__name__}: {e}"
        return None
