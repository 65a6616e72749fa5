"""Timeouts of the waits outside the MGRIT solves (layerpar._watchdog): a
rank that stops answering before an agreement, a pipelined pass, the
training loop's agreement on stopping or the grid's gradient sum is named by
the others within the timeout, and the ``layerpar`` command ends the job
with one line naming it.  Without a limit nothing is added.

The jobs where a rank falls silent run as child ``mpiexec`` jobs (one rank
sleeps), so that a hang fails the test instead of the test run.  They write
their reports to files, each written whole and then renamed: the first rank
to end the job (``MPI_Abort``) may stop the others at any point, and the
launcher may drop what they printed.
"""
import math
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from mpi4py import MPI
from torch import nn

import layerpar
from conftest import clean_mpi_env
from layerpar import LayerParallel, SilentRankError, set_timeout
from layerpar._collective import agree, any_rank, collective, from_root, RemoteError
from layerpar._watchdog import guard, timeout_of
from layerpar.config import ConfigError, resolve
from layerpar.grid import ProcessGrid
from layerpar.training.build import apply_timeout

IMPORTED = os.path.dirname(os.path.dirname(os.path.abspath(layerpar.__file__)))
CHILD_LIMIT = 120  # seconds a child job may take before it counts as hung


def run_child(args, timeout=CHILD_LIMIT, env=None):
    env = dict(clean_mpi_env(), **(env or {}))
    # the layerpar this process imports (the source tree, or an installed build)
    env["PYTHONPATH"] = IMPORTED + os.pathsep + env.get("PYTHONPATH", "")
    try:
        # run outside the source tree: `python -m layerpar` puts its working
        # directory first on sys.path, where an unbuilt source tree would shadow it
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the child job hung (no exit within {timeout} s): {e.stdout} {e.stderr}")


def serial_only():
    if MPI.COMM_WORLD.size > 1:
        pytest.skip("starts a child mpiexec itself: run it on one process")


def reports(tmp_path, stem):
    return {int(p.suffix[1:]): p.read_text() for p in tmp_path.glob(f"{stem}.*")
            if p.suffix[1:].isdigit()}


# ---------------------------------------------------------------------------
# the limit

def test_the_limit_is_the_communicators_then_the_environments(monkeypatch):
    monkeypatch.delenv("LAYERPAR_TIMEOUT", raising=False)
    comm = MPI.COMM_SELF.Dup()
    try:
        assert timeout_of(comm) is None
        monkeypatch.setenv("LAYERPAR_TIMEOUT", "3.5")
        assert timeout_of(comm) == 3.5
        set_timeout(comm, 7)
        assert timeout_of(comm) == 7.0
        dup = comm.Dup()  # a duplicate keeps it
        assert timeout_of(dup) == 7.0
        dup.Free()
        set_timeout(comm, 0)  # no limit, whatever the environment says
        assert timeout_of(comm) is None
        set_timeout(comm, None)  # the environment's again
        assert timeout_of(comm) == 3.5
        monkeypatch.setenv("LAYERPAR_TIMEOUT", "soon")
        with pytest.raises(ValueError, match="LAYERPAR_TIMEOUT='soon'"):
            timeout_of(comm)
        for bad in (-1.0, math.inf, "1", True):
            with pytest.raises(ValueError, match="timeout="):
                set_timeout(comm, bad)
    finally:
        comm.Free()


class NoMPI:
    """A communicator whose every MPI call fails: what a wait with no limit
    may touch is only the attribute lookup."""

    def Get_attr(self, keyval):
        return None

    def __getattr__(self, name):
        raise AssertionError(f"an MPI call ({name}) without a limit")


def test_without_a_limit_a_guard_adds_nothing(monkeypatch):
    monkeypatch.delenv("LAYERPAR_TIMEOUT", raising=False)
    guard(NoMPI(), "anything")


def test_the_run_timeout_is_checked_and_set_on_the_runs_communicators(monkeypatch):
    monkeypatch.delenv("LAYERPAR_TIMEOUT", raising=False)
    for bad in ("-1", "inf", "'soon'"):
        with pytest.raises(ConfigError, match=r"^run\.timeout = .*(seconds >= 0|number)"):
            resolve(None, [f"run.timeout={bad}"])
    comm = MPI.COMM_SELF.Dup()
    try:
        apply_timeout(resolve(None, []), comm)  # none anywhere: nothing set
        assert timeout_of(comm) is None
        monkeypatch.setenv("LAYERPAR_TIMEOUT", "4")
        apply_timeout(resolve(None, []), comm)
        assert timeout_of(comm) == 4.0
        apply_timeout(resolve(None, ["run.timeout=9"]), comm)  # the key wins
        assert timeout_of(comm) == 9.0
        with ProcessGrid(comm, data=1) as grid:  # the grid's communicators inherit it
            assert timeout_of(grid.layer_comm) == 9.0 and timeout_of(grid.data_comm) == 9.0
    finally:
        comm.Free()


def tiny_body(comm, **kw):
    return LayerParallel(lambda n: nn.Linear(3, 3).double(), 4, 1.0, comm, **kw)


def test_a_network_takes_its_communicators_limit_and_sets_its_own(monkeypatch):
    monkeypatch.delenv("LAYERPAR_TIMEOUT", raising=False)
    comm = MPI.COMM_SELF.Dup()
    try:
        set_timeout(comm, 6)
        with tiny_body(comm) as body:
            assert body.fwd_options["timeout"] == 6.0 and timeout_of(body.comm) == 6.0
            assert timeout_of(body.communicator("pipeline")) == 6.0
        with tiny_body(comm, timeout=2.5) as body:  # the argument wins
            assert body.bwd_options["timeout"] == 2.5 and timeout_of(body.comm) == 2.5
        with tiny_body(comm, timeout=0) as body:
            assert body.fwd_options["timeout"] is None and timeout_of(body.comm) is None
    finally:
        comm.Free()


@pytest.mark.mpi
def test_guarded_collectives_give_the_same_results_with_a_limit():
    """With a limit every rank arrives in time: the same results as without
    one, and a failure on one rank is still agreed and raised everywhere."""
    world = MPI.COMM_WORLD
    comm = world.Dup()
    results = []
    try:
        for limit in (0, 30):
            set_timeout(comm, limit)
            out = [from_root(comm, world.size - 1, lambda: [1.5, world.rank]),
                   any_rank(comm, world.rank == 0), any_rank(comm, False)]
            agree(comm, None)
            with ProcessGrid(comm, data=world.size) as grid:
                out.append(grid.sum_values([world.rank, 1.0]))
                p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
                p.grad = torch.full((3,), float(world.rank + 1), dtype=torch.float64)
                grid.average_gradients([p], 0.5)
                out.append(p.grad.tolist())
            with pytest.raises((ValueError, RemoteError), match="failed on rank 0|bad here"):
                with collective(comm, "a step"):
                    if world.rank == 0:
                        raise ValueError("bad here")
            results.append(out)
    finally:
        comm.Free()
    assert results[0] == results[1]
    assert results[1][0] == [1.5, world.size - 1] and results[1][1] and not results[1][2]


@pytest.mark.mpi
@pytest.mark.max_ranks(
    2, invariance="tests/test_multilevel.py::test_same_result_on_any_number_of_ranks")
def test_mgopt_with_a_run_timeout_trains_as_without(tmp_path_factory):
    """MG/OPT restricts and prolongs the weights across ranks between its
    levels (9 and 3 layers) while the watchdog serves (run.timeout set): the
    run finishes, with the same metrics and weights, bit for bit, as
    without a limit."""
    from layerpar.training import make_trainer
    world = MPI.COMM_WORLD
    base = world.bcast(str(tmp_path_factory.mktemp("mgopt")) if world.rank == 0 else None)
    runs = []
    nlayers = 9 if world.size <= 3 else 12  # blocks of 9 (12) and 3 (4) layers that do not align
    for limit in (0, 20):
        cfg = resolve(None, ['mgrit.mode="serial"', f"model.nlayers={nlayers}", "model.width=4",
                             "multilevel.factor=3", 'multilevel.restrict="full-weighting"',
                             'multilevel.prolong="linear"',
                             "optim.epochs=2", "data.batch_size=500", 'data.dtype="float64"',
                             "run.plot=false", 'optim.schedule="constant"',
                             'multilevel.method="mgopt"', 'optim.name="sgd"', "optim.lr=0.5",
                             f"run.timeout={limit}", f'run.dir="{base}/limit-{limit}"'])
        outcome = None
        try:
            trainer = make_trainer(cfg, world)
            trainer.run()
            rows = world.bcast(trainer.metrics.rows(), root=0)
            params = trainer.level.params()
            weights = {(n, k): t.detach().clone() for n, d in params["layers"].items()
                       for k, t in d.items()}
            outcome = (rows, weights)
        except Exception as e:  # noqa: BLE001 - compared below, on every rank
            outcome = f"{type(e).__name__}: {e}"
        runs.append(outcome)
    failed = world.allgather([r for r in runs if isinstance(r, str)])
    assert failed == [[]] * world.size
    (rows0, w0), (rows1, w1) = runs
    assert rows0 and [dict(r, wall_time=0) for r in rows0] == [dict(r, wall_time=0) for r in rows1]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


def test_a_wait_of_one_rank_completes_at_once():
    comm = MPI.COMM_SELF.Dup()
    try:
        set_timeout(comm, 5)
        agree(comm, None)
        assert from_root(comm, 0, lambda: 3) == 3
    finally:
        comm.Free()


def test_the_error_is_a_solver_timeout_too():
    e = SilentRankError("x", 2, silent=[2, 3], what="a sum", limit=1.0)
    from braid_ext import MGRITTimeoutError
    assert isinstance(e, MGRITTimeoutError) and e.rank == 2 and e.silent == (2, 3)


# ---------------------------------------------------------------------------
# a silent rank, in child jobs


# put before a child job's script: ``record(call)`` runs the call and
# writes this rank's outcome whole to ``report``.<rank> (a rename, so that
# nothing half-written is read even when the job is torn down at the abort)
RECORD = textwrap.dedent("""
    def record(call):
        try:
            call()
            text = "no error"
        except MGRITTimeoutError as e:
            text = f"TIMEOUT rank={e.rank}: {e}"
        with open(f"{report}-partial.{comm.rank}", "w") as f:
            f.write(f"RANK {comm.rank} {text}\\n")
        os.replace(f"{report}-partial.{comm.rank}", f"{report}.{comm.rank}")
""")

COLLECTIVE = textwrap.dedent("""
    import os, sys, time
    from mpi4py import MPI
    from braid_ext import MGRITTimeoutError
    from layerpar import _collective

    comm = MPI.COMM_WORLD
    silent, helper, report = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    late = helper == "late"
    _collective.agree(comm, None)  # every rank has started
    if comm.rank == silent:
        time.sleep(8 if late else 600)  # stops answering (for a while when late)
    if helper in ("agree", "late"):
        record(lambda: _collective.agree(comm, None, what="checking the input"))
    elif helper == "from_root":
        record(lambda: _collective.from_root(comm, 0, lambda: 42))
    else:
        record(lambda: _collective.any_rank(comm, False))
    if late and comm.rank != silent:
        time.sleep(20)  # the silent rank wakes up meanwhile
    comm.Abort(3)
""")


@pytest.mark.parametrize("ranks,silent,helper", [(2, 1, "agree"), (3, 0, "from_root"),
                                                 (3, 2, "any_rank")])
def test_a_rank_silent_before_an_agreement_is_named_by_the_others(mpiexec, tmp_path, ranks,
                                                                  silent, helper):
    serial_only()
    script = tmp_path / "collective.py"
    script.write_text(RECORD + COLLECTIVE)
    proc = run_child([mpiexec, "-n", str(ranks), sys.executable, str(script), str(silent),
                      helper, str(tmp_path / "report")], env={"LAYERPAR_TIMEOUT": "2"})
    got = reports(tmp_path, "report")
    assert got, proc.stdout + proc.stderr
    assert silent not in got  # the silent rank never got there
    for text in got.values():
        assert f"TIMEOUT rank={silent}:" in text and f"rank {silent} did not answer" in text
        assert "within the timeout of 2 s" in text
    assert proc.returncode != 0


def test_a_silent_rank_that_wakes_up_raises_instead_of_waiting(mpiexec, tmp_path):
    """The others have given up and told it: it raises at its next guarded
    wait, naming itself, instead of entering a collective they have left."""
    serial_only()
    script = tmp_path / "collective.py"
    script.write_text(RECORD + COLLECTIVE)
    proc = run_child([mpiexec, "-n", "2", sys.executable, str(script), "1", "late",
                      str(tmp_path / "report")], env={"LAYERPAR_TIMEOUT": "2"})
    got = reports(tmp_path, "report")
    assert sorted(got) == [0, 1], proc.stdout + proc.stderr
    assert "TIMEOUT rank=1:" in got[0] and "checking the input" in got[0]
    assert "TIMEOUT rank=1:" in got[1] and "as rank 0 found" in got[1]
    assert proc.returncode != 0


PIPELINE = textwrap.dedent("""
    import os, sys, time
    import torch
    from torch import nn
    from mpi4py import MPI
    from braid_ext import MGRITTimeoutError
    from layerpar import Network

    comm = MPI.COMM_WORLD
    silent, report = int(sys.argv[1]), sys.argv[2]
    stall = [False]

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3).double()

        def forward(self, u):
            if stall[0] and comm.rank == silent:
                time.sleep(600)  # stops answering in the middle of a pass
            return torch.tanh(self.lin(u))

    net = Network(lambda: nn.Linear(2, 3).double(), lambda n: Step(),
                  lambda: nn.Linear(3, 2).double(), nlayers=2 * comm.size, T=1.0, comm=comm,
                  microbatches=2)
    x = torch.randn(4, 2, dtype=torch.float64)
    net(x)  # a whole pass first
    stall[0] = True
    record(lambda: net(x))
    comm.Abort(3)
""")


def test_a_rank_silent_in_a_pipelined_pass_is_named_by_its_neighbours(mpiexec, tmp_path):
    """Rank 1 of 3 stops inside its layers: rank 2 waits for its micro-batch
    (a point-to-point wait), rank 0 at the end of the pass; both name it."""
    serial_only()
    script = tmp_path / "pipeline.py"
    script.write_text(RECORD + PIPELINE)
    proc = run_child([mpiexec, "-n", "3", sys.executable, str(script), "1",
                      str(tmp_path / "report")], env={"LAYERPAR_TIMEOUT": "2"})
    got = reports(tmp_path, "report")
    assert got and 1 not in got, proc.stdout + proc.stderr
    for text in got.values():
        assert "TIMEOUT rank=1:" in text and "rank 1 did not answer" in text
    if 2 in got and "as rank" not in got[2]:
        assert "micro-batch" in got[2]  # its own verdict: the message it waited for
    assert proc.returncode != 0


STALL = textwrap.dedent("""
    import sys, time
    from mpi4py import MPI
    from layerpar import cli
    from layerpar.reducer import GradientReducer

    silent, where = int(sys.argv[1]), sys.argv[2]
    calls = [0]

    def stalled(original):
        def call(*args, **kwargs):
            calls[0] += 1
            if MPI.COMM_WORLD.rank == silent and calls[0] == 2:
                time.sleep(600)  # a hang in a callback: stops answering
            return original(*args, **kwargs)
        return call

    if where == "stop":  # the signal check after each step, before the ranks agree
        cli.StopRequest.requested = stalled(cli.StopRequest.requested)
    else:  # before the gradient sum over the data-parallel groups is waited for
        GradientReducer.finish = stalled(GradientReducer.finish)
    sys.exit(cli.main(sys.argv[3:]))
""")


@pytest.mark.parametrize("ranks,silent,where,extra", [
    (2, 1, "stop", []),
    (3, 0, "grid", ["--data-parallel", "3", "--set", "run.timeout=2"]),
])
def test_the_command_ends_the_job_naming_a_silent_rank(mpiexec, tmp_path, ranks, silent,
                                                       where, extra):
    serial_only()
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    env = {} if "run.timeout=2" in extra else {"LAYERPAR_TIMEOUT": "2"}
    proc = run_child([mpiexec, "-n", str(ranks), sys.executable, str(script), str(silent), where,
                      "train", "--run-dir", str(tmp_path / "run"), "-q", "--set",
                      "optim.epochs=1", "--set", f"model.nlayers={2 * ranks}", *extra], env=env)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("layerpar: error")]
    assert lines, proc.stdout + proc.stderr
    what = "the agreement on stopping" if where == "stop" else "the gradient sum"
    for line in lines:
        assert f"rank {silent} did not answer within the timeout of 2 s" in line, line
        assert what in line
    assert "Traceback" not in proc.stderr
    assert proc.returncode != 0


def test_a_bad_timeout_in_the_environment_is_one_line_naming_it(tmp_path):
    serial_only()
    proc = run_child([sys.executable, "-m", "layerpar", "train", "--run-dir",
                      str(tmp_path / "run"), "-q"], env={"LAYERPAR_TIMEOUT": "soon"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "layerpar: error: LAYERPAR_TIMEOUT='soon': must be a number of seconds"]
