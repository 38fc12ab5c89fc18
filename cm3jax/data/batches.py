"""The iterator both input pipelines hand to the training loop: grain batches plus running counters, checkpointable."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class CountingBatches:
    """Iterates a grain dataset of batches; the `counter_keys` entries of each batch (per-example counts of what was
    skipped or cut) are removed from it and added to `counters`. State: grain's iterator state and the counters."""

    def __init__(self, dataset: Iterable[dict], counter_keys: tuple[str, ...]):
        self._iterator = iter(dataset)
        self.counter_keys = counter_keys
        self.counters = dict.fromkeys(counter_keys, 0)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        for key in self.counter_keys:
            self.counters[key] += int(np.sum(batch.pop(key)))
        return batch

    def get_state(self) -> dict:
        return {"iterator": self._iterator.get_state(), "counters": dict(self.counters)}

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state["iterator"])
        self.counters = {key: int(state["counters"].get(key, 0)) for key in self.counter_keys}
