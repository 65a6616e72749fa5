"""Measured time per training step against layerpar.perfmodel's prediction,
side by side, on the ranks of this run.

The body of a conv ResNet (N residual conv layers, ``LayerParallel``) takes
a training step: forward, the loss sum(u_N^2)/2 on the last rank, backward
(the opening, closing and optimiser, which the model leaves out, are not
run).  The step module is calibrated first (collective: the messages are
measured between ranks 0 and 1 when there are two).  Repetitions alternate
between the settings and the median is reported.

    mpiexec -n 1 python benchmarks/bench_model.py
    mpiexec -n 2 python benchmarks/bench_model.py
Appends to benchmarks/results/model.csv (one row per setting and P).
"""
import argparse
import csv
import os
import statistics
import time

import torch
from mpi4py import MPI

from layerpar import ConvStep
from layerpar import perfmodel as pm
from layerpar.parallel import LayerParallel

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

SETTINGS = [
    ("serial", {}, {"max_levels": 1}),
    ("pipeline", {"microbatches": 4}, {"max_levels": 1, "microbatches": 4}),
    ("layer-parallel", dict(max_levels=2, cfactor=4, relax="F", skip=True, fwd_iters=2,
                            bwd_iters=1),
     dict(max_levels=2, cfactor=4, relax="F", skip=True, fwd_iters=2, bwd_iters=1)),
    ("layer-parallel", dict(max_levels=2, cfactor=4, relax="FCF", skip=False, fwd_iters=2,
                            bwd_iters=1),
     dict(max_levels=2, cfactor=4, relax="FCF", skip=False, fwd_iters=2, bwd_iters=1)),
    ("one-shot", dict(max_levels=2, cfactor=4, relax="F", skip=True, fwd_iters=1, bwd_iters=1),
     dict(max_levels=2, cfactor=4, relax="F", skip=True, fwd_iters=1, bwd_iters=1,
          warm_start=True)),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--size", type=int, default=8, help="image side")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(RESULTS, "model.csv"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, P = comm.Get_rank(), comm.Get_size()
    shape = (a.batch, a.width, a.size, a.size)
    # with the solver's own cost per step (a short solve on one rank), and without
    cal = pm.calibrate(ConvStep(a.width), shape, torch.float32, comm=comm, overhead=True)
    bare = pm.Calibration.load_dict(dict(cal.to_dict(), overhead=0.0))

    nets = []
    for mode, model_kw, net_kw in SETTINGS:
        if mode == "pipeline" and P == 1:
            continue  # one rank: the pipeline is serial stepping of micro-batches
        net = LayerParallel(lambda n: ConvStep(a.width), a.layers, 1.0, comm, **net_kw)
        nets.append((mode, model_kw, net))
    u0 = torch.randn(shape)

    def step(net):
        out = net(u0 if rank == 0 else None)
        loss = 0.5 * (out ** 2).sum() if rank == P - 1 else out.sum()
        loss.backward()
        for p in net.parameters():
            p.grad = None

    times = {i: [] for i in range(len(nets))}
    for i, (_, _, net) in enumerate(nets):
        step(net)  # warm-up (and the one-shot solver's first, cold solve)
    for _ in range(a.repeats):
        for i, (_, _, net) in enumerate(nets):
            comm.Barrier()
            t = time.perf_counter()
            step(net)
            comm.Barrier()
            times[i].append(time.perf_counter() - t)
    rows = []
    for i, (mode, kw, net) in enumerate(nets):
        measured = statistics.median(times[i])
        model = pm.training_step(bare, a.layers, P, mode, **kw)["time"]
        model_o = pm.training_step(cal, a.layers, P, mode, **kw)["time"]
        rows.append(dict(P=P, mode=mode, setting=" ".join(f"{k}={v}" for k, v in kw.items()),
                         layers=a.layers, batch=a.batch, measured_s=f"{measured:.5f}",
                         model_s=f"{model:.5f}", ratio=f"{measured / model:.3f}",
                         model_overhead_s=f"{model_o:.5f}",
                         ratio_overhead=f"{measured / model_o:.3f}"))
        net.close()
    if rank == 0:
        costs = "  ".join(f"{k} {bare.step(k) * 1e3:.3f} ms" for k in pm.KINDS)
        print(f"P={P}  calibration: {costs}  message {cal.message() * 1e6:.1f} us "
              f"({cal.info['messages']})  solver overhead {cal.overhead * 1e6:.1f} us/step")
        print(f"{'P':>2} {'mode':<15} {'setting':<70} {'measured':>9} {'model':>9} {'ratio':>6} "
              f"{'+overhd':>9} {'ratio':>6}")
        for r in rows:
            print(f"{r['P']:>2} {r['mode']:<15} {r['setting']:<70} {r['measured_s']:>9} "
                  f"{r['model_s']:>9} {r['ratio']:>6} {r['model_overhead_s']:>9} "
                  f"{r['ratio_overhead']:>6}")
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        new = not os.path.exists(a.out)
        with open(a.out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
