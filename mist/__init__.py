"""MIST: a vectorised, differentiable simulator of multi-stage LLM inference serving.

Public API: `mist.estimate` (one replica, no queueing), `mist.simulate` (a deployment on a
workload), `mist.sweep` (many deployments as one vmapped program), `mist.calibrate` (fit the cost
model to measured operator timings). Sub-packages follow the layers of the design: specs,
lowering, cost, engine, results, cli; plus workload and calibration.
"""

import os as _os

import jax as _jax

# Simulation clocks need float64: at one hour of simulated time float32 resolves only ~0.2 ms.
_jax.config.update("jax_enable_x64", True)


def _cpu_devices() -> None:
    """One XLA CPU device per usable core (at most 32), so that a sweep's config axis is sharded
    over all of them (mist.sweep.sharding). XLA runs one device's kernels on one core; one device
    leaves the others idle (on 2 cores, 2 devices ran bench_sweep 1.6-2.2x faster). Single simulations
    run on the first device, as before. Left alone when the user chose: MIST_CPU_DEVICES=N, JAX's
    own JAX_NUM_CPU_DEVICES or XLA_FLAGS' --xla_force_host_platform_device_count, or when JAX's
    backends are already initialised (the setting can then no longer apply)."""
    if "xla_force_host_platform_device_count" in _os.environ.get("XLA_FLAGS", "") or \
            "JAX_NUM_CPU_DEVICES" in _os.environ:
        return
    want = _os.environ.get("MIST_CPU_DEVICES", "").strip()
    if want:
        if not want.isdigit() or int(want) < 1:
            raise ValueError(f"MIST_CPU_DEVICES={want!r}: give a whole number of CPU devices >= 1 (e.g. 1 or 2)")
        n = int(want)
    else:
        try:
            n = len(_os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = _os.cpu_count() or 1
        n = max(1, min(n, 32))
    try:
        _jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # "... should be updated before backends are initialized": too late, keep them
        pass


_cpu_devices()

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
