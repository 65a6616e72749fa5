"""Rank 0's memory and the time of a checkpoint save and load: the parallel
format (each rank writes and reads its own part) against gathering the model
on rank 0 (each rank pickles its layers, rank 0 receives them all, builds one
HDF5 file in memory and writes it; a load reads it on rank 0 and sends each
rank its layers).

For N = 32, 128, 512 residual layers of fixed width (weights, bias and an
Adam-like optimiser state per layer, float64), split in blocks over the
ranks, it reports per method:

  traced_kib   rank 0's peak of Python/numpy allocations during the save
               (tracemalloc; torch's own memory is not traced)
  rss_kib      rank 0's peak resident memory during the save above its
               resident memory before (VmHWM after resetting it)
  save_s       wall time of the save (median of --repeat, max over ranks)
  load_s       wall time of a load of every rank's own layers

and prints, side by side, gather / parallel for each.  Run it as
    mpiexec -n 2 python benchmarks/bench_checkpoint.py
Writes benchmarks/results/checkpoint_memory.csv (the rows of this number of
ranks; those of other numbers stay).
"""
import argparse
import csv
import io
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc

import h5py
import torch
from mpi4py import MPI

from layerpar.checkpoint import load_checkpoint, save_checkpoint
from layerpar.checkpoint.format import read_entry, write_entry

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FIELDS = ["ranks", "layers", "width", "method", "model_kib", "traced_kib", "rss_kib",
          "save_s", "load_s"]


def state_of(comm, n_layers, width):
    rank, size = comm.Get_rank(), comm.Get_size()
    lo, hi = rank * n_layers // size, (rank + 1) * n_layers // size
    layers, opt = {}, {}
    for n in range(lo, hi):
        g = torch.Generator().manual_seed(n)
        layers[n] = {"weight": torch.randn(width, width, generator=g, dtype=torch.float64),
                     "bias": torch.randn(width, generator=g, dtype=torch.float64)}
        opt[n] = {k: {"exp_avg": torch.randn_like(v), "exp_avg_sq": torch.rand_like(v),
                      "step": torch.tensor(3.0)} for k, v in layers[n].items()}
    return {"num_layers": n_layers, "epoch": 0, "step": 1, "config": {"width": width},
            "layers": layers, "optimizer": {"layers": opt, "hyper": [{"lr": 1e-3}]}}


# ---------------------------------------------------------------- the baseline

def gather_save(path, comm, state):
    """Every rank -> rank 0: its pickled state; rank 0 writes one file."""
    parts = comm.gather(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL), root=0)
    if comm.Get_rank() == 0:
        merged = [pickle.loads(p) for p in parts]
        del parts
        image = io.BytesIO()
        with h5py.File(image, "w") as f:
            for st in merged:
                for n, params in st["layers"].items():
                    write_entry(f, f"layer.{n}", {"params": params,
                                                  "optimizer": st["optimizer"]["layers"][n]},
                                f"layers/{n}")
        with open(path, "wb") as fh:
            fh.write(image.getbuffer())
            os.fsync(fh.fileno())
    comm.Barrier()


def gather_load(path, comm, wanted):
    """Rank 0 reads the file; rank 0 -> rank r: the layers rank r wants."""
    asks = comm.gather(wanted, root=0)
    out = None
    if comm.Get_rank() == 0:
        with h5py.File(path, "r") as f:
            out = [{n: read_entry(f[f"layer.{n}"], str(n)) for n in ask} for ask in asks]
    return comm.scatter(out, root=0)


# ----------------------------------------------------------------- measuring

def rss_reset():
    """Reset this process's peak resident memory; its resident memory now (KiB)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status("VmRSS")


def _status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rank0_memory(comm, save):
    """Rank 0's traced peak and resident peak growth (KiB) during save()."""
    comm.Barrier()
    root = comm.Get_rank() == 0
    if root:
        rss0 = rss_reset()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
    save()
    out = None
    if root:
        traced = (tracemalloc.get_traced_memory()[1] - base) / 1024
        tracemalloc.stop()
        out = (traced, _status("VmHWM") - rss0)
    return comm.bcast(out, root=0)


def timed(comm, fn, repeat):
    times = []
    for _ in range(repeat):
        comm.Barrier()
        t = time.perf_counter()
        fn()
        times.append(comm.allreduce(time.perf_counter() - t, op=MPI.MAX))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(RESULTS, "checkpoint_memory.csv"))
    a = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)
    folder = comm.bcast(tempfile.mkdtemp(prefix="lp-bench-ckpt-") if rank == 0 else None, root=0)
    rows = []
    try:
        warm = state_of(comm, 8, a.width)   # first-use costs (imports, caches) outside the figures
        save_checkpoint(os.path.join(folder, "warm.h5"), comm, warm)
        gather_save(os.path.join(folder, "warm-g.h5"), comm, warm)
        for n in a.layers:
            st = state_of(comm, n, a.width)
            mine = sorted(st["layers"])
            per_layer = (a.width * a.width + a.width) * 8 * 3 / 1024  # weights, 2 moments
            for method in ("parallel", "gather"):
                path = os.path.join(folder, f"{method}-{n}.h5")
                if method == "parallel":
                    save = lambda: save_checkpoint(path, comm, st)  # noqa: E731
                    load = lambda: load_checkpoint(path, comm, layer_indices=mine)  # noqa: E731
                else:
                    save = lambda: gather_save(path, comm, st)  # noqa: E731
                    load = lambda: gather_load(path, comm, mine)  # noqa: E731
                traced, rss = rank0_memory(comm, save)
                row = {"ranks": size, "layers": n, "width": a.width, "method": method,
                       "model_kib": round(n * per_layer), "traced_kib": round(traced, 1),
                       "rss_kib": rss, "save_s": round(timed(comm, save, a.repeat), 4),
                       "load_s": round(timed(comm, load, a.repeat), 4)}
                rows.append(row)
    finally:
        comm.Barrier()
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
    if rank != 0:
        return
    print(f"{size} ranks, width {a.width}: rank 0 during a save, and the times "
          "(gather / parallel measured side by side)")
    print(f"{'layers':>6} {'model KiB':>9} | {'traced KiB par':>14} {'gather':>8} {'ratio':>6} | "
          f"{'rss KiB par':>11} {'gather':>7} | {'save s par':>10} {'gather':>7} {'ratio':>6} | "
          f"{'load s par':>10} {'gather':>7} {'ratio':>6}")
    for n in a.layers:
        p, g = [next(r for r in rows if r["layers"] == n and r["method"] == m)
                for m in ("parallel", "gather")]
        print(f"{n:>6} {p['model_kib']:>9} | {p['traced_kib']:>14} {g['traced_kib']:>8} "
              f"{g['traced_kib'] / p['traced_kib']:>6.1f} | {p['rss_kib']:>11} {g['rss_kib']:>7} | "
              f"{p['save_s']:>10} {g['save_s']:>7} {g['save_s'] / p['save_s']:>6.2f} | "
              f"{p['load_s']:>10} {g['load_s']:>7} {g['load_s'] / p['load_s']:>6.2f}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    kept = []   # the rows of other rank counts stay
    if os.path.exists(a.out):
        with open(a.out, newline="") as fh:
            kept = [r for r in csv.DictReader(fh) if int(r["ranks"]) != size]
    with open(a.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(sorted(kept + rows, key=lambda r: int(r["ranks"])))
    print(f"wrote {a.out}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
