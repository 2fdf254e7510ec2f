"""Every catalog device can serve a model: lowering never trips over a missing rate, and the
iteration cost is finite and positive (regression: TPUs and ASICs without an fp32 rate)."""

from __future__ import annotations

import jax
import numpy as np

import mist  # noqa: F401
from mist.cost import default_params, iteration_time, lower_replica, make_batch, stack_replicas
from mist.specs.catalog import all_hardware, get_model


def test_every_device_lowers_and_costs():
    model = get_model("llama-3.1-8b")
    devices = all_hardware()
    reps = stack_replicas([lower_replica(model, d, tp=1) for d in devices])
    batch = make_batch([512], [0], decode_context=[1000, 3000])
    times = jax.vmap(lambda r: iteration_time(default_params(), r, batch))(reps)
    t = np.asarray(times)
    assert np.all(np.isfinite(t)) and np.all(t > 0), dict(zip([d.name for d in devices], t))
