#!/usr/bin/env bash
# The whole test suite against Debian's Open MPI instead of the MPICH wheel
# (the route of the README's "Building against a cluster's MPI"): installs
# openmpi-bin and libopenmpi-dev if mpicc is not Open MPI's, builds mpi4py and
# layerpar with MPICC=mpicc into their own environment .venv-openmpi, and runs
# the tests from outside the source tree so that they import that build.
# layerpar is built from a copy of the sources without build outputs: the
# in-place core of .venv and the build/ folder it shares would otherwise be
# taken as up to date and installed, linked to the other MPI.
# Run as root (containers) Open MPI needs --allow-run-as-root; the variables
# below say so to every mpirun, the tests' own included.  CI keeps
# scripts/run_tests.sh (the MPICH wheel).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
VENV=${VENV:-$REPO/.venv-openmpi}
PY=${PYTHON:-python3}

if ! mpicc --showme:version 2>/dev/null | grep -q "Open MPI"; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev
fi
export MPICC=mpicc
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install -q -c constraints.txt setuptools wheel Cython numpy
"$VENV/bin/python" -m pip install -q --no-binary=mpi4py --no-build-isolation --force-reinstall \
    --no-deps mpi4py
SRC=$(mktemp -d)
tar -C "$REPO" --exclude=./.git --exclude=./build --exclude='./.venv*' --exclude=./runs \
    --exclude='./.test-logs*' --exclude='*.so' --exclude=./braid_ext/_core.c -cf - . |
    tar -C "$SRC" -xf -
"$VENV/bin/python" -m pip install -q -c constraints.txt --no-build-isolation "$SRC[test]"
rm -rf "$SRC"
(cd / && "$VENV/bin/python" -c "import mpi4py.MPI as M, braid_ext; v = M.Get_library_version(); \
c = braid_ext.build_info()['compiler']; assert 'Open MPI' in v and c == 'mpicc', (v, c); \
print('layerpar (Open MPI) ready:', v.splitlines()[0])")

# Open MPI 4 (OMPI_*) and 5 (PRTE_*): run as root, more ranks than cores.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
export PATH="$VENV/bin:$PATH"
LOGS=$REPO/.test-logs-openmpi
rm -rf "$LOGS" && mkdir -p "$LOGS"
RUN=$(mktemp -d)  # not the source tree: `import braid_ext` must find the installed build
cd "$RUN"
status=0
python -m pytest -q --with-mpi -p no:cacheprovider --rootdir="$REPO" \
    --junitxml="$LOGS/np1.xml" "$REPO/tests" "$@" || status=1
for n in 2 4; do
  echo "== MPI tests on $n ranks (Open MPI)"
  timeout 1200 mpirun --allow-run-as-root --oversubscribe -n "$n" \
      python "$REPO/scripts/mpi_pytest.py" --log-prefix "$LOGS/np$n" -- \
      -q --only-mpi --rootdir="$REPO" "$REPO/tests" "$@" || status=1
done
echo "== layout and transfer tests on 3 ranks (Open MPI)"
timeout 600 mpirun --allow-run-as-root --oversubscribe -n 3 \
    python "$REPO/scripts/mpi_pytest.py" --log-prefix "$LOGS/np3" -- \
    -q --only-mpi --rootdir="$REPO" "$REPO/tests/test_transfer.py" "$REPO/tests/test_layout.py" \
    "$@" || status=1
python "$REPO/scripts/test_summary.py" "$LOGS" || status=1
cd "$REPO" && rm -rf "$RUN"
exit $status
