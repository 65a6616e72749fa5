"""Training: networks built from a configuration (``build``), one network
with its optimiser that a method can drive (``level.Level``), the epoch
loop with metrics, checkpoints and resumption that drives any method
(``loop.Trainer``: single-level training, ``single``, or the multilevel
methods of ``layerpar.multilevel``)."""
from layerpar.training.build import DTYPES, build_network, mgrit_options
from layerpar.training.controller import GradientController
from layerpar.training.level import Level
from layerpar.training.loop import Trainer, make_trainer
from layerpar.training.monitor import ResidualMonitor
from layerpar.training.report import format_row, plot_metrics

__all__ = ["DTYPES", "GradientController", "Level", "ResidualMonitor", "Trainer", "build_network", "format_row",
           "make_trainer", "mgrit_options", "plot_metrics"]
