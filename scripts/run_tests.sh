#!/usr/bin/env bash
# The whole test suite: every test on one process (MPI tests on a one-rank
# COMM_WORLD; pytest-xdist spreads them over the cores), then the MPI tests
# under mpiexec with 2 and 4 ranks (4 is oversubscribed on a 2-core machine),
# and the layout and transfer tests on 3 ranks (blocks of N and r*N layers
# that do not line up), and the documentation build with warnings as errors.
# Fails if any test fails on any rank, or the docs have a warning.
set -u
cd "$(dirname "$0")/.."
. .venv/bin/activate
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
# MPICH: a rank that waits for a message sleeps (nanosleep) between polls
# instead of spinning, so that with more ranks than cores (4 ranks on 2, or a
# test's child job beside the other pytest-xdist worker) the rank that is to
# send gets the core.  The tests pass it on to their child jobs.
export MPIR_CVAR_ENABLE_HEAVY_YIELD=1
rm -rf .test-logs && mkdir -p .test-logs
status=0

# The one-process part on every core (up to 4): pytest-xdist workers, a test
# at a time, except that the tests marked xdist_group(name) (those sharing a
# module fixture) run in one worker.  PYTEST_XDIST_AUTO_NUM_WORKERS=N sets
# the number of workers.
python -m pytest -q --with-mpi -n logical --maxprocesses 4 --dist loadgroup \
    --junitxml=.test-logs/np1.xml tests "$@" || status=1

for n in 2 4; do
  echo "== MPI tests on $n ranks"
  timeout 1200 mpiexec -n "$n" python scripts/mpi_pytest.py \
      --log-prefix ".test-logs/np$n" -- -q --only-mpi tests "$@" || status=1
done

echo "== layout and transfer tests on 3 ranks"
timeout 600 mpiexec -n 3 python scripts/mpi_pytest.py --log-prefix .test-logs/np3 -- \
    -q --only-mpi tests/test_transfer.py tests/test_layout.py "$@" || status=1

echo "== the C core under AddressSanitizer/UBSan on 1, 2 and 4 ranks"
scripts/sanitize.sh > .test-logs/sanitize.log 2>&1 || { cat .test-logs/sanitize.log; status=1; }
tail -1 .test-logs/sanitize.log

echo "== the documentation (sphinx-build -W: a warning is an error)"
python -m sphinx -W --keep-going -q -b html docs docs/_build/html > .test-logs/docs.log 2>&1 \
  && echo "docs: built, 0 warnings" || { cat .test-logs/docs.log; status=1; }

python scripts/test_summary.py .test-logs || status=1
exit $status
