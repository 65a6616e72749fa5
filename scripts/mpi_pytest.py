"""Run pytest on every rank of COMM_WORLD.  Rank 0 prints to the terminal; the
other ranks write to <prefix>-rank<r>.log (shown when they fail).  Each rank
writes a JUnit file <prefix>-rank<r>.xml.  Exits non-zero on every rank if any
rank failed."""
import argparse
import os
import sys

from mpi4py import MPI
import pytest


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--log-prefix", required=True)
    p.add_argument("pytest_args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    args = [x for x in a.pytest_args if x != "--"]
    # as `python -m pytest` does: the current directory on the path, so that
    # tests import their helpers as `tests.<module>`
    sys.path.insert(0, os.getcwd())
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    args += [f"--junitxml={a.log_prefix}-rank{rank}.xml", "-p", "no:cacheprovider"]
    log = f"{a.log_prefix}-rank{rank}.log"
    if rank != 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    rc = int(pytest.main(args))
    failed = rc not in (0, 5)
    sys.stdout.flush()
    all_failed = comm.gather(failed, root=0)
    if rank == 0:
        for r, f in enumerate(all_failed):
            if f and r != 0:
                print(f"---- rank {r} failed; its output ({a.log_prefix}-rank{r}.log):")
                with open(f"{a.log_prefix}-rank{r}.log") as fh:
                    print(fh.read()[-20000:])
    any_failed = comm.allreduce(failed, op=MPI.LOR)
    sys.exit(1 if any_failed else 0)


if __name__ == "__main__":
    main()
