"""Learning-rate schedules: the factor multiplying the base learning rate,
epoch by epoch, and a torch scheduler that applies it."""
import math

import torch

SCHEDULES = ("constant", "step", "cosine")


def schedule(name, *, epochs=None, step_epochs=10, decay=0.5, min_factor=0.0):
    """The factor multiplying the base learning rate, as a function of the
    epoch (0, 1, ...):

      'constant'  1
      'step'      decay ** (epoch // step_epochs)
      'cosine'    min_factor + (1 - min_factor) * (1 + cos(pi*e/epochs)) / 2,
                  e = min(epoch, epochs); needs ``epochs``

    Use it directly (``group['lr'] = lr * f(epoch)``) or through
    ``scheduler``."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule {name!r}: choose one of {SCHEDULES}")
    if name == "constant":
        return lambda epoch: 1.0
    if name == "step":
        if not isinstance(step_epochs, int) or isinstance(step_epochs, bool) or step_epochs < 1:
            raise ValueError(f"step_epochs={step_epochs!r}: must be an integer >= 1")
        if not (isinstance(decay, (int, float)) and 0 < decay <= 1):
            raise ValueError(f"decay={decay!r}: must be in (0, 1]")
        return lambda epoch: float(decay) ** (epoch // step_epochs)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs={epochs!r}: the cosine schedule needs the number of epochs "
                         "(an integer >= 1)")
    if not (isinstance(min_factor, (int, float)) and 0 <= min_factor <= 1):
        raise ValueError(f"min_factor={min_factor!r}: must be in [0, 1]")

    def cosine(epoch):
        e = min(epoch, epochs)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * e / epochs))
    return cosine


def scheduler(optimizer, name, **options):
    """A ``torch.optim.lr_scheduler.LambdaLR`` for ``schedule(name,
    **options)``: call ``.step()`` once per epoch, after the optimiser's
    steps.  Works with ``LBFGS`` and any torch optimiser."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(name, **options))
