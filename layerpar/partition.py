"""Which rank holds which layer, and the grid hierarchy of the MGRIT solves.

The layer-time grid has points 0..N; layer n is the step from point n to
point n+1.  Points 1..N are split into P contiguous blocks (point 0 goes with
the first), and the rank that owns point n+1 owns layer n: its parameters,
its forward state u_n and its adjoint.  These formulas are the ones the
braid_ext core uses; the tests check that they agree.
"""


def fine_block(nlayers, size, q):
    """Fine points [lo, hi] of the rank q (in time order) of ``size`` ranks."""
    lo = 0 if q == 0 else 1 + (q * nlayers) // size
    hi = ((q + 1) * nlayers) // size
    return lo, hi


def local_layers(nlayers, size, rank):
    """The global indices of the layers rank ``rank`` holds (a range)."""
    lo, hi = fine_block(nlayers, size, rank)
    return range(max(lo, 1) - 1, hi)


def layer_owner(nlayers, size, n):
    """The rank that holds layer n."""
    if not 0 <= n < nlayers:
        raise IndexError(f"layer {n} out of range 0..{nlayers - 1}")
    lo, hi = 0, size - 1
    while lo < hi:  # largest q whose first layer is <= n
        mid = (lo + hi + 1) // 2
        if local_layers(nlayers, size, mid).start <= n:
            lo = mid
        else:
            hi = mid - 1
    return lo


def hierarchy(nlayers, max_levels, cfactors, min_coarse):
    """[(n_l, stride_l)]: level l has points 0..n_l, point j is fine point
    j*stride_l.  ``cfactors`` is one factor or a per-level list whose last
    entry holds below."""
    cf = list(cfactors) if isinstance(cfactors, (list, tuple)) else [cfactors]
    levels = [(nlayers, 1)]
    while len(levels) < max_levels:
        n, stride = levels[-1]
        m = cf[min(len(levels) - 1, len(cf) - 1)]
        if n // m < min_coarse:
            break
        levels.append((n // m, stride * m))
    return levels


def coarse_step_layers(nlayers, size, rank, levels):
    """The layers whose weights rank ``rank`` needs for its coarse forward
    steps: the coarse step into coarse point j of level l, taken by the owner
    of that point, uses the weights of the layer at its start, (j-1)*stride."""
    lo, hi = fine_block(nlayers, size, rank)
    need = set()
    for n_l, stride in levels[1:]:
        first = -(-lo // stride)  # ceil
        last = hi // stride
        for j in range(max(first, 1), last + 1):
            need.add((j - 1) * stride)
    return need
