"""Calibration of MIST's cost model against measured operator timings.

``mist.calibration.schema`` defines the normalised operator-timing table and
``mist.calibration.sources`` loads the measured datasets (and the curated subset in
``traces/ops``) into it. Nothing heavy is imported here.
"""
