"""Errors raised while reading specs: each names the file, the field and the fix."""

from __future__ import annotations

import difflib
from typing import Iterable


class SpecError(ValueError):
    """A spec (hardware, model, workload, deployment) is malformed or inconsistent.

    The message always names where the problem is (file and field) and what to do about it.
    """

    def __init__(self, where: str, field: str, problem: str, fix: str = ""):
        self.where = where
        self.field = field
        self.problem = problem
        self.fix = fix
        msg = f"{where}: field '{field}': {problem}"
        if fix:
            msg += f" (fix: {fix})"
        super().__init__(msg)


class UnknownNameError(KeyError):
    """A catalog name (model, device) that matches nothing; carries close matches."""

    def __init__(self, kind: str, name: str, candidates: Iterable[str]):
        cands = sorted(set(candidates))
        close = difflib.get_close_matches(name.lower(), [c.lower() for c in cands], n=5, cutoff=0.4)
        lower_to_orig = {c.lower(): c for c in cands}
        self.suggestions = [lower_to_orig[c] for c in close]
        hint = f" Did you mean: {', '.join(self.suggestions)}?" if self.suggestions else ""
        listing = "hardware" if kind == "hardware" else kind + "s"
        super().__init__(f"unknown {kind} '{name}'.{hint} Run `mist {listing}` for the list, "
                         f"or pass a path to your own spec file.")
        self.msg = str(self.args[0])

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.msg
