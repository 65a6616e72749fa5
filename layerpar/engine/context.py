"""One pass through the layers, and what the passes report.

A forward pass and the backward pass through its result share a
``PassContext``: the pass's number (it keys the layers' random draws), the
state's shape, dtype and device, whether autograd records the pass, the call
plan of the module-state policy, and what the forward pass keeps for the
backward one (the layers' graphs of an MGRIT pass, the blocks' graphs of a
pipelined one) and the weight gradients the backward pass produces.  Each
forward pass has its own context, held by the autograd graph of its result,
so two forward passes may be back-propagated in any order.

``PassRecords`` is where a pass writes its statistics (iterations, residual
norms, layer steps, virtual time, the norm of the state it was given): the
network's ``last_forward`` and ``last_backward``.
"""
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class StateMeta:
    """The shape, dtype and device of the states of a pass."""
    shape: tuple
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, key):
        """From the (shape, dtype, device name) tuple that ranks agree on."""
        shape, dtype, device = key
        return cls(tuple(shape), dtype, torch.device(device))

    @property
    def key(self):
        """(shape, dtype, device name): plain values, the same on every rank."""
        return (self.shape, self.dtype, str(self.device))


def record(steps, clock, norm=None, *, iterations=1, residual_norms=()):
    """A pass's statistics: ``steps`` layer steps per solve on this rank,
    ``clock`` the virtual time, ``norm`` the 2-norm of the state the pass was
    given (None: not measured)."""
    out = {"iterations": iterations, "residual_norms": list(residual_norms),
           "steps": steps if isinstance(steps, list) else [steps], "virtual_time": clock}
    if norm is not None:
        out["input_norm"] = norm
    return out


def _empty():
    return {"iterations": 0, "residual_norms": [], "steps": [], "virtual_time": 0.0,
            "input_norm": 0.0}


class PassRecords:
    """The statistics of the last forward and the last backward pass."""

    def __init__(self):
        self.forward = _empty()
        self.backward = _empty()


@dataclass
class PassContext:
    """One forward pass and the backward pass through its result.

    ``plan``: {layer: (draws random numbers, keeps its buffers outside the
    final sweep)} for the modules that do either (``Stage.plan_calls``);
    ``graphs``: per layer (MGRIT) or per micro-batch (pipeline), what the
    backward pass differentiates; ``grads``: {layer: weight gradients} of an
    MGRIT backward pass; ``retain``: keep the graphs after backward (a
    second backward of the same forward); ``records``: where the passes
    write their statistics; ``context``: the batch's context on this rank
    (``{name: tensor}``, dimension 0 the batch; None: the pass has none or
    no layer here takes it), which ``context_of(part)`` gives the layers,
    per micro-batch once ``split_context`` has cut it."""
    index: int
    meta: StateMeta
    record: bool
    records: PassRecords
    retain: bool = False
    plan: dict = field(default_factory=dict)
    graphs: dict = field(default_factory=dict)
    grads: dict = field(default_factory=dict)
    context: dict = None
    parts: list = None

    def split_context(self, m):
        """Cut the context into the rows of ``m`` micro-batches
        (``torch.tensor_split`` sizes, as the pipeline cuts the batch)."""
        self.parts = None
        if self.context is not None and m > 1:
            cut = {k: v.tensor_split(m) for k, v in self.context.items()}
            self.parts = [{k: v[i] for k, v in cut.items()} for i in range(m)]

    def context_of(self, part=None):
        """The context of micro-batch ``part`` (None: the whole batch)."""
        if part is None or self.parts is None:
            return self.context
        return self.parts[part]
