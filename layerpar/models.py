"""The configured modules of a network: built-in kinds or the user's own
classes by import path, and how layer-parallel propagation runs modules with
state (buffers, train/eval behaviour, random draws).

Import paths
------------
``resolve(spec, key=...)`` turns ``"package.module:Name"`` (``Name`` may be
dotted, ``"pkg.mod:Outer.Inner"``) into the object it names, importing the
module as ``import`` would, with the current directory searched as well (as
``python -m`` does).  ``factories(model_config, input_shape, num_classes)``
gives the opening, step and closing factories of a ``[model]`` section:
``step``, ``opening`` and ``closing`` name a class (an ``nn.Module``
subclass) or a function returning an ``nn.Module``, built with the keyword
arguments of ``step_kwargs``, ``opening_kwargs``, ``closing_kwargs``; an
empty spec takes the built-in module of ``kind`` (dense or conv) and
``width``.  A user step must keep the state's shape, so the opening it is
paired with must produce the state it expects.  Errors
(:class:`ModelSpecError`) name the configuration key.

Policy for module state in layer-parallel propagation
-----------------------------------------------------
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

The backward (adjoint) solve calls no module: it differentiates the graphs
recorded in the final forward sweep, i.e. the training-mode computation with
the batch statistics and masks of that sweep.
"""
import contextlib
import importlib
import inspect
import math
import os
import sys

import numpy as np
import torch
from torch import nn

from layerpar.steps import ConvClosing, ConvOpening, ConvStep, DenseClosing, DenseOpening, DenseStep

__all__ = ["ModelSpecError", "resolve", "factories", "layer_seed", "layer_rng",
           "is_stochastic", "training_flags", "set_training_flags", "call_module"]

_ROLES = ("opening", "step", "closing")


class ModelSpecError(ValueError):
    """A model given by import path cannot be imported or is not a module
    factory; the message names the configuration key."""


# --------------------------------------------------------------------------
# Import paths
# --------------------------------------------------------------------------

def resolve(spec, *, key="model.step"):
    """The object that ``"package.module:Name"`` names (a class or a
    function).  Raises ModelSpecError naming ``key``."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ModelSpecError(f"{key} = {spec!r}: expected 'package.module:Name'")
    module_name, attr = (s.strip() for s in spec.split(":"))
    if not module_name or not attr:
        raise ModelSpecError(f"{key} = {spec!r}: expected 'package.module:Name'")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSpecError(f"{key} = {spec!r}: cannot import module {module_name!r} "
                             f"({e})") from None
    finally:
        if added:
            sys.path.remove(cwd)
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelSpecError(f"{key} = {spec!r}: module {module_name!r} has no "
                                 f"attribute {attr!r}") from None
    if inspect.isclass(obj):
        if not issubclass(obj, nn.Module):
            raise ModelSpecError(f"{key} = {spec!r}: {attr} is a class but not an "
                                 "nn.Module subclass")
    elif not callable(obj):
        raise ModelSpecError(f"{key} = {spec!r}: {attr} is a {type(obj).__name__}, not an "
                             "nn.Module class or a function returning one")
    return obj


def _user_factory(spec, kwargs, key):
    """A zero-argument factory calling the object ``spec`` names with
    ``kwargs``; the keywords are checked against its signature now."""
    obj = resolve(spec, key=key)
    kwargs = dict(kwargs or {})
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        try:
            sig.bind(**kwargs)
        except TypeError as e:
            raise ModelSpecError(f"{key}_kwargs = {kwargs!r}: {spec} does not accept them "
                                 f"({e})") from None

    def make():
        module = obj(**kwargs)
        if not isinstance(module, nn.Module):
            raise ModelSpecError(f"{key} = {spec!r} returned a {type(module).__name__}, not "
                                 "an nn.Module")
        return module
    return make


def factories(model, input_shape, num_classes):
    """(opening(), step(n), closing()) factories for a ``[model]`` section
    (a dict with ``kind``, ``width``, ``activation``, ``kernel_size`` and the
    optional ``step``/``opening``/``closing`` specs with their ``*_kwargs``),
    for inputs of ``input_shape`` and ``num_classes`` classes."""
    width, act, k = model["width"], model["activation"], model["kernel_size"]
    bias = model.get("bias", "vector")
    specs = {role: model.get(role, "") for role in _ROLES}
    built_in = {}
    if model["kind"] == "dense":
        features = int(math.prod(input_shape))
        built_in = {"opening": lambda: DenseOpening(features, width, act, bias),
                    "step": lambda: DenseStep(width, act, bias),
                    "closing": lambda: DenseClosing(width, num_classes)}
    else:
        if len(input_shape) != 3 and not (specs["opening"] and specs["closing"]):
            raise ValueError(f"model.kind = 'conv' needs image inputs (C, H, W); the data set "
                             f"gives inputs of shape {tuple(input_shape)}: use model.kind = "
                             "'dense' or give model.opening and model.closing")
        if len(input_shape) == 3:
            built_in = {"opening": lambda: ConvOpening(input_shape[0], width, k, act),
                        "step": lambda: ConvStep(width, k, act),
                        "closing": lambda: ConvClosing(width, num_classes,
                                                       pool=min(4, input_shape[1]))}
        else:
            built_in = {"step": lambda: ConvStep(width, k, act)}
    made = {}
    for role in _ROLES:
        if specs[role]:
            made[role] = _user_factory(specs[role], model.get(f"{role}_kwargs"),
                                       f"model.{role}")
        else:
            made[role] = _initialised(built_in[role], model.get("init_scale", 0.0))
    step = made["step"]
    return made["opening"], (lambda n: step()), made["closing"]


def _initialised(factory, scale):
    """``factory`` whose modules have every parameter uniform in [0, scale)
    (scale 0: as built).  Called inside the network's seeded factories, so
    the draws do not depend on the number of ranks."""
    if not scale > 0:
        return factory

    def make():
        module = factory()
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.rand_like(p) * scale)
        return module
    return make


# --------------------------------------------------------------------------
# Module state under layer-parallel propagation (the policy above)
# --------------------------------------------------------------------------

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
def layer_rng(seed, pass_index, layer, device=None, part=None):
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


def training_flags(module):
    """The ``training`` flag of every submodule, in ``modules()`` order."""
    return [m.training for m in module.modules()]


def set_training_flags(module, flags):
    """Set the submodules' ``training`` flags from :func:`training_flags`."""
    for m, f in zip(module.modules(), flags):
        m.training = bool(f)
    return module


def call_module(module, x, *, rng=None, keep_buffers=False):
    """``module(x)`` under the policy: ``rng`` is None or the arguments of
    :func:`layer_rng` (seed, pass_index, layer, device[, part]) when the module is
    random and in training mode; ``keep_buffers`` restores its buffers after
    the call (a call outside the final sweep)."""
    saved = None
    if keep_buffers:
        saved = [b.detach().clone() for b in module.buffers()]
    try:
        if rng is None:
            return module(x)
        with layer_rng(*rng):
            return module(x)
    finally:
        if saved:
            with torch.no_grad():
                for b, s in zip(module.buffers(), saved):
                    b.copy_(s)
