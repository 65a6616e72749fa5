"""Build of layerpar and its compiled MGRIT core, braid_ext._core.

The core is C with MPI and is compiled with an MPI compiler wrapper: the one
named by the MPICC environment variable (a cluster's system MPI), else the
`mpicc` found on PATH (the `mpich` wheel puts one in the build environment).
"""
import os
import shlex
import shutil
import sys
from glob import glob

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def mpi_compiler():
    cc = os.environ.get("MPICC") or shutil.which("mpicc")
    if not cc:
        sys.exit("braid_ext needs an MPI C compiler wrapper: install the 'mpich' "
                 "wheel (pip install mpich) or set MPICC=/path/to/mpicc")
    return shlex.split(cc)


class BuildWithMPI(build_ext):
    """Compile and link with the MPI wrapper in place of the plain compiler."""

    def build_extensions(self):
        cc = mpi_compiler()
        for name in ("compiler_so", "linker_so"):
            cmd = getattr(self.compiler, name)
            self.compiler.set_executable(name, cc + cmd[1:])
        super().build_extensions()


def runtime_library_dirs():
    # The mpich wheel installs libmpi into <prefix>/lib; find it there at run
    # time (pip builds in a temporary environment whose paths vanish).
    lib = os.path.join(sys.prefix, "lib")
    return [lib] if glob(os.path.join(lib, "libmpi.so*")) else []


def dependencies():
    deps = ["mpi4py>=4.0", "numpy>=1.24", "torch>=2.1", "h5py>=3.8",
            "scikit-learn>=1.2", "matplotlib>=3.6", "tomli>=1.1; python_version<'3.11'"]
    # With a system MPI (MPICC set) the MPI library comes from the system.
    if not os.environ.get("MPICC"):
        deps.insert(0, "mpich")
    return deps


core = Extension(
    "braid_ext._core",
    sources=["braid_ext/_core.pyx"] + sorted(glob("braid_ext/src/*.c")),
    include_dirs=["braid_ext/src"],
    depends=glob("braid_ext/src/*.h"),
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
    define_macros=[("BRAID_EXT_COMPILER", '"%s"' % " ".join(mpi_compiler()).replace('"', ""))],
    runtime_library_dirs=runtime_library_dirs(),
)

setup(
    ext_modules=cythonize([core], language_level=3),
    cmdclass={"build_ext": BuildWithMPI},
    install_requires=dependencies(),
)
