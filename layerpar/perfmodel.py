"""A cost model of a training step: calibrated step and message costs, and
the schedules of the MGRIT solves and of the exact pipeline.

Calibration (``calibrate``) measures, for one step module, state shape and
dtype, the seconds of

    fwd      u + h*F(u) without autograd (relaxation and coarse steps)
    fwd_rec  the same recording the graph of F (the final forward sweep)
    adj      lam + h*(dF/du)^T lam through a kept graph (adjoint relaxation)
    adj_w    the same with the weight gradient (the final adjoint sweep)
    pipe_fwd a layer of a block recorded at once (the pipeline's forward)
    pipe_bwd its share of one back-propagation through the block, weight
             gradients included (the pipeline's backward)

at the full batch and at a small one (costs are modelled affine in the
batch: a + b*rows, for the pipeline's micro-batches), and a message's
latency and bandwidth by ping-pong between ranks 0 and 1 (a stored default
on one rank).  A cost is the mean over a block of calls, measured on every
rank of ``comm`` at once and averaged over them (on a machine whose cores
are shared, more ranks than cores, a rank computes only part of the time,
and the mean over a block sees that share where single calls would not).
Other jobs only ever add time, so a timing is the fastest of repeated
blocks, each of at least ``MIN_BLOCK`` seconds, without cyclic garbage
collection: blocks are measured until the ``SETTLE_KEEP`` fastest agree
within ``SETTLE_SPREAD`` (their relative spread), at most ``SETTLE_TRIES``
blocks (``settle``).  The largest such spread of a calibration is kept
(``Calibration.spread``): ``layerpar plan`` prints it and warns when the
modes it ranks are predicted closer than the timings can tell.  A cost's
intercept a is never negative (a noisy small batch cannot make many small
micro-batches look cheaper than one big batch).  Optionally:

    overhead     (``overhead=True``) what the solver costs per step beyond
                 the step itself (callback trampolines, clones, the state
                 vectors' allocation, residual arithmetic) and per pass
                 (``solve_fixed``: the pass's set-up, the input broadcast,
                 the autograd function): short training steps of the body on
                 one rank, serial and two-level at two depths, minus the
                 model of their steps, fitted by least squares
    ends         (``ends=fn``) the opening, closing and loss, forward and
                 backward, of one training step: fn() runs them once
    optimizer    (``optimizer=make``) the optimiser's step per layer:
                 make(params) builds it, timed on copies of the step module

``Calibration.save``/``load`` keep it as JSON.

Schedule of one MGRIT solve, as the core runs it (drive.c, relax.c,
restrict.c).  Fine points 1..N are split into P contiguous blocks; a level-l
point j is fine point j*stride_l on the rank holding that fine point; the
hierarchy is the core's (``braid_ext.hierarchy``: it coarsens while
n_l / cfactor >= min_coarse and l + 1 < max_levels), and so are the blocks
(``braid_ext.Layout``) and the relaxation grammar (``braid_ext.relax_sweeps``).
A sweep on level l with C-spacing m (0: one sequential segment) steps each
local F-point once and, with C-values, each local C-point >= 1 once; rank q
first runs the segment from its last C-point (sending its end value to the
right), then its interior segments, then waits for the left neighbour's
value (sent at the sender's clock, arriving ``latency`` later) and runs its
leading segment.  Its clock advances by the step cost per step.  A solve of
K = max_iter iterations, nu CF sweeps per relaxation, with tolerances 0:

    iteration k < K (k = 0 with skip: no level-0 work, the coarse problem is
        stepped from injected values without right-hand side)
      level 0: nu C-sweeps (relaxation), one C-sweep (residual, w = Phi u),
               an agreement (clocks -> max + latency*ceil(log2 P))
      restriction: one C-sweep with spacing 1 on level 1 (Phi_c u, n_1 steps)
      level l (1 <= l < L-1): as level 0 without the agreement, then the
               restriction to l+1, the cycle on l+1, and an F-sweep
               (interpolation)
      level L-1: one sequential sweep (n_{L-1} steps across the ranks)
    iteration K: the residual C-sweep on level 0, which is the final sweep
               (steps recorded: fwd_rec / adj_w), and an agreement
    one level: one sequential sweep of N final steps (``LayerParallel`` runs
    one level as the pipeline instead, below).

So with two levels the per-iteration counts are (nu + 1) N fine steps and
2 N/m coarse steps (N/m without skip's first iteration), plus the final N,
exactly the textbook counts of tests/test_braid_work.py.  The time follows
from the per-rank clock recurrence above (``solve``), which is the core's
virtual clock when every step of a level costs the same and messages cost
``latency``; the model's time additionally charges bytes/bandwidth per
message and the final sweep's own step cost.

Exact pipeline (GPipe, layerpar.engine.pipeline), m micro-batches of sizes
b_i, rank q holding n_q layers: micro-batch i leaves rank q at

    F[q][i] = max(F[q][i-1], F[q-1][i] + msg(b_i)) + n_q * c(b_i),

and backward likewise from the last rank with the micro-batches in reverse
order; with even blocks and sizes the pass takes (P + m - 1) N/(P m) step
costs of a micro-batch plus (P - 1) messages: a bubble of (P - 1)/(P + m - 1).

A training step is modelled as forward solve + backward solve (the solvers'
steps costing the step kind's cost + ``overhead`` each; in serial mode, one
level, the pipeline's two passes with one micro-batch, as ``LayerParallel``
runs them) + the pass costs:
2 ``solve_fixed`` and three reductions (the input's broadcast, the two input
norms; the pipeline: the broadcast and two agreements), one latency for the
coarse grids' weights (more than one level on more than one rank), ``ends``
and ``optimizer`` times the most layers a rank holds (+ ``extra`` seconds).

On a D x L process grid (``grid_step``) each of the D groups takes that step
on L ranks with its share of the batch (the largest: ceil(B/D) rows), and
then the gradients are summed over the D ranks of each column: an allreduce
of the parameter bytes one rank holds (ceil(N/L) residual layers), modelled
as recursive halving and doubling (reduce-scatter + allgather):

    allreduce(n bytes, D) = 2 ceil(log2 D) latency + 2 (D-1)/D n / bandwidth

with the calibration's latency and bandwidth.  layerpar's reducer
(``layerpar.reducer``) adds in group order on every rank, so that the groups
stay bitwise identical: every rank gathers the column's buckets,

    ordered_sum(n bytes, D) = ceil(log2 D) latency + (D-1) n / bandwidth

(the same volume as the allreduce for D = 2).  With ``overlap`` the buckets'
sums run while the backward pass makes the gradients of the layers before
them: all but the last bucket's share of the sum hides behind the time in
which the gradients are made, so the step pays max(sum - window (k-1)/k,
sum/k) for k buckets.  The window is the whole backward pass in the exact
modes (serial, pipeline); in the MGRIT modes the residual layers' gradients
are made by the adjoint solve's final sweep only (the reducer is fed from
it), so the window is that sweep: ceil(N/L) steps of the ``adj_w`` kind.
layerpar's reducer checks what it sent early: one agreement over the
column more, ceil(log2 D) latencies.
"""
import gc
import itertools
import json
import math
import time

from braid_ext import Layout, hierarchy, relax_sweeps

# message latency (s) and bandwidth (bytes/s) used without two ranks to measure
DEFAULT_LATENCY = 5e-6
DEFAULT_BANDWIDTH = 5e9
KINDS = ("fwd", "fwd_rec", "adj", "adj_w", "pipe_fwd", "pipe_bwd")
# what a kind not measured costs (calibrations made before it was added)
_STANDS_IN = {"pipe_fwd": "fwd_rec", "pipe_bwd": "adj_w"}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# a timing: blocks until the SETTLE_KEEP fastest agree within SETTLE_SPREAD,
# at most SETTLE_TRIES blocks, each of at least MIN_BLOCK seconds' calls
SETTLE_KEEP, SETTLE_TRIES, SETTLE_SPREAD = 3, 20, 0.05
MIN_BLOCK = 2e-3


# ---- calibration ------------------------------------------------------------
class Calibration:
    """Step costs a + b*rows per kind (seconds), message latency (s) and
    bandwidth (bytes/s), the solver's own cost per step (``overhead``) and
    per pass (``solve_fixed``), the ends of a training step (``ends``: the
    opening, closing and loss, forward and backward), the optimiser's step
    per layer (``optimizer``), and the setting they were measured for;
    ``spread``: the largest relative spread of the timings it was made
    from (``settle``; None: not recorded)."""

    def __init__(self, costs, *, latency=DEFAULT_LATENCY, bandwidth=DEFAULT_BANDWIDTH,
                 batch, row_bytes, overhead=0.0, solve_fixed=0.0, ends=0.0, optimizer=0.0,
                 spread=None, info=None):
        costs = dict(costs)
        for k in KINDS:
            if k not in costs and k in _STANDS_IN:
                costs[k] = costs[_STANDS_IN[k]]
            a, b = costs[k]
            if not (math.isfinite(a) and math.isfinite(b)):
                raise ValueError(f"costs[{k!r}]={costs[k]!r}: must be finite")
        if not (latency >= 0 and bandwidth > 0):
            raise ValueError(f"latency={latency!r}, bandwidth={bandwidth!r}: "
                             "must be >= 0 and > 0")
        self.costs = {k: (float(costs[k][0]), float(costs[k][1])) for k in KINDS}
        self.latency, self.bandwidth = float(latency), float(bandwidth)
        for name, v in (("overhead", overhead), ("solve_fixed", solve_fixed), ("ends", ends),
                        ("optimizer", optimizer)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}={v!r}: must be a finite number >= 0")
        if not (spread is None or (isinstance(spread, (int, float)) and spread >= 0)):
            raise ValueError(f"spread={spread!r}: must be a number >= 0, or None (not measured)")
        self.spread = None if spread is None else float(spread)
        self.batch, self.row_bytes = int(batch), int(row_bytes)
        self.overhead, self.solve_fixed = float(overhead), float(solve_fixed)
        self.ends, self.optimizer = float(ends), float(optimizer)
        self.info = dict(info or {})

    def step(self, kind, rows=None):
        """Seconds of one step of ``kind`` on ``rows`` samples (default: the
        batch), the step alone (the pipeline's); a solver's step costs
        ``overhead`` more."""
        a, b = self.costs[kind]
        return max(a + b * (self.batch if rows is None else rows), 0.0)

    def message(self, rows=None):
        """Seconds of one message of ``rows`` samples (default: the batch)."""
        rows = self.batch if rows is None else rows
        return self.latency + (16 + rows * self.row_bytes) / self.bandwidth

    def reduction(self, P):
        """Seconds of a reduction or broadcast over P ranks."""
        return self.latency * math.ceil(math.log2(P)) if P > 1 else 0.0

    def to_dict(self):
        return {"costs": {k: list(v) for k, v in self.costs.items()},
                "latency": self.latency, "bandwidth": self.bandwidth,
                "batch": self.batch, "row_bytes": self.row_bytes, "overhead": self.overhead,
                "solve_fixed": self.solve_fixed, "ends": self.ends,
                "optimizer": self.optimizer, "spread": self.spread, "info": self.info}

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls.load_dict(json.load(f), path)

    @classmethod
    def load_dict(cls, d, path="calibration"):
        """From ``to_dict``; entries added since a file was written count
        as 0 (not measured), a missing spread as None (not recorded)."""
        try:
            return cls({k: tuple(v) for k, v in d["costs"].items()}, latency=d["latency"],
                       bandwidth=d["bandwidth"], batch=d["batch"], row_bytes=d["row_bytes"],
                       overhead=d.get("overhead", 0.0), solve_fixed=d.get("solve_fixed", 0.0),
                       ends=d.get("ends", 0.0), optimizer=d.get("optimizer", 0.0),
                       spread=d.get("spread"), info=d.get("info"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a calibration file ({e!r})") from None


def settle(measure, *, keep=SETTLE_KEEP, tries=SETTLE_TRIES, tolerance=SETTLE_SPREAD,
           agree=None):
    """A timing from repeated measurements: ``measure()`` gives one block's
    seconds (per call), and blocks are measured until the ``keep`` fastest
    agree within ``tolerance`` (relative spread: (k-th fastest - fastest) /
    fastest), at most ``tries`` blocks.  Returns (the fastest block, that
    spread; inf with fewer than ``keep`` blocks).  ``agree(spread)``, if
    given, returns the spread every rank goes by (a collective maximum), so
    that every rank measures the same number of blocks."""
    if not (isinstance(keep, int) and isinstance(tries, int) and 1 <= keep <= tries):
        raise ValueError(f"keep={keep!r}, tries={tries!r}: need integers 1 <= keep <= tries")
    samples = []
    while True:
        samples.append(measure())
        fastest = sorted(samples)[:keep]
        if len(fastest) < keep:
            spread = math.inf
        elif fastest[-1] <= fastest[0]:
            spread = 0.0
        else:
            spread = (fastest[-1] - fastest[0]) / fastest[0] if fastest[0] > 0 else math.inf
        if agree is not None and len(samples) >= keep:
            spread = agree(spread)
        if (len(samples) >= keep and spread <= tolerance) or len(samples) >= tries:
            return min(samples), spread


class _Timer:
    """Times functions for a calibration (``settle`` over blocks of calls)
    on every rank of ``comm`` at once, and keeps the largest spread."""

    def __init__(self, comm=None, clock=time.perf_counter, *, min_block=MIN_BLOCK,
                 **settle_options):
        self.comm, self.clock, self.options = comm, clock, settle_options
        self.min_block = min_block
        self.spread = 0.0

    def __call__(self, fn, repeats):
        """Seconds per call of fn: the fastest block of ``repeats`` calls,
        more if the timed warm-up call says that so few last less than
        ``min_block`` seconds (at most 100 times as many); with ``comm``
        (collective) the mean over the ranks of each one's fastest."""
        comm, clock = self.comm, self.clock
        t = clock()
        fn()  # warm-up
        once = clock() - t
        if once * repeats < self.min_block:
            repeats = min(math.ceil(self.min_block / max(once, 1e-9)), 100 * repeats)
        if comm is not None:  # blocks of the same calls on every rank
            repeats = comm.allreduce(repeats, op=_mpi_max())

        def block():  # as timeit: no cyclic garbage collection inside a block
            if comm is not None:
                comm.Barrier()
            collecting = gc.isenabled()
            gc.disable()
            try:
                t = clock()
                for _ in range(repeats):
                    fn()
                return (clock() - t) / repeats
            finally:
                if collecting:
                    gc.enable()

        def agree(spread):
            return comm.allreduce(spread, op=_mpi_max())

        mine, spread = settle(block, agree=None if comm is None else agree, **self.options)
        self.spread = max(self.spread, spread)
        if comm is None:
            return mine
        return comm.allreduce(mine) / comm.Get_size()


def _mpi_max():
    from mpi4py import MPI
    return MPI.MAX


def _step_costs(F, shape, dtype, repeats, timer, h=0.1):
    import copy

    import torch
    params = tuple(p for p in F.parameters() if p.requires_grad)
    u = torch.randn(shape, dtype=dtype)
    lam = torch.randn(shape, dtype=dtype)

    def fwd():
        with torch.no_grad():
            return torch.add(u, F(u), alpha=h)

    def record():
        with torch.enable_grad():
            x = u.detach().requires_grad_(True)
            f = F(x)
        torch.add(u, f.detach(), alpha=h)
        return x, f

    x, f = record()

    def adj():
        (gx,) = torch.autograd.grad(f, x, grad_outputs=lam, retain_graph=True)
        return torch.add(lam, gx, alpha=h)

    def rec_and_adj_w():
        x, f = record()
        grads = torch.autograd.grad(f, (x,) + params, grad_outputs=lam * h)
        return torch.add(lam, grads[0])

    # the pipeline: a block of layers recorded at once, back-propagated by one call
    block = [copy.deepcopy(F) for _ in range(4)]
    block_params = tuple(p for G in block for p in G.parameters() if p.requires_grad)

    def pipe_fwd():
        with torch.enable_grad():
            x = u.detach().requires_grad_(True)
            y = x
            for G in block:
                y = torch.add(y, G(y), alpha=h)
        return x, y

    def pipe_both():
        x, y = pipe_fwd()
        return torch.autograd.grad(y, (x,) + block_params, grad_outputs=lam)

    def timed(fn):
        return timer(fn, repeats)

    t_rec, t_pipe = timed(record), timed(pipe_fwd) / len(block)
    return {"fwd": timed(fwd), "fwd_rec": t_rec, "adj": timed(adj),
            "adj_w": max(timed(rec_and_adj_w) - t_rec, 0.0), "pipe_fwd": t_pipe,
            "pipe_bwd": max(timed(pipe_both) / len(block) - t_pipe, 0.0)}


def _ping_pong(comm, nbytes, repeats):
    """Seconds of one message of nbytes between ranks 0 and 1 (half a round trip)."""
    import numpy as np

    from layerpar._tags import tag
    rank = comm.Get_rank()
    ping = tag("calibration.ping_pong")
    buf = np.zeros(max(nbytes, 1), dtype=np.uint8)
    comm.Barrier()
    t = time.perf_counter()
    for _ in range(repeats):
        if rank == 0:    # rank 0 sends to 1, then waits for the echo
            comm.Send(buf, dest=1, tag=ping)
            comm.Recv(buf, source=1, tag=ping)
        elif rank == 1:  # rank 1 echoes what rank 0 sent
            comm.Recv(buf, source=0, tag=ping)
            comm.Send(buf, dest=0, tag=ping)
    dt = (time.perf_counter() - t) / (2 * repeats)
    return comm.bcast(dt, root=0)  # rank 0's measurement, on every rank


# the short solves that measure the solver's own costs: (layers, options)
_OVERHEAD_RUNS = [(n, opts) for n in (8, 32) for opts in (
    dict(max_levels=1),
    dict(max_levels=2, cfactor=4, relax="F", skip=True, fwd_iters=2, bwd_iters=1))]


def fit_overhead(rows):
    """(a, b), both >= 0, minimising sum (a*steps + b*passes - excess)^2 over
    rows of (steps, passes, excess seconds): least squares, and on the
    boundary a = 0 or b = 0 when the free minimum has a negative part."""
    sxx = sum(x * x for x, _, _ in rows)
    sxy = sum(x * y for x, y, _ in rows)
    syy = sum(y * y for _, y, _ in rows)
    rx = sum(x * r for x, _, r in rows)
    ry = sum(y * r for _, y, r in rows)
    det = sxx * syy - sxy * sxy
    if det > 1e-12 * sxx * syy:
        a, b = (rx * syy - ry * sxy) / det, (ry * sxx - rx * sxy) / det
        if a >= 0 and b >= 0:
            return a, b

    def sse(a, b):
        return sum((a * x + b * y - r) ** 2 for x, y, r in rows)
    edges = [(max(rx / sxx, 0.0), 0.0) if sxx else (0.0, 0.0),
             (0.0, max(ry / syy, 0.0)) if syy else (0.0, 0.0)]
    return min(edges, key=lambda ab: sse(*ab))


def _solver_overhead(cal, F, shape, dtype, repeats, timer):
    """(seconds per solver step, seconds per pass) that the body's training
    steps take beyond the steps themselves: serial and two-level steps of 8
    and 32 layers on one rank (every rank of ``comm`` at once), measured,
    minus their model, fitted as a*steps + b*passes by least squares
    (each >= 0); the mean over the ranks."""
    import copy

    import torch
    from mpi4py import MPI

    from layerpar.parallel import LayerParallel
    u0 = torch.randn(shape, dtype=dtype)
    rows = []
    for N, opts in _OVERHEAD_RUNS:
        with LayerParallel(lambda n: copy.deepcopy(F), N, 1.0, MPI.COMM_SELF,
                           **opts).to(dtype) as net:
            def step():
                net(u0).sum().backward()
            t = timer(step, repeats)
            serial = net.pipelined
            # solver steps (serial passes run no solver: only the pass costs)
            steps = 0 if serial else \
                sum(net.last_forward["steps"]) + sum(net.last_backward["steps"])
        kw = {} if serial else opts
        model = training_step(cal, N, 1, "serial" if serial else "layer-parallel", **kw)
        rows.append((steps, 2.0, t - model["forward"] - model["backward"]))
    return fit_overhead(rows)


def _optimizer_cost(F, make_optimizer, repeats, timer, layers=8):
    """Seconds of the optimiser's step per layer: on ``layers`` copies of F
    with gradients set."""
    import copy

    import torch
    params = [p for _ in range(layers) for p in copy.deepcopy(F).parameters()
              if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-6
    opt = make_optimizer(params)
    return timer(opt.step, repeats) / layers


def calibrate(step_module, shape, dtype=None, *, comm=None, repeats=20, small_batch=None,
              overhead=False, ends=None, optimizer=None, clock="wall"):
    """Measure a Calibration for ``step_module`` on states of ``shape``
    (batch first) and ``dtype``.  With ``comm`` (a collective call) every
    rank measures at once and the costs are averaged over the ranks; with
    two or more ranks, ranks 0 and 1 measure the messages (otherwise the
    stored defaults are used).  ``overhead``: the solver's own costs per
    step and per pass, from short solves on one rank.  ``ends()``: runs
    the opening, closing and loss of one training step, forward and
    backward.  ``optimizer(params)``: builds the training's optimiser, whose
    step is measured per layer.  ``clock``: "wall" (seconds elapsed) or
    "cpu" (the process's CPU seconds: on a machine shared with other jobs,
    the time the steps would take with the cores to themselves; messages
    are measured in wall time either way)."""
    import torch
    dtype = dtype or torch.get_default_dtype()
    shape = tuple(shape)
    if not shape or shape[0] < 1:
        raise ValueError(f"shape={shape!r}: the state shape must start with a batch size >= 1")
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"repeats={repeats!r}: must be an integer >= 1")
    for name, fn in (("ends", ends), ("optimizer", optimizer)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None, not {type(fn).__name__}")
    if clock not in CLOCKS:
        raise ValueError(f"clock={clock!r}: must be one of {', '.join(CLOCKS)}")
    timer = _Timer(comm, CLOCKS[clock])
    F = step_module.to(dtype)
    B = shape[0]
    small = small_batch or max(1, B // 8)
    big = _step_costs(F, shape, dtype, repeats, timer)
    little = _step_costs(F, (small,) + shape[1:], dtype, repeats, timer) if small < B else None
    costs = {k: affine_cost(big[k], B, None if little is None else little[k], small)
             for k in KINDS}
    row_bytes = int(math.prod(shape[1:])) * torch.empty((), dtype=dtype).element_size()
    latency, bandwidth, source = DEFAULT_LATENCY, DEFAULT_BANDWIDTH, "default"
    if comm is not None and comm.Get_size() >= 2:
        t_small = _ping_pong(comm, 16, 200)
        nbytes = 16 + B * row_bytes
        t_big = _ping_pong(comm, nbytes, 50)
        latency = t_small
        bandwidth = nbytes / max(t_big - t_small, 1e-12)
        source = "ping-pong"
    info = {"shape": list(shape), "dtype": str(dtype), "messages": source,
            "threads": torch.get_num_threads(),
            "ranks": 1 if comm is None else comm.Get_size(), "clock": clock}
    cal = Calibration(costs, latency=latency, bandwidth=bandwidth, batch=B,
                      row_bytes=row_bytes, info=info)
    if overhead:
        cal.overhead, cal.solve_fixed = _solver_overhead(cal, F, shape, dtype,
                                                         max(2, repeats // 5), timer)
    if ends is not None:
        cal.ends = timer(ends, max(2, repeats // 2))
    if optimizer is not None:
        cal.optimizer = _optimizer_cost(F, optimizer, repeats, timer)
    cal.spread = timer.spread
    return cal


def affine_cost(t_big, big, t_small=None, small=None):
    """(a, b) of a cost a + b*rows through the timings ``t_big`` of ``big``
    rows and ``t_small`` of ``small`` rows, with a, b >= 0: a negative
    slope is 0 (a = t_big), a negative intercept 0 (the line through the
    origin and the big batch).  Without ``t_small``: b = t_big / big."""
    if t_small is None:
        return 0.0, t_big / big
    b = max((t_big - t_small) / (big - small), 0.0)
    a = t_big - b * big
    if a < 0:
        return 0.0, t_big / big
    return a, b


# ---- the MGRIT schedule -------------------------------------------------------
def block(N, P, q, reverse=False):
    """Fine points (lo, hi) of time-ordered rank q: the core's layout
    (``braid_ext.Layout``), mirrored in a reversed solve (hierarchy.c)."""
    if not reverse:
        return Layout(N, P).block(q)
    lo, hi = Layout(N, P).block(P - 1 - q)
    return (0 if q == 0 else N + 1 - hi), N + 1 - max(lo, 1)


class _Solve:
    """The clocks and step counts of one solve, rank by rank (time order)."""

    def __init__(self, N, P, levels, reverse, cost, msg, allreduce):
        self.N, self.P, self.levels, self.reverse = N, P, levels, reverse
        self.cost, self.msg, self.allreduce = cost, msg, allreduce
        self.clock = [0.0] * P
        self.steps = [[0] * len(levels) for _ in range(P)]
        self.messages = [0] * P
        self.blocks = [block(N, P, q, reverse) for q in range(P)]

    def agree(self):
        t = max(self.clock) + self.allreduce
        self.clock = [t] * self.P

    def sweep(self, l, m, with_c, final=False):
        n, stride, _ = self.levels[l]
        c = self.cost(l, final)
        is_c = (lambda j: j == 0) if m == 0 else (lambda j: j % m == 0)
        incoming = None  # send clock of the previous rank holding points
        for q in range(self.P):
            flo, fhi = self.blocks[q]
            lo, hi = -(-flo // stride), fhi // stride
            if lo > hi:
                continue
            need_left = lo > 0 and (not is_c(lo) or with_c)
            need_right = hi < n and (not is_c(hi + 1) or with_c)
            if m == 0:
                c_first = c_last = 0 if lo == 0 else hi + 1
            else:
                c_first, c_last = -(-lo // m) * m, (hi // m) * m
            have_c = c_first <= hi
            t, sent, nsteps = self.clock[q], None, 0
            if need_right and is_c(hi):
                sent = t
            if have_c:
                last_f = hi if m == 0 else min(c_last + m - 1, hi)
                s = last_f - c_last + (1 if with_c and m and c_last + m <= hi else 0)
                t += s * c
                nsteps += s
                if need_right and not is_c(hi):
                    sent = t
                if m:
                    s = (c_last - c_first) // m * (m - 1 + (1 if with_c else 0))
                    t += s * c
                    nsteps += s
            if need_left:
                t = max(t, incoming + self.msg)
                s = (c_first - 1 if have_c else hi) - lo + 1
                s += 1 if have_c and with_c and c_first >= 1 else 0
                t += s * c
                nsteps += s
                if not have_c and need_right:
                    sent = t
            if need_right:
                self.messages[q] += 1
            self.clock[q] = t
            self.steps[q][l] += nsteps
            incoming = sent

    def relax(self, l, nu):
        for _ in range(nu):
            self.sweep(l, self.levels[l][2], True)

    def cycle(self, l, first, shape, interp, nrelax):
        L = len(self.levels)
        if l == L - 1:
            self.sweep(l, 0, False)
            return
        if not first:
            self.relax(l, nrelax)
            self.sweep(l, self.levels[l][2], True)
        if not first:
            self.sweep(l + 1, 1, True)
        again = shape == "F" and l + 1 < L - 1
        self.cycle(l + 1, first, shape, not again, nrelax)
        if again:
            self.cycle(l + 1, False, "V", True, nrelax)
        if interp:
            self.sweep(l, self.levels[l][2], False)

    def run(self, nrelax, skip, max_iter, cycle):
        L = len(self.levels)
        if L == 1:
            self.sweep(0, 0, False, final=True)
            self.agree()
            return
        m0 = self.levels[0][2]
        for k in itertools.count():
            first = k == 0 and skip
            if not first:
                last = k >= max_iter
                if not last:
                    self.relax(0, nrelax)
                self.sweep(0, m0, True, final=last)
                self.agree()
                if last:
                    break
            if not first:
                self.sweep(1, 1, True)
            again = cycle == "F" and L > 2
            self.cycle(1, first, cycle, not again, nrelax)
            if again:
                self.cycle(1, False, "V", True, nrelax)
        self.agree()  # the core's closing check for NaN/Inf


def solve(N, P, *, max_levels=1, cfactor=4, min_coarse=2, relax="FCF", cycle="V", skip=False,
          max_iter=2, reverse=False, cost=1.0, final_cost=None, latency=0.0, message=None,
          warm=False):
    """Model of one solve: {"time", "steps" (per comm rank, per level),
    "messages" (per comm rank)}.  ``cost``: seconds per step, a number or
    one per level; ``final_cost`` that of the final fine sweep (default:
    the level-0 cost); ``message``: seconds per message (default
    ``latency``); reductions cost ``latency * ceil(log2 P)``.  ``warm``: a
    warm-started solve (no skipped down-cycle)."""
    if not (isinstance(N, int) and isinstance(P, int) and 1 <= P <= N):
        raise ValueError(f"N={N!r}, P={P!r}: need integers 1 <= P <= N")
    if cycle not in ("V", "F"):
        raise ValueError(f"cycle={cycle!r}: must be 'V' or 'F'")
    if not (isinstance(max_iter, int) and max_iter >= 0):
        raise ValueError(f"max_iter={max_iter!r}: must be an integer >= 0")
    levels = hierarchy(N, max_levels=max_levels, cfactor=cfactor, min_coarse=min_coarse)
    costs = list(cost) if isinstance(cost, (list, tuple)) else [cost] * len(levels)
    costs += [costs[-1]] * (len(levels) - len(costs))
    fc = costs[0] if final_cost is None else final_cost
    s = _Solve(N, P, levels, reverse, lambda l, final: fc if final and l == 0 else costs[l],
               latency if message is None else message,
               latency * math.ceil(math.log2(P)) if P > 1 else 0.0)
    s.run(relax_sweeps(relax), skip and not warm, max_iter, cycle)
    order = range(P - 1, -1, -1) if reverse else range(P)  # comm rank r = P-1-q when reversed
    return {"time": s.clock[0], "steps": [s.steps[q] for q in order],
            "messages": [s.messages[q] for q in order], "levels": len(levels)}


def pipeline(N, P, sizes, step_cost, message):
    """Model of one pipelined pass (GPipe): seconds on the slowest rank.
    ``step_cost(rows)`` and ``message(rows)`` give seconds per layer step
    and per message of a micro-batch of ``rows`` samples."""
    done = [0.0] * len(sizes)  # when each micro-batch left the previous rank
    clock = 0.0
    layout = Layout(N, P)
    for q in range(P):
        lo, hi = layout.block(q)
        nq = hi - max(lo, 1) + 1
        clock = 0.0
        for i, b in enumerate(sizes):
            ready = 0.0 if q == 0 else done[i] + message(b)
            clock = max(clock, ready) + nq * step_cost(b)
            done[i] = clock
    return max(done)


# ---- a training step --------------------------------------------------------
MODES = ("serial", "pipeline", "layer-parallel", "one-shot")


def training_step(cal, N, P, mode, *, max_levels=2, cfactor=4, min_coarse=2, relax="F",
                  cycle="V", skip=True, fwd_iters=None, bwd_iters=1, microbatches=1,
                  batch=None, extra=0.0):
    """Predicted seconds of one training step with calibration ``cal``: a
    dict with "forward" and "backward" (the solves, or the pipelined passes),
    "pass" (the passes' fixed costs and reductions, the ends and the
    optimiser step) and "time" (their sum + ``extra``)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: must be one of {', '.join(MODES)}")
    batch = cal.batch if batch is None else batch
    msg = cal.message(batch)
    most_layers = -(-N // P)  # the optimiser steps every rank's layers at once
    rest = 2 * cal.solve_fixed + 3 * cal.reduction(P) + cal.ends + cal.optimizer * most_layers
    if mode in ("serial", "pipeline"):
        # one level: each rank's block of layers per micro-batch (serial: one)
        from layerpar.engine.pipeline import split_sizes
        sizes = split_sizes(batch, microbatches if mode == "pipeline" else 1)
        fwd = pipeline(N, P, sizes, lambda b: cal.step("pipe_fwd", b), cal.message)
        bwd = pipeline(N, P, sizes[::-1], lambda b: cal.step("pipe_bwd", b), cal.message)
        return {"time": fwd + bwd + rest + extra, "forward": fwd, "backward": bwd,
                "pass": rest}
    if fwd_iters is None:
        fwd_iters = 1 if mode == "one-shot" else 2
    opts = dict(max_levels=max_levels, cfactor=cfactor, min_coarse=min_coarse, relax=relax,
                cycle=cycle, skip=skip, warm=mode == "one-shot")
    kw = dict(latency=cal.latency, message=msg)
    o = cal.overhead
    fwd = solve(N, P, **opts, max_iter=fwd_iters or 0, cost=cal.step("fwd", batch) + o,
                final_cost=cal.step("fwd_rec", batch) + o, **kw)
    bwd = solve(N, P, **opts, max_iter=bwd_iters, reverse=True, cost=cal.step("adj", batch) + o,
                final_cost=cal.step("adj_w", batch) + o, **kw)
    if fwd["levels"] > 1 and P > 1:
        rest += cal.latency  # the coarse grids' weights, sent before the forward solve
    return {"time": fwd["time"] + bwd["time"] + rest + extra, "forward": fwd["time"],
            "backward": bwd["time"], "pass": rest}


# ---- data x layer parallelism --------------------------------------------------
def allreduce(nbytes, D, *, latency, bandwidth):
    """Seconds of an allreduce (sum) of ``nbytes`` bytes over ``D`` ranks:
    reduce-scatter and allgather by recursive halving and doubling."""
    if D < 1 or nbytes < 0:
        raise ValueError(f"D={D!r}, nbytes={nbytes!r}: need D >= 1 and nbytes >= 0")
    if D == 1:
        return 0.0
    return 2 * math.ceil(math.log2(D)) * latency + 2 * (D - 1) / D * nbytes / bandwidth


def ordered_sum(nbytes, D, *, latency, bandwidth):
    """Seconds of the reducer's sum in group order of ``nbytes`` bytes over
    ``D`` ranks: an allgather (recursive doubling) of every rank's buckets."""
    if D < 1 or nbytes < 0:
        raise ValueError(f"D={D!r}, nbytes={nbytes!r}: need D >= 1 and nbytes >= 0")
    if D == 1:
        return 0.0
    return math.ceil(math.log2(D)) * latency + (D - 1) * nbytes / bandwidth


def exposed(reduction, backward, buckets):
    """The part of a reduction of ``buckets`` buckets (started as backward
    makes them) that the step still waits for after ``backward`` seconds."""
    k = max(1, int(buckets))
    return max(reduction - backward * (k - 1) / k, reduction / k)


def grid_step(cal, N, D, L, mode, *, layer_bytes, batch=None, reducer="ordered",
              overlap=False, bucket_bytes=1 << 22, **options):
    """Predicted seconds of one training step on a D x L grid: the
    ``training_step`` of one group on L ranks with the largest share
    ceil(batch/D) of the global ``batch`` (default: the calibration's), plus
    the gradient allreduce over D ranks of ceil(N/L) * ``layer_bytes`` (the
    bytes of one residual layer's parameters; the opening and closing layers
    are left out).  ``reducer``: 'ordered' (layerpar's sum in group order,
    ``ordered_sum``) or 'allreduce' (MPI's, ``allreduce``); ``overlap``:
    the buckets of ``bucket_bytes`` are summed while backward makes the
    gradients (``exposed``: the whole backward pass in the exact modes, the
    adjoint solve's final sweep in the MGRIT modes).  ``options`` are those of ``training_step``.  A dict with
    "time", "group" (the group's step), "reduction" (the sum's own time) and
    "allreduce" (the part of it the step waits for)."""
    if not (isinstance(D, int) and isinstance(L, int) and D >= 1 and 1 <= L <= N):
        raise ValueError(f"D={D!r}, L={L!r}: need D >= 1 and 1 <= L <= N={N}")
    batch = cal.batch if batch is None else batch
    if batch < D:
        raise ValueError(f"batch={batch} < D={D}: every group needs a sample")
    share = -(-batch // D)
    if reducer not in ("ordered", "allreduce"):
        raise ValueError(f"reducer={reducer!r}: choose 'ordered' or 'allreduce'")
    step = training_step(cal, N, L, mode, batch=share, **options)
    group = step["time"]
    nbytes = -(-N // L) * layer_bytes
    sum_fn = ordered_sum if reducer == "ordered" else allreduce
    red = sum_fn(nbytes, D, latency=cal.latency, bandwidth=cal.bandwidth)
    wait = red
    if overlap and D > 1:
        window = step["backward"]
        if mode not in ("serial", "pipeline"):  # the adjoint solve's final sweep
            window = min(window, -(-N // L) * (cal.step("adj_w", share) + cal.overhead))
        wait = exposed(red, window, -(-nbytes // bucket_bytes))
        if reducer == "ordered":  # the column agrees on the check of what was sent early
            wait += math.ceil(math.log2(D)) * cal.latency
    return {"time": group + wait, "group": group, "reduction": red, "allreduce": wait}
