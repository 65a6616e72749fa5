"""Data x layer parallelism: time per training step on every D x L grid of
the ranks of this run, side by side, against layerpar.perfmodel.grid_step;
and the modelled time at scale (D x L = 16 x 16 and the other shapes of 256
ranks).

The body of a conv ResNet (N residual conv layers, ``LayerParallel`` on the
group's ranks) takes a training step on its share of a global batch:
forward, the loss sum(u_N^2)/(2B) on the last layer rank, backward, the
gradient average over the data axis (``ProcessGrid.average_gradients``).
The opening, closing and optimiser, which the model leaves out, are not run.
Repetitions alternate between the grids (all built at once on the same
ranks) and the median is reported, with its ratio to the D x L of
``--reference``.

    mpiexec -n 4 python benchmarks/bench_grid.py
Writes benchmarks/results/grid.csv (one row per grid and mode, measured and
modelled).
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
from layerpar.grid import ProcessGrid
from layerpar.parallel import LayerParallel

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

MODES = {
    "serial": ({}, {"max_levels": 1}),
    "layer-parallel": (dict(max_levels=2, cfactor=4, relax="F", skip=True, fwd_iters=2,
                            bwd_iters=1),
                       dict(max_levels=2, cfactor=4, relax="F", skip=True, fwd_iters=2,
                            bwd_iters=1)),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--size", type=int, default=8, help="image side")
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    ap.add_argument("--scale-batch", type=int, default=1024,
                    help="global batch of the modelled runs on 256 ranks")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--reference", default="", help="D x L of the ratios (default: the "
                    "square-most grid)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "grid.csv"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, P = comm.Get_rank(), comm.Get_size()
    shapes = [(D, P // D) for D in range(1, P + 1) if P % D == 0 and P // D <= a.layers]
    shape = (a.batch, a.width, a.size, a.size)
    cal = pm.calibrate(ConvStep(a.width), shape, torch.float32, comm=comm)
    layer_bytes = sum(p.numel() * p.element_size() for p in ConvStep(a.width).parameters())

    runs = []  # (D, L, mode, grid, body, input of the share)
    for D, L in shapes:
        grid = ProcessGrid(comm, data=D)
        start, stop = grid.share(a.batch)
        torch.manual_seed(1)
        u0 = torch.randn(shape)[start:stop]
        for mode, (_, net_kw) in MODES.items():
            body = LayerParallel(lambda n: ConvStep(a.width), a.layers, 1.0, grid.layer_comm,
                                 **net_kw)
            runs.append((D, L, mode, grid, body, u0))

    def step(grid, body, u0):
        out = body(u0 if grid.layer_rank == 0 else None)
        last = grid.layer_rank == grid.layers - 1
        loss = 0.5 * (out ** 2).sum() / a.batch if last else out.sum()
        loss.backward()
        grid.average_gradients(body.parameters(), 1.0)  # the share's part is in the loss
        for p in body.parameters():
            p.grad = None

    times = {i: [] for i in range(len(runs))}
    for _, _, _, grid, body, u0 in runs:
        step(grid, body, u0)  # warm-up
    for _ in range(a.repeats):
        for i, (_, _, _, grid, body, u0) in enumerate(runs):
            comm.Barrier()
            t = time.perf_counter()
            step(grid, body, u0)
            comm.Barrier()
            times[i].append(time.perf_counter() - t)
    measured = {(D, L, mode): statistics.median(times[i])
                for i, (D, L, mode, _, _, _) in enumerate(runs)}
    for _, _, _, grid, body, _ in runs:
        body.close()
    for grid in {id(r[3]): r[3] for r in runs}.values():
        grid.close()
    if rank != 0:
        return

    ref = tuple(map(int, a.reference.split("x"))) if a.reference else \
        min(shapes, key=lambda s: abs(s[0] - s[1]))
    default_net = pm.Calibration.load_dict(dict(cal.to_dict(), latency=pm.DEFAULT_LATENCY,
                                                bandwidth=pm.DEFAULT_BANDWIDTH))
    rows = []
    for mode, (model_kw, _) in MODES.items():
        for D, L in shapes:
            t = measured[(D, L, mode)]
            m = pm.grid_step(cal, a.layers, D, L, mode, layer_bytes=layer_bytes,
                             batch=a.batch, **model_kw)
            m_ref = pm.grid_step(cal, a.layers, *ref, mode, layer_bytes=layer_bytes,
                                 batch=a.batch, **model_kw)
            rows.append(dict(kind="measured", P=P, D=D, L=L, mode=mode, layers=a.layers,
                             batch=a.batch, time_s=f"{t:.5f}",
                             ratio_to_ref=f"{t / measured[(*ref, mode)]:.3f}",
                             model_s=f"{m['time']:.5f}", model_allreduce_s=f"{m['allreduce']:.6f}",
                             model_ratio_to_ref=f"{m['time'] / m_ref['time']:.3f}"))
        big = [(D, 256 // D) for D in (1, 4, 8, 16, 32, 64, 256)
               if 256 // D <= a.layers and D <= a.scale_batch]
        # this machine's messages, and the stored defaults (a cluster network)
        for kind, c in (("model", cal), ("model-default-net", default_net)):
            m16 = pm.grid_step(c, a.layers, 16, 16, mode, layer_bytes=layer_bytes,
                               batch=a.scale_batch, **model_kw)["time"]
            for D, L in big:
                m = pm.grid_step(c, a.layers, D, L, mode, layer_bytes=layer_bytes,
                                 batch=a.scale_batch, **model_kw)
                rows.append(dict(kind=kind, P=256, D=D, L=L, mode=mode, layers=a.layers,
                                 batch=a.scale_batch, time_s="", ratio_to_ref="",
                                 model_s=f"{m['time']:.5f}",
                                 model_allreduce_s=f"{m['allreduce']:.6f}",
                                 model_ratio_to_ref=f"{m['time'] / m16:.3f}"))
    print(f"P={P}  N={a.layers}  conv width {a.width} {a.size}x{a.size}  global batch {a.batch}"
          f"  message latency {cal.latency * 1e6:.1f} us, bandwidth {cal.bandwidth / 1e9:.2f} "
          f"GB/s  ({cal.info['messages']}); ratios to {ref[0]} x {ref[1]} (measured here) "
          f"and to 16 x 16 (modelled at 256 ranks, batch {a.scale_batch}; "
          f"model-default-net: latency {pm.DEFAULT_LATENCY * 1e6:.0f} us, bandwidth "
          f"{pm.DEFAULT_BANDWIDTH / 1e9:.0f} GB/s)")
    print(f"{'kind':<17} {'mode':<15} {'D x L':>9} {'measured':>9} {'ratio':>6} {'model':>9} "
          f"{'allred.':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['kind']:<17} {r['mode']:<15} {r['D']:>4} x {r['L']:<3} {r['time_s']:>9} "
              f"{r['ratio_to_ref']:>6} {r['model_s']:>9} {r['model_allreduce_s']:>9} "
              f"{r['model_ratio_to_ref']:>6}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
