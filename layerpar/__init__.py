"""layerpar: layer-parallel training of deep residual networks with MGRIT.

The residual layers u_{n+1} = u_n + h*F(u_n; theta_n) are split over the
ranks of an MPI communicator; forward propagation is an MGRIT solve across
the ranks and back-propagation an adjoint MGRIT solve backward in layer-time.

    from layerpar import Network, DenseStep, DenseOpening, DenseClosing
"""
__version__ = "0.1.0"

from layerpar.parallel import LayerParallel, Network
from layerpar.steps import (
    ConvClosing,
    ConvOpening,
    ConvStep,
    DenseClosing,
    DenseOpening,
    DenseStep,
    ResidualLayer,
    SmoothReLU,
)

__all__ = [
    "LayerParallel",
    "Network",
    "DenseStep",
    "ConvStep",
    "DenseOpening",
    "ConvOpening",
    "DenseClosing",
    "ConvClosing",
    "ResidualLayer",
    "SmoothReLU",
]
