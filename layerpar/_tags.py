"""The MPI tags of layerpar's point-to-point messages, handed out by purpose.

Several protocols send point-to-point messages on the same communicator (a
network's communicator carries its ghost weights, its transfers between
depths, its penalty exchange and the watchdog's liveness messages; the
pipeline's micro-batches travel with the watchdog's too).  A message is
matched by (communicator, source, tag), and a protocol that probes for any
source (the watchdog answering pings) takes whatever message carries its
tag: two protocols must never share a tag.  Every tag comes from here:

    tag("transfer.restrict")            a fixed tag, one per purpose
    tag("pipeline.forward", i)          a tag that carries an index

Fixed tags lie in [0, FIXED_ROOM).  Each indexed purpose has a band of its
own above them: the tags from FIXED_ROOM to MPI_TAG_UB shared out equally,
so an index must be below the band's width (``width()``; thousands of
layers with the smallest MPI_TAG_UB the standard allows, 32767, and over a
hundred million with MPICH's); a larger one is a ValueError naming the
purpose and the bound.  MPI_TAG_UB is read on COMM_WORLD, where the
standard puts it (Open MPI leaves it off split communicators); it is the
same for every communicator of the job.

The MGRIT core (braid_ext/src/comm.c) sends its messages on its own
duplicate of the solver's communicator (``MPI_Comm_dup`` in core.c), so
its tags can never meet these: ``CORE_TAGS`` records them (sweep messages
tagged by grid level, below MG_MAX_LEVELS; the core's own liveness
protocol, ping/pong/notice, above), and a test checks comm.c against it.
The core's liveness protocol and the watchdog's (``layerpar._watchdog``)
follow one scheme (at the deadline ping every other rank, name the ranks
that do not answer, send the verdict to the others), each on its own
communicator: the core's while a rank waits inside a solve, the
watchdog's while it waits anywhere else.
"""
from mpi4py import MPI

__all__ = ["CORE_TAGS", "FIXED", "FIXED_ROOM", "INDEXED", "ranges", "tag", "width"]

# One tag each.  Append new purposes at the end: a tag never changes meaning.
FIXED = (
    "watchdog.ping",               # "are you alive?" at a deadline
    "watchdog.answer",             # "yes": the answer to a ping
    "watchdog.notice",             # the verdict: which ranks are silent
    "transfer.prolong",            # source layers for prolong (transfer.py)
    "transfer.restrict",           # ... for restrict
    "transfer.restrict_gradient",  # ... for restrict_gradient
    "penalty.from_left",           # the smoothness penalty's neighbour layers (optim.py)
    "penalty.from_right",
    "calibration.ping_pong",       # the latency measurement (perfmodel.py)
    "ghost.header",                # coarse-grid weights: versions, flags (engine/ghosts.py)
    "ghost.weights",               # ... the changed layers' tensors, flat
    "context.batch",               # a pass's context, first rank -> its users (engine/carry.py)
)
FIXED_ROOM = 64  # fixed tags lie below this; indexed bands start here

# One band each; the index is what the tag carries.
INDEXED = (
    "pipeline.forward",            # micro-batch i, forward pass (pipeline.py)
    "pipeline.backward",           # micro-batch i, backward pass
)

# The MGRIT core's tags, on its private duplicate communicator (comm.c).
CORE_TAGS = {"sweep": (0, 32), "sweep.header": (32, 64), "ping": 1001, "pong": 1002, "notice": 1003}

assert len(FIXED) <= FIXED_ROOM and len(set(FIXED)) == len(FIXED)
_FIXED = {name: k for k, name in enumerate(FIXED)}
_INDEXED = {name: k for k, name in enumerate(INDEXED)}
_tag_ub = None  # MPI_TAG_UB, read once
_band = None    # width() of this job


def _bound():
    global _tag_ub
    if _tag_ub is None:
        _tag_ub = int(MPI.COMM_WORLD.Get_attr(MPI.TAG_UB))
    return _tag_ub


def width(tag_ub=None):
    """The number of indices each indexed purpose has: its band's width
    (``tag_ub``: MPI_TAG_UB, by default this job's)."""
    top = _bound() if tag_ub is None else tag_ub
    return (top + 1 - FIXED_ROOM) // len(INDEXED)


def ranges(tag_ub=None):
    """{purpose: range of its tags} for every purpose (``tag_ub`` as in
    ``width``): the registry's whole allocation, for tests and readers."""
    band = width(tag_ub)
    out = {name: range(k, k + 1) for name, k in _FIXED.items()}
    for name, k in _INDEXED.items():
        lo = FIXED_ROOM + k * band
        out[name] = range(lo, lo + band)
    return out


def tag(purpose, index=None):
    """The tag of ``purpose``: one of FIXED (no index) or one of INDEXED
    with ``index``, an int from 0 to ``width() - 1``.  ValueError for an
    unknown purpose, a missing or extra index, or an index whose tag would
    exceed MPI_TAG_UB."""
    if index is None:
        k = _FIXED.get(purpose)
        if k is None:
            hint = " (it carries an index)" if purpose in _INDEXED else ""
            raise ValueError(f"no fixed MPI tag for {purpose!r}{hint}; fixed tags: "
                             f"{', '.join(FIXED)}")
        return k
    k = _INDEXED.get(purpose)
    if k is None:
        hint = " (a fixed tag: no index)" if purpose in _FIXED else ""
        raise ValueError(f"no indexed MPI tags for {purpose!r}{hint}; indexed tags: "
                         f"{', '.join(INDEXED)}")
    global _band
    if _band is None:
        _band = width()
    band = _band
    if not 0 <= index < band:
        raise ValueError(f"{purpose} index {index} has no MPI tag: this MPI's MPI_TAG_UB="
                         f"{_bound()} leaves room for indices 0..{band - 1}")
    return FIXED_ROOM + k * band + int(index)
