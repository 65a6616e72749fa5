"""Converged MGRIT equals sequential stepping, and the two-level theory holds.

Every solve here runs on MPI.COMM_WORLD (1 rank in the serial pass, 2 and 4
under mpiexec); the reference is the example app's own sequential loop, or,
for bit-for-bit claims, the app's step applied in a plain Python loop.
"""
import math
from types import SimpleNamespace

import numpy as np
import pytest
from mpi4py import MPI

from braid_ext import Solver
from braid_ext.examples.dahlquist import Dahlquist
from braid_ext.examples.rotation import DampedRotation

RTOL = 1e-12  # converged MGRIT vs sequential stepping, relative per point

# (app, t_stop, nsteps): odd nsteps, so no cfactor divides them all
APPS = {
    "dahlquist": (lambda: Dahlquist(lam=-1.0), 1.0, 101),
    "rotation": (lambda: DampedRotation(), 4.0, 77),
}


def expected_levels(nsteps, max_levels, cfactor, min_coarse=2):
    """(n, stride) of every level: coarsen while the coarse grid keeps at
    least min_coarse steps and max_levels allows."""
    sizes = [(nsteps, 1)]
    while len(sizes) < max_levels and sizes[-1][0] // cfactor >= min_coarse:
        n, stride = sizes[-1]
        sizes.append((n // cfactor, stride * cfactor))
    return sizes


def max_rel_error(solver, ref, comm):
    """Largest relative error over every stored point of every rank, and the
    number of stored points (summed over ranks)."""
    lo, hi = solver.local_range(0)
    err, count = 0.0, 0
    for i in range(lo, hi + 1):
        if solver.is_stored(i):
            count += 1
            u = np.asarray(solver.get(i))
            err = max(err, float(np.max(np.abs(u - ref[i])) / np.max(np.abs(ref[i]))))
    return comm.allreduce(err, op=MPI.MAX), comm.allreduce(count, op=MPI.SUM)


def stored_points(nsteps, cfactor, store, nlevels):
    """How many fine points a solve keeps: all of them, or the C-points and
    the last point (one level: the first and the last)."""
    if store == "all":
        return nsteps + 1
    if nlevels == 1:
        return 2
    return nsteps // cfactor + 1 + (nsteps % cfactor != 0)


@pytest.mark.mpi
@pytest.mark.parametrize("store", ["all", "C"])
@pytest.mark.parametrize("cycle", ["V", "F"])
@pytest.mark.parametrize("relax", ["F", "FCF"])
@pytest.mark.parametrize("max_levels", [1, 2, 3, 4])
@pytest.mark.parametrize("app_name", sorted(APPS))
def test_converged_mgrit_equals_sequential(app_name, max_levels, relax, cycle, store):
    comm = MPI.COMM_WORLD
    make, t_stop, nsteps = APPS[app_name]
    app = make()
    ref = app.sequential(0.0, t_stop, nsteps)
    # cfactor 2..8; one level does not coarsen, so one value is enough there
    for cfactor in (range(2, 9) if max_levels > 1 else [2]):
        with Solver(app, comm, 0.0, t_stop, nsteps, max_levels=max_levels,
                    cfactor=cfactor, relax=relax, cycle=cycle, store=store,
                    abs_tol=1e-13, max_iter=60) as solver:
            norms = solver.solve()
            levels = expected_levels(nsteps, max_levels, cfactor)
            assert solver.nlevels == len(levels), cfactor
            assert [solver.level_size(l) for l in range(solver.nlevels)] == levels
            if solver.nlevels == 1:
                assert solver.iterations == 1 and norms == []
            else:
                assert solver.iterations < 60, f"cfactor {cfactor}: not converged"
                assert len(norms) == solver.iterations + 1
                assert norms[-1] <= 1e-13
            err, count = max_rel_error(solver, ref, comm)
            assert count == stored_points(nsteps, cfactor, store, solver.nlevels), cfactor
            assert err <= RTOL, f"cfactor {cfactor}: relative error {err:.2e}"


@pytest.mark.mpi
@pytest.mark.parametrize("options", [
    dict(max_levels=3, cfactor=[4, 2], relax=["FCF", "F"]),
    dict(max_levels=4, cfactor=2, relax="FCFCF", cycle="F", skip=True),
    dict(max_levels=3, cfactor=3, skip=True, store="C", tnorm="inf"),
    dict(max_levels=2, cfactor=5, rel_tol=1e-12, abs_tol=0.0, min_coarse=3),
], ids=["per-level", "FCFCF-F-skip", "skip-C-inf", "rel_tol"])
@pytest.mark.parametrize("app_name", sorted(APPS))
def test_option_variants_equal_sequential(app_name, options):
    comm = MPI.COMM_WORLD
    make, t_stop, nsteps = APPS[app_name]
    app = make()
    opts = dict(abs_tol=1e-13, max_iter=60)
    opts.update(options)
    with Solver(app, comm, 0.0, t_stop, nsteps, **opts) as solver:
        solver.solve()
        assert solver.iterations < 60
        err, _ = max_rel_error(solver, app.sequential(0.0, t_stop, nsteps), comm)
        assert err <= RTOL


# --- two-level theory ------------------------------------------------------
#
# Two-level MGRIT makes one more C-interval exact per iteration with
# F-relaxation and two with FCF, so the residual is zero (round-off) after
# N/m resp. N/(2m) iterations.  The problems below converge slowly (the
# coarse step is a poor or unstable approximation of m fine steps), so the
# residual one iteration before that is clearly not at round-off.  nsteps is
# a multiple of 2m, where the bound is sharp.

THEORY = {
    # explicit midpoint on a pure rotation, omega*dt*m up to 4: unstable coarse step
    "rotation-64-4": (lambda: DampedRotation(omega=8.0, damping=0.0, cubic=0.0), 4.0, 64, 4),
    "rotation-96-8": (lambda: DampedRotation(omega=8.0, damping=0.0, cubic=0.0), 4.0, 96, 8),
    "rotation-36-3": (lambda: DampedRotation(omega=8.0, damping=0.0, cubic=0.0), 4.0, 36, 3),
    # forward Euler, lambda*dt = -2.5: the fine step flips sign, the coarse one explodes
    "dahlquist-36-3": (lambda: Dahlquist(lam=-30.0, scheme="forward"), 3.0, 36, 3),
}


def theory_bound(nsteps, cfactor, relax):
    return math.ceil(nsteps / cfactor) if relax == "F" else math.ceil(nsteps / (2 * cfactor))


@pytest.mark.mpi
@pytest.mark.parametrize("relax", ["F", "FCF"])
@pytest.mark.parametrize("case", sorted(THEORY))
def test_two_level_exact_after_theoretical_iterations(case, relax):
    comm = MPI.COMM_WORLD
    make, t_stop, nsteps, m = THEORY[case]
    app = make()
    k = theory_bound(nsteps, m, relax)
    with Solver(app, comm, 0.0, t_stop, nsteps, max_levels=2, cfactor=m, relax=relax,
                abs_tol=0.0, rel_tol=0.0, max_iter=k) as solver:
        norms = solver.solve()
        assert solver.iterations == k and len(norms) == k + 1
        # round-off relative to the largest residual of the run (the iterates
        # of these slowly converging problems grow large before they are exact)
        roundoff = 1e-12 * max(norms)
        assert norms[k] <= roundoff, f"r_{k} = {norms[k]:.2e}, largest {max(norms):.2e}"
        assert norms[k - 1] > 1e3 * roundoff, \
            f"r_{k - 1} = {norms[k - 1]:.2e} is already at round-off: the bound is not sharp here"
        err, _ = max_rel_error(solver, app.sequential(0.0, t_stop, nsteps), comm)
        assert err <= 1e-10


@pytest.mark.mpi
@pytest.mark.parametrize("relax", ["F", "FCF"])
@pytest.mark.parametrize("nsteps,cfactor", [(37, 4), (50, 3), (45, 6)])
def test_two_level_bound_holds_for_nsteps_not_divisible(nsteps, cfactor, relax):
    """With N not a multiple of m the bound ceil(N/m) (resp. ceil(N/(2m)))
    still holds: the trailing F-points are exact after any F-relaxation."""
    comm = MPI.COMM_WORLD
    app = DampedRotation(omega=8.0, damping=0.0, cubic=0.0)
    k = theory_bound(nsteps, cfactor, relax)
    with Solver(app, comm, 0.0, 4.0, nsteps, max_levels=2, cfactor=cfactor, relax=relax,
                abs_tol=0.0, max_iter=k) as solver:
        norms = solver.solve()
        assert len(norms) == k + 1
        assert norms[k] <= 1e-12 * max(norms)
        err, _ = max_rel_error(solver, app.sequential(0.0, 4.0, nsteps), comm)
        # the coarse corrections carry the round-off of iterates that grow
        # large (residuals up to 1e4-1e7) into the C-points
        assert err <= max(1e-10, 1e-13 * max(norms))


@pytest.mark.mpi
def test_zero_tolerances_run_exactly_max_iter():
    """abs_tol = rel_tol = 0 runs max_iter iterations, even past a residual
    that is exactly zero."""
    comm = MPI.COMM_WORLD
    with Solver(Dahlquist(-1.0), comm, 0.0, 1.0, 16, max_levels=2, cfactor=4,
                abs_tol=0.0, rel_tol=0.0, max_iter=6) as solver:
        norms = solver.solve()
        assert solver.iterations == 6 and len(norms) == 7
        assert norms[-1] == 0.0  # two FCF iterations suffice for 4 C-points


# --- one level: sequential stepping across ranks ---------------------------

def step_sequentially(app, t_start, t_stop, nsteps):
    """The app's own step in a plain loop, told the same times as the solver
    (t_i = t_start + (t_stop - t_start) * (i / N), t_N = t_stop)."""
    def t(i):
        return t_stop if i == nsteps else t_start + (t_stop - t_start) * (i / nsteps)

    states = [app.init(t(0), 0)]
    for i in range(nsteps):
        status = SimpleNamespace(level=0, index=i, index_stop=i + 1, t_start=t(i),
                                 t_stop=t(i + 1), iter=0, rhs=None)
        states.append(np.array(app.step(app.clone(states[-1]), status), copy=True))
    return states


@pytest.mark.mpi
@pytest.mark.parametrize("max_levels,nsteps,cfactor", [
    (1, 101, 2),   # one level asked for
    (3, 7, 4),     # 7 // 4 < min_coarse: too small to coarsen
])
@pytest.mark.parametrize("app_name", sorted(APPS))
def test_one_level_is_serial_bit_for_bit(app_name, max_levels, nsteps, cfactor):
    comm = MPI.COMM_WORLD
    app = APPS[app_name][0]()
    t_stop = APPS[app_name][1]
    ref = step_sequentially(app, 0.0, t_stop, nsteps)
    with Solver(app, comm, 0.0, t_stop, nsteps, max_levels=max_levels,
                cfactor=cfactor) as solver:
        norms = solver.solve()
        assert solver.nlevels == 1 and solver.iterations == 1 and norms == []
        lo, hi = solver.local_range(0)
        mismatched = [i for i in range(lo, hi + 1)
                      if not np.array_equal(solver.get(i), ref[i])]
    mismatched = comm.allreduce(mismatched, op=MPI.SUM)
    assert mismatched == [], f"points differing from serial stepping: {mismatched[:10]}"


@pytest.mark.mpi
@pytest.mark.parametrize("store", ["all", "C"])
@pytest.mark.parametrize("max_levels,relax", [(1, "F"), (2, "F"), (3, "FCF"), (4, "FCF")])
@pytest.mark.parametrize("app_name", sorted(APPS))
def test_reverse_equals_sequential(app_name, max_levels, relax, store):
    comm = MPI.COMM_WORLD
    make, t_stop, nsteps = APPS[app_name]
    app = make()
    opts = dict(max_levels=max_levels, cfactor=3, relax=relax, store=store,
                abs_tol=1e-13, max_iter=60)
    with Solver(app, comm, 0.0, t_stop, nsteps, reverse=True, **opts) as rev:
        rev_norms = rev.solve()
        lo, hi = rev.local_range(0)
        # the layout is mirrored: the last rank holds point 0, the first point N
        if comm.rank == comm.size - 1:
            assert lo == 0
        if comm.rank == 0:
            assert hi == nsteps
        err, _ = max_rel_error(rev, app.sequential(0.0, t_stop, nsteps), comm)
        assert err <= RTOL
    with Solver(app, comm, 0.0, t_stop, nsteps, **opts) as fwd:
        fwd_norms = fwd.solve()
    assert len(rev_norms) == len(fwd_norms)
    np.testing.assert_allclose(rev_norms, fwd_norms, rtol=1e-12, atol=0)


@pytest.mark.mpi
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("nsteps", [7, 64, 101])
def test_fine_points_are_split_in_contiguous_blocks(nsteps, reverse):
    """Every rank owns a contiguous block with at least one step; the blocks
    tile 0..N in rank order (mirrored with reverse); point 0 is with the
    first rank in time order."""
    comm = MPI.COMM_WORLD
    with Solver(Dahlquist(-1.0), comm, 0.0, 1.0, nsteps, max_levels=1,
                reverse=reverse) as solver:
        solver.solve()
        ranges = comm.allgather(solver.local_range(0))
    order = ranges[::-1] if reverse else ranges
    assert order[0][0] == 0 and order[-1][1] == nsteps
    for (lo, hi), (lo2, _) in zip(order, order[1:]):
        assert lo2 == hi + 1
    sizes = [hi - lo + 1 for lo, hi in order]
    assert all(s >= 1 for s in sizes)
    # nearly equal: the step counts (point 0 aside) differ by at most one
    steps = [sizes[0] - 1] + sizes[1:]
    assert max(steps) - min(steps) <= 1


class PureRotation(DampedRotation):
    """DampedRotation declares that its step never modifies its input and
    returns a new array: the binding may then share objects between clones."""
    pure_step = True


@pytest.mark.mpi
@pytest.mark.parametrize("store", ["all", "C"])
@pytest.mark.parametrize("max_levels,relax,cycle", [(2, "F", "V"), (3, "FCF", "F"), (4, "FCF", "V")])
def test_pure_step_app_gives_the_same_solve(max_levels, relax, cycle, store):
    comm = MPI.COMM_WORLD
    opts = dict(max_levels=max_levels, cfactor=3, relax=relax, cycle=cycle, store=store,
                abs_tol=1e-13, max_iter=60)
    with Solver(DampedRotation(), comm, 0.0, 4.0, 77, **opts) as plain:
        plain_norms = plain.solve()
    app = PureRotation()
    with Solver(app, comm, 0.0, 4.0, 77, **opts) as pure:
        pure_norms = pure.solve()
        err, _ = max_rel_error(pure, app.sequential(0.0, 4.0, 77), comm)
        pure.solve()  # a warm second solve leaves the solution intact
        err2, _ = max_rel_error(pure, app.sequential(0.0, 4.0, 77), comm)
    assert pure_norms == plain_norms  # the same arithmetic, to the bit
    assert err <= RTOL and err2 <= RTOL
