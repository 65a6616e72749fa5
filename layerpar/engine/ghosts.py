"""Coarse-grid weights from other ranks (ghost layers).

On a coarse MGRIT grid the step from C-point j uses the weights of the
layer at j's fine index (injection), and that layer may live on another
rank.  Before each forward solve every rank sends the weights of its layers
that other ranks step with, and receives the ones it steps with but does not
hold, into ghost copies in its stage (built as the owner built them, then
given the owner's dtype, weights, buffers and train/eval flags).

Only what changed travels.  Each layer has a version, raised whenever one of
its tensors changed since the last exchange (seen from the tensor's version
counter, which every in-place change raises: optimiser steps,
``load_state_dict``, ``copy_``; and from its address).  Per peer and pass,
one small header goes out (every layer's version and train/eval flags; the
names, shapes and dtypes of its tensors only when they changed), and then,
only when some layer's version differs from the one the peer holds, one
message of the changed layers' tensors as flat bytes, in the order of their
state dicts (on the device path straight from device memory).  Nothing of
the weights is pickled.  ``stats`` counts the messages and bytes sent.
"""
import pickle

import torch

from layerpar import partition
from layerpar._tags import tag
from layerpar._watchdog import recv, wait
from layerpar.engine.policy import set_training_flags, training_flags
from layerpar.engine.transport import Transport, as_bytes


def _layout_of(state):
    """(name, shape, dtype) of every tensor of a state dict."""
    return tuple((k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
                 for k, v in state.items())


class Ghosts:
    """The ghost layers of ``stage`` on ``comm`` (whose ranks hold the
    layers as ``layout`` says), sent by ``transport``."""

    def __init__(self, stage, comm, layout, transport=None):
        self.stage = stage
        self.comm = comm
        self.layout = layout
        self.transport = transport or Transport("host")
        self.receives = []  # layers stepped with here but held elsewhere
        self.sends = []     # (rank, layer): local layers other ranks step with
        self._seen = {}     # layer -> (its tensors' (address, version), its version)
        self._sent = {}     # (rank, layer) -> (version, layout) the rank holds
        self._held = {}     # ghost layer -> the version held here
        # sent since construction: messages, weight bytes, header bytes (pickled)
        self.stats = {"messages": 0, "bytes": 0, "header_bytes": 0}

    def plan(self, options):
        """Who sends which layer to whom, for the forward solve's options."""
        nlayers, size, rank = self.stage.nlayers, self.comm.Get_size(), self.comm.Get_rank()
        levels = partition.hierarchy(nlayers, options["max_levels"], options["cfactor"],
                                     options["min_coarse"])
        mine = set(self.stage.indices)
        self.receives, self.sends = [], []
        if len(levels) < 2:
            return
        self.receives = sorted(
            partition.coarse_step_layers(nlayers, size, rank, levels) - mine)
        for q in range(size):
            if q != rank:
                wanted = partition.coarse_step_layers(nlayers, size, q, levels)
                self.sends += [(q, n) for n in sorted(wanted & mine)]

    def invalidate(self):
        """Send every layer again at the next exchange (after weights were
        replaced without an in-place change, e.g. ``p.data = ...``)."""
        self._seen.clear()
        self._sent.clear()

    def _version(self, n, state):
        """Layer n's version: raised when a tensor changed since last seen."""
        key = tuple((v.data_ptr(), v._version) for v in state.values())
        seen = self._seen.get(n)
        if seen is None:
            self._seen[n] = (key, 0)
            return 0
        if seen[0] != key:
            self._seen[n] = (key, seen[1] + 1)
        return self._seen[n][1]

    def exchange(self, device):
        """Collective over the ranks that share coarse layers: send the local
        layers' weights others step with, when they changed; receive the
        ghosts' (to ``device``)."""
        stage, comm, tr = self.stage, self.comm, self.transport
        by_peer = {}
        for q, n in self.sends:
            by_peer.setdefault(q, []).append(n)
        # each layer's state, version, layout and flags, once however many peers take it
        local = {}
        for n in {n for _, n in self.sends}:
            F = stage.layers[str(n)]
            state = F.state_dict()
            local[n] = (state, self._version(n, state), _layout_of(state), training_flags(F))
        requests = []
        for q, layers in by_peer.items():
            header, changed = {}, []
            for n in layers:
                state, version, layout, flags = local[n]
                held = self._sent.get((q, n))
                new_layout = held is None or held[1] != layout
                if held is None or held[0] != version or new_layout:
                    changed.append(state)
                    self._sent[(q, n)] = (version, layout)
                header[n] = (version, layout if new_layout else None, flags)
            # to rank q: the versions, flags (and new layouts) of the layers it steps
            # with, pickled once (its size is counted in stats)
            data = pickle.dumps(header, pickle.HIGHEST_PROTOCOL)
            requests.append((comm.isend(data, dest=q, tag=tag("ghost.header")), q))
            self.stats["messages"] += 1
            self.stats["header_bytes"] += len(data)
            if changed:
                # then the changed layers' tensors, flat, in state-dict order
                parts = [v for s in changed for v in s.values()]
                if not parts:
                    parts = [torch.zeros(0, dtype=torch.uint8)]
                msg = tr.message(parts, ("ghost.send", q))
                requests.append((comm.Isend(msg, dest=q, tag=tag("ghost.weights")), q))
                self.stats["messages"] += 1
                self.stats["bytes"] += sum(v.numel() * v.element_size() for v in parts)
        by_owner = {}
        for n in self.receives:
            by_owner.setdefault(self.layout.owner(n), []).append(n)
        for q, layers in by_owner.items():
            header = pickle.loads(recv(comm, q, tag("ghost.header"),
                                       f"the versions of the coarse-grid weights of layers {layers}"))
            targets = []
            for n in layers:
                version, layout, flags = header[n]
                ghost = stage.ghosts.get(n)
                if ghost is None:
                    ghost = stage.ghosts[n] = stage.make_layer(n).requires_grad_(False)
                if layout is not None:
                    # the owner's dtype (its floating tensors share one) and our device
                    dtypes = {d for _, _, d in layout if d.startswith(("float", "bfloat"))}
                    if dtypes:
                        ghost.to(dtype=getattr(torch, dtypes.pop()))
                    ghost.to(device=device)
                    self._held.pop(n, None)
                if self._held.get(n) != version:
                    targets.append(ghost.state_dict())
                    self._held[n] = version
                set_training_flags(ghost, flags)  # a ghost runs in its owner's mode
            if targets:
                nbytes = sum(v.numel() * v.element_size() for s in targets for v in s.values())
                msg, buf = tr.receive_buffer(nbytes, device, ("ghost.recv", q))
                req = comm.Irecv(msg, source=q, tag=tag("ghost.weights"))
                wait(comm, req, f"the coarse-grid weights of layers {layers}", q)
                at = 0
                with torch.no_grad():
                    for s in targets:
                        for v in s.values():
                            k = v.numel() * v.element_size()
                            as_bytes(v).copy_(buf[at:at + k])
                            at += k
        for r, q in requests:
            wait(comm, r, f"coarse-grid weights sent to rank {q}", q)
