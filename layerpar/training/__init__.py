"""Training: networks built from a configuration (``build``), one network
with its optimiser that an outer method can drive (``level.Level``), the
epoch loop with metrics, checkpoints and resumption (``loop.Trainer``), and
the multilevel methods (``multilevel``: nested iteration and MG/OPT)."""
from layerpar.training.build import DTYPES, build_network, mgrit_options
from layerpar.training.level import Level
from layerpar.training.loop import Trainer
from layerpar.training.monitor import ResidualMonitor
from layerpar.training.report import format_row, plot_metrics

__all__ = ["DTYPES", "Level", "ResidualMonitor", "Trainer", "build_network", "format_row",
           "mgrit_options", "plot_metrics"]
