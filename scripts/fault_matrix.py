#!/usr/bin/env python
"""Fault injection matrix: an exception on one chosen rank at a chosen call,
for every solver callback kind, for the forward and backward solves of
LayerParallel and for a training step, on P = 1, 2, 4 ranks.

A case passes when every rank leaves with a clear error (the original
exception where it was raised, an error naming that rank everywhere else)
and the same operation afterwards, with the fault removed, works on every
rank.  The rank's time from the start of the failing call to its exception
is recorded; the largest per case is the case's exit time.  A job that does
not finish within --job-timeout seconds counts its remaining cases as hung.

    python scripts/fault_matrix.py --ranks 1 2 4 --csv fault_matrix.csv

Writes one CSV row per case (ranks, target, kind, fail_rank, at, passed,
max_exit_s, detail) and prints the counts: cases, passed, max exit time.
A "loss" case (the loss raises on the last rank only, outside any solve, so
the other ranks wait for it, before or in the backward solve) runs in a job
of its own with a timeout (LAYERPAR_TIMEOUT) and passes when every rank
ends with a clear error and the job ends; its second attempt is not possible (the job
aborts, as it must after a timeout).
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CALLBACKS = ["step", "init", "clone", "sum", "norm", "bufsize", "bufpack", "bufunpack",
             "access"]


# ---------------------------------------------------------------------------
# the worker: runs inside mpiexec

class Injected(RuntimeError):
    """The injected fault."""


def solver_cases(size):
    cases = []
    for kind in CALLBACKS:
        if kind in ("bufpack", "bufunpack") and size == 1:
            continue  # no messages on one rank
        senders = range(0, size - 1) if kind == "bufpack" else \
            range(1, size) if kind == "bufunpack" else range(size)
        for rank in sorted({senders[0], senders[-1]}):
            for at in ((0, 1) if kind == "step" else (1, 3)):
                if kind == "bufsize" and at > 1:
                    continue  # called once per solve
                cases.append(("solver", kind, rank, at))
    return cases


def network_cases(size):
    cases = []
    for target in ("forward", "backward", "train-forward", "train-backward"):
        for rank in sorted({0, size - 1}):
            for at in (1, 3):
                cases.append((target, "layer", rank, at))
    return cases


def make_faulty_app(kind, fail_rank, at, rank):
    import numpy as np
    from braid_ext.examples.dahlquist import Dahlquist

    class Faulty(Dahlquist):
        armed = True
        calls = 0

        def hit(self, name, status=None):
            if not self.armed or name != kind or rank != fail_rank:
                return
            if name == "step":
                if status.level != 0 or status.iter != at:
                    return
            else:
                self.calls += 1
                if self.calls != at:
                    return
            self.armed = False
            raise Injected(f"injected fault in {name} on rank {rank}")

        def step(self, u, status):
            self.hit("step", status)
            return super().step(u, status)

        def init(self, t, index):
            self.hit("init")
            return super().init(t, index)

        def clone(self, u):
            self.hit("clone")
            return super().clone(u)

        def sum(self, a, x, b, y):
            self.hit("sum")
            return super().sum(a, x, b, y)

        def norm(self, u):
            self.hit("norm")
            return super().norm(u)

        def bufsize(self):
            self.hit("bufsize")
            return super().bufsize()

        def pack(self, u, buf):
            self.hit("bufpack")
            super().pack(u, buf)

        def unpack(self, buf):
            self.hit("bufunpack")
            return super().unpack(buf)

        def access(self, u, status):
            self.hit("access")

    del np
    return Faulty(lam=-1.0)


def run_solver_case(comm, case):
    from braid_ext import Solver
    _, kind, fail_rank, at = case
    app = make_faulty_app(kind, fail_rank, at, comm.rank)
    with Solver(app, comm, 0.0, 1.0, 64, max_levels=3, cfactor=2, relax="FCF",
                abs_tol=1e-12) as solver:
        first = attempt(solver.solve)
        app.armed = False
        second = attempt(solver.solve)
    return first, second


class Arm:
    """Where the layer fault fires: target ('forward' or 'backward'), rank,
    and the how-many-th call of a layer on that rank."""
    target = None
    rank = -1
    left = 0


def fire(rank, target):
    if Arm.target == target and Arm.rank == rank and Arm.left > 0:
        Arm.left -= 1
        if Arm.left == 0:
            Arm.target = None
            raise Injected(f"injected fault in a layer's {target} on rank {rank}")


def make_layer(rank):
    import torch
    from torch import nn

    class RaiseInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            fire(rank, "backward")
            return g

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, u):
            fire(rank, "forward")
            return RaiseInBackward.apply(torch.tanh(self.lin(u)))

    return Layer().double()


def run_network_case(comm, case):
    import torch
    from torch import nn
    from layerpar import Network
    target, _, fail_rank, at = case
    torch.manual_seed(0)
    x = torch.randn(4, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    with Network(lambda: nn.Linear(2, 3).double(), lambda n: make_layer(comm.rank),
                 lambda: nn.Linear(3, 2).double(), nlayers=4 * comm.size, T=1.0, comm=comm,
                 max_levels=2, cfactor=2, fwd_iters=2, bwd_iters=1) as net:
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)

        def op():
            if target.startswith("train"):
                opt.zero_grad()
                loss = net.loss(x, y, nn.functional.cross_entropy)
                loss.backward()
                opt.step()
                return net.reduce(loss)
            if target == "forward":
                with torch.no_grad():
                    out = net(x)
                return net.reduce(out.sum()) if net.is_last else net.reduce(None)
            loss = net.loss(x, y, nn.functional.cross_entropy)
            loss.backward()
            return net.reduce(loss)

        op()  # a first, clean step: the shape checks of the first call are not the target
        Arm.target = "backward" if target.endswith("backward") else "forward"
        Arm.rank, Arm.left = fail_rank, at
        first = attempt(op)
        Arm.target = None
        second = attempt(op)
    return first, second


def attempt(fn):
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - classified by the caller
        return (type(e).__name__, str(e)[:300], time.perf_counter() - t0)
    return ("ok", "", time.perf_counter() - t0)


def judge(comm, case, first, second):
    """On every rank: the gathered outcomes -> (passed, max exit time, detail)."""
    fail_rank = case[2]
    firsts = comm.allgather(first)
    seconds = comm.allgather(second)
    problems = []
    for r, (kind, text, _) in enumerate(firsts):
        if r == fail_rank:
            if kind != "Injected":
                problems.append(f"rank {r} (failing) raised {kind}: {text}")
        elif f"rank {fail_rank}" not in text or kind == "ok":
            problems.append(f"rank {r} raised {kind}: {text}")
    for r, (kind, text, _) in enumerate(seconds):
        if kind != "ok":
            problems.append(f"second attempt on rank {r}: {kind}: {text}")
    exit_time = max(t for _, _, t in firsts)
    return not problems, exit_time, "; ".join(problems)


def worker(args):
    from mpi4py import MPI
    import torch
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    if args.loss_case:
        return loss_worker(comm)
    cases = solver_cases(comm.size) + network_cases(comm.size)
    for case in cases:
        run = run_solver_case if case[0] == "solver" else run_network_case
        first, second = run(comm, case)
        passed, exit_time, detail = judge(comm, case, first, second)
        if comm.rank == 0:
            print("CASE " + json.dumps(dict(ranks=comm.size, target=case[0], kind=case[1],
                                            fail_rank=case[2], at=case[3], passed=passed,
                                            max_exit_s=round(exit_time, 3), detail=detail)),
                  flush=True)


def loss_worker(comm):
    """The loss raises on the last rank only, outside any solve: the network
    agrees on it before it returns, so every rank raises at once (the last
    rank its own exception, the others one naming it), no rank waits for the
    timeout, and the next step runs on every rank as if nothing happened."""
    import torch
    from torch import nn
    from layerpar import Network
    last = comm.size - 1

    def loss_fn(out, y):
        raise Injected(f"injected fault in the loss on rank {comm.rank}")

    net = Network(lambda: nn.Linear(2, 3).double(), lambda n: nn.Linear(3, 3).double(),
                  lambda: nn.Linear(3, 2).double(), nlayers=4 * comm.size, T=1.0, comm=comm,
                  max_levels=2, cfactor=2)
    x = torch.randn(4, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    t0 = time.perf_counter()
    try:
        loss = net.loss(x, y, loss_fn)
        loss.backward()
        kind, text = "ok", ""
    except Exception as e:  # noqa: BLE001
        kind, text = type(e).__name__, str(e)
    exit_s = time.perf_counter() - t0
    good = (kind == "Injected") if comm.rank == last else \
        (f"rank {last}" in text and "injected fault in the loss" in text)
    # the network is usable afterwards: a good step, its loss on every rank
    loss = net.loss(x, y, torch.nn.functional.cross_entropy)
    loss.backward()
    value = net.reduce(loss)
    values = comm.allgather(value)
    good = good and len(set(values)) == 1 and value == value
    net.close()
    print("LOSS " + json.dumps(dict(rank=comm.rank, kind=kind, good=good,
                                    exit_s=round(exit_s, 3), text=text[:200])), flush=True)


# ---------------------------------------------------------------------------
# the orchestrator

def child_env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "MPI_", "MPIR_"))}
    # where this process imports layerpar from (the source tree, or an installed build)
    import layerpar
    imported = os.path.dirname(os.path.dirname(os.path.abspath(layerpar.__file__)))
    env["PYTHONPATH"] = imported + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def mpiexec():
    path = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return path if os.path.exists(path) else "mpiexec"


def records(out, tag):
    """The JSON records a job printed after ``tag`` ("CASE", "LOSS"), in
    order.  The ranks' lines reach the launcher's stdout through one pipe, so
    one rank's record may end where another's begins, without its newline:
    each record is read from its tag to its closing brace."""
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(chunk)[0] for chunk in out.split(tag + " ")[1:]
            if chunk.startswith("{")]


def run_job(ranks, extra, timeout, env):
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, os.path.abspath(__file__),
           "--worker"] + extra
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        return proc.stdout, proc.stderr, False
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return out, "", True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--csv", default="fault_matrix.csv")
    p.add_argument("--job-timeout", type=float, default=600.0)
    p.add_argument("--no-loss-case", action="store_true",
                   help="skip the jobs where the loss raises on one rank")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loss-case", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    rows = []
    for ranks in args.ranks:
        out, err, hung = run_job(ranks, [], args.job_timeout, child_env())
        got = records(out, "CASE")
        rows += got
        expected = len(solver_cases(ranks)) + len(network_cases(ranks))
        if len(got) < expected:
            rows.append(dict(ranks=ranks, target="job", kind="hung" if hung else "crashed",
                             fail_rank=-1, at=-1, passed=False, max_exit_s=float("nan"),
                             detail=f"{expected - len(got)} cases did not report; "
                                    f"stderr: {err[-500:]}"))
        if args.no_loss_case or ranks == 1:
            continue
        env = child_env()
        env["LAYERPAR_TIMEOUT"] = "60"  # armed, never reached: the loss's failure is agreed
        out, err, hung = run_job(ranks, ["--loss-case"], args.job_timeout, env)
        res = records(out, "LOSS")
        passed = not hung and len(res) == ranks and all(r["good"] for r in res)
        rows.append(dict(ranks=ranks, target="train-loss", kind="loss", fail_rank=ranks - 1,
                         at=1, passed=passed,
                         max_exit_s=max((r["exit_s"] for r in res), default=float("nan")),
                         detail="" if passed else f"{res} {err[-300:]}"))

    fields = ["ranks", "target", "kind", "fail_rank", "at", "passed", "max_exit_s", "detail"]
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k) for k in fields})
    cases = len(rows)
    passed = sum(1 for r in rows if r["passed"])
    times = [r["max_exit_s"] for r in rows if r["max_exit_s"] == r["max_exit_s"]]
    print(f"fault matrix: {cases} cases, {passed} passed, max exit time "
          f"{max(times) if times else float('nan'):.2f} s -> {args.csv}")
    for r in rows:
        if not r["passed"]:
            print(f"  FAILED P={r['ranks']} {r['target']}/{r['kind']} rank {r['fail_rank']} "
                  f"at {r['at']}: {r['detail']}")
    return 0 if passed == cases else 1


if __name__ == "__main__":
    sys.exit(main())
