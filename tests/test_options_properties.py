"""Property-based tests (hypothesis) over Solver and LayerParallel options:
every invalid combination is refused before any communication, with a
message naming the field; every valid one solves, to the sequential result
when it runs to convergence.

"Before any communication" is tested on two or more ranks by letting one
rank alone make the object with an invalid option on a communicator no other
rank uses: had it sent or waited for anything, it would hang there.  The
examples are derandomized, so every rank draws the same ones.
"""
import math

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from braid_ext import (Layout, OptionError, Solver, check_options, hierarchy,  # noqa: E402
                       relax_sweeps)
from braid_ext.examples.dahlquist import Dahlquist  # noqa: E402
from layerpar import LayerParallel  # noqa: E402

SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=40,
                    suppress_health_check=list(HealthCheck))

# ---- option values ---------------------------------------------------------

relax_names = st.integers(0, 2).map(lambda k: "F" + "CF" * k)
valid_solver = {
    "max_levels": st.integers(1, 4),
    "cfactor": st.one_of(st.integers(2, 5), st.lists(st.integers(2, 5), min_size=1, max_size=3)),
    "min_coarse": st.integers(1, 4),
    "relax": st.one_of(relax_names, st.lists(relax_names, min_size=1, max_size=3)),
    "cycle": st.sampled_from(["V", "F"]),
    "skip": st.booleans(),
    "max_iter": st.integers(1, 4),
    "tnorm": st.sampled_from(["l2", "inf"]),
    "store": st.sampled_from(["all", "C"]),
    "reverse": st.booleans(),
    "warm_start": st.booleans(),
    "final_sweep": st.booleans(),
    "latency": st.floats(0, 1),
    "timeout": st.one_of(st.none(), st.floats(5, 60)),
}
bad_number = st.sampled_from([-1, -0.5, float("nan"), float("inf"), "1", None, True, [1]])
invalid_solver = {
    "max_levels": st.sampled_from([0, -1, 33, 2.0, "2", None, True]),
    "cfactor": st.sampled_from([0, 1, -2, 2.5, "4", None, True, [], [2, 1], [4, "2"]]),
    "min_coarse": st.sampled_from([0, -3, 1.5, "2", None]),
    "relax": st.sampled_from(["", "C", "FC", "FCFC", "fcf", "FF", 1, None, [], ["F", "CF"]]),
    "cycle": st.sampled_from(["W", "v", "", 1, None]),
    "skip": st.sampled_from([2, -1, "yes", None, 0.5]),
    "abs_tol": bad_number,
    "rel_tol": bad_number,
    "latency": bad_number,
    "max_iter": st.sampled_from([0, -1, 1.5, "3", None, True]),
    "tnorm": st.sampled_from(["L2", "max", 2, None]),
    "store": st.sampled_from(["F", "none", None, 1]),
    "reverse": st.sampled_from([2, "no", None]),
    "warm_start": st.sampled_from([2, "no", None]),
    "final_sweep": st.sampled_from([2, "yes", 0.0]),
    "step_cost": st.sampled_from([-1.0, float("nan"), "1", [], [1.0, -2.0]]),
    "timeout": st.sampled_from([-1, float("inf"), float("nan"), "10", True]),
}


@st.composite
def one_invalid(draw, valid, invalid):
    """A valid option set with exactly one field made invalid: (options, field)."""
    opts = {k: draw(v) for k, v in valid.items() if draw(st.booleans())}
    field = draw(st.sampled_from(sorted(invalid)))
    opts[field] = draw(invalid[field])
    return opts, field


# A communicator that only the last rank ever uses: an object made there
# alone hangs if it sends, waits or makes a collective call.
PRIVATE = MPI.COMM_WORLD.Dup()


def alone():
    return MPI.COMM_WORLD.rank == MPI.COMM_WORLD.size - 1


# ---- Solver ----------------------------------------------------------------

def solver_refusal(opts, comm):
    try:
        Solver(Dahlquist(), comm, 0.0, 1.0, 16, **opts)
    except (ValueError, TypeError) as e:
        return str(e)
    return None


@pytest.mark.mpi
@SETTINGS
@given(case=one_invalid(valid_solver, invalid_solver))
def test_an_invalid_solver_option_is_refused_before_any_message(case):
    opts, field = case
    if alone():
        message = solver_refusal(opts, PRIVATE)
        assert message is not None, f"accepted {field}={opts[field]!r}"
        assert field in message, message
        with pytest.raises((ValueError, TypeError), match=field):
            check_options(16, PRIVATE.size, **opts)
    MPI.COMM_WORLD.Barrier()


@pytest.mark.mpi
@SETTINGS
@given(opts=st.fixed_dictionaries({}, optional=valid_solver))
def test_every_valid_solver_option_set_solves(opts):
    comm = MPI.COMM_WORLD
    nsteps = 24
    check_options(nsteps, comm.size, **opts)
    app = Dahlquist(lam=-1.0)
    converge = dict(opts, max_iter=60, abs_tol=1e-13)
    ref = app.sequential(0.0, 1.0, nsteps)
    if opts.get("reverse"):
        ref = Dahlquist(lam=-1.0).sequential(1.0, 0.0, nsteps)
    for run in (opts, converge):
        t0, t1 = (1.0, 0.0) if run.get("reverse") else (0.0, 1.0)
        with Solver(Dahlquist(lam=-1.0), comm, t0, t1, nsteps, **run) as s:
            norms = s.solve()
            assert all(math.isfinite(r) for r in norms)
            if run is converge:
                lo, hi = s.local_range()
                err = max((abs(float(s.get(i)[0]) - ref[i])
                           for i in range(lo, hi + 1) if s.is_stored(i)), default=0.0)
                err = comm.allreduce(err, op=MPI.MAX)
                # converged MGRIT (or one level: sequential) is the sequential result
                assert err <= 1e-12, f"error {err} with {run}"


# ---- the grid hierarchy and the relaxation grammar ---------------------------

def reference_hierarchy(N, max_levels, cfactor, min_coarse):
    """[(n, stride, factor to the next level or 0)], written out from the
    definition: coarsen level l by its factor (a list's last entry holds
    below) while fewer than max_levels levels exist and the coarse grid
    keeps at least min_coarse steps."""
    factors = cfactor if isinstance(cfactor, list) else [cfactor]
    levels = [[N, 1, 0]]
    while len(levels) < max_levels:
        n, stride, _ = levels[-1]
        m = factors[min(len(levels) - 1, len(factors) - 1)]
        if n // m < min_coarse:
            break
        levels[-1][2] = m
        levels.append([n // m, stride * m, 0])
    return [tuple(lev) for lev in levels]


hierarchy_options = {
    "max_levels": st.integers(1, 8),
    "cfactor": st.one_of(st.integers(2, 9), st.lists(st.integers(2, 9), min_size=1, max_size=4)),
    "min_coarse": st.integers(1, 6),
}


@settings(SETTINGS, max_examples=400)
@given(N=st.one_of(st.integers(1, 3000), st.integers(1, 2**62)),
       opts=st.fixed_dictionaries(hierarchy_options))
def test_hierarchy_is_the_definition(N, opts):
    assert hierarchy(N, **opts) == tuple(reference_hierarchy(N, **opts))


@pytest.mark.mpi
@settings(SETTINGS, max_examples=60)
@given(extra=st.integers(0, 300), opts=st.fixed_dictionaries(hierarchy_options),
       reverse=st.booleans())
def test_hierarchy_is_what_a_solver_builds(extra, opts, reverse):
    """For every (N, P, max_levels, cfactor, min_coarse): the levels, sizes
    and strides a Solver builds on the P ranks of COMM_WORLD, and on each
    level the points this rank owns: those whose fine point lies in its
    block of the Layout (mirrored in a reversed solve)."""
    comm = MPI.COMM_WORLD
    N, P = comm.size + extra, comm.size
    levels = hierarchy(N, **opts)
    lo, hi = Layout(N, P).block(comm.rank)
    if reverse:  # time-ordered rank P-1-rank: the mirror of forward rank `rank`
        lo, hi = (0 if comm.rank == P - 1 else N + 1 - hi), N + 1 - max(lo, 1)
    with Solver(Dahlquist(), comm, 0.0, 1.0, N, reverse=reverse, **opts) as s:
        built = [s.level_size(l) for l in range(s.nlevels)]
        ranges = [s.local_range(l) for l in range(s.nlevels)]
    assert [(lev.n, lev.stride) for lev in levels] == built
    for lev, (a, b) in zip(levels, ranges):
        assert (a, b) == (-(-lo // lev.stride), hi // lev.stride)


@given(text=st.text(alphabet="FC", max_size=9) | st.sampled_from(["fcf", "FCF ", "", "X"]))
@SETTINGS
def test_relax_grammar_is_the_solvers(text):
    """A relaxation is accepted by relax_sweeps exactly when a Solver accepts
    it, and exactly when it is F followed by CF pairs; its sweep count is
    the number of pairs."""
    grammar = text[:1] == "F" and text[1:] == "CF" * ((len(text) - 1) // 2) and \
        len(text) % 2 == 1
    try:
        sweeps = relax_sweeps(text)
    except OptionError as e:
        assert not grammar and e.option == "relax" and e.value == text
    else:
        assert grammar and sweeps == text.count("C")
    assert (solver_refusal({"relax": text}, MPI.COMM_SELF) is None) == grammar


# ---- LayerParallel --------------------------------------------------------

valid_module = {
    "max_levels": st.integers(1, 3),
    "cfactor": st.integers(2, 4),
    "relax": relax_names,
    "cycle": st.sampled_from(["V", "F"]),
    "skip": st.booleans(),
    "fwd_iters": st.integers(1, 3),
    "bwd_iters": st.integers(1, 3),
    "bwd_max_levels": st.integers(1, 3),
    "bwd_relax": relax_names,
    "warm_start": st.booleans(),
    "timeout": st.one_of(st.none(), st.floats(5, 60)),
}
invalid_module = {
    "max_levels": invalid_solver["max_levels"],
    "cfactor": invalid_solver["cfactor"],
    "relax": invalid_solver["relax"],
    "cycle": invalid_solver["cycle"],
    "skip": invalid_solver["skip"],
    "fwd_iters": invalid_solver["max_iter"],
    "bwd_iters": invalid_solver["max_iter"],
    "fwd_tol": bad_number,
    "bwd_tol": bad_number,
    "bwd_max_levels": st.sampled_from([0, 33, "2", 2.0]),
    "bwd_cfactor": st.sampled_from([0, 1, "2", 2.5]),
    "bwd_relax": st.sampled_from(["C", "FC", 1]),
    "bwd_cycle": st.sampled_from(["W", 1]),
    "warm_start": st.sampled_from([2, "no", None]),
    "retain_graphs": st.sampled_from([2, "no", None]),
    "seed": st.sampled_from([1.5, "0", None, True]),
    "timeout": st.sampled_from([-1, float("inf"), "10", True]),
    "T": st.sampled_from([0, -1.0, float("nan"), float("inf"), "1"]),
    "nlayers": st.sampled_from([0, -4, 2.0, "8", True]),
}


def make_body(comm, opts):
    opts = dict(opts)
    nlayers = opts.pop("nlayers", 8)
    T = opts.pop("T", 1.0)
    return LayerParallel(lambda n: nn.Linear(2, 2).double(), nlayers, T, comm, **opts)


@pytest.mark.mpi
@SETTINGS
@given(case=one_invalid(valid_module, invalid_module))
def test_an_invalid_module_option_is_refused_before_any_message(case):
    opts, field = case
    if alone():
        with pytest.raises((ValueError, TypeError)) as info:
            make_body(PRIVATE, opts)
        assert field in str(info.value), f"{field}={opts[field]!r}: {info.value}"
    MPI.COMM_WORLD.Barrier()


@pytest.mark.mpi
@settings(SETTINGS, max_examples=15)
@given(opts=st.fixed_dictionaries({}, optional=valid_module))
def test_every_valid_module_option_set_runs_forward_and_backward(opts):
    comm = MPI.COMM_WORLD
    torch.manual_seed(0)
    u0 = torch.randn(3, 2, dtype=torch.float64)
    with make_body(comm, opts) as body:
        out = body(u0 if comm.rank == 0 else None)
        (out.sum() if comm.rank == comm.size - 1 else out.sum() * 0.0).backward()
        grads = [p.grad for p in body.parameters()]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        exact = body.fwd_options["max_levels"] == 1
        serial = body.serial_equivalent()
    if exact and comm.rank == comm.size - 1:
        ref = u0
        for F in serial:
            ref = F(ref)
        np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), rtol=0,
                                   atol=1e-13)
