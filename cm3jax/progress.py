"""Progress lines for long jobs (tokenize, retrieve): one console line per finished unit of work."""
from __future__ import annotations

import time


class Progress:
    """One console line per finished unit of work: done/total, rate, time left."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done, self.start = what, total, 0, time.monotonic()

    def advance(self, detail: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * (self.total - self.done)
        print(f"{self.what}: {self.done}/{self.total} ({self.done / self.total:.0%}) {detail}; "
              f"{elapsed:.0f}s elapsed, ~{left:.0f}s left", flush=True)
