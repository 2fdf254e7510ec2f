"""Configuration sweeps: expand axes over a base deployment, run every config through one
compiled vmapped program (sharded over devices and hosts), analyse the table, search for the
cheapest deployment that meets SLOs.

`mist.sweep` is both this package and a function: `mist.sweep("sweep.yaml")` runs a sweep.
"""

import sys as _sys
import types as _types

from .analysis import best_under_slo as best_under_slo
from .analysis import max_sustainable_rate as max_sustainable_rate
from .analysis import pareto_front as pareto_front
from .analysis import plot_heatmap as plot_heatmap
from .analysis import plot_pareto as plot_pareto
from .configs import ConfigPlan as ConfigPlan
from .configs import apply_point as apply_point
from .lowering import LoweredSweep as LoweredSweep
from .lowering import lower_sweep as lower_sweep
from .runner import RunInfo as RunInfo
from .runner import run_chunks as run_chunks
from .sampling import expand as expand
from .sampling import latin_hypercube as latin_hypercube
from .sharding import config_sharding as config_sharding
from .sharding import host_shard as host_shard
from .sharding import merge_parts as merge_parts
from .spec import Axis as Axis
from .spec import RunOptions as RunOptions
from .spec import Sampling as Sampling
from .spec import SweepSpec as SweepSpec
from .spec import load_sweep as load_sweep
from .spec import parse_sweep as parse_sweep
from .sweep import PreparedSweep as PreparedSweep
from .sweep import prepare as prepare
from .sweep import run_prepared as run_prepared
from .sweep import sweep as sweep
from .table import write_table as write_table


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        return sweep(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
