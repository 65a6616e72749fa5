"""``make_trainer`` under its earlier import path.  The multilevel methods
are ``layerpar.multilevel``'s ``NestedIteration`` and ``MGOpt``, which
``layerpar.training.Trainer`` drives like single-level training."""
from layerpar.training.loop import make_trainer

__all__ = ["make_trainer"]
