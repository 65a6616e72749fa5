"""Fault injection into LayerParallel: an exception in a layer on one chosen
rank at a chosen call, in the forward solve, the backward solve and a
training step; every rank raises (the original exception there, an error
naming that rank elsewhere) and the same operation then works again.  The
cases are those of scripts/fault_matrix.py (which also runs the solver
callback kinds of test_braid_failures.py on 1, 2 and 4 ranks and writes
the counts to a CSV).
"""
import importlib.util
import os

import pytest
import torch
from mpi4py import MPI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "fault_matrix", os.path.join(ROOT, "scripts", "fault_matrix.py"))
fm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fm)

TARGETS = ["forward", "backward", "train-forward", "train-backward"]


@pytest.mark.mpi
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("at", [1, 3])
@pytest.mark.parametrize("target", TARGETS)
def test_a_layer_failing_on_one_rank_raises_everywhere_then_works(target, at, where):
    comm = MPI.COMM_WORLD
    rank = 0 if where == "first" else comm.size - 1
    case = (target, "layer", rank, at)
    first, second = fm.run_network_case(comm, case)
    passed, _, detail = fm.judge(comm, case, first, second)
    assert passed, detail


@pytest.mark.mpi
@pytest.mark.parametrize("case", fm.solver_cases(MPI.COMM_WORLD.size),
                         ids=lambda c: f"{c[1]}-rank{c[2]}-at{c[3]}")
def test_a_solver_callback_failing_on_one_rank_raises_everywhere_then_works(case):
    comm = MPI.COMM_WORLD
    first, second = fm.run_solver_case(comm, case)
    passed, _, detail = fm.judge(comm, case, first, second)
    assert passed, detail


def test_a_loss_failing_on_one_rank_raises_on_every_rank_and_the_network_goes_on():
    """The loss raises on the last rank only, outside any solve: every rank
    raises at once (the others naming the last rank), none waits for the
    timeout, and the next step runs on every rank."""
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("starts a child mpiexec: run it on one process")
    env = fm.child_env()
    env["LAYERPAR_TIMEOUT"] = "60"  # armed (the agreement's guarded path), never reached
    out, err, hung = fm.run_job(2, ["--loss-case"], 120, env)
    assert not hung, out + err
    res = fm.records(out, "LOSS")
    assert len(res) == 2 and all(r["good"] for r in res), out + err[-1000:]


# ---------------------------------------------------------------------------
# a user's error on one rank, outside the layers: every entry point agrees

class _Closing(torch.nn.Module):
    """A closing layer that raises while ``fail`` is set."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.fail = False

    def forward(self, u):
        if self.fail:
            raise KeyError("the closing layer failed")
        return self.lin(u)


MODES = {"exact": dict(max_levels=1), "gpipe": dict(max_levels=1, microbatches=3),
         "1f1b": dict(max_levels=1, microbatches=3, schedule="1f1b"),
         "mgrit": dict(max_levels=2, cfactor=2, fwd_iters=2, bwd_iters=1)}


def _entry(net, how, x, y, loss_fn):
    if how == "loss_and_backward":
        return net.loss_and_backward(x, y, loss_fn)[0]
    if how == "loss":
        loss = net.loss(x, y, loss_fn)
        loss.backward()
        return loss
    out = net(x)  # forward alone, the loss computed by the user
    loss = loss_fn(out, y) if net.is_last else out.sum() * 0.0
    loss.backward()
    return loss


@pytest.mark.mpi
@pytest.mark.parametrize("how", ["loss_and_backward", "loss", "forward"])
@pytest.mark.parametrize("where", ["opening", "closing", "loss"])
@pytest.mark.parametrize("mode", list(MODES))
def test_a_users_error_on_one_rank_raises_the_same_type_everywhere_and_the_network_goes_on(
        mode, where, how):
    """A wrong input shape for the opening layer (first rank), a closing
    layer that raises or labels the loss cannot take (last rank): every
    rank raises an exception of the same type, within a timeout that is
    never reached, and the next step on good data runs everywhere with the
    serial network's loss."""
    if how == "forward" and where == "loss":
        pytest.skip("the user's own loss outside the network: nothing to agree on")
    from layerpar import Network, set_timeout
    world = MPI.COMM_WORLD
    comm = world.Dup()
    set_timeout(comm, 20)
    net = Network(lambda: torch.nn.Linear(2, 3), lambda n: torch.nn.Linear(3, 3), _Closing,
                  nlayers=4 * world.size, T=1.0, comm=comm, **MODES[mode]).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=g)
    bad_x, bad_y = x, y
    if where == "opening":
        bad_x = torch.randn(6, 5, dtype=torch.float64)  # the opening takes 2 features
    elif where == "closing" and net.is_last:
        net.closing.fail = True
    else:
        bad_y = torch.tensor([0, 1, 0])  # 3 labels for 6 samples
    try:
        _entry(net, how, bad_x if net.is_first else None, bad_y if net.is_last else None,
               torch.nn.functional.cross_entropy)
        got = "none"
    except Exception as e:  # noqa: BLE001 - compared on every rank below
        # elsewhere a RemoteError that is of the failing exception's type too
        got = tuple(c.__name__ for c in type(e).__mro__)
    if net.is_last:
        net.closing.fail = False
    net.zero_grad()
    loss = _entry(net, how, x if net.is_first else None, y if net.is_last else None,
                  torch.nn.functional.cross_entropy)
    value = net.reduce(loss)
    seq = net.serial_equivalent()
    net.close()
    comm.Free()
    ref = float(torch.nn.functional.cross_entropy(seq(x), y))
    outcomes = world.allgather((got, value))
    assert all(k != "none" for k, _ in outcomes), outcomes
    failing = outcomes[0 if where == "opening" else world.size - 1][0][0]
    assert failing != "RemoteError" and all(failing in k for k, _ in outcomes), outcomes
    if mode != "mgrit":  # exact modes: the serial loss to round-off
        assert all(abs(v - ref) <= 1e-12 * abs(ref) for _, v in outcomes), (outcomes, ref)
    assert len({v for _, v in outcomes}) == 1
