"""User modules for the tests: residual steps with state that a user might
write, imported by path ("userblocks:Block") from the configuration."""
import torch
from torch import nn


class Block(nn.Module):
    """F(u) = dropout(tanh(W u + b)) + c * tanh(V u): V and c are frozen
    (requires_grad False), W and b are trained."""

    def __init__(self, width=8, p=0.1, c=0.5):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.frozen = nn.Linear(width, width, bias=False)
        self.frozen.requires_grad_(False)
        self.c = nn.Parameter(torch.tensor(float(c)), requires_grad=False)
        self.drop = nn.Dropout(p)

    def forward(self, u):
        return self.drop(torch.tanh(self.linear(u))) + self.c * torch.tanh(self.frozen(u))


class NormBlock(nn.Module):
    """F(u) = tanh(BN(W u)): batch statistics in training mode, running
    statistics (updated once per forward pass) in evaluation mode."""

    def __init__(self, width=8):
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)
        self.norm = nn.BatchNorm1d(width)

    def forward(self, u):
        return torch.tanh(self.norm(self.linear(u)))


def make_block(width=8, p=0.1):
    """A function returning a module, for the factory form of an import path."""
    return Block(width=width, p=p)


NOT_A_MODULE = 3


class NotAModule:
    pass


class MaskedBlock(nn.Module):
    """A step on token states (batch, length, width) that takes the pass's
    context: F(u) = tanh(W u + mean over the kept tokens of V u), the
    padded tokens (context["mask"] False) left out of the mean."""

    def __init__(self, width=8):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.mix = nn.Linear(width, width)

    def forward(self, u, *, context=None):
        v = self.mix(u)
        keep = context["mask"].to(u.dtype).unsqueeze(-1)
        mean = (v * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1.0)
        return torch.tanh(self.linear(u) + mean)
