"""The parallel protocol of a load and of verification: who reads what.

A load: rank 0 reads the manifest (small), checks its checksum and that it
fits this run, and broadcasts it (the header and the parts table) or the
error.  Each rank then opens only the parts that hold the layers it asks
for, the parts that hold shared pieces (opening, closing, optimiser
hyper-parameters, extra) and the part of its own rank number (its RNG
state), and reads from them only those entries, each verified against the
part's table and the table against the manifest.  Every rank sends what
went wrong on it (or nothing) to every rank, and all raise the lowest
failing rank's line.  Layers map by global index: any number of ranks and
any layout load any checkpoint.

Version-1 files (one file, the whole state) are read as they were
written: rank 0 reads and verifies the file and sends each rank its part.
"""
import json
import os
from collections.abc import Mapping
from typing import Optional

import numpy as np
import torch

from layerpar._collective import agree, on_root
from layerpar._watchdog import guard

from .errors import CheckpointError, message, one_line, ranges
from .format import PartReader, layer_entry, read_manifest

__all__ = ["load_checkpoint", "verify_checkpoint", "find_latest_checkpoint"]


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

    Returns the state dict described in :mod:`layerpar.checkpoint`.  Raises
    CheckpointError on every rank if anything is wrong; never writes.
    """
    path = os.fspath(path)
    rank = comm.Get_rank()
    try:
        request, err = _make_request(layer_indices, like), None
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        request, err = None, one_line(exc)

    def fitting_manifest():
        manifest = read_manifest(path)
        _check_fits(manifest[0], path, num_layers, config, defaults)
        return manifest

    # Rank 0 -> every rank: the manifest (header, parts table) if it is good
    # and fits this run, else the error.
    header, parts, parts_dir = _on_rank0(comm, fitting_manifest, f"cannot load checkpoint {path}",
                                         "the checkpoint manifest from rank 0")
    if header["format_version"] == 1:
        return _load_v1(path, comm, request, err)
    out, error = None, None
    try:
        if err is not None:
            raise CheckpointError(f"load of checkpoint {path}: rank {rank}: {err}")
        out = _read_parts(path, header, parts, parts_dir, request, rank)
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        error = message(exc, f"cannot load checkpoint {path}")
    # every rank -> every rank: what went wrong here, or None (the lowest rank's is raised)
    agree(comm, error, error_type=CheckpointError)
    return out


def _check_fits(header, path, num_layers, config, defaults):
    if num_layers is not None and header["num_layers"] != num_layers:
        raise CheckpointError(f"checkpoint {path} is for {header['num_layers']} layers, "
                              f"this run has {num_layers}")
    if config is not None:
        diff = _config_difference(header["config"], config, defaults=defaults)
        if diff:
            raise CheckpointError(f"checkpoint {path} has a different configuration: {diff}")


def _part_path(path, parts_dir, part):
    base = os.path.dirname(os.path.abspath(path))
    return os.path.join(base, parts_dir, part["file"])


def _label(path, parts_dir, part):
    return f"checkpoint {path}: part {os.path.join(parts_dir, part['file'])}"


def _locate(parts, wanted, path):
    """{part index: [layers it holds of ``wanted``]}."""
    found = {}
    for n in wanted:
        for i, p in enumerate(parts):
            if any(lo <= n < hi for lo, hi in p["layers"]):
                found.setdefault(i, []).append(n)
                break
        else:
            raise CheckpointError(f"checkpoint {path}: no part holds layer {n}")
    return found


def _read_parts(path, header, parts, parts_dir, request, rank):
    """This rank's part of the state, from the parts that hold it."""
    n_layers = header["num_layers"]
    wanted = request["layers"] if request["layers"] is not None else list(range(n_layers))
    absent = [n for n in wanted if not 0 <= n < n_layers]
    if absent:
        raise CheckpointError(f"checkpoint {path} has layers 0..{n_layers - 1}; rank {rank} asked "
                              f"for layers {ranges(absent)}")
    holders = _locate(parts, wanted, path)
    need = set(holders) | {i for i, p in enumerate(parts) if p["shared"]}
    if rank < len(parts) and parts[rank]["rng"]:
        need.add(rank)
    layers, opt_layers, shared, rng = {}, {}, {}, None
    for i in sorted(need):
        part = parts[i]
        with PartReader(_part_path(path, parts_dir, part), part["sha256"],
                        _label(path, parts_dir, part)) as reader:
            for n in holders.get(i, ()):
                entry = reader.read(layer_entry(n))
                layers[n] = entry["params"]
                if "optimizer" in entry:
                    opt_layers[n] = entry["optimizer"]
            if part["shared"]:
                _merge_into(shared, reader.read("shared"))
            if i == rank and part["rng"]:
                rng = reader.read("rng")
    opt = dict(shared.get("optimizer") or {})
    if "layers" in opt:
        opt["layers"] = {n: opt_layers[n] for n in wanted if n in opt_layers}
    out = {"num_layers": n_layers, "epoch": header["epoch"], "step": header["step"],
           "config": header["config"], "layers": {n: layers[n] for n in wanted},
           "opening": shared.get("opening") or {}, "closing": shared.get("closing") or {},
           "optimizer": opt, "extra": shared.get("extra") or {}, "rng": rng}
    _check_like(out, request["spec"], path)
    return out


def _merge_into(acc: dict, tree: Mapping) -> None:
    """Add the leaves of ``tree`` to ``acc`` (the parts hold disjoint leaves)."""
    for k, v in tree.items():
        if isinstance(v, Mapping) and isinstance(acc.get(k), Mapping):
            _merge_into(acc[k], v)
        else:
            acc[k] = v


# --------------------------------------------------------------------------
# Verification and the newest checkpoint of a folder
# --------------------------------------------------------------------------

def _verify_part(path, parts_dir, part):
    with PartReader(_part_path(path, parts_dir, part), part["sha256"],
                    _label(path, parts_dir, part)) as reader:
        expected = {layer_entry(n) for lo, hi in part["layers"] for n in range(lo, hi)}
        expected |= {k for k in ("shared", "rng") if part[k]}
        if set(reader.table) != expected:
            raise CheckpointError(f"{reader.label} does not hold what the manifest lists")
        for name in reader.table:
            reader.read(name)


def _check_cover(header, parts, path):
    held = sorted((lo, hi) for p in parts for lo, hi in p["layers"])
    at = 0
    for lo, hi in held:
        if lo != at:
            break
        at = hi
    if at != header["num_layers"]:
        raise CheckpointError(f"checkpoint {path} is corrupted: its parts do not hold "
                              f"layers 0..{header['num_layers'] - 1}")


def verify_checkpoint(path, *, comm=None) -> dict:
    """Check a checkpoint completely (the manifest, every part, every entry);
    return its header (num_layers, epoch, step, config, num_ranks, saved_at,
    format_version, ...).  Raises CheckpointError if it is missing,
    unreadable or corrupted.  Without ``comm``, this process does all the
    work (not collective); with ``comm``, collective: rank 0 reads the
    manifest, the parts are verified by the ranks in turn, and every rank
    gets the same header or raises the same error."""
    path = os.fspath(path)
    if comm is None:
        header, parts, parts_dir = read_manifest(path, full_v1=True)
        if header["format_version"] >= 2:
            _check_cover(header, parts, path)
            for part in parts:
                _verify_part(path, parts_dir, part)
        return header
    rank, size = comm.Get_rank(), comm.Get_size()

    def covering_manifest():
        header, parts, parts_dir = read_manifest(path, full_v1=True)
        if header["format_version"] >= 2:
            _check_cover(header, parts, path)
        return header, parts if header["format_version"] >= 2 else [], parts_dir

    # Rank 0 -> every rank: the manifest (header, parts table) or the error.
    header, parts, parts_dir = _on_rank0(comm, covering_manifest,
                                         f"cannot verify checkpoint {path}",
                                         "the checkpoint manifest from rank 0")
    error = None
    try:
        for i in range(rank, len(parts), size):  # part i is verified by rank i mod size
            _verify_part(path, parts_dir, parts[i])
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        error = message(exc, f"cannot verify checkpoint {path}")
    # every rank -> every rank: what went wrong here, or None (the lowest rank's is raised)
    agree(comm, error, error_type=CheckpointError)
    return header


def find_latest_checkpoint(run_dir, comm, *, pattern_suffix: str = ".h5") -> Optional[str]:
    """The newest (by step, then epoch, then save time) checkpoint in
    ``run_dir`` that verifies completely, or None.  Collective: rank 0
    lists the folder, the ranks share the verification, every rank gets the
    same answer.  Temporary files of interrupted saves are ignored."""

    def candidates():
        listed = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
        return [os.path.join(run_dir, n) for n in listed
                if not n.startswith(".") and n.endswith(pattern_suffix)
                and os.path.isfile(os.path.join(run_dir, n))]

    # Rank 0 -> every rank: the files to look at (or the error).
    names = _on_rank0(comm, candidates, f"cannot search {run_dir} for checkpoints",
                      "the list of checkpoints from rank 0")
    best = None
    for p in names:
        try:
            h = verify_checkpoint(p, comm=comm)
        except CheckpointError:
            continue
        key = (h["step"], h["epoch"], h.get("saved_at", 0.0))
        if best is None or key > best[0]:
            best = (key, p)
    return None if best is None else best[1]


# --------------------------------------------------------------------------
# What a rank asks for, and whether the checkpoint fits it
# --------------------------------------------------------------------------

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


def _check_like(out: dict, spec, path: str) -> None:
    if spec is None:
        return
    for n, ps in spec["layers"].items():
        _compare_spec(f"layer {n}", _param_spec(out["layers"].get(n, {})), ps, path)
    for sec in ("opening", "closing"):
        if spec[sec]:
            _compare_spec(f"the {sec} layer", _param_spec(out[sec]), spec[sec], path)


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
# Version 1: one file, read by rank 0
# --------------------------------------------------------------------------

def _load_v1(path, comm, request, err):
    # Every rank -> rank 0: which layers it wants and its model's parameter shapes.
    guard(comm, "the checkpoint load requests")
    requests = comm.gather((request, err), root=0)
    payloads = []

    def select():
        for r, (_, e) in enumerate(requests):
            if e is not None:
                raise CheckpointError(f"load of checkpoint {path}: rank {r}: {e}")
        header, tree, _ = read_manifest(path, full_v1=True)
        payloads.extend(_select_v1(header, tree, req, r, path)
                        for r, (req, _) in enumerate(requests))

    # Rank 0 -> every rank: nothing if the file is good and fits, else the error.
    _on_rank0(comm, select, f"cannot load checkpoint {path}", "the checkpoint check on rank 0",
              chain=True)
    # Rank 0 -> rank r: the part of the state rank r asked for.
    guard(comm, "the checkpoint parts from rank 0")
    return comm.scatter(payloads or None, root=0)


def _on_rank0(comm, compute, context, what, chain=False):
    """Collective: ``compute()`` on rank 0, its result on every rank; if it
    raises, CheckpointError on every rank with its one line (after
    ``context`` unless it is a CheckpointError), caused by the original on
    rank 0 when ``chain``."""
    def on_rank0():
        try:
            return compute()
        except Exception as exc:  # noqa: BLE001 - raised everywhere, one line
            raise CheckpointError(message(exc, context)) from (exc if chain else None)

    return on_root(comm, on_rank0, what=what)


def _select_v1(header: dict, tree: dict, request: dict, rank: int, path: str) -> dict:
    layers = tree.get("layers", {})
    n_layers = header["num_layers"]
    wanted = request["layers"] if request["layers"] is not None else sorted(layers)
    absent = [n for n in wanted if n not in layers]
    if absent:
        raise CheckpointError(f"checkpoint {path} has layers 0..{n_layers - 1}; rank {rank} asked "
                              f"for layers {ranges(absent)}")
    opt = dict(tree.get("optimizer") or {})
    if isinstance(opt.get("layers"), Mapping):
        opt["layers"] = {n: v for n, v in opt["layers"].items() if n in set(wanted)}
    out = {"num_layers": n_layers, "epoch": header["epoch"], "step": header["step"],
           "config": header["config"],
           "layers": {n: layers[n] for n in wanted},
           "opening": tree.get("opening") or {}, "closing": tree.get("closing") or {},
           "optimizer": opt, "extra": tree.get("extra") or {},
           "rng": (tree.get("rng") or {}).get(rank)}
    _check_like(out, request["spec"], path)
    return out
