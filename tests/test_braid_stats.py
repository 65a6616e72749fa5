"""Statistics and the virtual clock, warm starts, and the access callback.

Step counts are checked against a count of the cycle's work done by hand;
the clock against the step counts; warm starts against cold starts; access
against the owned points and sequential stepping.
"""
import math

import numpy as np
import pytest
from mpi4py import MPI

from braid_ext import Solver
from braid_ext.examples.dahlquist import Dahlquist
from braid_ext.examples.rotation import DampedRotation


class CountingApp(Dahlquist):
    """Dahlquist that counts the calls of each of its methods and records
    access calls and the indices init was called for."""

    METHODS = ("step", "init", "clone", "sum", "norm", "bufsize", "pack", "unpack", "free",
               "access")

    def __init__(self, lam=-1.0):
        super().__init__(lam=lam)
        self.counts = dict.fromkeys(self.METHODS, 0)
        self.accessed = []
        self.inits = []
        self.rhs_steps = 0

    def step(self, u, status):
        self.rhs_steps += status.rhs is not None
        return super().step(u, status)

    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if name in CountingApp.METHODS:
            counts = super().__getattribute__("counts")

            def counted(*args):
                counts[name] += 1
                return attr(*args)
            return counted
        return attr

    def init(self, t, index):
        self.inits.append(index)
        return super().init(t, index)

    def free(self, u):
        pass

    def access(self, u, status):
        self.accessed.append((status.index, status.t, status.done, float(u[0])))


def two_level_steps(nsteps, m, nrelax, iterations, store, with_access):
    """Steps per level of a two-level V-cycle run that converged after
    `iterations` cycles (tests/test_braid_work.py derives the count phase by
    phase): every iteration, the last included (its residual test comes
    after its relaxation), relaxes with nrelax CF sweeps and a fused F+C
    sweep (N fine steps each); every cycle takes one coarse step per C-point
    for the FAS right-hand side and solves the coarse grid sequentially.
    The interpolation is the next iteration's first F-sweep.  With
    store='C', access sees the F-points through one more F-sweep."""
    n_c = nsteps // m
    f_points = nsteps - n_c
    fine = (iterations + 1) * (nrelax + 1) * nsteps
    if store == "C" and with_access:
        fine += f_points
    coarse = 2 * iterations * n_c
    return [fine, coarse]


@pytest.mark.mpi
@pytest.mark.parametrize("nsteps,m,relax,store,with_access", [
    (101, 4, "F", "all", False),
    (101, 4, "FCF", "C", True),
    (64, 2, "FCFCF", "C", False),
    (100, 5, "F", "C", True),
])
def test_step_counts_match_the_cycle(nsteps, m, relax, store, with_access):
    comm = MPI.COMM_WORLD
    app = CountingApp() if with_access else Dahlquist(-1.0)
    with Solver(app, comm, 0.0, 1.0, nsteps, max_levels=2, cfactor=m, relax=relax,
                store=store) as solver:
        solver.solve()
        local = solver.stats()
        total = solver.stats(reduce=True)
        iterations = solver.iterations
    nrelax = (len(relax) - 1) // 2
    assert total["steps"] == two_level_steps(nsteps, m, nrelax, iterations, store, with_access)
    assert total["iterations"] == local["iterations"] == iterations
    assert total["nlevels"] == local["nlevels"] == 2
    summed = comm.allreduce(np.array(local["steps"]), op=MPI.SUM)
    assert list(summed) == total["steps"]


@pytest.mark.mpi
def test_one_level_counts_messages_and_clock():
    """Sequential stepping across P ranks: N steps, one message per rank
    boundary, and a virtual time of exactly N unit steps."""
    comm = MPI.COMM_WORLD
    nsteps = 50
    with Solver(Dahlquist(-1.0), comm, 0.0, 1.0, nsteps, max_levels=1) as solver:
        solver.solve()
        st = solver.stats(reduce=True)
    assert st["steps"] == [nsteps]
    assert st["messages"] == comm.size - 1
    assert st["virtual_time"] == nsteps


@pytest.mark.mpi
@pytest.mark.parametrize("latency", [0.5, 3.0])
def test_latency_adds_to_the_clock_only_between_ranks(latency):
    comm = MPI.COMM_WORLD
    nsteps, p = 50, comm.size
    with Solver(Dahlquist(-1.0), comm, 0.0, 1.0, nsteps, max_levels=1,
                latency=latency) as solver:
        solver.solve()
        vtime = solver.stats(reduce=True)["virtual_time"]
    # the chain of P-1 messages lies on the critical path; the global
    # agreements at the end of a solve add a reduction tree's latency each
    assert vtime >= nsteps + (p - 1) * latency
    assert vtime <= nsteps + (p - 1) * latency + 4 * latency * math.ceil(math.log2(p))
    if p == 1:
        assert vtime == nsteps


@pytest.fixture(params=["COMM_SELF", "COMM_WORLD"])
def comm(request):
    return getattr(MPI, request.param)


@pytest.mark.mpi
@pytest.mark.parametrize("max_levels,relax,costs", [
    (2, "FCF", [1.0]), (3, "F", [1.0, 0.5, 0.25]), (4, "FCF", [2.0, 0.0])])
def test_virtual_time_is_bounded_by_the_work(comm, max_levels, relax, costs):
    """The clock is the cost of a critical path through the steps that ran:
    at least one rank's own step cost, at most the cost of all steps, and
    on one rank exactly the cost of all steps."""
    app = CountingApp()
    with Solver(app, comm, 0.0, 1.0, 96, max_levels=max_levels, cfactor=2, relax=relax,
                step_cost=costs) as solver:
        solver.solve()
        local = solver.stats()
        total = solver.stats(reduce=True)
    cost = [costs[min(l, len(costs) - 1)] for l in range(len(total["steps"]))]
    all_work = float(np.dot(total["steps"], cost))
    own_work = comm.allreduce(float(np.dot(local["steps"], cost)), op=MPI.MAX)
    assert own_work <= total["virtual_time"] + 1e-9
    assert total["virtual_time"] <= all_work + 1e-9
    if comm.size == 1:
        assert total["virtual_time"] == pytest.approx(all_work, rel=1e-15)
        assert total["messages"] == 0 and total["bytes"] == 0
    else:
        assert total["messages"] > 0
        # each message is one packed vector plus a small fixed header
        header = (total["bytes"] - total["messages"] * app.bufsize()) / total["messages"]
        assert header == int(header) and 0 <= header <= 64


@pytest.mark.mpi
def test_calls_and_times_are_accounted(comm):
    app = CountingApp()
    with Solver(app, comm, 0.0, 1.0, 64, max_levels=3, cfactor=2) as solver:
        solver.solve()
        st = solver.stats()
        steps = sum(st["steps"])
        app_calls = sum(app.counts.values())  # before close() frees the states
    # every callback the core made is one call of the app (bufsize
    # included); the binding adds a FAS right-hand side with one more sum
    assert st["calls"] == app_calls - app.rhs_steps
    assert steps == app.counts["step"]
    assert 0.0 <= st["app_time"] <= st["callback_time"] <= st["total_time"]
    if comm.size == 1:
        assert app.counts["pack"] == app.counts["unpack"] == 0


# --- warm start -----------------------------------------------------------

def perturb(app, factor):
    """Change the problem a little (the weights of a training step)."""
    if isinstance(app, Dahlquist):
        app.lam *= factor
    else:
        app.a = app.a * factor


@pytest.mark.mpi
@pytest.mark.parametrize("store", ["all", "C"])
@pytest.mark.parametrize("app_name", ["dahlquist", "rotation"])
def test_warm_start_after_a_small_change_needs_fewer_iterations(app_name, store):
    comm = MPI.COMM_WORLD
    make = {"dahlquist": lambda: Dahlquist(-1.0), "rotation": DampedRotation}[app_name]
    nsteps, t_stop = 96, 4.0
    opts = dict(max_levels=3, cfactor=2, relax="F", store=store, abs_tol=1e-11)

    app = make()
    inits = []
    app_init = app.init
    app.init = lambda t, index: (inits.append(index), app_init(t, index))[1]
    with Solver(app, comm, 0.0, t_stop, nsteps, **opts) as warm:
        warm.solve()
        perturb(app, 1.02)
        inits.clear()
        warm.solve()
        warm_iters = warm.iterations
        # init is called again for the initial condition only
        assert inits == ([0] if warm.local_range(0)[0] == 0 else [])
        lo, hi = warm.local_range(0)
        ref = app.sequential(0.0, t_stop, nsteps)
        err = max((float(np.max(np.abs(warm.get(i) - ref[i])) / np.max(np.abs(ref[i])))
                   for i in range(lo, hi + 1) if warm.is_stored(i)), default=0.0)

    changed = make()
    perturb(changed, 1.02)
    with Solver(changed, comm, 0.0, t_stop, nsteps, **opts) as cold:
        cold.solve()
        cold_iters = cold.iterations
    assert comm.allreduce(err, op=MPI.MAX) <= 1e-8
    assert 0 < warm_iters < cold_iters


@pytest.mark.mpi
@pytest.mark.parametrize("store", ["all", "C"])
def test_warm_solves_in_chunks_continue_the_cold_history(store):
    """With F-relaxation a warm solve starts exactly where the last one
    stopped: solves of two iterations each, stitched together, give the
    residual history of one cold solve.  (N is not a C-point here: a last
    point that is one takes the step from the point before it when a solve
    stops, which a cold solve does not do; tests/test_braid_work.py.)"""
    comm = MPI.COMM_WORLD
    opts = dict(max_levels=3, cfactor=2, relax="F", store=store, abs_tol=1e-11)
    with Solver(DampedRotation(), comm, 0.0, 4.0, 97, **opts) as cold:
        history = cold.solve()
        cold_iters = cold.iterations
    stitched, total = [], 0
    with Solver(DampedRotation(), comm, 0.0, 4.0, 97, max_iter=2, **opts) as warm:
        while True:
            norms = warm.solve()
            if stitched:
                # the first norm of a warm solve repeats the last one
                assert norms[0] == pytest.approx(stitched[-1], rel=1e-10)
                norms = norms[1:]
            stitched += norms
            total += warm.iterations
            if warm.iterations < 2:
                break
    assert total == cold_iters
    np.testing.assert_allclose(stitched, history, rtol=1e-10, atol=0)


@pytest.mark.mpi
def test_converged_warm_start_needs_no_iteration_and_cold_start_repeats():
    comm = MPI.COMM_WORLD
    opts = dict(max_levels=3, cfactor=4, abs_tol=1e-12)
    with Solver(Dahlquist(-1.0), comm, 0.0, 1.0, 128, **opts) as warm, \
            Solver(Dahlquist(-1.0), comm, 0.0, 1.0, 128, warm_start=False, **opts) as cold:
        first = warm.solve()
        cold.solve()
        assert warm.iterations == cold.iterations > 0
        again = warm.solve()
        assert warm.iterations == 0 and len(again) == 1 and again[0] <= 1e-12
        cold_again = cold.solve()
        assert cold.iterations == len(first) - 1
        np.testing.assert_allclose(cold_again, first, rtol=1e-14, atol=0)


@pytest.mark.mpi
def test_warm_start_sees_a_new_initial_condition():
    """init(t, 0) is called on every solve, so a changed initial condition
    is used; the other points start from the previous solution."""
    comm = MPI.COMM_WORLD
    app = Dahlquist(-1.0)
    with Solver(app, comm, 0.0, 1.0, 64, max_levels=3, cfactor=2, abs_tol=1e-12) as solver:
        solver.solve()
        app.u0 = 2.0
        solver.solve()
        assert solver.iterations > 0
        lo, hi = solver.local_range(0)
        ref = app.sequential(0.0, 1.0, 64)
        err = max(abs(float(solver.get(i)[0]) - ref[i]) / ref[i] for i in range(lo, hi + 1))
    assert comm.allreduce(err, op=MPI.MAX) <= 1e-11


# --- access ---------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("store", ["all", "C"])
@pytest.mark.parametrize("max_levels,cfactor,nsteps", [(1, 2, 37), (2, 4, 101), (3, 3, 100)])
def test_access_sees_every_owned_point_once_when_done(max_levels, cfactor, nsteps, store):
    comm = MPI.COMM_WORLD
    app = CountingApp()
    with Solver(app, comm, 0.0, 2.0, nsteps, max_levels=max_levels, cfactor=cfactor,
                store=store, abs_tol=1e-13) as solver:
        solver.solve()
        lo, hi = solver.local_range(0)
    ref = app.sequential(0.0, 2.0, nsteps)
    indices = [a[0] for a in app.accessed]
    problems = []
    if sorted(indices) != list(range(lo, hi + 1)):
        problems.append(f"rank {comm.rank}: accessed {sorted(indices)[:8]}..., owns [{lo}, {hi}]")
    if not all(a[2] for a in app.accessed):
        problems.append(f"rank {comm.rank}: access with done=False")
    for i, t, _, value in app.accessed:
        if abs(t - 2.0 * i / nsteps) > 1e-14 or abs(value - ref[i]) > 1e-12 * abs(ref[i]):
            problems.append(f"rank {comm.rank}: point {i} at t={t}: {value} vs {ref[i]}")
            break
    assert comm.allreduce(problems, op=MPI.SUM) == []


@pytest.mark.mpi
@pytest.mark.parametrize("store", ["all", "C"])
@pytest.mark.parametrize("max_levels", [1, 3])
def test_final_sweep_takes_every_owned_fine_step_once(max_levels, store):
    """final_sweep: after the last iteration every fine step is taken once
    more with status.final set (a one-level solve is such a sweep), at the
    converged states, and the solution is unchanged."""
    comm = MPI.COMM_WORLD
    nsteps = 61
    finals = []

    class Recorder(Dahlquist):
        def step(self, u, status):
            if status.final:
                finals.append((status.index, status.level, float(u[0])))
            return super().step(u, status)

    app = Recorder(-1.0)
    with Solver(app, comm, 0.0, 1.0, nsteps, max_levels=max_levels, cfactor=3, store=store,
                abs_tol=1e-13, final_sweep=True) as solver:
        solver.solve()
        lo, hi = solver.local_range(0)
        ref = app.sequential(0.0, 1.0, nsteps)
        # (store C on one level: a middle rank keeps no point)
        err = max((abs(float(solver.get(i)[0]) - ref[i]) / ref[i]
                   for i in range(lo, hi + 1) if solver.is_stored(i)), default=0.0)
    owned_steps = list(range(max(lo, 1) - 1, hi))  # step i -> i+1 for i+1 owned
    problems = []
    if sorted(f[0] for f in finals) != owned_steps:
        problems.append(f"rank {comm.rank}: final steps {sorted(f[0] for f in finals)[:6]}..., "
                        f"expected {owned_steps[:6]}...")
    if any(level != 0 or abs(u - ref[i]) > 1e-12 * ref[i] for i, level, u in finals):
        problems.append(f"rank {comm.rank}: a final step on a coarse level or at a wrong state")
    assert comm.allreduce(problems, op=MPI.SUM) == []
    assert comm.allreduce(err, op=MPI.MAX) <= 1e-12
