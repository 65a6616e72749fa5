"""Construction from a configuration: the network of a given depth, its
optimiser, the residual monitor, the data loaders and the learning rate."""
import torch

from layerpar import checkpoint as ckpt
from layerpar._collective import agree
from layerpar._watchdog import env_timeout, set_timeout

from layerpar.config import FULL_BATCH_OPTIMIZERS, mode_iterations
from layerpar.optim import LBFGS, LSR1, master, schedule
from layerpar.parallel import Network
from layerpar.models import factories
from layerpar.training.controller import GradientController
from layerpar.training.monitor import ResidualMonitor

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def mgrit_options(config):
    """LayerParallel keyword options for the configured mode."""
    g = config["mgrit"]
    # micro-batches act wherever propagation is serial (serial mode, and the
    # monitor's fallback): the exact pipeline
    if g["mode"] == "serial":
        return {"max_levels": 1, "microbatches": g["microbatches"],
                "schedule": g["schedule"]}
    fwd_iters, bwd_iters = mode_iterations(config)
    return dict(max_levels=g["max_levels"], cfactor=g["cfactor"], relax=g["relax"],
                cycle=g["cycle"], skip=g["skip"], fwd_iters=fwd_iters, bwd_iters=bwd_iters,
                fwd_tol=g["fwd_tol"], bwd_tol=g["bwd_tol"],
                warm_start=g["mode"] == "one-shot", microbatches=g["microbatches"],
                schedule=g["schedule"])


def build_network(config, input_shape, num_classes, comm, *, nlayers=None):
    """The configured Network on ``comm`` (float32 or float64), with
    ``nlayers`` residual layers (default ``model.nlayers``) over the same
    final time ``model.T``.  The opening and closing layers do not depend on
    the depth: networks of different depths built from one configuration
    start with the same opening and closing weights."""
    m = config["model"]
    opening, step, closing = factories(m, input_shape, num_classes)  # built-in or by import path
    net = Network(opening, step, closing, nlayers=m["nlayers"] if nlayers is None else nlayers,
                  T=m["T"], comm=comm, seed=m["seed"], **mgrit_options(config))
    return net.to(DTYPES[config["data"]["dtype"]])


def run_timeout(config):
    """The run's limit on waits for other ranks: ``run.timeout`` when > 0,
    else $LAYERPAR_TIMEOUT, else None."""
    return config["run"]["timeout"] or env_timeout()


def apply_timeout(config, comm, grid=None):
    """Set the run's timeout (``run_timeout``) on ``comm`` and on the
    grid's communicators: every wait of the run for other ranks (solves,
    agreements, sums, checkpoints) then ends after it, naming the rank that
    did not answer (``layerpar.SilentRankError``).  Nothing when there is
    none."""
    limit = run_timeout(config)
    if limit is None:
        return
    for c in (comm,) + ((grid.layer_comm, grid.data_comm) if grid is not None else ()):
        set_timeout(c, limit)


def make_optimizer(config, net):
    """The configured optimiser over all of ``net``'s parameters on this rank."""
    o = config["optim"]
    params = list(net.parameters())
    # with master weights: the same steps for float32/float64 parameters, and
    # float32 copies of bfloat16 ones (layerpar.optim.master)
    optim = master if o["master_weights"] else torch.optim
    if o["name"] == "sgd":
        return optim.SGD(params, lr=o["lr"], momentum=o["momentum"])
    if o["name"] == "adam":
        return optim.Adam(params, lr=o["lr"])
    # serial mode: the full-batch objective is the same at every step, so
    # a step starts from the previous step's last evaluation
    if o["name"] == "lsr1":
        return LSR1(params, net.body.comm, lr=o["lr"], history=o["lbfgs_history"],
                    reuse_evaluation=config["mgrit"]["mode"] == "serial")
    return LBFGS(params, net.body.comm, lr=o["lr"], history=o["lbfgs_history"],
                 line_search=o["line_search"], curvature=o["lbfgs_curvature"], c1=o["lbfgs_c1"],
                 reuse_evaluation=config["mgrit"]["mode"] == "serial")


def make_monitor(config):
    """The residual monitor of the parallel modes, with the gradient-accuracy
    controller (``mgrit.controller``) as its ``controller``: None in serial
    mode or when both are switched off; with the residual monitor off
    (``mgrit.monitor = false``) it watches no residuals and only holds the
    MGRIT setting that the controller raises."""
    g = config["mgrit"]
    if g["mode"] == "serial" or not (g["monitor"] or g["controller"]):
        return None
    fwd_iters, bwd_iters = mode_iterations(config)
    controller = make_controller(config) if g["controller"] else None
    return ResidualMonitor(g["monitor_factor"], g["monitor_patience"], g["max_iters"],
                           fwd_iters, bwd_iters, max_residual=g["monitor_max_residual"],
                           watch=g["monitor"], controller=controller)


def make_controller(config):
    """The gradient-accuracy controller of the ``mgrit.controller_*`` keys."""
    g = config["mgrit"]
    return GradientController(every=g["controller_every"], tol=g["controller_tol"],
                              patience=g["controller_patience"],
                              action=g["controller_action"])


def learning_rate(config, epoch, *, epochs=None):
    """The scheduled learning rate of ``epoch`` (of ``epochs``, default
    ``optim.epochs``)."""
    o = config["optim"]
    factor = schedule(o["schedule"], epochs=o["epochs"] if epochs is None else epochs,
                      step_epochs=o["step_epochs"], decay=o["decay"])
    return o["lr"] * factor(epoch)


def make_loaders(config, data, rank, size, *, grid=None):
    """(train loader, validation loader): full-batch training (unshuffled)
    for L-BFGS or a batch size of at least the training split's;
    the first rank (of ``size``, this one ``rank``) draws inputs, the last
    labels.  On a process grid (``rank``, ``size``: in the group) each
    group's loaders give its rows of the same global batches."""
    d, o = config["data"], config["optim"]
    first, last = rank == 0, rank == size - 1
    # one batch of the whole training split in a fixed order: for L-BFGS and L-SR1, and
    # for any optimiser given a batch size of at least the split's size
    full_batch = o["name"] in FULL_BATCH_OPTIMIZERS or d["batch_size"] >= len(data.train)
    batch = len(data.train) if full_batch else d["batch_size"]
    opts = dict(need_inputs=first, need_labels=last)
    val_batch = max(d["batch_size"], 1000)
    if grid is not None:
        return (grid.loader(data.train, batch_size=batch, seed=d["seed"],
                            shuffle=not full_batch, **opts),
                grid.loader(data.val, batch_size=val_batch, shuffle=False, **opts))
    train = data.train.loader(batch_size=batch, seed=d["seed"], shuffle=not full_batch, **opts)
    val = data.val.loader(batch_size=val_batch, shuffle=False, **opts)
    return train, val


def load_data(config, comm, *, first=None, last=None):
    """The configured data set, with inputs on the first rank and labels on
    the last (``first``/``last``: whether this rank is; default its place
    in ``comm``).  Collective over ``comm``."""
    from layerpar.data import load_configured
    rank, size = comm.Get_rank(), comm.Get_size()
    first = rank == 0 if first is None else first
    last = rank == size - 1 if last is None else last
    return load_configured(config["data"], need_inputs=first, need_labels=last, comm=comm)


def saved_group_state(extra, grid):
    """This group's saved solver states from a checkpoint's ``extra`` ({}
    when it was written on a grid of another number of groups: the solves
    then start cold, and every group takes group 0's monitor counts)."""
    if extra.get("data_groups", 1) != grid.data:
        return {}
    if grid.data == 1:
        return {"warm": extra.get("warm")}
    return (extra.get("groups") or {}).get(grid.data_rank) or {}


def load_in_groups(path, grid, world, **kw):
    """Collective over ``world``: every group reads its part of ``path``
    over its layer ranks (``load_checkpoint`` keywords ``kw``); a failure in
    any group raises on every rank."""
    st = error = None
    try:
        st = ckpt.load_checkpoint(path, grid.layer_comm, **kw)
    except ckpt.CheckpointError as e:
        error = e
    if grid.data > 1:
        # every rank -> every rank: whether its group's load failed
        agree(world, error, what="loading the checkpoint", error_type=ckpt.CheckpointError)
    elif error is not None:
        raise error
    return st
