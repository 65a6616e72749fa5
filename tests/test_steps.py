"""layerpar.steps: the dense step and opening with one scalar bias per layer,
against the formula written out with plain tensor operations."""
import pytest
import torch

from layerpar.steps import DenseOpening, DenseStep, SmoothReLU

F64 = torch.float64


def test_scalar_bias_dense_step_and_opening():
    torch.manual_seed(0)
    step = DenseStep(4, "smoothrelu", bias="scalar").double()
    opening = DenseOpening(2, 4, "tanh", bias="scalar").double()
    assert [tuple(p.shape) for p in step.parameters()] == [(4, 4), (1,)]
    assert [tuple(p.shape) for p in opening.parameters()] == [(4, 2), (1,)]
    u = torch.randn(5, 4, dtype=F64)
    x = torch.randn(5, 2, dtype=F64)
    W, b = step.linear.weight, step.linear.bias
    z = u @ W.T + b.item() * torch.ones(5, 4, dtype=F64)
    e = 0.1  # SmoothReLU: 0, (z + e)^2 / (4e), z
    expected = torch.where(z >= e, z, torch.where(z <= -e, torch.zeros_like(z),
                                                  (z + e) ** 2 / (4 * e)))
    assert torch.allclose(step(u), expected, rtol=0, atol=1e-15)
    Wo, bo = opening.linear.weight, opening.linear.bias
    assert torch.allclose(opening(x), torch.tanh(x @ Wo.T + bo.item()), rtol=0, atol=1e-15)
    # the scalar bias gets the sum of the gradients of the outputs
    step(u).sum().backward()
    z = z.detach()
    dsig = torch.where(z >= e, torch.ones_like(z),
                       torch.where(z <= -e, torch.zeros_like(z), (z + e) / (2 * e)))
    assert abs(float(b.grad) - float(dsig.sum())) <= 1e-12


def test_vector_bias_is_the_default_and_bad_bias_is_rejected():
    assert tuple(DenseStep(3).linear.bias.shape) == (3,)
    assert isinstance(DenseStep(3).linear, torch.nn.Linear)
    with pytest.raises(ValueError, match="bias="):
        DenseStep(3, bias="none")
    with pytest.raises(ValueError, match="bias="):
        DenseOpening(2, 3, bias="per-channel")
    assert isinstance(DenseStep(3, "smoothrelu").act, SmoothReLU)
