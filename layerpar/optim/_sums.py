"""Sums over the ranks that every rank gets bitwise alike, and the flat
local vectors they are taken of (each rank holds its slice of a global
vector: the parameters of its own layers)."""
import numpy as np
import torch

from layerpar._watchdog import guard


def allsum(comm, values):
    """The sums over ``comm`` of a few local float64 values, bitwise the same
    on every rank.

    Every rank sends its partial sums to every rank (allgather) and adds them
    in rank order.  An allreduce would do, but the MPI standard does not
    promise every rank the same last bit, and the line-search decisions taken
    from these sums must agree everywhere: a rank that accepted a step while
    another backtracks would wait forever in the collective closure."""
    local = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
    parts = np.empty((comm.Get_size(), local.size), dtype=np.float64)
    guard(comm, "a gather of vector parts")
    comm.Allgather(local, parts)
    total = parts[0].copy()
    for r in range(1, parts.shape[0]):
        total += parts[r]
    return total


def flat(tensors, dtype, device):
    """The tensors as one flat local vector (empty: of ``dtype`` on ``device``)."""
    tensors = [t.reshape(-1) for t in tensors]
    if not tensors:
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.cat(tensors)


def dot(a, b):
    """The local part of a.b as a float (0 for empty slices)."""
    return float(torch.dot(a, b)) if a.numel() else 0.0
