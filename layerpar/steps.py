"""Residual-step modules F(u; theta) and the opening and closing layers.

A residual layer is  u_{n+1} = u_n + h * F(u_n; theta_n); the modules here are
the F.  Any ``nn.Module`` that maps a state to a state of the same shape can
serve as F.
"""
import torch
from torch import nn

from layerpar.engine.policy import CallKinds


class SmoothReLU(nn.Module):
    """ReLU with the corner replaced by a parabola on [-eps, eps], so that it
    is continuously differentiable:  0 for x <= -eps, x for x >= eps,
    (x + eps)^2 / (4 eps) in between."""

    def __init__(self, eps: float = 0.1) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps={eps!r}: must be > 0")
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.eps
        mid = (x + e) ** 2 / (4 * e)
        return torch.where(x >= e, x, torch.where(x <= -e, torch.zeros_like(x), mid))

    def extra_repr(self):
        return f"eps={self.eps}"


ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "smoothrelu": SmoothReLU,
}


def activation(name):
    """The activation module for ``name`` ('tanh', 'relu', 'smoothrelu')."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"activation={name!r}: choose one of {sorted(ACTIVATIONS)}") from None


BIASES = ("vector", "scalar")


class ScalarBiasLinear(nn.Module):
    """u -> W u + b with one scalar b added to every output.  Initialised as
    ``nn.Linear`` would (the bias from its first entry)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        ref = nn.Linear(in_features, out_features)
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach()[:1].clone())

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(u, self.weight) + self.bias

    def extra_repr(self):
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"


def _affine(in_features, out_features, bias):
    if bias == "vector":
        return nn.Linear(in_features, out_features)
    if bias == "scalar":
        return ScalarBiasLinear(in_features, out_features)
    raise ValueError(f"bias={bias!r}: choose one of {BIASES}")


class DenseStep(nn.Module):
    """F(u) = sigma(W u + b) on states of shape (batch, width); ``b`` is a
    vector (``bias='vector'``, default) or one scalar per layer
    (``bias='scalar'``)."""

    def __init__(self, width: int, activation_name: str = "tanh", bias: str = "vector") -> None:
        super().__init__()
        self.linear = _affine(width, width, bias)
        self.act = activation(activation_name)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(u))


class ConvStep(nn.Module):
    """F(u) = sigma(K * u + b) on states of shape (batch, channels, H, W), with
    padding that keeps the spatial shape (odd kernel sizes)."""

    def __init__(self, channels: int, kernel_size: int = 3, activation_name: str = "relu") -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size={kernel_size}: must be odd to keep the shape")
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.act = activation(activation_name)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(u))


class DenseOpening(nn.Module):
    """Lifts inputs of shape (batch, in_features) to the network width:
    sigma(W x + b), ``b`` a vector or one scalar (``bias``, as DenseStep)."""

    def __init__(self, in_features: int, width: int, activation_name: str = "tanh",
                 bias: str = "vector") -> None:
        super().__init__()
        self.linear = _affine(in_features, width, bias)
        self.act = activation(activation_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x.flatten(1)))


class ConvOpening(nn.Module):
    """Lifts images of shape (batch, in_channels, H, W) to ``channels``."""

    def __init__(self, in_channels: int, channels: int, kernel_size: int = 3,
                 activation_name: str = "relu") -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, kernel_size, padding=kernel_size // 2)
        self.act = activation(activation_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class DenseClosing(nn.Module):
    """Classifier: a linear map from the state to class scores."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, num_classes)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.linear(u.flatten(1))


class ConvClosing(nn.Module):
    """Classifier for image states: average pooling to ``pool`` x ``pool``,
    then a linear map to class scores."""

    def __init__(self, channels: int, num_classes: int, pool: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.linear = nn.Linear(channels * pool * pool, num_classes)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(u).flatten(1))


class ResidualLayer(nn.Module):
    """u -> u + h * F(u): one layer of the serial network, computed as the
    MGRIT forward step computes it (one fused add), so that exact mode
    (``max_levels=1``) gives the same bits."""

    def __init__(self, F: nn.Module, h: float) -> None:
        super().__init__()
        self.F = F
        self.h = h
        self._kinds = CallKinds()

    def forward(self, u: torch.Tensor, context=None) -> torch.Tensor:
        F = self.F
        f = F(u, context=context) if self._kinds.takes_context(F) else F(u)
        return torch.add(u, f, alpha=self.h)

    def extra_repr(self):
        return f"h={self.h}"


class SerialStack(nn.Sequential):
    """The serial network (opening, residual layers, closing) as one
    ``nn.Sequential``: ``stack(x, context=c)`` gives the context to the
    modules that take it (``layerpar.engine.policy.takes_context``); an
    opening that returns ``(state, context)`` adds its context (the given
    arrays win), as ``layerpar.Network`` does."""

    def __init__(self, *args):
        super().__init__(*args)
        self._kinds = CallKinds()

    def forward(self, x, *, context=None):
        takes_context = self._kinds.takes_context
        for module in self:
            x = module(x, context=context) if takes_context(module) else module(x)
            if isinstance(x, tuple):
                x, derived = x
                context = {**derived, **(context or {})}
        return x
