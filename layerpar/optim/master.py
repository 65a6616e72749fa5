"""SGD and Adam that step half-precision parameters through float32 copies.

A bfloat16 weight has 8 significant bits: an update smaller than half a
unit in its last place (|dw| < 2^-9 |w|) rounds away.  Late in training,
with a decayed learning rate, most updates are that small and training
stalls (the main job in bfloat16: validation accuracy flat from epoch 25,
final loss 0.16 against float32's 0.11).  These optimisers keep a float32
copy ("master" weight) of every bfloat16 or float16 parameter, apply the
update to the copy, with the gradient and the algorithm's own state
(momentum, Adam's moments) in float32, and write the rounded copy back into
the parameter.  Parameters of any other dtype are stepped as by the torch
optimiser itself, bit for bit.

The copy lives in the parameter's optimiser state under ``"master"``, so
that checkpoints (``layerpar.checkpoint.optimizer_state``) and the
multilevel transfers of optimiser state carry it like any other state.  It
is used only while the parameter still holds its rounding: a parameter
changed outside the optimiser (loaded, transferred between depths) starts
a new copy from its value.

    opt = layerpar.optim.Adam(net.parameters(), lr=1e-3)   # as torch.optim.Adam
"""
import torch

from layerpar.engine.vectors import HALF

__all__ = ["SGD", "Adam", "MASTER_KEY"]

MASTER_KEY = "master"


class _Float32Master:
    """Mixin over a torch optimiser (listed first among the bases): its
    ``step`` sees float32 copies in place of the half-precision parameters
    that have a gradient."""

    def state_dtype(self, p):
        """The dtype of ``p``'s floating state (what a checkpoint restores)."""
        return torch.float32 if p.dtype in HALF else p.dtype

    def step(self, closure=None):
        swapped = self._swap_in()
        try:
            return super().step(closure)
        finally:
            self._swap_out(swapped)

    @torch.no_grad()
    def _swap_in(self):
        swapped = []
        for group in self.param_groups:
            params = group["params"]
            for i, p in enumerate(params):
                if p.dtype not in HALF or p.grad is None:
                    continue
                st = self.state.pop(p, {})
                m = st.pop(MASTER_KEY, None)
                if m is None or m.shape != p.shape or not torch.equal(m.to(p.dtype), p):
                    m = p.detach().to(torch.float32)
                m.grad = p.grad.to(torch.float32)
                # the algorithm's state as it would be for a float32 parameter
                # (moments a checkpoint or transfer gave in another dtype)
                self.state[m] = {k: (v.to(torch.float32) if isinstance(v, torch.Tensor)
                                     and v.is_floating_point() and v.shape == p.shape else v)
                                 for k, v in st.items()}
                params[i] = m
                swapped.append((params, i, p, m))
        return swapped

    @torch.no_grad()
    def _swap_out(self, swapped):
        for params, i, p, m in swapped:
            params[i] = p
            st = self.state.pop(m, {})
            m.grad = None
            st[MASTER_KEY] = m
            self.state[p] = st
            p.copy_(m)  # round to nearest


class SGD(_Float32Master, torch.optim.SGD):
    """``torch.optim.SGD`` with float32 master weights for half-precision
    parameters (module docstring)."""


class Adam(_Float32Master, torch.optim.Adam):
    """``torch.optim.Adam`` with float32 master weights for half-precision
    parameters (module docstring)."""
