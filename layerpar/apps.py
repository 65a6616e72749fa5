"""MGRIT apps for the network: the forward propagation and its adjoint.

Vectors are torch tensors of the state shape (batch, ...).  Both apps step
through the layers of a ``LayerParallel`` module (``net``):

* forward, step from point n over s fine layers:  u <- u + s*h*F(u; theta_n)
  (s = 1 on the fine grid; on coarse grids theta_n is the weight of the layer
  at the coarse step's start, fetched from its owner when it lives on another
  rank).  In the final fine sweep the step is taken with autograd recording,
  and the graph of F_n at the final state u_n is kept for the backward pass.

* adjoint, in reversed layer-time (adjoint point a holds lambda_{N-a}): the
  step into adjoint point a over s fine layers is
      lambda <- lambda + s*h*(dF_n/du)(u_n)^T lambda,   n = N - a,
  a vector-Jacobian product through the kept graph of layer n (on coarse
  grids: the coarse step linearised at the forward state of its C-point).  In
  the final fine sweep the same product also gives the weight gradient
  h*(dF_n/dtheta_n)^T lambda_{n+1} (None for frozen parameters).

Modules are called through ``net._call_step``, which applies the policy of
``layerpar.models`` for train/eval mode, random draws and buffers.
"""
import warnings

import numpy as np
import torch

_NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
}


class TorchVectors:
    """The vector operations of an MGRIT app for tensors of one shape (set
    with ``configure`` before each solve)."""

    def configure(self, shape, dtype, device):
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"dtype={dtype}: layerpar supports {sorted(map(str, _NUMPY_DTYPES))}")
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = device
        self.numel = int(np.prod(self.shape, dtype=np.int64))
        self._np_dtype = _NUMPY_DTYPES[dtype]

    def zeros(self):
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)

    def clone(self, u):
        return u.clone()

    def sum(self, a, x, b, y):
        if b != 1.0:
            y.mul_(b)
        return y.add_(x, alpha=a)

    def norm(self, u):
        return float(torch.linalg.vector_norm(u))

    def bufsize(self):
        return self.numel * np.dtype(self._np_dtype).itemsize

    def pack(self, u, buf):
        # one copy into the message, straight from the device memory
        torch.frombuffer(buf, dtype=self.dtype, count=self.numel).copy_(u.detach().reshape(-1))

    def unpack(self, buf):
        # the message lives only during the call: one copy out of it
        a = np.frombuffer(buf, dtype=self._np_dtype, count=self.numel)
        if self.device.type == "cpu":
            return torch.from_numpy(a.copy()).reshape(self.shape)
        with warnings.catch_warnings():
            # read-only view of the message, only read by the copy to the device
            warnings.simplefilter("ignore", UserWarning)
            view = torch.from_numpy(a)
        return view.reshape(self.shape).to(self.device)


class ForwardApp(TorchVectors):
    pure_step = True  # step never modifies its input: the solver's clones are free

    def __init__(self, net):
        self.net = net
        self.u0 = None  # the input state, on the rank holding point 0

    def init(self, t, index):
        if index == 0:
            return self.u0.detach().clone()
        return self.zeros()

    def step(self, u, status):
        n = status.index
        h = (status.index_stop - n) * self.net.h
        F = self.net._step_module(n)
        if status.final and self.net._record:
            # Keep the graph of F_n at the final u_n: the backward pass reuses it.
            with torch.enable_grad():
                x = u.detach().requires_grad_(True)
                f = self.net._call_step(n, F, x, final=True)
            self.net._graphs[n] = (x, f, tuple(F.parameters()))
            out = torch.add(u, f.detach(), alpha=h)
            if n == self.net.layer_indices[-1] and not torch.isfinite(out).all():
                self._report_nonfinite()
            return out
        with torch.no_grad():
            out = torch.add(u, self.net._call_step(n, F, u, final=status.final), alpha=h)
        if status.final and n == self.net.layer_indices[-1] and not torch.isfinite(out).all():
            first = self.net.layer_indices[0]
            raise FloatingPointError(f"a layer in {first}..{n} produced NaN or Inf")
        return out


    def _report_nonfinite(self):
        # NaN and Inf propagate to the following layers, so checking each
        # rank's last output finds them; only then look for the first one.
        for n in self.net.layer_indices:
            x, f, _ = self.net._graphs[n]
            if not torch.isfinite(x).all():
                raise FloatingPointError(f"the input of layer {n} is NaN or Inf")
            if not torch.isfinite(f).all():
                raise FloatingPointError(f"layer {n} produced NaN or Inf")
        raise FloatingPointError(f"layer {self.net.layer_indices[-1]} produced NaN or Inf")


class AdjointApp(TorchVectors):
    pure_step = True

    def __init__(self, net):
        self.net = net
        self.lam_final = None  # dloss/du_N, on the rank holding layer N-1

    def init(self, t, index):
        if index == 0:
            return self.lam_final.detach().clone()
        return self.zeros()

    def step(self, lam, status):
        net = self.net
        n = net.nlayers - status.index_stop
        h = (status.index_stop - status.index) * net.h
        try:
            x, f, params = net._graphs[n]
        except KeyError:
            raise RuntimeError(
                f"layer {n}: no forward graph to back-propagate through (backward called "
                "twice after one forward? construct LayerParallel with retain_graphs=True)"
            ) from None
        if status.final:
            # a fine step (h = net.h): the adjoint h*lam through F_n gives the
            # weight gradients and the state update already scaled, as in
            # back-propagation through u + h*F(u); frozen parameters
            # (requires_grad False) get no gradient: None
            trainable = tuple(p for p in params if p.requires_grad)
            grads = torch.autograd.grad(f, (x,) + trainable, grad_outputs=lam * h,
                                        allow_unused=True, retain_graph=net.retain_graphs)
            weights = iter(grads[1:])
            net._grads[n] = tuple(next(weights) if p.requires_grad else None for p in params)
            if not net.retain_graphs:
                del net._graphs[n]  # its last use
            return torch.add(lam, grads[0])
        (gx,) = torch.autograd.grad(f, x, grad_outputs=lam, retain_graph=True)
        return torch.add(lam, gx, alpha=h)
