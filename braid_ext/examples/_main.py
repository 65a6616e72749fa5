"""Command line shared by the example apps: solve, print the residual history
and the error against sequential stepping (rank 0 prints)."""
import argparse

import numpy as np
from mpi4py import MPI

from braid_ext import Solver


def main(make_app, default_nsteps, default_tstop):
    p = argparse.ArgumentParser(description="MGRIT solve of an example ODE")
    p.add_argument("--nsteps", type=int, default=default_nsteps)
    p.add_argument("--tstop", type=float, default=default_tstop)
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--cfactor", type=int, default=4)
    p.add_argument("--relax", default="FCF")
    p.add_argument("--cycle", default="V")
    p.add_argument("--tol", type=float, default=1e-10)
    p.add_argument("--max-iter", type=int, default=30)
    p.add_argument("--lam", type=float, default=-1.0, help="lambda (Dahlquist)")
    args = p.parse_args()

    comm = MPI.COMM_WORLD
    app = make_app(args)
    solver = Solver(app, comm, 0.0, args.tstop, args.nsteps, max_levels=args.levels,
                    cfactor=args.cfactor, relax=args.relax, cycle=args.cycle,
                    abs_tol=args.tol, max_iter=args.max_iter)
    norms = solver.solve()

    # error against sequential stepping at the points held on this rank
    ref = app.sequential(0.0, args.tstop, args.nsteps)
    lo, hi = solver.local_range(0)
    err = max((float(np.max(np.abs(solver.get(i) - ref[i]))) for i in range(lo, hi + 1)
               if solver.is_stored(i)), default=0.0)
    err = comm.allreduce(err, op=MPI.MAX)
    st = solver.stats(reduce=True)
    if comm.rank == 0:
        print(f"MGRIT: {args.nsteps} steps on {comm.size} ranks, {solver.nlevels} levels, "
              f"cfactor {args.cfactor}, {args.relax}-relaxation, {args.cycle}-cycle")
        for k, r in enumerate(norms):
            print(f"  iteration {k:3d}   residual {r:.3e}")
        print(f"converged in {solver.iterations} iterations; max error vs sequential "
              f"stepping {err:.2e}; virtual-clock speedup over sequential "
              f"{args.nsteps / st['virtual_time']:.2f}")
    solver.close()
