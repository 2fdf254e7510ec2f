"""Calibration of MIST's cost model against measured operator timings.

``mist.calibration.schema`` defines the normalised operator-timing table and
``mist.calibration.sources`` loads the measured datasets (and the curated subset in
``traces/ops``) into it. Nothing heavy is imported here.
"""

# Fitting, evaluation and reports import JAX; they load on first use:
# mist.calibration.calibrate / transfer_params / write_report / evaluate_table / predict_table.
_LAZY = {
    "calibrate": ("fit", "calibrate"),
    "transfer_params": ("fit", "transfer_params"),
    "write_report": ("report", "write_report"),
    "evaluate_table": ("evaluate", "evaluate"),
    "predict_table": ("predict", "predict"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{mod}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
