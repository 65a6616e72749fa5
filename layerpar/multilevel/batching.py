"""The batch of a cycle: consecutive loader batches grouped, and the rule
that makes the groups grow.

    batches = CycleBatches(first=1, growth="schedule", most=8, every=2, theta=0.5,
                           batches_per_epoch=25)
    group = batches.add(b, x, y, size)   # None while the group is incomplete
    batches.end_epoch()                  # the schedule's growth

A cycle takes ``size`` (the number of loader batches of its group)
consecutive batches of the epoch, concatenated (the last group of an epoch
takes what is left).  Growth (``growth``): "none"; "schedule": the group
size doubles every ``every`` epochs, up to ``most``; "norm-test": it
doubles when the norm test (Byrd, Chin, Nocedal and Wu, Math. Program.
134, 2012) says the batch gradient's noise is large against the gradient,

    E|g_B - grad f|^2 <= theta^2 |grad f|^2,

estimated from the fine gradients of two consecutive cycles g1, g2 (on
independent batches of the same size): the noise by |g1 - g2|^2 / 2 and
the gradient by |(g1 + g2) / 2|^2, both averaged over the cycles since the
last growth (``record``).  The estimate also counts the gradient's change
between the two points, so the test errs towards growing.

On a process grid every group concatenates its own rows of the same
loader batches, which are its rows of the concatenated global batch when
every full batch splits evenly over the groups (``layerpar.config``
refuses grouping otherwise).
"""
import torch

GROWTH = ("none", "schedule", "norm-test")


class CycleBatches:
    """The loader batches of the cycle being gathered and the group size;
    the same on every rank (every rank sees the same batch indices)."""

    def __init__(self, *, first, growth, most, every, theta, batches_per_epoch):
        self.size = first
        self.growth, self.most, self.every, self.theta = growth, most, every, theta
        self.batches_per_epoch = batches_per_epoch
        self.pending = []   # [(index in the epoch, x, y, size)]
        self.epochs = 0     # epochs ended (the schedule's clock)
        self.noise = self.signal = 0.0  # the norm test's sums since the last growth
        self.tests = 0

    @property
    def limit(self):
        return min(self.most, self.batches_per_epoch) if self.most else self.batches_per_epoch

    def add(self, b, x, y, size):
        """Batch ``b`` of the epoch; the group (x, y, size) when it is
        complete (its size reached, or the epoch's last batch), else None."""
        self.pending.append((b, x, y, size))
        if len(self.pending) < min(self.size, self.limit) and b < self.batches_per_epoch - 1:
            return None
        return self.take()

    def take(self):
        """The pending batches as one, and none pending."""
        parts, self.pending = self.pending, []
        if len(parts) == 1:
            return parts[0][1:]
        xs = [p[1] for p in parts]
        ys = [p[2] for p in parts]
        x = None if xs[0] is None else torch.cat(xs)
        y = None if ys[0] is None else torch.cat(ys)
        return x, y, sum(p[3] for p in parts)

    def end_epoch(self):
        self.epochs += 1
        if self.growth == "schedule" and self.epochs % self.every == 0:
            self._grow()

    def record(self, noise, signal):
        """The norm test on one more pair of consecutive gradients: grow when
        the averaged noise exceeds theta^2 times the averaged gradient."""
        if self.growth != "norm-test":
            return
        self.noise += noise
        self.signal += signal
        self.tests += 1
        if self.noise > self.theta ** 2 * self.signal:
            self._grow()

    def _grow(self):
        if self.size < self.limit:
            self.size = min(2 * self.size, self.limit)
        self.noise = self.signal = 0.0
        self.tests = 0

    # ---- checkpoints ------------------------------------------------------------------
    def state(self):
        """The group size, the clock, the norm test's sums and the indices of
        the pending batches (a resumed run takes them from the loader)."""
        return {"size": self.size, "epochs": self.epochs, "noise": self.noise,
                "signal": self.signal, "tests": self.tests,
                "pending": [p[0] for p in self.pending]}

    def restore(self, st, fetch):
        """``fetch(indices)``: [(x, y, size)] of those batches of the epoch."""
        self.size, self.epochs = int(st["size"]), int(st["epochs"])
        self.noise, self.signal = float(st["noise"]), float(st["signal"])
        self.tests = int(st["tests"])
        idx = [int(b) for b in st["pending"]]
        self.pending = [(b,) + tuple(p) for b, p in zip(idx, fetch(idx))] if idx else []
