"""Bad options, communicators and apps are refused at construction, on every
rank alike, with a message that names what is wrong, before any callback of
the app has run."""
import pytest
from mpi4py import MPI

from braid_ext import MGRITError, Solver
from braid_ext.examples.dahlquist import Dahlquist


class RecordingApp(Dahlquist):
    """Dahlquist that records every call of its methods."""

    def __init__(self):
        super().__init__(lam=-1.0)
        self.calls = []

    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if name in ("step", "init", "clone", "sum", "norm", "bufsize", "pack", "unpack", "free"):
            calls = super().__getattribute__("calls")

            def recorded(*args):
                calls.append(name)
                return attr(*args)
            return recorded
        return attr


# (keyword options, the name the message must contain)
BAD_OPTIONS = [
    (dict(cfactor=1), "cfactor"),
    (dict(cfactor=0), "cfactor"),
    (dict(cfactor=2.0), "cfactor"),
    (dict(cfactor=[4, 1]), "cfactor"),
    (dict(cfactor=[]), "cfactor"),
    (dict(max_levels=0), "max_levels"),
    (dict(max_levels=-1), "max_levels"),
    (dict(max_levels=33), "max_levels"),
    (dict(min_coarse=0), "min_coarse"),
    (dict(abs_tol=-1e-10), "abs_tol"),
    (dict(abs_tol=float("nan")), "abs_tol"),
    (dict(rel_tol=-0.1), "rel_tol"),
    (dict(rel_tol=float("inf")), "rel_tol"),
    (dict(max_iter=0), "max_iter"),
    (dict(relax="FC"), "relax"),
    (dict(relax="CF"), "relax"),
    (dict(relax="fcf"), "relax"),
    (dict(relax=["FCF", "X"]), "relax"),
    (dict(relax=2), "relax"),
    (dict(cycle="W"), "cycle"),
    (dict(cycle="v"), "cycle"),
    (dict(tnorm="l1"), "tnorm"),
    (dict(tnorm=2), "tnorm"),
    (dict(store="F"), "store"),
    (dict(store="none"), "store"),
    (dict(step_cost=-1.0), "step_cost"),
    (dict(step_cost=[1.0, float("nan")]), "step_cost"),
    (dict(latency=-0.5), "latency"),
    (dict(skip="yes"), "skip"),
    (dict(reverse=2), "reverse"),
    (dict(warm_start=None), "warm_start"),
]


@pytest.mark.mpi
@pytest.mark.parametrize("options,name", BAD_OPTIONS,
                         ids=[f"{k}={v!r}" for o, _ in BAD_OPTIONS for k, v in o.items()])
def test_bad_option_raises_value_error_naming_it(options, name):
    app = RecordingApp()
    with pytest.raises(ValueError, match=name):
        Solver(app, MPI.COMM_WORLD, 0.0, 1.0, 64, **options)
    assert app.calls == []


@pytest.mark.mpi
@pytest.mark.parametrize("t_start,t_stop", [(0.0, 0.0), (0.0, float("nan")), (float("inf"), 1.0)])
def test_bad_interval_raises_value_error(t_start, t_stop):
    app = RecordingApp()
    with pytest.raises(ValueError, match="t_start"):
        Solver(app, MPI.COMM_WORLD, t_start, t_stop, 64)
    assert app.calls == []


@pytest.mark.mpi
def test_more_ranks_than_steps_raises_value_error():
    """Every rank must own a step: nsteps < size is refused (on one rank,
    nsteps = 0), and so is a non-integer nsteps."""
    comm = MPI.COMM_WORLD
    app = RecordingApp()
    for nsteps in (comm.size - 1, 0, -3):
        with pytest.raises(ValueError, match="nsteps"):
            Solver(app, comm, 0.0, 1.0, nsteps)
    with pytest.raises(ValueError, match="nsteps"):
        Solver(app, comm, 0.0, 1.0, 64.0)
    assert app.calls == []
    # the smallest allowed: one step per rank
    with Solver(app, comm, 0.0, 1.0, comm.size, abs_tol=1e-14) as solver:
        solver.solve()
        lo, hi = solver.local_range(0)
        assert hi - lo + 1 == (2 if comm.rank == 0 else 1)
        ref = app.sequential(0.0, 1.0, comm.size)
        assert abs(solver.get(hi)[0] - ref[hi]) <= 1e-14 * abs(ref[hi])


@pytest.mark.mpi
@pytest.mark.parametrize("comm", [None, 0, "COMM_WORLD", MPI.COMM_NULL, MPI.COMM_WORLD.py2f()],
                         ids=["None", "int", "str", "COMM_NULL", "fortran-handle"])
def test_bad_communicator_raises_type_error(comm):
    app = RecordingApp()
    with pytest.raises(TypeError, match="comm"):
        Solver(app, comm, 0.0, 1.0, 64)
    assert app.calls == []


@pytest.mark.mpi
@pytest.mark.parametrize("missing", ["step", "init", "clone", "sum", "norm", "bufsize", "pack",
                                     "unpack"])
def test_app_without_a_method_raises_type_error_naming_it(missing):
    app = Dahlquist(lam=-1.0)

    class Partial:
        pass

    partial = Partial()
    for name in ("step", "init", "clone", "sum", "norm", "bufsize", "pack", "unpack"):
        if name != missing:
            setattr(partial, name, getattr(app, name))
    with pytest.raises(TypeError, match=missing):
        Solver(partial, MPI.COMM_WORLD, 0.0, 1.0, 64)
    partial_with_attr = Partial()
    for name in ("step", "init", "clone", "sum", "norm", "bufsize", "pack", "unpack"):
        setattr(partial_with_attr, name, getattr(app, name))
    setattr(partial_with_attr, missing, 42)  # present but not callable
    with pytest.raises(TypeError, match=missing):
        Solver(partial_with_attr, MPI.COMM_WORLD, 0.0, 1.0, 64)


@pytest.mark.mpi
def test_good_options_pass_and_are_kept():
    comm = MPI.COMM_WORLD
    app = RecordingApp()
    opts = dict(max_levels=3, cfactor=[4, 2], min_coarse=3, relax=["FCFCF", "F"], cycle="F",
                skip=True, abs_tol=0.0, rel_tol=1e-8, max_iter=7, tnorm="inf", store="C",
                reverse=True, warm_start=False, step_cost=[1.0, 0.25], latency=0.5)
    with Solver(app, comm, -1.0, 2.0, 128, **opts) as solver:
        assert app.calls == []  # construction calls nothing
        assert {k: solver.options[k] for k in opts} == opts
        assert (solver.t_start, solver.t_stop, solver.nsteps) == (-1.0, 2.0, 128)
        assert solver.comm is comm
        solver.solve()
        assert solver.nlevels == 3
        assert [solver.level_size(l) for l in range(3)] == [(128, 1), (32, 4), (16, 8)]


@pytest.mark.mpi
def test_closed_solver_refuses_calls():
    comm = MPI.COMM_WORLD
    solver = Solver(Dahlquist(-1.0), comm, 0.0, 1.0, 16)
    solver.solve()
    solver.close()
    solver.close()  # a second close is harmless
    for call in (solver.solve, lambda: solver.iterations, lambda: solver.residual_norms,
                 lambda: solver.local_range(0), lambda: solver.get(0), solver.stats):
        with pytest.raises(MGRITError, match="closed"):
            call()


@pytest.mark.mpi
def test_queries_out_of_range_raise_value_error():
    comm = MPI.COMM_WORLD
    with Solver(Dahlquist(-1.0), comm, 0.0, 1.0, 32, max_levels=2, cfactor=2,
                store="C") as solver:
        solver.solve()
        lo, hi = solver.local_range(0)
        with pytest.raises(ValueError):
            solver.local_range(2)  # only levels 0 and 1
        with pytest.raises(ValueError):
            solver.level_size(-1)
        with pytest.raises(ValueError, match="index"):
            solver.get(hi + 1 if hi < 32 else lo - 1)  # owned by a neighbour, or by none
        f_points = [i for i in range(lo, hi + 1) if i % 2 == 1 and i != 32]
        if f_points:
            assert not solver.is_stored(f_points[0])
            with pytest.raises(ValueError, match="index"):
                solver.get(f_points[0])


@pytest.mark.mpi
def test_access_on_some_ranks_only_fails_everywhere():
    class WithAccess(Dahlquist):
        def access(self, u, status):
            pass

    comm = MPI.COMM_WORLD
    if comm.size < 2:
        pytest.skip("needs two ranks")
    app = WithAccess() if comm.rank == 0 else Dahlquist()
    with pytest.raises(ValueError, match="access method must exist on every rank"):
        Solver(app, comm, 0.0, 1.0, 8)
