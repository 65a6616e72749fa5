"""The examples run as written: examples/train_library.py on 1 and 2 ranks
(printing on rank 0 only), and every code block of the README, taken from
the README itself (the end-to-end tier: each starts child jobs)."""
import csv
import math
import os
import re
import subprocess
import sys

import pytest

import layerpar

from conftest import clean_mpi_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
README = os.path.join(ROOT, "README.md")


def child_env():
    """A child job's environment: the layerpar these tests import (the
    source tree, or an installed copy) first on the path."""
    env = clean_mpi_env()
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(layerpar.__file__)), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.parametrize("ranks", [1, 2])
def test_train_library_example(mpiexec, ranks):
    cmd = [mpiexec, "-n", str(ranks), sys.executable,
           os.path.join(EXAMPLES, "train_library.py"), "--epochs", "2", "--nlayers", "16"]
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1", "epoch 2"], r.stdout
    losses = [float(re.search(r"mean loss ([\d.]+)", ln).group(1)) for ln in lines]
    assert all(math.isfinite(v) for v in losses)
    assert losses[1] < losses[0]


# ---- the README's code blocks ------------------------------------------------------------

def readme_blocks():
    """[(line, language, code)] of the README's fenced code blocks."""
    blocks, inside = [], None
    with open(README) as fh:
        for number, line in enumerate(fh, 1):
            if line.startswith("```"):
                if inside is None:
                    inside = (number, line[3:].strip(), [])
                else:
                    blocks.append((inside[0], inside[1], "".join(inside[2])))
                    inside = None
            elif inside is not None:
                inside[2].append(line)
    assert inside is None, f"README.md:{inside[0]}: a code block that does not end"
    return blocks


# Blocks that this test does not run, by their first line, and why.
NOT_RUN = {
    "bash scripts/bootstrap.sh && bash scripts/run_tests.sh":
        "the whole test suite, this test included (CI runs it: .ci/run)",
    "module load openmpi":
        "builds against a cluster's MPI: needs its module system and the network",
}

# scripts/bootstrap.sh, as the README's blocks find it when this test runs
# them: the environment it sets up is the one this test runs in; run again,
# it would reinstall the package into that environment.  It checks that
# environment instead, and installs nothing.
BOOTSTRAP_CHECK = """#!/usr/bin/env bash
# written by tests/test_examples.py in place of scripts/bootstrap.sh
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -c "import braid_ext, layerpar, mpi4py.MPI as M; \
print('layerpar ready:', M.Get_library_version().splitlines()[0])"
"""


def runnable():
    """The README's blocks that this test runs: every block of code but
    those in NOT_RUN (a block without a language is text: a listing)."""
    out = []
    for line, lang, code in readme_blocks():
        first = code.strip().splitlines()[0] if code.strip() else ""
        if lang and not any(first.startswith(k) for k in NOT_RUN):
            assert lang in ("bash", "python"), f"README.md:{line}: a {lang!r} block"
            out.append(pytest.param(line, lang, code, id=f"README.md:{line}"))
    return out


def test_every_readme_block_is_run_or_says_why_not():
    blocks = readme_blocks()
    firsts = [code.strip().splitlines()[0] for _, lang, code in blocks if lang]
    for k in NOT_RUN:  # each exception still names a block
        assert sum(f.startswith(k) for f in firsts) == 1, k
    assert len(runnable()) == len(firsts) - len(NOT_RUN)
    assert any(lang == "python" for _, lang, _ in blocks)
    for k in CHECKS:  # each check still names a block
        assert sum(f.startswith(k) for f in firsts) == 1, k


def sandbox(path):
    """A folder in which a README block runs as in a checkout: the source
    tree's entries linked (runs/ is its own), ``.venv`` the environment of
    this Python, and scripts/bootstrap.sh only checking it
    (BOOTSTRAP_CHECK)."""
    venv = os.path.dirname(os.path.dirname(os.path.abspath(sys.executable)))
    for tool in ("mpiexec", "layerpar"):
        if not os.path.exists(os.path.join(venv, "bin", tool)):
            pytest.skip(f"no {tool} in this Python's environment {venv}")
    for name in os.listdir(ROOT):
        if name not in (".venv", "runs", "scripts"):
            os.symlink(os.path.join(ROOT, name), path / name)
    os.symlink(venv, path / ".venv")
    (path / "scripts").mkdir()
    for name in os.listdir(os.path.join(ROOT, "scripts")):
        if name != "bootstrap.sh":
            os.symlink(os.path.join(ROOT, "scripts", name), path / "scripts" / name)
    (path / "scripts" / "bootstrap.sh").write_text(BOOTSTRAP_CHECK)
    return path


def check_quick_start(r, where):
    # the README's main job: the default configuration (peaks, dense N=32,
    # layer-parallel, Adam, 40 epochs) on 2 ranks
    last = r.stdout.strip().splitlines()[-1]
    assert "validation accuracy" in last, r.stdout
    run_dir = where / re.search(r"results in (\S+)$", last).group(1)
    with open(run_dir / "metrics.csv") as fh:
        acc = float(list(csv.DictReader(fh))[-1]["val_acc"])
    print(f"\npeaks default, 2 ranks: validation accuracy {100 * acc:.2f}%")
    assert acc >= 0.90  # README: at least 90% (chance is 20%)
    assert os.path.exists(run_dir / "curves.png")
    assert os.path.exists(run_dir / "metrics.h5")


def check_commands(r, where):
    out = r.stdout.splitlines()
    assert sum(ln.startswith("layerpar: digits conv") for ln in out) == 2, r.stdout
    assert any(ln.startswith("layerpar eval:") for ln in out), r.stdout
    assert f"layerpar {layerpar.__version__}" in out, r.stdout
    assert any(ln.startswith("fastest:") for ln in out), r.stdout


def check_multilevel(r, where):
    out = [ln for ln in r.stdout.splitlines() if "validation accuracy" in ln]
    assert len(out) == 2 and "nested" in out[0] and "mgopt" in out[1], r.stdout


def check_library_loop(r, where):
    values = [float(ln.split()[0]) for ln in r.stdout.splitlines()]
    # one epoch of peaks' 5000 training points in batches of 100, printed by rank 0
    assert len(values) == 50 and all(math.isfinite(v) for v in values), r.stdout


# What a block's output must show beyond its success, by its first line.
CHECKS = {
    "bash scripts/bootstrap.sh && .venv/bin/mpiexec -n 2 .venv/bin/layerpar train":
        check_quick_start,
    ".venv/bin/mpiexec -n 4 .venv/bin/layerpar train --config": check_commands,
    ".venv/bin/mpiexec -n 2 .venv/bin/layerpar train --set multilevel": check_multilevel,
    "import torch, torch.nn.functional as F": check_library_loop,
}


@pytest.mark.parametrize("line,lang,code", runnable())
def test_readme_block_runs_as_written(tmp_path, mpiexec, line, lang, code):
    where = sandbox(tmp_path)
    if lang == "bash":
        cmd = ["bash", "-e", "-o", "pipefail", "-c", code]
    else:
        (where / "example").mkdir()  # not beside the source tree's packages
        script = where / "example" / "train.py"
        script.write_text(code)
        cmd = [sys.executable, str(script)]
        if "mpi4py" in code:
            cmd = [mpiexec, "-n", "2", *cmd]
    r = subprocess.run(cmd, cwd=where, env=child_env(), capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, f"README.md:{line}\n{r.stdout}{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    first = code.strip().splitlines()[0]
    for k, check in CHECKS.items():
        if first.startswith(k):
            check(r, where)
