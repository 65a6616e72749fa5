#!/usr/bin/env bash
# The package as a user gets it: build the sdist and the wheel offline from a
# clean copy of the tree (the files git tracks or would track, as they are in
# the working tree: no build outputs), then the wheel from the unpacked sdist
# alone (so the sdist holds every C source), install that wheel into a fresh
# virtual environment, and run `layerpar --version` and one training epoch on
# 2 ranks with it, from a folder outside the source tree.  Fails on any
# deprecation warning about the project's own metadata.
#
# Offline: no build isolation and no index; the build tools (setuptools,
# Cython, the MPICH wheel's mpicc, build) come from .venv.  The fresh
# environment sees .venv's installed dependencies (torch, mpi4py, ...) through
# a path file, but not its editable layerpar: the package under test is the
# wheel's.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
unset PYTHONPATH
export PATH=$ROOT/.venv/bin:$PATH   # mpicc of the MPICH wheel
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 OMP_NUM_THREADS=1
work=$(mktemp -d "${TMPDIR:-/tmp}/layerpar-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
log=$work/build.log

echo "== a clean copy of the tree"
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | xargs -0 cp --parents -t "$work/src"

echo "== sdist and wheel, offline"
# (the wheel is built once, from the sdist: building it from the copy as well
# would compile the core twice)
(cd "$work/src" && "$PY" -m build --sdist --no-isolation --outdir "$work/dist" .) >"$log" 2>&1 \
  || { cat "$log"; exit 1; }
mkdir "$work/fromsdist"
tar -xzf "$work"/dist/layerpar-*.tar.gz -C "$work/fromsdist"
sdist_dir=$(echo "$work"/fromsdist/layerpar-*)
for f in braid_ext/_core.pyx braid_ext/mgrit.pxd braid_ext/src/mgrit.h braid_ext/src/drive.c LICENSE; do
  [ -e "$sdist_dir/$f" ] || { echo "the sdist lacks $f"; exit 1; }
done
"$PY" -m pip wheel --no-build-isolation --no-deps -w "$work/dist" "$sdist_dir" >>"$log" 2>&1 \
  || { cat "$log"; exit 1; }
if grep -i "deprecat" "$log"; then
  echo "the build printed deprecation warnings (above)"; exit 1
fi
wheel=$(echo "$work"/dist/layerpar-*.whl)
echo "built $(basename "$work"/dist/layerpar-*.tar.gz) and $(basename "$wheel")"

echo "== install into a fresh environment"
"$PY" -m venv "$work/venv"
site=$("$work/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
deps=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$deps" > "$site/zz-layerpar-deps.pth"   # dependencies only: a plain path, no finders
# the MPICH wheel keeps libmpi (and the libraries it loads, lib/mpich/) in
# <prefix>/lib, where mpi4py looks for it: link .venv's there, as installing
# that wheel into the environment would
for lib in "$ROOT"/.venv/lib/*; do
  case "$(basename "$lib")" in python*) continue ;; esac
  ln -s "$lib" "$work/venv/lib/"
done
"$work/venv/bin/python" -m pip install -q --no-deps "$wheel"
cd "$work"
"$work/venv/bin/python" - <<PYEOF
import layerpar, braid_ext
for m in (layerpar, braid_ext):
    assert m.__file__.startswith("$work/venv/"), f"{m.__name__} from {m.__file__}, not the wheel"
import importlib.resources as r
assert r.files("layerpar").joinpath("py.typed").is_file()
print("imports from the wheel:", layerpar.__file__)
PYEOF
"$work/venv/bin/layerpar" --version
"$ROOT/.venv/bin/mpiexec" -n 2 "$work/venv/bin/layerpar" train --set optim.epochs=1 \
    --set model.nlayers=8 --set data.batch_size=500 --run-dir "$work/run" -q
echo "check_wheel: ok"
