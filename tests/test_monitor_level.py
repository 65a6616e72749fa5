"""The residual monitor's level criterion: a solve that contracts well but
ends with a residual large relative to the state it is given counts as
stalled; the solves record that norm (checked against torch)."""
import math

import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from layerpar import DenseClosing, DenseOpening, DenseStep, Network
from layerpar.config import ConfigError, resolve
from layerpar.training import ResidualMonitor
from layerpar.training.build import make_monitor


class _Body:
    def __init__(self):
        self.last_forward = {"residual_norms": [], "input_norm": 0.0}
        self.last_backward = {"residual_norms": [], "input_norm": 0.0}
        self.calls = []

    def reconfigure(self, **kw):
        self.calls.append(kw)


def test_large_residual_counts_as_stall_though_it_contracts():
    body = _Body()
    mon = ResidualMonitor(0.5, 2, 4, 1, 1, max_residual=1.0)
    off = ResidualMonitor(0.5, 2, 4, 1, 1)
    body.last_forward.update(residual_norms=[40.0, 4.0], input_norm=2.0)  # rate 0.1, level 2x
    body.last_backward.update(residual_norms=[1.0, 0.01], input_norm=0.1)  # fine
    assert mon.too_large(body.last_forward) and not mon.too_large(body.last_backward)
    assert mon.update(body) is None           # one stall: patience 2
    assert "fwd_iters -> 2" in mon.update(body)
    assert body.calls == [{"fwd_iters": 2}]
    for _ in range(4):
        assert off.update(body) is None       # contraction alone: nothing to do
    # at the bound exactly, or below it: not stalled; the count starts again
    body.last_forward.update(residual_norms=[40.0, 2.0])
    assert not mon.too_large(body.last_forward)
    mon.update(body)
    assert mon.stalls["fwd"] == 0
    # a non-finite residual or a zero given state with a residual: stalled
    assert mon.too_large({"residual_norms": [1.0, math.nan], "input_norm": 1.0})
    assert mon.too_large({"residual_norms": [1.0, 0.5], "input_norm": 0.0})
    assert not mon.too_large({"residual_norms": [], "input_norm": 0.0})


def test_config_key_is_checked_and_passed_on():
    mon = make_monitor(resolve(None, ['mgrit.mode="one-shot"', "mgrit.monitor_max_residual=0.25"]))
    assert mon.max_residual == 0.25
    assert make_monitor(resolve(None, [])).max_residual == 1.0
    for bad in ("-1.0", "inf"):
        with pytest.raises(ConfigError, match="mgrit.monitor_max_residual"):
            resolve(None, [f"mgrit.monitor_max_residual={bad}"])


@pytest.mark.mpi
def test_solves_record_the_norm_of_their_given_state():
    comm = MPI.COMM_WORLD
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    with Network(lambda: DenseOpening(2, 4), lambda n: DenseStep(4, "tanh"),
                 lambda: DenseClosing(4, 3), nlayers=8, T=2.0, comm=comm,
                 seed=2).double() as net:  # exact propagation: u_N is the serial one
        loss = net.loss(x, y, Fn.cross_entropy)
        loss.backward()
        seq = net.serial_equivalent()
    u0 = seq[0](x).detach()
    uN = seq[:-1](x).detach().requires_grad_(True)
    lam, = torch.autograd.grad(Fn.cross_entropy(seq[-1](uN), y), uN)
    fwd, bwd = net.body.last_forward["input_norm"], net.body.last_backward["input_norm"]
    assert fwd == pytest.approx(float(u0.norm()), rel=1e-12)
    assert bwd == pytest.approx(float(lam.norm()), rel=1e-10)


def test_monitor_says_what_it_did_in_words():
    """The monitor's lines name the solve and the new iteration count, and
    the switch to serial propagation, without jargon ("stalled")."""
    body = _Body()
    mon = ResidualMonitor(0.5, 1, 3, 2, 1)
    body.last_forward.update(residual_norms=[1.0, 0.9])    # contracts by 0.9 > 0.5
    body.last_backward.update(residual_norms=[1.0, 1e-3])  # fine
    text = mon.update(body)
    assert text == ("MGRIT converged too slowly (forward solve: 3 iterations per step from "
                    "now on, fwd_iters -> 3)")
    text = mon.update(body)  # past the ceiling of 3
    assert "exact serial propagation from now on" in text and "stalled" not in text
    assert body.calls[-1] == {"max_levels": 1}
