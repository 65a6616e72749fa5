"""Exact mode (one grid level) is the serial network bit for bit, on any
number of ranks: the layer-serial MGRIT forward step and ResidualLayer use
the same expression."""
import pytest
import torch
from mpi4py import MPI

from layerpar import ConvClosing, ConvOpening, ConvStep, DenseClosing, DenseOpening, DenseStep
from layerpar import Network

WORLD = MPI.COMM_WORLD


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_exact_mode_is_the_serial_network_bit_for_bit(dtype, kind):
    if kind == "dense":
        parts = (lambda: DenseOpening(3, 6), lambda n: DenseStep(6, "tanh"),
                 lambda: DenseClosing(6, 4))
        shape = (7, 3)
    else:
        parts = (lambda: ConvOpening(1, 3, 3), lambda n: ConvStep(3, 3, "relu"),
                 lambda: ConvClosing(3, 4, pool=2))
        shape = (5, 1, 6, 6)
    net = Network(*parts, nlayers=12, T=5.0, comm=WORLD, max_levels=1, seed=3).to(dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        out = net(x if net.is_first else None)
        serial = net.serial_equivalent(root=net.body.last_rank)
        if net.is_last:
            assert torch.equal(out, serial(x))
