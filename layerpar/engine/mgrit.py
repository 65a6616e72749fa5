"""Layer-parallel passes by MGRIT: the forward propagation and its adjoint as
MGRIT apps over a stage and a pass context, and the autograd function that
runs a forward solve and, in backward, the adjoint solve.

Vectors are torch tensors of the state shape (batch, ...).

* forward, step from point n over s fine layers:  u <- u + s*h*F(u; theta_n)
  (s = 1 on the fine grid; on coarse grids theta_n is the weight of the layer
  at the coarse step's start, a ghost copy when it lives on another rank).
  In the final fine sweep the step is taken with autograd recording, and the
  graph of F_n at the final state u_n is kept in the pass context.

* adjoint, in reversed layer-time (adjoint point a holds lambda_{N-a}): the
  step into adjoint point a over s fine layers is
      lambda <- lambda + s*h*(dF_n/du)(u_n)^T lambda,   n = N - a,
  a vector-Jacobian product through the kept graph of layer n (on coarse
  grids: the coarse step linearised at the forward state of its C-point).  In
  the final fine sweep the same product also gives the weight gradient
  h*(dF_n/dtheta_n)^T lambda_{n+1} (None for frozen parameters), which is
  final there: the parameters' gradient hooks (``engine.gradhooks``) are
  called with it at once, long before the solve returns it to autograd.
"""
import torch

from braid_ext import MGRITError, NonFiniteResidualError
from layerpar._collective import agree
from layerpar._watchdog import guard
from layerpar.engine import gradhooks
from layerpar.engine.context import PassContext, PassRecords, record
from layerpar.engine.vectors import TorchVectors, adjoint_dtype, norm_dtype


class ForwardApp(TorchVectors):
    """Forward propagation through ``stage``; ``begin(ctx, u0)`` before a
    solve, ``end()`` after."""
    pure_step = True  # step never modifies its input: the solver's clones are free

    def __init__(self, stage):
        self.stage = stage
        self.ctx = None
        self.u0 = None  # the input state, on the rank holding point 0

    def begin(self, ctx, u0):
        self.configure(ctx.meta.shape, ctx.meta.dtype, ctx.meta.device)
        self.ctx, self.u0 = ctx, u0
        self._finite = {}

    def end(self):
        self.ctx = self.u0 = None
        self._finite = {}

    def init(self, t, index):
        if index == 0:
            return self.u0.detach().clone()
        return self.zeros()

    def step(self, u, status):
        stage, ctx = self.stage, self.ctx
        n = status.index
        h = (status.index_stop - n) * stage.h
        if status.final and ctx.record:
            # Keep the graph of F_n at the final u_n: the backward pass reuses it.
            F = stage.module(n)
            with torch.enable_grad():
                x = u.detach().requires_grad_(True)
                f = stage.call(n, x, ctx, final=True)
            ctx.graphs[n] = (x, f, tuple(F.parameters()))
            out = torch.add(u, f.detach(), alpha=h)
        else:
            with torch.no_grad():
                out = torch.add(u, stage.call(n, u, ctx, final=status.final), alpha=h)
        if status.final:
            self._watch(n, u, out)
        return out

    def first_bad(self):
        """Where this solve's final sweep so far first turned NaN or Inf on
        this rank: layer k's output as k, the input of the first local layer
        f as f - 0.5 (so that the smallest over the ranks is the first); or
        None."""
        flags = self._finite
        if not flags:
            return None
        if not bool(flags.get("input", True)):
            return self.stage.indices[0] - 0.5
        return next((k for k in self.stage.indices if k in flags and not bool(flags[k])), None)

    def _watch(self, n, u, out):
        """The final sweep's outputs, checked once, at this rank's last
        layer: NaN and Inf propagate, so a bad last output means a bad layer
        before it; the flags (no synchronisation per layer) say which."""
        stage = self.stage
        if n == stage.indices[0]:
            self._finite = {"input": torch.isfinite(u).all()}
        self._finite[n] = torch.isfinite(out).all()
        if n != stage.indices[-1] or bool(self._finite[n]):
            return
        bad = self.first_bad()
        if bad is not None and bad != int(bad):
            raise FloatingPointError(f"the input of layer {stage.indices[0]} is NaN or Inf")
        raise FloatingPointError(f"layer {n if bad is None else bad} produced NaN or Inf")


class AdjointApp(TorchVectors):
    """The adjoint of the forward propagation, through the graphs a forward
    pass kept in its context; ``begin(ctx, lam)`` before a solve."""
    pure_step = True

    def __init__(self, stage):
        self.stage = stage
        self.ctx = None
        self.lam_final = None  # dloss/du_N, on the rank holding layer N-1

    def begin(self, ctx, lam):
        # a half-precision state's adjoint is carried (summed, sent) in float32
        self.configure(ctx.meta.shape, adjoint_dtype(ctx.meta.dtype), ctx.meta.device)
        self.ctx, self.lam_final = ctx, lam

    def end(self):
        self.ctx = self.lam_final = None

    def init(self, t, index):
        if index == 0:
            return self.lam_final.detach().clone()
        return self.zeros()

    def step(self, lam, status):
        stage, ctx = self.stage, self.ctx
        n = stage.nlayers - status.index_stop
        h = (status.index_stop - status.index) * stage.h
        try:
            x, f, params = ctx.graphs[n]
        except KeyError:
            raise RuntimeError(
                f"layer {n}: no forward graph to back-propagate through (backward called "
                "twice after one forward? construct LayerParallel with retain_graphs=True)"
            ) from None
        if status.final:
            # a fine step (h = stage.h): the adjoint h*lam through F_n gives the
            # weight gradients and the state update already scaled, as in
            # back-propagation through u + h*F(u); frozen parameters
            # (requires_grad False) get no gradient: None
            trainable = tuple(p for p in params if p.requires_grad)
            grads = torch.autograd.grad(f, (x,) + trainable,
                                        grad_outputs=(lam * h).to(f.dtype),
                                        allow_unused=True, retain_graph=ctx.retain)
            weights = iter(grads[1:])
            ctx.grads[n] = tuple(next(weights) if p.requires_grad else None for p in params)
            gradhooks.made(params, ctx.grads[n])  # final: e.g. a data-parallel sum starts
            if not ctx.retain:
                del ctx.graphs[n]  # its last use
            return torch.add(lam, grads[0])
        (gx,) = torch.autograd.grad(f, x, grad_outputs=lam.to(f.dtype), retain_graph=True)
        return torch.add(lam, gx, alpha=h)


def _solve(solver):
    solver.solve()
    st = solver.stats()  # the clock is agreed over the ranks at the end of a solve
    return record(st["steps"], st["virtual_time"], iterations=solver.iterations,
                  residual_norms=solver.residual_norms)


class MGRITPasses:
    """Forward and backward passes of ``stage`` by MGRIT over ``comm``, with
    the solver pair in use of ``solvers`` and the coarse-grid weights of
    ``ghosts``; ``apps`` are the (forward, adjoint) apps the solvers step."""

    def __init__(self, stage, comm, solvers, ghosts, apps, *, diagnose=None):
        self.stage, self.comm, self.solvers, self.ghosts = stage, comm, solvers, ghosts
        self.fwd_app, self.bwd_app = apps
        self.first, self.last = 0, comm.Get_size() - 1
        # diagnose(ctx, u0): an exact pass that raises a FloatingPointError naming
        # the first layer whose output is NaN or Inf (Pipeline.diagnose)
        self.diagnose = diagnose

    def _cfactor(self, solver):
        cf = solver.options["cfactor"]
        return cf[0] if isinstance(cf, (list, tuple)) else cf

    def _forward_nonfinite(self, e, ctx, u0, bad):
        """The core found the forward solve's residual NaN or Inf at point
        ``e.index`` (a C-point: the layer that made it lies in the interval
        before).  The final sweep's checks so far (``bad``: this rank's first
        bad layer) or else an exact pass name the layer, on every rank; when
        the exact network is finite, the iteration itself diverged."""
        # every rank -> every rank: its first layer with a NaN/Inf output in the final sweep
        found = [b for b in agree(self.comm, None, payload=bad,
                                  what="the search for a NaN/Inf layer") if b is not None]
        if found:
            first = min(found)
            if first != int(first):
                raise FloatingPointError(f"the input of layer {int(first + 0.5)} is NaN or Inf")
            raise FloatingPointError(f"layer {first} produced NaN or Inf")
        if self.diagnose is not None:
            probe = PassContext(index=ctx.index, meta=ctx.meta, record=False,
                                records=PassRecords(), context=ctx.context)
            self.diagnose(probe, u0)  # raises naming the layer where the exact pass fails
        m = self._cfactor(self.solvers.fwd)
        lo, hi = max(0, e.index - m), max(0, e.index - 1)
        out = NonFiniteResidualError(
            f"the forward MGRIT solve turned NaN or Inf at point {e.index} (after layers "
            f"{lo}..{hi}) although the exact network's pass is finite: the coarse grids' "
            f"steps (up to {m}^(levels-1) layers long) overflow; use fewer levels, a smaller "
            "cfactor or a smaller model.T", e.index)
        out.layer = None
        return out

    def _backward_nonfinite(self, e):
        """The adjoint solve's residual NaN or Inf at reversed point
        ``e.index`` (a C-point): the gradient at the input of a layer in
        the interval after it."""
        N, m, a = self.stage.nlayers, self._cfactor(self.solvers.bwd), e.index
        if a == 0:
            text = "the loss gradient given to the backward pass is NaN or Inf"
        else:
            lo, hi = N - a, min(N - 1, N - a + m - 1)
            text = (f"the backward MGRIT solve turned NaN or Inf at the gradient of the "
                    f"input of layer {lo} (made by layers {lo}..{hi})")
        out = NonFiniteResidualError(text, a)
        out.layer = N - a if a > 0 else None
        return out

    def _input_norm(self, v, root):
        """Collective: the 2-norm of a solve's given state (the input state,
        or the adjoint's final value), held on ``root``, on every rank."""
        # root -> every rank: one number
        guard(self.comm, "the norm of a solve's given state")
        return self.comm.bcast(float(torch.linalg.vector_norm(
            v.detach(), dtype=norm_dtype(v.dtype)))
            if self.comm.Get_rank() == root else None, root=root)

    def forward(self, ctx, u0):
        """u_N (last rank) or a placeholder; the layers' graphs stay in ``ctx``."""
        self.ghosts.exchange(ctx.meta.device)
        ctx.plan = self.stage.plan_calls()
        solver = self.solvers.fwd
        self.fwd_app.begin(ctx, u0)
        try:
            info = _solve(solver)
        except NonFiniteResidualError as e:
            error, bad = e, self.fwd_app.first_bad()
        else:
            error = None
        finally:
            self.fwd_app.end()
        if error is not None:
            raise self._forward_nonfinite(error, ctx, u0, bad) from None
        info["input_norm"] = self._input_norm(u0, self.first)
        ctx.records.forward = info
        meta = ctx.meta
        if self.comm.Get_rank() == self.last:
            return solver.get(self.stage.nlayers).clone()
        return torch.zeros(0, dtype=meta.dtype, device=meta.device)

    def backward(self, ctx, grad_out):
        """(dloss/du_0 on the first rank or None, the local layers' weight
        gradients in ``Stage.params()`` order)."""
        meta, rank = ctx.meta, self.comm.Get_rank()
        ctx.grads = {}
        lam = None
        dtype = adjoint_dtype(meta.dtype)
        if rank == self.last:
            lam = grad_out.to(dtype) if grad_out is not None and grad_out.shape == meta.shape \
                else torch.zeros(meta.shape, dtype=dtype, device=meta.device)
        solver = self.solvers.bwd
        self.bwd_app.begin(ctx, lam)
        try:
            info = _solve(solver)
        except NonFiniteResidualError as e:
            raise self._backward_nonfinite(e) from None
        finally:
            if not ctx.retain:
                ctx.graphs.clear()
            self.bwd_app.end()
        info["input_norm"] = self._input_norm(lam, self.last)
        ctx.records.backward = info
        grad_u0 = solver.get(self.stage.nlayers).to(meta.dtype, copy=True) \
            if rank == self.first else None
        grads = []
        for n in self.stage.indices:
            gs = ctx.grads.get(n)
            if gs is None:
                raise MGRITError(f"no gradient was computed for layer {n}")
            grads.extend(gs)
        return grad_u0, grads


class MGRITFunction(torch.autograd.Function):
    """Forward: MGRIT across ranks.  Backward: adjoint MGRIT, backward in
    layer-time; gradients for the input state (first rank) and the local
    layers' parameters (the trailing inputs)."""

    @staticmethod
    def forward(fn_ctx, passes, ctx, anchor, u0, *params):
        fn_ctx.passes, fn_ctx.ctx = passes, ctx
        return passes.forward(ctx, u0)

    @staticmethod
    def backward(fn_ctx, grad_out):
        grad_u0, grads = fn_ctx.passes.backward(fn_ctx.ctx, grad_out)
        if grad_u0 is None or not fn_ctx.needs_input_grad[3]:
            grad_u0 = None
        return (None, None, None, grad_u0, *grads)
