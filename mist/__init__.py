"""MIST: a vectorised, differentiable simulator of multi-stage LLM inference serving."""

import jax as _jax

# Simulation clocks need float64: at one hour of simulated time float32 resolves only ~0.2 ms.
_jax.config.update("jax_enable_x64", True)

from .estimate import estimate as estimate  # noqa: E402
