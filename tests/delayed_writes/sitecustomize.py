"""Imported at start-up by the `cm3jax` processes of a multi-process test that puts this folder on PYTHONPATH: the
process whose `--config.distributed.process_id` is $CM3JAX_TEST_DELAYED_PROCESS writes every file that goes through
cm3jax.storage's atomic writes two seconds late. A step that relies on another process having written its files,
without a barrier between them, then fails every time instead of once in a while on a loaded machine."""
import os
import sys
import time

_DELAYED = os.environ.get("CM3JAX_TEST_DELAYED_PROCESS")
if _DELAYED is not None and f"--config.distributed.process_id={_DELAYED}" in sys.argv:
    from cm3jax import storage

    _write_now = storage.atomic_write_bytes

    def _write_late(path, data):
        time.sleep(2.0)
        _write_now(path, data)

    storage.atomic_write_bytes = _write_late
