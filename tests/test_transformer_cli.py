"""The transformer kind from the command line: the built-in recall set with
nested iteration (a transformer of N/2 blocks prolonged to N; the transfers
themselves, and MG/OPT's restriction, are checked bit for bit in
test_context.py),
checkpoints, a user's block taking the padding mask by import path, token
files with a mask array, and bad settings refused in one line naming the
key or array.  The command runs in this process on the session's ranks."""
import os

import numpy as np
import pytest
import torch
from mpi4py import MPI

from layerpar import checkpoint as ckpt
from conftest import gathered
from test_cli import command, error_line, last_row, on_rank0, shared_dir

WORLD = MPI.COMM_WORLD
TINY = ['data.name="recall"', "data.num_samples=360", "data.batch_size=100", 'model.kind="transformer"',
        "model.width=8", "model.heads=2", "model.mlp_ratio=1.0", "model.nlayers=8",
        "model.T=2.0", "optim.epochs=1", "optim.lr=0.01", "run.plot=false"]


MODEL = [s for s in TINY if not s.startswith("data.")]


def sets(*items):
    return [a for s in items for a in ("--set", s)]


@pytest.mark.mpi
@pytest.mark.parametrize("method", ["nested"])
def test_recall_multilevel_from_the_command_line(tmp_path_factory, method):
    base = shared_dir(tmp_path_factory, method)
    run = os.path.join(base, "run")
    extra = ["multilevel.epochs_per_level=[1]"] if method == "nested" else []
    r = command("train", "--run-dir", run, "-q",
                *sets(*TINY, f'multilevel.method="{method}"', "multilevel.levels=2",
                      'mgrit.mode="layer-parallel"', "mgrit.max_levels=2", "mgrit.cfactor=2",
                      *extra))
    assert r.status == 0, r.text
    st = ckpt.load_checkpoint(os.path.join(run, "checkpoint.h5"), MPI.COMM_SELF,
                              layer_indices=None)
    assert all(n in st["layers"] for n in range(8))
    assert "attn.qkv.weight" in st["layers"][7]
    assert np.isfinite(float(last_row(run)["val_loss"]))


@pytest.mark.mpi
def test_user_block_taking_the_mask_trains_and_resumes(tmp_path_factory):
    base = shared_dir(tmp_path_factory, "masked")
    run = os.path.join(base, "run")
    user = [*TINY, 'model.step="userblocks:MaskedBlock"', "model.step_kwargs={width = 8}",
            'mgrit.mode="serial"', "mgrit.microbatches=3", 'mgrit.schedule="1f1b"']
    r = command("train", "--run-dir", run, "-q", *sets(*user))
    assert r.status == 0, r.text
    first = float(last_row(run)["train_loss"])
    r = command("train", "--run-dir", run, "--resume", "-q", *sets("optim.epochs=2"))
    assert r.status == 0, r.text
    assert int(last_row(run)["epoch"]) == 2 and np.isfinite(first)


def write_tokens(path, n=120, length=7, mask_length=7, seed=0):
    """Token ids 0..4 with a padding mask; the class: is id 3 among the kept
    tokens."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, (n, length))
    kept = np.arange(length)[None, :] < rng.integers(2, length + 1, n)[:, None]
    y = ((x == 3) & kept).any(1).astype(np.int64)
    np.savez(path, x=x, y=y, mask=kept[:, :mask_length])
    return str(path)


@pytest.mark.mpi
def test_token_files_with_a_mask_train(tmp_path_factory):
    base = shared_dir(tmp_path_factory, "tokfiles")
    npz = os.path.join(base, "tokens.npz")
    on_rank0(write_tokens, npz)
    files = ['data.name="files"', f'data.path="{npz}"', "data.tokens=true", 'data.mask="mask"',
             "model.vocab=5", "data.batch_size=40"]
    r = command("train", "--run-dir", os.path.join(base, "run"), "-q",
                *sets(*MODEL, *files, 'mgrit.mode="serial"'))
    assert r.status == 0, r.text
    bad = os.path.join(base, "bad.npz")
    on_rank0(write_tokens, bad, 120, 7, 6)
    r = command("train", "--run-dir", os.path.join(base, "run2"), "-q",
                *sets(*MODEL, *files, f'data.path="{bad}"'))
    assert r.status != 0
    line = error_line(r)
    assert "mask array 'mask' has shape (120, 6)" in line and bad in line


@pytest.mark.mpi
@pytest.mark.parametrize("setting, key", [("model.heads=3", "model.heads = 3"),
                                          ("model.max_length=10", "model.max_length = 10"),
                                          ('data.name="peaks"', "model.kind")])
def test_bad_transformer_settings_one_line(tmp_path_factory, setting, key):
    base = shared_dir(tmp_path_factory, "badtf")
    r = command("train", "--run-dir", os.path.join(base, "run"), "-q", *sets(*TINY, setting))
    assert r.status != 0
    assert key in error_line(r)


def _dropout_run(run_dir, mode, *, dropout=0.1, stop_after=None, resume=False):
    """A tiny transformer with dropout trained for 2 epochs of 4 steps (a
    stop agreed after ``stop_after`` steps saves a checkpoint mid-epoch);
    the final weights gathered on every rank."""
    from layerpar.config import resolve
    from layerpar.training import Trainer
    cfg = resolve(None, [*TINY, "data.num_samples=450", "optim.epochs=2",
                         f"model.dropout={dropout}", f'mgrit.mode="{mode}"', "mgrit.cfactor=2",
                         'data.dtype="float64"', f'run.dir="{run_dir}"'])
    steps = [0]

    def should_stop():
        steps[0] += 1
        return stop_after is not None and steps[0] >= stop_after

    tr = Trainer(cfg, WORLD, should_stop=should_stop)
    try:
        if resume:
            assert tr.resume()
        tr.run()
        return gathered(WORLD, tr.net.named_parameters())
    finally:
        tr.close()


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["serial", "layer-parallel"])
def test_dropout_run_resumed_mid_epoch_ends_bit_for_bit(tmp_path_factory, mode):
    full = _dropout_run(shared_dir(tmp_path_factory, "tf-full"), mode)
    part = shared_dir(tmp_path_factory, "tf-part")
    _dropout_run(part, mode, stop_after=3)  # stopped in the first epoch, after its 3rd step
    resumed = _dropout_run(part, mode, resume=True)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    # not vacuous: the masks drawn change the weights
    plain = _dropout_run(shared_dir(tmp_path_factory, "tf-plain"), mode, dropout=0.0)
    assert any(not torch.equal(full[k], plain[k]) for k in full)
