"""The module-state policy of layer-parallel propagation: train/eval mode,
random draws and buffers.

MGRIT calls a layer's module many times per forward pass (relaxation sweeps
on the fine grid, coarse-grid steps, and a final fine sweep that takes every
layer once and records the graph the backward pass uses), on the rank that
owns the layer or, on coarse grids, on a ghost copy held by another rank.
For the result to be that of the serial network:

* **Train/eval mode.**  Every call runs in the owner's mode: ghost copies
  receive the owner's per-submodule ``training`` flags with its weights
  before each forward solve.  ``model.eval()`` therefore gives deterministic
  propagation on any number of ranks.
* **Random draws** (dropout).  Each call of layer ``n`` in forward pass ``p``
  runs under the torch RNG seeded by ``layer_seed(seed, p, n)`` (the opening
  is layer -1, the closing -2), leaving the global RNG untouched.  All calls
  of one layer in one pass (fine or coarse, owner or ghost) draw the same
  masks, so MGRIT iterates on one fixed network and converges to the serial
  network with those masks; exact mode (``max_levels=1``, one sweep) equals
  it.  The masks depend only on the seed, the pass count and the layer, not
  on the number of ranks.  A module counts as random when it contains a
  torch dropout layer or has an attribute ``stochastic = True``.
* **Buffers** (batch-norm running statistics).  Buffers are updated only in
  the final fine sweep of the forward solve, once per forward pass as in the
  serial network: a call outside that sweep restores the module's buffers
  afterwards.  Batch statistics themselves are those of the batch, in every
  call.  Ghost copies receive the owner's buffers before each solve.
* **Frozen parameters** (``requires_grad=False``) get no gradient (None);
  the adjoint asks only for the gradients of trainable parameters.

* **Context** (``takes_context``).  A module whose ``forward`` has a
  parameter named ``context`` (or that sets ``takes_context = True``) is
  called ``module(u, context=c)``: ``c`` is the pass's context, a dict of
  tensors whose first dimension is the batch (a padding mask, positions:
  anything constant across the layers of one pass), or None when the pass
  has none; in a pipelined pass with several micro-batches, the rows of
  the micro-batch.  Every call of every layer of one pass (fine or coarse,
  owner or ghost) sees the same context; no gradient flows into it.  A
  module without such a parameter is called ``module(u)`` as before.

The backward (adjoint) solve calls no module: it differentiates the graphs
recorded in the final forward sweep, i.e. the training-mode computation with
the batch statistics and masks of that sweep.
"""
import contextlib
import inspect

import numpy as np
import torch
from torch import nn
from torch.nn.modules.module import (register_module_buffer_registration_hook,
                                     register_module_module_registration_hook,
                                     register_module_parameter_registration_hook)

__all__ = ["layer_seed", "layer_rng", "is_stochastic", "takes_context", "training_flags",
           "set_training_flags", "call_module", "structure", "CallKinds"]

# A counter of the module structure of the whole process: torch calls these
# hooks whenever any module registers (or replaces) a submodule, a parameter
# or a buffer, so what was read from a module's tree stays valid as long as
# the counter has not moved.
_structure = [0]


def _structure_changed(module, name, value):
    _structure[0] += 1


for _register in (register_module_module_registration_hook,
                  register_module_parameter_registration_hook,
                  register_module_buffer_registration_hook):
    _register(_structure_changed)


def structure():
    """The module-structure counter: it moves whenever any module registers
    or replaces a submodule, parameter or buffer (``setattr``,
    ``add_module``, ``register_*``, a ``ModuleDict`` entry set), so a walk
    of a module tree made at one value holds while it has that value."""
    return _structure[0]

_ANY = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def layer_seed(seed, pass_index, layer, part=None):
    """The RNG seed of ``layer`` (-1 opening, -2 closing) in forward pass
    ``pass_index`` of a network seeded with ``seed``; ``part``: micro-batch
    ``part`` of a pipelined pass with more than one (each draws its own)."""
    key = [int(seed), int(pass_index), int(layer) + 2, 0x6C61796572]  # "layer"
    if part is not None:
        key.append(int(part))
    words = np.random.SeedSequence(key).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


@contextlib.contextmanager
def layer_rng(seed: int, pass_index: int, layer: int, device: "torch.device | None" = None,
              part: "int | None" = None) -> "contextlib.AbstractContextManager[None]":
    """Run the body under the torch RNG seeded for ``layer`` in pass
    ``pass_index`` (of ``device`` too when it is a CUDA device; ``part``: a
    micro-batch, see ``layer_seed``), restoring the global RNG state
    afterwards.  A serial check reproduces the masks of a layer-parallel pass
    by calling each layer inside this context."""
    devices = []
    if device is not None and torch.device(device).type == "cuda":
        devices = [torch.device(device).index or torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        s = layer_seed(seed, pass_index, layer, part)
        torch.random.default_generator.manual_seed(s)
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(s)
        yield


def is_stochastic(module):
    """Does ``module`` draw random numbers in training mode (a torch dropout
    layer inside, or ``stochastic = True`` on it or a submodule)?"""
    return any(isinstance(m, nn.modules.dropout._DropoutNd)
               or m.__dict__.get("stochastic", getattr(type(m), "stochastic", False))
               for m in module.modules())


def takes_context(module):
    """Does ``module`` take the pass's context: ``module(u, context=c)``?
    Its attribute ``takes_context`` when it has one, else whether its
    ``forward`` has a parameter named ``context``."""
    flag = getattr(module, "takes_context", None)
    if flag is not None:
        return bool(flag)
    try:
        param = inspect.signature(module.forward).parameters.get("context")
    except (TypeError, ValueError):
        return False
    return param is not None and param.kind in _ANY


class CallKinds:
    """``takes_context`` and ``is_stochastic`` of the modules called again
    and again (the network's ends, the serial network's layers), read once
    per module and module structure (``structure``) instead of at every
    call.  Modules are held by identity: a module put in another's place is
    read anew."""

    def __init__(self):
        self._kinds, self._version = {}, None

    def _of(self, module):
        if self._version != _structure[0]:
            self._kinds, self._version = {}, _structure[0]
        kind = self._kinds.get(id(module))
        if kind is None or kind[0] is not module:
            kind = self._kinds[id(module)] = (module, takes_context(module),
                                              is_stochastic(module))
        return kind

    def takes_context(self, module):
        return self._of(module)[1]

    def is_stochastic(self, module):
        return self._of(module)[2]


def training_flags(module):
    """The ``training`` flag of every submodule, in ``modules()`` order."""
    return [m.training for m in module.modules()]


def set_training_flags(module, flags):
    """Set the submodules' ``training`` flags from :func:`training_flags`."""
    for m, f in zip(module.modules(), flags):
        m.training = bool(f)
    return module


def call_module(module, x, *, rng=None, keep_buffers=False, kwargs=None):
    """``module(x, **kwargs)`` under the policy: ``rng`` is None or the
    arguments of :func:`layer_rng` (seed, pass_index, layer, device[, part])
    when the module is random and in training mode; ``keep_buffers``
    restores its buffers after the call (a call outside the final sweep);
    ``kwargs``: ``{"context": ...}`` for a module that takes context."""
    kwargs = kwargs or {}
    saved = None
    if keep_buffers:
        saved = [b.detach().clone() for b in module.buffers()]
    try:
        if rng is None:
            return module(x, **kwargs)
        with layer_rng(*rng):
            return module(x, **kwargs)
    finally:
        if saved:
            with torch.no_grad():
                for b, s in zip(module.buffers(), saved):
                    b.copy_(s)
