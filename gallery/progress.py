"""Progress lines for long steps (items/s and ETA), written as plain lines so step logs stay readable."""
from __future__ import annotations

import time


class Progress:
    def __init__(self, total: int, what: str, unit: str = "items", log=print, every_s: float = 10.0):
        self.total, self.what, self.unit, self.log, self.every_s = total, what, unit, log, every_s
        self.done = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int, extra="") -> None:
        """Count n more; `extra` (text, or a function giving it) is only evaluated when a line is printed,
        so a training loop can report its loss without a device synchronisation every step."""
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            self.log(self.line(extra() if callable(extra) else extra))

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def line(self, extra: str = "") -> str:
        eta = (self.total - self.done) / self.rate if self.rate > 0 else float("nan")
        return (f"{self.what}: {self.done}/{self.total} {self.unit} "
                f"({self.rate:,.0f} {self.unit}/s, ETA {eta:,.0f}s){' ' + extra if extra else ''}")
