"""Rank invariance: the same problem gives the same residual history and the
same solution on any number of ranks.

Under mpiexec every rank also solves the problem alone on COMM_SELF and
compares with the COMM_WORLD solve, so the runs on 2 and 4 ranks each prove
"P ranks == 1 rank"; in the serial pass both are one rank.
"""
import numpy as np
import pytest
from mpi4py import MPI

from braid_ext import Solver
from braid_ext.examples.dahlquist import Dahlquist
from braid_ext.examples.rotation import DampedRotation

HIST_RTOL = 1e-12   # residual norms, relative, entry by entry
STATE_RTOL = 1e-13  # solution states, relative to the state's size

CASES = {
    "dahlquist-V-FCF": (lambda: Dahlquist(-1.0), 2.0, 97,
                        dict(max_levels=3, cfactor=2, relax="FCF")),
    "dahlquist-F-F-C": (lambda: Dahlquist(-2.0), 2.0, 97,
                        dict(max_levels=4, cfactor=3, relax="F", cycle="F", store="C")),
    "rotation-V-FCFCF": (lambda: DampedRotation(), 4.0, 97,
                         dict(max_levels=2, cfactor=5, relax="FCFCF")),
    "rotation-skip-inf": (lambda: DampedRotation(), 4.0, 90,
                          dict(max_levels=3, cfactor=[3, 2], skip=True, tnorm="inf")),
    "rotation-reverse": (lambda: DampedRotation(), 4.0, 61,
                         dict(max_levels=3, cfactor=4, reverse=True, store="C")),
    # coarse grids with fewer points than ranks: some ranks own none
    "dahlquist-sparse-coarse": (lambda: Dahlquist(-1.0), 1.0, 40,
                                dict(max_levels=3, cfactor=4)),
    "rotation-deep": (lambda: DampedRotation(), 4.0, 40,
                      dict(max_levels=8, cfactor=2, min_coarse=1, cycle="F")),
    "rotation-fixed-iters": (lambda: DampedRotation(omega=8.0, damping=0.0, cubic=0.0), 4.0, 64,
                             dict(max_levels=3, cfactor=4, abs_tol=0.0, max_iter=5)),
}


@pytest.fixture(params=["COMM_SELF", "COMM_WORLD"])
def comm(request):
    return getattr(MPI, request.param)


@pytest.mark.mpi
@pytest.mark.parametrize("case", sorted(CASES))
def test_history_and_solution_match_one_rank(case, comm):
    make, t_stop, nsteps, options = CASES[case]
    opts = dict(abs_tol=1e-9, max_iter=40)
    opts.update(options)
    app = make()
    with Solver(app, MPI.COMM_SELF, 0.0, t_stop, nsteps, **opts) as alone, \
            Solver(app, comm, 0.0, t_stop, nsteps, **opts) as shared:
        ref_norms = alone.solve()
        norms = shared.solve()
        assert shared.iterations == alone.iterations
        # r_0 after the first relaxation, then one per iteration; skip leaves
        # out the first relaxation and so r_0
        expected = alone.iterations + (0 if opts.get("skip") else 1)
        assert len(norms) == len(ref_norms) == expected
        np.testing.assert_allclose(norms, ref_norms, rtol=HIST_RTOL, atol=0)

        lo, hi = shared.local_range(0)
        worst = 0.0
        for i in range(lo, hi + 1):
            assert shared.is_stored(i) == alone.is_stored(i)
            if shared.is_stored(i):
                a, b = np.asarray(shared.get(i)), np.asarray(alone.get(i))
                worst = max(worst, float(np.max(np.abs(a - b)) / np.max(np.abs(b))))
    worst = MPI.COMM_WORLD.allreduce(worst, op=MPI.MAX)
    assert worst <= STATE_RTOL


@pytest.mark.mpi
def test_every_rank_reports_the_same_history():
    comm = MPI.COMM_WORLD
    with Solver(DampedRotation(), comm, 0.0, 4.0, 80, max_levels=3, cfactor=2,
                abs_tol=1e-11) as solver:
        norms = solver.solve()
        stats = solver.stats()
        mine = (solver.iterations, norms, stats["iterations"], stats["nlevels"])
    everyone = comm.allgather(mine)
    assert all(e == everyone[0] for e in everyone)


@pytest.mark.mpi
def test_solvers_on_split_communicators():
    """Sub-communicators work like any other: the ranks split in two groups
    (data-parallel copies), each group solving its own problem at once."""
    world = MPI.COMM_WORLD
    color = world.rank % 2
    group = world.Split(color, world.rank)
    try:
        lam = -1.0 - color  # a different problem per group
        opts = dict(max_levels=3, cfactor=2, abs_tol=1e-11)
        with Solver(Dahlquist(lam), group, 0.0, 1.0, 48, **opts) as shared, \
                Solver(Dahlquist(lam), MPI.COMM_SELF, 0.0, 1.0, 48, **opts) as alone:
            norms, ref_norms = shared.solve(), alone.solve()
            lo, hi = shared.local_range(0)
            err = max(abs(float(shared.get(i)[0] - alone.get(i)[0])) / abs(alone.get(i)[0])
                      for i in range(lo, hi + 1))
    finally:
        group.Free()
    assert len(norms) == len(ref_norms)
    np.testing.assert_allclose(norms, ref_norms, rtol=HIST_RTOL, atol=0)
    assert err <= STATE_RTOL
