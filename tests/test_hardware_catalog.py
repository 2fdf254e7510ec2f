"""The shipped hardware catalog loads, is internally consistent, and bad spec files fail loudly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mist.specs.errors import SpecError
from mist.specs.hardware import MEMORY_LEVELS, load_device_file

CATALOG = Path(__file__).resolve().parents[1] / "mist" / "catalog" / "hardware"
FILES = sorted(CATALOG.glob("*.toml"))


def _key(name: str) -> str:
    """Same matching key as the catalog lookup: lower case, alphanumerics only."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


@pytest.fixture(scope="module")
def devices():
    return {p.stem: load_device_file(p) for p in FILES}


# ------------------------------------------------------------------ catalog contents

@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_file_loads(path):
    d = load_device_file(path)
    assert d.name
    assert d.mem_capacity > 0
    assert d.device_memory.bandwidth > 0
    assert d.sources, "every entry cites at least one public source"
    assert any(("http" in s) or ("." in s) for s in d.sources)
    assert d.tdp > 0 and 0 <= d.idle_power < d.tdp
    assert d.price_per_hour > 0
    assert d.scale_up.bandwidth > 0 and d.scale_out.bandwidth > 0
    assert d.devices_per_node >= 1
    # tiers closest first, exactly one device tier
    levels = [t.level for t in d.memory]
    assert levels.count("device") == 1
    assert [MEMORY_LEVELS.index(x) for x in levels] == sorted(MEMORY_LEVELS.index(x) for x in levels)
    # a closer tier is not slower than the device tier, a farther one not faster
    dev_i = levels.index("device")
    for i, t in enumerate(d.memory):
        if i < dev_i:
            assert t.bandwidth >= d.mem_bandwidth and t.capacity <= d.mem_capacity
        if i > dev_i:
            assert t.bandwidth <= d.mem_bandwidth
    # the file name is the lowercase slug of the entry's name (optionally prefixed by the vendor)
    slug = re.sub(r"[^a-z0-9]+", "-", d.name.lower().replace("+", "plus")).strip("-")
    assert path.stem in (slug, f"{d.vendor}-{slug}"), (path.stem, slug)


def test_price_source_is_stated():
    import tomllib
    for p in FILES:
        data = tomllib.loads(p.read_text())
        assert data.get("price_source"), f"{p.name}: say where the price comes from"


def test_catalog_size(devices):
    assert len(devices) >= 26


def test_names_and_aliases_are_unique(devices):
    owner: dict[str, str] = {}
    raw: dict[str, str] = {}
    for stem, d in devices.items():
        for alias in d.aliases:
            low = alias.lower()
            assert raw.setdefault(low, d.name) == d.name, f"alias {alias!r} used by {raw[low]} and {d.name}"
        for k in {_key(x) for x in (d.name, stem, *d.aliases)}:
            assert owner.setdefault(k, d.name) == d.name, f"key {k!r} matches both {owner[k]} and {d.name}"
    names = [d.name.lower() for d in devices.values()]
    assert len(names) == len(set(names))


def test_required_entries_present(devices):
    required = {
        "h100-sxm", "a100-sxm-40gb", "a100-sxm-80gb", "h100-pcie", "h200-sxm", "gh200", "b200", "gb200", "gb300",
        "l40s", "a40", "mi250x", "mi210", "mi300x", "mi325x", "mi350x", "mi355x", "tpu-v5e", "tpu-v5p", "tpu-v6e",
        "tpu-v7", "gaudi2", "gaudi3", "arc-pro-b60", "groq-lpu", "cerebras-cs-3", "sambanova-sn40l", "etched-sohu",
        "xeon-platinum-8480plus", "xeon-6980p", "grace", "epyc-9654",
    }
    assert required <= set(devices)


def test_vendor_and_kind_spread(devices):
    vendors = {d.vendor for d in devices.values()}
    assert {"nvidia", "amd", "google", "intel", "groq", "cerebras", "sambanova", "etched"} <= vendors
    cpus = [d for d in devices.values() if d.kind == "cpu"]
    assert len(cpus) >= 4
    for c in cpus:
        assert c.tier("onchip") is not None  # L3
        assert "DDR" in c.device_memory.name or "LPDDR" in c.device_memory.name


def test_spot_values(devices):
    h100 = devices["h100-sxm"]
    assert h100.flops("bf16") == pytest.approx(989.4e12)
    assert h100.mem_capacity == pytest.approx(80e9)
    mi300x = devices["mi300x"]
    assert mi300x.mem_capacity == pytest.approx(192e9)
    assert mi300x.mem_bandwidth == pytest.approx(5.3e12)
    h200 = devices["h200-sxm"]
    assert h200.mem_capacity == pytest.approx(141e9) and h200.mem_bandwidth == pytest.approx(4.8e12)
    assert h200.price_per_hour == pytest.approx(6.31)
    assert devices["b200"].price_per_hour == pytest.approx(8.60)
    gb300 = devices["gb300"]
    assert gb300.mem_capacity == pytest.approx(288e9)
    assert gb300.flops("fp4") == pytest.approx(15e15)
    assert gb300.price_per_hour == pytest.approx(12)
    assert devices["mi350x"].price_per_hour == pytest.approx(7.5)
    assert devices["mi355x"].price_per_hour == pytest.approx(9.5)
    assert devices["tpu-v6e"].price_per_hour == pytest.approx(3)
    assert devices["tpu-v7"].price_per_hour == pytest.approx(8)
    assert devices["etched-sohu"].price_per_hour == pytest.approx(12)
    assert devices["a100-sxm-80gb"].mem_bandwidth == pytest.approx(2039e9)
    assert devices["tpu-v5e"].flops("bf16") == pytest.approx(197e12)
    assert devices["tpu-v6e"].scale_up.domain_size == 256
    # L40S has no NVLink: scale-up is PCIe
    assert "pcie" in devices["l40s"].scale_up.name.lower()
    # GH200: Grace memory reached over NVLink-C2C at 450 GB/s per direction
    host = devices["gh200"].tier("host")
    assert host.capacity == pytest.approx(480e9) and host.bandwidth == pytest.approx(450e9)
    # SRAM-only chips hold weights in SRAM
    assert devices["groq-lpu"].mem_capacity == pytest.approx(0.23e9)
    assert devices["groq-lpu"].mem_bandwidth == pytest.approx(80e12)
    assert devices["cerebras-cs-3"].mem_capacity == pytest.approx(44e9)
    sn = devices["sambanova-sn40l"]
    assert sn.tier("onchip").capacity == pytest.approx(0.52e9)
    assert sn.mem_capacity == pytest.approx(64e9)
    assert sn.tier("host").capacity == pytest.approx(1536e9)
    # the projected ASIC says so
    assert "projected" in devices["etched-sohu"].notes.lower()
    # fp8 falls back to a real rate everywhere, and no table lists sparse figures (bf16 <= 2.6 PF per GPU)
    for d in devices.values():
        assert d.flops("fp8") > 0
        if d.kind == "gpu":
            assert d.flops("bf16") <= 2.6e15


def test_lookup_by_alias():
    from mist.specs.catalog import get_hardware

    assert get_hardware("a100").name == "A100-SXM-80GB"
    assert get_hardware("H200_SXM").name == "H200-SXM"
    assert get_hardware("trillium").name == "TPU-v6e"
    assert get_hardware("mi300x").name == "MI300X"
    assert get_hardware("sapphire-rapids").kind == "cpu"


# ------------------------------------------------------------------ malformed files

GOOD = CATALOG / "h100-sxm.toml"


def _write(tmp_path: Path, text: str, name: str = "bad.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _expect(path: Path, field: str) -> SpecError:
    with pytest.raises(SpecError) as ei:
        load_device_file(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    assert field in msg, msg
    return ei.value


def test_good_copy_loads(tmp_path):
    p = _write(tmp_path, GOOD.read_text())
    assert load_device_file(p).name == "H100-SXM"


def test_missing_field(tmp_path):
    text = re.sub(r"(?m)^tdp_w = .*\n", "", GOOD.read_text())
    e = _expect(_write(tmp_path, text), "tdp_w")
    assert e.field == "tdp_w"


def test_missing_sources(tmp_path):
    text = re.sub(r"(?ms)^sources = \[.*?\]\n", "", GOOD.read_text())
    _expect(_write(tmp_path, text), "sources")


def test_unknown_top_level_field(tmp_path):
    text = GOOD.read_text().replace("tdp_w = 700", "tdp_w = 700\nmax_clock_ghz = 1.98", 1)
    e = _expect(_write(tmp_path, text), "max_clock_ghz")
    assert "unknown" in e.problem


def test_unknown_field_in_memory_tier(tmp_path):
    text = GOOD.read_text().replace("capacity_gb = 80\n", "capacity_gb = 80\nbandwith_gbs = 3350\n", 1)
    _expect(_write(tmp_path, text), "bandwith_gbs")


def test_unknown_dtype(tmp_path):
    text = GOOD.read_text().replace("int8 = 1978.9", "int8 = 1978.9\nfp8_sparse = 3957.8", 1)
    _expect(_write(tmp_path, text), "peak_tflops.fp8_sparse")


def test_negative_bandwidth(tmp_path):
    text = GOOD.read_text().replace("bandwidth_gbs = 3350", "bandwidth_gbs = -3350", 1)
    e = _expect(_write(tmp_path, text), "bandwidth_gbs")
    assert "memory[1]" in e.field


def test_negative_link_bandwidth(tmp_path):
    text = GOOD.read_text().replace("bandwidth_gbs = 450 ", "bandwidth_gbs = -450 ", 1)
    _expect(_write(tmp_path, text), "scale_up.bandwidth_gbs")


def test_two_device_tiers(tmp_path):
    text = GOOD.read_text().replace('name = "host DRAM"\nlevel = "host"', 'name = "host DRAM"\nlevel = "device"', 1)
    e = _expect(_write(tmp_path, text), "memory")
    assert "2 tiers" in e.problem


def test_no_device_tier(tmp_path):
    text = GOOD.read_text().replace('name = "HBM3"\nlevel = "device"', 'name = "HBM3"\nlevel = "host"', 1)
    _expect(_write(tmp_path, text), "memory")


def test_tiers_out_of_order(tmp_path):
    text = GOOD.read_text().replace('name = "SMEM/L1"\nlevel = "onchip"', 'name = "SMEM/L1"\nlevel = "local_ssd"', 1)
    _expect(_write(tmp_path, text), "memory")


def test_bad_vendor_and_kind(tmp_path):
    _expect(_write(tmp_path, GOOD.read_text().replace('vendor = "nvidia"', 'vendor = "nvidai"', 1)), "vendor")
    _expect(_write(tmp_path, GOOD.read_text().replace('kind = "gpu"', 'kind = "fpga"', 1), "b.toml"), "kind")


def test_string_where_number_expected(tmp_path):
    text = GOOD.read_text().replace("tdp_w = 700", 'tdp_w = "700 W"', 1)
    _expect(_write(tmp_path, text), "tdp_w")


def test_syntax_error_names_file(tmp_path):
    p = _write(tmp_path, GOOD.read_text().replace('name = "H100-SXM"', 'name = "H100-SXM', 1))
    with pytest.raises(SpecError) as ei:
        load_device_file(p)
    assert str(p) in str(ei.value)
