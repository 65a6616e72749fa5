"""The globalised multilevel method (RMTR) and full multigrid: the trust
region's rule on quadratics with known answers, the ratio test and the
radius recomputed independently, the bound on the coarse correction, the
same batch on every level, the cycle batches and their growth, the
configuration checks, rank invariance and resumption on any number of
ranks."""
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI
from test_cli import SMALL, command, error_line, shared_dir
from test_multilevel import (  # noqa: F401
    assert_same_run,
    config,
    gathered,
    rows_and_weights,
    run_dirs,
)

from layerpar.config import ConfigError, resolve
from layerpar.optim import trust
from layerpar.multilevel.batching import CycleBatches
from layerpar.training import Trainer

WORLD = MPI.COMM_WORLD

# Checks made on 1 and 2 ranks: on 4 a run is the run on one, full multigrid
# among the cases (test_same_result_on_any_number_of_ranks)
UP_TO_2_RANKS = pytest.mark.max_ranks(2, invariance="test_same_result_on_any_number_of_ranks")


# ---- the trust region's rule ----------------------------------------------------------
def tr_minimise(f, grad, curvature, x, radius, iterations):
    """A one-dimensional trust-region loop with the model m(s) = f(x) +
    f'(x) s + curvature s^2 / 2, steps to the model's minimiser or the
    boundary, decided by ``trust``: [(x, radius, rho, accepted)]."""
    out = []
    for _ in range(iterations):
        g = grad(x)
        s = -g / curvature
        if abs(s) > radius:
            s = math.copysign(radius, s)
        predicted = -(g * s + curvature * s * s / 2)
        rho = trust.ratio(f(x) - f(x + s), predicted)
        accepted, new = trust.update(radius, rho, abs(s), radius)
        out.append((x, radius, rho, accepted))
        if accepted:
            x += s
        radius = new
    return out, x


def test_trust_region_rule_on_quadratics_with_known_answers():
    f, grad = (lambda x: 2 * x * x), (lambda x: 4 * x)
    # the model's curvature 1 against the true 4, from x = 3, radius 1: step
    # -1 (boundary), actual 18 - 8 = 10, predicted 12 - 1/2: rho = 20/23 >=
    # 3/4 at the boundary, so the radius doubles; then from x = 2 the step
    # -2, actual 8, predicted 16 - 2 = 14: rho = 4/7, accepted, radius kept
    out, x = tr_minimise(f, grad, 1.0, 3.0, 1.0, 2)
    assert x == 0.0
    assert [(x, r, a) for x, r, _, a in out] == [(3.0, 1.0, True), (2.0, 2.0, True)]
    assert math.isclose(out[0][2], 20 / 23, rel_tol=1e-15)
    assert math.isclose(out[1][2], 4 / 7, rel_tol=1e-15)
    # curvature 1/4: from x = 1, radius 4 the step -4 lands at f(-3) = 18
    # (rho = -16/14: rejected, radius 2), then -2 at f(-1) = 2 (rho = 0:
    # rejected, radius 1), then -1 at the minimum: rho = 2/3.875, accepted
    # inside (1/10, 3/4): the radius stays 1
    out, x = tr_minimise(f, grad, 0.25, 1.0, 4.0, 3)
    assert x == 0.0
    assert [(r, a) for _, r, _, a in out] == [(4.0, False), (2.0, False), (1.0, True)]
    assert [round(rho, 12) for _, _, rho, _ in out] == [round(-16 / 14, 12), 0.0,
                                                       round(2 / 3.875, 12)]


def test_trust_region_rule_edges():
    # no predicted decrease, or a value that is not finite: rejected
    assert trust.ratio(1.0, 0.0) == -math.inf and trust.ratio(1.0, -1.0) == -math.inf
    assert trust.ratio(math.nan, 1.0) == -math.inf and trust.ratio(1.0, math.inf) == -math.inf
    assert trust.update(1.0, -math.inf, 0.5, 1.0) == (False, 0.5)
    assert trust.update(1.0, math.nan, 0.5, 1.0) == (False, 0.5)
    # a very successful step inside the region keeps the radius; on its
    # boundary (>= 0.9 of the bound it had) it grows, up to the largest
    assert trust.update(1.0, 0.9, 0.5, 1.0) == (True, 1.0)
    assert trust.update(1.0, 0.9, 0.45, 0.5) == (True, 2.0)
    assert trust.update(1.0, 0.9, 1.0, 1.0, max_radius=1.5) == (True, 1.5)
    assert trust.update(1.0, 0.05, 1.0, 1.0) == (False, 0.5)
    assert trust.update(1.0, 0.05, 1.0, 1.0, accept=0.01) == (True, 1.0)
    assert trust.update(1e-3, -1.0, 1.0, 1.0, min_radius=1e-3) == (False, 1e-3)


# ---- the cycle batches --------------------------------------------------------------------
def batches(**kw):
    opts = dict(first=1, growth="none", most=0, every=1, theta=0.5, batches_per_epoch=5)
    opts.update(kw)
    return CycleBatches(**opts)


def test_cycle_batches_group_and_grow():
    x = [torch.full((2, 1), float(b)) for b in range(5)]
    y = [torch.full((2,), b) for b in range(5)]
    cb = batches(first=2, growth="schedule", every=1, most=4)
    groups = [cb.add(b, x[b], y[b], 2) for b in range(5)]
    # two per cycle; the epoch's last batch ends a group of one
    assert [g is None for g in groups] == [True, False, True, False, False]
    assert torch.equal(groups[1][0], torch.cat(x[:2])) and groups[1][2] == 4
    assert torch.equal(groups[3][1], torch.cat(y[2:4]))
    assert torch.equal(groups[4][0], x[4]) and groups[4][2] == 2
    cb.end_epoch()
    assert cb.size == 4
    cb.end_epoch()
    assert cb.size == 4  # at most 4
    # the norm test: noise above theta^2 times the gradient doubles the group
    nt = batches(growth="norm-test", theta=0.5)
    nt.record(0.2, 1.0)
    assert nt.size == 1
    nt.record(0.1, 0.0)  # sums 0.3 > 0.25 * 1.0
    assert nt.size == 2 and nt.tests == 0
    # inputs absent on this rank stay absent
    nb = batches(first=2)
    assert nb.add(0, None, y[0], 2) is None
    assert nb.add(1, None, y[1], 3)[0] is None


# ---- the method ------------------------------------------------------------------------------
def rmtr(run_dir, **sets):
    sets = {"optim.name": '"adam"', "optim.lr": 0.05, "multilevel.pre_steps": 0,
            "multilevel.coarse_steps": 3, **sets}
    return config(run_dir, "rmtr", **sets)


def serial_loss(level, x, y):
    """The level's objective (mean cross-entropy, no penalty, no linear term)
    at its current weights by plain autograd through the gathered serial
    network, on every rank."""
    seq = level.net.serial_equivalent()
    with torch.no_grad():
        return float(Fn.cross_entropy(seq(x), y))


def everywhere(comm, x, y):
    return comm.bcast(x, root=0), comm.bcast(y, root=comm.Get_size() - 1)


def flat(weights):
    return torch.cat([weights[k].reshape(-1) for k in sorted(weights, key=str)])


@pytest.mark.mpi
@UP_TO_2_RANKS
@pytest.mark.parametrize("levels", [2, 3])
def test_ratio_test_and_radius_recomputed_independently(levels, run_dirs):
    # every cycle's actual decrease (serial autograd before and after), its
    # step (the norm of the change of the gathered fine weights) and the
    # radius update (trust.update from the cycle's ratio) agree with the
    # method's record; the step never exceeds the radius it was given
    cfg = rmtr(run_dirs(), **{"multilevel.levels": levels, "model.nlayers": 4 * 2 ** (levels - 1),
                              "multilevel.post_steps": 0, "multilevel.radius": 0.05,
                              "data.batch_size": 1000})
    ml = Trainer(cfg, WORLD)
    seen = set()
    for b, (x, y) in enumerate(ml.train_loader.epoch(0)):
        xa, ya = everywhere(WORLD, x, y)
        w0 = flat(gathered(ml.level, "data"))
        f0 = serial_loss(ml.level, xa, ya)
        r0 = ml.method.radius[-1]
        ml.method.cycle_on(x, y, 1000)
        c = ml.method.last_cycle
        w1 = flat(gathered(ml.level, "data"))
        step = float((w1 - w0).norm())
        assert c["bound"] == r0
        assert math.isclose(c["f_before"], f0, rel_tol=1e-12)
        if c["accepted"]:
            seen.add("accepted")
            assert math.isclose(c["step"], step, rel_tol=1e-9, abs_tol=1e-14)
            assert step <= r0 * (1 + 1e-12)
            assert math.isclose(c["f_after"], serial_loss(ml.level, xa, ya), rel_tol=1e-12)
            assert math.isclose(c["rho"], (f0 - c["f_after"]) / c["predicted"], rel_tol=1e-12)
        else:
            seen.add("rejected")
            assert step == 0.0
        want = trust.update(r0, c["rho"], c["step"], r0, accept=0.1)
        assert (c["accepted"], ml.method.radius[-1]) == want
    assert "accepted" in seen


@pytest.mark.mpi
def test_coarse_steps_stay_in_the_region_on_every_level(run_dirs):
    # three levels, a small radius: every coarse iterate's displacement,
    # prolonged to the finest level and measured there (gathered, plain
    # torch), stays within the bound it was given
    cfg = rmtr(run_dirs(), **{"multilevel.levels": 3, "model.nlayers": 16,
                              "multilevel.radius": 0.02, "multilevel.coarse_steps": 4,
                              "multilevel.pre_steps": 1, "multilevel.post_steps": 0})
    ml = Trainer(cfg, WORLD)
    m = ml.method
    x, y = next(iter(ml.train_loader.epoch(0)))
    worst = []
    smooth = m._smooth

    def spy(l, count, x, y, size, known, start, bound):
        out = smooth(l, count, x, y, size, known, start, bound)
        if math.isfinite(bound):
            here = m.fine_norm(l, tuple(
                {n: {k: p.detach() - start[0][n][k] for k, p in ps.items()}
                 for n, ps in m.levels[l].body.params_by_layer().items()}
                if i == 0 else {k: p.detach() - start[1][k]
                                for k, p in m.levels[l].end_params().items()}
                for i in range(2)))
            worst.append(here / bound)
        return out

    m._smooth = spy
    for _ in range(3):
        m.cycle_on(x, y, 500)
    assert worst and max(worst) <= 1 + 1e-12, worst
    assert max(worst) > 0.99  # the bound was reached: the test tested something
    # and the norm itself: constant prolongation of a coarse displacement e
    # repeats each layer r times, so |P e| = sqrt(r^l) |e| on the layers
    e = ({n: {k: torch.ones_like(p) for k, p in ps.items()}
          for n, ps in m.levels[2].body.params_by_layer().items()}, {})
    count = WORLD.allreduce(sum(p.numel() for ps in m.levels[2].body.params_by_layer().values()
                                for p in ps.values()))
    assert math.isclose(m.fine_norm(2, e), math.sqrt(4 * count), rel_tol=1e-14)


@pytest.mark.mpi
def test_every_level_sees_the_cycle_batch(run_dirs):
    # two loader batches per cycle: every evaluation of the cycle, on every
    # level, is on their concatenation, with its size
    cfg = rmtr(run_dirs(), **{"multilevel.levels": 3, "model.nlayers": 16,
                              "multilevel.cycle_batches": 2, "data.batch_size": 125,
                              "multilevel.pre_steps": 1, "multilevel.post_steps": 1})
    ml = Trainer(cfg, WORLD)
    calls = []
    for lev in ml.levels:
        for name in ("_evaluate_with_grad", "loss"):
            original = getattr(lev, name)

            def spy(x, y, size=None, _original=original, _lev=lev):
                calls.append((_lev.nlayers, x, y, size))
                return _original(x, y, size)
            setattr(lev, name, spy)
    loader = list(ml.train_loader.epoch(0))
    for b in range(2):
        ml.method.step(*loader[b], 125)
    first, last = WORLD.rank == 0, WORLD.rank == WORLD.size - 1
    want_x = torch.cat([loader[0][0], loader[1][0]]) if first else None
    want_y = torch.cat([loader[0][1], loader[1][1]]) if last else None
    assert {n for n, *_ in calls} == {4, 8, 16}
    for n, x, y, size in calls:
        assert size == 250
        assert (x is None) if not first else torch.equal(x, want_x)
        assert (y is None) if not last else torch.equal(y, want_y)


RMTR_CASES = [
    {"multilevel.levels": 2},
    {"multilevel.levels": 3, "model.nlayers": 16, "multilevel.restrict": '"full-weighting"',
     "multilevel.cycle_batches": 2, "multilevel.batch_growth": '"schedule"',
     "data.batch_size": 500, "multilevel.post_steps": 1},
    {"optim.name": '"sgd"', "optim.lr": 0.5, "multilevel.coarse_state": '"keep"',
     "multilevel.batch_growth": '"norm-test"', "data.batch_size": 500,
     "multilevel.max_cycle_batches": 4, "multilevel.prolong": '"linear"'},
    {"multilevel.start": '"full-multigrid"', "multilevel.levels": 3, "model.nlayers": 16,
     "multilevel.epochs_per_level": "[1, 1, 2]", "data.batch_size": 1000,
     "multilevel.cycle_batches": 2},
]
# L-SR1 on every level (full batch): its own trust region inside the cycle's
LSR1_CASE = {"optim.name": '"lsr1"', "optim.lr": 1.0, "optim.schedule": '"constant"',
             "multilevel.post_steps": 1}


@pytest.mark.mpi
@pytest.mark.parametrize("sets", RMTR_CASES + [LSR1_CASE])
def test_same_result_on_any_number_of_ranks(sets, run_dirs):
    world = Trainer(rmtr(run_dirs(), **sets), WORLD)
    world.run()
    single = Trainer(rmtr(run_dirs(shared=False), **sets), MPI.COMM_SELF)
    single.run()
    a, b = rows_and_weights(world), rows_and_weights(single)
    assert_same_run(a, b, 1e-10)
    for ra, rb in zip(a[0], b[0]):
        assert (ra["radius"], ra["cycle_batches"]) == (rb["radius"], rb["cycle_batches"])
        assert ra["samples_work"] == rb["samples_work"]


@pytest.mark.mpi
@UP_TO_2_RANKS
@pytest.mark.parametrize("sets", RMTR_CASES[1:])
def test_stop_and_resume_here_and_on_one_rank(sets, run_dirs):
    # stopped after the 3rd batch (a cycle's batch half gathered with two
    # loader batches per cycle; the norm test's gradient kept; full
    # multigrid inside its first depth), resumed on every rank of WORLD and
    # on one rank: both end where the uninterrupted run ends
    asked = []

    def should_stop():
        asked.append(1)
        return WORLD.rank == WORLD.size - 1 and len(asked) >= 3

    part, own = run_dirs(), run_dirs(shared=False)
    stopped = Trainer(rmtr(part, **sets), WORLD, should_stop=should_stop)
    assert stopped.run().get("stopped") and stopped.step == 3
    stopped.close()
    WORLD.Barrier()
    shutil.copy(f"{part}/checkpoint.h5", f"{own}/checkpoint.h5")
    shutil.copytree(f"{part}/checkpoint.parts", f"{own}/checkpoint.parts")
    for name in ("metrics.h5", "metrics.csv"):  # none when stopped in the first epoch
        if os.path.exists(f"{part}/{name}"):
            shutil.copy(f"{part}/{name}", f"{own}/{name}")
    resumed = Trainer(rmtr(part, **sets), WORLD)
    assert resumed.resume() and resumed.step == 3
    resumed.run()
    alone = Trainer(rmtr(own, **sets), MPI.COMM_SELF)
    assert alone.resume() and alone.step == 3
    alone.run()
    full = Trainer(rmtr(run_dirs(), **sets), WORLD)
    full.run()
    want = rows_and_weights(full)
    assert_same_run(want, rows_and_weights(resumed), 1e-12)
    assert_same_run(want, rows_and_weights(alone), 1e-10)
    for t in (resumed, full):
        t.close()


@pytest.mark.mpi
@UP_TO_2_RANKS
@pytest.mark.parametrize("start", ["nested", "full-multigrid"])
def test_full_multigrid_builds_the_depths_then_cycles(start, run_dirs):
    # nested iteration's depths 4, 8, 16; cycles (corrections counted) on
    # the finest depth ("nested") or from the second on ("full-multigrid")
    cfg = rmtr(run_dirs(), **{"multilevel.start": f'"{start}"', "multilevel.levels": 3,
                              "model.nlayers": 16, "multilevel.epochs_per_level": "[1, 1, 2]"})
    ml = Trainer(cfg, WORLD)
    ml.run()
    rows = WORLD.bcast(ml.metrics.rows(), root=0)
    assert [r["nlayers"] for r in rows] == [4, 8, 16, 16]
    assert [r["level"] for r in rows] == [0, 1, 2, 2]
    cycled = [r["radius"] > 0 for r in rows]
    assert cycled == ([False, False, True, True] if start == "nested"
                      else [False, True, True, True])
    assert all(r["accepted"] == 0 for r, c in zip(rows, cycled) if not c)
    assert [lev.nlayers for lev in ml.levels] == [16, 8, 4]
    # every depth's work is counted, the coarsest's from the start
    assert rows[-1]["fwd_work"] == sum(rows[-1][f"fwd_work_l{j}"] for j in range(3))
    assert rows[0]["fwd_work_l1"] == 0
    # the coarsest depth works again in the second depth's cycles only
    assert (rows[1]["fwd_work_l0"] > rows[0]["fwd_work_l0"]) == (start == "full-multigrid")
    # samples_work weighs every layer step by its batch's samples (500 in
    # every batch), the first depth's plain steps too
    for r in rows:
        assert r["samples_work"] == 500 * (r["fwd_work"] + r["bwd_work"])
    ml.close()


# ---- configuration ------------------------------------------------------------------------
@pytest.mark.parametrize("setting,named", [
    (["multilevel.radius=0"], "multilevel.radius"),
    (["multilevel.radius=-1"], "multilevel.radius"),
    (["multilevel.accept_ratio=0"], "multilevel.accept_ratio"),
    (["multilevel.accept_ratio=1"], "multilevel.accept_ratio"),
    (['multilevel.coarse_state="stale"'], "multilevel.coarse_state"),
    (['multilevel.start="coarse"'], "multilevel.start"),
    (["multilevel.cycle_batches=0"], "multilevel.cycle_batches"),
    (['multilevel.batch_growth="double"'], "multilevel.batch_growth"),
    (["multilevel.cycle_batches=4", "multilevel.max_cycle_batches=2"],
     "multilevel.max_cycle_batches"),
    (["multilevel.growth_epochs=0"], "multilevel.growth_epochs"),
    (["multilevel.norm_test=0"], "multilevel.norm_test"),
    (["multilevel.radius=inf"], "multilevel.radius"),
    (["multilevel.cycle_batches=2", "parallel.data=3"], "data.batch_size"),
])
def test_bad_rmtr_settings_name_the_key(setting, named):
    with pytest.raises(ConfigError) as e:
        resolve(None, ['multilevel.method="rmtr"'] + setting)
    assert str(e.value).startswith(named + " = ") and "\n" not in str(e.value)


@pytest.mark.parametrize("setting,named", [
    (['multilevel.method="mgopt"', "multilevel.radius=2"], "multilevel.radius"),
    (['multilevel.method="nested"', "multilevel.cycle_batches=2"], "multilevel.cycle_batches"),
    (['multilevel.method="nested"', 'multilevel.start="nested"'], "multilevel.start"),
    (['multilevel.method="rmtr"', "multilevel.epochs_per_level=[1, 2]"],
     "multilevel.epochs_per_level"),
    (['multilevel.method="mgopt"', "multilevel.target_accuracy=0.5"],
     "multilevel.target_accuracy"),
    (['multilevel.method="rmtr"', "multilevel.line_search_steps=2"],
     "multilevel.line_search_steps"),
    (['multilevel.method="rmtr"', "multilevel.reuse=true"], "multilevel.reuse"),
])
def test_rmtr_settings_where_they_do_not_apply(setting, named):
    with pytest.raises(ConfigError) as e:
        resolve(None, setting)
    text = str(e.value)
    assert text.startswith(named + " = ") and "does not apply" in text and "\n" not in text


def test_full_multigrid_settings_apply():
    for method, start in (("mgopt", "nested"), ("rmtr", "full-multigrid")):
        resolve(None, [f'multilevel.method="{method}"', f'multilevel.start="{start}"',
                       "multilevel.epochs_per_level=[1, 2]", "multilevel.target_accuracy=0.5"])


@pytest.mark.mpi
@pytest.mark.parametrize("setting,named", [
    (["multilevel.radius=0"], "multilevel.radius"),
    (['multilevel.batch_growth="always"'], "multilevel.batch_growth"),
    (['multilevel.start="coarse"'], "multilevel.start"),
])
def test_command_line_refuses_bad_rmtr_settings_in_one_line(tmp_path_factory, setting, named):
    # on every rank of the session: the same failing status, one line naming
    # the key (rank 0's), no traceback, no checkpoint
    run_dir = shared_dir(tmp_path_factory, "rmtr-refused")
    args = ["train", "--run-dir", run_dir, *SMALL, "--set", 'multilevel.method="rmtr"']
    for s in setting:
        args += ["--set", s]
    r = command(*args, "-q")
    assert r.status != 0 and len(r.statuses) == WORLD.size
    line = error_line(r)
    assert line.startswith(f"layerpar: error: {named} = "), line
    assert not os.path.exists(os.path.join(run_dir, "checkpoint.h5"))
