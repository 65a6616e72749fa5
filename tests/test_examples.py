"""The examples the README points to run as written, on 1 and 2 ranks, and
print on rank 0 only."""
import math
import os
import re
import subprocess
import sys

import pytest

import layerpar

from conftest import clean_mpi_env

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


@pytest.mark.parametrize("ranks", [1, 2])
def test_train_library_example(mpiexec, ranks):
    cmd = [mpiexec, "-n", str(ranks), sys.executable,
           os.path.join(EXAMPLES, "train_library.py"), "--epochs", "2", "--nlayers", "16"]
    env = clean_mpi_env()
    # the layerpar these tests import (the source tree, or an installed copy)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(layerpar.__file__)), env.get("PYTHONPATH", "")])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1", "epoch 2"], r.stdout
    losses = [float(re.search(r"mean loss ([\d.]+)", ln).group(1)) for ln in lines]
    assert all(math.isfinite(v) for v in losses)
    assert losses[1] < losses[0]
