"""Which rank holds which layer, and the grid hierarchy of the MGRIT solves.

The layer-time grid has points 0..N; layer n is the step from point n to
point n+1.  Points 1..N are split into P contiguous blocks (point 0 goes with
the first), and the rank that owns point n+1 owns layer n: its parameters,
its forward state u_n and its adjoint.  The blocks and owners come from the
braid_ext core (``braid_ext.Layout``), the one place that computes them, and
so do the grid levels of the MGRIT solves (``braid_ext.hierarchy``).
"""
from functools import lru_cache

import braid_ext
from braid_ext import Layout


@lru_cache(maxsize=64)
def layout(nlayers, size):
    """The Layout of ``nlayers`` layers over ``size`` ranks (cached)."""
    return Layout(nlayers, size)


def fine_block(nlayers, size, q):
    """Fine points [lo, hi] of the rank q (in time order) of ``size`` ranks."""
    return layout(nlayers, size).block(q)


def local_layers(nlayers, size, rank):
    """The global indices of the layers rank ``rank`` holds (a range)."""
    return layout(nlayers, size).layers(rank)


def layer_owner(nlayers, size, n):
    """The rank that holds layer n."""
    return layout(nlayers, size).owner(n)


def hierarchy(nlayers, max_levels, cfactors, min_coarse):
    """[(n_l, stride_l)]: level l has points 0..n_l, point j is fine point
    j*stride_l; the levels the core builds (``braid_ext.hierarchy``).
    ``cfactors`` is one factor or a per-level list whose last entry holds
    below."""
    return [(lev.n, lev.stride) for lev in braid_ext.hierarchy(
        nlayers, max_levels=max_levels, cfactor=cfactors, min_coarse=min_coarse)]


def coarse_step_layers(nlayers, size, rank, levels):
    """The layers whose weights rank ``rank`` needs for its coarse forward
    steps: the coarse step into coarse point j of level l, taken by the owner
    of that point, uses the weights of the layer at its start, (j-1)*stride."""
    lo, hi = layout(nlayers, size).block(rank)
    need = set()
    for n_l, stride in levels[1:]:
        first = -(-lo // stride)  # ceil
        last = hi // stride
        for j in range(max(first, 1), last + 1):
            need.add((j - 1) * stride)
    return need
