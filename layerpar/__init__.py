"""layerpar: layer-parallel training of deep residual networks with MGRIT.

The residual layers u_{n+1} = u_n + h*F(u_n; theta_n) are split over the
ranks of an MPI communicator; forward propagation is an MGRIT solve across
the ranks and back-propagation an adjoint MGRIT solve backward in layer-time.

    from layerpar import Network, DenseStep, DenseOpening, DenseClosing

or, from the modules of a ResNet that is already written (the drop-in form):

    net = layerpar.parallelize(stem, blocks=blocks, head=head, comm=comm)
    loss = net.step(x, y, torch.nn.functional.cross_entropy)
"""
__version__ = "0.1.0"

# The names below are imported on first use, so that importing the package
# (e.g. for ``layerpar --help``) does not load torch.
_WHERE = {"parallelize": "dropin", "LayerParallel": "parallel", "Network": "parallel",
          "ConvClosing": "steps", "ConvOpening": "steps", "ConvStep": "steps",
          "DenseClosing": "steps", "DenseOpening": "steps", "DenseStep": "steps",
          "ResidualLayer": "steps", "SmoothReLU": "steps", "ProcessGrid": "grid",
          "SilentRankError": "_watchdog", "set_timeout": "_watchdog",
          "layer_rng": "engine.policy"}


def __getattr__(name):
    if name in _WHERE:
        import importlib
        value = getattr(importlib.import_module(f"layerpar.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'layerpar' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_WHERE))


__all__ = [
    "parallelize",
    "LayerParallel",
    "Network",
    "ProcessGrid",
    "DenseStep",
    "ConvStep",
    "DenseOpening",
    "ConvOpening",
    "DenseClosing",
    "ConvClosing",
    "ResidualLayer",
    "SmoothReLU",
    "SilentRankError",
    "set_timeout",
    "layer_rng",
]
