"""Multilevel training in-process: first-order coherence of the MG/OPT
coarse problem against serial autograd, the line search, a zero coarse
correction, rank invariance of nested iteration and MG/OPT, resumption on
another number of ranks, and the configuration checks."""
import json
import math
import os
import shutil
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from layerpar import DenseClosing, DenseOpening, DenseStep, Network
from layerpar.config import ConfigError, check_ranks, resolve
from layerpar.multilevel import Hierarchy, depths, epoch_budgets
from layerpar.optim import LBFGS
from layerpar.training import Trainer

WORLD = MPI.COMM_WORLD


def config(run_dir, method, **sets):
    overrides = ['mgrit.mode="serial"', "model.nlayers=8", "model.width=4", "optim.epochs=2",
                 "data.batch_size=500", 'data.dtype="float64"', "run.plot=false",
                 'optim.schedule="constant"', f'multilevel.method="{method}"',
                 f'run.dir="{run_dir}"']
    overrides += [f"{k}={v}" for k, v in sets.items()]
    return resolve(None, overrides)


@pytest.fixture
def run_dirs():
    """make(shared=True): a new directory, the same on every rank, or this
    rank's own; all removed after the test."""
    made = []

    def make(shared=True):
        if shared:
            d = WORLD.bcast(tempfile.mkdtemp(prefix="lp-ml-") if WORLD.rank == 0 else None, root=0)
        else:
            d = tempfile.mkdtemp(prefix="lp-ml-own-")
        made.append((d, shared))
        return d

    yield make
    WORLD.Barrier()
    for d, shared in made:
        if not shared or WORLD.rank == 0:
            shutil.rmtree(d, ignore_errors=True)


def first_batch(trainer):
    x, y = next(iter(trainer.train_loader.epoch(0)))
    return x, y, trainer.train_loader.batch_size


def everywhere(trainer, x, y):
    """The batch on every rank: inputs from the first rank, labels from the last."""
    comm = trainer.comm
    return comm.bcast(x, root=0), comm.bcast(y, root=comm.Get_size() - 1)


def gathered(level, what):
    """{("layer", n, name) | (section, name): tensor} of all ranks, of the
    parameters (what="data") or their gradients (what="grad")."""
    mine = {}
    p = level.params()
    for n, d in p["layers"].items():
        for k, t in d.items():
            mine[("layer", n, k)] = (t.detach() if what == "data" else t.grad).clone()
    for sec in ("opening", "closing"):
        for k, t in p[sec].items():
            mine[(sec, k)] = (t.detach() if what == "data" else t.grad).clone()
    out = {}
    for part in level.comm.allgather(mine):
        out.update(part)
    return out


def serial_gradient(level, x, y):
    """Gradient of the level's loss by plain autograd through the gathered
    serial network: {("layer", n, name) | (section, name): tensor}."""
    seq = level.net.serial_equivalent()
    loss = Fn.cross_entropy(seq(x), y)
    names = list(seq.named_parameters())
    grads = torch.autograd.grad(loss, [p for _, p in names])
    out = {}
    for (name, _), g in zip(names, grads):
        i, rest = name.split(".", 1)
        i = int(i)
        if i == 0:
            out[("opening", rest)] = g
        elif i == len(seq) - 1:
            out[("closing", rest)] = g
        else:
            out[("layer", i - 1, rest.split(".", 1)[1])] = g  # ResidualLayer.F.<name>
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("restrict", ["injection", "full-weighting"])
def test_coarse_gradient_is_restricted_fine_gradient(restrict, run_dirs):
    # the corrected coarse gradient at R x_h equals P^T grad f_h(x_h), with
    # P^T (constant prolongation) summing the r fine layers of a coarse layer
    cfg = config(run_dirs(), "mgopt", **{"multilevel.restrict": f'"{restrict}"',
                                         "optim.name": '"sgd"', "optim.lr": 0.5})
    ml = Trainer(cfg, WORLD)
    x, y, size = first_batch(ml)
    fine, coarse = ml.levels
    fine.steps(2, [(x, y, size)])  # away from the initial weights
    xa, ya = everywhere(ml, x, y)
    g_h = serial_gradient(fine, xa, ya)
    ml.method.coarse_problem(0, x, y)
    coarse.loss_and_grad(x, y)
    g_H = gathered(coarse, "grad")
    r = fine.nlayers // coarse.nlayers
    assert r == 2
    worst = 0.0
    for key, g in g_H.items():
        if key[0] == "layer":
            want = sum(g_h[("layer", r * key[1] + i, key[2])] for i in range(r))
        else:
            want = g_h[key]
        worst = max(worst, float((g - want).abs().max()))
    print(f"\ncoherence: max abs difference {worst:.1e}")
    assert worst < 1e-12, worst
    # and the coarse weights are the restricted fine weights
    w_h, w_H = gathered(fine, "data"), gathered(coarse, "data")
    for key, w in w_H.items():
        if key[0] != "layer":
            assert torch.equal(w, w_h[key])
        elif restrict == "injection":
            assert torch.equal(w, w_h[("layer", r * key[1], key[2])])
        else:
            want = sum(w_h[("layer", r * key[1] + i, key[2])] for i in range(r)) / r
            assert torch.allclose(w, want, rtol=0, atol=1e-15)


@pytest.mark.mpi
def test_zero_coarse_correction_leaves_weights(run_dirs):
    cfg = config(run_dirs(), "mgopt", **{"multilevel.pre_steps": 0, "multilevel.post_steps": 0,
                                         "multilevel.coarse_steps": 0})
    ml = Trainer(cfg, WORLD)
    x, y, size = first_batch(ml)
    before = gathered(ml.level, "data")
    ml.method.v_cycle(x, y, size)
    after = gathered(ml.level, "data")
    assert ml.method.last_cycle["alpha"] == 0.0  # P(x_H - x_H0) = 0 decreases nothing: rejected
    for k in before:
        assert torch.equal(before[k], after[k]), k


@pytest.mark.mpi
@pytest.mark.parametrize("levels", [2, 3])
def test_line_search_never_increases_the_fine_loss(levels, run_dirs):
    # large coarse steps: some corrections overshoot and must be shortened
    # or rejected; the fine objective after the correction (evaluated anew)
    # is never above the one before
    cfg = config(run_dirs(), "mgopt", **{"multilevel.pre_steps": 0, "multilevel.post_steps": 0,
                                         "multilevel.coarse_steps": 3, "multilevel.levels": levels,
                                         "model.nlayers": 4 * 2 ** (levels - 1),
                                         "optim.name": '"sgd"', "optim.lr": 20.0,
                                         "optim.momentum": 0.0})
    ml = Trainer(cfg, WORLD)
    alphas = []
    for b, (x, y) in enumerate(ml.train_loader.epoch(0)):
        ml.method.v_cycle(x, y, 500)
        c = ml.method.last_cycle
        f = ml.level.loss(x, y)
        assert f <= c["f_before"], (b, f, c)
        assert math.isclose(f, c["f_after"], rel_tol=1e-12), (f, c)
        alphas.append(c["alpha"])
    assert alphas and all(a in (0.0, 1.0, 0.5, 0.25, 0.125) for a in alphas)


def rows_and_weights(trainer):
    rows = trainer.comm.bcast(trainer.metrics.rows(), root=0)
    return rows, gathered(trainer.level, "data")


def assert_same_run(a, b, tol):
    rows_a, w_a = a
    rows_b, w_b = b
    assert len(rows_a) == len(rows_b) > 0
    for ra, rb in zip(rows_a, rows_b):
        assert ra["nlayers"] == rb["nlayers"] and ra["level"] == rb["level"]
        assert ra["fwd_work"] == rb["fwd_work"] and ra["bwd_work"] == rb["bwd_work"]
        for key in ("train_loss", "val_loss", "train_acc", "val_acc", "accepted"):
            assert math.isclose(ra[key], rb[key], rel_tol=tol, abs_tol=tol), (key, ra, rb)
    assert w_a.keys() == w_b.keys()
    for k in w_a:
        assert torch.allclose(w_a[k], w_b[k], rtol=tol, atol=tol), k


METHODS = [("nested", {"multilevel.epochs_per_level": "[1, 2]", "multilevel.prolong": '"linear"'}),
           ("mgopt", {"optim.name": '"sgd"', "optim.lr": 0.5}),
           ("mgopt", {"optim.name": '"adam"', "multilevel.levels": 3, "model.nlayers": 16,
                      "multilevel.restrict": '"full-weighting"'}),
           ("mgopt", {"optim.name": '"lbfgs"', "optim.lr": 1.0, "multilevel.prolong": '"linear"'}),
           ("nested", {"optim.name": '"sgd"', "optim.lr": 0.5, "optim.momentum": 0.9})]


@pytest.mark.mpi
@pytest.mark.parametrize("method,sets", METHODS)
def test_same_result_on_any_number_of_ranks(method, sets, run_dirs):
    world = Trainer(config(run_dirs(), method, **sets), WORLD)
    world.run()
    single = Trainer(config(run_dirs(shared=False), method, **sets), MPI.COMM_SELF)
    single.run()
    assert_same_run(rows_and_weights(world), rows_and_weights(single), 1e-10)


@pytest.mark.mpi
# on 4 ranks the inexact passes are those of one rank (tests/test_layerpar_parallel.py)
@pytest.mark.max_ranks(2, invariance="test_training_losses_independent_of_ranks")
@pytest.mark.parametrize("method", ["nested", "mgopt"])
@pytest.mark.parametrize("mode", ["layer-parallel", "one-shot"])
def test_parallel_modes_train(method, mode, run_dirs):
    # inexact MGRIT passes: the run goes through and the loss decreases
    ml = Trainer(config(run_dirs(), method, **{"mgrit.mode": f'"{mode}"',
                                                         "mgrit.max_levels": 2,
                                                         "mgrit.cfactor": 2}), WORLD)
    ml.run()
    rows = WORLD.bcast(ml.metrics.rows(), root=0)
    losses = [r["train_loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert rows[-1]["fwd_work"] > 0 and rows[-1]["bwd_work"] > 0


@pytest.mark.mpi
@pytest.mark.parametrize("method,sets", METHODS[:2])
def test_resume_on_another_number_of_ranks(method, sets, run_dirs):
    # interrupted after the first epoch on every rank of WORLD, resumed on one
    # rank (each rank its own copy) = the uninterrupted run on one rank
    part, own = run_dirs(), run_dirs(shared=False)
    first = dict(sets, **{"optim.epochs": 1})
    done = 1
    if method == "nested":  # the first depth, then one of the two epochs of the second
        first["multilevel.epochs_per_level"] = "[1, 1]"
        done = 2
    Trainer(config(part, method, **first), WORLD).run()
    WORLD.Barrier()
    shutil.copy(f"{part}/checkpoint.h5", f"{own}/checkpoint.h5")
    shutil.copytree(f"{part}/checkpoint.parts", f"{own}/checkpoint.parts")  # its parts
    shutil.copy(f"{part}/metrics.h5", f"{own}/metrics.h5")
    shutil.copy(f"{part}/metrics.csv", f"{own}/metrics.csv")
    resumed = Trainer(config(own, method, **sets), MPI.COMM_SELF)
    assert resumed.resume()
    assert resumed.epoch == done
    resumed.run()
    full = Trainer(config(run_dirs(shared=False), method, **sets), MPI.COMM_SELF)
    full.run()
    assert_same_run(rows_and_weights(full), rows_and_weights(resumed), 1e-12)


@pytest.mark.mpi
def test_work_counts_every_solve(run_dirs):
    # serial propagation: a solve of a network of n layers takes n layer steps;
    # one cycle = fine: pre step, gradient, line-search trials, post step;
    # coarse: gradient at R x_h and the coarse steps
    cfg = config(run_dirs(), "mgopt", **{"multilevel.coarse_steps": 2})
    ml = Trainer(cfg, WORLD)
    x, y, size = first_batch(ml)
    ml.method.v_cycle(x, y, size)
    alpha = ml.method.last_cycle["alpha"]
    trials = 4 if alpha == 0 else 1 + round(-math.log2(alpha))
    fine, coarse = (lev.work_totals() for lev in ml.levels)
    assert fine == {"fwd": 8 * (3 + trials), "bwd": 8 * 3}
    assert coarse == {"fwd": 4 * 3, "bwd": 4 * 3}
    cols = ml.method.work_columns()
    assert cols["fwd_work"] == fine["fwd"] + coarse["fwd"]
    assert cols["fwd_work_l1"] == fine["fwd"] and cols["bwd_work_l0"] == coarse["bwd"]


@pytest.mark.mpi
def test_nested_target_accuracy_and_optimizer_state(run_dirs):
    # a target reached at once: one epoch per coarser depth; the Adam state
    # of fine layer k is that of coarse layer k // 2, moments scaled by 1/2
    # and 1/4 (the gradient of a layer is proportional to h)
    cfg = config(run_dirs(), "nested", **{"multilevel.levels": 3, "model.nlayers": 16,
                                          "multilevel.target_accuracy": 0.01,
                                          "multilevel.epochs_per_level": "[3, 3, 1]"})
    ml = Trainer(cfg, WORLD)
    seen = []
    refine = ml.method.refine

    def spy():
        old = ml.level
        w = gathered(old, "data")
        st = {}
        for n, d in old.params()["layers"].items():
            for k, p in d.items():
                st[(n, k)] = {s: v.clone() for s, v in old.optimizer.state[p].items()}
        st = {k: v for part in old.comm.allgather(st) for k, v in part.items()}
        done = refine()
        new = ml.level
        for n, d in new.params()["layers"].items():
            for k, p in d.items():
                assert torch.equal(p.detach(), w[("layer", n // 2, k)])
                s_new, s_old = new.optimizer.state[p], st[(n // 2, k)]
                assert torch.equal(s_new["step"], s_old["step"])
                assert torch.allclose(s_new["exp_avg"], s_old["exp_avg"] / 2, rtol=0, atol=0)
                assert torch.allclose(s_new["exp_avg_sq"], s_old["exp_avg_sq"] / 4, rtol=0,
                                      atol=0)
        seen.append(new.nlayers)
        return done

    ml.method.refine = spy
    ml.run()
    rows = WORLD.bcast(ml.metrics.rows(), root=0)
    assert seen == [8, 16]
    assert [r["nlayers"] for r in rows] == [4, 8, 16]
    assert [r["level"] for r in rows] == [0, 1, 2]


# ---- checkpoints of the first layout (MultilevelTrainer's) ------------------------------
CONTROLLER_COLUMNS = {"grad_checks", "grad_error", "grad_cosine", "grad_actions",
                      "exact_steps", "check_work"}
FIRST_LAYOUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "multilevel_v1")


@pytest.mark.mpi
@pytest.mark.parametrize("case", ["nested-boundary", "nested-mid", "mgopt-one-shot"])
def test_checkpoint_written_mid_run_by_the_first_layout_resumes(case, run_dirs):
    # written on 2 ranks by MultilevelTrainer (tests/data/multilevel_v1): a
    # nested run stopped before refining and one in the middle of its second
    # depth, an MG/OPT one-shot run with warm states; resumed here on any
    # number of ranks, they end where that code's resumed run ended (on 2
    # ranks bit for bit)
    src = os.path.join(FIRST_LAYOUT, case)
    with open(os.path.join(src, "expected.json")) as fh:
        want = json.load(fh)
    run = run_dirs()
    if WORLD.rank == 0:
        shutil.copy(os.path.join(src, "checkpoint.h5"), run)
        shutil.copytree(os.path.join(src, "checkpoint.parts"),
                        os.path.join(run, "checkpoint.parts"))
    WORLD.Barrier()
    trainer = Trainer(resolve(None, want["settings"] + [f'run.dir="{run}"']), WORLD)
    assert trainer.resume()
    assert {"epoch": trainer.epoch, "step": trainer.step} == want["stopped_at"]
    trainer.run()
    rows = WORLD.bcast(trainer.metrics.rows(), root=0)
    expected = [r for r in want["rows"] if r["epoch"] > want["stopped_at"]["epoch"]]
    exact = WORLD.size == want["ranks"]
    tol = 0.0 if exact else 1e-11
    assert len(rows) == len(expected) > 0
    for got, ref in zip(rows, expected):
        # the gradient-accuracy controller's columns came after that layout
        assert set(got) - {"wall_time"} - CONTROLLER_COLUMNS == set(ref), (got, ref)
        for key, v in ref.items():
            if not exact and (key == "virtual_time" or key.endswith("_work")):
                continue  # the modelled time and the layer steps of P ranks' solves
            if isinstance(v, float):
                assert math.isclose(got[key], v, rel_tol=tol, abs_tol=tol), (key, got, ref)
            else:
                assert got[key] == v, (key, got, ref)
    weights = gathered(trainer.level, "data")
    names = {("layer", n, k): f"layer.{n}.{k}" for (_, n, k) in
             (key for key in weights if key[0] == "layer")}
    names.update({key: f"{key[0]}.{key[1]}" for key in weights if key[0] != "layer"})
    assert sorted(names.values()) == sorted(want["weights"])
    for key, name in names.items():
        ref = torch.tensor(want["weights"][name], dtype=torch.float64)
        got = weights[key].reshape(-1)
        if exact:
            assert torch.equal(got, ref), name
        else:
            assert torch.allclose(got, ref, rtol=1e-11, atol=1e-12), name
    trainer.close()


# ---- the hierarchy: optimiser state between depths ---------------------------------------
WIDTH, T = 3, 2.0


def dense_level(nlayers, make_opt):
    """A level as the hierarchy sees one: a network and its optimiser."""
    net = Network(lambda: DenseOpening(2, WIDTH), lambda n: DenseStep(WIDTH, "tanh"),
                  lambda: DenseClosing(WIDTH, 3), nlayers=nlayers, T=T, comm=WORLD,
                  seed=11).double()
    return SimpleNamespace(net=net, optimizer=make_opt(net.parameters()))


def train_level(level, steps=3):
    g = torch.Generator().manual_seed(4)
    net, opt = level.net, level.optimizer
    for _ in range(steps):
        x = torch.randn(5, 2, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (5,), generator=g)

        def closure():
            opt.zero_grad()
            loss = net.loss(x if net.is_first else None, y if net.is_last else None,
                            Fn.cross_entropy)
            loss.backward()
            return net.reduce(loss)
        opt.step(closure)


def layer_states(level):
    """{layer: {param name: {key: state}}} of every layer, on every rank."""
    opt = level.optimizer
    mine = {n: {k: {s: v.clone() for s, v in opt.state.get(p, {}).items()}
                for k, p in e.items()}
            for n, e in level.net.body.params_by_layer().items()}
    return {n: e for part in WORLD.allgather(mine) for n, e in part.items()}


def end_states(level):
    return [{k: dict(level.optimizer.state.get(p, {})) for k, p in m.named_parameters()}
            if m is not None else None for m in (level.net.opening, level.net.closing)]


SCALE = {"exp_avg": 0.5, "momentum_buffer": 0.5, "exp_avg_sq": 0.25, "step": 1.0}


@pytest.mark.mpi
@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.Adam(ps, lr=0.01),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
], ids=["adam", "sgd-momentum"])
def test_optimizer_state_moves_with_its_parameter(make_opt):
    # fine layer k takes coarse layer k // 2's state, gradient-like state
    # halved (a layer's gradient is proportional to h), second moments
    # quartered, step counts copied; the ends keep theirs.  Restricting back
    # by injection (after a linear prolongation: fine layer 2j is coarse
    # layer j) returns the coarse state bit for bit
    N = max(3, WORLD.size)
    coarse, fine, back = (dense_level(n, make_opt) for n in (N, 2 * N, N))
    train_level(coarse)
    ref = layer_states(coarse)
    hierarchy = Hierarchy(WORLD, [N, 2 * N], prolong="constant")
    hierarchy.prolong_level(coarse, fine)
    hierarchy.move_optimizer_state(coarse, fine)
    got = layer_states(fine)
    assert sorted(got) == list(range(2 * N))
    for k, entry in got.items():
        for name, st in entry.items():
            want = ref[k // 2][name]
            assert set(st) == set(want)
            for key, v in want.items():
                assert torch.equal(st[key], v * SCALE[key]), (k, name, key)
    for g, w in zip(end_states(fine), end_states(coarse)):
        if w is not None:
            assert all(torch.equal(g[n][key], w[n][key]) for n in w for key in w[n])
    train_level(fine, steps=1)  # training goes on with the moved state
    hierarchy.close()
    linear = Hierarchy(WORLD, [N, 2 * N], prolong="linear", restrict="injection")
    fine2 = dense_level(2 * N, make_opt)
    linear.prolong_level(coarse, fine2)
    linear.move_optimizer_state(coarse, fine2)
    linear.restrict_level(fine2, back)
    linear.move_optimizer_state(fine2, back)
    now = layer_states(back)
    for n in ref:
        for name in ref[n]:
            for key, v in ref[n][name].items():
                assert torch.equal(now[n][name][key], v), (n, name, key)
    for g, w in zip(end_states(back), end_states(coarse)):
        if w is not None:
            assert all(torch.equal(g[n][key], w[n][key]) for n in w for key in w[n])
    linear.close()
    for lev in (coarse, fine, back, fine2):
        lev.net.close()


@pytest.mark.mpi
def test_lbfgs_history_is_not_moved_and_bad_arguments_fail_everywhere():
    N = max(3, WORLD.size)
    lbfgs = lambda ps: LBFGS(list(ps), WORLD, history=3)
    coarse, fine = dense_level(N, lbfgs), dense_level(2 * N, lbfgs)
    train_level(coarse, steps=2)
    assert WORLD.allreduce(len(coarse.optimizer.state)) > 0
    hierarchy = Hierarchy(WORLD, [N, 2 * N])
    hierarchy.move_optimizer_state(coarse, fine)
    assert len(fine.optimizer.state) == 0  # a fresh history at the new depth
    # an optimiser that does not hold the destination's parameters (on the
    # last rank only): every rank raises
    if WORLD.rank == WORLD.size - 1:
        fine.optimizer = torch.optim.SGD(coarse.net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not optimise the parameter"):
        hierarchy.move_optimizer_state(coarse, fine)
    hierarchy.close()
    with pytest.raises(ValueError, match="prolong='cubic'"):
        Hierarchy(WORLD, [N, 2 * N], prolong="cubic")
    with pytest.raises(ValueError, match="restrict='constant'"):
        Hierarchy(WORLD, [N, 2 * N], restrict="constant")
    with pytest.raises(ValueError, match="each depth must divide the next"):
        Hierarchy(WORLD, [N, 2 * N + 1])
    with pytest.raises(TypeError, match="comm"):
        Hierarchy(None, [N, 2 * N])
    coarse.net.close()
    fine.net.close()


@pytest.mark.mpi
def test_a_multilevel_checkpoint_is_evaluated_like_any(run_dirs):
    # what `layerpar eval` does with the checkpoint of an MG/OPT run: a
    # trainer without metrics resumes it and evaluates a split through
    # loader(); the exact network's validation loss is the training's last
    from layerpar.training import make_trainer
    run = run_dirs()
    sets = {"optim.name": '"sgd"', "optim.lr": 0.5, "optim.epochs": 1,
            "data.batch_size": 2500}
    trained = make_trainer(config(run, "mgopt", **sets), WORLD)
    summary = trained.run()
    trained.close()
    evaluator = make_trainer(config(run, "mgopt", **sets), WORLD, metrics=False)
    assert evaluator.resume(os.path.join(run, "checkpoint.h5"))
    loader = evaluator.loader(evaluator.data.val, batch_size=1000)
    loss, acc = evaluator.evaluate(loader)
    assert (loss, acc) == (summary["val_loss"], summary["val_acc"])
    evaluator.close()


# ---- configuration --------------------------------------------------------------------

def test_depth_schedule_and_budgets():
    cfg = resolve(None, ['multilevel.method="nested"', "model.nlayers=24", "multilevel.levels=3",
                         "multilevel.factor=2", "multilevel.epochs_per_level=[3, 2, 1]"])
    assert depths(cfg) == [6, 12, 24]
    assert epoch_budgets(cfg) == [3, 2, 1]
    cfg = resolve(None, ['multilevel.method="nested"', "multilevel.epochs_per_level=4"])
    assert epoch_budgets(cfg) == [4, 4]


@pytest.mark.parametrize("setting,named", [
    (["multilevel.levels=0"], "multilevel.levels"),
    (["multilevel.factor=1"], "multilevel.factor"),
    (["multilevel.target_accuracy=1.5"], "multilevel.target_accuracy"),
    (["multilevel.target_accuracy=-0.1"], "multilevel.target_accuracy"),
    (['multilevel.method="vcycle"'], "multilevel.method"),
    (['multilevel.prolong="cubic"'], "multilevel.prolong"),
    (['multilevel.restrict="average"'], "multilevel.restrict"),
    (["multilevel.epochs_per_level=[1, 2, 3]"], "multilevel.epochs_per_level"),
    (["multilevel.line_search_steps=0"], "multilevel.line_search_steps"),
    (['multilevel.method="mgopt"', "model.nlayers=30", "multilevel.levels=3"], "model.nlayers"),
])
def test_bad_multilevel_settings_name_the_key(setting, named):
    with pytest.raises(ConfigError) as e:
        resolve(None, setting)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_more_ranks_than_coarsest_layers_refused():
    cfg = resolve(None, ['multilevel.method="mgopt"', "model.nlayers=8", "multilevel.levels=3"])
    check_ranks(cfg, 2)
    with pytest.raises(ConfigError, match="multilevel.levels"):
        check_ranks(cfg, 3)


# ---- the command line -------------------------------------------------------------------
# (both methods trained by the command, layer-parallel on 2 ranks, with the
# depths and the work of each epoch: docs/tutorials/multilevel.md, run by
# tests/test_examples.py)

@pytest.mark.mpi
@pytest.mark.parametrize("setting,named", [
    (["multilevel.levels=0"], "multilevel.levels"),
    (["model.nlayers=6", "multilevel.levels=3"], "model.nlayers"),
    (["multilevel.target_accuracy=2"], "multilevel.target_accuracy"),
    (["multilevel.levels=4"], "multilevel.levels"),  # a coarsest network of 1 layer on 2 ranks
])
def test_command_line_refuses_bad_settings_in_one_line(tmp_path_factory, setting, named):
    # the command in this process, on the session's ranks
    from test_cli import command, error_line, shared_dir
    if setting == ["multilevel.levels=4"] and WORLD.size < 2:
        pytest.skip("a coarsest network of 1 layer is refused on 2 ranks or more")
    args = ["train", "--run-dir", os.path.join(shared_dir(tmp_path_factory, "refused"), "run"),
            "--set", "model.nlayers=8", "--set", "model.width=4", "--set", "run.plot=false",
            "--set", 'mgrit.mode="serial"', "--set", "data.batch_size=500",
            "--set", "optim.epochs=2", "--set", 'multilevel.method="mgopt"', "-q"]
    for s in setting:
        args += ["--set", s]
    r = command(*args)
    assert r.status != 0
    assert named in error_line(r)


ONE_SHOT = {"mgrit.mode": '"one-shot"', "mgrit.max_levels": 2, "mgrit.cfactor": 2}


@pytest.mark.mpi
# a stop on one rank of several and its resume; results across rank counts:
@pytest.mark.max_ranks(2, invariance="test_same_result_on_any_number_of_ranks, "
                       "test_resume_on_another_number_of_ranks")
@pytest.mark.parametrize("method,sets", METHODS[:2] + [
    ("nested", dict(METHODS[0][1], **ONE_SHOT)), ("mgopt", dict(METHODS[1][1], **ONE_SHOT)),
    ("nested", dict(METHODS[0][1], **ONE_SHOT, **{"parallel.data": 2})),
    ("mgopt", dict(METHODS[1][1], **ONE_SHOT, **{"parallel.data": 2}))])
def test_stop_request_on_one_rank_stops_all_and_resumes(method, sets, run_dirs):
    # should_stop() true on the last rank only, after its third question:
    # every rank stops after the same step with a checkpoint, and the resumed
    # run ends where the uninterrupted one does (one-shot: every level's warm
    # MGRIT states are in the checkpoint, or the resumed solves start cold;
    # on a grid of several groups, every group's own states)
    if WORLD.size % sets.get("parallel.data", 1):
        pytest.skip("a grid of 2 groups needs an even number of ranks")
    asked = []

    def should_stop():
        asked.append(1)
        return WORLD.rank == WORLD.size - 1 and len(asked) >= 3

    part = run_dirs()
    stopped = Trainer(config(part, method, **sets), WORLD, should_stop=should_stop)
    summary = stopped.run()
    assert summary.get("stopped") and stopped.step == 3
    assert WORLD.allgather(stopped.step) == [3] * WORLD.size
    stopped.close()
    resumed = Trainer(config(part, method, **sets), WORLD)
    assert resumed.resume() and resumed.step == 3
    resumed.run()
    full = Trainer(config(run_dirs(), method, **sets), WORLD)
    full.run()
    assert_same_run(rows_and_weights(full), rows_and_weights(resumed), 1e-12)
    resumed.close()
    full.close()


GRID_METHODS = [("nested", {"optim.name": '"adam"', "multilevel.epochs_per_level": "[1, 1]"}),
                ("mgopt", {"optim.name": '"sgd"', "optim.lr": 0.5, "optim.epochs": 1})]


@pytest.mark.mpi
@pytest.mark.parametrize("data", [2, 4])
@pytest.mark.parametrize("method,sets", GRID_METHODS)
def test_grid_shapes_train_like_one_rank(method, sets, data, run_dirs):
    # D groups of P/D layer-parallel ranks, each on its share of every batch,
    # gradients averaged over the groups: the weights and the losses of the
    # run on one rank (exact propagation)
    P = WORLD.Get_size()
    if P % data:
        pytest.skip(f"a grid of {data} groups needs a multiple of {data} ranks")
    sets = dict(sets, **{"parallel.data": data, "data.batch_size": 250})
    grid = Trainer(config(run_dirs(), method, **sets), WORLD)
    assert grid.grid.shape == (data, P // data)
    grid.run()
    rows = WORLD.bcast(grid.metrics.rows(), root=0)
    weights = gathered(grid.level, "data")
    single = Trainer(config(run_dirs(shared=False), method,
                                      **dict(sets, **{"parallel.data": 1})), MPI.COMM_SELF)
    single.run()
    ref_rows, ref_weights = single.metrics.rows(), gathered(single.level, "data")
    assert len(rows) == len(ref_rows) > 0
    for r, ref in zip(rows, ref_rows):
        assert r["nlayers"] == ref["nlayers"]
        for key in ("train_loss", "val_loss", "train_acc", "val_acc", "accepted"):
            assert math.isclose(r[key], ref[key], rel_tol=1e-10, abs_tol=1e-12), (key, r, ref)
    assert weights.keys() == ref_weights.keys()
    for k in weights:
        assert torch.allclose(weights[k], ref_weights[k], rtol=1e-10, atol=1e-12), k
    # every group holds the same weights
    assert all(torch.equal(weights[k], w[k]) for w in WORLD.allgather(weights) for k in w)
    grid.close()
    single.close()
