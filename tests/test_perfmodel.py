"""The cost model against the core: step counts per rank and level equal the
counters of real solves (exact integers), and the modelled time equals the
core's virtual clock (deterministic: no wall time is asserted), for the
Solver and for LayerParallel's forward and backward solves and pipeline."""
import json
import os

import pytest
import torch
from mpi4py import MPI

from braid_ext import Solver
from braid_ext.examples.rotation import DampedRotation
from layerpar import perfmodel as pm
from layerpar.parallel import LayerParallel

WORLD = MPI.COMM_WORLD
P, RANK = WORLD.Get_size(), WORLD.Get_rank()


def _solver_case(N, opts, max_iter, reverse, cost, latency):
    with Solver(DampedRotation(), WORLD, 0.0, 2.0, N, abs_tol=0.0, max_iter=max_iter,
                final_sweep=True, reverse=reverse, step_cost=cost, latency=latency,
                **opts) as s:
        s.solve()
        st = s.stats()
    return st["steps"], st["virtual_time"]


CASES = [(N, dict(max_levels=lv, cfactor=cf, relax=relax, skip=skip, cycle=cycle))
         for N, cf in ((16, 4), (37, 3), (64, 4))
         for lv in (1, 2, 3)
         for relax, skip, cycle in (("F", True, "V"), ("FCF", False, "V"), ("F", False, "F"))]


@pytest.mark.mpi
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("max_iter", [1, 2])
@pytest.mark.parametrize("N,opts", CASES)
def test_steps_and_clock_equal_the_core(N, opts, max_iter, reverse):
    cost, latency = [1.0, 0.375, 0.25], 0.125   # exact binary fractions: equality holds
    steps, clock = _solver_case(N, opts, max_iter, reverse, cost, latency)
    model = pm.solve(N, P, **opts, max_iter=max_iter, reverse=reverse, cost=cost,
                     latency=latency)
    assert steps == model["steps"][RANK][:len(steps)]
    assert clock == pytest.approx(model["time"], rel=1e-12)


def test_textbook_two_level_counts():
    """Two levels, one rank: (nu + 1) N fine and 2 N/m coarse steps per
    iteration (N/m in a skipped first one), and N in the final sweep."""
    N, m = 64, 4
    for relax, nu in (("F", 0), ("FCF", 1)):
        for skip in (False, True):
            for K in (1, 2, 3):
                got = pm.solve(N, 1, max_levels=2, cfactor=m, relax=relax, skip=skip,
                               max_iter=K)["steps"][0]
                fine = (K - skip) * (nu + 1) * N + N
                coarse = (K - skip) * 2 * N // m + skip * N // m
                assert got == [fine, coarse]


def _net(opts, N=12):
    torch.manual_seed(0)
    return LayerParallel(lambda n: torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh()),
                         N, 1.0, WORLD, **opts).double()


@pytest.mark.mpi
@pytest.mark.parametrize("opts", [dict(max_levels=1),
                                  dict(max_levels=2, cfactor=3, relax="F", skip=True),
                                  dict(max_levels=3, cfactor=2, relax="FCF", fwd_iters=1,
                                       bwd_iters=2),
                                  dict(max_levels=1, microbatches=3)])
def test_layerparallel_counts_and_clock(opts):
    """The counters and clock of LayerParallel's solves (its step cost is
    1 per step, messages free) against the model."""
    N = 12
    net = _net(opts, N)
    u0 = torch.randn(5, 3, dtype=torch.float64)
    out = net(u0 if RANK == 0 else None)
    out.sum().backward()
    fwd, bwd = net.last_forward, net.last_backward
    net.close()
    if opts.get("microbatches", 1) > 1:
        sizes = [2, 2, 1]
        model_f = pm.pipeline(N, P, sizes, lambda b: 1.0 / 3, lambda b: 0.0)
        model_b = pm.pipeline(N, P, sizes[::-1], lambda b: 1.0 / 3, lambda b: 0.0)
        assert fwd["virtual_time"] == pytest.approx(model_f, rel=1e-12)
        assert bwd["virtual_time"] == pytest.approx(model_b, rel=1e-12)
        return
    kw = {k: v for k, v in opts.items() if k not in ("fwd_iters", "bwd_iters")}
    kw.setdefault("relax", "FCF")
    for rec, reverse, iters in ((fwd, False, opts.get("fwd_iters", 2)),
                                (bwd, True, opts.get("bwd_iters", 1))):
        model = pm.solve(N, P, **kw, max_iter=iters, reverse=reverse)
        assert rec["steps"] == model["steps"][RANK][:len(rec["steps"])]
        assert rec["virtual_time"] == pytest.approx(model["time"], rel=1e-12)


def test_pipeline_textbook_bubble():
    """Even blocks and micro-batches: (P + m - 1) N / (P m) step costs."""
    for N, P_, m in ((16, 4, 4), (64, 8, 2), (12, 1, 3)):
        # a micro-batch's layer step costs 1/m of a full-batch one
        t = pm.pipeline(N, P_, [4] * m, lambda b: 1.0 / m, lambda b: 0.0)
        assert t == pytest.approx((P_ + m - 1) * N / (P_ * m), rel=1e-12)


def _calibration(final=True):
    """Costs a + b*rows; without ``final`` the final sweeps cost what the
    other steps do (the virtual clock has one cost per level)."""
    costs = {"fwd": (1e-4, 1e-5), "fwd_rec": (1.2e-4, 1.2e-5), "adj": (1.5e-4, 2e-5),
             "adj_w": (2e-4, 3e-5)}
    if not final:
        costs.update(fwd_rec=costs["fwd"], adj_w=costs["adj"])
    # bandwidth so large that a message costs its latency (as on the clock)
    return pm.Calibration(costs, latency=2e-5, bandwidth=1e300, batch=32, row_bytes=64)


def test_serial_step_is_the_pipeline_with_one_micro_batch():
    """Serial mode (one level) runs as the pipeline with the whole batch:
    each rank's N/P layers after the previous rank's, one message between
    neighbours each way."""
    cal, N = _calibration(), 16
    for P_ in (1, 2, 4):
        model = pm.training_step(cal, N, P_, "serial")
        msg = cal.message(cal.batch) * (P_ - 1)
        assert model["forward"] == pytest.approx(N * cal.step("pipe_fwd") + msg, rel=1e-12)
        assert model["backward"] == pytest.approx(N * cal.step("pipe_bwd") + msg, rel=1e-12)
        assert model == pm.training_step(cal, N, P_, "pipeline", microbatches=1)


@pytest.mark.mpi
@pytest.mark.parametrize("mode,opts", [("layer-parallel", dict(max_levels=2, cfactor=4)),
                                       ("layer-parallel", dict(max_levels=3, cfactor=2,
                                                               relax="FCF", skip=False)),
                                       ("one-shot", dict(max_levels=2, cfactor=2))])
def test_training_step_model_equals_the_calibrated_clock(mode, opts):
    """A training step's model against the virtual clocks of the forward
    and backward solves run with the calibrated costs and latency."""
    cal = _calibration(final=False)
    N = 16
    model = pm.training_step(cal, N, P, mode, **opts)
    full = dict(max_levels=2, cfactor=4, relax="F", skip=True, cycle="V", min_coarse=2)
    full.update(opts)
    clock = 0.0
    for reverse, kind, iters in ((False, "fwd", 1 if mode == "one-shot" else 2),
                                 (True, "adj", 1)):
        with Solver(DampedRotation(), WORLD, 0.0, 2.0, N, abs_tol=0.0, max_iter=iters,
                    final_sweep=True, reverse=reverse, step_cost=cal.step(kind),
                    latency=cal.latency, warm_start=mode == "one-shot", **full) as s:
            s.solve()
            if mode == "one-shot":
                s.solve()  # a one-shot step solves warm
            clock += s.stats()["virtual_time"]
    assert model["forward"] + model["backward"] == pytest.approx(clock, rel=1e-9)
    # the final sweeps' own costs (recording, weight gradients) are what the
    # clock cannot express: the full model differs from it by them alone
    full_model = pm.training_step(_calibration(), N, P, mode, **opts)
    assert full_model["time"] > model["time"]


@pytest.mark.parametrize("mode,opts", [("serial", {}), ("pipeline", dict(microbatches=4)),
                                       ("layer-parallel", dict(max_levels=2, cfactor=4))])
@pytest.mark.parametrize("ranks", [1, 4])
def test_training_step_adds_the_pass_costs(mode, opts, ranks):
    """The costs outside the solves: the solver's per-step overhead on every
    solver step (none with one level, serial or pipelined: the pipeline is
    not a solve), two passes' fixed costs, three reductions, the ends, the
    optimiser on the busiest rank's layers, and the coarse weights' message."""
    N = 18
    base = _calibration()
    more = pm.Calibration.load_dict(dict(base.to_dict(), overhead=1e-3, solve_fixed=0.5,
                                         ends=0.25, optimizer=0.125))
    a = pm.training_step(base, N, ranks, mode, **opts)
    b = pm.training_step(more, N, ranks, mode, **opts)
    red = base.latency * 2 if ranks == 4 else 0.0
    ghost = base.latency if ranks == 4 and mode == "layer-parallel" else 0.0
    assert a["pass"] == pytest.approx(3 * red + ghost, rel=1e-12)
    assert b["pass"] == pytest.approx(2 * 0.5 + 3 * red + 0.25 + 0.125 * -(-N // ranks)
                                      + ghost, rel=1e-12)
    assert b["time"] == pytest.approx(b["forward"] + b["backward"] + b["pass"], rel=1e-12)
    if mode in ("serial", "pipeline"):
        assert b["forward"] == a["forward"] and b["backward"] == a["backward"]
    else:
        assert b["forward"] > a["forward"] and b["backward"] > a["backward"]


def test_older_calibration_files_load():
    """A calibration without the entries added later: the pipeline's kinds
    cost what the final sweeps' do, the other costs count 0."""
    d = _calibration().to_dict()
    for k in ("pipe_fwd", "pipe_bwd"):
        del d["costs"][k]
    for k in ("overhead", "solve_fixed", "ends", "optimizer"):
        d.pop(k)
    cal = pm.Calibration.load_dict(d)
    assert cal.costs["pipe_fwd"] == cal.costs["fwd_rec"]
    assert cal.costs["pipe_bwd"] == cal.costs["adj_w"]
    assert (cal.overhead, cal.solve_fixed, cal.ends, cal.optimizer) == (0.0, 0.0, 0.0, 0.0)


def test_calibration_round_trip(tmp_path):
    F = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
    x = torch.randn(16, 4, dtype=torch.float64)
    head = torch.nn.Linear(4, 2).double()

    def ends():
        head(x).sum().backward()

    cal = pm.calibrate(F, (16, 4), torch.float64, repeats=3, overhead=True, ends=ends,
                       optimizer=lambda params: torch.optim.SGD(params, lr=0.1), clock="cpu")
    for k in pm.KINDS:
        assert cal.step(k) > 0
    assert cal.overhead >= 0 and cal.solve_fixed >= 0
    assert cal.ends > 0 and cal.optimizer > 0 and cal.info["clock"] == "cpu"
    assert cal.info["messages"] == "default"
    assert cal.spread is not None and cal.spread >= 0  # recorded, whatever it was
    for k in pm.KINDS:  # never a negative intercept
        assert cal.costs[k][0] >= 0 and cal.costs[k][1] >= 0
    path = tmp_path / "calibration.json"
    cal.save(path)
    again = pm.Calibration.load(path)
    assert again.to_dict() == json.loads(json.dumps(cal.to_dict()))
    assert again.spread == cal.spread
    assert again.step("adj_w", 3) == cal.step("adj_w", 3)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="relax="):
        pm.solve(8, 1, max_levels=2, relax="FF")
    with pytest.raises(ValueError, match="P="):
        pm.solve(4, 8)
    with pytest.raises(ValueError, match="mode="):
        pm.training_step(_calibration(), 8, 1, "fast")
    with pytest.raises(ValueError, match="shape="):
        pm.calibrate(torch.nn.Linear(2, 2), ())
    with pytest.raises(ValueError, match="clock="):
        pm.calibrate(torch.nn.Linear(2, 2), (3, 2), clock="sundial")
    with pytest.raises(TypeError, match="ends"):
        pm.calibrate(torch.nn.Linear(2, 2), (3, 2), ends=1.0)
    with pytest.raises(ValueError, match="solve_fixed="):
        pm.Calibration.load_dict(dict(_calibration().to_dict(), solve_fixed=-1.0))


def _plan_lines(cal, tmp_path, ranks, overrides=()):
    from layerpar.plan import main
    path = tmp_path / "cal.json"
    cal.save(path)
    lines = []
    config = os.path.join(os.path.dirname(pm.__file__), "configs", "digits-conv.toml")
    assert main(config_path=config, ranks=ranks,
                overrides=list(overrides), calibration=str(path), out=lines.append) == 0
    return lines


def test_plan_says_use_fewer_ranks_when_messages_dominate(tmp_path):
    cal = pm.Calibration({k: (0.0, 1e-6) for k in pm.KINDS}, latency=1.0, bandwidth=1e9,
                         batch=50, row_bytes=2048)
    lines = _plan_lines(cal, tmp_path, 4)
    assert lines[-1].startswith("recommendation: train serially on 1 rank: use fewer ranks")
    # the table: serial on one rank is the unit of the speed-ups
    import re
    assert any(re.match(r"serial\s+P=1\s.*\s1\.00x$", line) for line in lines)


def test_plan_says_use_the_pipeline_when_it_is_fastest(tmp_path):
    """Costs proportional to the batch and free messages: the pipeline on
    8 ranks with 16 micro-batches takes (8 + 15)/(8 * 16) of the serial
    time, and MGRIT with 3 forward iterations more than that."""
    cal = pm.Calibration({k: (0.0, 1e-5) for k in pm.KINDS}, latency=0.0, bandwidth=1e300,
                         batch=50, row_bytes=2048)
    lines = _plan_lines(cal, tmp_path, 8, ["mgrit.fwd_iters=3", "mgrit.bwd_iters=3"])
    assert "recommendation: use the pipeline (exact gradients)" in lines[-1]
    assert "fastest: pipeline P=8 microbatches=16" in lines[-2]


def test_plan_command_parses_without_torch():
    import subprocess
    import sys
    code = ("import sys\nfrom layerpar.cli import _parser\n"
            "a = _parser().parse_args(['plan', '--ranks', '4', '--calibration', 'c.json'])\n"
            "assert a.command == 'plan' and a.ranks == 4 and a.calibration == 'c.json'\n"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_overhead_fit_recovers_the_costs():
    """Excess seconds a*steps + b*passes are fitted back exactly; a negative
    free minimum moves to the boundary, where the fit is the best one-term
    least-squares fit."""
    rows = [(16, 2, 16 * 3e-5 + 2 * 1e-3), (32, 2, 32 * 3e-5 + 2 * 1e-3),
            (64, 2, 64 * 3e-5 + 2 * 1e-3), (128, 2, 128 * 3e-5 + 2 * 1e-3)]
    a, b = pm.fit_overhead(rows)
    assert a == pytest.approx(3e-5, rel=1e-9) and b == pytest.approx(1e-3, rel=1e-9)
    # excess that falls with the steps: no per-step cost, the mean per pass
    rows = [(16, 2, 4e-3), (128, 2, 1e-3)]
    a, b = pm.fit_overhead(rows)
    assert a == 0.0 and b == pytest.approx((4e-3 + 1e-3) / 4, rel=1e-12)
    assert pm.fit_overhead([(16, 2, -1.0), (32, 2, -2.0)]) == (0.0, 0.0)


# ---- a robust calibration: no wall time is asserted, the estimator gets given samples ----

def _samples(values):
    """measure() returning the given block timings in turn, and the calls made."""
    it, calls = iter(values), []

    def measure():
        calls.append(1)
        return next(it)
    return measure, calls


def test_settle_stops_when_the_fastest_blocks_agree():
    measure, calls = _samples([1.5, 1.0, 1.2, 1.02, 1.01, 9.0])
    t, spread = pm.settle(measure, keep=3, tries=10, tolerance=0.05)
    # after five blocks the three fastest (1.0, 1.01, 1.02) agree within 2%
    assert (t, len(calls)) == (1.0, 5) and spread == pytest.approx(0.02, rel=1e-12)


def test_settle_gives_up_after_its_tries_with_the_fastest_and_the_spread():
    measure, calls = _samples([2.0, 1.0, 4.0, 1.5, 3.0, 1.25, 8.0, 2.5])
    t, spread = pm.settle(measure, keep=3, tries=6, tolerance=0.05)
    assert (t, len(calls)) == (1.0, 6) and spread == pytest.approx(0.5, rel=1e-12)


def test_settle_goes_by_the_agreed_spread():
    """Every rank measures as many blocks as the noisiest one needs: the
    spread ``agree`` returns decides."""
    seen = []

    def agree(spread):  # another rank is still noisy for the first two agreements
        seen.append(spread)
        return 0.3 if len(seen) < 3 else spread
    measure, calls = _samples([1.0] * 10)
    t, spread = pm.settle(measure, keep=3, tries=10, tolerance=0.05, agree=agree)
    assert (t, spread, len(calls)) == (1.0, 0.0, 5) and seen == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="keep="):
        pm.settle(measure, keep=4, tries=3)


def test_timer_takes_the_fastest_block_and_keeps_the_largest_spread():
    """A fake clock: the warm-up call lasts 0.3 s, then block k of 4 calls
    durations[k] seconds."""
    durations = iter([0.3, 0.8, 0.4, 0.44, 0.42, 2.0, 1.0, 1.0, 1.0])
    now = [0.0]
    started = [False]

    def clock():  # called at the start and the end of the warm-up and each block
        if started[0]:
            now[0] += next(durations)
        started[0] = not started[0]
        return now[0]
    timer = pm._Timer(clock=clock, tolerance=0.15)
    calls = []
    assert timer(lambda: calls.append(1), 4) == pytest.approx(0.1, rel=1e-12)
    assert len(calls) == 1 + 4 * 4  # a warm-up call, then four blocks
    assert timer.spread == pytest.approx(0.1, rel=1e-12)  # (0.44 - 0.4) / 0.4
    assert timer(lambda: None, 1) == 1.0 and timer.spread == pytest.approx(0.1, rel=1e-12)


def test_timer_makes_short_blocks_longer():
    """Calls of 1 ms (a fake clock that advances 1 ms a call): a block of 3
    lasts less than min_block = 10 ms, so it takes 10."""
    now = [0.0]

    def call():
        now[0] += 1e-3
    counted = []
    timer = pm._Timer(clock=lambda: now[0], min_block=1e-2)
    assert timer(lambda: (call(), counted.append(1)), 3) == pytest.approx(1e-3, rel=1e-9)
    assert len(counted) == 1 + 3 * 10  # the warm-up, then three equal blocks of 10
    assert timer.spread == pytest.approx(0.0, abs=1e-12)


def test_a_noisy_small_batch_gives_no_negative_intercept():
    """The failure seen under load: a small batch timed too fast next to the
    big one gives a negative intercept, with which 8 micro-batches on one
    rank were predicted faster than the whole batch.  The intercept is 0
    then (the line through the origin and the big batch)."""
    assert pm.affine_cost(1.0, 100, 0.01, 10) == (0.0, 0.01)
    a, b = pm.affine_cost(1.0, 100, 0.19, 10)
    assert a == pytest.approx(0.1, rel=1e-12) and b == pytest.approx(0.009, rel=1e-12)
    assert pm.affine_cost(1.0, 100, 2.0, 10) == (1.0, 0.0)  # a slower small batch: flat
    assert pm.affine_cost(1.0, 100) == (0.0, 0.01)
    costs = {k: pm.affine_cost(1e-3, 64, 1e-6, 8) for k in pm.KINDS}
    cal = pm.Calibration(costs, batch=64, row_bytes=64)
    serial = pm.training_step(cal, 16, 1, "serial")["time"]
    for m in (2, 8):
        assert pm.training_step(cal, 16, 1, "pipeline", microbatches=m)["time"] >= serial


def _rows(*times):
    modes = ["pipeline", "serial", "layer-parallel", "one-shot"]
    return [(f"setting {i}", modes[i], 1, t) for i, t in enumerate(times)]


def test_the_ranking_is_noisy_when_the_modes_are_closer_than_the_spread():
    from layerpar.plan import noisy_ranking
    rows = _rows(1.0, 1.15, 2.0)
    assert noisy_ranking(rows, 0.1)[1][1] == "serial"   # 1.15 < 1.0 * (1 + 2 * 0.1)
    assert noisy_ranking(rows, 0.05) is None           # 1.15 > 1.1
    assert noisy_ranking(rows, None) is None            # not recorded
    same_mode = [("a", "pipeline", 1, 1.0), ("b", "pipeline", 2, 1.01), ("c", "serial", 1, 3.0)]
    assert noisy_ranking(same_mode, 0.1) is None  # one mode's settings are not the question


def test_plan_prints_the_spread_and_warns_when_too_noisy(tmp_path):
    quiet = pm.Calibration({k: (1e-5, 1e-6) for k in pm.KINDS}, latency=1.0, bandwidth=1e9,
                           batch=50, row_bytes=2048, spread=0.02)
    lines = _plan_lines(quiet, tmp_path, 1)
    assert "calibration spread: 2.0%" in lines[1]
    assert lines[-1].startswith("recommendation: train serially")
    # one rank: serial and the pipeline differ by the micro-batches' intercepts
    # alone (17% for two), less than a spread of 30% can tell
    noisy = pm.Calibration.load_dict(dict(quiet.to_dict(), spread=0.3))
    lines = _plan_lines(noisy, tmp_path, 1)
    assert "calibration spread: 30.0%" in lines[1]
    assert lines[-1].startswith("warning: the calibration is too noisy to rank the modes")
    assert "serial" in lines[-1] and "pipeline" in lines[-1]
    old = pm.Calibration.load_dict({k: v for k, v in quiet.to_dict().items() if k != "spread"})
    lines = _plan_lines(old, tmp_path, 1)
    assert "calibration spread: not recorded" in lines[1]
    assert not lines[-1].startswith("warning")
