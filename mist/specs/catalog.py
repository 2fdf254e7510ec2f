"""The shipped catalogs (hardware and models) and forgiving, case-insensitive name lookup.

A name may be a catalog name, an alias, a Hugging Face id (`meta-llama/Llama-3.1-8B`), or the
path of a spec file of the user's own. Unknown names get the closest matches suggested.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from .errors import UnknownNameError
from .hardware import Device, load_device_file
from .model import ModelSpec, load_model_file

CATALOG_DIR = Path(__file__).resolve().parents[1] / "catalog"


def normalise(name: str) -> str:
    """Key used for matching: lower case, alphanumerics only (`H100_SXM` == `h100-sxm`)."""
    return re.sub(r"[^a-z0-9.]", "", name.lower()).replace(".", "")


def _index(names: dict[str, list[str]]) -> dict[str, str]:
    idx: dict[str, str] = {}
    for canon, keys in names.items():
        for k in keys:
            idx.setdefault(normalise(k), canon)
    return idx


@cache
def _hardware() -> tuple[dict[str, Device], dict[str, str]]:
    devs: dict[str, Device] = {}
    keys: dict[str, list[str]] = {}
    for p in sorted((CATALOG_DIR / "hardware").glob("*.toml")):
        d = load_device_file(p)
        devs[d.name] = d
        keys[d.name] = [d.name, p.stem, *d.aliases]
    return devs, _index(keys)


@cache
def _models() -> tuple[dict[str, Path], dict[str, str]]:
    import json

    files: dict[str, Path] = {}
    keys: dict[str, list[str]] = {}
    for p in sorted((CATALOG_DIR / "models").glob("*.json")):
        meta = json.loads(p.read_text()).get("_mist", {})
        name = meta.get("name", p.stem)
        files[name] = p
        hf = meta.get("hf_id", "")
        keys[name] = [name, p.stem, hf, hf.split("/")[-1], *meta.get("aliases", [])]
    return files, _index(keys)


def hardware_names() -> list[str]:
    return list(_hardware()[0])


def model_names() -> list[str]:
    return list(_models()[0])


def get_hardware(name: str | Device) -> Device:
    """A device by catalog name, alias or spec-file path."""
    if isinstance(name, Device):
        return name
    p = Path(name)
    if p.suffix in (".toml", ".yaml", ".yml", ".json") and p.exists():
        return load_device_file(p)
    devs, idx = _hardware()
    key = normalise(name)
    if key in idx:
        return devs[idx[key]]
    raise UnknownNameError("hardware", name, list(devs) + [a for d in devs.values() for a in d.aliases])


@cache
def _load_model_cached(path: str) -> ModelSpec:
    return load_model_file(path)


def get_model(name: str | ModelSpec) -> ModelSpec:
    """A model by catalog name, alias, Hugging Face id, or path of a config.json."""
    if isinstance(name, ModelSpec):
        return name
    p = Path(name)
    if (p.suffix == ".json" and p.exists()) or (p.is_dir() and (p / "config.json").exists()):
        return load_model_file(p)
    files, idx = _models()
    key = normalise(name)
    if key not in idx and "/" in name:
        key = normalise(name.split("/")[-1])
    if key in idx:
        return _load_model_cached(str(files[idx[key]]))
    raise UnknownNameError("model", name, list(files))


def all_hardware() -> list[Device]:
    return list(_hardware()[0].values())


def all_models() -> list[ModelSpec]:
    files, _ = _models()
    return [_load_model_cached(str(p)) for p in files.values()]
