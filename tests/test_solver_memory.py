"""What the solvers keep: only the points read later.

LayerParallel's solvers store the C-points and the last point only
(store='C'; one level: the two end points), the core frees its coarse levels once no cycle follows, the last sweep measures
each residual as it goes, restriction forms each coarse right-hand side as
soon as its coarse step exists, and a cold solve with the skipped
down-cycle asks for no initial values it never reads.  None of it
changes a result: outputs, gradients and residual histories are compared
bit for bit with solvers that keep every point, and the last residual
measured in the sweep with the same residual measured after it.  The
vectors a solver holds are counted by the binding (``Solver.stats()``).
Runs on 1, 2 and 4 ranks.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from braid_ext import Solver
from braid_ext.examples.dahlquist import Dahlquist
from braid_ext.examples.rotation import DampedRotation
from layerpar import DenseClosing, DenseOpening, DenseStep, LayerParallel, Network

WORLD = MPI.COMM_WORLD
F64 = torch.float64

# LayerParallel's solver settings (one level runs as the pipeline, no solver:
# the one-level solver is checked on its own below)
SETTINGS = {
    "F-skip": dict(max_levels=3, cfactor=4, relax="F", skip=True, fwd_iters=2, bwd_iters=1),
    "FCF": dict(max_levels=3, cfactor=2, relax="FCF", fwd_iters=2, bwd_iters=2),
    "one-shot": dict(max_levels=3, cfactor=4, relax="F", skip=True, fwd_iters=1, bwd_iters=1,
                     warm_start=True),
}


def dense_net(store, monkeypatch, nlayers=32, **opts):
    monkeypatch.setattr(LayerParallel, "_store", store)
    return Network(lambda: DenseOpening(2, 4), lambda n: DenseStep(4, "tanh"),
                   lambda: DenseClosing(4, 3), nlayers=nlayers, T=4.0, comm=WORLD, seed=5,
                   **opts).double()


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 2, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)


def train(net, passes=3):
    """Training passes with a plain gradient step each: per pass the loss,
    the gradients (this rank's) and both residual histories."""
    out = []
    for k in range(passes):
        x, y = batch(k)
        net.zero_grad()
        loss = net.loss(x, y, Fn.cross_entropy)
        loss.backward()
        grads = [p.grad.clone() for p in net.parameters()]
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.5 * p.grad
        body = net.body
        out.append((net.reduce(loss), grads, list(body.last_forward["residual_norms"]),
                    list(body.last_backward["residual_norms"])))
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_keeping_C_points_only_changes_no_bit(name, monkeypatch):
    runs = []
    for store in ("all", "C"):
        with dense_net(store, monkeypatch, **SETTINGS[name]) as net:
            runs.append(train(net))
    for (la, ga, fa, ba), (lc, gc, fc, bc) in zip(*runs):
        assert la == lc and fa == fc and ba == bc
        assert all(torch.equal(a, c) for a, c in zip(ga, gc))
    assert all(len(r[2]) > 0 for r in runs[1])  # the histories are not empty


def held_points(solver):
    lo, hi = solver.local_range(0)
    return sum(solver.is_stored(i) for i in range(lo, hi + 1)), hi - lo + 1


@pytest.mark.mpi
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_solvers_hold_the_C_points_only(name, monkeypatch):
    opts = SETTINGS[name]
    N, m = 64, opts.get("cfactor", 1)
    counts = {}
    for store in ("all", "C"):
        with dense_net(store, monkeypatch, nlayers=N, **opts) as net:
            train(net, passes=2)
            body = net.body
            counts[store] = []
            for solver in (body.solvers.fwd, body.solvers.bwd):
                st = solver.stats()
                stored, points = held_points(solver)
                # between solves the solver holds its stored points and nothing else
                assert st["vectors_held"] == stored
                counts[store].append((stored, points, st["vectors_peak"]))
    for (s_all, p, peak_all), (s_c, p_c, peak_c) in zip(counts["all"], counts["C"]):
        assert p == p_c and s_all == p
        assert s_c <= p // m + 2  # C-points (and N)
        # the F-points are not held during the solve either: at most the
        # walk's own vector (a stored point with store='all') is extra
        assert peak_c <= peak_all - (p - s_c) + 1
        # O(points / cfactor): the C-points and their work values, and on
        # each coarse level its points, right-hand sides and work values
        assert peak_c <= 5 * (p // m + 2) + 8


@pytest.mark.mpi
@pytest.mark.parametrize("reverse", [False, True])
def test_a_one_level_solver_holds_its_two_ends_only(reverse):
    """One level (sequential stepping across the ranks): with store='C' the
    solver holds the ends 0 and N only, between solves and during them,
    and its u_N is the one of a solver that keeps every point, bit for bit."""
    N = 64
    held, final = {}, {}
    for store in ("all", "C"):
        with Solver(DampedRotation(), WORLD, 0.0, 4.0, N, max_levels=1, abs_tol=0.0,
                    max_iter=1, store=store, final_sweep=True, reverse=reverse) as s:
            for _ in range(2):
                s.solve()
            st = s.stats()
            stored, points = held_points(s)
            assert st["vectors_held"] == stored
            held[store] = (stored, points, st["vectors_peak"])
            lo, hi = s.local_range(0)
            final[store] = np.array(s.get(N)) if lo <= N <= hi else None
    (s_all, p, peak_all), (s_c, p_c, peak_c) = held["all"], held["C"]
    assert p == p_c and s_all == p
    # O(1), not O(points): the two ends and the value being stepped
    assert s_c <= 2 and peak_c <= 3 < p <= peak_all
    if final["C"] is not None:
        assert np.array_equal(final["C"], final["all"])


@pytest.mark.mpi
@pytest.mark.parametrize("store", ["all", "C"])
@pytest.mark.parametrize("options", [
    dict(max_levels=3, cfactor=2),
    dict(max_levels=3, cfactor=3, skip=True),
    dict(max_levels=4, cfactor=2, cycle="F"),
], ids=["V", "V-skip", "F-cycle"])
def test_last_residual_measured_in_the_sweep_is_the_same_number(options, store):
    # a solve of k iterations measures r_k in its last sweep (dropping the
    # work values as it goes); one of k + 2 iterations measures it after its
    # sweep and restricts: the same numbers, bit for bit.  F-relaxation: its
    # iteration k then does the same work in both (with FCF the last
    # iteration of a solve does not relax, so r_k differs)
    comm = MPI.COMM_WORLD
    histories = {}
    for k in (2, 4):
        with Solver(DampedRotation(), comm, 0.0, 4.0, 97, abs_tol=0.0, max_iter=k,
                    relax="F", store=store, **options) as s:
            histories[k] = s.solve()
            assert s.stats()["vectors_held"] == held_points(s)[0]
    assert histories[4][:len(histories[2])] == histories[2]
    assert len(histories[4]) == len(histories[2]) + 2


@pytest.mark.mpi
@pytest.mark.parametrize("skip", [False, True])
def test_cold_skipped_solve_asks_for_no_unread_initial_values(skip):
    comm = MPI.COMM_WORLD
    nsteps = 48

    class Noisy(Dahlquist):
        """Initial guesses of noise: a solve that read them would change."""

        def init(self, t, index):
            self.inits.append(index)
            if index == 0:
                return super().init(t, index)
            return np.random.default_rng(index).standard_normal(1)

    app = Noisy(-1.0)
    app.inits = []
    with Solver(app, comm, 0.0, 1.0, nsteps, max_levels=3, cfactor=2, relax="F", skip=skip,
                abs_tol=0.0, max_iter=3, store="C") as s:
        norms = s.solve()
        lo, _ = s.local_range(0)
    if skip:
        assert app.inits == ([0] if lo == 0 else [])
    else:
        assert len(app.inits) > (lo == 0)
    with Solver(Dahlquist(-1.0), comm, 0.0, 1.0, nsteps, max_levels=3, cfactor=2, relax="F",
                skip=skip, abs_tol=0.0, max_iter=3, store="C") as ref:
        assert (ref.solve() == norms) == skip  # zero initial guesses: the same only with skip


@pytest.mark.mpi
@pytest.mark.parametrize("nlayers", [32, 8])
def test_warm_states_saved_with_every_point_load_into_C_point_solvers(nlayers, monkeypatch):
    # a one-shot run's warm states saved by solvers that kept every point
    # (checkpoints written so) continue a run of C-point solvers bit for bit:
    # the warm start recomputes the F-points before anything reads them.
    # With 8 layers on 4 ranks a rank owns no C-point (points 5 and 6): it
    # keeps no point, lists the same pairs and starts warm with the others
    opts = SETTINGS["one-shot"]
    with dense_net("all", monkeypatch, nlayers=nlayers, **opts) as net:
        train(net, passes=2)
        states = net.body.warm_states()
        weights = [p.detach().clone() for p in net.parameters()]
        ref = train(net, passes=2)
    with dense_net("C", monkeypatch, nlayers=nlayers, **opts) as net:
        with torch.no_grad():
            for p, w in zip(net.parameters(), weights):
                p.copy_(w)
        net.body.load_warm_states(states)
        fwd = net.body.solvers.fwd
        held = states[-1][3]["fwd"]
        assert any(not fwd.is_stored(i) for i in held)  # F-points were saved
        assert all(fwd.is_stored(i) for i in held if i % opts["cfactor"] == 0)
        out = train(net, passes=2)
    for (la, ga, fa, ba), (lc, gc, fc, bc) in zip(ref, out):
        assert la == lc and fa == fc and ba == bc
        assert all(torch.equal(a, c) for a, c in zip(ga, gc))
