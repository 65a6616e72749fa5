"""Messages, waits and the overlapped reducer, measured side by side.

    mpiexec -n 4 python benchmarks/bench_transport.py ghosts    # ghost traffic per pass
    mpiexec -n 2 python benchmarks/bench_transport.py overlap   # grid 2x1: reducer with/without overlap
    mpiexec -n 2 python benchmarks/bench_transport.py overlap --mode layer-parallel
    mpiexec -n 2 python benchmarks/bench_transport.py overlap --schedule 1f1b --microbatches 4
    mpiexec -n 4 python benchmarks/bench_transport.py wait      # pipeline, busy vs sleeping waits
    python benchmarks/bench_transport.py exact                  # exact mode vs nn.Sequential, one rank
    python benchmarks/bench_transport.py model                  # the reducer at 16 x 16, modelled

ghosts: bytes and messages a rank sends for the coarse-grid weights in one
forward pass, before (the pickled state dict per layer and peer, as sent
until now: measured by pickling what was sent) and after (flat bytes, only
when changed), for a training pass (every weight changed) and an evaluation
pass (nothing changed).  Counts, not times: load does not move them.
overlap/wait/exact: median wall time per training step, the variants'
repetitions alternating so that load affects them alike (wall times on a
shared machine).  overlap runs the groups' passes exact (``--mode exact``:
the one-rank graph, gradients from post-accumulate hooks; with
``--schedule gpipe`` or ``1f1b`` the pipeline with ``--microbatches``
micro-batches, 1F1B's earlier micro-batches' accumulations partial sums) or
layer-parallel (``--mode layer-parallel``: MGRIT, 2 levels, the residual
layers' gradients from the adjoint solve's final sweep).  Appends to benchmarks/results/transport.csv.
"""
import argparse
import csv
import os
import pickle
import statistics
import time

import torch
import torch.nn.functional as Fn
from mpi4py import MPI

from layerpar import (ConvClosing, ConvOpening, ConvStep, DenseClosing, DenseOpening,
                      DenseStep, Network, ProcessGrid)
from layerpar.engine.policy import training_flags

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WORLD = MPI.COMM_WORLD


def dense(comm, nlayers=32, width=16, **opts):
    return Network(lambda: DenseOpening(2, width), lambda n: DenseStep(width, "tanh"),
                   lambda: DenseClosing(width, 3), nlayers=nlayers, T=2.0, comm=comm,
                   seed=1, **opts)


def conv(comm, nlayers=16, channels=8, **opts):
    return Network(lambda: ConvOpening(1, channels), lambda n: ConvStep(channels, 3, "relu"),
                   lambda: ConvClosing(channels, 10, pool=2), nlayers=nlayers, T=1.0,
                   comm=comm, seed=1, **opts)


def batch(kind, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g) if kind == "dense" else torch.randn(n, 1, 12, 12,
                                                                            generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)


def write(rows):
    if WORLD.rank != 0:
        return
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "transport.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["what", "variant", "ranks", "value", "unit", "note"])
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(r)
            print(", ".join(f"{k}={v}" for k, v in r.items()))


def ghosts(args):
    net = dense(WORLD, nlayers=args.layers, width=args.width, max_levels=3, cfactor=2,
                min_coarse=1)
    gh = net.body._ghosts
    x, y = batch("dense", 32)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    # before: what the pickled exchange sent per pass (one message per layer and peer)
    old_bytes = sum(len(pickle.dumps(({k: v.detach().cpu() for k, v in
                                       net.body.stage.layers[str(n)].state_dict().items()},
                                      training_flags(net.body.stage.layers[str(n)])),
                                     protocol=pickle.HIGHEST_PROTOCOL))
                    for _, n in gh.sends)
    old_msgs = len(gh.sends)
    rows = []
    for what, train in (("training pass", True), ("evaluation pass", False)):
        net.loss(x, y, Fn.cross_entropy).backward()
        opt.step()
        if not train:
            with torch.no_grad():
                net(x)  # the weights as last sent
        s0 = dict(gh.stats)
        with torch.no_grad():
            net(x)
        new_bytes = WORLD.allreduce(gh.stats["bytes"] - s0["bytes"])
        new_msgs = WORLD.allreduce(gh.stats["messages"] - s0["messages"])
        new_bytes += WORLD.allreduce(gh.stats["header_bytes"] - s0["header_bytes"])
        tot_old_b, tot_old_m = WORLD.allreduce(old_bytes), WORLD.allreduce(old_msgs)
        note = f"{args.layers} layers width {args.width}, 3 levels cfactor 2; all ranks"
        rows += [dict(what=f"ghost bytes, {what}", variant="before (pickled)",
                      ranks=WORLD.size, value=tot_old_b, unit="bytes", note=note),
                 dict(what=f"ghost bytes, {what}", variant="after (flat, when changed; headers included)",
                      ranks=WORLD.size, value=new_bytes, unit="bytes", note=note),
                 dict(what=f"ghost messages, {what}", variant="before (pickled)",
                      ranks=WORLD.size, value=tot_old_m, unit="messages", note=note),
                 dict(what=f"ghost messages, {what}", variant="after (flat, when changed)",
                      ranks=WORLD.size, value=new_msgs, unit="messages", note=note)]
    net.close()
    write(rows)


def timed(variants, reps):
    """{name: median seconds} of step functions, repetitions alternating."""
    times = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(reps):
        for k, fn in variants.items():
            WORLD.Barrier()
            t0 = time.perf_counter()
            fn()
            WORLD.Barrier()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def overlap(args):
    grid = ProcessGrid(WORLD, data=WORLD.size)
    x, y = batch("conv", args.batch)
    xs, ys = grid.shard(x, args.batch), grid.shard(y, args.batch)
    nets, steps, reds = {}, {}, {}
    opts = dict(max_levels=1) if args.mode == "exact" else dict(max_levels=2, cfactor=4)
    passes = args.mode
    if args.schedule is not None:
        opts.update(microbatches=args.microbatches, schedule=args.schedule)
        passes = f"exact, {args.schedule} with {args.microbatches} micro-batches"
    for name, over in (("overlap", True), ("after backward", False)):
        net = conv(grid.layer_comm, nlayers=args.layers, channels=args.width, **opts)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        red = grid.reducer(net.parameters(), overlap=over, bucket_bytes=args.bucket)

        def step(net=net, opt=opt, red=red, over=over):
            opt.zero_grad()
            if over:
                red.start(grid.weight(args.batch))
            net.loss_and_backward(xs, ys, Fn.cross_entropy)
            if over:
                red.finish()
            else:
                grid.average_gradients(net.parameters(), grid.weight(args.batch),
                                       bucket_bytes=args.bucket)
            opt.step()
        nets[name], steps[name], reds[name] = net, step, red
    t = timed(steps, args.reps)
    red = reds["overlap"]
    early = f"{red.early} of {len(red.buckets)}"
    if not red.early_gradients:
        early += " (fell back: summed after backward)"
    note = (f"grid {grid.data}x{grid.layers}, {passes}, conv {args.layers} layers x "
            f"{args.width} ch, batch {args.batch}, buckets {args.bucket} B, "
            f"{early} buckets started during backward; wall, shared machine")
    write([dict(what="time per step", variant=k, ranks=WORLD.size, value=f"{v * 1e3:.2f}",
                unit="ms", note=note) for k, v in t.items()]
          + [dict(what="time per step ratio", variant="overlap / after backward",
                  ranks=WORLD.size, value=f"{t['overlap'] / t['after backward']:.3f}",
                  unit="ratio", note=note)])
    for name, net in nets.items():
        reds[name].close()
        net.close()
    grid.close()


def wait(args):
    x, y = batch("conv", args.batch)
    steps, nets = {}, []
    for mode in ("busy", "sleep", "auto"):
        net = conv(WORLD, nlayers=args.layers, channels=args.width, max_levels=1,
                   microbatches=args.microbatches, wait=mode)
        nets.append(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)

        def step(net=net, opt=opt):
            opt.zero_grad()
            net.loss(x, y, Fn.cross_entropy).backward()
            opt.step()
        steps[f"{mode} ({net.body.wait})"] = step
    t = timed(steps, args.reps)
    cores = len(os.sched_getaffinity(0))
    note = (f"pipeline GPipe, conv {args.layers} layers x {args.width} ch, batch {args.batch}, "
            f"{args.microbatches} micro-batches; {WORLD.size} ranks, {cores} cores; wall")
    base = t[next(k for k in t if k.startswith("busy"))]
    write([dict(what="time per step", variant=k, ranks=WORLD.size, value=f"{v * 1e3:.2f}",
                unit="ms", note=note) for k, v in t.items()]
          + [dict(what="time per step ratio", variant=f"{k} / busy", ranks=WORLD.size,
                  value=f"{v / base:.3f}", unit="ratio", note=note) for k, v in t.items()])
    for net in nets:
        net.close()


def exact(args):
    x, y = batch("dense", args.batch)
    net = dense(MPI.COMM_SELF, nlayers=args.layers, width=args.width, max_levels=1)
    seq = net.serial_equivalent()
    opt_n = torch.optim.SGD(net.parameters(), lr=0.01)
    opt_s = torch.optim.SGD(seq.parameters(), lr=0.01)

    def lp():
        opt_n.zero_grad()
        net.loss(x, y, Fn.cross_entropy).backward()
        opt_n.step()

    def sq():
        opt_s.zero_grad()
        Fn.cross_entropy(seq(x), y).backward()
        opt_s.step()
    t = timed({"LayerParallel exact": lp, "nn.Sequential": sq}, args.reps)
    note = f"dense {args.layers} layers width {args.width}, batch {args.batch}; one rank; wall"
    write([dict(what="time per step", variant=k, ranks=1, value=f"{v * 1e3:.3f}", unit="ms",
                note=note) for k, v in t.items()]
          + [dict(what="time per step ratio", variant="LayerParallel / nn.Sequential", ranks=1,
                  value=f"{t['LayerParallel exact'] / t['nn.Sequential']:.3f}", unit="ratio",
                  note=note)])
    net.close()


def model(args):
    """The performance model at 16 x 16: the reducer's sum (group order) and
    MPI's allreduce, with and without overlap, from a calibration of the
    conv step on this machine."""
    from layerpar import perfmodel as pm
    width, N = args.width, args.layers
    shape = (args.batch, width, 12, 12)
    cal = pm.calibrate(ConvStep(width), shape, torch.float32, comm=MPI.COMM_SELF)
    layer_bytes = sum(p.numel() * p.element_size() for p in ConvStep(width).parameters())
    rows = []
    for mode, kw in (("serial", {}), ("layer-parallel", dict(max_levels=2, cfactor=4))):
        for reducer in ("allreduce", "ordered"):
            for over in (False, True):
                m = pm.grid_step(cal, N, 16, 16, mode, layer_bytes=layer_bytes,
                                 batch=args.batch * 16, reducer=reducer, overlap=over,
                                 bucket_bytes=args.bucket, **kw)
                rows.append(dict(what=f"modelled step at 16x16, {mode}",
                                 variant=f"{reducer}{' overlapped' if over else ''}",
                                 ranks=256, value=f"{m['time'] * 1e3:.3f}", unit="ms",
                                 note=f"conv {N} layers x {width} ch, batch {args.batch * 16}, "
                                      f"buckets {args.bucket} B, sum {m['reduction'] * 1e3:.3f} ms of which the step "
                                      f"waits {m['allreduce'] * 1e3:.3f} ms; calibrated here"))
    write(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["ghosts", "overlap", "wait", "exact", "model"])
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--schedule", choices=["gpipe", "1f1b"], default=None,
                   help="overlap: exact passes with --microbatches micro-batches in this "
                        "schedule (default: one micro-batch)")
    p.add_argument("--bucket", type=int, default=1 << 16)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--mode", choices=["exact", "layer-parallel"], default="exact",
                   help="overlap: the groups' passes")
    args = p.parse_args()
    if args.schedule is not None and args.mode != "exact":
        p.error("--schedule: micro-batches run in exact mode only (--mode exact)")
    torch.set_num_threads(1)
    defaults = {"ghosts": (15, 16), "overlap": (16, 8), "wait": (16, 8), "exact": (16, 16),
                "model": (256, 8)}
    args.layers = args.layers or defaults[args.what][0]
    args.width = args.width or defaults[args.what][1]
    globals()[args.what](args)


if __name__ == "__main__":
    main()
