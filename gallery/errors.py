"""How bad input is reported: every violation names the file, the column or key, and the fix."""
from __future__ import annotations

import reprlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Violation:
    file: str
    where: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.problem}\n    fix: {self.fix}"


class UserError(Exception):
    """A problem with what the user asked for or gave: reported as its message, never a traceback."""


class ContractError(UserError):
    """Inputs break the data contract; carries every violation found."""

    def __init__(self, violations: list[Violation]):
        self.violations = list(violations)
        super().__init__(str(self))

    def __str__(self) -> str:
        n = len(self.violations)
        lines = [f"{n} data-contract violation{'s' if n != 1 else ''} (see data_contracts/ and docs/bad-input.md):"]
        lines += [f"- {v}" for v in self.violations]
        return "\n".join(lines)


def excerpt(value, limit: int = 80, quote: bool = True) -> str:
    """A value for a message, cut to about `limit` characters: a message never carries a whole (huge,
    deeply nested or self-referencing) value, and making it costs a bounded walk (reprlib)."""
    if not quote:
        text = str(value)
        return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
    bounded = reprlib.Repr()
    bounded.maxstring = bounded.maxother = limit
    bounded.maxlevel = 3
    text = bounded.repr(value)
    return text if len(text) <= 2 * limit else text[:2 * limit] + "..."


def example(items, limit: int = 5) -> str:
    """First few offending values for a message, with how many more there are."""
    items = list(items)
    shown = ", ".join(excerpt(i) for i in items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")
