"""Training metrics: console, a JSONL file and TensorBoard event files (process 0 writes), plus MFU."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

import jax
from absl import logging
from etils import epath

from cm3jax.storage import PathLike, atomic_write_text, cache_folder, is_remote, upload_tree

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
    """Writes scalar metrics by step; only process 0 writes files.

    The files are written to a local folder: the log folder itself, or for a bucket (whose objects cannot be
    appended to) a local copy that is uploaded at most every `upload_every_s` seconds, at `sync()` (the training
    loop calls it after each checkpoint, so a resumed run finds every row up to its checkpoint) and at `close()`."""

    def __init__(self, log_dir: PathLike, resumed_step: int = 0, total_steps: int | None = None,
                 upload_every_s: float = 60.0):
        """`resumed_step`: the step the run starts from; rows of metrics.jsonl past it (written by an earlier
        attempt after its last checkpoint) are dropped, so a resumed run's log reads like an unbroken run's."""
        self._enabled = jax.process_index() == 0
        self._tensorboard = None
        self._jsonl = None
        self._total = total_steps
        self._upload_every_s = upload_every_s
        self._remote = None
        if self._enabled:
            log_dir = epath.Path(log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
            local = log_dir
            if is_remote(log_dir):
                self._remote, local = log_dir, _fresh_local_copy(log_dir)
            self._local = local
            self._last_upload = time.monotonic()
            from tensorboardX import SummaryWriter

            self._jsonl = JsonLines(local / "metrics.jsonl", keep_through_step=resumed_step)
            # TensorBoard hides the earlier attempt's events from purge_step on.
            self._tensorboard = SummaryWriter(os.fspath(local), purge_step=resumed_step + 1)

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train", note: str = "") -> None:
        """Logs the scalars; `note` (e.g. the time left) goes to the console line only."""
        if not self._enabled:
            return
        text = " ".join(f"{k}={_format(v)}" for k, v in scalars.items())
        logging.info("[%s] step %d: %s", prefix, step, text)
        where = f"{step}/{self._total}" if self._total else f"{step}"
        print(f"[{prefix}] step {where}: {text}{note}", flush=True)
        self._jsonl.append(json.dumps({"step": step, "split": prefix, **{k: float(v) for k, v in scalars.items()}}))
        for key, value in scalars.items():
            self._tensorboard.add_scalar(f"{prefix}/{key}", float(value), step)
        self._tensorboard.flush()
        if time.monotonic() - self._last_upload >= self._upload_every_s:
            self.sync()

    def sync(self) -> None:
        """Uploads the log files to the bucket (nothing to do for a local log folder)."""
        if self._enabled and self._remote is not None:
            upload_tree(self._local, self._remote)
            self._last_upload = time.monotonic()

    def close(self) -> None:
        if self._enabled:
            self._tensorboard.close()
            self._jsonl.close()
            self.sync()


def _fresh_local_copy(remote_log_dir: epath.Path) -> epath.Path:
    """An empty local folder for a bucket's log folder, holding the bucket's metrics.jsonl (earlier attempts'
    event files stay where they are: each attempt writes its own)."""
    local = epath.Path(cache_folder(remote_log_dir, "logs"))
    if local.exists():
        local.rmtree()
    local.mkdir(parents=True)
    rows = remote_log_dir / "metrics.jsonl"
    if rows.exists():
        rows.copy(local / "metrics.jsonl")
    return local


class JsonLines:
    """A local metrics.jsonl, appended to row by row. Rows of a step past `keep_through_step` (an earlier
    attempt's, after its last checkpoint) are dropped at open (whole or not at all)."""

    def __init__(self, path: epath.Path, keep_through_step: int):
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        kept = [line for line in lines if line.strip() and _row_step(line) <= keep_through_step]
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(kept))
        self._file = open(path, "a", encoding="utf-8")

    def append(self, row: str) -> None:
        self._file.write(row + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a row cut short by a kill: dropped with the rows after it
        return float("inf")


def _format(value: float) -> str:
    value = float(value)
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
