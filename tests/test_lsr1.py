"""layerpar.optim.LSR1: limited-memory SR1 in a trust region.

The pieces against independent computations: the trust-region step against
the optimality conditions of the subproblem (Nocedal & Wright, Theorem
4.1), the SR1 matrix built in coefficient space against the dense
recursion, the step in span{g, S, Y} against the dense subproblem; the
optimiser against a dense numpy L-SR1 trust-region iteration written
separately, against the minimiser of a convex quadratic (SR1's finite
termination), for rank invariance (COMM_WORLD against COMM_SELF), its
state (pairs and radius) through ``state_dict`` and checkpoints by
parameter name on any number of ranks, and training through ``Trainer``
and the command's configuration.  MPI tests run with 1, 2 and 4 ranks."""
import io
import math
import os
import shutil

import numpy as np
import pytest
import torch
from mpi4py import MPI

from layerpar.config import ConfigError, resolve
from layerpar.optim import LSR1, trust
from layerpar.optim.lsr1 import sr1_model, subspace_step, trust_region_step
from layerpar.training import Trainer

from test_optim import Quadratic, run_quadratic
from test_training import run_dirs, small_config, weights  # noqa: F401 (run_dirs: a fixture)

F64 = torch.float64
WORLD = MPI.COMM_WORLD
SELF = MPI.COMM_SELF


# ---------------------------------------------------------------------------
# the subproblem, the SR1 matrix, the subspace step (no MPI)
# ---------------------------------------------------------------------------
def kkt_violation(B, g, radius, p):
    """How far p is from the conditions that characterise the global
    minimiser of g.p + p.Bp/2 in |p| <= radius: for some sigma >= 0,
    (B + sigma I) p = -g, B + sigma I positive semi-definite and
    sigma (radius - |p|) = 0.  sigma is the least-squares value from the
    first condition (0 inside the ball)."""
    n = float(np.linalg.norm(p))
    if n < radius * (1 - 1e-9):
        sigma = 0.0
    else:
        sigma = -float(p @ (B @ p + g)) / n ** 2
    scale = max(1.0, float(np.abs(B).max()), float(np.linalg.norm(g)))
    return max(float(np.linalg.norm((B + sigma * np.eye(len(g))) @ p + g)) / scale,
               max(0.0, -sigma) / scale,
               max(0.0, -(float(np.linalg.eigvalsh(B)[0]) + sigma)) / scale,
               max(0.0, n - radius) / radius)


@pytest.mark.parametrize("kind", ["definite", "indefinite", "hard", "zero-curvature"])
def test_trust_region_step_satisfies_the_optimality_conditions(kind):
    rng = np.random.default_rng(3)
    worst, boundary = 0.0, 0
    for _ in range(100):
        n = int(rng.integers(1, 7))
        A = rng.normal(size=(n, n))
        B = A @ A.T + 0.1 * np.eye(n) if kind == "definite" else A + A.T
        if kind in ("indefinite", "hard"):  # a negative eigenvalue
            B -= max(0.0, np.linalg.eigvalsh(B)[0] + 0.5) * np.eye(n)
        if kind == "zero-curvature":
            B -= np.linalg.eigvalsh(B)[0] * np.eye(n)  # singular, positive semi-definite
        g = rng.normal(size=n)
        if kind == "hard":  # g orthogonal to the lowest eigenvector
            w = np.linalg.eigh(B)[1][:, 0]
            g -= w * (w @ g)
        radius = float(rng.uniform(0.05, 5.0))
        p = trust_region_step(B, g, radius)
        worst = max(worst, kkt_violation(B, g, radius, p))
        boundary += np.linalg.norm(p) > radius * (1 - 1e-9)
    assert worst < 1e-9, worst
    if kind != "definite":
        assert boundary == 100  # negative or zero curvature: always on the boundary


def dense_sr1(S, Y, skip_eps):
    """The SR1 recursion with explicit matrices, B0 = gamma I with gamma =
    s.y/s.s of the newest pair of positive curvature."""
    n = S.shape[1]
    gamma = 1.0
    for s, y in zip(S[::-1], Y[::-1]):
        if s @ y > 0:
            gamma = (s @ y) / (s @ s)
            break
    B, skipped = gamma * np.eye(n), 0
    for s, y in zip(S, Y):
        u = y - B @ s
        if np.linalg.norm(u) == 0 or abs(u @ s) < skip_eps * np.linalg.norm(u) * np.linalg.norm(s):
            skipped += 1
            continue
        B = B + np.outer(u, u) / (u @ s)
    return B, skipped


def gram(g, S, Y):
    V = np.vstack([g, S, Y])
    return V, V @ V.T


def test_sr1_matrix_in_coefficients_equals_the_dense_recursion():
    rng = np.random.default_rng(5)
    n, k = 9, 5
    S, Y, g = rng.normal(size=(k, n)), rng.normal(size=(k, n)), rng.normal(size=n)
    Y[4] = S[4] + 0.3 * Y[4]  # the newest pair has positive curvature: gamma is its
    gamma = (S[4] @ Y[4]) / (S[4] @ S[4])
    B3 = gamma * np.eye(n)
    for s, y in zip(S[:3], Y[:3]):
        B3 += np.outer(y - B3 @ s, y - B3 @ s) / ((y - B3 @ s) @ s)
    v = rng.normal(size=n)
    Y[3] = B3 @ S[3] + v - (v @ S[3]) / (S[3] @ S[3]) * S[3]  # u.s = 0: skipped
    V, G = gram(g, S, Y)
    gamma, us, cs, skipped = sr1_model(G, k, 1e-8)
    B = gamma * np.eye(n) + sum(np.outer(V.T @ u, V.T @ u) / c for u, c in zip(us, cs))
    want, want_skipped = dense_sr1(S, Y, 1e-8)
    assert skipped == want_skipped == 1
    assert np.abs(B - want).max() <= 1e-12 * np.abs(want).max()
    assert np.abs(B @ S[-1] - Y[-1]).max() <= 1e-12 * np.abs(Y[-1]).max()  # the secant condition


@pytest.mark.parametrize("radius", [1e-3, 0.3, 3.0, 1e3])
def test_step_in_the_span_equals_the_dense_subproblem(radius):
    rng = np.random.default_rng(7)
    n, k = 12, 4
    S, Y, g = rng.normal(size=(k, n)), rng.normal(size=(k, n)), rng.normal(size=n)
    V, G = gram(g, S, Y)
    gamma, us, cs, _ = sr1_model(G, k, 1e-8)
    coef, norm, predicted = subspace_step(G, gamma, us, cs, radius)
    p = V.T @ coef
    B, _ = dense_sr1(S, Y, 1e-8)
    want = trust_region_step(B, g, radius)
    model = lambda q: g @ q + 0.5 * q @ B @ q
    assert kkt_violation(B, g, radius, p) < 1e-9
    assert abs(model(p) - model(want)) <= 1e-10 * abs(model(want))
    assert math.isclose(norm, float(np.linalg.norm(p)), rel_tol=1e-10)
    assert math.isclose(predicted, -model(p), rel_tol=1e-10)


# ---------------------------------------------------------------------------
# the optimiser on a quadratic split over the ranks
# ---------------------------------------------------------------------------
def run_lsr1(comm, steps, cond=50.0, **opts):
    return run_quadratic(comm, steps, cond, optimizer=LSR1, **opts)


def reference_lsr1(f, grad, x, steps, *, history, radius, accept=trust.ACCEPT, skip_eps=1e-8):
    """The iteration in numpy with the dense matrix B of the kept pairs, the
    subproblem solved by ``kkt``-checked dense ``trust_region_step`` over all
    n variables, and the radius update written out (trust.update's
    constants, 10 epsilons of round-off added to both decreases)."""
    pairs, out = [], [x.copy()]
    for _ in range(steps):
        g = grad(x)
        if pairs:
            B, _ = dense_sr1(np.array([s for s, _ in pairs]), np.array([y for _, y in pairs]),
                             skip_eps)
        else:
            B = np.eye(len(x))
        p = trust_region_step(B, g, radius)
        predicted = -(g @ p + 0.5 * p @ B @ p)
        noise = 10 * np.finfo(np.float64).eps * max(1.0, abs(f(x)))
        rho = (f(x) - f(x + p) + noise) / (predicted + noise) if predicted > 0 else -math.inf
        pairs = (pairs + [(p, grad(x + p) - g)])[-history:]
        if rho >= accept:
            if rho >= trust.GROW_AT and np.linalg.norm(p) >= trust.BOUNDARY * radius:
                radius *= trust.GROW
            x = x + p
        else:
            radius *= trust.SHRINK
        out.append(x.copy())
    return out


@pytest.mark.mpi
def test_lsr1_iterates_equal_the_dense_reference():
    q, opt, got = run_lsr1(WORLD, 12, history=4, lr=0.5)
    A, b = q.A.numpy(), q.b.numpy()
    want = reference_lsr1(lambda z: 0.5 * z @ A @ z - b @ z, lambda z: A @ z - b,
                          q.x_start.numpy(), 12, history=4, radius=0.5)
    for k, (a, w) in enumerate(zip(got, want)):
        assert np.linalg.norm(a.numpy() - w) <= 1e-10 * np.linalg.norm(w), k
    assert opt.last_step["radius"] > 0


@pytest.mark.mpi
def test_lsr1_finds_the_minimiser_of_a_quadratic():
    # SR1 on a quadratic: B = A after n independent steps, then the unit
    # Newton step lands on the minimiser (the region has grown by then)
    q, opt, xs = run_lsr1(WORLD, 40, history=40, lr=1.0)
    xstar = q.minimiser()
    errors = [float((x - xstar).norm()) / float(xstar.norm()) for x in xs]
    # 28 variables: at the minimiser to round-off by iteration 35 (measured:
    # 1e-15 from iteration 30 on), and after that no step leaves the region
    # where f is flat to its round-off (|x - x*| ~ sqrt(eps |f| / lambda))
    assert min(errors[:36]) <= 1e-13, errors
    assert max(errors[30:]) <= 1e-7, errors
    values = [float(0.5 * x @ (q.A @ x) - q.b @ x) for x in xs]
    # accepted steps only: none rises by more than the round-off of f
    # that the ratio test allows (0.9 * 10 epsilons * |f|)
    assert all(b <= a + 1e-14 * max(1.0, abs(a)) for a, b in zip(values, values[1:]))


# Iterates on P ranks against one rank: 1e-10, looser than L-BFGS's 1e-12.
# An SR1 update divides by u.s, which the skip rule bounds only by 1e-8
# |u| |s|, so a pair with a small u.s amplifies the round-off of the sums'
# order (measured on 2 ranks: 5e-16 after 5 steps, then 9e-14 after the
# sixth pair, 3e-12 after 15 steps; on 4 ranks 3e-13).
RANKS_RTOL = 1e-10


@pytest.mark.mpi
def test_lsr1_iterates_independent_of_ranks():
    _, _, world = run_lsr1(WORLD, 15, history=5, lr=2.0)
    _, _, single = run_lsr1(SELF, 15, history=5, lr=2.0)
    for a, b in zip(world, single):
        assert float((a - b).norm()) <= RANKS_RTOL * float(b.norm())


@pytest.mark.mpi
def test_rejected_step_keeps_the_point_and_shrinks_the_radius():
    # a huge first radius: the model (B = I) overshoots a quadratic whose
    # curvature reaches 1e3, the trial is rejected; the pair is still kept
    q = Quadratic(WORLD, cond=1e3)
    opt = LSR1(q.params, WORLD, lr=1e3, history=3)
    x0 = q.x()
    opt.step(q.closure(opt))
    assert opt.last_step["status"] == "rejected" and opt.last_step["rejected"] == 1
    assert torch.equal(q.x(), x0)
    assert opt.param_groups[0]["radius"] == opt.last_step["radius"] == 1e3 * trust.SHRINK
    assert opt.last_step["pairs"] == 1
    closure = q.closure(opt)
    for _ in range(30):
        opt.step(closure)
    assert opt.last_step["accepted"] == 1 and opt.last_step["new_loss"] < opt.last_step["loss"]


@pytest.mark.mpi
def test_state_round_trip_and_pairs_move_from_one_rank_to_all_ranks():
    _, _, straight = run_lsr1(SELF, 10, history=3, lr=0.5)
    q1 = Quadratic(SELF)
    opt1 = LSR1(q1.params, SELF, history=3, lr=0.5)
    for _ in range(5):
        opt1.step(q1.closure(opt1))
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    q2 = Quadratic(SELF)
    q2.set_x(q1.x())
    opt2 = LSR1(q2.params, SELF, history=3, lr=0.5)
    opt2.load_state_dict(torch.load(buf))
    assert opt2.param_groups[0]["radius"] == opt1.param_groups[0]["radius"]
    for k in range(5):
        opt2.step(q2.closure(opt2))
        assert torch.equal(q2.x(), straight[6 + k])  # bitwise: the same operations
    # by parameter (block), onto every rank of WORLD, with the radius
    by_block = {i: {k: v.clone() for k, v in opt1.state[p].items()}
                for i, p in zip(q1.blocks, q1.params)}
    q = Quadratic(WORLD)
    q.set_x(q1.x())
    opt = LSR1(q.params, WORLD, history=3, lr=0.5)
    opt.param_groups[0]["radius"] = opt1.param_groups[0]["radius"]
    for i, p in zip(q.blocks, q.params):
        opt.state[p] = by_block[i]
    for k in range(5):
        opt.step(q.closure(opt))
        assert float((q.x() - straight[6 + k]).norm()) <= RANKS_RTOL * float(straight[6 + k].norm())


@pytest.mark.parametrize("opts,name", [
    ({"lr": 0.0}, "lr"), ({"lr": math.inf}, "lr"), ({"history": 0}, "history"),
    ({"max_iter": 0}, "max_iter"), ({"accept": 0.0}, "accept"), ({"accept": 1.0}, "accept"),
    ({"max_radius": 0.0}, "max_radius"), ({"max_radius": math.nan}, "max_radius"),
    ({"skip_eps": -1.0}, "skip_eps"), ({"grad_tol": -1.0}, "grad_tol"),
    ({"reuse_evaluation": 1}, "reuse_evaluation"),
])
def test_bad_options_are_refused_naming_them(opts, name):
    p = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match=f"^{name}="):
        LSR1([p], SELF, **opts)


# ---------------------------------------------------------------------------
# training through Trainer and the configuration
# ---------------------------------------------------------------------------
LSR1_SETS = {"optim.name": '"lsr1"', "model.bias": '"scalar"', "model.init_scale": 1e-3,
             "model.activation": '"smoothrelu"', "optim.tikhonov": 1e-7,
             "optim.tikhonov_ends": "true", "optim.epochs": 4}


def rows(t):
    return t.comm.bcast(t.metrics.rows(), root=0)


def assert_same(ta, tb, rtol):
    for a, b in zip(rows(ta), rows(tb)):
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert math.isclose(a[key], b[key], rel_tol=rtol, abs_tol=1e-14), key
    wa, wb = weights(ta), weights(tb)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=rtol, atol=1e-13), k


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["serial", "one-shot"])
def test_training_is_independent_of_ranks_and_resumes_on_one_rank(mode, run_dirs):
    sets = dict(LSR1_SETS, **{"mgrit.mode": f'"{mode}"'})
    cfg = small_config(run_dirs(), **sets)
    assert cfg["optim"]["lr"] == 1.0 and cfg["optim"]["schedule"] == "constant"
    world = Trainer(cfg, WORLD)
    world.run()
    single = Trainer(small_config(run_dirs(shared=False), **sets), SELF)
    single.run()
    assert_same(world, single, 1e-10)
    losses = [r["train_loss"] for r in rows(world)]
    assert losses[-1] < losses[0]
    # two epochs on every rank, the other two resumed on one rank: the
    # checkpoint holds the pairs (by parameter name) and the radius
    part = run_dirs()
    Trainer(small_config(part, **dict(sets, **{"optim.epochs": 2})), WORLD).run()
    WORLD.Barrier()
    if WORLD.rank == 0:
        own = os.path.join(run_dirs(shared=False), "run")
        shutil.copytree(part, own)
        resumed = Trainer(small_config(own, **sets), SELF)
        assert resumed.resume() and resumed.epoch == 2
        assert resumed.optimizer.param_groups[0]["radius"] > 0
        assert resumed.optimizer.state  # the pairs came back
        resumed.run()
        assert_same_local(resumed, single, 1e-10)
    WORLD.Barrier()


def assert_same_local(ta, tb, rtol):
    wa = {k: v.detach() for k, v in ta.net.named_parameters()}
    wb = {k: v.detach() for k, v in tb.net.named_parameters()}
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=rtol, atol=1e-13), k


@pytest.mark.parametrize("sets,key", [
    (['optim.name="lsr1"', 'optim.schedule="cosine"'], "optim.schedule"),
    (['optim.name="lsr1"', "optim.lr=0"], "optim.lr"),
    (['optim.name="lsr1"', "optim.lbfgs_history=0"], "optim.lbfgs_history"),
])
def test_bad_settings_are_refused_naming_the_key(sets, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve(None, sets)
