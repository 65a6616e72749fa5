"""The training engine: a configured network, data, optimiser and MGRIT mode,
trained epoch by epoch with metrics, checkpoints and resumption.

Modes (``mgrit.mode``):
  serial          one grid level: exact layer-serial propagation across ranks
  layer-parallel  ``max_levels`` levels, a fixed number of forward and
                  backward MGRIT iterations per batch: inexact gradients
  one-shot        the simultaneous method: forward and adjoint states are
                  kept and warm-started from one design update to the next,
                  by default one forward and one backward iteration each
In both parallel modes a residual monitor raises the number of iterations
when the MGRIT residual stops contracting, and falls back to serial
propagation past ``mgrit.max_iters``.

Every rank runs the same loop on the same batches (the first rank needs the
inputs, the last the labels); losses and counts come from the last rank.
"""
import math
import os
import time

import torch
import torch.nn.functional as Fn

from layerpar import checkpoint as ckpt
from layerpar.config import mode_iterations, to_toml
from layerpar.data import load_dataset
from layerpar.metrics import MetricsWriter
from layerpar.optim import LBFGS, regularize, schedule
from layerpar.parallel import Network
from layerpar.steps import ConvClosing, ConvOpening, ConvStep, DenseClosing, DenseOpening, DenseStep

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def mgrit_options(config):
    """LayerParallel keyword options for the configured mode."""
    g = config["mgrit"]
    if g["mode"] == "serial":
        return {"max_levels": 1}
    fwd_iters, bwd_iters = mode_iterations(config)
    return dict(max_levels=g["max_levels"], cfactor=g["cfactor"], relax=g["relax"],
                cycle=g["cycle"], fwd_iters=fwd_iters, bwd_iters=bwd_iters,
                fwd_tol=g["fwd_tol"], bwd_tol=g["bwd_tol"],
                warm_start=g["mode"] == "one-shot")


def _uniform(module, scale):
    """Every parameter of ``module`` uniform in [0, scale) (scale 0: as
    built).  Called inside the network's seeded factories, so the draws do
    not depend on the number of ranks."""
    if scale > 0:
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.rand_like(p) * scale)
    return module


def build_network(config, input_shape, num_classes, comm):
    """The configured Network on ``comm`` (float32 or float64)."""
    m = config["model"]
    width, act, k, bias = m["width"], m["activation"], m["kernel_size"], m["bias"]
    scale = m["init_scale"]
    if m["kind"] == "dense":
        features = int(math.prod(input_shape))
        opening = lambda: _uniform(DenseOpening(features, width, act, bias), scale)  # noqa: E731
        step = lambda n: _uniform(DenseStep(width, act, bias), scale)  # noqa: E731
        closing = lambda: _uniform(DenseClosing(width, num_classes), scale)  # noqa: E731
    else:
        if len(input_shape) != 3:
            raise ValueError(f"model.kind = 'conv' needs image inputs (C, H, W); the data set "
                             f"gives inputs of shape {tuple(input_shape)}: use model.kind = 'dense'")
        pool = min(4, input_shape[1])
        opening = lambda: _uniform(ConvOpening(input_shape[0], width, k, act), scale)  # noqa: E731
        step = lambda n: _uniform(ConvStep(width, k, act), scale)  # noqa: E731
        closing = lambda: _uniform(ConvClosing(width, num_classes, pool=pool), scale)  # noqa: E731
    net = Network(opening, step, closing, nlayers=m["nlayers"], T=m["T"], comm=comm,
                  seed=m["seed"], **mgrit_options(config))
    return net.to(DTYPES[config["data"]["dtype"]])


class ResidualMonitor:
    """Watches the residual history of each solve.  A solve of k iterations
    that cuts its residual by less than ``factor`` per iteration on average,
    ``patience`` updates in a row, gets one more iteration; past ``max_iters``
    the network falls back to serial (exact) propagation."""

    def __init__(self, factor, patience, max_iters, fwd_iters, bwd_iters):
        self.factor, self.patience, self.max_iters = factor, patience, max_iters
        self.iters = {"fwd": fwd_iters, "bwd": bwd_iters}
        self.stalls = {"fwd": 0, "bwd": 0}
        self.serial = False

    @staticmethod
    def rate(norms):
        if len(norms) < 2:
            return 0.0
        if not all(math.isfinite(r) for r in norms):
            return math.inf
        if norms[0] <= 0:
            return 0.0
        return (norms[-1] / norms[0]) ** (1.0 / (len(norms) - 1))

    def update(self, body):
        """Look at the last solves; returns a description of a change made to
        ``body`` (collective: every rank sees the same norms), or None."""
        if self.serial:
            return None
        change = {}
        for key, info in (("fwd", body.last_forward), ("bwd", body.last_backward)):
            if self.rate(info["residual_norms"]) > self.factor:
                self.stalls[key] += 1
            else:
                self.stalls[key] = 0
            if self.stalls[key] >= self.patience:
                self.stalls[key] = 0
                if self.iters[key] < self.max_iters:
                    self.iters[key] += 1
                    change[f"{key}_iters"] = self.iters[key]
                else:
                    self.serial = True
        if self.serial:
            body.reconfigure(max_levels=1)
            return "residual stalled at the iteration ceiling: serial propagation from now on"
        if change:
            body.reconfigure(**change)
            return "residual stalled: " + ", ".join(f"{k} -> {v}" for k, v in change.items())
        return None

    def escalate(self, body, reason):
        """One more iteration for both solves (serial propagation past the
        ceiling), e.g. when a line search finds no decrease on the inexact
        loss.  Collective."""
        if self.serial:
            return None
        if max(self.iters.values()) >= self.max_iters:
            self.serial = True
            body.reconfigure(max_levels=1)
            return f"{reason}: serial propagation from now on"
        self.iters = {k: min(v + 1, self.max_iters) for k, v in self.iters.items()}
        body.reconfigure(fwd_iters=self.iters["fwd"], bwd_iters=self.iters["bwd"])
        return f"{reason}: MGRIT iterations -> {self.iters['fwd']}/{self.iters['bwd']}"

    def state(self):
        return {"iters": dict(self.iters), "stalls": dict(self.stalls), "serial": self.serial}

    def restore(self, state, body):
        self.iters = dict(state["iters"])
        self.stalls = dict(state["stalls"])
        self.serial = bool(state["serial"])
        if self.serial:
            body.reconfigure(max_levels=1)
        else:
            body.reconfigure(fwd_iters=self.iters["fwd"], bwd_iters=self.iters["bwd"])


class Trainer:
    """Collective over ``comm``: every rank constructs it and calls run().

    ``log(text)`` receives messages on rank 0 (None: silent); ``progress``
    (rank 0) is called as progress(epoch, step_in_epoch, steps_per_epoch,
    metrics) after each step.
    """

    def __init__(self, config, comm, *, log=None, progress=None):
        self.config = config
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.log = log if self.rank == 0 else None
        self.progress = progress if self.rank == 0 else None
        d, o = config["data"], config["optim"]
        self.first, self.last = self.rank == 0, self.rank == self.size - 1
        self.data = load_dataset(d["name"], root=d["root"] or None, seed=d["seed"],
                                 val_fraction=None if d["val_fraction"] < 0 else d["val_fraction"],
                                 dtype=DTYPES[d["dtype"]], need_inputs=self.first,
                                 need_labels=self.last, comm=comm)
        self.net = build_network(config, self.data.input_shape, self.data.num_classes, comm)
        self.body = self.net.body
        full_batch = o["name"] == "lbfgs"
        batch = len(self.data.train) if full_batch else d["batch_size"]
        self.train_loader = self.data.train.loader(
            batch_size=batch, seed=d["seed"], shuffle=not full_batch,
            need_inputs=self.first, need_labels=self.last)
        self.val_loader = self.data.val.loader(
            batch_size=max(d["batch_size"], 1000), shuffle=False,
            need_inputs=self.first, need_labels=self.last)
        self.optimizer = self._make_optimizer()
        g = config["mgrit"]
        fwd_iters, bwd_iters = mode_iterations(config)
        self.monitor = ResidualMonitor(g["monitor_factor"], g["monitor_patience"],
                                       g["max_iters"], fwd_iters, bwd_iters) \
            if g["mode"] != "serial" and g["monitor"] else None
        self.run_dir = config["run"]["dir"]
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.metrics = MetricsWriter(self.run_dir, comm)

    # ---- optimiser --------------------------------------------------------
    def _make_optimizer(self):
        o = self.config["optim"]
        params = list(self.net.parameters())
        if o["name"] == "sgd":
            return torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"])
        if o["name"] == "adam":
            return torch.optim.Adam(params, lr=o["lr"])
        # serial mode: the full-batch objective is the same at every step, so
        # a step starts from the previous step's last evaluation
        return LBFGS(params, self.body.comm, lr=o["lr"], history=o["lbfgs_history"],
                     line_search=o["line_search"],
                     reuse_evaluation=self.config["mgrit"]["mode"] == "serial")

    def _lr(self, epoch):
        o = self.config["optim"]
        factor = schedule(o["schedule"], epochs=o["epochs"], step_epochs=o["step_epochs"],
                          decay=o["decay"])
        return o["lr"] * factor(epoch)

    def _regularize(self):
        """Add the penalties' gradients; their value (every rank)."""
        o = self.config["optim"]
        if o["tikhonov"] == 0 and o["smoothness"] == 0:
            return 0.0
        return regularize(self.net, tikhonov=o["tikhonov"], smoothness=o["smoothness"],
                          ends=o["tikhonov_ends"])

    # ---- one pass ----------------------------------------------------------
    def _forward_loss(self, x, y):
        """(loss tensor for backward, loss value, correct count), the values
        from the last rank on every rank."""
        out = self.net(x)
        if self.last:
            loss = Fn.cross_entropy(out, y)
            correct = int((out.argmax(1) == y).sum())
            value = float(loss.detach())
        else:
            loss, correct, value = out.sum() * 0.0, 0, 0.0
        value, correct = self.comm.bcast((value, correct), root=self.size - 1)
        return loss, value, correct

    def _train_step(self, x, y, size):
        stats = {}

        def closure():
            self.optimizer.zero_grad()
            loss, value, correct = self._forward_loss(x, y)
            loss.backward()
            value += self._regularize()
            stats.update(loss=value, correct=correct)
            return value

        if self.config["optim"]["name"] == "lbfgs":
            self.optimizer.step(closure)
            if not stats:  # the step reused the last evaluation and took no trial
                closure()
        else:
            closure()
            self.optimizer.step()
        f, b = self.body.last_forward, self.body.last_backward
        return dict(loss=stats["loss"], correct=stats["correct"], size=size,
                    fwd_iters=f["iterations"], bwd_iters=b["iterations"],
                    fwd_res=f["residual_norms"][-1] if f["residual_norms"] else 0.0,
                    bwd_res=b["residual_norms"][-1] if b["residual_norms"] else 0.0,
                    vtime=f["virtual_time"] + b["virtual_time"])

    def evaluate(self, loader):
        """(mean loss, accuracy) over a loader, collective."""
        total, loss_sum, correct = 0, 0.0, 0
        with torch.no_grad():
            for b, (x, y) in enumerate(loader.epoch(0)):
                n = _batch_len(loader, b)
                _, value, c = self._forward_loss(x, y)
                total += n
                loss_sum += value * n
                correct += c
        return loss_sum / max(total, 1), correct / max(total, 1)

    # ---- checkpoints ---------------------------------------------------------
    def _params(self):
        return {"layers": {n: dict(self.body.layers[str(n)].named_parameters())
                           for n in self.body.layer_indices},
                "opening": dict(self.net.opening.named_parameters()) if self.first else {},
                "closing": dict(self.net.closing.named_parameters()) if self.last else {}}

    def save(self):
        params = self._params()
        state = {"num_layers": self.body.nlayers, "epoch": self.epoch, "step": self.step,
                 "config": self.config,
                 "layers": {n: {k: v.detach() for k, v in d.items()}
                            for n, d in params["layers"].items()},
                 "opening": {k: v.detach() for k, v in params["opening"].items()},
                 "closing": {k: v.detach() for k, v in params["closing"].items()},
                 "optimizer": ckpt.optimizer_state(self.optimizer, params),
                 "rng": ckpt.rng_state(),
                 "extra": {"batch_in_epoch": self.batch_in_epoch,
                           "monitor": self.monitor.state() if self.monitor else {}}}
        ckpt.save_checkpoint(self.checkpoint_path(), self.comm, state)

    def checkpoint_path(self):
        return os.path.join(self.run_dir, "checkpoint.h5")

    def resume(self, path=None):
        """Load ``path``, or the run directory's checkpoint; False if there is
        none.  A damaged or mismatched checkpoint raises CheckpointError (the
        previous one, checkpoint.prev.h5, is left as it is)."""
        if path is None:
            path = self.checkpoint_path()
            exists = self.comm.bcast(os.path.exists(path) if self.rank == 0 else None, root=0)
            if not exists:  # a save interrupted between its renames leaves only .prev
                path = ckpt.find_latest_checkpoint(self.run_dir, self.comm)
                if path is None:
                    return False
        keys = {"model": self.config["model"], "data": {
            k: self.config["data"][k] for k in ("name", "dtype", "seed")}}
        try:
            st = ckpt.load_checkpoint(path, self.comm, layer_indices=self.body.layer_indices,
                                      num_layers=self.body.nlayers, config=keys)
        except ckpt.CheckpointError as e:
            prev = ckpt.previous_path(path)
            hint = f" (the previous checkpoint {prev} is kept: resume from it with " \
                   f"--resume-from {prev})" if os.path.exists(prev) else ""
            raise ckpt.CheckpointError(f"{e}{hint}") from None
        params = self._params()
        with torch.no_grad():
            for group in ("opening", "closing"):
                for k, p in params[group].items():
                    p.copy_(st[group][k])
            for n, d in params["layers"].items():
                for k, p in d.items():
                    p.copy_(st["layers"][n][k])
        ckpt.restore_optimizer_state(self.optimizer, params, st["optimizer"])
        if st.get("rng"):
            ckpt.set_rng_state(st["rng"])
        self.epoch, self.step = st["epoch"], st["step"]
        extra = st.get("extra") or {}
        self.batch_in_epoch = extra.get("batch_in_epoch", 0)
        if self.monitor and extra.get("monitor"):
            self.monitor.restore(extra["monitor"], self.body)
        self.metrics.truncate(self.epoch)  # rows of epochs finished before the save
        if self.log:
            self.log(f"resumed from {path}: epoch {self.epoch}, step {self.step}")
        return True

    # ---- the loop ------------------------------------------------------------
    def run(self):
        o, r = self.config["optim"], self.config["run"]
        every = r["checkpoint_every"]
        steps_per_epoch = len(self.train_loader)
        t_start = time.perf_counter()
        summary = None
        while self.epoch < o["epochs"]:
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr(self.epoch)
            t_epoch = time.perf_counter()
            acc = dict(loss=0.0, correct=0, size=0, fwd_iters=0, bwd_iters=0, fwd_res=0.0,
                       bwd_res=0.0, vtime=0.0, steps=0)
            batches = self.train_loader.epoch(self.epoch)
            for b, (x, y) in enumerate(batches):
                if b < self.batch_in_epoch:
                    continue  # done before the checkpoint this run resumed from
                size = _batch_len(self.train_loader, b)
                s = self._train_step(x, y, size)
                for k in ("fwd_iters", "bwd_iters", "fwd_res", "bwd_res", "vtime"):
                    acc[k] += s[k]
                acc["loss"] += s["loss"] * size
                acc["correct"] += s["correct"]
                acc["size"] += size
                acc["steps"] += 1
                self.step += 1
                self.batch_in_epoch = b + 1
                if self.monitor:
                    change = self.monitor.update(self.body)
                    status = getattr(self.optimizer, "last_step", {}).get("status")
                    if change is None and status == "failed":
                        change = self.monitor.escalate(self.body, "no decrease along the "
                                                       "inexact gradient")
                    if change and self.log:
                        self.log(f"step {self.step}: {change}")
                if self.progress:
                    self.progress(self.epoch, b + 1, steps_per_epoch, s)
                if r["log_every"] and self.step % r["log_every"] == 0 and self.log:
                    self.log(f"step {self.step} (epoch {self.epoch + 1}, batch {b + 1}/"
                             f"{steps_per_epoch}): loss {s['loss']:.4f}, accuracy "
                             f"{100 * s['correct'] / max(size, 1):.1f}%, MGRIT iterations "
                             f"{s['fwd_iters']}/{s['bwd_iters']}, residuals "
                             f"{s['fwd_res']:.1e}/{s['bwd_res']:.1e}")
                if every and self.step % every == 0 and self.batch_in_epoch < steps_per_epoch:
                    self.save()
            val_loss, val_acc = self.evaluate(self.val_loader)
            n = max(acc["steps"], 1)
            row = {"epoch": self.epoch + 1, "step": self.step,
                   "train_loss": acc["loss"] / max(acc["size"], 1),
                   "train_acc": acc["correct"] / max(acc["size"], 1),
                   "val_loss": val_loss, "val_acc": val_acc,
                   "fwd_iters": acc["fwd_iters"] / n, "bwd_iters": acc["bwd_iters"] / n,
                   "fwd_residual": acc["fwd_res"] / n, "bwd_residual": acc["bwd_res"] / n,
                   "lr": self.optimizer.param_groups[0]["lr"],
                   "wall_time": time.perf_counter() - t_epoch,
                   "virtual_time": acc["vtime"]}
            self.metrics.append(row)
            self.epoch += 1
            self.batch_in_epoch = 0
            self.save()
            summary = row
            if self.log:
                self.log(format_row(row))
        if summary is None:  # nothing left to train: report the current state
            val_loss, val_acc = self.evaluate(self.val_loader)
            summary = {"epoch": self.epoch, "step": self.step, "val_loss": val_loss,
                       "val_acc": val_acc}
        summary["total_wall_time"] = time.perf_counter() - t_start
        if self.rank == 0 and self.config["run"]["plot"]:
            plot_metrics(self.metrics.rows(), os.path.join(self.run_dir, "curves.png"))
        return summary

    def write_config(self):
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.toml"), "w") as fh:
                fh.write(to_toml(self.config))


def _batch_len(loader, b):
    """Samples in batch b (known on every rank: only the last is short)."""
    return min(loader.batch_size, loader.num_samples - b * loader.batch_size)


def format_row(row):
    return (f"epoch {row['epoch']:3d}  loss {row['train_loss']:.4f}  "
            f"train {100 * row['train_acc']:5.1f}%  val {100 * row['val_acc']:5.1f}%  "
            f"iters {row['fwd_iters']:.1f}/{row['bwd_iters']:.1f}  "
            f"res {row['fwd_residual']:.1e}/{row['bwd_residual']:.1e}  "
            f"{row['wall_time']:.1f}s")


def plot_metrics(rows, path):
    """Training curves (loss, accuracies, MGRIT iterations) as a PNG."""
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.5))
    ax[0].plot(ep, [r["train_loss"] for r in rows], label="train")
    ax[0].plot(ep, [r["val_loss"] for r in rows], label="validation")
    ax[0].set_yscale("log")
    ax[0].set_title("loss")
    ax[1].plot(ep, [100 * r["train_acc"] for r in rows], label="train")
    ax[1].plot(ep, [100 * r["val_acc"] for r in rows], label="validation")
    ax[1].set_title("accuracy [%]")
    ax[2].plot(ep, [r["fwd_iters"] for r in rows], label="forward")
    ax[2].plot(ep, [r["bwd_iters"] for r in rows], label="backward")
    ax[2].set_title("MGRIT iterations per step")
    for a in ax:
        a.set_xlabel("epoch")
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
