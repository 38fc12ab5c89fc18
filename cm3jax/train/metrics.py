"""Training metrics: console, a JSONL file and TensorBoard event files (process 0 writes), plus MFU."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
from absl import logging

from cm3jax.workdir import atomic_write_text

# Dense bf16 peak TFLOP/s per device (vendor figures), for MFU when config.train.peak_tflops_per_device is -1.
_PEAK_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0),
    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v4", 275.0),
)


def peak_flops_per_device(device_kind: str, configured_tflops: float) -> float | None:
    """FLOP/s of one device: the configured value if set (> 0), else the table entry for its kind, else None."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    for name, tflops in _PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops * 1e12
    return None


class MetricsWriter:
    """Writes scalar metrics by step; only process 0 writes files."""

    def __init__(self, log_dir: str, resumed_step: int = 0, total_steps: int | None = None):
        """`resumed_step`: the step the run starts from; rows of metrics.jsonl past it (written by an earlier
        attempt after its last checkpoint) are dropped, so a resumed run's log reads like an unbroken run's."""
        self._enabled = jax.process_index() == 0
        self._tensorboard = None
        self._jsonl = None
        self._total = total_steps
        if self._enabled:
            os.makedirs(log_dir, exist_ok=True)
            from tensorboardX import SummaryWriter

            path = os.path.join(log_dir, "metrics.jsonl")
            _drop_rows_after(path, resumed_step)
            # TensorBoard hides the earlier attempt's events from purge_step on.
            self._tensorboard = SummaryWriter(log_dir, purge_step=resumed_step + 1)
            self._jsonl = open(path, "a", encoding="utf-8")

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train", note: str = "") -> None:
        """Logs the scalars; `note` (e.g. the time left) goes to the console line only."""
        if not self._enabled:
            return
        text = " ".join(f"{k}={_format(v)}" for k, v in scalars.items())
        logging.info("[%s] step %d: %s", prefix, step, text)
        where = f"{step}/{self._total}" if self._total else f"{step}"
        print(f"[{prefix}] step {where}: {text}{note}", flush=True)
        self._jsonl.write(json.dumps({"step": step, "split": prefix, **{k: float(v) for k, v in scalars.items()}})
                          + "\n")
        self._jsonl.flush()
        for key, value in scalars.items():
            self._tensorboard.add_scalar(f"{prefix}/{key}", float(value), step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._enabled:
            self._tensorboard.close()
            self._jsonl.close()


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrites the JSON-lines log without rows past `step` (whole or not at all)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and _row_step(line) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a row cut short by a kill: dropped with the rows after it
        return float("inf")


def _format(value: float) -> str:
    value = float(value)
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
