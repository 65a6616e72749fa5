#!/usr/bin/env bash
# Create .venv (if missing) and install layerpar with its compiled MGRIT core,
# the MPICH wheel (mpicc, mpiexec, libmpi), mpi4py, the CPU build of torch,
# the test tools and the documentation tools (Sphinx, MyST, furo: the test
# command builds the docs).  Safe to run again: it reinstalls the package only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# constraints.txt pins the CPU build of torch (an open range pulls CUDA).
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,docs]"
.venv/bin/python -c "import braid_ext, mpi4py.MPI as M; print('layerpar ready:', M.Get_library_version().splitlines()[0])"
