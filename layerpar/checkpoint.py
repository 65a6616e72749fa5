"""HDF5 checkpoints for layer-parallel training.

Each rank of a layer-parallel group holds the weights of its own block of
layers.  A checkpoint stores every layer under its GLOBAL index, so a run can
resume on any number of ranks.

The ``state`` of one rank
-------------------------
``save_checkpoint`` takes, and ``load_checkpoint`` returns, a dict::

    {
      "num_layers": N,                       # int, required: residual layers in the network
      "epoch": int, "step": int,             # required, equal on every rank
      "config": dict,                        # resolved configuration, JSON-serialisable,
                                             #   equal on every rank (default {})
      "layers":  {n: {param_name: Tensor}},  # this rank's layers, n = global index 0..N-1
      "opening": {param_name: Tensor},       # opening layer (on the rank that has it; {} elsewhere)
      "closing": {param_name: Tensor},       # closing layer (likewise)
      "optimizer": {                         # free-form tree; by convention
          "layers":  {n: {param_name: {"exp_avg": Tensor, "step": 3, ...}}},
          "opening": {param_name: {...}}, "closing": {param_name: {...}},
          "hyper": [{"lr": 1e-3, "betas": (0.9, 0.999), ...}],  # one per param group
      },                                     # see optimizer_state()
      "rng": {"torch": ByteTensor, "numpy": ...} or None,   # see rng_state()
      "extra": {...},                        # optional free-form tree
    }

Trees (``optimizer``, ``extra``, the parameter dicts) are nested dicts (all
keys str, or all keys int), lists and tuples, whose leaves are torch tensors
(any shape and dtype, bfloat16 included), numpy arrays and scalars, and the
Python scalars bool, int, float, str and None.  They come back with the same
types, keys, dtypes and bits.  On saving, the pieces of all ranks are merged:
a key given by several ranks must have the same value on each, and the
layers must cover 0..N-1.  On loading, each rank gets the layers it asks for
(in ``layers`` and in ``optimizer["layers"]``), everything else whole, and
``rng`` as saved by the rank of the same number (None if the saving run had
fewer ranks).  Missing sections come back as empty dicts.

In a training loop with a ``layerpar.Network`` ``net`` and optimiser ``opt``::

    params = {"layers": {n: dict(net.body.layers[str(n)].named_parameters())
                         for n in net.body.layer_indices},
              "opening": dict(net.opening.named_parameters()) if net.is_first else {},
              "closing": dict(net.closing.named_parameters()) if net.is_last else {}}
    state = {"num_layers": N, "epoch": e, "step": s, "config": cfg,
             **{k: {n: {p: t.detach() for p, t in d.items()} for n, d in v.items()}
                if k == "layers" else {p: t.detach() for p, t in v.items()}
                for k, v in params.items()},
             "optimizer": optimizer_state(opt, params), "rng": rng_state()}
    save_checkpoint(run_dir / "latest.h5", comm, state)
    # resume, possibly on another number of ranks:
    path = find_latest_checkpoint(run_dir, comm)
    st = load_checkpoint(path, comm, layer_indices=net.body.layer_indices,
                         num_layers=N, config={"model": cfg["model"]})
    # copy st["layers"][n] etc. into the parameters (torch.no_grad, copy_),
    # then restore_optimizer_state(opt, params, st["optimizer"]).

File layout
-----------
Root attributes ``format`` ("layerpar-checkpoint"), ``format_version``,
``num_layers``, ``epoch``, ``step``, ``config`` (JSON string), ``num_ranks``,
``saved_at`` (Unix time) and ``sha256``; groups ``layers/<n>/<param>``,
``opening/``, ``closing/``, ``optimizer/``, ``rng/<rank>/``, ``extra/``.
``sha256`` is a digest over every group's and dataset's path, attributes,
dtype, shape and bytes in a canonical (sorted) order, and over the root
attributes; a load verifies it.

Safety
------
``save_checkpoint`` builds the file in memory, writes it to a temporary file
in the target directory (removed again if the write fails, e.g. on a full
disk: one CheckpointError, nothing left behind), fsyncs it, keeps the file
it replaces as ``<stem>.prev<suffix>`` (``latest.h5`` -> ``latest.prev.h5``)
and renames the new one into place; a crash at any point leaves a complete
checkpoint (and at most a temporary file that ``layerpar train`` removes
from the run folder when it next starts there).  ``find_latest_checkpoint`` returns the newest
checkpoint of a directory that verifies.  Save and load are collective: rank
0 does the file work and then tells every rank whether it succeeded, so a
failure raises the same one-line :class:`CheckpointError` on every rank.
A load never writes or deletes anything.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import time
import uuid
from collections.abc import Mapping
from typing import Optional

import h5py
import numpy as np
import torch

__all__ = [
    "FORMAT_VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint",
    "verify_checkpoint", "find_latest_checkpoint", "previous_path",
    "rng_state", "set_rng_state", "optimizer_state", "restore_optimizer_state",
]

FORMAT_NAME = "layerpar-checkpoint"
FORMAT_VERSION = 1
_SECTIONS = ("layers", "opening", "closing", "optimizer", "rng", "extra")
_SCALARS = ("num_layers", "epoch", "step", "config")
_TREE_SECTIONS = ("opening", "closing", "optimizer", "extra")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, read, verified or used by this run."""


# --------------------------------------------------------------------------
# RNG helpers
# --------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's global torch and numpy RNG states, for ``state["rng"]``."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (e.g. a loaded ``state["rng"]``)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])


# --------------------------------------------------------------------------
# Optimiser state by parameter name
# --------------------------------------------------------------------------

def _named_leaves(params, prefix=()):
    """Yield (key path, parameter) of a {"layers": {n: {name: p}}, "opening":
    {name: p}, "closing": {...}} layout (any nesting of dicts)."""
    for k, v in params.items():
        if isinstance(v, Mapping):
            yield from _named_leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def optimizer_state(optimizer: torch.optim.Optimizer, params: Mapping) -> dict:
    """This rank's optimiser state keyed by parameter names, for
    ``state["optimizer"]``.

    ``params`` names this rank's parameters in the layout of the state's
    weights, e.g. ``{"layers": {n: dict(layer.named_parameters())},
    "opening": {...}, "closing": {...}}``.  Returns the same layout with each
    parameter's optimiser state (``{"exp_avg": ..., "step": ...}``; ``{}``
    before the first step), plus ``"hyper"``: the parameter groups'
    hyper-parameters (a list, one dict per group, without ``"params"``).
    Independent of the number of ranks, unlike ``optimizer.state_dict()``,
    which numbers the parameters of one process.
    """
    out: dict = {}
    for path, p in _named_leaves(params):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = _detached(dict(optimizer.state.get(p, {})))
    if "hyper" in out:
        raise CheckpointError("params may not have a top-level entry 'hyper'")
    out["hyper"] = [{k: _detached(v) for k, v in g.items() if k != "params"}
                    for g in optimizer.param_groups]
    return out


def restore_optimizer_state(optimizer: torch.optim.Optimizer, params: Mapping,
                            saved: Mapping) -> None:
    """Inverse of :func:`optimizer_state`: set the state of each parameter in
    ``params`` from ``saved`` (a loaded ``state["optimizer"]``) and the
    groups' hyper-parameters.  Tensors follow the parameter's device, and
    its dtype when floating (``step`` counters keep theirs)."""
    hyper = saved.get("hyper")
    if hyper is not None:
        if len(hyper) != len(optimizer.param_groups):
            raise CheckpointError(f"optimiser has {len(optimizer.param_groups)} parameter groups, "
                                  f"the checkpoint {len(hyper)}")
        for group, h in zip(optimizer.param_groups, hyper):
            group.update({k: v for k, v in h.items() if k != "params"})
    for path, p in _named_leaves(params):
        node = saved
        for k in path:
            if not isinstance(node, Mapping) or k not in node:
                raise CheckpointError(f"checkpoint has no optimiser state for parameter "
                                      f"{'/'.join(map(str, path))}")
            node = node[k]
        st = {}
        for k, v in node.items():
            if isinstance(v, torch.Tensor):
                cast = v.is_floating_point() and k != "step"
                v = v.to(device=p.device, dtype=p.dtype if cast else v.dtype)
            st[k] = v
        if st:
            optimizer.state[p] = st
        else:
            optimizer.state.pop(p, None)


def previous_path(path) -> str:
    """Where ``save_checkpoint(path, ...)`` keeps the checkpoint it replaces."""
    stem, ext = os.path.splitext(os.fspath(path))
    return f"{stem}.prev{ext or '.h5'}"


# --------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------

def save_checkpoint(path, comm, state: dict, *, keep_previous: bool = True) -> None:
    """Write ``state`` (this rank's part; see the module docstring) to ``path``.

    Collective over ``comm``: every rank's part is gathered to rank 0, which
    merges, checks and writes atomically.  Raises CheckpointError on every
    rank if anything fails; the file at ``path`` (and its previous version) is
    then unchanged.
    """
    path = os.fspath(path)
    rank = comm.Get_rank()
    try:
        blob, err = pickle.dumps(_detached(state), protocol=pickle.HIGHEST_PROTOCOL), None
    except Exception as exc:  # noqa: BLE001 - reported through rank 0 below
        blob, err = None, f"{type(exc).__name__}: {_one_line(exc)}"
    # Every rank -> rank 0: its pickled part of the state (or why it has none).
    parts = comm.gather((blob, err), root=0)
    status, original = None, None
    if rank == 0:
        try:
            for r, (_, e) in enumerate(parts):
                if e is not None:
                    raise CheckpointError(f"checkpoint {path}: rank {r} cannot send its state ({e})")
            merged = _merge_parts([pickle.loads(b) for b, _ in parts], path)
            _write_atomic(path, merged, comm.Get_size(), keep_previous)
        except BaseException as exc:  # noqa: BLE001 - broadcast, raised everywhere
            # (an interrupt too: the other ranks wait for this answer)
            original = exc
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                status = (f"cannot write checkpoint {path}: disk full (the previous "
                          "checkpoint is kept): free space or choose another run folder")
            else:
                status = _message(exc, f"cannot write checkpoint {path}")
    # Rank 0 -> every rank: None on success, else the one-line error.
    status = comm.bcast(status, root=0)
    if original is not None and not isinstance(original, Exception):
        raise original
    if status is not None:
        raise CheckpointError(status) from original


def _detached(obj):
    """A copy of the tree with tensors detached and on the CPU (picklable)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _detached(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(v) for v in obj)
    return obj


def _merge_parts(parts: list, path: str) -> dict:
    """Merge the ranks' parts on rank 0 and check them."""
    for r, p in enumerate(parts):
        if not isinstance(p, Mapping):
            raise CheckpointError(f"checkpoint {path}: rank {r} gave a {type(p).__name__}, not a dict")
        unknown = set(p) - set(_SECTIONS) - set(_SCALARS)
        if unknown:
            raise CheckpointError(f"checkpoint {path}: rank {r} gave unknown state keys "
                                  f"{sorted(map(str, unknown))}; allowed: {', '.join(_SCALARS + _SECTIONS)}")
        for k in ("num_layers", "epoch", "step"):
            if not isinstance(p.get(k), (int, np.integer)) or isinstance(p.get(k), bool) or p[k] < 0:
                raise CheckpointError(f"checkpoint {path}: rank {r}: state[{k!r}] must be a "
                                      f"non-negative int, got {p.get(k)!r}")
    merged = {"num_layers": int(parts[0]["num_layers"]), "epoch": int(parts[0]["epoch"]),
              "step": int(parts[0]["step"]), "config": parts[0].get("config") or {}}
    try:
        config_json = json.dumps(merged["config"], sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: config is not JSON-serialisable ({exc})") from exc
    for r, p in enumerate(parts[1:], start=1):
        for k in ("num_layers", "epoch", "step"):
            if int(p[k]) != merged[k]:
                raise CheckpointError(f"checkpoint {path}: ranks 0 and {r} disagree on {k} "
                                      f"({merged[k]} vs {p[k]})")
        if json.dumps(p.get("config") or {}, sort_keys=True, default=repr) != config_json:
            raise CheckpointError(f"checkpoint {path}: ranks 0 and {r} disagree on the config")
    merged["config_json"] = config_json

    for sec in ("layers",) + _TREE_SECTIONS:
        acc = {}
        for r, p in enumerate(parts):
            piece = p.get(sec)
            if piece is None:
                continue
            if not isinstance(piece, Mapping):
                raise CheckpointError(f"checkpoint {path}: rank {r}: state[{sec!r}] must be a dict")
            acc = _merge(acc, piece, sec, r)
        merged[sec] = acc
    n = merged["num_layers"]
    bad = [k for k in merged["layers"] if not isinstance(k, (int, np.integer)) or not 0 <= k < n]
    if bad:
        raise CheckpointError(f"checkpoint {path}: layer keys must be global indices 0..{n - 1}, "
                              f"got {bad[:5]}")
    missing = sorted(set(range(n)) - set(int(k) for k in merged["layers"]))
    if missing:
        raise CheckpointError(f"checkpoint {path}: no rank gave layers {_ranges(missing)} "
                              f"of num_layers={n}")
    merged["layers"] = {int(k): merged["layers"][k] for k in sorted(merged["layers"])}
    merged["rng"] = {r: p["rng"] for r, p in enumerate(parts) if p.get("rng") is not None}
    return merged


def _merge(a, b, where: str, rank: int):
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = dict(a)
        for k, v in b.items():
            out[k] = _merge(a[k], v, f"{where}/{k}", rank) if k in a else v
        return out
    if _same(a, b):
        return a
    raise CheckpointError(f"rank {rank} gives a value for {where} that differs from a lower rank's")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape and
                torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                            b.contiguous().reshape(-1).view(torch.uint8)))
    if isinstance(a, (np.ndarray, np.generic)) and isinstance(b, (np.ndarray, np.generic)):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is not type(b):
        return False
    return a == b or (a != a and b != b)  # NaN equals NaN here


def _write_atomic(path: str, state: dict, num_ranks: int, keep_previous: bool) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    # The file is built in memory and then written with plain writes: a
    # full disk is an OSError here, never an HDF5 failure half-way through.
    image = io.BytesIO()
    with h5py.File(image, "w", track_order=True) as f:
        _write_state(f, state, num_ranks)
        f.attrs["sha256"] = _scan(f, decode=False)[0]
    try:
        _write_bytes(tmp, image.getbuffer())
        del image
        _install(tmp, path, keep_previous)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_path(directory)


def _write_bytes(path: str, data) -> None:
    """Write ``data`` to a new file and fsync it."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _install(tmp: str, path: str, keep_previous: bool) -> None:
    """Move the finished temporary file to ``path``, keeping the old one."""
    if keep_previous and os.path.exists(path):
        prev, link = previous_path(path), tmp + ".prev"
        try:
            # A hard link keeps ``path`` in place until the final rename, so
            # some complete checkpoint has the name ``path`` at every moment.
            os.link(path, link)
            os.replace(link, prev)
        except OSError:
            try:
                os.unlink(link)
            except OSError:
                pass
            os.replace(path, prev)  # no hard links on this file system
    os.replace(tmp, path)


def _h5open(path: str, mode: str, **kw) -> h5py.File:
    """h5py.File without HDF5's file locks: every file here has one writer
    (rank 0; checkpoints under a unique temporary name), and parallel file
    systems without flock support make locked opens fail."""
    return h5py.File(path, mode, locking=False, **kw)


def _fsync_path(p: str) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def _write_state(f: h5py.File, state: dict, num_ranks: int) -> None:
    f.attrs["format"] = FORMAT_NAME
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["num_layers"] = state["num_layers"]
    f.attrs["epoch"] = state["epoch"]
    f.attrs["step"] = state["step"]
    f.attrs["config"] = state["config_json"]
    f.attrs["num_ranks"] = num_ranks
    f.attrs["saved_at"] = time.time()
    for sec in _SECTIONS:
        _write_tree(f, sec, state[sec], sec)


def _check_key(k, where: str) -> str:
    name = str(k)
    if name in ("", ".", "..") or "/" in name:
        raise CheckpointError(f"{where}: key {k!r} cannot be stored (empty, '.', or contains '/')")
    return name


def _write_tree(group: h5py.Group, name: str, obj, where: str) -> None:
    if isinstance(obj, Mapping):
        keys = list(obj)
        if all(isinstance(k, str) for k in keys):
            kind = "dict"
        elif all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in keys):
            kind = "dict_int"
        else:
            raise CheckpointError(f"{where}: dict keys must be all str or all int, got "
                                  f"{sorted({type(k).__name__ for k in keys})}")
        g = group.create_group(name, track_order=True)
        g.attrs["container"] = kind
        for k in keys:
            _write_tree(g, _check_key(k, where), obj[k], f"{where}/{k}")
    elif isinstance(obj, (list, tuple)):
        g = group.create_group(name, track_order=True)
        g.attrs["container"] = "tuple" if isinstance(obj, tuple) else "list"
        for i, v in enumerate(obj):
            _write_tree(g, str(i), v, f"{where}/{i}")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            arr = t.view(torch.int16).numpy()  # numpy has no bfloat16: store the bits
        else:
            try:
                arr = t.numpy()
            except (TypeError, RuntimeError) as exc:
                raise CheckpointError(f"{where}: cannot store a tensor of dtype {t.dtype}") from exc
        ds = group.create_dataset(name, data=arr)
        ds.attrs["kind"] = "tensor"
        ds.attrs["torch_dtype"] = str(t.dtype).replace("torch.", "")
    elif isinstance(obj, (np.ndarray, np.generic)):
        arr = np.asarray(obj)
        if arr.dtype.kind not in "biufc":
            raise CheckpointError(f"{where}: cannot store a numpy array of dtype {arr.dtype}")
        ds = group.create_dataset(name, data=arr)
        ds.attrs["kind"] = "ndarray" if isinstance(obj, np.ndarray) else "npscalar"
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        text = json.dumps(obj, allow_nan=True).encode("utf-8")
        ds = group.create_dataset(name, data=np.frombuffer(text, dtype=np.uint8))
        ds.attrs["kind"] = "json"
    else:
        raise CheckpointError(f"{where}: cannot store a {type(obj).__name__} "
                              "(use tensors, numpy arrays, numbers, str, None, dict, list, tuple)")


# --------------------------------------------------------------------------
# Read and verify (rank 0, or any single process)
# --------------------------------------------------------------------------

def _attr_value(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _attrs_json(obj, skip=()) -> bytes:
    items = {k: _attr_value(obj.attrs[k]) for k in obj.attrs if k not in skip}
    return json.dumps(items, sort_keys=True, allow_nan=True, default=repr).encode("utf-8")


def _scan(f: h5py.File, decode: bool = True):
    """Return (sha256 hex digest, decoded tree of the sections or None).

    The digest is over the sorted list of per-object digests (path, kind,
    attributes, dtype, shape, bytes), so it does not depend on the order in
    which HDF5 lists the objects."""
    entries = [hashlib.sha256(b"/\0" + _attrs_json(f, skip=("sha256",))).digest()]

    def visit(obj, path):
        if isinstance(obj, h5py.Group):
            entries.append(hashlib.sha256(b"G" + path.encode() + b"\0" + _attrs_json(obj)).digest())
            children = [(k, visit(obj[k], f"{path}/{k}")) for k in obj.keys()]
            return _build_container(obj.attrs.get("container", "dict"), children, path) if decode else None
        arr = obj[()]
        arr = np.asarray(arr)
        h = hashlib.sha256(b"D" + path.encode() + b"\0" + _attrs_json(obj))
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
        entries.append(h.digest())
        return _decode_leaf(obj.attrs.get("kind"), obj.attrs.get("torch_dtype"), arr, path) if decode else None

    tree = {}
    for sec in f.keys():
        tree[sec] = visit(f[sec], sec)
    total = hashlib.sha256()
    for e in sorted(entries):
        total.update(e)
    return total.hexdigest(), (tree if decode else None)


def _build_container(kind, children, path):
    kind = _attr_value(kind)
    if kind == "dict":
        return dict(children)
    if kind == "dict_int":
        return {int(k): v for k, v in children}
    if kind in ("list", "tuple"):
        items = [v for _, v in sorted(children, key=lambda kv: int(kv[0]))]
        return tuple(items) if kind == "tuple" else items
    raise CheckpointError(f"{path}: unknown container kind {kind!r}")


def _decode_leaf(kind, torch_dtype, arr: np.ndarray, path: str):
    kind = _attr_value(kind)
    if kind == "tensor":
        name = _attr_value(torch_dtype)
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


def _read_verified(path: str, *, decode: bool = True):
    """Open, check the format and the checksum; return (header, tree)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        with _h5open(path, "r") as f:
            if _attr_value(f.attrs.get("format")) != FORMAT_NAME:
                raise CheckpointError(f"{path} is not a layerpar checkpoint")
            version = _attr_value(f.attrs.get("format_version"))
            if not isinstance(version, int) or version > FORMAT_VERSION:
                raise CheckpointError(f"checkpoint {path} has format version {version!r}; this "
                                      f"layerpar reads versions up to {FORMAT_VERSION}")
            stored = _attr_value(f.attrs.get("sha256"))
            if not stored:
                raise CheckpointError(f"checkpoint {path} has no checksum (incomplete write?)")
            digest, tree = _scan(f, decode=decode)
            if digest != stored:
                raise CheckpointError(f"checkpoint {path} is corrupted: checksum mismatch")
            header = {k: _attr_value(f.attrs[k]) for k in f.attrs if k != "sha256"}
            header["config"] = json.loads(header.get("config", "{}"))
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything h5py/HDF5 raises on a bad file
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupted?): "
                              f"{type(exc).__name__}: {_one_line(exc)}") from exc
    return header, tree


def verify_checkpoint(path) -> dict:
    """Check one checkpoint file in this process (not collective); return its
    header (num_layers, epoch, step, config, num_ranks, saved_at, ...).
    Raises CheckpointError if it is missing, unreadable or corrupted."""
    return _read_verified(os.fspath(path), decode=False)[0]


def find_latest_checkpoint(run_dir, comm, *, pattern_suffix: str = ".h5") -> Optional[str]:
    """The newest (by step, then epoch, then save time) checkpoint in
    ``run_dir`` that verifies, or None.  Collective: rank 0 looks, every rank
    gets the same answer.  Temporary files of interrupted saves are ignored."""
    found, error = None, None
    if comm.Get_rank() == 0:
        try:
            best = None
            names = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
            for name in names:
                p = os.path.join(run_dir, name)
                if name.startswith(".") or not name.endswith(pattern_suffix) or not os.path.isfile(p):
                    continue
                try:
                    h = verify_checkpoint(p)
                except CheckpointError:
                    continue
                key = (h["step"], h["epoch"], h.get("saved_at", 0.0))
                if best is None or key > best[0]:
                    best = (key, p)
            found = None if best is None else best[1]
        except Exception as exc:  # noqa: BLE001
            error = _message(exc, f"cannot search {run_dir} for checkpoints")
    # Rank 0 -> every rank: the path found (or the error).
    found, error = comm.bcast((found, error), root=0)
    if error is not None:
        raise CheckpointError(error)
    return found


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------

def load_checkpoint(path, comm, *, layer_indices=None, num_layers: Optional[int] = None,
                    config: Optional[dict] = None, like: Optional[dict] = None,
                    defaults: Optional[dict] = None) -> dict:
    """Read ``path`` and give each rank its part of the state.

    Collective over ``comm``.  ``layer_indices``: the global layer indices this
    rank wants (None: those of ``like["layers"]`` if given, else all).
    ``num_layers``: refuse a checkpoint of a network of another depth.
    ``config``: refuse a checkpoint whose configuration differs in any entry
    given here (nested dicts compare entry by entry; pass the part that must
    match, e.g. ``{"model": cfg["model"]}``); an entry the checkpoint lacks
    (a key added after it was written) counts as its value in ``defaults``
    (same nesting), when given.  ``like``: a state of this run's
    model (this rank's layers, opening and closing); refuse a checkpoint whose
    parameters differ from it in name, shape or dtype.

    Returns the state dict described in the module docstring.  Raises
    CheckpointError on every rank if anything is wrong; never writes.
    """
    path = os.fspath(path)
    rank = comm.Get_rank()
    try:
        request, err = _make_request(layer_indices, like), None
    except Exception as exc:  # noqa: BLE001 - reported through rank 0 below
        request, err = None, _one_line(exc)
    # Every rank -> rank 0: which layers it wants and its model's parameter shapes.
    requests = comm.gather((request, err), root=0)
    payloads, status, original = None, None, None
    if rank == 0:
        try:
            for r, (_, e) in enumerate(requests):
                if e is not None:
                    raise CheckpointError(f"load of checkpoint {path}: rank {r}: {e}")
            header, tree = _read_verified(path)
            if num_layers is not None and header["num_layers"] != num_layers:
                raise CheckpointError(f"checkpoint {path} is for {header['num_layers']} layers, "
                                      f"this run has {num_layers}")
            if config is not None:
                diff = _config_difference(header["config"], config, defaults=defaults)
                if diff:
                    raise CheckpointError(f"checkpoint {path} has a different configuration: {diff}")
            payloads = [_select(header, tree, req, r, path) for r, (req, _) in enumerate(requests)]
        except Exception as exc:  # noqa: BLE001 - broadcast, raised everywhere
            original = exc
            status = _message(exc, f"cannot load checkpoint {path}")
    # Rank 0 -> every rank: None if the file is good and fits, else the error.
    status = comm.bcast(status, root=0)
    if status is not None:
        raise CheckpointError(status) from original
    # Rank 0 -> rank r: the part of the state rank r asked for.
    return comm.scatter(payloads, root=0)


def _param_spec(params) -> dict:
    if not isinstance(params, Mapping):
        raise TypeError("like: parameter sections must be dicts of tensors")
    return {str(k): (tuple(v.shape), str(v.dtype).replace("torch.", ""))
            for k, v in params.items() if isinstance(v, torch.Tensor)}


def _make_request(layer_indices, like) -> dict:
    spec = None
    if like is not None:
        spec = {"layers": {int(n): _param_spec(p) for n, p in (like.get("layers") or {}).items()},
                "opening": _param_spec(like.get("opening") or {}),
                "closing": _param_spec(like.get("closing") or {})}
        if layer_indices is None:
            layer_indices = sorted(spec["layers"])
    if layer_indices is not None:
        idx = []
        for n in layer_indices:
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
                raise TypeError(f"layer_indices must be integers, got {n!r}")
            idx.append(int(n))
        layer_indices = sorted(set(idx))
    return {"layers": layer_indices, "spec": spec}


def _select(header: dict, tree: dict, request: dict, rank: int, path: str) -> dict:
    layers = tree.get("layers", {})
    n_layers = header["num_layers"]
    wanted = request["layers"] if request["layers"] is not None else sorted(layers)
    absent = [n for n in wanted if n not in layers]
    if absent:
        raise CheckpointError(f"checkpoint {path} has layers 0..{n_layers - 1}; rank {rank} asked "
                              f"for layers {_ranges(absent)}")
    opt = dict(tree.get("optimizer") or {})
    if isinstance(opt.get("layers"), Mapping):
        opt["layers"] = {n: v for n, v in opt["layers"].items() if n in set(wanted)}
    out = {"num_layers": n_layers, "epoch": header["epoch"], "step": header["step"],
           "config": header["config"],
           "layers": {n: layers[n] for n in wanted},
           "opening": tree.get("opening") or {}, "closing": tree.get("closing") or {},
           "optimizer": opt, "extra": tree.get("extra") or {},
           "rng": (tree.get("rng") or {}).get(rank)}
    spec = request["spec"]
    if spec is not None:
        for n, ps in spec["layers"].items():
            _compare_spec(f"layer {n}", _param_spec(out["layers"].get(n, {})), ps, path)
        for sec in ("opening", "closing"):
            if spec[sec]:
                _compare_spec(f"the {sec} layer", _param_spec(out[sec]), spec[sec], path)
    return out


def _compare_spec(what: str, saved: dict, model: dict, path: str) -> None:
    if set(saved) != set(model):
        raise CheckpointError(f"checkpoint {path}: {what} has parameters {sorted(saved)}, "
                              f"the model has {sorted(model)}")
    for name, (shape, dtype) in model.items():
        if saved[name] != (shape, dtype):
            s_shape, s_dtype = saved[name]
            raise CheckpointError(f"checkpoint {path}: {what} parameter {name!r} is {s_dtype} "
                                  f"{list(s_shape)} in the checkpoint, {dtype} {list(shape)} in the model")


def _config_difference(saved, expected, prefix: str = "", defaults=None) -> Optional[str]:
    if not isinstance(expected, Mapping):
        raise TypeError("config must be a dict of the entries that must match")
    for k, v in expected.items():
        key = f"{prefix}{k}"
        if isinstance(saved, Mapping) and k not in saved and isinstance(defaults, Mapping) \
                and k in defaults:
            saved = dict(saved, **{k: json.loads(json.dumps(defaults[k], default=repr))})
        if not isinstance(saved, Mapping) or k not in saved:
            return f"{key} is not in the checkpoint's configuration"
        if isinstance(v, Mapping) and isinstance(saved[k], Mapping):
            d = _config_difference(saved[k], v, key + ".",
                                   defaults.get(k) if isinstance(defaults, Mapping) else None)
            if d:
                return d
        elif json.loads(json.dumps(v, default=repr)) != saved[k]:
            return f"{key} = {saved[k]!r} in the checkpoint, {v!r} in this run"
    return None


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _message(exc: BaseException, context: str) -> str:
    if isinstance(exc, CheckpointError):
        return _one_line(exc)
    return f"{context}: {type(exc).__name__}: {_one_line(exc)}"


def _ranges(nums) -> str:
    nums = sorted(nums)
    out, start = [], None
    for i, n in enumerate(nums):
        if start is None:
            start = n
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(out[:10]) + (",..." if len(out) > 10 else "")
