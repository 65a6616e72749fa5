"""When a backward pass's weight gradients are final: hooks on those a
layer-parallel backward pass makes, and the mark of partial sums.

The adjoint MGRIT solve makes each layer's weight gradient in its final
fine sweep, one layer after another; autograd adds them to the parameters'
``.grad`` only once the whole solve has returned.  A consumer that wants a
gradient as soon as it is final (the data-parallel reducer, which starts a
bucket's sum then) registers ``fn`` on the parameter:

    handle = register_gradient_hook(param, fn)   # handle.remove() to stop

and is called ``fn(param, grad)`` with the gradient this backward pass
gives ``param`` (``None``: none, e.g. an unused parameter), before autograd
adds it to ``param.grad``.  Autograd then adds it as usual (``.grad`` is
``grad``, or ``.grad + grad`` when a gradient was there), and the
parameter's post-accumulate hooks run.

Hooks are kept by parameter identity and do not keep the parameter alive;
a parameter without hooks costs one dictionary lookup per layer and pass.

A pass can also be several backward calls of autograd, each accumulating
into ``.grad``: a pipeline schedule that interleaves forward and backward
(1F1B) differentiates each micro-batch on its own, so every parameter of a
rank takes one accumulation per micro-batch.  The engine runs all but the
rank's last such call within ``partial_sums()``; while
``in_partial_sums()`` is true, what autograd accumulates (and what the
parameters' post-accumulate hooks see) is not yet the pass's gradient, and
a consumer waiting for final gradients lets those accumulations pass.
"""
from contextlib import contextmanager

from torch.utils.weak import WeakIdKeyDictionary

_hooks = WeakIdKeyDictionary()  # {parameter: [fn, ...]}
_partial = 0  # > 0: the backward calls running now accumulate partial sums


class GradientHookHandle:
    """``remove()`` unregisters the hook (twice does nothing)."""

    def __init__(self, param, fn):
        self._param, self._fn = param, fn

    def remove(self):
        param, self._param = self._param, None
        if param is None:
            return
        fns = _hooks.get(param)
        if fns is not None and self._fn in fns:
            fns.remove(self._fn)
            if not fns:
                del _hooks[param]


def register_gradient_hook(param, fn):
    """Call ``fn(param, grad)`` whenever a layer-parallel backward pass has
    made ``param``'s gradient; returns a handle with ``remove()``."""
    if not callable(fn):
        raise TypeError(f"fn must be callable: fn(param, grad), not {type(fn).__name__}")
    _hooks.setdefault(param, []).append(fn)
    return GradientHookHandle(param, fn)


def made(params, grads):
    """The gradients ``grads`` of ``params`` (one layer's, in order) are
    final: call the hooks of those parameters that have any."""
    if not _hooks:
        return
    for p, g in zip(params, grads):
        fns = _hooks.get(p)
        if fns:
            for fn in tuple(fns):
                fn(p, g)


@contextmanager
def partial_sums():
    """Within: autograd's accumulations into ``.grad`` are partial sums of
    the pass's gradients (a later backward call of the same pass adds to
    them).  Autograd may run a device's accumulations on a thread of its
    own while the caller waits, so the mark is one for the process."""
    global _partial
    _partial += 1
    try:
        yield
    finally:
        _partial -= 1


def in_partial_sums():
    """Whether the accumulations into ``.grad`` running now are partial sums
    (within ``partial_sums()``)."""
    return _partial > 0
