"""What the model benchmarks share: the conv network, its training step
(opening, N residual layers, closing, cross-entropy, SGD step) and the
calibration of exactly that step (layerpar.perfmodel)."""
import torch
import torch.nn.functional as Fn

from layerpar import ConvClosing, ConvOpening, ConvStep, Network
from layerpar import perfmodel as pm

LR = 1e-3


def settings(cfactor=4):
    """(name, model mode, model options, Network options) of the benchmarked
    settings (2 forward / 1 backward iterations, 1 / 1 one-shot)."""
    f = dict(cfactor=cfactor, relax="F", skip=True)
    fcf = dict(cfactor=cfactor, relax="FCF", skip=False)
    return [
        ("serial", "serial", {}, dict(max_levels=1)),
        ("pipeline m=4", "pipeline", dict(microbatches=4), dict(max_levels=1, microbatches=4)),
        ("layer-parallel L2 F skip", "layer-parallel", dict(max_levels=2, **f, fwd_iters=2),
         dict(max_levels=2, **f, fwd_iters=2, bwd_iters=1)),
        ("layer-parallel L2 FCF", "layer-parallel", dict(max_levels=2, **fcf, fwd_iters=2),
         dict(max_levels=2, **fcf, fwd_iters=2, bwd_iters=1)),
        ("layer-parallel L3 F skip", "layer-parallel", dict(max_levels=3, **f, fwd_iters=2),
         dict(max_levels=3, **f, fwd_iters=2, bwd_iters=1)),
        ("one-shot L2 F skip", "one-shot", dict(max_levels=2, **f, fwd_iters=1),
         dict(max_levels=2, **f, fwd_iters=1, bwd_iters=1, warm_start=True)),
    ]


class ConvNet:
    """The benchmark network: 1-channel size x size images, ``width``
    channels, N residual conv layers, 10 classes; a fixed batch."""

    def __init__(self, *, layers, width, size, batch):
        self.layers, self.width, self.size, self.batch = layers, width, size, batch
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 1, size, size, generator=g)
        self.y = torch.randint(0, 10, (batch,), generator=g)

    def network(self, comm, **options):
        w = self.width
        return Network(lambda: ConvOpening(1, w), lambda n: ConvStep(w),
                       lambda: ConvClosing(w, 10, pool=4), nlayers=self.layers, T=1.0,
                       comm=comm, seed=1, **options)

    def trainer(self, net):
        """A function that takes one training step of ``net`` (collective)."""
        opt = torch.optim.SGD(net.parameters(), lr=LR)

        def step():
            opt.zero_grad()
            net.loss(self.x, self.y, Fn.cross_entropy).backward()
            opt.step()
        return step

    def calibrate(self, comm, repeats=10, clock="wall"):
        """The calibration of this network's training step (collective)."""
        w = self.width
        opening, closing = ConvOpening(1, w), ConvClosing(w, 10, pool=4)
        with torch.no_grad():
            shape = tuple(opening(self.x).shape)
        lam = torch.randn(shape)

        def ends():
            # what a training step does besides the layers: the opening
            # forward and backward, the closing and loss forward and backward
            u = opening(self.x)
            v = u.detach().requires_grad_(True)
            Fn.cross_entropy(closing(v), self.y).backward()
            u.backward(lam)

        return pm.calibrate(ConvStep(w), shape, torch.float32, comm=comm, repeats=repeats,
                            overhead=True, ends=ends,
                            optimizer=lambda params: torch.optim.SGD(params, lr=LR),
                            clock=clock)
