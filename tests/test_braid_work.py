"""The work of an MGRIT solve, phase by phase, against the textbook count, and
its results against a textbook two-level MGRIT written out in plain Python.

Textbook two-level FAS MGRIT, N fine steps, coarsening m, n_c = N // m coarse
steps, nu CF sweeps of relaxation (F: nu = 0, FCF: nu = 1), K = max_iter
cycles, tolerances off.  Cycle k (k = 0..K-1) is

    relaxation F(CF)^nu, then the residual r_i = Phi(u_{i-1}) - u_i at the
    C-points after the last F-sweep; restriction by injection, v_j = u_jm,
    and the FAS right-hand side g_j = Phi(u_{jm-1}) - Phi_c(v_{j-1}) (one
    coarse step per coarse point); the coarse problem solved sequentially
    (one coarse step per coarse point); correction of the C-points;
    interpolation (an F-sweep).

Every relaxation begins with an F-sweep from the C-points, which is the
interpolation of the cycle before, so the interpolation is never a sweep of
its own; after cycle K the interpolation is the final F-sweep, fused with
the residual r_K that the history reports last.  Counted in steps (a sweep
with C-values takes N steps: N - n_c F-steps and n_c C-point steps):

    cycle k < K     level 0: (nu + 1) N     level 1: n_c (right-hand side)
                                                     + n_c (coarse solve)
    after cycle K   level 0: N (the final sweep: status.final)
    skipped first down-cycle (skip, cycle 0): no fine step; the coarse grid
                    is stepped from the injected initial guess: n_c steps
                    without right-hand side, then the cycle goes on as k > 0.

With F-relaxation, skip and 2 cycles on 64 layers this is 2 N fine steps
(forward), and N for 1 cycle (adjoint): one sweep per cycle after the first.
"""
import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from mpi4py import MPI

from braid_ext import Solver
from braid_ext.examples.rotation import DampedRotation

WORLD = MPI.COMM_WORLD


class PhaseCounter(DampedRotation):
    """Counts steps by (iteration, level, final, with a right-hand side)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.phases = Counter()

    def step(self, u, status):
        self.phases[(status.iter, status.level, bool(status.final), status.rhs is not None)] += 1
        return super().step(u, status)


def textbook_phases(nsteps, m, nu, max_iter, skip):
    """The count derived in the module docstring, keyed like PhaseCounter."""
    n_c = nsteps // m
    out = Counter()
    for k in range(max_iter):
        if k == 0 and skip:
            out[(0, 1, False, False)] += n_c
            continue
        out[(k, 0, False, False)] += (nu + 1) * nsteps
        out[(k, 1, False, False)] += n_c   # Phi_c(v_{j-1}) for the right-hand side
        out[(k, 1, False, True)] += n_c    # the coarse solve, with g
    out[(max_iter, 0, True, False)] += nsteps
    return out


CASES = [(16, 4, relax, skip) for relax in ("F", "FCF") for skip in (False, True)] + \
        [(18, 3, "FCFCF", False), (20, 4, "F", True)]


@pytest.mark.mpi
@pytest.mark.parametrize("max_iter", [1, 2, 3])
@pytest.mark.parametrize("nsteps,m,relax,skip", CASES)
def test_steps_per_phase_are_the_textbook_count(nsteps, m, relax, skip, max_iter):
    app = PhaseCounter()
    with Solver(app, WORLD, 0.0, 2.0, nsteps, max_levels=2, cfactor=m, relax=relax, skip=skip,
                abs_tol=0.0, max_iter=max_iter, final_sweep=True) as solver:
        solver.solve()
        total = solver.stats(reduce=True)["steps"]
    counted = Counter()
    for part in WORLD.allgather(app.phases):
        counted.update(part)
    nu = (len(relax) - 1) // 2
    expected = textbook_phases(nsteps, m, nu, max_iter, skip)
    assert dict(counted) == dict(expected)
    fine = sum(v for (_, lev, _, _), v in expected.items() if lev == 0)
    assert total == [fine, sum(expected.values()) - fine]


@pytest.mark.mpi
def test_reference_network_solves_take_one_sweep_per_cycle():
    """64 layers, cfactor 4, F-relaxation, skipped down-cycle: a forward
    solve of 2 cycles takes 2 N fine steps, an adjoint solve of 1 cycle N."""
    for max_iter, fine in [(2, 128), (1, 64)]:
        with Solver(DampedRotation(), WORLD, 0.0, 2.0, 64, max_levels=2, cfactor=4, relax="F",
                    skip=True, abs_tol=0.0, max_iter=max_iter, final_sweep=True) as solver:
            solver.solve()
            assert solver.stats(reduce=True)["steps"] == [fine, 16 * (2 * max_iter - 1)]


def textbook_two_level(app, t_stop, nsteps, m, nu, max_iter, skip):
    """Two-level FAS MGRIT as in the module docstring, sequentially, with
    the app's own step: (residual norms, fine states).  The returned last
    point, when it is a C-point, is the step from the point before it."""
    h = t_stop / nsteps

    def t(i):
        return t_stop if i == nsteps else h * i

    def phi(i, u, s=1):  # s fine steps from point i
        status = SimpleNamespace(level=0 if s == 1 else 1, index=i, index_stop=i + s,
                                 t_start=t(i), t_stop=t(i + s), iter=0, final=False, rhs=None)
        return np.array(app.step(app.clone(u), status))

    n_c = nsteps // m
    cpts = range(m, n_c * m + 1, m)
    u = [app.init(t(i), i) for i in range(nsteps + 1)]

    def f_sweep():
        for i in range(1, nsteps + 1):
            if i % m:
                u[i] = phi(i - 1, u[i - 1])

    def coarse_solve(g):
        v = [u[0]] + [None] * n_c
        for j in range(1, n_c + 1):
            v[j] = phi((j - 1) * m, v[j - 1], m)
            if g is not None:
                v[j] = v[j] + g[j]
        for j in range(1, n_c + 1):
            u[j * m] = v[j]

    norms = []
    for k in range(max_iter + 1):
        if k == 0 and skip:
            coarse_solve(None)
            continue
        if k < max_iter:
            for _ in range(nu):
                f_sweep()
                for c in cpts:
                    u[c] = phi(c - 1, u[c - 1])
        f_sweep()
        w = {c: phi(c - 1, u[c - 1]) for c in cpts}
        norms.append(math.sqrt(sum(float(np.linalg.norm(w[c] - u[c])) ** 2 for c in cpts)))
        if k == max_iter:
            if nsteps in w:
                u[nsteps] = w[nsteps]
            return norms, u
        g = [None] + [w[j * m] - phi((j - 1) * m, u[(j - 1) * m], m) for j in range(1, n_c + 1)]
        coarse_solve(g)


@pytest.mark.mpi
@pytest.mark.parametrize("max_iter", [1, 3])
@pytest.mark.parametrize("nsteps,m,relax,skip", CASES + [(19, 4, "FCF", False)])
def test_results_are_the_textbook_algorithm(nsteps, m, relax, skip, max_iter):
    """Residual history and every state equal the textbook algorithm's (to
    round-off: the residual norm is summed over ranks in another order)."""
    app = DampedRotation(omega=3.0)
    nu = (len(relax) - 1) // 2
    ref_norms, ref = textbook_two_level(app, 2.0, nsteps, m, nu, max_iter, skip)
    with Solver(app, WORLD, 0.0, 2.0, nsteps, max_levels=2, cfactor=m, relax=relax, skip=skip,
                abs_tol=0.0, max_iter=max_iter, store="all") as solver:
        norms = solver.solve()
        lo, hi = solver.local_range(0)
        worst = max(float(np.max(np.abs(solver.get(i) - ref[i]))) for i in range(lo, hi + 1))
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-14, atol=0)
    assert WORLD.allreduce(worst, op=MPI.MAX) <= 1e-15


@pytest.mark.mpi
@pytest.mark.parametrize("relax,skip", [("F", True), ("FCF", False)])
def test_last_point_is_one_step_from_the_point_before(relax, skip):
    """An inexact solve (one cycle) returns u_N = Phi(u_{N-1}) at a last
    point that is a C-point, bit for bit: the final sweep's user work and
    the returned output agree."""
    app = DampedRotation(omega=3.0)
    nsteps = 24
    with Solver(app, WORLD, 0.0, 2.0, nsteps, max_levels=2, cfactor=4, relax=relax, skip=skip,
                abs_tol=0.0, max_iter=1, store="all", final_sweep=True) as solver:
        solver.solve()
        lo, hi = solver.local_range(0)
        states = {i: np.array(solver.get(i)) for i in range(lo, hi + 1)}
    states = {i: u for part in WORLD.allgather(states) for i, u in part.items()}
    status = SimpleNamespace(level=0, index=nsteps - 1, index_stop=nsteps,
                             t_start=2.0 * (nsteps - 1) / nsteps, t_stop=2.0, iter=0,
                             final=False, rhs=None)
    expected = app.step(app.clone(states[nsteps - 1]), status)
    assert np.array_equal(states[nsteps], expected)
    # not the exact solution: the check above is not that of a converged solve
    exact = app.sequential(0.0, 2.0, nsteps)
    assert np.max(np.abs(states[nsteps] - exact[nsteps])) > 1e-6
