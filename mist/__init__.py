"""MIST: a vectorised, differentiable simulator of multi-stage LLM inference serving.

Public API: `mist.estimate` (one replica, no queueing), `mist.simulate` (a deployment on a
workload), `mist.sweep` (many deployments as one vmapped program), `mist.calibrate` (fit the cost
model to measured operator timings). Sub-packages follow the layers of the design: specs,
lowering, cost, engine, results, cli; plus workload and calibration.
"""

import jax as _jax

# Simulation clocks need float64: at one hour of simulated time float32 resolves only ~0.2 ms.
_jax.config.update("jax_enable_x64", True)

from .estimate import estimate as estimate  # noqa: E402
from .simulate import SimulationResult as SimulationResult  # noqa: E402
from .simulate import simulate as simulate  # noqa: E402


def __getattr__(name):
    # heavier front ends load on first use
    if name == "sweep":
        import importlib

        return importlib.import_module(".sweep", __name__)
    if name == "calibrate":
        from .calibration import calibrate

        return calibrate
    raise AttributeError(f"module 'mist' has no attribute {name!r}")
