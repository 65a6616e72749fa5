"""How a rank waits for messages: busy (MPI's own wait, lowest latency) or
sleeping (tests, yields of the core, then growing naps), and the automatic
choice between them.

A busy wait keeps a core.  When a node runs more ranks than the cores they
may use, a waiting rank then takes the core from a rank that has work;
``'auto'`` sleeps exactly then.
"""
import os

from mpi4py import MPI

WAITS = ("auto", "busy", "sleep")


def _cores():
    """The cores this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def oversubscribed(comm):
    """Collective over ``comm``: does any node run more of ``comm``'s ranks
    than the cores those ranks may use together?"""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        cores = set().union(*node.allgather(_cores()))
        over = node.Get_size() > len(cores)
    finally:
        node.Free()
    return bool(comm.allreduce(over, op=MPI.LOR))


def check(wait):
    """Raise ValueError naming ``wait`` unless it is one of WAITS (local: no
    message, so that a bad option is refused before any)."""
    if wait not in WAITS:
        raise ValueError(f"wait={wait!r}: choose one of {', '.join(WAITS)}")


def resolve(wait, comm):
    """'busy' or 'sleep' for the option ``wait`` (collective for 'auto', so
    that every rank chooses alike)."""
    check(wait)
    if wait != "auto":
        return wait
    if comm.Get_size() == 1:
        return "busy"
    return "sleep" if oversubscribed(comm) else "busy"
