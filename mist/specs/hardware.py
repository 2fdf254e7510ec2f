"""Hardware specs: devices with memory hierarchies and links, composed into nodes and clusters.

Files use human units (TFLOP/s, GB, GB/s, microseconds, watts, USD/hour; GB = 1e9 bytes);
the dataclasses hold SI units (FLOP/s, bytes, bytes/s, seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ._toml import Fields, read_spec_file
from .dtypes import COMPUTE_FALLBACK, canonical
from .errors import SpecError

DEVICE_KINDS = ("gpu", "tpu", "accelerator", "asic", "cpu")
VENDORS = ("nvidia", "amd", "google", "intel", "groq", "cerebras", "sambanova", "etched", "generic",
           "aws", "meta", "tenstorrent", "other")
#: Levels of the memory hierarchy, closest first. Exactly one tier per device has level
#: "device": the memory that holds weights and the KV cache (HBM, GDDR, DRAM, or SRAM on
#: SRAM-only chips).
MEMORY_LEVELS = ("onchip", "device", "host", "cxl", "local_ssd", "remote")
FLOP_DTYPES = ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp6", "fp4", "int4")


@dataclass(frozen=True)
class Link:
    """A point-to-point or switched interconnect, per device and per direction."""

    name: str
    bandwidth: float  # bytes/s, per direction, per device
    latency: float  # seconds, per message
    domain_size: int = 1  # devices reachable over this link at this bandwidth


@dataclass(frozen=True)
class MemoryTier:
    """One level of a device's memory hierarchy."""

    name: str
    level: str  # one of MEMORY_LEVELS
    capacity: float  # bytes (for tiers shared by several devices: the whole tier)
    bandwidth: float  # bytes/s as seen by one device when it alone uses the tier
    latency: float  # seconds, first byte
    shared_by: int = 1  # devices sharing this tier (its bandwidth is contended among them)
    link: str = ""  # the link used to reach it (e.g. "PCIe 5.0 x16"), for reports


@dataclass(frozen=True)
class Device:
    """One accelerator or CPU socket."""

    name: str
    vendor: str
    kind: str
    peak_flops: dict[str, float]  # dense FLOP/s (or OP/s for int) per numeric format
    memory: tuple[MemoryTier, ...]  # closest first
    scale_up: Link
    scale_out: Link
    tdp: float  # watts
    idle_power: float  # watts
    price_per_hour: float  # USD per device-hour
    devices_per_node: int
    aliases: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    notes: str = ""
    path: str = ""

    @property
    def device_memory(self) -> MemoryTier:
        """The tier that holds weights and KV cache."""
        return next(t for t in self.memory if t.level == "device")

    @property
    def mem_capacity(self) -> float:
        return self.device_memory.capacity

    @property
    def mem_bandwidth(self) -> float:
        return self.device_memory.bandwidth

    def tier(self, level: str) -> MemoryTier | None:
        """First tier at a given level, or None."""
        return next((t for t in self.memory if t.level == level), None)

    def flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for a matmul in `dtype`, falling back to the nearest supported rate."""
        d = canonical(dtype)
        for cand in COMPUTE_FALLBACK[d]:
            if cand in self.peak_flops:
                return self.peak_flops[cand]
        raise SpecError(self.path or self.name, "peak_tflops", f"no rate usable for {d}",
                        "add a bf16 or fp32 entry")

    def summary(self) -> dict:
        """The main figures, for listings and JSON output."""
        return {
            "name": self.name,
            "vendor": self.vendor,
            "kind": self.kind,
            "bf16_tflops": self.peak_flops.get("bf16", self.peak_flops.get("fp16", 0.0)) / 1e12,
            "fp8_tflops": self.peak_flops.get("fp8", 0.0) / 1e12,
            "memory_gb": self.mem_capacity / 1e9,
            "memory_bw_gbs": self.mem_bandwidth / 1e9,
            "scale_up_gbs": self.scale_up.bandwidth / 1e9,
            "tdp_w": self.tdp,
            "price_per_hour": self.price_per_hour,
        }


@dataclass(frozen=True)
class Node:
    """Devices in one box sharing a scale-up domain and host memory."""

    device: Device
    num_devices: int

    @property
    def link(self) -> Link:
        return self.device.scale_up


@dataclass(frozen=True)
class Cluster:
    """Nodes joined by the scale-out network."""

    node: Node
    num_nodes: int
    network: Link | None = None

    @property
    def num_devices(self) -> int:
        return self.node.num_devices * self.num_nodes

    @property
    def scale_out(self) -> Link:
        return self.network or self.node.device.scale_out

    def link_between(self, group_size: int) -> Link:
        """The link that a collective over `group_size` devices is limited by."""
        if group_size <= min(self.node.num_devices, self.node.device.scale_up.domain_size):
            return self.node.device.scale_up
        return self.scale_out


def _link(f: Fields | None, where: str, key: str) -> Link:
    if f is None:
        raise SpecError(where, key, "missing", f"add a [{key}] table with bandwidth_gbs and latency_us")
    link = Link(
        name=f.string("name", ""),
        bandwidth=f.number("bandwidth_gbs", positive=True) * 1e9,
        latency=f.number("latency_us") * 1e-6,
        domain_size=f.number("domain_size", 1, integer=True, positive=True),
    )
    f.check_unknown({"name", "bandwidth_gbs", "latency_us", "domain_size", "notes"})
    return link


def parse_device(data: dict, where: str) -> Device:
    """Validate a device mapping (as read from a spec file) into a Device."""
    f = Fields(data, where)
    name = f.string("name")
    peak = f.table("peak_tflops")
    peak_flops: dict[str, float] = {}
    for k in list(peak.data):
        if k not in FLOP_DTYPES:
            raise SpecError(where, f"peak_tflops.{k}", "unknown numeric format",
                            f"use one of {', '.join(FLOP_DTYPES)}")
        peak_flops[k] = peak.number(k, positive=True) * 1e12
    if not any(k in peak_flops for k in ("bf16", "fp16", "fp32")):
        raise SpecError(where, "peak_tflops", "needs at least one of bf16, fp16, fp32",
                        "add bf16 = <dense TFLOP/s>")
    tiers = []
    for t in f.tables("memory"):
        tiers.append(MemoryTier(
            name=t.string("name"),
            level=t.string("level", choices=MEMORY_LEVELS),
            capacity=t.number("capacity_gb", positive=True) * 1e9,
            bandwidth=t.number("bandwidth_gbs", positive=True) * 1e9,
            latency=t.number("latency_us", 0.0) * 1e-6,
            shared_by=t.number("shared_by", 1, integer=True, positive=True),
            link=t.string("link", ""),
        ))
        t.check_unknown({"name", "level", "capacity_gb", "bandwidth_gbs", "latency_us", "shared_by",
                         "link", "notes"})
    n_dev = sum(t.level == "device" for t in tiers)
    if n_dev != 1:
        raise SpecError(where, "memory", f"{n_dev} tiers have level = \"device\"",
                        "mark exactly one tier (the one holding weights and KV) as level = \"device\"")
    order = [MEMORY_LEVELS.index(t.level) for t in tiers]
    if order != sorted(order):
        raise SpecError(where, "memory", "tiers are not ordered closest first",
                        f"list tiers in the order {', '.join(MEMORY_LEVELS)}")
    tdp = f.number("tdp_w", positive=True)
    node = f.table("node", {})
    dev = Device(
        name=name,
        vendor=f.string("vendor", choices=VENDORS),
        kind=f.string("kind", choices=DEVICE_KINDS),
        peak_flops=peak_flops,
        memory=tuple(tiers),
        scale_up=_link(f.table("scale_up", None), where, "scale_up"),
        scale_out=_link(f.table("scale_out", None), where, "scale_out"),
        tdp=tdp,
        idle_power=f.number("idle_w", 0.3 * tdp),
        price_per_hour=f.number("price_per_hour_usd"),
        devices_per_node=node.number("devices", 1, integer=True, positive=True) if node else 1,
        aliases=tuple(f.strings("aliases", [])),
        sources=tuple(f.strings("sources")),
        notes=f.string("notes", ""),
        path=where,
    )
    if node:
        node.check_unknown({"devices", "host_cpu", "notes"})
    f.raw("price_source", "")
    f.raw("form_factor", "")
    f.check_unknown()
    if not dev.sources:
        raise SpecError(where, "sources", "no public source cited", "add the datasheet URL(s)")
    return dev


def load_device_file(path: str | Path) -> Device:
    """Load one device spec file."""
    return parse_device(read_spec_file(path), str(path))
