"""Metrics rows as text and training curves as a PNG."""
import math

# What the columns of ``format_row`` are, printed once above the epoch lines.
EPOCH_HEADER = ("epoch lines: mean training loss; accuracy on the training and validation "
                "splits; MGRIT iterations per step (forward/adjoint, means over the epoch); "
                "last MGRIT residuals (forward/adjoint); wall time of the epoch")


def batch_len(loader, b):
    """Samples in batch b (known on every rank: only the last is short)."""
    return min(loader.batch_size, loader.num_samples - b * loader.batch_size)


def epoch_sums(**extra):
    """The running sums of an epoch's steps (``extra``: more counters);
    ``exact``: steps with exact propagation, ``checks``, ``grad_error``,
    ``grad_cosine``, ``grad_actions``: the gradient-accuracy controller's
    measurements, the sums of their errors and cosines, its actions."""
    return dict(loss=0.0, correct=0, size=0, fwd_iters=0, bwd_iters=0, fwd_res=0.0,
                bwd_res=0.0, vtime=0.0, steps=0, exact=0, checks=0, grad_error=0.0,
                grad_cosine=0.0, grad_actions=0, **extra)


def add_step(sums, s, size):
    """Add the statistics ``s`` of one step on ``size`` samples to ``sums``."""
    for k in ("fwd_iters", "bwd_iters", "fwd_res", "bwd_res", "vtime"):
        sums[k] += s[k]
    sums["loss"] += s["loss"] * size
    sums["correct"] += s["correct"]
    sums["size"] += size
    sums["steps"] += 1
    sums["exact"] += int(s.get("exact", 0))
    error = s.get("grad_error", math.nan)
    if not math.isnan(error):
        sums["checks"] += 1
        sums["grad_error"] += error
        sums["grad_cosine"] += s["grad_cosine"]
        sums["grad_actions"] += int(s.get("grad_acted", 0))


def controller_columns(sums, controller):
    """The metrics columns of the gradient-accuracy controller over an
    epoch's ``sums``: its measurements (``grad_checks``), their mean
    relative error and cosine (NaN without one), its actions
    (``grad_actions``), the fraction of the epoch's steps with exact
    propagation (``exact_steps``) and the measurements' layer steps so far
    (``check_work``: forward + adjoint, over the ranks; part of
    ``fwd_work`` + ``bwd_work``)."""
    checks = sums["checks"]
    return {"grad_checks": checks,
            "grad_error": sums["grad_error"] / checks if checks else math.nan,
            "grad_cosine": sums["grad_cosine"] / checks if checks else math.nan,
            "grad_actions": sums["grad_actions"],
            "exact_steps": sums["exact"] / max(sums["steps"], 1),
            "check_work": controller.work["fwd"] + controller.work["bwd"]}


def format_row(row):
    text = (f"epoch {row['epoch']:3d}  loss {row['train_loss']:.4f}  "
            f"train {100 * row['train_acc']:5.1f}%  val {100 * row['val_acc']:5.1f}%  "
            f"iters {row['fwd_iters']:.1f}/{row['bwd_iters']:.1f}  "
            f"res {row['fwd_residual']:.1e}/{row['bwd_residual']:.1e}  "
            f"{row['wall_time']:.1f}s")
    if row.get("grad_checks"):
        text += f"  grad err {row['grad_error']:.2g} cos {row['grad_cosine']:.3f}"
    if row.get("exact_steps"):
        text += f"  exact {100 * row['exact_steps']:.0f}%"
    return text


def plot_metrics(rows, path, *, title=None):
    """Training curves (loss, accuracies, MGRIT iterations) of the metrics
    ``rows`` as a PNG at ``path``; ``title`` (e.g. the run's name, mode and
    ranks) above them and in the PNG's ``Title`` metadata.  Nothing is
    written without rows.  Not collective (rank 0 calls it)."""
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
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Title": title} if title else None)
    plt.close(fig)
