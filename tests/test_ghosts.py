"""Ghost layers (coarse-grid weights from other ranks): sent as flat bytes
only when a layer changed (its version), and always equal to the owner's.

MPI tests on COMM_WORLD; outcomes are gathered before any assertion."""
import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from layerpar import DenseClosing, DenseOpening, DenseStep, Network

WORLD = MPI.COMM_WORLD


def make(transport="host", dtype=torch.float64):
    return Network(lambda: DenseOpening(2, 4), lambda n: DenseStep(4, "tanh"),
                   lambda: DenseClosing(4, 3), nlayers=15, T=1.0, comm=WORLD, seed=2,
                   max_levels=3, cfactor=2, min_coarse=1, fwd_iters=1, bwd_iters=1,
                   transport=transport).to(dtype)


def owners_agree(net):
    """Does every ghost hold bitwise its owner's weights (and flags)?"""
    body = net.body
    mine = {n: {k: v.clone() for k, v in body.stage.layers[str(n)].state_dict().items()}
            for n in body.layer_indices}
    every = {}
    for part in WORLD.allgather(mine):
        every.update(part)
    return all(torch.equal(v, every[n][k]) for n, g in body.stage.ghosts.items()
               for k, v in g.state_dict().items())


@pytest.mark.mpi
@pytest.mark.parametrize("transport", ["host", "device"])
def test_ghost_weights_travel_only_when_changed(transport):
    net = make(transport)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 2, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ghosts = net.body._ghosts
    sent, ok = [], []
    try:
        for step in range(3):
            before = dict(ghosts.stats)
            with torch.no_grad():
                net(x)                       # a pass: weights as last sent
                ok.append(owners_agree(net))
            mid = dict(ghosts.stats)
            with torch.no_grad():
                net(x)                       # again: nothing changed
            after = dict(ghosts.stats)
            sent.append((mid["bytes"] - before["bytes"], after["bytes"] - mid["bytes"],
                         after["messages"] - mid["messages"], len(ghosts.sends)))
            opt.zero_grad()
            net.loss(x, y, Fn.cross_entropy).backward()
            opt.step()                       # every layer changes
    finally:
        net.close()
    outcomes = WORLD.allgather((ok, sent))
    assert all(all(o) for o, _ in outcomes), outcomes
    for _, rows in outcomes:
        for first, again, headers, nsends in rows:
            assert again == 0                # unchanged: no weight bytes
            peers = headers                  # one header per peer, nothing else
            assert peers <= nsends
    # weights went out on the first pass of every step (when this rank sends any)
    for _, rows in outcomes:
        if rows[0][3]:
            assert all(first > 0 for first, _, _, _ in rows)
    # every rank that steps with another rank's layer received it
    assert WORLD.size == 1 or any(rows[0][3] for _, rows in outcomes)


@pytest.mark.mpi
def test_ghosts_follow_a_dtype_change_and_load_state_dict():
    net = make()
    try:
        x = torch.randn(3, 2, dtype=torch.float64)
        with torch.no_grad():
            net(x)
            net.to(torch.float32)
            net(x.float())
            a = owners_agree(net)
            # new weights copied in place (as a checkpoint loads them)
            state = {k: v + 1 for k, v in net.state_dict().items()}
            net.load_state_dict(state)
            net(x.float())
            b = owners_agree(net)
            dtypes = {v.dtype for g in net.body.stage.ghosts.values()
                      for v in g.state_dict().values()}
    finally:
        net.close()
    assert WORLD.allgather((a, b, dtypes <= {torch.float32})) == [(True, True, True)] * WORLD.size
