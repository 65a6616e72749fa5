"""The user's own data: .npz, HDF5 and CSV files written here, their one-line
errors, arrays and torch data sets, the [data] and [model] configuration of
user data and user modules, and import paths."""
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from conftest import clean_mpi_env
from layerpar import DenseClosing, DenseOpening, Network
from layerpar.config import ConfigError, resolve, to_toml
from layerpar.data import DatasetError, from_arrays, from_torch_dataset, load_files
from layerpar.models import ModelSpecError, factories
from layerpar.models import resolve as resolve_spec

WORLD = MPI.COMM_WORLD
K = 3


def samples(n=40, shape=(3,), seed=0):
    """Inputs whose first entry is the sample's id and labels id % K, so that
    every loaded sample can be checked against its label."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + shape)
    x.reshape(n, -1)[:, 0] = np.arange(n)
    return x, np.arange(n) % K


def ids(split):
    return split.inputs.reshape(len(split), -1)[:, 0]


def check_pairs(ds, n):
    """Every sample once over train + val, each with its own label."""
    for split in (ds.train, ds.val):
        assert torch.equal(split.labels, ids(split).long() % K)
    both = torch.cat([ids(ds.train), ids(ds.val)]).long().sort().values
    assert torch.equal(both, torch.arange(n))


def write_npz(path, x, y, **more):
    np.savez(path, x=x, y=y, **more)
    return str(path)


def write_h5(path, x, y, xname="x", yname="y"):
    with h5py.File(path, "w") as f:
        f[xname] = x
        f[yname] = y
    return str(path)


def write_csv(path, x, y, label_col=1, header=True):
    cols = [f"f{i}" for i in range(x.shape[1])]
    cols.insert(label_col, "label")
    with open(path, "w") as fh:
        if header:
            fh.write(",".join(cols) + "\n")
        for xi, yi in zip(x, y):
            row = [repr(float(v)) for v in xi]
            row.insert(label_col, str(int(yi)))
            fh.write(",".join(row) + "\n")
    return str(path)


# --------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------

def test_npz_split_pairs_and_normalisation(tmp_path):
    x, y = samples(50)
    path = write_npz(tmp_path / "d.npz", x, y)
    raw = load_files(path, seed=3, normalize=False, dtype=torch.float64)
    assert (len(raw.train), len(raw.val)) == (40, 10)  # default: 20% validation
    assert raw.input_shape == (3,) and raw.num_classes == K and raw.name == "files"
    check_pairs(raw, 50)
    for split in (raw.train, raw.val):  # the stored values, unchanged
        assert torch.equal(split.inputs, torch.from_numpy(x[ids(split).long().numpy()]))
    ds = load_files(path, seed=3, dtype=torch.float64)
    assert torch.allclose(ds.train.inputs.mean(0), torch.zeros(3, dtype=torch.float64),
                          atol=1e-12)
    assert torch.allclose(ds.train.inputs.std(0, unbiased=False),
                          torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ds.normalize(raw.val.inputs), ds.val.inputs, rtol=0, atol=1e-14)
    other = load_files(path, seed=4, dtype=torch.float64)  # the split follows the seed
    assert not torch.equal(other.val.labels, ds.val.labels) or \
        not torch.equal(ids(other.val), ids(raw.val))


def test_h5_images_group_paths_and_lazy_inputs(tmp_path):
    x, y = samples(30, shape=(2, 4, 4))
    path = write_h5(tmp_path / "d.h5", x, y, xname="g/images", yname="g/labels")
    ds = load_files(path, inputs="g/images", labels="g/labels", val_fraction=0.5,
                    normalize=False, dtype=torch.float64)
    assert ds.input_shape == (2, 4, 4) and (len(ds.train), len(ds.val)) == (15, 15)
    check_pairs(ds, 30)
    last = load_files(path, inputs="g/images", labels="g/labels", val_fraction=0.5,
                      need_inputs=False)  # the last rank: labels only
    assert last.train.inputs is None and last.input_shape == (2, 4, 4)
    assert torch.equal(last.train.labels, ds.train.labels)
    first = load_files(path, inputs="g/images", labels="g/labels", val_fraction=0.5,
                       need_labels=False, dtype=torch.float64, normalize=False)
    assert first.train.labels is None and torch.equal(first.train.inputs, ds.train.inputs)


def test_npz_inputs_not_read_where_not_needed(tmp_path):
    # the inputs' shape comes from the member's header; a corrupt data section
    # is never touched by a rank that needs only the labels
    x, y = samples(20, shape=(1, 2, 2))
    path = write_npz(tmp_path / "d.npz", x, y)
    ds = load_files(path, need_inputs=False, num_classes=5)
    assert ds.input_shape == (1, 2, 2) and ds.train.inputs is None and ds.num_classes == 5
    assert len(ds.train) + len(ds.val) == 20


def test_csv_label_column_by_name(tmp_path):
    x, y = samples(25, shape=(4,))
    path = write_csv(tmp_path / "d.csv", x, y, label_col=2)
    ds = load_files(path, labels="label", normalize=False, dtype=torch.float64)
    assert ds.input_shape == (4,) and ds.num_classes == K
    check_pairs(ds, 25)
    for split in (ds.train, ds.val):
        assert torch.equal(split.inputs, torch.from_numpy(x[ids(split).long().numpy()]))
    labels_only = load_files(path, labels="label", need_inputs=False)
    assert labels_only.input_shape == (4,)
    assert torch.equal(labels_only.train.labels, ds.train.labels)


def test_the_three_formats_give_one_data_set(tmp_path):
    x, y = samples(36, shape=(3,))
    sets = [load_files(p, labels=lab, seed=2, dtype=torch.float64)
            for p, lab in ((write_npz(tmp_path / "d.npz", x, y), "y"),
                           (write_h5(tmp_path / "d.hdf5", x, y), "y"),
                           (write_csv(tmp_path / "d.csv", x, y, label_col=0), "label"))]
    for other in sets[1:]:
        for a, b in ((sets[0].train, other.train), (sets[0].val, other.val)):
            assert torch.equal(a.labels, b.labels)
            assert torch.allclose(a.inputs, b.inputs, rtol=0, atol=1e-15)


def test_separate_validation_file_and_class_count(tmp_path):
    x, y = samples(20)
    xv, yv = samples(8, seed=1)
    yv[-1] = 4  # a class seen only in validation
    ds = load_files(write_npz(tmp_path / "t.npz", x, y),
                    val_path=write_npz(tmp_path / "v.npz", xv, yv), dtype=torch.float64)
    assert (len(ds.train), len(ds.val), ds.num_classes) == (20, 8, 5)
    assert torch.equal(ds.val.labels, torch.from_numpy(yv))
    assert torch.equal(ds.train.labels, torch.from_numpy(y))
    mean, std = x.mean(0), x.std(0)  # statistics of the training file only
    assert torch.allclose(ds.val.inputs, torch.from_numpy((xv - mean) / std), atol=1e-13)


def test_float_labels_that_are_whole_numbers(tmp_path):
    x, y = samples(12)
    ds = load_files(write_npz(tmp_path / "d.npz", x, y.astype(np.float32)), val_fraction=0.25)
    assert ds.train.labels.dtype == torch.int64 and ds.num_classes == K


# --------------------------------------------------------------------------
# errors: one line naming the file and the array
# --------------------------------------------------------------------------

def _error(**kw):
    with pytest.raises(DatasetError) as info:
        load_files(**kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_file_errors_name_the_file_and_array(tmp_path):
    x, y = samples(10)
    good = write_npz(tmp_path / "good.npz", x, y)
    missing = str(tmp_path / "none.npz")
    assert missing in _error(path=missing) and "not found" in _error(path=missing)
    m = _error(path=good, inputs="images")
    assert good in m and "'images'" in m and "x, y" in m
    m = _error(path=good, labels="target")
    assert "'target'" in m and "data.labels" in m
    short = write_npz(tmp_path / "short.npz", x, y[:7])
    m = _error(path=short)
    assert short in m and "10 samples" in m and "'y' have 7" in m
    frac = write_npz(tmp_path / "frac.npz", x, y + 0.5)
    m = _error(path=frac)
    assert frac in m and "'y'" in m and "not integers" in m
    neg = write_npz(tmp_path / "neg.npz", x, y - 1)
    assert "negative label -1" in _error(path=neg)
    two_d = write_npz(tmp_path / "y2.npz", x, y.reshape(-1, 1))
    assert "expected (n,)" in _error(path=two_d)
    three_d = write_npz(tmp_path / "x3.npz", x.reshape(10, 3, 1), y)
    m = _error(path=three_d)
    assert "'x'" in m and "(n, features) or (n, C, H, W)" in m
    strings = write_npz(tmp_path / "s.npz", x, np.array(["a"] * 10))
    assert "expected integers" in _error(path=strings)
    m = _error(path=good, num_classes=2)
    assert good in m and "label 2" in m and "num_classes = 2" in m
    np.save(tmp_path / "plain.npy", x)
    plain = str(tmp_path / "plain.npz")
    (tmp_path / "plain.npy").rename(plain)
    assert plain in _error(path=plain)
    text = tmp_path / "text.npz"
    text.write_text("not a zip")
    assert "not a NumPy .npz file" in _error(path=str(text))
    assert "unknown file type '.txt'" in _error(path=str(tmp_path / "d.txt"))
    bad_val = write_npz(tmp_path / "v.npz", x.reshape(10, 3, 1, 1), y)
    m = _error(path=good, val_path=bad_val)
    assert bad_val in m and "shape" in m


def test_h5_and_csv_errors(tmp_path):
    x, y = samples(6)
    h5 = write_h5(tmp_path / "d.h5", x, y)
    m = _error(path=h5, labels="g/y")
    assert h5 in m and "'g/y'" in m and "datasets in the file: x, y" in m
    not_h5 = tmp_path / "n.h5"
    not_h5.write_text("plain text")
    assert "not an HDF5 file" in _error(path=str(not_h5))
    csv_path = write_csv(tmp_path / "d.csv", x, y)
    m = _error(path=csv_path, labels="target")
    assert csv_path in m and "'target'" in m and "f0, label, f1, f2" in m
    m = _error(path=write_csv(tmp_path / "nohead.csv", x, y, header=False), labels="label")
    assert "header row" in m
    broken = tmp_path / "broken.csv"
    broken.write_text("a,label\n1.0,0\nx,1\n")
    m = _error(path=str(broken), labels="label")
    assert str(broken) in m and "malformed CSV" in m
    frac = tmp_path / "frac.csv"
    frac.write_text("a,label\n1.0,0\n2.0,1.5\n")
    m = _error(path=str(frac), labels="label")
    assert "'label'" in m and "not integers" in m and "1.5" in m
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "empty CSV" in _error(path=str(empty), labels="label")


# --------------------------------------------------------------------------
# NaN and Inf in the inputs: refused at load, naming the file and the array
# --------------------------------------------------------------------------

def with_non_finite(x, *where):
    """A copy of ``x`` with NaN, Inf or -Inf (by turns) at the given
    (sample, feature) places."""
    x = x.copy()
    flat = x.reshape(len(x), -1)
    for k, (i, j) in enumerate(where):
        flat[i, j] = (np.nan, np.inf, -np.inf)[k % 3]
    return x


def test_non_finite_inputs_in_a_file_are_refused_naming_file_and_array(tmp_path):
    x, y = samples(12)
    nan = write_npz(tmp_path / "nan.npz", with_non_finite(x, (5, 2)), y)
    m = _error(path=nan)
    assert nan in m and "inputs 'x'" in m and "NaN" in m and "Inf" not in m and "sample 5" in m
    # float32 images in an HDF5 group; NaN and both infinities, the first in sample 3
    xi, yi = samples(10, shape=(1, 2, 2))
    bad = with_non_finite(xi, (7, 0), (3, 1), (9, 3)).astype(np.float32)
    h5 = write_h5(tmp_path / "d.h5", bad, yi, xname="g/images")
    m = _error(path=h5, inputs="g/images")
    assert h5 in m and "'g/images'" in m and "NaN and Inf" in m
    assert "3 values" in m and "sample 3" in m
    csv_path = write_csv(tmp_path / "d.csv", with_non_finite(x, (4, 1)), y, label_col=0)
    m = _error(path=csv_path, labels="label")
    assert csv_path in m and "column 'f1'" in m and "NaN" in m and "sample 4" in m
    # the validation file too; the training file named nowhere
    good = write_npz(tmp_path / "good.npz", x, y)
    val = write_npz(tmp_path / "val.npz", with_non_finite(x[:4], (0, 0), (2, 1)), y[:4])
    m = _error(path=good, val_path=val)
    assert val in m and "'x'" in m and good not in m and "NaN and Inf" in m
    # a rank that does not read the inputs cannot see them: it loads
    assert load_files(nan, need_inputs=False).train.inputs is None
    # labels hold no NaN either (the message names the labels' array)
    m = _error(path=write_npz(tmp_path / "ynan.npz", x, np.where(y == 1, np.nan, y)))
    assert "'y'" in m and "not integers" in m and "nan" in m


def test_from_arrays_and_torch_datasets_refuse_non_finite_inputs():
    x, y = samples(10)
    inf = x.copy()
    inf[2, 1] = -np.inf
    with pytest.raises(DatasetError, match=r"^inputs hold Inf \(in sample 2\)") as info:
        from_arrays(inf, y)
    assert "\n" not in str(info.value)
    with pytest.raises(DatasetError, match=r"^inputs hold NaN"):
        from_arrays(torch.from_numpy(with_non_finite(x, (0, 0))).float(), y)
    with pytest.raises(DatasetError, match=r"^val_inputs hold NaN \(in sample 1\)"):
        from_arrays(x, y, val_inputs=with_non_finite(x[:3], (1, 2)), val_labels=y[:3])
    with pytest.raises(DatasetError, match=r"^mine\.npy: inputs hold"):
        from_arrays(with_non_finite(x, (9, 2)), y, source="mine.npy")
    xi, yi = samples(6, shape=(1, 2, 2))
    with pytest.raises(DatasetError, match=r"^dataset: inputs hold NaN \(in item 4\)"):
        from_torch_dataset(PairsDataset(with_non_finite(xi, (4, 3)), yi))
    with pytest.raises(DatasetError, match=r"^val_dataset: inputs hold Inf"):  # dropped, but seen
        from_torch_dataset(PairsDataset(xi, yi), need_inputs=False,
                           val_dataset=PairsDataset(with_non_finite(xi, (0, 0), (1, 1))[1:], yi[1:]))
    # finite inputs, integer inputs and large finite values still load
    assert from_arrays(np.full((4, 2), 3e38, dtype=np.float32), y[:4]).train.inputs is not None
    assert from_arrays(np.arange(8).reshape(4, 2), y[:4]).num_classes == K


def _shared_path(name):
    """A path in a folder that every rank of WORLD sees (rank 0 makes it)."""
    import tempfile
    d = tempfile.mkdtemp(prefix="lp-data-") if WORLD.rank == 0 else None
    return os.path.join(WORLD.bcast(d, root=0), name)


def _outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - compared below, on every rank
        return type(e).__name__, str(e)
    return "none", ""


@pytest.mark.mpi
def test_non_finite_inputs_refused_on_every_rank():
    # only the first rank reads the inputs; every rank raises DatasetError
    # naming the file and the array, none waits
    comm, rank, size = WORLD, WORLD.rank, WORLD.size
    x, y = samples(20)
    path = _shared_path("nan.npz")
    val = os.path.join(os.path.dirname(path), "val.npz")
    good = os.path.join(os.path.dirname(path), "good.npz")
    try:
        if rank == 0:
            write_npz(path, with_non_finite(x, (6, 1)), y)
            write_npz(good, x, y)
            write_npz(val, with_non_finite(x[:5], (2, 2)), y[:5])
        comm.Barrier()
        roles = dict(need_inputs=rank == 0, need_labels=rank == size - 1, comm=comm)
        got = comm.allgather([_outcome(lambda: load_files(path, **roles)),
                              _outcome(lambda: load_files(good, val_path=val, **roles)),
                              _outcome(lambda: load_files(good, **roles))])
        for train_nan, val_nan, fine in got:
            assert train_nan[0] == "DatasetError" and path in train_nan[1]
            assert "inputs 'x' hold NaN (in sample 6)" in train_nan[1]
            assert val_nan[0] == "DatasetError" and val in val_nan[1] and "'x'" in val_nan[1]
            assert "\n" not in train_nan[1] + val_nan[1]
            assert fine == ("none", "")
        # from_arrays is not collective: every rank that holds the inputs refuses them
        mine = with_non_finite(x, (rank % len(x), 0))
        got = comm.allgather(_outcome(lambda: from_arrays(mine, y)))
        assert got == [("DatasetError", f"inputs hold NaN (in sample {r % len(x)}); inputs "
                        "must be finite numbers") for r in range(size)]
    finally:
        comm.Barrier()
        if rank == 0:
            import shutil
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["training npz, layer-parallel", "validation csv"])
def test_command_refuses_a_data_file_with_nan_in_one_line(tmp_path, mpiexec, case):
    # `layerpar train` on 2 ranks: the job ends at load with one line naming
    # the file and the array, status 1, no traceback (not deep in a solve)
    x, y = samples(40, shape=(3,))
    sets = ['data.name="files"', "model.nlayers=4", "model.width=4", "optim.epochs=1",
            "data.batch_size=10", "run.plot=false"]
    if case.startswith("training"):
        bad = write_npz(tmp_path / "nan.npz", with_non_finite(x, (7, 1)), y)
        sets += [f'data.path="{bad}"', 'mgrit.mode="layer-parallel"', "mgrit.cfactor=2"]
        named = [f"{bad}: inputs 'x' hold NaN (in sample 7)"]
    else:
        good = write_csv(tmp_path / "train.csv", x, y)
        inf = x[:10].copy()
        inf[3, 2] = np.inf
        bad = write_csv(tmp_path / "val.csv", inf, y[:10])
        sets += [f'data.path="{good}"', f'data.val_path="{bad}"', 'data.labels="label"']
        named = [bad, "column 'f2' holds Inf (in sample 3)"]
    cmd = [mpiexec, "-n", "2", sys.executable, "-m", "layerpar", "train", "-q",
           "--run-dir", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]]
    r = subprocess.run(cmd, env=clean_mpi_env(), capture_output=True, text=True, timeout=240,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = r.stdout + r.stderr
    assert r.returncode == 1, text
    assert "Traceback" not in text and "internal error" not in text, text
    lines = [ln for ln in text.splitlines() if ln.startswith("layerpar: error")]
    assert len(lines) == 1 and lines[0].startswith("layerpar: error: "), text
    assert all(part in lines[0] for part in named), lines[0]


# --------------------------------------------------------------------------
# arrays and torch data sets
# --------------------------------------------------------------------------

class PairsDataset(torch.utils.data.Dataset):
    """A map-style data set of (image, label) pairs built on the fly."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i]), int(self.y[i])


def test_torch_dataset_entry_point_equals_arrays():
    x, y = samples(30, shape=(1, 3, 3))
    ds = from_torch_dataset(PairsDataset(x, y), val_fraction=0.2, seed=5, dtype=torch.float64)
    ref = from_arrays(x, y, val_fraction=0.2, seed=5, dtype=torch.float64, normalize=False)
    assert ds.input_shape == (1, 3, 3) and ds.num_classes == K and ds.name == "PairsDataset"
    check_pairs(ds, 30)
    for a, b in ((ds.train, ref.train), (ds.val, ref.val)):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    xv, yv = samples(5, shape=(1, 3, 3), seed=9)
    with_val = from_torch_dataset(PairsDataset(x, y), val_dataset=PairsDataset(xv, yv),
                                  need_inputs=False)
    assert len(with_val.train) == 30 and len(with_val.val) == 5
    assert with_val.train.inputs is None and torch.equal(with_val.val.labels, torch.from_numpy(yv))
    batches = list(ds.train.loader(batch_size=7, seed=1).epoch(0))
    assert sum(len(b[1]) for b in batches) == len(ds.train)


def test_torch_dataset_errors():
    x, y = samples(4)
    with pytest.raises(DatasetError, match=r"dataset\[0\] is a tuple of 1; expected a pair"):
        from_torch_dataset(torch.utils.data.TensorDataset(torch.from_numpy(x)))
    class FloatLabels(PairsDataset):
        def __getitem__(self, i):
            return torch.from_numpy(self.x[i]), float(self.y[i])
    assert from_torch_dataset(FloatLabels(x, y)).num_classes == K  # whole numbers pass
    with pytest.raises(DatasetError, match=r"dataset: labels are not integers \(label 0.5"):
        from_torch_dataset(FloatLabels(x, y + 0.5))

    class Ragged(PairsDataset):
        def __getitem__(self, i):
            return torch.zeros(3 + i), 0
    with pytest.raises(DatasetError, match=r"dataset\[1\]: input of shape \(4,\), but item 0"):
        from_torch_dataset(Ragged(x, y))

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(())
    with pytest.raises(DatasetError, match="map-style Dataset with __len__"):
        from_torch_dataset(Stream())


@pytest.mark.mpi
def test_torch_dataset_in_a_training_loop_with_network():
    # the documented loop: every rank builds the same loader; the first rank
    # feeds inputs, the last labels; three SGD steps on WORLD give the
    # weights of the same loop on one process
    x, y = samples(48, shape=(2,))
    data = from_torch_dataset(PairsDataset(x, y), val_fraction=0.25, seed=1,
                              dtype=torch.float64, normalize=True)

    def train(comm):
        net = Network(lambda: DenseOpening(2, 4), lambda n: torch.nn.Sequential(
            torch.nn.Linear(4, 4), torch.nn.Tanh()), lambda: DenseClosing(4, data.num_classes),
            nlayers=4, T=1.0, comm=comm, seed=2).double()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        loader = data.train.loader(batch_size=12, seed=3, need_inputs=net.is_first,
                                   need_labels=net.is_last)
        for b, (xb, yb) in enumerate(loader.epoch(0)):
            if b == 3:
                break
            opt.zero_grad()
            net.loss(xb, yb, torch.nn.functional.cross_entropy).backward()
            opt.step()
        return net.serial_equivalent()

    par, ref = train(WORLD), train(MPI.COMM_SELF)
    for (k, a), (_, b) in zip(par.state_dict().items(), ref.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), k


# --------------------------------------------------------------------------
# configuration and import paths
# --------------------------------------------------------------------------

def test_config_for_user_data_and_models(tmp_path):
    cfg = resolve(None, ['data.name="files"', f'data.path="{tmp_path}/d.npz"',
                         'model.step="userblocks:Block"',
                         "model.step_kwargs={width = 8, p = 0.25}"])
    assert cfg["model"]["step_kwargs"] == {"width": 8, "p": 0.25}
    text_form = resolve(None, ['model.step_kwargs="{width = 8, p = 0.25}"'])
    assert text_form["model"]["step_kwargs"] == {"width": 8, "p": 0.25}
    toml = tmp_path / "c.toml"
    toml.write_text(to_toml(cfg))
    assert resolve(str(toml)) == cfg  # the written configuration reads back the same
    for sets, key in ((['data.name="files"'], "data.path"),
                      (['data.name="files"', 'data.path="d.txt"'], "data.path"),
                      (['data.name="files"', 'data.path="d.h5"', 'data.val_path="v.json"'],
                       "data.val_path"),
                      (['model.step="userblocks.Block"'], "model.step"),
                      (["model.closing_kwargs=3"], "model.closing_kwargs"),
                      (['data.name="file"'], "data.name")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            resolve(None, sets)


def test_import_paths_and_their_errors():
    import userblocks
    assert resolve_spec("userblocks:Block") is userblocks.Block
    model = {"kind": "dense", "width": 5, "activation": "tanh", "kernel_size": 3,
             "step": "userblocks:make_block", "step_kwargs": {"width": 5, "p": 0.0},
             "closing": "torch.nn:Linear", "closing_kwargs": {"in_features": 5,
                                                              "out_features": 2}}
    opening, step, closing = factories(model, (3,), 2)
    assert isinstance(step(0), userblocks.Block) and isinstance(opening(), DenseOpening)
    assert isinstance(closing(), torch.nn.Linear)
    for spec, text in (("tests.nowhere:Block", "cannot import module 'tests.nowhere'"),
                       ("userblocks:Missing", "has no attribute 'Missing'"),
                       ("userblocks:NotAModule", "not an nn.Module subclass"),
                       ("userblocks:NOT_A_MODULE", "is a int, not an nn.Module"),
                       ("userblocks", "expected 'package.module:Name'")):
        with pytest.raises(ModelSpecError, match="model.opening = ") as info:
            resolve_spec(spec, key="model.opening")
        assert text in str(info.value)
    bad_kwargs = dict(model, step="userblocks:Block", step_kwargs={"depth": 2})
    with pytest.raises(ModelSpecError, match=r"model\.step_kwargs = .*depth"):
        factories(bad_kwargs, (3,), 2)
    returns_int = dict(model, step="builtins:abs", step_kwargs={})
    with pytest.raises(ModelSpecError):
        factories(returns_int, (3,), 2)
