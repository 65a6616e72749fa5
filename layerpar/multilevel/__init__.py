"""Multilevel training over networks of depths N, N/r, N/r^2, ... over the
same final time, each layer-parallel on the same ranks.

  hierarchy  ``Hierarchy``: the depths and the transfers between levels
             (restrict, prolong, restrict_gradient over
             ``layerpar.transfer``, and ``move_optimizer_state``); ``depths``
  nested     ``NestedIteration``: train shallow, refine, train deeper
  mgopt      ``MGOpt``: one MG/OPT V-cycle per batch
  method     ``MultilevelMethod``: what both share (metrics columns, the
             checkpoint layout) and the interface ``layerpar.training.Trainer``
             drives every method through

Work: each level counts its layer-step evaluations (forward and adjoint,
every solve, line-search evaluations included; see ``layerpar.training.
level``).  Metrics rows carry ``fwd_work`` and ``bwd_work`` (cumulative,
all levels, summed over ranks) and per depth ``fwd_work_l<j>``,
``bwd_work_l<j>`` (j = 0 the coarsest), with ``level`` (the depth index of
nested iteration; 0 for MG/OPT's fine level), ``nlayers``, ``cycle`` and
``accepted`` (MG/OPT: the fraction of coarse corrections accepted).

On a process grid of D data-parallel groups (``parallel.data``) every
level's network is layer-parallel on its group's ranks and the transfers
between levels stay in the group; every evaluation takes the group's share
of the batch and gradients are averaged over the data axis (``Level``), so
losses, gradients, linear terms and line-search decisions are the global
batch's and the groups keep the same weights.
"""
from layerpar.multilevel.hierarchy import Hierarchy, depths
from layerpar.multilevel.method import MultilevelMethod
from layerpar.multilevel.mgopt import MGOpt
from layerpar.multilevel.nested import NestedIteration, epoch_budgets
from layerpar.multilevel.rmtr import RMTR

METHODS = {"nested": NestedIteration, "mgopt": MGOpt, "rmtr": RMTR}

__all__ = [
           "METHODS",
           "RMTR",
           "Hierarchy",
           "MGOpt",
           "MultilevelMethod",
           "NestedIteration",
           "depths",
           "epoch_budgets",
]
