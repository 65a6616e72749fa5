"""HDF5 checkpoints for layer-parallel training, written and read in parallel.

Each rank of a layer-parallel group holds the weights of its own block of
layers.  A checkpoint stores every layer under its GLOBAL index, so a run can
resume on any number of ranks and any layout; each rank writes the layers it
holds to its own part file and reads back only the parts that hold the
layers it asks for.  Nothing is gathered on one rank.

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
types, keys, dtypes and bits.

What several ranks give
-----------------------
``num_layers``, ``epoch``, ``step`` and ``config`` must be equal on every
rank (compared by value and by digest).  The layers must cover 0..N-1; a
layer given by several ranks (replicas) must be equal on each (compared by
digest) and is stored once.  ``optimizer["layers"][n]`` goes with layer n
(a rank gives it only with the layer's weights).  The other sections
(opening, closing, the rest of optimizer, extra) are merged key by key: a
leaf (a tensor, number, string, list or tuple) given by several ranks must
be equal on each (digest) and is stored once, by the lowest rank that gives
it.  On loading, each rank gets the layers it asks for (in ``layers`` and
in ``optimizer["layers"]``), the merged other sections whole, and ``rng``
as saved by the rank of the same number (None if the saving run had fewer
ranks).  Missing sections come back as empty dicts.

In a training loop with a ``layerpar.Network`` ``net`` and optimiser ``opt``::

    params = {"layers": net.body.params_by_layer(),
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

Files
-----
A checkpoint ``latest.h5`` is a small manifest (the header, which part
holds which layers, each part's SHA-256) and a folder of parts,
``latest.parts/<save id>/part-<rank>.h5``, one per saving rank; copy or
move both together.  The parts of the checkpoint it replaced stay with
its manifest ``latest.prev.h5``.  See :mod:`.format` for the layout.
Version-1 checkpoints (one file) are still read.

Safety
------
Each rank streams its part to a new folder of the save and fsyncs it; then
rank 0 renames the folder into place, writes the manifest to a temporary
file, fsyncs it, keeps the manifest it replaces as ``<stem>.prev<suffix>``
and renames the new one into place: the manifest is the commit point, and a
crash at any moment leaves a complete checkpoint (and at most temporary
names that ``layerpar train`` removes from the run folder when it next
starts there).  A failure on any rank (a full disk, a state that cannot be
stored) raises the same one-line :class:`CheckpointError` on every rank and
leaves the checkpoint and its previous version as they were, without new
files.  A successful save removes the parts that neither the checkpoint nor
its previous version names.  Loads verify what they read; a load never
writes or deletes anything.  :func:`find_latest_checkpoint` returns the
newest checkpoint of a folder that verifies completely.

Modules: :mod:`.format` (the file format), :mod:`.atomic` (temporary names,
fsync, rename, full disks), :mod:`.protocol` (the parallel save),
:mod:`.load` (the parallel load and verification), :mod:`.optimizer`
(optimiser and RNG state by name).
"""
from .atomic import previous_path
from .errors import CheckpointError
from .format import FORMAT_VERSION
from .load import find_latest_checkpoint, load_checkpoint, verify_checkpoint
from .optimizer import optimizer_state, restore_optimizer_state, rng_state, set_rng_state
from .protocol import save_checkpoint

__all__ = [
    "FORMAT_VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint",
    "verify_checkpoint", "find_latest_checkpoint", "previous_path",
    "rng_state", "set_rng_state", "optimizer_state", "restore_optimizer_state",
]
