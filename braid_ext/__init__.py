"""braid_ext: a multigrid-reduction-in-time (MGRIT) solver with a C core.

    from mpi4py import MPI
    from braid_ext import Solver
    from braid_ext.examples.dahlquist import Dahlquist

    solver = Solver(Dahlquist(lam=-1.0), MPI.COMM_WORLD, 0.0, 1.0, 1024,
                    max_levels=3, cfactor=4, relax="FCF", abs_tol=1e-12)
    residuals = solver.solve()

An app is any object with the methods step, init, clone, sum, norm, bufsize,
pack and unpack (free and access optional); NumpyApp supplies all but step
and init for numpy vectors.  Optional attributes: ``adds_rhs = True`` if step
adds status.rhs itself (implicit schemes), ``pure_step = True`` if step never
modifies its input and always returns a new object (then clones are lazy and
cost nothing; objects held by the solver must then never be modified).

``hierarchy(nsteps, max_levels=..., cfactor=..., min_coarse=...)`` gives the
grid levels a solver builds, ``Layout`` which rank holds which step,
``check_options`` and ``relax_sweeps`` the options' checks and grammar
(``braid_ext.options``): the one definition of each, for every user.
"""
from mpi4py import MPI as _MPI  # noqa: F401  (loads the MPI library before the core)

from braid_ext._core import (
    AccessStatus,
    Layout,
    MGRITError,
    MGRITTimeoutError,
    NonFiniteResidualError,
    Solver,
    StepStatus,
    build_info,
    check_app,
    hierarchy,
    mpi_cuda_support,
)
from braid_ext.numpy_app import NumpyApp
from braid_ext.options import Level, OptionError, check_options, relax_sweeps

__all__ = [
    "Solver",
    "Layout",
    "StepStatus",
    "AccessStatus",
    "MGRITError",
    "MGRITTimeoutError",
    "NonFiniteResidualError",
    "NumpyApp",
    "check_app",
    "check_options",
    "hierarchy",
    "Level",
    "relax_sweeps",
    "OptionError",
    "build_info",
    "mpi_cuda_support",
]
