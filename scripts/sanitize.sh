#!/usr/bin/env bash
# The MGRIT core under AddressSanitizer (with LeakSanitizer) and
# UndefinedBehaviorSanitizer: the C driver (braid_ext/examples/c/scalar_driver.c)
# built with -fsanitize=address,undefined, run under mpiexec on 1, 2 and 4
# ranks with several hierarchies, cycles, the skipped down-cycle, both
# storage options, repeated warm-started solves ending at max_iter, and the
# timeout (polling) path.  Any report (leak, invalid access, undefined
# behaviour) or a wrong result fails.
# (valgrind is not used: it reports the MPI library's own start-up and takes
# minutes per case.)
#
#   scripts/sanitize.sh
#
# Uses $MPICC / $MPIEXEC, else the ones beside .venv/bin/python, else PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
[ -x "$bin/mpicc" ] || bin=/work/main/.venv/bin
MPICC=${MPICC:-$( [ -x "$bin/mpicc" ] && echo "$bin/mpicc" || command -v mpicc )}
MPIEXEC=${MPIEXEC:-$( [ -x "$bin/mpiexec" ] && echo "$bin/mpiexec" || command -v mpiexec )}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
src=braid_ext/src
exe=$out/scalar_driver

$MPICC -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
  -fno-sanitize-recover=undefined -Wall -I$src braid_ext/examples/c/scalar_driver.c \
  $src/*.c -lm -o "$exe"
# leaks inside the MPI library itself are not ours: report only leaks whose
# stack passes through the core or the driver
cat > "$out/lsan.supp" <<'EOF'
leak:libmpi
leak:libucs
leak:libucp
leak:libfabric
leak:libhwloc
EOF
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=99
export LSAN_OPTIONS=suppressions=$out/lsan.supp:print_suppressions=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:exitcode=98
run=("$exe")

fail=0
cases=(
  "-n 1000 -levels 3 -cf 4 -nrelax 1"
  "-n 777 -levels 4 -cf 2 -nrelax 0 -cycle F"
  "-n 513 -levels 2 -cf 8 -nrelax 2 -forward -lambda -4"
  "-n 64 -levels 1"
  "-n 1000 -levels 3 -cf 4 -nrelax 1 -timeout 30"
  "-n 1000 -levels 3 -cf 4 -nrelax 0 -skip -final -maxiter 3 -drives 8"
  "-n 777 -levels 4 -cf 2 -nrelax 1 -cycle F -skip -storeall -final -maxiter 2 -drives 12"
  "-n 64 -levels 1 -final -drives 2"
)
for np in 1 2 4; do
  for c in "${cases[@]}"; do
    log=$out/log
    # shellcheck disable=SC2086
    if ! timeout 300 "$MPIEXEC" -n $np "${run[@]}" $c -quiet >"$log" 2>&1; then
      echo "FAIL  np=$np  $c"; sed 's/^/    /' "$log" | head -40; fail=1; continue
    fi
    if grep -qE "ERROR: (Address|Leak)Sanitizer|runtime error:" "$log"; then
      echo "FAIL  np=$np  $c (sanitizer report)"; sed 's/^/    /' "$log" | head -40; fail=1; continue
    fi
    err=$(awk '/^summary/ {for (i = 2; i < NF; i += 2) if ($i == "error") print $(i + 1)}' "$log")
    if [ -z "$err" ] || ! awk -v e="$err" 'BEGIN { exit !(e + 0 <= 1e-9) }'; then
      echo "FAIL  np=$np  $c (error against sequential stepping: '${err}')"; fail=1; continue
    fi
    echo "ok    np=$np  $c  (error $err)"
  done
done
if [ $fail -ne 0 ]; then
  echo "sanitize: FAILED"
  exit 1
fi
echo "sanitize (ASan + UBSan): clean on 1, 2 and 4 ranks, ${#cases[@]} cases each"
