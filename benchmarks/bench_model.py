"""Measured time per training step against layerpar.perfmodel's prediction,
side by side, on 1, 2 and 4 ranks.

The conv network of benchmarks/_netbench.py (opening, N residual conv
layers, closing, cross-entropy, SGD step; one torch thread per rank) takes
training steps in each setting: serial, the exact pipeline with 4
micro-batches, layer-parallel (2 levels F-relaxation with the skipped
first down-cycle, 2 levels FCF, 3 levels F with skip; 2 forward / 1
backward iterations) and one-shot (2 levels, 1 / 1, warm-started).  Each
round first calibrates the step (collective: step costs on every rank at
once, the solver's own costs per step and per pass, the opening, closing
and loss, the optimiser step, and on two or more ranks a message
ping-pong), then times one training step of every setting; the model of
each step uses that round's calibration, so that load on a shared machine
meets both alike.  Reported: medians over the rounds of the predicted and
measured seconds and of their ratio (measured / predicted), and the model
of the steps alone (without the solver's own costs, the pass costs, the
ends and the optimiser step).

    python benchmarks/bench_model.py [--ranks 1,2,4] [--rounds 5]
runs `mpiexec -n P` for each P (a P above the number of cores is
oversubscribed: marked so) and writes benchmarks/results/model_vs_measured.csv
and calibration_{wall,cpu}_P{P}.json.  Under mpiexec with --worker: one P.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
FIELDS = ["config", "ranks", "oversubscribed", "mode", "setting", "clock", "predicted_s",
          "measured_s", "ratio", "within_15pct", "predicted_steps_only_s", "ratio_steps_only"]
CLOCKS = ("wall", "cpu")


def worker(a):
    import torch
    from mpi4py import MPI

    sys.path.insert(0, HERE)
    from _netbench import ConvNet, settings
    from layerpar import perfmodel as pm

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, P = comm.Get_rank(), comm.Get_size()
    bench = ConvNet(layers=a.layers, width=a.width, size=a.size, batch=a.batch)
    runs = []
    for name, mode, model_kw, net_kw in settings():
        net = bench.network(comm, **net_kw)
        runs.append((name, mode, model_kw, net, bench.trainer(net)))
    for *_, step in runs:
        step()  # warm-up (and the one-shot solver's first, cold solve)
    # per clock and setting: the rounds' measured and predicted seconds
    measured = {(c, r[0]): [] for c in CLOCKS for r in runs}
    predicted = {(c, r[0]): [] for c in CLOCKS for r in runs}
    bare = {(c, r[0]): [] for c in CLOCKS for r in runs}
    for _ in range(a.rounds):
        cals = {c: bench.calibrate(comm, clock=c) for c in CLOCKS}
        for name, mode, kw, _, step in runs:
            comm.Barrier()
            t, c = time.perf_counter(), time.process_time()
            step()
            comm.Barrier()
            t, c = time.perf_counter() - t, time.process_time() - c
            measured["wall", name].append(t)
            # the CPU seconds of the rank that took most
            measured["cpu", name].append(comm.allreduce(c, op=MPI.MAX))
            for clock, cal in cals.items():
                steps_only = pm.Calibration(cal.costs, latency=cal.latency,
                                            bandwidth=cal.bandwidth, batch=cal.batch,
                                            row_bytes=cal.row_bytes)
                predicted[clock, name].append(
                    pm.training_step(cal, a.layers, P, mode, **kw)["time"])
                bare[clock, name].append(
                    pm.training_step(steps_only, a.layers, P, mode, **kw)["time"])
    for *_, net, _ in runs:
        net.close()
    if rank != 0:
        return
    for clock, cal in cals.items():
        cal.save(os.path.join(a.results, f"calibration_{clock}_P{P}.json"))
    config = f"conv N={a.layers} width={a.width} {a.size}x{a.size} batch={a.batch} float32"
    over = P > (os.cpu_count() or 1)
    rows = []
    for clock in CLOCKS:
        for name, mode, kw, _, _ in runs:
            key = clock, name
            ratio = statistics.median(m / p for m, p in zip(measured[key], predicted[key]))
            ratio_b = statistics.median(m / p for m, p in zip(measured[key], bare[key]))
            rows.append(dict(config=config, ranks=P, oversubscribed="yes" if over else "no",
                             mode=mode, setting=name, clock=clock,
                             predicted_s=f"{statistics.median(predicted[key]):.5f}",
                             measured_s=f"{statistics.median(measured[key]):.5f}",
                             ratio=f"{ratio:.3f}",
                             within_15pct="yes" if abs(ratio - 1) <= 0.15 else "no",
                             predicted_steps_only_s=f"{statistics.median(bare[key]):.5f}",
                             ratio_steps_only=f"{ratio_b:.3f}"))
    with open(a.csv, "a", newline="") as fh:
        w = csv.DictWriter(fh, FIELDS)
        if fh.tell() == 0:
            w.writeheader()
        w.writerows(rows)
    for clock, cal in cals.items():
        c = cal.to_dict()
        print(f"P={P}{' (oversubscribed)' if over else ''} {clock}: step costs "
              + "  ".join(f"{k} {cal.step(k) * 1e6:.0f} us" for k in pm.KINDS)
              + f"; solver {c['overhead'] * 1e6:.0f} us/step, {c['solve_fixed'] * 1e3:.2f} "
              f"ms/pass; ends {c['ends'] * 1e3:.2f} ms; optimiser {c['optimizer'] * 1e6:.0f} "
              f"us/layer; message {cal.message() * 1e6:.0f} us ({c['info']['messages']})",
              flush=True)


def spawn(a):
    ranks = [int(r) for r in a.ranks.split(",")]
    os.makedirs(a.results, exist_ok=True)
    out = os.path.join(a.results, "model_vs_measured.csv")
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    with tempfile.TemporaryDirectory() as tmp:
        part = os.path.join(tmp, "rows.csv")
        for p in ranks:
            cmd = [mpiexec, "-n", str(p), sys.executable, os.path.abspath(__file__), "--worker",
                   "--csv", part, "--results", a.results]
            for k in ("layers", "width", "size", "batch", "rounds"):
                cmd += [f"--{k}", str(getattr(a, k))]
            subprocess.run(cmd, check=True)
        with open(part) as fh:
            rows = list(csv.DictReader(fh))
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"{'P':>2} {'setting':<26} {'clock':<5} {'predicted':>9} {'measured':>9} {'ratio':>6} "
          f"{'steps only':>10} {'ratio':>6}")
    for r in rows:
        mark = " (oversubscribed)" if r["oversubscribed"] == "yes" else ""
        print(f"{r['ranks']:>2} {r['setting']:<26} {r['clock']:<5} {r['predicted_s']:>9} "
              f"{r['measured_s']:>9} "
              f"{r['ratio']:>6} {r['predicted_steps_only_s']:>10} {r['ratio_steps_only']:>6}"
              f"{mark}")
    print(f"wrote {out}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--size", type=int, default=8, help="image side")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--worker", action="store_true", help="one measurement under mpiexec")
    p.add_argument("--csv", default=None)
    a = p.parse_args()
    if a.worker:
        worker(a)
    else:
        spawn(a)


if __name__ == "__main__":
    main()
