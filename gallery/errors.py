"""How bad input is reported: every violation names the file, the column or key, and the fix."""
from __future__ import annotations

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
        lines = [f"{n} data-contract violation{'s' if n != 1 else ''} (see data_contracts/ and docs/design.md §3):"]
        lines += [f"- {v}" for v in self.violations]
        return "\n".join(lines)


def example(items, limit: int = 5) -> str:
    """First few offending values for a message, with how many more there are."""
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")
