"""Coarse-grid weights from other ranks (ghost layers).

On a coarse MGRIT grid the step from C-point j uses the weights of the
layer at j's fine index (injection), and that layer may live on another
rank.  Before each forward solve every rank sends the weights of its layers
that other ranks step with, and receives the ones it steps with but does not
hold, into ghost copies in its stage (built as the owner built them, then
loaded with the owner's weights, buffers and train/eval flags).
"""
from mpi4py import MPI

from layerpar import partition
from layerpar._tags import tag
from layerpar._watchdog import recv
from layerpar.engine.policy import set_training_flags, training_flags
from layerpar.engine.stage import load_state


class Ghosts:
    """The ghost layers of ``stage`` on ``comm`` (whose ranks hold the
    layers as ``layout`` says)."""

    def __init__(self, stage, comm, layout):
        self.stage = stage
        self.comm = comm
        self.layout = layout
        self.receives = []  # layers stepped with here but held elsewhere
        self.sends = []     # (rank, layer): local layers other ranks step with

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

    def exchange(self, device):
        """Collective over the ranks that share coarse layers: send the local
        layers' weights others step with; receive the ghosts' (to ``device``)."""
        stage, comm = self.stage, self.comm
        requests = []
        for q, n in self.sends:
            F = stage.layers[str(n)]
            # to rank q: layer n's weights and buffers, and its submodules' train/eval flags
            state = {k: v.detach().cpu() for k, v in F.state_dict().items()}
            requests.append(comm.isend((state, training_flags(F)), dest=q,
                                       tag=tag("ghost.layer", n)))
        for n in self.receives:
            state, flags = recv(comm, self.layout.owner(n), tag("ghost.layer", n),
                                f"the coarse-grid weights of layer {n}")
            if n not in stage.ghosts:
                stage.ghosts[n] = stage.make_layer(n)
            ghost = load_state(stage.ghosts[n], state, device).requires_grad_(False)
            set_training_flags(ghost, flags)  # a ghost runs in its owner's mode
        MPI.Request.waitall(requests)
