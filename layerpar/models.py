"""The configured modules of a network: built-in kinds or the user's own
classes by import path.

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
empty spec takes the built-in module of ``kind`` (dense, conv or
transformer) and ``width``; the transformer kind (``layerpar.transformer``)
takes ``heads``, ``mlp_ratio``, ``dropout``, ``causal`` for its blocks, a
token opening of ``vocab`` ids (0: the built-in ``recall`` set's) and
``max_length`` positions (0: the data's length), and a closing that pools
(``pool``).  A step module whose ``forward`` takes a ``context`` keyword
receives the batch's context (a padding mask; ``layerpar.engine.policy``).  A user step must keep the state's shape, so the opening it is
paired with must produce the state it expects.  Errors
(:class:`ModelSpecError`) name the configuration key.

The module-state policy under which layer-parallel propagation runs these
modules (train/eval mode, random draws, buffers) is ``layerpar.engine.policy``.
"""
import importlib
import inspect
import math
import os
import sys

import torch
from torch import nn

from layerpar.data.readers.generated import RECALL_VOCAB
from layerpar.steps import ConvClosing, ConvOpening, ConvStep, DenseClosing, DenseOpening, DenseStep
from layerpar.transformer import PoolClosing, TokenOpening, TransformerBlock, check_heads

__all__ = ["ModelSpecError", "resolve", "factories"]

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
    if model["kind"] == "transformer":
        built_in = _transformer(model, input_shape, num_classes, specs)
    elif model["kind"] == "dense":
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


def _transformer(model, input_shape, num_classes, specs):
    """The built-in factories of ``kind = "transformer"``: checked now, so a
    bad value fails before any module is built, naming its key."""
    width = model["width"]
    try:
        check_heads(width, model.get("heads", 4))
    except ValueError as e:
        raise ModelSpecError(str(e)) from None
    heads, ratio = model.get("heads", 4), model.get("mlp_ratio", 4.0)
    dropout, causal = model.get("dropout", 0.0), model.get("causal", False)
    out = {"step": lambda: TransformerBlock(width, heads, ratio, dropout, causal)}
    if not specs["opening"]:
        if len(input_shape) != 1:
            raise ModelSpecError(f"model.kind = 'transformer' needs token inputs (n, length); "
                                 f"the data set gives inputs of shape {tuple(input_shape)}")
        length = int(input_shape[0])
        positions = model.get("max_length", 0) or length
        if length > positions:
            raise ModelSpecError(f"model.max_length = {positions}: the data's sequences have "
                                 f"length {length}, longer than the positions")
        tokens = (model.get("vocab", 0) or RECALL_VOCAB) + 1  # id 0: padding
        out["opening"] = lambda: TokenOpening(tokens, width, positions, dropout=dropout)
    pool = model.get("pool", "mean")
    out["closing"] = lambda: PoolClosing(width, num_classes, pool)
    return out


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
