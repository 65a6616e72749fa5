"""A rank's residual layers by their global index, and the whole model
gathered from the ranks: the part of ``LayerParallel`` that hands layers
and their states to checkpoints, transfers between depths, optimisers and
checks (``LayersByIndex``, a base class of ``LayerParallel``).

What it needs of the class it is mixed into: ``layers`` (an
``nn.ModuleDict`` keyed by ``str(n)``), ``layer_indices`` (this rank's
range of global indices), ``rank``, ``comm``, ``nlayers``, ``h`` and
``_make_layer(n)`` (a module of layer n's structure).
"""
import torch
from torch import nn

from layerpar._watchdog import guard
from layerpar.engine.stage import load_state
from layerpar.steps import ResidualLayer, SerialStack


def collect(comm, obj, root):
    """Collective: every rank's obj, on ``root`` (None = every rank); None
    on the other ranks."""
    guard(comm, "collecting the layers")
    return comm.allgather(obj) if root is None else comm.gather(obj, root=root)


class LayersByIndex:
    """The local layers by global index, and the N layers gathered
    (``gather_layers``, ``serial_layers``, ``serial_equivalent``)."""

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

    def gather_layers(self, root=None):
        """Collective: {global layer index: state_dict} of all layers, on
        ``root`` (None = every rank)."""
        mine = {n: {k: v.cpu().clone() for k, v in state.items()}
                for n, state in self.state_by_layer().items()}
        parts = collect(self.comm, mine, root)
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
        return [ResidualLayer(load_state(self._make_layer(n), states[n]), self.h)
                for n in range(self.nlayers)]

    def serial_equivalent(self, root: "int | None" = None) -> "nn.Sequential | None":
        """Collective: an ``nn.Sequential`` of the N residual layers with the
        same weights, for checking and for inference on one process
        (``SerialStack``: called ``(u, context=...)`` it gives the context to
        the layers that take it)."""
        layers = self.serial_layers(root)
        return None if layers is None else SerialStack(*layers)
