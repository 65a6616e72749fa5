"""Hooks on the weight gradients a layer-parallel backward pass makes.

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
"""
from torch.utils.weak import WeakIdKeyDictionary

_hooks = WeakIdKeyDictionary()  # {parameter: [fn, ...]}


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
