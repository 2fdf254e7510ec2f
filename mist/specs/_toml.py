"""Reading spec files (TOML or YAML) into plain dicts, with errors that name the file."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """Parse a .toml, .yaml/.yml or .json file into a dict; syntax errors name the file."""
    p = Path(path)
    if not p.exists():
        raise SpecError(str(p), "<file>", "file does not exist", "check the path")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise SpecError(str(p), "<file>", f"unsupported extension '{p.suffix}'",
                            "use .toml, .yaml, .yml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
        raise SpecError(str(p), "<syntax>", f"cannot parse: {e}", "fix the file's syntax") from None
    if not isinstance(data, dict):
        raise SpecError(str(p), "<file>", "top level is not a table/mapping", "write key = value pairs")
    return data


class Fields:
    """Typed access to a spec mapping; every failure names the file and the dotted field."""

    def __init__(self, data: dict[str, Any], where: str, prefix: str = ""):
        self.data = data
        self.where = where
        self.prefix = prefix
        self.used: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise SpecError(self.where, self._name(key), "missing", f"add '{key} = ...'")
            return default
        return self.data[key]

    def number(self, key: str, default: Any = ..., *, minimum: float | None = 0.0,
               positive: bool = False, integer: bool = False) -> float:
        v = self.raw(key, default)
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SpecError(self.where, self._name(key), f"expected a number, got {v!r}",
                            "write a plain number without units or quotes")
        if integer and int(v) != v:
            raise SpecError(self.where, self._name(key), f"expected an integer, got {v!r}",
                            "write a whole number")
        if positive and not v > 0:
            raise SpecError(self.where, self._name(key), f"must be > 0, got {v!r}",
                            "give a positive value")
        if minimum is not None and v < minimum:
            raise SpecError(self.where, self._name(key), f"must be >= {minimum}, got {v!r}",
                            "give a non-negative value")
        return int(v) if integer else float(v)

    def string(self, key: str, default: Any = ..., choices: tuple[str, ...] | None = None) -> str:
        v = self.raw(key, default)
        if v is None:
            return v
        if not isinstance(v, str):
            raise SpecError(self.where, self._name(key), f"expected a string, got {v!r}",
                            "quote the value")
        if choices is not None and v.lower() not in choices:
            raise SpecError(self.where, self._name(key), f"'{v}' is not one of {', '.join(choices)}",
                            f"use one of {', '.join(choices)}")
        return v.lower() if choices is not None else v

    def strings(self, key: str, default: Any = ...) -> list[str]:
        v = self.raw(key, default)
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise SpecError(self.where, self._name(key), f"expected a list of strings, got {v!r}",
                            'write ["a", "b"]')
        return list(v)

    def table(self, key: str, default: Any = ...) -> "Fields | None":
        v = self.raw(key, default)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise SpecError(self.where, self._name(key), f"expected a table, got {v!r}",
                            f"write [{self._name(key)}] with key = value lines")
        return Fields(v, self.where, f"{self._name(key)}.")

    def tables(self, key: str, default: Any = ...) -> list["Fields"]:
        v = self.raw(key, default)
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            raise SpecError(self.where, self._name(key), "expected a list of tables",
                            f"write one [[{self._name(key)}]] block per entry")
        return [Fields(x, self.where, f"{self._name(key)}[{i}].") for i, x in enumerate(v)]

    def check_unknown(self, allowed: set[str] | None = None) -> None:
        """Reject keys that nothing reads: a typo must not silently become a default."""
        allowed = self.used if allowed is None else allowed
        for k in self.data:
            if k not in allowed:
                close = [a for a in allowed if a.replace("_", "") == k.replace("_", "").lower()]
                fix = f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(sorted(allowed))}"
                raise SpecError(self.where, self._name(k), "unknown field", fix)
