"""The checkpoint file format: trees in HDF5, content digests, manifest and part files.

A *tree* is a nested dict (keys all str or all int), list or tuple whose
leaves are torch tensors (any shape and dtype, bfloat16 included), numpy
arrays and scalars, and the Python scalars bool, int, float, str and None.
An *entry* of a part (:func:`write_entry`) is an HDF5 group holding a tree:
the dataset ``tree`` is its structure as JSON (containers, keys, the Python
scalars, and for each array leaf its kind, dtype, shape and byte offset),
the dataset ``data`` the arrays' bytes; a tree read back has the same
types, keys, key order, dtypes and bits.

:func:`digest_tree` is a SHA-256 over a tree's content (types, keys,
dtypes, shapes, bytes), the same for a tree and for the tree read back.

Version 2 (written now)
    The *manifest* (the checkpoint's own path) has the root attributes
    ``format`` ("layerpar-checkpoint"), ``format_version`` (2),
    ``num_layers``, ``epoch``, ``step``, ``config`` (JSON), ``num_ranks``,
    ``saved_at``, ``parts_dir`` (the folder of the parts, relative to the
    manifest's folder) and ``sha256`` (a digest over every attribute and
    dataset, see :func:`scan`), and the dataset ``parts``: JSON of one
    entry per part, ``{"file", "sha256", "layers": [[lo, hi), ...],
    "shared": bool, "rng": bool}``.
    A *part* (``part-<rank>.h5``, written by one rank) has root attribute
    ``format`` ("layerpar-checkpoint-part") and one group per entry:
    ``layer.<n>`` (``{"params": ..., "optimizer": ...}`` of global layer n),
    ``rng`` (that rank's RNG state) and ``shared`` (the pieces of the
    opening, closing, optimizer and extra sections that this part holds);
    each entry group carries the :func:`digest_tree` of its content as
    attribute ``sha256``.  The part's digest in the manifest is the
    :class:`TableDigest` of those entry digests, so a reader verifies the
    part's table against the manifest and each entry it reads against the
    table, without reading the rest of the part.

Version 1 (read only)
    One file with the same root attributes (no ``parts_dir``) and the whole
    state in groups ``layers/<n>``, ``opening``, ``closing``, ``optimizer``,
    ``rng/<rank>``, ``extra`` (a container a group with attribute
    ``container``, a leaf a dataset with attribute ``kind``); ``sha256`` is
    :func:`scan` over all of it.
"""
import gc
import hashlib
import io
import json
import os
import time
from collections.abc import Mapping

import h5py
import numpy as np
import torch

from .errors import CheckpointError, one_line

FORMAT_NAME = "layerpar-checkpoint"
PART_FORMAT = "layerpar-checkpoint-part"
FORMAT_VERSION = 2
SECTIONS = ("layers", "opening", "closing", "optimizer", "rng", "extra")
SCALARS = ("num_layers", "epoch", "step", "config")
SHARED_SECTIONS = ("opening", "closing", "optimizer", "extra")


def h5open(target, mode: str, **kw) -> h5py.File:
    """h5py.File without HDF5's file locks: every file here has one writer
    (under a unique temporary name), and parallel file systems without
    flock support make locked opens fail."""
    return h5py.File(target, mode, locking=False, **kw)


# --------------------------------------------------------------------------
# Trees: check, digest, write, read
# --------------------------------------------------------------------------

def _check_key(k, where: str) -> str:
    name = str(k)
    if name in ("", ".", "..") or "/" in name:
        raise CheckpointError(f"{where}: key {k!r} cannot be stored (empty, '.', or contains '/')")
    return name


def _dict_kind(obj: Mapping, where: str) -> str:
    keys = list(obj)
    if all(isinstance(k, str) for k in keys):
        return "dict"
    if all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in keys):
        return "dict_int"
    raise CheckpointError(f"{where}: dict keys must be all str or all int, got "
                          f"{sorted({type(k).__name__ for k in keys})}")


def _unstorable(obj, where: str) -> CheckpointError:
    return CheckpointError(f"{where}: cannot store a {type(obj).__name__} "
                           "(use tensors, numpy arrays, numbers, str, None, dict, list, tuple)")


def _tensor_bits(t: torch.Tensor, where: str):
    """(dtype name, numpy array of the tensor's values) of a CPU tensor;
    bfloat16 as its int16 bits (numpy has no bfloat16)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return "bfloat16", t.view(torch.int16).numpy()
    try:
        return str(t.dtype).replace("torch.", ""), t.numpy()
    except (TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: cannot store a tensor of dtype {t.dtype}") from exc


def _numpy_ok(arr, where: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biufc":
        raise CheckpointError(f"{where}: cannot store a numpy array of dtype {arr.dtype}")
    return arr


def check_tree(obj, where: str) -> None:
    """Raise CheckpointError if the tree cannot be stored (keys and leaf
    types only; no data is touched)."""
    if isinstance(obj, Mapping):
        _dict_kind(obj, where)
        for k, v in obj.items():
            _check_key(k, where)
            check_tree(v, f"{where}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_tree(v, f"{where}/{i}")
    elif isinstance(obj, (np.ndarray, np.generic)):
        _numpy_ok(obj, where)
    elif not (isinstance(obj, torch.Tensor) or obj is None
              or isinstance(obj, (bool, int, float, str))):
        raise _unstorable(obj, where)


def _feed(h, obj, where: str) -> None:
    if isinstance(obj, Mapping):
        kind = _dict_kind(obj, where)
        h.update(f"{kind}:{len(obj)}\0".encode())
        for k, v in obj.items():
            key = int(k) if kind == "dict_int" else k
            h.update(f"{key}\0".encode("utf-8", "surrogatepass"))
            _feed(h, v, f"{where}/{k}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}:{len(obj)}\0".encode())
        for i, v in enumerate(obj):
            _feed(h, v, f"{where}/{i}")
    elif isinstance(obj, torch.Tensor):
        name, arr = _tensor_bits(obj, where)
        h.update(f"tensor:{name}:{tuple(arr.shape)}\0".encode())
        h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    elif isinstance(obj, (np.ndarray, np.generic)):
        arr = _numpy_ok(obj, where)
        kind = "ndarray" if isinstance(obj, np.ndarray) else "npscalar"
        h.update(f"{kind}:{arr.dtype.str}:{arr.shape}\0".encode())
        h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"json:{json.dumps(obj, allow_nan=True)}\0".encode())
    else:
        raise _unstorable(obj, where)


def digest_tree(obj, where: str = "") -> str:
    """SHA-256 (hex) of a tree's content; raises CheckpointError for what
    cannot be stored."""
    h = hashlib.sha256()
    _feed(h, obj, where)
    return h.hexdigest()


def write_entry(parent: h5py.Group, name: str, obj, where: str) -> h5py.Group:
    """Store the tree ``obj`` as the group ``parent[name]`` with two
    datasets: ``tree``, its structure as JSON (containers, keys, the Python
    scalars, and for each array leaf its kind, dtype, shape and place), and
    ``data``, the bytes of its arrays one after the other (each at a multiple
    of 16 bytes)."""
    arrays = []  # [numpy array, offset]
    end = 0

    def encode(o, w):
        nonlocal end
        if isinstance(o, Mapping):
            if _dict_kind(o, w) == "dict_int":
                return {"di": [[int(k), encode(v, f"{w}/{k}")] for k, v in o.items()]}
            return {"d": [[_check_key(k, w), encode(v, f"{w}/{k}")] for k, v in o.items()]}
        if isinstance(o, (list, tuple)):
            return {"t" if isinstance(o, tuple) else "l":
                    [encode(v, f"{w}/{i}") for i, v in enumerate(o)]}
        if isinstance(o, torch.Tensor):
            dtype, arr = _tensor_bits(o, w)
            node = {"T": dtype}
        elif isinstance(o, (np.ndarray, np.generic)):
            arr = _numpy_ok(o, w)
            node = {"A" if isinstance(o, np.ndarray) else "S": 1}
        elif o is None or isinstance(o, (bool, int, float, str)):
            return {"j": o}
        else:
            raise _unstorable(o, w)
        arr = np.require(arr, requirements="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        node.update(dtype=arr.dtype.str, shape=list(arr.shape), at=end)
        arrays.append((arr, end))
        end += -(-arr.nbytes // 16) * 16
        return node

    text = json.dumps(encode(obj, where), allow_nan=True).encode("utf-8")
    g = parent.create_group(name)
    g.create_dataset("tree", data=np.frombuffer(text, dtype=np.uint8))
    blob = np.zeros(end, dtype=np.uint8)  # one entry's bytes: a layer's, not the model's
    for arr, at in arrays:
        blob[at:at + arr.nbytes] = arr.reshape(-1).view(np.uint8)
    g.create_dataset("data", data=blob)
    return g


def read_entry(g: h5py.Group, where: str):
    """The tree stored by :func:`write_entry`."""
    blob = np.asarray(g["data"][()])

    def array(node):
        dtype = np.dtype(node["dtype"])
        count = int(np.prod(node["shape"], dtype=np.int64))
        at = int(node["at"])
        raw = blob[at:at + count * dtype.itemsize]
        return np.frombuffer(raw.tobytes(), dtype=dtype, count=count).reshape(tuple(node["shape"]))

    def decode(node):
        if "d" in node:
            return {k: decode(v) for k, v in node["d"]}
        if "di" in node:
            return {int(k): decode(v) for k, v in node["di"]}
        if "l" in node:
            return [decode(v) for v in node["l"]]
        if "t" in node:
            return tuple(decode(v) for v in node["t"])
        if "j" in node:
            return node["j"]
        if "T" in node:
            return _decode_leaf("tensor", node["T"], array(node), where)
        if "A" in node:
            return np.array(array(node))
        if "S" in node:
            return array(node)[()]
        raise CheckpointError(f"{where}: unknown entry node {sorted(node)}")

    return decode(json.loads(bytes(np.asarray(g["tree"][()])).decode("utf-8")))


def attr_value(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _build_container(kind, children, path):
    kind = attr_value(kind)
    if kind == "dict":
        return dict(children)
    if kind == "dict_int":
        return {int(k): v for k, v in children}
    if kind in ("list", "tuple"):
        items = [v for _, v in sorted(children, key=lambda kv: int(kv[0]))]
        return tuple(items) if kind == "tuple" else items
    raise CheckpointError(f"{path}: unknown container kind {kind!r}")


def _decode_leaf(kind, torch_dtype, arr: np.ndarray, path: str):
    kind = attr_value(kind)
    if kind == "tensor":
        name = attr_value(torch_dtype)
        dtype = getattr(torch, str(name), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{path}: unknown torch dtype {name!r}")
        if dtype == torch.bfloat16:
            return torch.from_numpy(np.array(arr, dtype=np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.array(arr)).to(dtype)
    if kind == "ndarray":
        return np.array(arr)
    if kind == "npscalar":
        return arr[()]
    if kind == "json":
        return json.loads(arr.tobytes().decode("utf-8"))
    raise CheckpointError(f"{path}: unknown leaf kind {kind!r}")


# --------------------------------------------------------------------------
# Whole-file digest (the manifest; version-1 files)
# --------------------------------------------------------------------------

def _attrs_json(obj, skip=()) -> bytes:
    items = {k: attr_value(obj.attrs[k]) for k in obj.attrs if k not in skip}
    return json.dumps(items, sort_keys=True, allow_nan=True, default=repr).encode("utf-8")


def scan(f: h5py.File, decode: bool = True):
    """Return (sha256 hex digest, decoded tree of the file's groups or None).

    The digest is over the sorted list of per-object digests (path, kind,
    attributes, dtype, shape, bytes) and the root attributes but
    ``sha256``, so it does not depend on the order in which HDF5 lists the
    objects."""
    entries = [hashlib.sha256(b"/\0" + _attrs_json(f, skip=("sha256",))).digest()]

    def visit(obj, path):
        if isinstance(obj, h5py.Group):
            entries.append(hashlib.sha256(b"G" + path.encode() + b"\0" + _attrs_json(obj)).digest())
            children = [(k, visit(obj[k], f"{path}/{k}")) for k in obj.keys()]
            return _build_container(obj.attrs.get("container", "dict"), children, path) if decode else None
        arr = np.asarray(obj[()])
        h = hashlib.sha256(b"D" + path.encode() + b"\0" + _attrs_json(obj))
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
        entries.append(h.digest())
        return _decode_leaf(obj.attrs.get("kind"), obj.attrs.get("torch_dtype"), arr, path) if decode else None

    tree = {sec: visit(f[sec], sec) for sec in f.keys()}
    total = hashlib.sha256()
    for e in sorted(entries):
        total.update(e)
    return total.hexdigest(), (tree if decode else None)


# --------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------

def manifest_image(header: dict, parts: list, parts_dir: str, num_ranks: int) -> bytes:
    """The bytes of a version-2 manifest (small: built in memory)."""
    image = io.BytesIO()
    with h5py.File(image, "w", track_order=True) as f:
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        for k in ("num_layers", "epoch", "step"):
            f.attrs[k] = header[k]
        f.attrs["config"] = header["config_json"]
        f.attrs["num_ranks"] = num_ranks
        f.attrs["saved_at"] = time.time()
        f.attrs["parts_dir"] = parts_dir
        text = json.dumps(parts).encode("utf-8")
        f.create_dataset("parts", data=np.frombuffer(text, dtype=np.uint8)).attrs["kind"] = "json"
        f.attrs["sha256"] = scan(f, decode=False)[0]
    return image.getvalue()


HEADER_KEYS = ("format", "format_version", "num_layers", "epoch", "step", "config",
               "num_ranks", "saved_at")


def read_manifest(path: str, *, full_v1: bool = False):
    """Check the format and the manifest's checksum; return (header,
    parts, parts_dir) of a version-2 checkpoint, or (header, tree, None)
    of a version-1 file (``tree`` only if ``full_v1``: its checksum covers
    the whole file, so verifying it reads everything)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        with h5open(path, "r") as f:
            if attr_value(f.attrs.get("format")) != FORMAT_NAME:
                raise CheckpointError(f"{path} is not a layerpar checkpoint")
            version = attr_value(f.attrs.get("format_version"))
            if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
                raise CheckpointError(f"checkpoint {path} has format version {version!r}; this "
                                      f"layerpar reads versions 1 to {FORMAT_VERSION}")
            stored = attr_value(f.attrs.get("sha256"))
            if not stored:
                raise CheckpointError(f"checkpoint {path} has no checksum (incomplete write?)")
            if version == 1 and not full_v1:
                digest, tree = stored, None  # verified when the file is read
            else:
                digest, tree = scan(f, decode=True)
            if digest != stored:
                raise CheckpointError(f"checkpoint {path} is corrupted: checksum mismatch")
            header = {k: attr_value(f.attrs[k]) for k in HEADER_KEYS if k in f.attrs}
            header["config"] = json.loads(header.get("config", "{}"))
            if version == 1:
                return header, tree, None
            return header, tree["parts"], attr_value(f.attrs["parts_dir"])
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything h5py/HDF5 raises on a bad file
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupted?): "
                              f"{type(exc).__name__}: {one_line(exc)}") from exc


def manifest_parts_dir(path: str):
    """The parts folder a version-2 manifest names (unverified), or None."""
    try:
        with h5open(path, "r") as f:
            value = f.attrs.get("parts_dir")
            return None if value is None else attr_value(value)
    except Exception:  # noqa: BLE001 - not a readable manifest
        return None


# --------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------

def layer_entry(n: int) -> str:
    return f"layer.{int(n)}"


class TableDigest:
    """A part's digest: SHA-256 over its entries' names and digests in the
    order they were written (the order HDF5 lists them), kept as it goes."""

    def __init__(self):
        self._h = hashlib.sha256(PART_FORMAT.encode() + b"\n")

    def add(self, name: str, digest: str) -> None:
        self._h.update(f"{name}\0{digest}\n".encode())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def write_part(target, entries) -> str:
    """Write a part to ``target`` (a file-like object); ``entries`` yields
    (name, tree, where) one at a time, so only one entry is in hand at once.
    Returns the part's digest (:class:`TableDigest`)."""
    table = TableDigest()
    with h5open(target, "w", track_order=True) as f:
        f.attrs["format"] = PART_FORMAT
        for name, obj, where in entries:
            digest = digest_tree(obj, where)
            write_entry(f, name, obj, where).attrs["sha256"] = digest
            table.add(name, digest)
            del obj
            gc.collect(0)  # numpy views of torch tensors are in reference cycles
    return table.hexdigest()


class PartReader:
    """One part file opened for reading: its table checked against the
    manifest's digest, each entry checked against the table as it is read.
    Errors are CheckpointErrors naming the part (``label``)."""

    def __init__(self, path: str, expected: str, label: str):
        self.label = label
        if not os.path.isfile(path):
            raise CheckpointError(f"{label} not found")
        try:
            self.f = h5open(path, "r")
        except Exception as exc:  # noqa: BLE001 - anything HDF5 raises on a bad file
            raise CheckpointError(f"{label} is unreadable (truncated or corrupted?): "
                                  f"{type(exc).__name__}: {one_line(exc)}") from exc
        try:
            if attr_value(self.f.attrs.get("format")) != PART_FORMAT:
                raise CheckpointError(f"{label} is not a checkpoint part")
            self.table = {k: attr_value(self.f[k].attrs.get("sha256")) for k in self.f.keys()}
        except CheckpointError:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001
            self.close()
            raise CheckpointError(f"{label} is unreadable (truncated or corrupted?): "
                                  f"{type(exc).__name__}: {one_line(exc)}") from exc
        table = TableDigest()
        for name, digest in self.table.items():
            table.add(name, digest)
        if table.hexdigest() != expected:
            self.close()
            raise CheckpointError(f"{label} is corrupted: checksum mismatch of its table")

    def has(self, name: str) -> bool:
        return name in self.table

    def read(self, name: str):
        if name not in self.table:
            raise CheckpointError(f"{self.label} has no entry {name}")
        try:
            obj = read_entry(self.f[name], name)
        except CheckpointError as exc:
            raise CheckpointError(f"{self.label} is corrupted: {one_line(exc)}") from exc
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{self.label} is unreadable (corrupted?) at {name}: "
                                  f"{type(exc).__name__}: {one_line(exc)}") from exc
        if digest_tree(obj, name) != self.table[name]:
            raise CheckpointError(f"{self.label} is corrupted: checksum mismatch in {name}")
        return obj

    def close(self):
        try:
            self.f.close()
        except Exception:  # noqa: BLE001 - closing a damaged file
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
