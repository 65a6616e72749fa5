"""Tests of layerpar.data: file readers on files written here, the built-in
sets, the split, the normalisation, and the rank-invariant batch iterator."""
import gzip
import hashlib
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from layerpar.data import (KNOWN_DATASETS, BatchLoader, DatasetError, load_dataset,
                           read_cifar_batch, read_idx)

torch.set_num_threads(1)

# IDX type codes, written out here independently of the reader's table.
IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
             np.float32: 0x0D, np.float64: 0x0E}


def write_idx(path, arr, *, gz=False, magic=None):
    arr = np.asarray(arr)
    head = magic if magic is not None else bytes([0, 0, IDX_CODES[arr.dtype.type], arr.ndim])
    body = head + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    body += arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as fh:
        fh.write(body)
    return body


def peaks_f(x, y):
    # Written out again from the MATLAB definition, not imported.
    return (3 * (1 - x) ** 2 * np.exp(-x ** 2 - (y + 1) ** 2)
            - 10 * (x / 5 - x ** 3 - y ** 5) * np.exp(-x ** 2 - y ** 2)
            - np.exp(-(x + 1) ** 2 - y ** 2) / 3)


# ----------------------------------------------------------------- IDX reader

@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, dtype, gz):
    rng = np.random.default_rng(1)
    arr = (rng.normal(size=(3, 4, 5)) * 50).astype(dtype)
    p = tmp_path / ("a.idx" + (".gz" if gz else ""))
    write_idx(p, arr, gz=gz)
    out = read_idx(p)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    shape, dt = read_idx(p, header_only=True)
    assert shape == (3, 4, 5) and dt == np.dtype(dtype)


def test_read_idx_rejects_bad_files(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    bad_magic = tmp_path / "magic"
    write_idx(bad_magic, arr, magic=bytes([8, 3, 0, 0]))
    with pytest.raises(DatasetError, match="magic"):
        read_idx(bad_magic)
    bad_code = tmp_path / "code"
    write_idx(bad_code, arr, magic=bytes([0, 0, 0x07, 3]))
    with pytest.raises(DatasetError, match="type code"):
        read_idx(bad_code)
    body = write_idx(tmp_path / "full", arr)
    (tmp_path / "short").write_bytes(body[:-5])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "header").write_bytes(body[:9])
    with pytest.raises(DatasetError, match="truncated IDX header"):
        read_idx(tmp_path / "header")
    (tmp_path / "long").write_bytes(body + b"\0")
    with pytest.raises(DatasetError, match="longer"):
        read_idx(tmp_path / "long")
    gzbody = gzip.compress(body)
    (tmp_path / "cut.gz").write_bytes(gzbody[: len(gzbody) // 2])
    with pytest.raises(DatasetError, match="cut.gz"):
        read_idx(tmp_path / "cut.gz")
    with pytest.raises(DatasetError, match="not found"):
        read_idx(tmp_path / "nope")


# ---------------------------------------------------------- MNIST from files

def make_mnist(root, n_train=60, n_test=20, gz=(), seed=0):
    """Images whose pixel (0, 0) is the sample index (so a test can tell
    which file sample a loaded one is); labels index % 10."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        x[:, 0, 0] = np.arange(n)
        y = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            name = f"{part}-{kind}-ubyte"
            write_idx(os.path.join(root, name + (".gz" if name in gz else "")), arr,
                      gz=name in gz)
        out[part] = (x, y)
    return out


def file_index(ds_split, ds):
    """Recover the file index of each loaded sample from pixel (0, 0)."""
    raw = ds_split.inputs.double() * ds.std.double() + ds.mean.double()
    return torch.round(raw[:, 0, 0, 0] * 255).long().numpy()


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_split_and_normalisation(tmp_path, name):
    files = make_mnist(tmp_path, gz=("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    x_file, y_file = files["train"]
    ds = load_dataset(name, root=tmp_path, seed=3, val_fraction=0.25, dtype=torch.float64)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.train.inputs.shape == (45, 1, 28, 28) and ds.val.inputs.shape == (15, 1, 28, 28)
    assert ds.test.inputs.shape == (20, 1, 28, 28) and len(ds.test) == 20
    tr, va = file_index(ds.train, ds), file_index(ds.val, ds)
    # The split is a partition of the file's samples ...
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(60))
    # ... with the labels that belong to them ...
    np.testing.assert_array_equal(ds.train.labels.numpy(), y_file[tr])
    np.testing.assert_array_equal(ds.val.labels.numpy(), y_file[va])
    # ... normalised with the statistics of the training part only.
    raw_train = x_file[tr].astype(np.float64) / 255
    assert ds.mean.item() == pytest.approx(raw_train.mean(), rel=1e-12)
    assert ds.std.item() == pytest.approx(raw_train.std(), rel=1e-12)
    np.testing.assert_allclose(ds.val.inputs[:, 0].numpy(),
                               (x_file[va] / 255 - raw_train.mean()) / raw_train.std(), atol=1e-12)
    np.testing.assert_allclose(ds.test.inputs[:, 0].numpy(),
                               (files["t10k"][0] / 255 - raw_train.mean()) / raw_train.std(), atol=1e-12)
    # The same seed gives the same split, another seed another one.
    again = load_dataset(name, root=tmp_path, seed=3, val_fraction=0.25, dtype=torch.float64)
    assert torch.equal(again.train.inputs, ds.train.inputs)
    other = load_dataset(name, root=tmp_path, seed=4, val_fraction=0.25, dtype=torch.float64)
    assert sorted(file_index(other.val, other).tolist()) != sorted(va.tolist())
    # float32 on request, by default.
    assert load_dataset(name, root=tmp_path).train.inputs.dtype == torch.float32


def test_mnist_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetError, match="root="):
        load_dataset("mnist")
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", root=tmp_path / "absent")
    assert "absent" in str(e.value) and "t10k-images-idx3-ubyte" in str(e.value)
    make_mnist(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", root=tmp_path)
    assert str(tmp_path) in str(e.value) and "t10k-labels-idx1-ubyte" in str(e.value)
    # Image and label counts that do not agree.
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(7, np.uint8))
    with pytest.raises(DatasetError, match="7 labels"):
        load_dataset("mnist", root=tmp_path)
    # Labels outside 0..9.
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(20, 12, np.uint8))
    with pytest.raises(DatasetError, match="outside"):
        load_dataset("mnist", root=tmp_path)


def test_mnist_without_inputs_reads_no_image_data(tmp_path):
    make_mnist(tmp_path)
    # Cut the image data short, keeping the header: only a reader of the
    # image data can notice.
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:1000])
    ds = load_dataset("mnist", root=tmp_path, need_inputs=False, val_fraction=0.5)
    assert ds.train.inputs is None and ds.val.inputs is None and ds.mean is None
    assert ds.train.labels.shape == (30,) and len(ds.train) == 30
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("mnist", root=tmp_path)
    lab = load_dataset("mnist", root=tmp_path, need_inputs=False, need_labels=False)
    assert lab.train.labels is None and lab.train.size == 50


# --------------------------------------------------------- CIFAR-10 from files

def make_cifar(root, per_batch=4, seed=0):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(os.path.join(root, name), "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, fh)
        batches[name] = (data, labels)
    return batches


def test_cifar_reader_layout(tmp_path):
    batches = make_cifar(tmp_path)
    x, y = read_cifar_batch(tmp_path / "data_batch_2")
    data, labels = batches["data_batch_2"]
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.uint8
    # Row layout: 1024 red values (row-major 32x32), then green, then blue.
    for c in range(3):
        np.testing.assert_array_equal(x[:, c].reshape(4, -1), data[:, c * 1024:(c + 1) * 1024])
    assert y.tolist() == labels


@pytest.mark.parametrize("layout", ["dir", "parent"])
def test_cifar_load(tmp_path, layout):
    sub = tmp_path / "cifar-10-batches-py"
    batches = make_cifar(sub)
    ds = load_dataset("cifar10", root=sub if layout == "dir" else tmp_path,
                      val_fraction=0.2, dtype=torch.float64)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert len(ds.train) == 16 and len(ds.val) == 4 and len(ds.test) == 4
    all_y = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert sorted(ds.train.labels.tolist() + ds.val.labels.tolist()) == sorted(all_y)
    assert ds.test.labels.tolist() == batches["test_batch"][1]
    # Per-channel statistics of the training split: the normalised training
    # inputs have mean 0 and standard deviation 1 in each channel.
    x = ds.train.inputs
    np.testing.assert_allclose(x.mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-12)
    np.testing.assert_allclose(x.std(dim=(0, 2, 3), unbiased=False).numpy(), 1, atol=1e-12)
    raw_test = batches["test_batch"][0].reshape(4, 3, 32, 32) / 255
    expected = (raw_test - ds.mean.numpy()[None, :, None, None]) / ds.std.numpy()[None, :, None, None]
    np.testing.assert_allclose(ds.test.inputs.numpy(), expected, atol=1e-12)


def test_cifar_malformed(tmp_path):
    sub = tmp_path / "cifar-10-batches-py"
    make_cifar(sub)
    os.remove(sub / "data_batch_4")
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", root=tmp_path)
    assert "data_batch_4" in str(e.value) and "cifar-10-batches-py" in str(e.value)
    p = sub / "data_batch_1"
    p.write_bytes(p.read_bytes()[:100])                       # truncated pickle
    with pytest.raises(DatasetError, match="data_batch_1"):
        read_cifar_batch(p)
    with open(p, "wb") as fh:                                 # no labels
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, fh)
    with pytest.raises(DatasetError, match="labels"):
        read_cifar_batch(p)
    with open(p, "wb") as fh:                                 # wrong row length
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(DatasetError, match="3072"):
        read_cifar_batch(p)
    with open(p, "wb") as fh:                                 # a pickle that names a callable
        pickle.dump(os.getcwd, fh)
    with pytest.raises(DatasetError, match="refusing"):
        read_cifar_batch(p)


# ------------------------------------------------------------- built-in sets

def test_unknown_name_lists_known():
    with pytest.raises(DatasetError) as e:
        load_dataset("imagenet")
    for name in KNOWN_DATASETS:
        assert name in str(e.value)


def test_peaks_deterministic_and_balanced():
    a = load_dataset("peaks", seed=5, normalize=False, dtype=torch.float64)
    b = load_dataset("peaks", seed=5, normalize=False, dtype=torch.float64)
    c = load_dataset("peaks", seed=6, normalize=False, dtype=torch.float64)
    assert len(a.train) == 5000 and len(a.val) == 1000 and a.test is None
    assert a.input_shape == (2,) and a.num_classes == 5
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.train.inputs, c.train.inputs)
    x = torch.cat([a.train.inputs, a.val.inputs]).numpy()
    y = torch.cat([a.train.labels, a.val.labels]).numpy()
    assert x.min() >= -3 and x.max() <= 3
    # Labels are level sets of the peaks function, thresholds increasing.
    f = peaks_f(x[:, 0], x[:, 1])
    for k in range(4):
        assert f[y == k].max() < f[y == k + 1].min()
    frac = np.bincount(y, minlength=5) / len(y)
    assert len(frac) == 5 and frac.min() > 0.05
    # The normalised set holds the same points, scaled by training statistics.
    n = load_dataset("peaks", seed=5, dtype=torch.float64)
    xt = a.train.inputs.numpy()
    np.testing.assert_allclose(n.mean.numpy(), xt.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(n.train.inputs.numpy(), (xt - xt.mean(0)) / xt.std(0), atol=1e-12)


def test_digits():
    from sklearn.datasets import load_digits
    ref = load_digits()
    ds = load_dataset("digits", seed=0)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.train.inputs.shape[1:] == (1, 8, 8) and ds.train.inputs.dtype == torch.float32
    assert len(ds.train) + len(ds.val) == len(ref.target)
    assert len(ds.val) == round(0.2 * len(ref.target))
    flat = ds.train.inputs.double().reshape(len(ds.train), -1)
    np.testing.assert_allclose(flat.mean(0).mean().item(), 0, atol=1e-6)
    assert set(torch.unique(ds.train.labels).tolist()) == set(range(10))
    # With no validation part and no normalisation: the images, in [0, 1].
    raw = load_dataset("digits", val_fraction=0.0, normalize=False, dtype=torch.float64)
    np.testing.assert_array_equal(raw.train.inputs.reshape(-1, 64).numpy(), ref.data / 16)
    np.testing.assert_array_equal(raw.train.labels.numpy(), ref.target)


# ------------------------------------------------------------ batch iterator

def test_loader_covers_every_sample_once_per_epoch():
    x = torch.arange(103, dtype=torch.float64).reshape(103, 1) * 10
    y = torch.arange(103)
    loader = BatchLoader(x, y, batch_size=10, seed=7)
    assert len(loader) == 11
    seen = []
    for xb, yb in loader.epoch(2):
        assert torch.equal(xb[:, 0], yb.double() * 10)   # inputs and labels stay paired
        seen.extend(yb.tolist())
    assert sorted(seen) == list(range(103)) and seen != list(range(103))
    again = [yb.tolist() for _, yb in loader.epoch(2)]
    other = [yb.tolist() for _, yb in loader.epoch(3)]
    assert sum(again, []) == seen and sum(other, []) != seen
    dropped = BatchLoader(x, y, batch_size=10, seed=7, drop_last=True)
    assert [len(b) for b in dropped.batch_indices(0)] == [10] * 10
    ordered = BatchLoader(x, y, batch_size=50, shuffle=False)
    assert torch.equal(torch.cat([b for _, b in ordered.epoch(0)]), y)


def test_loader_need_flags():
    ds = load_dataset("peaks", num_samples=120)
    for need_inputs, need_labels in [(True, False), (False, True), (False, False)]:
        loader = ds.train.loader(batch_size=16, seed=1, need_inputs=need_inputs,
                                 need_labels=need_labels)
        full = ds.train.loader(batch_size=16, seed=1)
        for (xb, yb), (xf, yf) in zip(loader.epoch(0), full.epoch(0)):
            assert (xb is None) != need_inputs and (yb is None) != need_labels
            if need_inputs:
                assert torch.equal(xb, xf)
            if need_labels:
                assert torch.equal(yb, yf)
        assert len(list(loader.epoch(0))) == len(full) == 7
    bare = BatchLoader(None, None, batch_size=4, num_samples=9, need_inputs=False, need_labels=False)
    assert [len(i) for i in bare.batch_indices(0)] == [4, 4, 1]
    with pytest.raises(ValueError, match="need_inputs"):
        BatchLoader(None, ds.train.labels, batch_size=4)


# ------------------------------------------------------------------- MPI

def _digest(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(b"-" if t is None else t.contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.mpi
def test_batches_identical_on_every_rank():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    ds = load_dataset("peaks", seed=11, num_samples=600)
    full = ds.train.loader(batch_size=32, seed=4)
    digests = [_digest(x, y) for x, y in full.epoch(1)]
    all_digests = comm.allgather(digests)
    assert all(d == digests for d in all_digests)
    # A layer-parallel group: the first rank loads only inputs, the last only labels.
    need_x, need_y = rank == 0, rank == size - 1
    part = load_dataset("peaks", seed=11, num_samples=600, need_inputs=need_x,
                        need_labels=need_y, comm=comm)
    loader = part.train.loader(batch_size=32, seed=4, need_inputs=need_x, need_labels=need_y)
    idx = [i.tolist() for i in loader.batch_indices(1)]
    assert all(other == idx for other in comm.allgather(idx))
    mine = [(x, y) for x, y in loader.epoch(1)]
    assert len(mine) == len(full)
    assert all((x is None) != need_x and (y is None) != need_y for x, y in mine)
    # Rank 0's input batches and the last rank's label batches are those of the full loader.
    xs = comm.bcast([_digest(x) for x, _ in mine] if rank == 0 else None, root=0)
    ys = comm.bcast([_digest(y) for _, y in mine] if rank == size - 1 else None, root=size - 1)
    assert xs == [_digest(x) for x, _ in full.epoch(1)]
    assert ys == [_digest(y) for _, y in full.epoch(1)]
    assert sorted(sum(idx, [])) == list(range(len(part.train)))


@pytest.mark.mpi
def test_collective_load_fails_on_every_rank(tmp_path):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    make_mnist(tmp_path)
    # The last rank's directory lacks a file; every rank must raise.
    if rank == size - 1:
        os.remove(tmp_path / "train-labels-idx1-ubyte")
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", root=tmp_path, comm=comm)
    assert "train-labels-idx1-ubyte" in str(e.value)
    # And a good load afterwards works on every rank (no collective left pending).
    if rank == size - 1:
        make_mnist(tmp_path)
    ds = load_dataset("mnist", root=tmp_path, comm=comm)
    assert comm.allgather(len(ds.train)) == [50] * size


# ------------------------------------------------------------- the package

def test_package_keeps_its_names_and_its_modules_form_no_import_cycle():
    # every name importable from the former single module still is, and no
    # module of layerpar.data imports one that imports it back
    import ast
    import importlib
    import pathlib

    import layerpar.data as data
    for name in data.__all__ + ["MNIST_FILES", "CIFAR10_DIRNAME", "CIFAR10_TRAIN_FILES",
                                "CIFAR10_TEST_FILE", "PEAKS_THRESHOLDS", "PEAKS_DEFAULT_SAMPLES"]:
        assert hasattr(data, name), name
    with pytest.raises(ImportError):
        importlib.import_module("layerpar.datafiles")
    root = pathlib.Path(data.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(("layerpar", "data") + parts[:-1 if parts[-1] == "__init__" else None])
        modules[name] = path
    imports = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                found.add(node.module)  # the package or module imported from
                found.update(f"{node.module}.{a.name}" for a in node.names
                             if f"{node.module}.{a.name}" in modules)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
        imports[name] = found - {name}
    if "layerpar.data" in imports:  # the package's __init__ re-exports; nothing imports it
        assert not any("layerpar.data" in deps for n, deps in imports.items()
                       if n != "layerpar.data"), imports

    def reaches(start, target, seen=()):
        return any(m == target or (m not in seen and reaches(m, target, seen + (m,)))
                   for m in imports.get(start, ()))
    cycles = [n for n in imports if reaches(n, n)]
    assert not cycles, {n: sorted(imports[n]) for n in cycles}
