"""Type stubs of braid_ext._core, the compiled MGRIT solver (see _core.pyx).

The names starting with an underscore exist only here, for type checkers:
the application protocol and the dictionary returned by Solver.stats().
"""
from types import TracebackType
from typing import Any, Literal, Optional, Protocol, Sequence, TypedDict, TypeVar, Union

from mpi4py import MPI

from braid_ext.options import Level

_V = TypeVar("_V")  # the app's vector type

_Relax = str  # 'F', 'FCF', 'FCFCF', ...: F-relaxation followed by CF sweeps


class _App(Protocol[_V]):
    """What a Solver needs of an app (free and access are optional; the
    attributes ``adds_rhs`` and ``pure_step`` are optional flags)."""

    def init(self, t: float, index: int) -> _V: ...
    def step(self, u: _V, status: StepStatus) -> _V: ...
    def clone(self, u: _V) -> _V: ...
    def sum(self, a: float, x: _V, b: float, y: _V) -> _V: ...
    def norm(self, u: _V) -> float: ...
    def bufsize(self) -> int: ...
    def pack(self, u: _V, buf: memoryview) -> None: ...
    def unpack(self, buf: memoryview) -> _V: ...


class _Stats(TypedDict):
    iterations: int
    nlevels: int
    steps: list[int]          # step calls per level
    calls: int                # all callback calls
    messages: int             # point-to-point messages sent
    bytes: int                # bytes in those messages
    buffers: int              # message buffers the solve allocated (kept for the next)
    callback_time: float      # seconds inside callbacks, binding included
    app_time: float           # seconds inside the app's methods
    total_time: float         # seconds inside the solve
    virtual_time: float       # modelled parallel time (virtual clock)
    vectors_held: int         # vectors the solver holds now (this rank)
    vectors_peak: int         # the most it held at once in the last solve (this rank)


class MGRITError(RuntimeError):
    """An MGRIT solve failed; ``code`` is the core's error code, ``rank``
    the rank where a callback failed first (or -1)."""

    code: int
    rank: int

    def __init__(self, message: str, code: int = ..., rank: int = ...) -> None: ...


class MGRITTimeoutError(MGRITError, TimeoutError):
    """A rank did not answer within the solver's timeout; ``rank`` names it.
    The solver cannot be used again."""


class NonFiniteResidualError(MGRITError, FloatingPointError):
    """The residual became NaN or Inf; ``index`` is the first fine-grid
    point where it did."""

    index: int

    def __init__(self, message: str, index: int) -> None: ...


class StepStatus:
    """What a step is told.  Valid only during the callback."""

    @property
    def level(self) -> int: ...
    @property
    def index(self) -> int: ...
    @property
    def index_stop(self) -> int: ...
    @property
    def t_start(self) -> float: ...
    @property
    def t_stop(self) -> float: ...
    @property
    def iter(self) -> int: ...
    @property
    def final(self) -> bool: ...
    @property
    def rhs(self) -> Any: ...


class AccessStatus:
    """What access is told.  Valid only during the callback."""

    @property
    def index(self) -> int: ...
    @property
    def t(self) -> float: ...
    @property
    def iter(self) -> int: ...
    @property
    def done(self) -> bool: ...


class Layout:
    """Which rank holds which layer: ``nlayers`` layers over ``size`` ranks,
    as the core distributes them (forward order)."""

    @property
    def nlayers(self) -> int: ...
    @property
    def size(self) -> int: ...

    def __init__(self, nlayers: int, size: int) -> None: ...
    def block(self, q: int) -> tuple[int, int]: ...
    def layers(self, q: int) -> range: ...
    def owner(self, n: int) -> int: ...


class Solver:
    """MGRIT solver of u_0 = app.init(t_start, 0), u_i = app.step(u_{i-1})
    on ``nsteps`` uniform steps, split over the ranks of ``comm``."""

    @property
    def comm(self) -> MPI.Intracomm: ...
    @property
    def nsteps(self) -> int: ...
    @property
    def t_start(self) -> float: ...
    @property
    def t_stop(self) -> float: ...
    @property
    def options(self) -> dict[str, Any]: ...

    def __init__(
        self,
        app: _App[Any],
        comm: MPI.Intracomm,
        t_start: float,
        t_stop: float,
        nsteps: int,
        *,
        max_levels: int = 2,
        cfactor: Union[int, Sequence[int]] = 2,
        min_coarse: int = 2,
        relax: Union[_Relax, Sequence[_Relax]] = "FCF",
        cycle: Literal["V", "F"] = "V",
        skip: bool = False,
        abs_tol: float = 1e-10,
        rel_tol: float = 0.0,
        max_iter: int = 100,
        tnorm: Literal["l2", "inf"] = "l2",
        store: Literal["all", "C"] = "all",
        reverse: bool = False,
        warm_start: bool = True,
        step_cost: Union[float, Sequence[float]] = 1.0,
        latency: float = 0.0,
        final_sweep: bool = False,
        timeout: Optional[float] = None,
        wait: Literal["busy", "sleep"] = "busy",
    ) -> None: ...

    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> "Solver": ...
    def __exit__(
        self,
        exc_type: Union[type[BaseException], None],
        exc: Union[BaseException, None],
        tb: Union[TracebackType, None],
    ) -> None: ...

    def solve(self) -> list[float]: ...
    @property
    def iterations(self) -> int: ...
    @property
    def nlevels(self) -> int: ...
    @property
    def residual_norms(self) -> list[float]: ...
    @property
    def rank(self) -> int: ...
    def local_range(self, level: int = 0) -> tuple[int, int]: ...
    def layout(self) -> Layout: ...
    def level_size(self, level: int) -> tuple[int, int]: ...
    def is_stored(self, index: int) -> bool: ...
    def get(self, index: int) -> Any: ...
    def set(self, index: int, u: Any) -> None: ...
    def stats(self, reduce: bool = False) -> _Stats: ...
    def _set_max_count(self, max_count: int) -> None: ...


def mpi_cuda_support() -> bool: ...


def build_info() -> dict[str, str]:
    """{'compiler': the MPI compiler wrapper, 'mpi_version': 'major.minor'}"""
    ...


def hierarchy(nsteps: int, *, max_levels: int = 2, cfactor: int | Sequence[int] = 2,
              min_coarse: int = 2) -> tuple[Level, ...]:
    """The grid levels a Solver builds (the core's computation), fine first."""
    ...


def check_app(app: _App[Any], t: float = 0.0) -> None: ...
