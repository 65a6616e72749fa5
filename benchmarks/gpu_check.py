"""A device check in a few minutes: writes one CSV of measurements.

    python benchmarks/gpu_check.py --device cuda            # P = 1 checks
    mpiexec -n 2 python benchmarks/gpu_check.py --device cuda   # P = 2 checks
    python benchmarks/gpu_check.py --device cpu --quick     # the same script, here

1. exact LayerParallel (max_levels=1) vs nn.Sequential, forward + backward,
   N = 64, the overhead benchmark's networks (conv, small-conv, small-dense;
   target <= 1.10 on a GPU): one rank.
2. layer-parallel training step (2 levels, cfactor 4, 2/1 iterations) at
   P = the ranks of the run, with transport 'host' and 'device'.
3. the same step in bfloat16 vs float32.
4. bitwise: the host and device transports' outputs and gradients agree.

Repetitions alternate between the variants; the median is reported.  With
--device cuda the rank's GPU is cuda:(rank mod the GPUs).  Appends to
benchmarks/results/gpu_check.csv (--out to change).
"""
import argparse
import csv
import os
import statistics
import time

import torch
from mpi4py import MPI

from layerpar import ConvStep, DenseStep, LayerParallel
from braid_ext import mpi_cuda_support

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WORLD = MPI.COMM_WORLD
PRESETS = {
    "conv": (lambda: ConvStep(8, 3, "relu"), (32, 8, 28, 28)),
    "small-conv": (lambda: ConvStep(4, 3, "relu"), (2, 4, 4, 4)),
    "small-dense": (lambda: DenseStep(8, "tanh"), (4, 8)),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(fns, reps, device, comm):
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            comm.Barrier()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            comm.Barrier()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def step_fn(body, x, comm):
    """Forward + backward of a LayerParallel body (loss 0.5 |u_N|^2 / B)."""
    def fn():
        body.zero_grad()
        out = body(x if comm.Get_rank() == 0 else None)
        last = comm.Get_rank() == comm.Get_size() - 1
        loss = 0.5 * (out.float() ** 2).sum() / x.shape[0] if last else out.sum() * 0.0
        loss.backward()
        return out
    return fn


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--quick", action="store_true", help="few layers and repetitions")
    p.add_argument("--out", default=os.path.join(RESULTS, "gpu_check.csv"))
    a = p.parse_args()
    if a.quick:
        a.layers, a.reps = 8, 3
    torch.set_num_threads(1)
    rank, P = WORLD.Get_rank(), WORLD.Get_size()
    device = torch.device(a.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []

    def row(check, variant, dtype, transport, seconds, ratio="", note=""):
        rows.append(dict(check=check, variant=variant, ranks=P, device=name,
                         dtype=str(dtype).removeprefix("torch."), transport=transport,
                         ms=f"{seconds * 1e3:.3f}" if seconds != "" else "",
                         ratio=ratio if ratio == "" else f"{ratio:.3f}", note=note))

    # 1. exact vs nn.Sequential on one rank (rank 0's device; others wait)
    if rank == 0:
        for preset, (make, shape) in PRESETS.items():
            exact = LayerParallel(lambda n: make(), a.layers, 1.0, MPI.COMM_SELF,
                                  max_levels=1).to(device)
            seq = exact.serial_equivalent().to(device)
            x = torch.randn(shape, device=device)

            def fb(net):
                def fn():
                    net.zero_grad()
                    (0.5 * (net(x) ** 2).sum()).backward()
                return fn
            t = median_times({"exact": fb(exact), "seq": fb(seq)}, a.reps, device,
                             MPI.COMM_SELF)
            row("exact vs nn.Sequential", preset, torch.float32, "-", t["exact"],
                t["exact"] / t["seq"], f"N={a.layers}, nn.Sequential {t['seq'] * 1e3:.3f} ms")
            exact.close()
    WORLD.Barrier()

    # 2-4. layer-parallel steps: transports and dtypes
    make, shape = PRESETS["conv"]
    torch.manual_seed(0)
    x0 = torch.randn(shape, device=device)
    opts = dict(max_levels=2, cfactor=4, fwd_iters=2, bwd_iters=1, relax="F", skip=True)
    bodies, fns, outs = {}, {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        for transport in ("host", "device"):
            body = LayerParallel(lambda n: make(), a.layers, 1.0, WORLD, transport=transport,
                                 **opts).to(device=device, dtype=dtype)
            key = (dtype, transport)
            bodies[key] = body
            fns[key] = step_fn(body, x0.to(dtype), WORLD)
    t = median_times(fns, a.reps, device, WORLD)
    base = t[(torch.float32, "host")]
    for (dtype, transport), s in t.items():
        row("layer-parallel step", "conv 2 levels cf 4", dtype, transport, s, s / base,
            f"ratio to float32 host; MPI CUDA support {mpi_cuda_support()}")
    for dtype in (torch.float32, torch.bfloat16):
        outs = {}
        for transport in ("host", "device"):
            body = bodies[(dtype, transport)]
            out = fns[(dtype, transport)]()
            outs[transport] = (out.detach().cpu(), [q.grad.detach().cpu().clone()
                                                    for q in body.parameters()],
                               body.last_forward["residual_norms"])
        h, d = outs["host"], outs["device"]
        same = (torch.equal(h[0], d[0]) and h[2] == d[2]
                and all(torch.equal(g, k) for g, k in zip(h[1], d[1])))
        same = all(WORLD.allgather(same))
        row("host == device bitwise", "conv 2 levels cf 4", dtype, "both", "",
            note=f"{'bitwise equal' if same else 'DIFFERENT'}")
    for body in bodies.values():
        body.close()

    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        new = not os.path.exists(a.out)
        with open(a.out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
        for r in rows:
            print(", ".join(f"{k}={v}" for k, v in r.items() if v != ""))


if __name__ == "__main__":
    main()
