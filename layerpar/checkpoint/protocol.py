"""The parallel protocol of a save: who writes what, and one outcome on every rank.

A save is collective and never moves weights between ranks:

1. Each rank checks its own part of the state and summarises it: the
   header (num_layers, epoch, step, a digest of the config), the runs of
   global layer indices it gives, a digest of each leaf of its opening,
   closing, optimizer (but ``optimizer["layers"]``) and extra sections,
   and whether it has an RNG state.  Every rank sends its summary (or why
   it has none) to every rank (one allgather of small metadata); every
   rank then makes the same decisions from the same summaries:

   - the header must be equal on every rank (else "ranks 0 and r disagree");
   - the layers given must cover 0..N-1; a layer given by several ranks
     (replicas) is written by the lowest of them, after every giver's
     digest of it was compared (a second allgather, only when there are
     such layers);
   - a leaf of the shared sections given by several ranks must have the
     same digest on each, and is written by the lowest of them; a dict on
     one rank and a value on another at the same key is refused.

2. Each rank writes its own part (its layers with their optimiser state,
   its RNG state, the shared leaves it was given to write) into the save's
   temporary folder, streaming one layer at a time, and fsyncs it.  Every
   rank sends its part's digest (or its error) to rank 0.

3. Rank 0 renames the folder into place, writes the manifest to a
   temporary file and renames it over the checkpoint (keeping the one it
   replaces as its previous version, with its parts), then removes the
   parts that neither names.  If any rank failed, rank 0 removes the new
   parts instead.  Rank 0 sends the outcome to every rank (one broadcast):
   every rank returns, or raises the same one-line CheckpointError.
"""
import hashlib
import json
import os
import uuid
from collections.abc import Mapping

import numpy as np

from layerpar._collective import agree, on_root
from layerpar._watchdog import guard

from . import atomic
from .errors import CheckpointError, intervals, message, one_line, ranges
from .format import (SCALARS, SECTIONS, SHARED_SECTIONS, _check_key, _dict_kind, check_tree,
                     digest_tree, layer_entry, manifest_image, manifest_parts_dir, write_part)

__all__ = ["save_checkpoint"]

_MARK = "{}"  # the digest that stands for "a dict here" (an empty one, or optimizer["layers"])


def save_checkpoint(path, comm, state: dict, *, keep_previous: bool = True) -> None:
    """Write ``state`` (this rank's part; see :mod:`layerpar.checkpoint`) to ``path``.

    Collective over ``comm``: every rank writes its own part file; only
    small metadata (layer runs, digests, an ok or error flag) goes through
    the communicator.  Raises CheckpointError on every rank if anything
    fails; the checkpoint at ``path`` and its previous version are then
    unchanged and no new file is left behind.
    """
    path = os.fspath(path)
    rank = comm.Get_rank()
    local, summary, err = None, None, None
    try:
        local = _Local(state)
        summary = local.summary()
        if rank == 0:
            summary["save_id"] = atomic.new_save_id()
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        err = f"checkpoint {path}: rank {rank}: {one_line(exc)}"
    # Every rank -> every rank: its summary (header, layer runs, shared-leaf
    # digests) or why it has none (the lowest rank's reason is raised).
    summaries = agree(comm, err, error_type=CheckpointError, payload=summary,
                      label="the checkpoint summaries")
    try:
        plan = _Plan(summaries, path)
    except CheckpointError as exc:
        raise CheckpointError(str(exc)) from None
    if plan.replicated:
        _check_replicas(comm, local, plan, path)

    root = atomic.parts_root(path)
    tmpdir = os.path.join(root, atomic.TMP_PREFIX + plan.save_id)
    name = _part_name(rank)
    result, original = None, None
    try:
        os.makedirs(tmpdir, exist_ok=True)
        digest = local.write(os.path.join(tmpdir, name), plan.owned[rank], plan.shared[rank])
        result = (digest, None)
    except BaseException as exc:  # noqa: BLE001 - an interrupt too: rank 0 waits for this answer
        original = exc
        where = os.path.join(os.path.basename(root), name)
        if atomic.is_disk_full(exc):
            text = (f"cannot write checkpoint {path}: disk full writing {where} (the previous "
                    "checkpoint is kept): free space or choose another run folder")
        else:
            text = message(exc, f"cannot write checkpoint {path}: {where}")
        result = (None, text)
    # Every rank -> rank 0: its part's digest, or why it has none.
    guard(comm, "the checkpoint parts written")
    results = comm.gather(result, root=0)
    caught = []

    def commit():
        status, exc = _commit(path, root, plan, results, keep_previous, comm.Get_size(),
                              local.config_json)
        caught.append(exc)
        if status is not None:
            raise CheckpointError(status)

    failure = None
    try:
        # Rank 0 -> every rank: nothing when the checkpoint is in place, else the error.
        on_root(comm, commit, what="the checkpoint commit on rank 0")
    except CheckpointError as exc:
        failure = exc
    original = original or next(iter(caught), None)
    if original is not None and not isinstance(original, Exception):
        raise original
    if failure is not None:
        raise failure from original


def _part_name(rank: int) -> str:
    return f"part-{rank:05d}.h5"


class _Local:
    """This rank's part of the state, checked (no data read yet)."""

    def __init__(self, state):
        if not isinstance(state, Mapping):
            raise CheckpointError(f"the state is a {type(state).__name__}, not a dict")
        unknown = set(state) - set(SECTIONS) - set(SCALARS)
        if unknown:
            raise CheckpointError(f"unknown state keys {sorted(map(str, unknown))}; allowed: "
                                  f"{', '.join(SCALARS + SECTIONS)}")
        for k in ("num_layers", "epoch", "step"):
            v = state.get(k)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                raise CheckpointError(f"state[{k!r}] must be a non-negative int, got {v!r}")
        self.head = {k: int(state[k]) for k in ("num_layers", "epoch", "step")}
        try:
            self.config_json = json.dumps(state.get("config") or {}, sort_keys=True, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"config is not JSON-serialisable ({exc})") from exc
        n = self.head["num_layers"]
        self.layers = self._section(state, "layers")
        # (the caller's dicts are used as they are: nothing per layer is copied)
        bad = [k for k in self.layers
               if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < n]
        if bad:
            raise CheckpointError(f"layer keys must be global indices 0..{n - 1}, got {bad[:5]}")
        opt = self._section(state, "optimizer")
        self.opt_layers = None
        if "layers" in opt:
            if not isinstance(opt["layers"], Mapping):
                raise CheckpointError("state['optimizer']['layers'] must be a dict")
            self.opt_layers = opt["layers"]
            extra = [k for k in self.opt_layers if k not in self.layers]
            if extra:
                raise CheckpointError(f"optimiser state for layers {extra[:5]} whose weights "
                                      "this rank does not give")
        for k in self.layers:
            check_tree(self._layer(k), f"layers/{k}")
        self.rng = state.get("rng")
        check_tree(self.rng, "rng")
        # The shared sections as (key path, leaf): "a dict here" for empty
        # dicts and for optimizer["layers"] (filled from the layers on load).
        self.leaves = []
        for sec in SHARED_SECTIONS:
            tree = self._section(state, sec)
            if sec == "optimizer":
                tree = {k: (_Dict if k == "layers" else v) for k, v in tree.items()}
            self._flatten(tree, (sec,))
        self.digests = [(p, _MARK if v is _Dict or isinstance(v, Mapping)
                         else digest_tree(v, "/".join(map(str, p)))) for p, v in self.leaves]

    @staticmethod
    def _section(state, sec):
        v = state.get(sec)
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise CheckpointError(f"state[{sec!r}] must be a dict")
        return v

    def _flatten(self, tree, prefix):
        where = "/".join(map(str, prefix))
        kind = _dict_kind(tree, where)
        for k, v in tree.items():
            _check_key(k, where)
            key = int(k) if kind == "dict_int" else k
            if isinstance(v, Mapping) and len(v):
                self._flatten(v, prefix + (key,))
            else:
                self.leaves.append((prefix + (key,), v))

    def _layer(self, n):
        entry = {"params": self.layers[n]}
        if self.opt_layers is not None and n in self.opt_layers:
            entry["optimizer"] = self.opt_layers[n]
        return entry

    def summary(self) -> dict:
        return {"head": self.head,
                "config": hashlib.sha256(self.config_json.encode()).hexdigest(),
                "runs": intervals(int(k) for k in self.layers), "shared": self.digests,
                "rng": self.rng is not None}

    def layer_digests(self, wanted) -> dict:
        return {int(n): digest_tree(self._layer(n), f"layers/{n}") for n in self.layers
                if _inside(n, wanted)}

    def write(self, file: str, owned_runs, shared_paths) -> str:
        """Write this rank's part to ``file`` (a new file); its digest."""
        chosen = set(shared_paths)
        shared = {}
        for p, v in self.leaves:
            if p in chosen:
                node = shared
                for k in p[:-1]:
                    node = node.setdefault(k, {})
                node[p[-1]] = {} if v is _Dict else v

        def entries():
            for n in self.layers:
                if _inside(n, owned_runs):
                    yield layer_entry(n), self._layer(n), f"layers/{n}"
            if self.rng is not None:
                yield "rng", self.rng, "rng"
            if shared:
                yield "shared", shared, "shared"

        out = atomic.PartFile(file)
        try:
            digest = write_part(out, entries())
        except BaseException as exc:
            out.close()
            if out.error is not None and out.error is not exc:
                raise out.error from None  # the write failed first (a full disk)
            raise
        out.finish()
        return digest


class _Dict:
    """Marks optimizer["layers"] among the shared leaves."""


def _inside(n: int, runs) -> bool:
    return any(lo <= n < hi for lo, hi in runs)


def _subtract(runs, covered):
    """Half-open runs minus the union of ``covered`` runs."""
    out = []
    for lo, hi in runs:
        pieces = [[lo, hi]]
        for clo, chi in covered:
            nxt = []
            for a, b in pieces:
                if chi <= a or b <= clo:
                    nxt.append([a, b])
                    continue
                if a < clo:
                    nxt.append([a, clo])
                if chi < b:
                    nxt.append([chi, b])
            pieces = nxt
        out.extend(pieces)
    return out


def _merge_runs(runs):
    out = []
    for lo, hi in sorted(map(tuple, runs)):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


class _Plan:
    """What every rank writes, decided identically on every rank from the
    summaries of every rank; raises the error that every rank raises."""

    def __init__(self, summaries, path):
        first = summaries[0]
        self.save_id = first["save_id"]
        self.head = dict(first["head"])
        for r, s in enumerate(summaries[1:], start=1):
            for k in ("num_layers", "epoch", "step"):
                if s["head"][k] != first["head"][k]:
                    raise CheckpointError(f"checkpoint {path}: ranks 0 and {r} disagree on {k} "
                                          f"({first['head'][k]} vs {s['head'][k]})")
            if s["config"] != first["config"]:
                raise CheckpointError(f"checkpoint {path}: ranks 0 and {r} disagree on the config")
        n = self.head["num_layers"]
        # layers: the lowest rank that gives a layer writes it
        covered, self.owned = [], []
        for s in summaries:
            self.owned.append(_subtract(s["runs"], covered))
            covered = _merge_runs(covered + s["runs"])
        missing = _subtract([[0, n]], covered)
        if missing:
            nums = [k for lo, hi in missing for k in range(lo, hi)]
            raise CheckpointError(f"checkpoint {path}: no rank gave layers {ranges(nums)} "
                                  f"of num_layers={n}")
        self.replicated = [run for r, s in enumerate(summaries)
                           for run in _subtract(s["runs"], self.owned[r])]
        self.replicated = _merge_runs(self.replicated)
        self.shared = self._shared(summaries, path)
        self.has_rng = [s["rng"] for s in summaries]

    @staticmethod
    def _shared(summaries, path):
        """The shared leaves each rank writes; checks that the ranks agree."""
        given = {}  # key path -> [(rank, digest)]
        for r, s in enumerate(summaries):
            for p, d in s["shared"]:
                given.setdefault(p, []).append((r, d))
        values = {p for p, g in given.items() if any(d != _MARK for _, d in g)}
        kinds = {}
        for p, g in given.items():
            where = "/".join(map(str, p))
            ref = g[0][1]
            for r, d in g[1:]:
                if d != ref:
                    raise CheckpointError(f"checkpoint {path}: rank {r} gives a value for "
                                          f"{where} that differs from a lower rank's")
            for i in range(1, len(p)):
                if p[:i] in values:
                    raise CheckpointError(f"checkpoint {path}: rank {g[0][0]} gives a value "
                                          f"for {where} that differs from a lower rank's")
                kinds.setdefault(p[:i], set()).add(isinstance(p[i], int))
        for prefix, k in kinds.items():
            if len(k) > 1:
                raise CheckpointError(f"checkpoint {path}: {'/'.join(map(str, prefix))}: dict "
                                      "keys must be all str or all int (the ranks give both)")
        out = [[] for _ in summaries]
        for p, g in given.items():
            out[g[0][0]].append(p)
        return out


def _check_replicas(comm, local, plan, path):
    """Collective: a layer given by several ranks must be the same on each."""
    digests, err = None, None
    try:
        digests = local.layer_digests(plan.replicated)
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        err = f"checkpoint {path}: rank {comm.Get_rank()}: {one_line(exc)}"
    # Every rank -> every rank: its digests of the layers that several ranks
    # give, or why it has none (the lowest rank's reason is raised).
    gathered = agree(comm, err, error_type=CheckpointError, payload=digests,
                     label="the checkpoint layer digests")
    first = {}
    for r, d in enumerate(gathered):
        for n, h in d.items():
            if first.setdefault(n, (r, h))[1] != h:
                raise CheckpointError(f"checkpoint {path}: ranks {first[n][0]} and {r} give "
                                      f"different values for layer {n}")


def _commit(path, root, plan, results, keep_previous, num_ranks, config_json):
    """Rank 0: put the new parts and manifest in place, or remove the new
    parts.  Returns (error line or None, exception caught or None)."""
    tmpdir = os.path.join(root, atomic.TMP_PREFIX + plan.save_id)
    final = os.path.join(root, plan.save_id)
    failed = [m for _, m in results if m is not None]
    if failed:
        _discard(tmpdir, root)
        return failed[0], None
    directory = os.path.dirname(os.path.abspath(path))
    manifest_tmp = os.path.join(
        directory, f".{os.path.basename(path)}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        os.replace(tmpdir, final)
        atomic.fsync_path(final)
        atomic.fsync_path(root)
        parts = [{"file": _part_name(r), "sha256": d, "layers": plan.owned[r],
                  "shared": bool(plan.shared[r]), "rng": plan.has_rng[r]}
                 for r, (d, _) in enumerate(results)]
        image = manifest_image(dict(plan.head, config_json=config_json), parts,
                               os.path.relpath(final, directory), num_ranks)
        try:
            atomic.write_bytes(manifest_tmp, image)
            atomic.install(manifest_tmp, path, keep_previous)
        except BaseException:
            atomic.remove_quietly(manifest_tmp)
            raise
        atomic.fsync_path(directory)
    except BaseException as exc:  # noqa: BLE001 - an interrupt too: the others wait for this
        _discard(tmpdir, root)
        _discard(final, root)
        if atomic.is_disk_full(exc):
            return (f"cannot write checkpoint {path}: disk full (the previous checkpoint is "
                    "kept): free space or choose another run folder"), exc
        return message(exc, f"cannot write checkpoint {path}"), exc
    _remove_unreferenced(path, root)
    return None, None


def _discard(folder, root):
    atomic.remove_quietly(folder)
    try:
        os.rmdir(root)  # only when empty: a first save that failed leaves nothing
    except OSError:
        pass


def _remove_unreferenced(path, root):
    """Remove the parts of saves that neither ``path`` nor its previous
    version names (earlier saves, saves that died)."""
    directory = os.path.dirname(os.path.abspath(path))
    keep = set()
    for manifest in (path, atomic.previous_path(path)):
        if os.path.exists(manifest):
            rel = manifest_parts_dir(manifest)
            if rel is None and _is_v2(manifest):
                return  # a manifest we cannot read: remove nothing
            if rel is not None:
                keep.add(os.path.normpath(os.path.join(directory, rel)))
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        p = os.path.normpath(os.path.join(root, name))
        if p not in keep:
            atomic.remove_quietly(p)


def _is_v2(manifest) -> bool:
    from .format import FORMAT_NAME, attr_value, h5open
    try:
        with h5open(manifest, "r") as f:
            return (attr_value(f.attrs.get("format")) == FORMAT_NAME
                    and attr_value(f.attrs.get("format_version")) != 1)
    except Exception:  # noqa: BLE001 - unreadable: may have been anything
        return True
