"""Numeric formats: bytes per element, and which peak-FLOP/s entry each one runs at."""

from __future__ import annotations

from .errors import SpecError

#: Bytes per element of each storage format. fp4/int4/mxfp4 pack two elements per byte;
#: block-scaled formats (mxfp4, nvfp4) carry one 8-bit scale per 32 (mx) or 16 (nv) elements.
BYTES_PER_ELEMENT: dict[str, float] = {
    "fp32": 4.0,
    "tf32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "fp4": 0.5,
    "int4": 0.5,
    "mxfp4": 0.5 + 1.0 / 32.0,
    "nvfp4": 0.5 + 1.0 / 16.0,
}

#: Spelling variants accepted in configs and on the command line.
ALIASES: dict[str, str] = {
    "float32": "fp32", "float": "fp32", "f32": "fp32",
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "f16": "fp16",
    "float8": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8", "e4m3": "fp8", "f8": "fp8",
    "float8_e4m3fn": "fp8",
    "float4": "fp4", "fp4_e2m1": "fp4", "w4a16": "int4", "awq": "int4", "gptq": "int4",
    "auto": "bf16",
}

#: Which entry of a device's peak-FLOP/s table a matmul in this format runs at, in order of
#: preference (a chip without native fp4 runs fp4 weights at its fp8 or bf16 rate).
COMPUTE_FALLBACK: dict[str, tuple[str, ...]] = {
    # chips without an fp32 matrix rate (TPU v6e/v7, inference ASICs) run fp32 work at their bf16 rate
    "fp32": ("fp32", "tf32", "bf16", "fp16"),
    "tf32": ("tf32", "fp32", "bf16", "fp16"),
    "bf16": ("bf16", "fp16", "fp32"),
    "fp16": ("fp16", "bf16", "fp32"),
    "fp8": ("fp8", "int8", "bf16", "fp16", "fp32"),
    "int8": ("int8", "fp8", "bf16", "fp16", "fp32"),
    "fp4": ("fp4", "fp8", "int8", "bf16", "fp32"),
    "int4": ("int4", "fp4", "int8", "fp8", "bf16", "fp32"),
    "mxfp4": ("fp4", "fp8", "int8", "bf16", "fp32"),
    "nvfp4": ("fp4", "fp8", "int8", "bf16", "fp32"),
}


def canonical(dtype: str, where: str = "<argument>", field: str = "dtype") -> str:
    """Canonical name of a numeric format, or a SpecError naming the accepted ones."""
    d = str(dtype).strip().lower()
    d = ALIASES.get(d, d)
    if d not in BYTES_PER_ELEMENT:
        raise SpecError(where, field, f"unknown numeric format '{dtype}'",
                        f"use one of {', '.join(sorted(BYTES_PER_ELEMENT))}")
    return d


def nbytes(dtype: str) -> float:
    """Bytes per element of a (canonical or aliased) numeric format."""
    return BYTES_PER_ELEMENT[canonical(dtype)]
