"""The gradient-accuracy controller of the parallel modes: its measurement
against serial autograd (float64, 1e-12), its switch on a constructed case
with a biased gradient, that measuring changes nothing, the same decisions
on any number of ranks, its configuration keys, and checkpoint/resume.

MPI tests run on COMM_WORLD (1, 2 and 4 ranks); every rank's outcome is
gathered before asserting, so a failure on one rank never leaves another
waiting."""
import math
import os
import shutil
import tempfile

import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from layerpar.config import ConfigError, resolve
from layerpar.training import Level, Trainer
from layerpar.training.build import load_data, make_loaders, make_monitor
from layerpar.training.controller import GradientController, gradient_error
from layerpar.training.report import batch_len

from conftest import gathered, network_name

WORLD = MPI.COMM_WORLD

# Checks made on 1 and 2 ranks: on 4 the controller measures and acts as on
# one (test_decisions_are_the_same_on_any_number_of_ranks,
# test_resume_on_another_number_of_ranks_continues_the_controller)
UP_TO_2_RANKS = pytest.mark.max_ranks(
    2, invariance="test_decisions_are_the_same_on_any_number_of_ranks")

# far from converged: one MGRIT iteration each way, two levels, cfactor 4,
# large steps (T = 5 over 16 layers)
BIASED = ['mgrit.mode="layer-parallel"', "model.nlayers=16", "model.width=4", "model.T=5.0",
          "mgrit.fwd_iters=1", "mgrit.bwd_iters=1", "mgrit.monitor=false",
          'data.dtype="float64"', "data.batch_size=250", "run.plot=false"]


def config(*sets, run_dir=None):
    # a training run (run_dir given): 10 steps per epoch
    extra = [f'run.dir="{run_dir}"', "data.batch_size=500"] if run_dir else []
    return resolve(None, BIASED + extra + list(sets))


def everywhere(fn):
    """fn() on every rank: [(exception type name, message) or (None, result)]
    of every rank, gathered after each rank has finished."""
    try:
        mine = (None, fn())
    except Exception as e:  # noqa: BLE001 - compared below, on every rank
        mine = (type(e).__name__, str(e))
    return WORLD.allgather(mine)


def level_and_batches(cfg, comm=WORLD):
    data = load_data(cfg, comm)
    level = Level(cfg, data, comm)
    train, _ = make_loaders(cfg, data, comm.Get_rank(), comm.Get_size())
    batches = [(x, y, batch_len(train, b)) for b, (x, y) in enumerate(train.epoch(0))]
    return level, batches


def serial_gradient(level, x, y):
    """The objective's gradient by ordinary autograd through the serial
    network with the same weights (every rank builds it), by the
    Network's parameter names."""
    comm = level.comm
    x = comm.bcast(x if level.first else None, root=0)
    y = comm.bcast(y if level.last else None, root=comm.Get_size() - 1)
    seq = level.net.serial_equivalent()  # opening, the layers, closing
    Fn.cross_entropy(seq(x), y).backward()
    return {network_name(k, level.nlayers): p.grad.detach().clone()
            for k, p in seq.named_parameters()}


def named_grads(level, grads):
    names = (k for k, _ in level.net.named_parameters())
    return gathered(level.comm, zip(names, grads))


# ---- the measurement ------------------------------------------------------------------

@pytest.mark.mpi
def test_exact_gradient_and_the_error_match_serial_autograd():
    level, batches = level_and_batches(config())
    x, y, size = batches[0]
    reference = serial_gradient(level, x, y)
    ref = level.exact_gradient(x, y, size)
    exact = named_grads(level, ref["grads"])
    level.loss_and_grad(x, y, size)
    inexact = named_grads(level, [p.grad for p in level.net.parameters()])
    assert exact.keys() == reference.keys() == inexact.keys()
    worst = max(float((exact[k] - reference[k]).abs().max() / reference[k].abs().max())
                for k in reference)
    # the error and cosine of the whole gradient, computed here from the
    # gathered tensors
    g = torch.cat([inexact[k].reshape(-1) for k in sorted(reference)])
    e = torch.cat([reference[k].reshape(-1) for k in sorted(reference)])
    want_error = float((g - e).norm() / e.norm())
    want_cosine = float(g @ e / (g.norm() * e.norm()))
    ctl = level.controller
    got = ctl.measure(level.comm, [p.grad for p in level.net.parameters()], ref["grads"],
                      ref["work"])
    level.close()
    assert worst <= 1e-12, worst
    assert got["error"] == pytest.approx(want_error, rel=1e-12, abs=0)
    assert got["cosine"] == pytest.approx(want_cosine, rel=1e-12, abs=0)
    assert got["error"] > 0.05  # far from converged: the inexact gradient is off
    # the exact pass's layer steps: one serial forward and adjoint pass
    assert (got["fwd_work"], got["bwd_work"]) == (16, 16)
    assert ctl.work == {"fwd": 16, "bwd": 16}


def test_gradient_error_of_known_vectors():
    g = [torch.tensor([3.0, 0.0]), None, torch.tensor([1.0])]
    e = [torch.tensor([0.0, 4.0]), torch.tensor([2.0]), None]
    error, cosine, work, clocks = gradient_error(MPI.COMM_SELF, g, e, {"fwd": 3, "bwd": 4},
                                                 (2.0, 5.0))
    assert error == pytest.approx(math.sqrt(9 + 16 + 4 + 1) / math.sqrt(16 + 4), rel=1e-15)
    assert cosine == 0.0 and work == {"fwd": 3, "bwd": 4} and clocks == (2.0, 5.0)
    assert gradient_error(MPI.COMM_SELF, [torch.ones(2)], [torch.ones(2)])[:2] == (0.0, 1.0)


@pytest.mark.mpi
def test_the_exact_pass_leaves_the_network_as_it_was():
    # options, pass counter, records and gradients as before; the kept
    # solvers still those of the inexact options
    level, batches = level_and_batches(config('mgrit.mode="one-shot"'))
    x, y, size = batches[0]
    level.loss_and_grad(x, y, size)
    body = level.body
    before = (dict(body.fwd_options), dict(body.bwd_options), body.passes,
              dict(body.last_forward), [p.grad.clone() for p in level.net.parameters()])
    work = dict(level.work)
    ref = level.exact_gradient(x, y, size)
    after = (dict(body.fwd_options), dict(body.bwd_options), body.passes,
             dict(body.last_forward), [p.grad for p in level.net.parameters()])
    spent = {k: level.work[k] - work[k] for k in work}
    level.close()
    assert before[:4] == after[:4]
    assert all(torch.equal(a, b) for a, b in zip(before[4], after[4]))
    assert spent == ref["work"] and sum(WORLD.allgather(spent["fwd"])) == 16


# ---- the switch on a biased gradient ---------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("action", ["exact", "iterations"])
def test_controller_raises_the_accuracy_when_the_gradient_is_biased(action):
    cfg = config("mgrit.controller_every=2", "mgrit.controller_tol=0.05",
                 f'mgrit.controller_action="{action}"')
    level, batches = level_and_batches(cfg)
    first = level.step(*batches[0])
    # the gradient the second step will take, against serial autograd: the
    # cold inexact solve is the same at the same weights, a bias
    x, y, size = batches[1]
    reference = serial_gradient(level, x, y)
    level.loss_and_grad(x, y, size)
    inexact = named_grads(level, [p.grad for p in level.net.parameters()])
    g = torch.cat([inexact[k].reshape(-1) for k in sorted(reference)])
    e = torch.cat([reference[k].reshape(-1) for k in sorted(reference)])
    want = float((g - e).norm() / e.norm())
    second = level.step(x, y, size)
    body = level.body
    state = (body.pipelined, body.fwd_options["max_iter"], body.bwd_options["max_iter"])
    third = level.step(*batches[2])
    level.close()
    assert math.isnan(first["grad_error"]) and first["change"] is None  # not due at step 1
    assert second["grad_error"] == pytest.approx(want, rel=1e-12) and want > 0.05
    assert second["grad_acted"] == 1 and "gradient error" in second["change"]
    assert second["check_work"] == 32
    if action == "exact":
        assert state[0] and "exact propagation" in second["change"]
        assert third["exact"] == 1 and math.isnan(third["grad_error"])  # no more checks
    else:
        assert not state[0] and state[1:] == (2, 2)
        assert "MGRIT iterations per step from now on: 2 forward, 2 adjoint" in second["change"]
        assert third["fwd_iters"] == 2 and third["bwd_iters"] == 2


@pytest.mark.mpi
def test_iterations_past_the_ceiling_become_exact_propagation():
    cfg = config("mgrit.controller_every=1", "mgrit.controller_tol=1e-6", "mgrit.max_iters=2",
                 'mgrit.controller_action="iterations"')
    level, batches = level_and_batches(cfg)
    changes = [level.step(*batches[i])["change"] for i in range(3)]
    exact = level.body.pipelined
    level.close()
    assert "2 forward, 2 adjoint" in changes[0] and "propagation from now on" in changes[1] and changes[2] is None
    assert exact


@pytest.mark.mpi
def test_no_action_while_the_error_is_within_the_bound():
    cfg = config("mgrit.controller_every=1", "mgrit.controller_tol=50.0")
    level, batches = level_and_batches(cfg)
    stats = [level.step(*batches[i]) for i in range(3)]
    ctl = level.controller
    level.close()
    assert all(s["change"] is None and not s["grad_acted"] for s in stats)
    assert ctl.checks == 3 and ctl.actions == 0 and ctl.misses == 0


def test_patience_counts_misses_in_a_row():
    class Body:
        pipelined = False

    class Monitor:
        def __init__(self):
            self.calls = 0

        def escalate(self, body, reason):
            self.calls += 1
            return reason

    ctl, mon = GradientController(every=1, tol=0.1, patience=2, action="iterations"), Monitor()
    for err in (0.2, 0.05, 0.2):  # a measurement within the bound starts the count again
        assert ctl.step_done(mon, Body(), {"error": err, "cosine": 0.9}) is None
    assert "above 0.1 in 2 checks" in ctl.step_done(mon, Body(), {"error": 0.3, "cosine": 0.9})
    assert mon.calls == 1 and ctl.misses == 0
    assert ctl.step_done(mon, Body(), {"error": math.nan, "cosine": math.nan}) is None
    assert ctl.misses == 1  # a NaN error is a miss


def test_auto_raises_iterations_while_they_cost_less_than_exact_propagation():
    class Body:
        pipelined = False

    class Monitor:
        def __init__(self, fwd, bwd, max_iters=8):
            self.iters, self.max_iters, self.done = {"fwd": fwd, "bwd": bwd}, max_iters, None

        def escalate(self, body, reason):
            self.done = "iterations"
            return reason

        def to_exact(self, body, reason):
            self.done = "exact"
            return reason

    def decide(mon, vtime, exact_vtime):
        ctl = GradientController(every=1, tol=0.1)
        assert ctl.action == "auto"
        ctl.step_done(mon, Body(), {"error": 0.5, "cosine": 0.9, "vtime": vtime,
                                    "exact_vtime": exact_vtime})
        return mon.done
    # 2 + 1 iterations took 30: 3 + 2 are taken to cost 50, below the exact 64
    assert decide(Monitor(2, 1), 30.0, 64.0) == "iterations"
    assert decide(Monitor(2, 1), 40.0, 64.0) == "exact"  # 66.7 > 64
    assert decide(Monitor(8, 1), 1.0, 64.0) == "exact"   # at the ceiling


# ---- measuring changes nothing ----------------------------------------------------------

def _shared_dir(comm=WORLD):
    return comm.bcast(tempfile.mkdtemp(prefix="lp-ctl-") if comm.rank == 0 else None, root=0)


def _train(comm, *sets, stop_after=None, resume=False, run_dir=None, log=None, states=None):
    """Train (or resume and train); the weights gathered and the metrics rows;
    ``states``: a list that gets the level's MGRIT setting and controller
    state (``monitor.state()``) before and after ``run``."""
    run_dir = run_dir or _shared_dir(comm)
    steps = [0]

    def should_stop():
        steps[0] += 1
        return stop_after is not None and steps[0] >= stop_after

    tr = Trainer(config(*sets, run_dir=run_dir), comm, should_stop=should_stop, log=log)
    if resume:
        assert tr.resume()
    if states is not None:
        states.append(tr.level.monitor.state())
    tr.run()
    if states is not None:
        states.append(tr.level.monitor.state())
    out = gathered(comm, tr.net.named_parameters())
    rows = comm.bcast(tr.metrics.rows(), root=0)
    tr.close()
    comm.Barrier()
    if comm.rank == 0 and not resume and stop_after is None:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out, rows


USER_STEPS = {"dropout": ['model.step="userblocks:Block"', "model.step_kwargs={width = 4}"],
              "batchnorm": ['model.step="userblocks:NormBlock"', "model.step_kwargs={width = 4}"],
              "dense": []}


@pytest.mark.mpi
@UP_TO_2_RANKS
@pytest.mark.parametrize("mode,step", [("one-shot", "dense"), ("layer-parallel", "dropout"),
                                       ("layer-parallel", "batchnorm")])
def test_measuring_without_acting_changes_nothing(mode, step):
    # a controller that measures every third step but never acts trains
    # bit for bit as no controller: same random draws, buffers, warm states
    sets = [f'mgrit.mode="{mode}"', "optim.epochs=2", "mgrit.monitor=true"] + USER_STEPS[step]
    on, rows_on = _train(WORLD, *sets, "mgrit.controller_every=3",
                         "mgrit.controller_tol=1000.0")
    off, rows_off = _train(WORLD, *sets, "mgrit.controller=false")
    assert on.keys() == off.keys()
    assert all(torch.equal(on[k], off[k]) for k in on)
    assert [r["val_loss"] for r in rows_on] == [r["val_loss"] for r in rows_off]
    assert rows_on[-1]["grad_checks"] > 0 and "grad_checks" not in rows_off[-1]
    # the measurements are counted as work, and only they
    extra = sum(r["grad_checks"] for r in rows_on) * 2 * 16
    assert rows_on[-1]["check_work"] == extra
    assert (rows_on[-1]["fwd_work"] + rows_on[-1]["bwd_work"]
            - rows_off[-1]["fwd_work"] - rows_off[-1]["bwd_work"]) == extra


# ---- the same decisions on any number of ranks -----------------------------------------

ACTING = ["optim.epochs=2", "mgrit.controller_every=3", "mgrit.controller_tol=0.08",
          'mgrit.controller_action="iterations"']


@pytest.mark.mpi
def test_decisions_are_the_same_on_any_number_of_ranks():
    logs_w, logs_s = [], []
    world, rows_w = _train(WORLD, *ACTING, log=logs_w.append)
    single, rows_s = _train(MPI.COMM_SELF, *ACTING, log=logs_s.append)
    logs_w = WORLD.bcast(logs_w, root=0)
    acts_w = [t.split(":")[0] for t in logs_w if "gradient error" in t]
    acts_s = [t.split(":")[0] for t in logs_s if "gradient error" in t]
    assert acts_w == acts_s and len(acts_w) >= 2  # the same steps
    assert [t.split("->")[-1] for t in logs_w if "gradient error" in t] == \
        [t.split("->")[-1] for t in logs_s if "gradient error" in t]
    for a, b in zip(rows_w, rows_s):
        assert a["grad_checks"] == b["grad_checks"] and a["grad_actions"] == b["grad_actions"]
        assert a["grad_error"] == pytest.approx(b["grad_error"], rel=1e-9)
    for k in world:
        assert torch.allclose(world[k], single[k], rtol=1e-9, atol=1e-12), k


# ---- configuration keys ------------------------------------------------------------------

BAD_KEYS = [("controller_every", "0"), ("controller_every", "-3"),
            ("controller_tol", "0.0"), ("controller_tol", "-0.1"), ("controller_tol", "inf"),
            ("controller_tol", "nan"), ("controller_patience", "0"),
            ("controller_action", '"serial"'), ("controller", '"sometimes"'),
            ("controller_every", "2.5"), ("controller_tol", '"big"'),
            ("controller_patience", "true"), ("controller_action", "3")]


@pytest.mark.mpi
@pytest.mark.parametrize("key,value", BAD_KEYS)
def test_bad_keys_are_refused_on_every_rank_naming_the_key(key, value):
    outcomes = everywhere(lambda: resolve(None, [f"mgrit.{key}={value}"]))
    for kind, text in outcomes:
        assert kind == "ConfigError", text
        assert text.startswith(f"mgrit.{key} =") and "\n" not in text, text


def test_keys_of_a_controller_switched_off_are_refused():
    with pytest.raises(ConfigError, match=r"^mgrit.controller_every = 5: does not apply "
                                          r"with mgrit.controller = false"):
        resolve(None, ["mgrit.controller=false", "mgrit.controller_every=5"])
    resolve(None, ["mgrit.controller=false"])  # the defaults written out still load


def test_keys_reach_the_controller():
    mon = make_monitor(resolve(None, ["mgrit.controller_every=7", "mgrit.controller_tol=0.3",
                                      "mgrit.controller_patience=2",
                                      'mgrit.controller_action="exact"']))
    ctl = mon.controller
    assert (ctl.every, ctl.tol, ctl.patience, ctl.action) == (7, 0.3, 2, "exact")
    assert mon.watch
    # the residual monitor off: the setting is still held, residuals not watched
    held = make_monitor(resolve(None, ["mgrit.monitor=false"]))
    assert held.controller is not None and not held.watch
    assert make_monitor(resolve(None, ["mgrit.monitor=false", "mgrit.controller=false"])) is None
    assert make_monitor(resolve(None, ['mgrit.mode="serial"'])) is None


@pytest.mark.parametrize("kw", [dict(every=0), dict(every=2.0), dict(tol=0), dict(tol=math.inf),
                                dict(patience=0), dict(action="serial"), dict(every=True)])
def test_bad_arguments_are_refused_naming_them(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf"^{name}="):
        GradientController(**kw)


# ---- checkpoints ---------------------------------------------------------------------------

RESUMED = ["optim.epochs=2", "mgrit.controller_every=4", "mgrit.controller_tol=1e-6",
           'mgrit.controller_action="iterations"', "run.checkpoint_every=5",
           "mgrit.cfactor=2"]  # (cfactor 4: 3 iterations are exact on 16 layers)
STOP = 11  # steps before the stop: mid-epoch 2, the controller acted before and acts after


@pytest.mark.mpi
@UP_TO_2_RANKS
def test_resume_continues_the_controller():
    # stopped mid-epoch after the controller has acted, resumed: the
    # controller's state (schedule, counters, work, last measurement) and
    # the MGRIT setting it raised as at the stop, and the same weights and
    # rows bit for bit on the same ranks
    sets = RESUMED + ['mgrit.mode="one-shot"']
    logs = []
    full, rows_full = _train(WORLD, *sets, log=logs.append)
    part = _shared_dir()
    stopped, started = [], []
    _train(WORLD, *sets, stop_after=STOP, run_dir=part, states=stopped)
    resumed, rows_res = _train(WORLD, *sets, resume=True, run_dir=part, states=started)
    logs = WORLD.bcast(logs, root=0)
    acts = [int(t.split(":")[0].split()[1]) for t in logs if "gradient error" in t]
    assert any(a < STOP for a in acts) and any(a > STOP for a in acts), acts
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert [r["val_loss"] for r in rows_full] == [r["val_loss"] for r in rows_res]
    keys = ("grad_checks", "grad_actions", "check_work", "exact_steps")
    assert [[r[k] for k in keys] for r in rows_full] == [[r[k] for k in keys] for r in rows_res]
    assert started[0] == stopped[1] and started[0]["controller"]["steps"] == STOP
    assert started[0]["controller"]["actions"] >= 1 and started[0]["iters"]["fwd"] > 1


@pytest.mark.mpi
def test_resume_on_another_number_of_ranks_continues_the_controller():
    # written on COMM_WORLD, resumed on one rank (each rank its own copy):
    # the uninterrupted run's weights to round-off
    sets = RESUMED
    logs = []
    full, rows_full = _train(WORLD, *sets, log=logs.append)
    part = _shared_dir()
    stopped, started = [], []
    _train(WORLD, *sets, stop_after=STOP, run_dir=part, states=stopped)
    own = tempfile.mkdtemp(prefix="lp-ctl-own-")
    shutil.copy(f"{part}/checkpoint.h5", f"{own}/checkpoint.h5")
    shutil.copytree(f"{part}/checkpoint.parts", f"{own}/checkpoint.parts")
    single, rows_single = _train(MPI.COMM_SELF, *sets, resume=True, run_dir=own,
                                 states=started)
    shutil.rmtree(own, ignore_errors=True)
    for k in full:
        assert torch.allclose(full[k], single[k], rtol=1e-9, atol=1e-12), k
    assert [r["epoch"] for r in rows_single] == [2]  # (no metrics of epoch 1 there)
    for a, b in zip(rows_full[1:], rows_single):
        assert (a["grad_checks"], a["grad_actions"]) == (b["grad_checks"], b["grad_actions"])
    # the controller's state read on one rank as the ranks left it (its
    # measured errors to round-off: sums over other partitions)
    err = (started[0]["controller"].pop("last"), stopped[1]["controller"].pop("last"))
    assert started[0] == stopped[1] and started[0]["controller"]["actions"] >= 1
    assert err[0]["step"] == err[1]["step"]
    assert err[0]["error"] == pytest.approx(err[1]["error"], rel=1e-9)
