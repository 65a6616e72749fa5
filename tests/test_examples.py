"""The examples run as written: examples/train_library.py on 1 and 2 ranks
(printing on rank 0 only), and every fenced Python and shell block of the
README and of the documentation pages under docs/, taken from the pages
themselves (tests/docblocks.py: the markers that leave a block out, write it
to a file, or give its ranks).  The end-to-end tier: each starts child jobs.
The README's blocks run one by one; a page's blocks run in order in one
sandbox, so that a later block finds what an earlier one wrote."""
import csv
import math
import os
import re
import subprocess
import sys

import pytest

import layerpar

from conftest import clean_mpi_env
from docblocks import blocks, pages, problems

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


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


# ---- the README's and the documentation's code blocks ----------------------------------

# scripts/bootstrap.sh, as the blocks find it when this test runs them: the
# environment it sets up is the one this test runs in; run again, it would
# reinstall the package into that environment.  It checks that environment
# instead, and installs nothing.
BOOTSTRAP_CHECK = """#!/usr/bin/env bash
# written by tests/test_examples.py in place of scripts/bootstrap.sh
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -c "import braid_ext, layerpar, mpi4py.MPI as M; \\
print('layerpar ready:', M.Get_library_version().splitlines()[0])"
"""


def test_every_block_is_run_or_says_why_not():
    """Every block of every page has a language this test knows, and toml
    blocks are files or illustrations; a page's markers are well formed."""
    found = [b for page in pages() for b in blocks(page)]
    assert [p for b in found for p in problems(b)] == []
    run = [b for b in found if b.lang in ("bash", "python") and not b.skipped]
    assert sum(b.lang == "python" for b in run) >= 4 and sum(b.lang == "bash" for b in run) >= 8
    for where, first in CHECKS:  # each check still names a block
        assert sum(b.path == where and b.first.startswith(first) for b in found) == 1, first


def sandbox(path):
    """A folder in which a block runs as in a checkout: the source tree's
    entries linked (runs/ is its own), ``.venv`` the environment of this
    Python, and scripts/bootstrap.sh only checking it (BOOTSTRAP_CHECK)."""
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


def run_block(block, where, mpiexec):
    """Run ``block`` in the sandbox ``where`` (or write it, for a file);
    returns the finished process (None for a file)."""
    if "file" in block.markers:
        target = where / block.markers["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.code)
        return None
    env = child_env()
    venv_bin = os.path.join(os.path.dirname(os.path.abspath(sys.executable)))
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
    if block.lang == "bash":
        cmd = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    else:
        (where / "example").mkdir(exist_ok=True)  # not beside the source tree's packages
        script = where / "example" / f"block{block.line}.py"
        script.write_text(block.code)
        cmd = [sys.executable, str(script)]
        if block.ranks() > 1:
            cmd = [mpiexec, "-n", str(block.ranks()), *cmd]
        env["PYTHONPATH"] = os.pathsep.join([str(where), env.get("PYTHONPATH", "")])
    r = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, f"{block.where}\n{r.stdout}{r.stderr}"
    assert "Traceback" not in r.stderr, f"{block.where}\n{r.stderr}"
    for (page, first), check in CHECKS.items():
        if block.path == page and block.first.startswith(first):
            check(r, where)
    return r


def missing(block):
    """The names a block requires that layerpar does not have (yet)."""
    name = block.markers.get("requires")
    return [name] if name and not hasattr(layerpar, name.split(".")[-1]) else []


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


def check_quick(r, where):
    out = r.stdout.splitlines()
    header = [i for i, ln in enumerate(out) if ln.startswith("epoch lines: ")]
    epochs = [i for i, ln in enumerate(out) if re.match(r"epoch +\d+ ", ln)]
    assert len(header) == 1 and len(epochs) == 2 and header[0] < epochs[0], r.stdout
    assert any(ln.startswith("layerpar eval:") for ln in out), r.stdout


def check_multilevel(r, where):
    out = [ln for ln in r.stdout.splitlines() if "validation accuracy" in ln]
    assert len(out) == 2 and "nested" in out[0] and "mgopt" in out[1], r.stdout
    # nested iteration trains N/4, N/2 and N layers (an epoch each), MG/OPT N
    # (with N/2 in its cycles); the work only grows, and is the sum of the
    # depths' work (a column fwd_work_l<l> per depth)
    for run, depths, levels in (("nested", [8, 16, 32], 3), ("mgopt", [32], 2)):
        with open(where / "runs" / run / "metrics.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert [int(row["nlayers"]) for row in rows] == depths, run
        work = [float(row["fwd_work"]) for row in rows]
        assert work[0] > 0 and all(b > a for a, b in zip(work, work[1:])), (run, work)
        for row in rows:
            per_depth = [float(v) for k, v in row.items() if k.startswith("fwd_work_l")]
            assert len(per_depth) == levels, (run, row)
            assert float(row["fwd_work"]) == sum(per_depth), (run, row)


def check_library_loop(r, where):
    values = [float(ln.split()[0]) for ln in r.stdout.splitlines()]
    # one epoch of peaks' 5000 training points in batches of 100, printed by rank 0
    assert len(values) == 50 and all(math.isfinite(v) for v in values), r.stdout


def check_bad_value(r, where):
    assert "exit status 2" in r.stdout, r.stdout
    assert "optim.lr" in r.stderr, r.stderr


# What a block's output must show beyond its success, by its page and first line.
CHECKS = {
    ("README.md", "bash scripts/bootstrap.sh && .venv/bin/mpiexec -n 2 .venv/bin/layerpar train"):
        check_quick_start,
    ("docs/quickstart.md", ".venv/bin/mpiexec -n 2 .venv/bin/layerpar train --set optim.epochs=2"):
        check_quick,
    ("docs/command.md", ".venv/bin/mpiexec -n 2 .venv/bin/layerpar train --config"):
        check_commands,
    ("docs/tutorials/multilevel.md",
     ".venv/bin/mpiexec -n 2 .venv/bin/layerpar train --set multilevel"):
        check_multilevel,
    ("docs/tutorials/training-loop.md", "import torch, torch.nn.functional as F"):
        check_library_loop,
    ("docs/failures.md", ".venv/bin/layerpar train --set optim.lr=-1"): check_bad_value,
}


def readme_blocks():
    return [pytest.param(b, id=b.where) for b in blocks("README.md")
            if b.lang in ("bash", "python") and not b.skipped]


@pytest.mark.parametrize("block", readme_blocks())
def test_readme_block_runs_as_written(tmp_path, mpiexec, block):
    if missing(block):
        pytest.skip(f"{block.where}: layerpar has no {missing(block)[0]} yet")
    run_block(block, sandbox(tmp_path), mpiexec)


def doc_pages():
    out = []
    for page in pages():
        if page != "README.md" and any(b.lang in ("bash", "python") and not b.skipped
                                       for b in blocks(page)):
            out.append(pytest.param(page, id=page))
    return out


@pytest.mark.parametrize("page", doc_pages())
def test_doc_page_blocks_run_as_written(tmp_path, mpiexec, page):
    """A page's blocks in order, in one sandbox; a block whose requirement
    is missing is skipped (and said so), the others still run."""
    where, left_out = sandbox(tmp_path), []
    for block in blocks(page):
        if block.skipped or block.lang not in ("bash", "python", "toml"):
            continue
        if missing(block):
            left_out.append(f"{block.where} (needs layerpar.{missing(block)[0]})")
            continue
        run_block(block, where, mpiexec)
    if left_out:
        pytest.skip("ran the rest; not run: " + ", ".join(left_out))
