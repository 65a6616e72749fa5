# cython: language_level=3, boundscheck=False, wraparound=False
"""The MGRIT solver core, driven by a Python application object.

A Python app supplies the vector operations and the time step as methods;
the C core calls them through the trampolines below.  Vectors are arbitrary
Python objects (numpy arrays, torch tensors, ...), held by the core in small
boxes.
"""
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.buffer cimport PyBUF_READ, PyBUF_WRITE
from libc.stdint cimport int64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset

from braid_ext.mgrit cimport *

cimport cython
from mpi4py import MPI

from braid_ext import options as _options


class MGRITError(RuntimeError):
    """An MGRIT solve failed.  ``code`` is the core's error code; ``rank``
    the rank where a callback failed first (or -1)."""

    def __init__(self, message, code=MG_ERR_STATE, rank=-1):
        super().__init__(message)
        self.code = code
        self.rank = rank


class MGRITTimeoutError(MGRITError, TimeoutError):
    """A rank did not answer within the solver's ``timeout``: ``rank`` names
    it.  The communicator may hold unfinished messages afterwards; the solver
    cannot be used again, and the job should end (``comm.Abort``)."""


class NonFiniteResidualError(MGRITError, FloatingPointError):
    """The MGRIT residual became NaN or Inf; ``index`` is the first fine-grid
    point (time index, or layer index for a network) where it did."""

    def __init__(self, message, index):
        super().__init__(message, MG_ERR_NONFINITE)
        self.index = index


_MIXED = {}  # the failing exception's type -> a subclass of MGRITError and it


def _kinds(err):
    """How the type of ``err`` travels to another rank: (module, qualified
    name) of its exception classes, most derived first."""
    return tuple((c.__module__, c.__qualname__) for c in type(err).__mro__
                 if issubclass(c, BaseException))


def _remote_error(text, code, rank, kinds):
    """MGRITError(text, code, rank) raised where no callback failed, of the
    failing exception's type too (the first of ``kinds`` this process knows,
    among the modules already imported), so that ``except FloatingPointError``
    catches a layer's NaN report on every rank.  Named MGRITError; plain
    where the type is unknown here or cannot be a base class."""
    import sys
    like = None
    for module, qualname in kinds or ():
        obj = sys.modules.get(module)
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, type) and issubclass(obj, Exception):
            like = obj
            break
    cls = MGRITError
    if like is not None and not issubclass(MGRITError, like):
        cls = _MIXED.get(like)
        if cls is None:
            try:
                cls = type("MGRITError", (MGRITError, like),
                           {"__module__": MGRITError.__module__, "__doc__": MGRITError.__doc__,
                            "like": like, "__str__": BaseException.__str__})
                cls("a test instance", code, rank)
            except Exception:  # a type that takes no such subclass: plain MGRITError
                cls = MGRITError
            _MIXED[like] = cls
    return cls(text, code, rank)


cdef int CHKERR(int code) except -1:
    """Raise for a non-zero status of a C call that involves no callback."""
    if code == MG_OK:
        return 0
    msg = mg_ErrorString(code).decode()
    if code == MG_ERR_ARG:
        raise ValueError(msg)
    if code == MG_ERR_MEMORY:
        raise MemoryError(msg)
    raise MGRITError(msg, code)


# ---------------------------------------------------------------------------
# vectors: a box around one Python object
#
# For an app whose step never modifies its input (``pure_step = True``) a
# clone is lazy: the new box shares the object, and the copy is made only if
# a shared object is about to be modified in place (by sum, or by a step that
# returned its input).  The core's clone-then-step then costs no copy at all.
# The boxes that share one object form a ring; a box is shared while its ring
# holds another box, so the last holder of an object never copies it.

ctypedef struct Box:
    PyObject *obj
    Box *prev
    Box *next

cdef inline mg_Vector box_new(object o) except NULL:
    cdef Box *b = <Box*>malloc(sizeof(Box))
    if b == NULL:
        raise MemoryError()
    Py_INCREF(o)
    b.obj = <PyObject*>o
    b.prev = b
    b.next = b
    return <mg_Vector>b

cdef inline mg_Vector box_share(mg_Vector u) except NULL:
    """A new box holding u's object, in u's ring."""
    cdef Box *a = <Box*>u
    cdef Box *b = <Box*>box_new(<object>a.obj)
    b.prev = a
    b.next = a.next
    a.next.prev = b
    a.next = b
    return <mg_Vector>b

cdef inline void box_unlink(Box *b) noexcept:
    b.prev.next = b.next
    b.next.prev = b.prev
    b.prev = b
    b.next = b

cdef inline bint box_shared(mg_Vector u) noexcept:
    return (<Box*>u).next != <Box*>u

cdef inline void box_set(mg_Vector u, object o):
    cdef Box *b = <Box*>u
    Py_INCREF(o)
    Py_DECREF(<object>b.obj)
    b.obj = <PyObject*>o
    box_unlink(b)

cdef inline object box_get(mg_Vector u):
    return <object>(<Box*>u).obj


# ---------------------------------------------------------------------------
# status objects handed to step and access (valid only during the call)

cdef class StepStatus:
    """What a step is told: ``level`` (0 = fine), ``index`` and
    ``index_stop`` (fine-grid indices of the step's start and end points),
    ``t_start``, ``t_stop``, ``iter``, ``final`` (True in the last fine
    sweep, which takes every fine step once at the final state) and ``rhs``
    (the FAS right-hand side, or None).  Valid only during the callback."""
    cdef readonly int level
    cdef readonly int64_t index
    cdef readonly int64_t index_stop
    cdef readonly double t_start
    cdef readonly double t_stop
    cdef readonly int iter
    cdef readonly bint final
    cdef readonly object rhs

    def __repr__(self):
        return (f"StepStatus(level={self.level}, index={self.index}, "
                f"t_start={self.t_start}, t_stop={self.t_stop}, iter={self.iter}, "
                f"rhs={'None' if self.rhs is None else 'set'})")


cdef class AccessStatus:
    """What access is told: ``index`` (fine-grid point), ``t``, ``iter``
    and ``done``.  Valid only during the callback."""
    cdef readonly int64_t index
    cdef readonly double t
    cdef readonly int iter
    cdef readonly bint done


# ---------------------------------------------------------------------------
# the bridge: the Python app's bound methods, the first exception raised by
# any of them, and the time spent inside them

_REQUIRED = ("step", "init", "clone", "sum", "norm", "bufsize", "pack", "unpack")

# The core holds a borrowed pointer to the bridge and calls it until the core
# is destroyed: the garbage collector must never clear it first.
@cython.no_gc_clear
cdef class _Bridge:
    cdef object app
    cdef object f_step, f_init, f_clone, f_free, f_sum, f_norm
    cdef object f_bufsize, f_pack, f_unpack, f_access
    cdef bint adds_rhs
    cdef bint pure_step
    cdef StepStatus step_status
    cdef AccessStatus access_status
    cdef object error
    cdef double app_time
    cdef int64_t held       # vectors the core holds now (boxes not yet freed)
    cdef int64_t held_peak  # the most it held at once since the last solve began
    cdef mg_Ops ops

    def __cinit__(self, app):
        missing = [m for m in _REQUIRED if not callable(getattr(app, m, None))]
        if missing:
            raise TypeError(
                f"app {type(app).__name__} lacks the method(s) {', '.join(missing)}; "
                f"an MGRIT app needs {', '.join(_REQUIRED)} (free and access are optional)")
        self.app = app
        self.f_step = app.step
        self.f_init = app.init
        self.f_clone = app.clone
        self.f_free = getattr(app, "free", None)
        self.f_sum = app.sum
        self.f_norm = app.norm
        self.f_bufsize = app.bufsize
        self.f_pack = app.pack
        self.f_unpack = app.unpack
        self.f_access = getattr(app, "access", None)
        self.adds_rhs = bool(getattr(app, "adds_rhs", False))
        self.pure_step = bool(getattr(app, "pure_step", False))
        self.step_status = StepStatus.__new__(StepStatus)
        self.access_status = AccessStatus.__new__(AccessStatus)
        self.error = None
        self.app_time = 0.0
        self.held = self.held_peak = 0
        memset(&self.ops, 0, sizeof(mg_Ops))
        self.ops.step = _step
        self.ops.init = _init
        self.ops.clone = _clone
        self.ops.free = _free
        self.ops.sum = _sum
        self.ops.norm = _norm
        self.ops.bufsize = _bufsize
        self.ops.bufpack = _bufpack
        self.ops.bufunpack = _bufunpack
        if self.f_access is not None:
            self.ops.access = _access

    cdef int fail(self, BaseException exc) noexcept:
        if self.error is None:
            self.error = exc
        return 1

    cdef inline void took(self) noexcept:
        # the core took one more vector (a new box)
        self.held += 1
        if self.held > self.held_peak:
            self.held_peak = self.held

    cdef object take_error(self):
        e, self.error = self.error, None
        return e

    cdef object own(self, mg_Vector u):
        """The box's object, copied first if another box shares it (it is
        about to be modified in place)."""
        cdef Box *bx = <Box*>u
        cdef double t0
        if box_shared(u):
            t0 = MPI_Wtime()
            try:
                v = self.f_clone(<object>bx.obj)
            finally:
                self.app_time += MPI_Wtime() - t0
            box_set(u, v)
        return <object>bx.obj


# The trampolines: the core runs without the GIL (other Python threads go on
# while a rank waits for messages); each trampoline takes the GIL, never lets
# an exception escape, and returns 0 or 1.

cdef int _step(mg_App app, mg_Vector u, const mg_StepStatus *st) noexcept with gil:
    cdef _Bridge b = <_Bridge><void*>app
    cdef StepStatus s = b.step_status
    cdef double t0
    try:
        s.level = st.level
        s.index = st.index
        s.index_stop = st.index_stop
        s.t_start = st.t_start
        s.t_stop = st.t_stop
        s.iter = st.iter
        s.final = st.final
        s.rhs = box_get(st.rhs) if st.rhs != NULL else None
        x = box_get(u) if b.pure_step else b.own(u)
        t0 = MPI_Wtime()
        try:
            v = b.f_step(x, s)
            if v is None:
                raise TypeError(f"{type(b.app).__name__}.step returned None; "
                                "it must return the new state")
        finally:
            b.app_time += MPI_Wtime() - t0
        if v is not x:
            box_set(u, v)
        try:
            if st.rhs != NULL and not b.adds_rhs:
                v = b.own(u)
                t0 = MPI_Wtime()
                try:
                    box_set(u, b.f_sum(1.0, s.rhs, 1.0, v))
                finally:
                    b.app_time += MPI_Wtime() - t0
        finally:
            s.rhs = None
        return 0
    except BaseException as e:
        return b.fail(e)

cdef int _init(mg_App app, double t, int64_t index, mg_Vector *out) noexcept with gil:
    cdef _Bridge b = <_Bridge><void*>app
    cdef double t0 = MPI_Wtime()
    try:
        try:
            v = b.f_init(t, index)
        finally:
            b.app_time += MPI_Wtime() - t0
        if v is None:
            raise TypeError(f"{type(b.app).__name__}.init returned None")
        out[0] = box_new(v)
        b.took()
        return 0
    except BaseException as e:
        return b.fail(e)

cdef int _clone(mg_App app, mg_Vector u, mg_Vector *out) noexcept with gil:
    cdef _Bridge b = <_Bridge><void*>app
    cdef double t0 = MPI_Wtime()
    try:
        if b.pure_step:
            out[0] = box_share(u)
            b.took()
            return 0
        try:
            v = b.f_clone(box_get(u))
        finally:
            b.app_time += MPI_Wtime() - t0
        out[0] = box_new(v)
        b.took()
        return 0
    except BaseException as e:
        return b.fail(e)

cdef int _free(mg_App app, mg_Vector u) noexcept with gil:
    cdef _Bridge b = <_Bridge><void*>app
    cdef Box *bx = <Box*>u
    cdef double t0
    try:
        if b.f_free is not None:
            t0 = MPI_Wtime()
            try:
                b.f_free(<object>bx.obj)
            finally:
                b.app_time += MPI_Wtime() - t0
        return 0
    except BaseException as e:
        return b.fail(e)
    finally:
        box_unlink(bx)
        Py_DECREF(<object>bx.obj)
        free(bx)
        b.held -= 1

cdef int _sum(mg_App app, double a, mg_Vector x, double c, mg_Vector y) noexcept with gil:
    cdef _Bridge b = <_Bridge><void*>app
    cdef double t0
    try:
        yv = b.own(y)
        t0 = MPI_Wtime()
        try:
            v = b.f_sum(a, box_get(x), c, yv)
        finally:
            b.app_time += MPI_Wtime() - t0
        if v is None:
            raise TypeError(f"{type(b.app).__name__}.sum returned None; "
                            "it must return alpha*x + beta*y")
        box_set(y, v)
        return 0
    except BaseException as e:
        return b.fail(e)

cdef int _norm(mg_App app, mg_Vector u, double *out) noexcept with gil:
    cdef _Bridge b = <_Bridge><void*>app
    cdef double t0 = MPI_Wtime()
    try:
        try:
            out[0] = float(b.f_norm(box_get(u)))
        finally:
            b.app_time += MPI_Wtime() - t0
        return 0
    except BaseException as e:
        return b.fail(e)

cdef int _bufsize(mg_App app, size_t *out) noexcept with gil:
    cdef _Bridge b = <_Bridge><void*>app
    try:
        n = int(b.f_bufsize())
        if n < 0:
            raise ValueError(f"{type(b.app).__name__}.bufsize returned {n} < 0")
        out[0] = n
        return 0
    except BaseException as e:
        return b.fail(e)

cdef int _bufpack(mg_App app, mg_Vector u, void *buf, size_t size) noexcept with gil:
    cdef _Bridge b = <_Bridge><void*>app
    cdef double t0 = MPI_Wtime()
    try:
        mv = PyMemoryView_FromMemory(<char*>buf, size, PyBUF_WRITE)
        try:
            b.f_pack(box_get(u), mv)
        finally:
            b.app_time += MPI_Wtime() - t0
            mv.release()
        return 0
    except BaseException as e:
        return b.fail(e)

cdef int _bufunpack(mg_App app, const void *buf, size_t size, mg_Vector *out) noexcept with gil:
    cdef _Bridge b = <_Bridge><void*>app
    cdef double t0 = MPI_Wtime()
    try:
        mv = PyMemoryView_FromMemory(<char*>buf, size, PyBUF_READ)
        try:
            v = b.f_unpack(mv)
        finally:
            b.app_time += MPI_Wtime() - t0
            mv.release()
        out[0] = box_new(v)
        b.took()
        return 0
    except BaseException as e:
        return b.fail(e)

cdef int _access(mg_App app, mg_Vector u, const mg_AccessStatus *st) noexcept with gil:
    cdef _Bridge b = <_Bridge><void*>app
    cdef AccessStatus s = b.access_status
    cdef double t0 = MPI_Wtime()
    try:
        s.index = st.index
        s.t = st.t
        s.iter = st.iter
        s.done = st.done
        try:
            b.f_access(box_get(u), s)
        finally:
            b.app_time += MPI_Wtime() - t0
        return 0
    except BaseException as e:
        return b.fail(e)


# ---------------------------------------------------------------------------
# options: braid_ext.options checks every one (before the core is created, on
# every rank alike, so a bad option raises everywhere before any work)

if MG_MAX_LEVELS != _options.MAX_LEVELS:
    raise ImportError(f"braid_ext.options.MAX_LEVELS = {_options.MAX_LEVELS} but the core "
                      f"was built with MG_MAX_LEVELS = {MG_MAX_LEVELS}: rebuild braid_ext")

def _need(cond, message):
    if not cond:
        raise ValueError(message)

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)

def _comm_handle(comm):
    if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
        raise TypeError(f"comm must be an mpi4py intracommunicator, not {comm!r}")
    return MPI._addressof(comm)


cdef class Layout:
    """Which rank holds which layer: ``nlayers`` layers (steps) over ``size``
    ranks, as every solver of the core distributes them (forward order).

    Fine points 1..nlayers form ``size`` contiguous blocks of nearly equal
    size, point 0 goes with the first; layer n (the step from point n to
    n+1) is held by the rank that owns point n+1.  Needs 1 <= size <= nlayers.
    """
    cdef readonly int64_t nlayers
    cdef readonly int size

    def __init__(self, nlayers, size):
        _need(_is_int(nlayers) and nlayers >= 1,
              f"nlayers={nlayers!r}: the number of layers must be an integer >= 1")
        _need(_is_int(size) and size >= 1,
              f"size={size!r}: the number of ranks must be an integer >= 1")
        _need(size <= nlayers,
              f"size={size} is larger than nlayers={nlayers}: every rank must hold at "
              "least one layer; use fewer ranks or more layers")
        self.nlayers = nlayers
        self.size = size

    cdef int _rank(self, q) except -1:
        if not _is_int(q) or not 0 <= q < self.size:
            raise IndexError(f"rank {q!r} out of range 0..{self.size - 1}")
        return q

    def block(self, q):
        """(lo, hi): the fine points of time-ordered rank ``q``."""
        cdef int64_t lo = 0, hi = -1
        CHKERR(mg_BlockRange(self.nlayers, self.size, self._rank(q), &lo, &hi))
        return lo, hi

    def layers(self, q):
        """The global indices of the layers rank ``q`` holds (a range)."""
        lo, hi = self.block(q)
        return range(max(lo, 1) - 1, hi)

    def owner(self, n):
        """The rank that holds layer ``n`` (IndexError outside 0..nlayers-1)."""
        cdef int q = -1
        if not _is_int(n) or not 0 <= n < self.nlayers:
            raise IndexError(f"layer {n!r} out of range 0..{self.nlayers - 1}")
        CHKERR(mg_LayerOwner(self.nlayers, self.size, n, &q))
        return q

    def __eq__(self, other):
        if not isinstance(other, Layout):
            return NotImplemented
        return self.nlayers == (<Layout>other).nlayers and self.size == (<Layout>other).size

    def __hash__(self):
        return hash((Layout, self.nlayers, self.size))

    def __reduce__(self):
        return (Layout, (self.nlayers, self.size))

    def __repr__(self):
        return f"Layout(nlayers={self.nlayers}, size={self.size})"


def hierarchy(nsteps, *, max_levels=2, cfactor=2, min_coarse=2):
    """The grid levels a Solver of ``nsteps`` steps builds with these
    options (the core's own computation): a tuple of ``Level(n, stride,
    cfactor)``, fine grid first; level l has points 0..n, point j is fine
    point j*stride, and cfactor is the factor to the next level (0 on the
    coarsest).  ``cfactor`` is one factor or a per-level list whose last
    entry holds below.  Bad values raise as in Solver."""
    _options.check_option("min_coarse", min_coarse)
    _options.check_option("max_levels", max_levels)
    cfactors = _options.per_level("cfactor", cfactor)
    _need(_is_int(nsteps) and nsteps >= 1, f"nsteps={nsteps!r}: must be an integer >= 1")
    cdef int cf[MG_MAX_LEVELS]
    cdef int64_t n[MG_MAX_LEVELS]
    cdef int64_t stride[MG_MAX_LEVELS]
    cdef int nlevels = 0, k
    for k in range(len(cfactors)):
        cf[k] = cfactors[k]
    CHKERR(mg_Hierarchy(nsteps, max_levels, min_coarse, cf, len(cfactors), &nlevels,
                        n, stride))
    return tuple(_options.Level(n[k], stride[k],
                                cfactors[min(k, len(cfactors) - 1)] if k + 1 < nlevels else 0)
                 for k in range(nlevels))


# __dealloc__ frees the app's vectors through the bridge: the garbage
# collector must not clear the bridge before.
@cython.no_gc_clear
cdef class Solver:
    """MGRIT solver of  u_0 = app.init(t_start, 0),  u_i = app.step(u_{i-1})
    on ``nsteps`` uniform steps from ``t_start`` to ``t_stop``, with the time
    points split in contiguous blocks over the ranks of ``comm``.

    Options (keyword-only):
      max_levels   number of grid levels (1 = sequential stepping across ranks)
      cfactor      coarsening factor >= 2, or a list per level
      min_coarse   coarsen while the coarse grid keeps >= this many steps
      relax        'F', 'FCF', 'FCFCF', ... or a list per level
      cycle        'V' or 'F'
      skip         skip relaxation on the first down-cycle (coarse initial guess);
                   that cycle computes no residual, so the history starts
                   at r_1 (unless the solve is warm-started)
      abs_tol, rel_tol   stop when the residual norm <= abs_tol or
                   <= rel_tol * first residual norm (r_0, or r_1 with skip);
                   a tolerance of 0 is off (both 0: exactly max_iter
                   iterations)
      max_iter     maximum number of MGRIT iterations per solve
      tnorm        'l2' or 'inf': norm of the residual over C-points
      store        'all' keeps every fine point; 'C' C-points and the last
                   (one level: the first and the last point; a NaN or Inf
                   is then reported at the last point).  A rank may then
                   keep no point; a solve starts warm only where every rank
                   that keeps one holds a solution
      reverse      the last rank holds t_start (solves backward in time)
      warm_start   a new solve starts from the last solution
      step_cost, latency   virtual clock: cost of one step (per level) and of
                   one message
      final_sweep  after the last iteration take every fine step once more at
                   the final state, with status.final set (a one-level solve
                   always has status.final set)
      timeout      seconds any wait for other ranks may last (None or 0: no
                   limit); a rank that stops answering then makes the others
                   raise MGRITTimeoutError naming it.  The same on every rank.

    The solve runs without the GIL (it is taken for each call of the app), so
    other Python threads go on while this rank waits for messages.  Call
    ``close()`` (collective) or use ``with``: the solver holds a duplicate of
    ``comm``.
    """
    cdef mg_Core core
    cdef bint busy
    cdef _Bridge bridge
    cdef readonly object comm
    cdef readonly int64_t nsteps
    cdef readonly double t_start, t_stop
    cdef readonly dict options

    def __cinit__(self):
        self.core = NULL

    def __init__(self, app, comm, double t_start, double t_stop, nsteps, *,
                 max_levels=2, cfactor=2, min_coarse=2, relax="FCF", cycle="V",
                 skip=False, abs_tol=1e-10, rel_tol=0.0, max_iter=100,
                 tnorm="l2", store="all", reverse=False, warm_start=True,
                 step_cost=1.0, latency=0.0, final_sweep=False, timeout=None):
        addr = _comm_handle(comm)
        checked = _options.check_options(
            nsteps, comm.Get_size(), t_start=t_start, t_stop=t_stop, max_levels=max_levels,
            cfactor=cfactor, min_coarse=min_coarse, relax=relax, cycle=cycle, skip=skip,
            abs_tol=abs_tol, rel_tol=rel_tol, max_iter=max_iter, tnorm=tnorm, store=store,
            reverse=reverse, warm_start=warm_start, step_cost=step_cost, latency=latency,
            final_sweep=final_sweep, timeout=timeout)
        cfactors, nrelax, costs = checked["cfactor"], checked["nrelax"], checked["step_cost"]

        self.bridge = _Bridge(app)
        self.comm = comm
        self.nsteps = nsteps
        self.t_start = t_start
        self.t_stop = t_stop
        self.options = dict(max_levels=max_levels, cfactor=cfactor, min_coarse=min_coarse,
                            relax=relax, cycle=cycle, skip=bool(skip), abs_tol=abs_tol,
                            rel_tol=rel_tol, max_iter=max_iter, tnorm=tnorm, store=store,
                            reverse=bool(reverse), warm_start=bool(warm_start),
                            step_cost=step_cost, latency=latency,
                            final_sweep=bool(final_sweep), timeout=timeout)

        cdef MPI_Comm c = (<MPI_Comm*><uintptr_t>addr)[0]
        cdef int rc = mg_Init(c, t_start, t_stop, nsteps, <mg_App><void*>self.bridge,
                              &self.bridge.ops, &self.core)
        if rc == MG_ERR_ARG:  # every other argument was checked above
            raise ValueError(f"app {type(app).__name__}: an access method must exist on "
                             "every rank or on none")
        CHKERR(rc)
        CHKERR(mg_SetMaxLevels(self.core, max_levels))
        CHKERR(mg_SetMinCoarse(self.core, min_coarse))
        self._per_level_set(cfactors, 0)
        self._per_level_set(nrelax, 1)
        self._per_level_set(costs, 2)
        CHKERR(mg_SetCycle(self.core, MG_CYCLE_V if cycle == "V" else MG_CYCLE_F))
        CHKERR(mg_SetSkip(self.core, int(skip)))
        CHKERR(mg_SetAbsTol(self.core, abs_tol))
        CHKERR(mg_SetRelTol(self.core, rel_tol))
        CHKERR(mg_SetMaxIter(self.core, max_iter))
        CHKERR(mg_SetTemporalNorm(self.core, MG_TNORM_L2 if tnorm == "l2" else MG_TNORM_INF))
        CHKERR(mg_SetStoreAll(self.core, int(store == "all")))
        CHKERR(mg_SetReverse(self.core, int(reverse)))
        CHKERR(mg_SetWarmStart(self.core, int(warm_start)))
        CHKERR(mg_SetLatency(self.core, latency))
        CHKERR(mg_SetFinalSweep(self.core, int(final_sweep)))
        CHKERR(mg_SetTimeout(self.core, float(timeout or 0.0)))

    cdef _per_level_set(self, list values, int which):
        # a single value is for all levels; a list sets levels 0..k-1 and its
        # last entry holds for the levels below
        cdef int level
        for level in range(MG_MAX_LEVELS):
            v = values[min(level, len(values) - 1)]
            if which == 0:
                CHKERR(mg_SetCFactor(self.core, level, v))
            elif which == 1:
                CHKERR(mg_SetNRelax(self.core, level, v))
            else:
                CHKERR(mg_SetStepCost(self.core, level, v))

    def __dealloc__(self):
        # After MPI_Finalize nothing may call MPI any more: the process ends.
        cdef int finalized = 0
        MPI_Finalized(&finalized)
        if self.core != NULL and not finalized:
            mg_Destroy(&self.core)

    cdef inline void _alive(self) except *:
        if self.core == NULL:
            raise MGRITError("the solver is closed")
        if self.busy:
            raise MGRITError("the solver is in a solve (called from another thread or "
                             "from one of its own callbacks)")

    def close(self):
        """Free the core, every vector it holds and its duplicate of the
        communicator.  Collective.  A closed solver raises on use; closing
        twice does nothing."""
        if self.busy:
            raise MGRITError("close() during a solve")
        if self.core != NULL:
            mg_Destroy(&self.core)
            self.bridge.take_error()

    @property
    def closed(self):
        return self.core == NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def solve(self):
        """Run MGRIT to the tolerance or ``max_iter``.  Collective.  Returns
        the residual norms.  A callback that raises on one rank makes every
        rank raise: the original exception here, MGRITError elsewhere."""
        self._alive()
        self.bridge.app_time = 0.0
        self.bridge.held_peak = self.bridge.held
        cdef int rc
        cdef int fail_rank = -1, fail_code = 0
        cdef int64_t index = -1
        self.busy = True
        try:
            with nogil:
                rc = mg_Drive(self.core)
        finally:
            self.busy = False
        if rc == MG_OK:
            return self.residual_norms
        mg_GetFailure(self.core, &fail_rank, &index)
        mg_GetFailureCode(self.core, &fail_code)
        err = self.bridge.take_error()
        if rc == MG_ERR_TIMEOUT:
            limit = self.options["timeout"]
            raise MGRITTimeoutError(
                f"MGRIT solve abandoned on rank {self.comm.Get_rank()}: rank {fail_rank} did "
                f"not answer within the timeout of {limit:g} s (it may hang or have died)",
                rc, fail_rank)
        if (rc == MG_ERR_REMOTE and fail_code == MG_ERR_CALLBACK) or rc == MG_ERR_CALLBACK:
            # every rank is here and knows fail_rank: tell them what happened
            what = kinds = None
            if self.comm.Get_rank() == fail_rank:
                what = f"{type(err).__name__}: {err}" if err is not None else "unknown error"
                kinds = _kinds(err) if err is not None else None
            # the failing rank -> every rank: what it raised, and the exception's type
            what, kinds = self.comm.bcast((what, kinds), root=fail_rank) if fail_rank >= 0 \
                else ("unknown error", None)
            if rc == MG_ERR_CALLBACK and err is not None:
                raise err
            raise _remote_error(f"MGRIT solve abandoned: a callback raised on rank {fail_rank}: "
                                f"{what}", rc, fail_rank, kinds)
        if rc == MG_ERR_REMOTE:
            # an MPI call or an allocation failed there (no message is sent:
            # the communication itself may be what failed)
            what = mg_ErrorString(fail_code).decode() if fail_code else "unknown error"
            raise MGRITError(f"MGRIT solve abandoned: {what} on rank {fail_rank}",
                             rc, fail_rank)
        if rc == MG_ERR_MPI or rc == MG_ERR_MEMORY:
            msg = (f"MGRIT solve abandoned on every rank: {mg_ErrorString(rc).decode()} on "
                   f"rank {self.comm.Get_rank()}")
            if rc == MG_ERR_MEMORY:
                raise MemoryError(msg)
            raise MGRITError(msg, rc, self.comm.Get_rank())
        if rc == MG_ERR_NONFINITE:
            raise NonFiniteResidualError(
                f"MGRIT: NaN or Inf in the states or residual, first at fine index {index}",
                index)
        CHKERR(rc)

    @property
    def iterations(self):
        """MGRIT iterations of the last solve."""
        self._alive()
        cdef int it = 0
        CHKERR(mg_GetNumIter(self.core, &it))
        return it

    @property
    def nlevels(self):
        """Grid levels of the last solve."""
        self._alive()
        cdef int n = 0
        CHKERR(mg_GetNumLevels(self.core, &n))
        return n

    @property
    def residual_norms(self):
        """Residual norms of the last solve: r_0 after the first relaxation,
        then one per iteration (empty for a one-level, sequential solve).
        With skip=True and a cold start the first down-cycle computes no
        residual: the list starts at r_1 and has one entry fewer."""
        self._alive()
        cdef int n = 0
        CHKERR(mg_GetResidualNorms(self.core, NULL, 0, &n))
        cdef double *buf = <double*>malloc((n if n > 0 else 1) * sizeof(double))
        if buf == NULL:
            raise MemoryError()
        try:
            CHKERR(mg_GetResidualNorms(self.core, buf, n, &n))
            return [buf[k] for k in range(n)]
        finally:
            free(buf)

    @property
    def rank(self):
        return self.comm.Get_rank()

    def local_range(self, int level=0):
        """The points [lo, hi] of ``level`` this rank owns (lo > hi: none),
        as indices of that level."""
        self._alive()
        cdef int64_t lo = 0, hi = -1
        CHKERR(mg_GetLocalRange(self.core, level, &lo, &hi))
        return lo, hi

    def layout(self):
        """The Layout of this solver's steps over its ranks (forward order;
        a reversed solve mirrors it)."""
        self._alive()
        return Layout(self.nsteps, self.comm.Get_size())

    def level_size(self, int level):
        """(n, stride): the level has points 0..n, point j is fine point j*stride."""
        self._alive()
        cdef int64_t n = 0, stride = 0
        CHKERR(mg_GetLevelSize(self.core, level, &n, &stride))
        return n, stride

    def is_stored(self, int64_t index):
        """Is fine point ``index`` (owned here) held after the solve?"""
        self._alive()
        cdef int s = 0
        CHKERR(mg_IsStored(self.core, index, &s))
        return bool(s)

    def get(self, int64_t index):
        """The solution at fine point ``index`` (owned here and stored)."""
        self._alive()
        cdef mg_Vector u = NULL
        cdef int rc = mg_GetVector(self.core, index, &u)
        if rc != MG_OK:
            raise ValueError(f"index={index}: no solution is held for this point on rank "
                             f"{self.rank} (not owned, not stored, or no successful solve)")
        return box_get(u)

    def set(self, int64_t index, u):
        """Hold ``u`` (kept, not copied) as the solution at fine point
        ``index`` (owned here and stored): with warm_start, the initial guess
        of the next solve, e.g. states saved by ``get`` and restored.  Local;
        the solver warm-starts once every stored point it owns is set."""
        self._alive()
        cdef mg_Vector v = box_new(u)
        cdef int rc = mg_SetVector(self.core, index, v)
        if rc != MG_OK:
            Py_DECREF(<object>(<Box*>v).obj)  # not taken: a new box, in no ring
            free(<Box*>v)
            raise ValueError(f"index={index}: not a stored point owned by rank {self.rank}")
        self.bridge.took()

    def stats(self, bint reduce=False):
        """Statistics of the last solve on this rank, or over all ranks
        (``reduce=True``, collective: counts summed, times maximised).
        ``app_time`` is the time inside the app's methods, ``callback_time``
        that time plus the binding's own work around each call.
        ``vectors_held``: the vectors the solver holds now (between solves:
        its stored points, the warm start of the next solve);
        ``vectors_peak``: the most it held at once during the last solve
        (a lazy clone counts as a vector; local on this rank even with
        ``reduce``)."""
        self._alive()
        cdef mg_Stats st
        CHKERR(mg_GetStats(self.core, int(reduce), &st))
        app_time = self.bridge.app_time
        if reduce:
            app_time = self.comm.allreduce(app_time, op=MPI.MAX)
        return dict(iterations=st.iterations, nlevels=st.nlevels,
                    steps=[st.steps[l] for l in range(st.nlevels)],
                    calls=st.calls, messages=st.messages, bytes=st.bytes,
                    callback_time=st.callback_time, app_time=app_time,
                    total_time=st.total_time, virtual_time=st.virtual_time,
                    vectors_held=self.bridge.held, vectors_peak=self.bridge.held_peak)


cdef extern from *:
    """
    #ifndef BRAID_EXT_COMPILER
    #define BRAID_EXT_COMPILER "unknown"
    #endif
    #define BRAID_EXT_STR2(x) #x
    #define BRAID_EXT_STR(x) BRAID_EXT_STR2(x)
    static const char *braid_ext_mpi_version = BRAID_EXT_STR(MPI_VERSION) "." BRAID_EXT_STR(MPI_SUBVERSION);
    """
    const char *BRAID_EXT_COMPILER
    const char *braid_ext_mpi_version


def build_info():
    """How the core was built: the MPI compiler wrapper and the MPI standard
    version of the headers it was compiled against."""
    return {"compiler": BRAID_EXT_COMPILER.decode(), "mpi_version": braid_ext_mpi_version.decode()}


def check_app(app, double t=0.0):
    """Test an app's clone, sum, norm and pack/unpack round trip on the vector
    ``app.init(t, 0)``.  Raises the app's own exception, or ValueError saying
    which property does not hold."""
    cdef _Bridge b = _Bridge(app)
    cdef char msg[512]
    cdef int rc
    with nogil:
        rc = mg_CheckApp(<mg_App><void*>b, &b.ops, t, msg, sizeof(msg))
    err = b.take_error()
    if err is not None:
        raise err
    if rc != MG_OK:
        raise ValueError(f"check_app({type(app).__name__}): {msg.decode()}")
