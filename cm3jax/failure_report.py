"""What the command line keeps of an unexpected exception: its traceback in a file (for a bug report), and one line
for the terminal that names the exception and that file."""
from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import traceback

from etils import epath

from cm3jax.storage import atomic_write_text

SUMMARY_CHARS = 300


def one_line_summary(error: BaseException) -> str:
    """`Type: first line of the message`, shortened to SUMMARY_CHARS."""
    lines = str(error).strip().splitlines()
    summary = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return summary if len(summary) <= SUMMARY_CHARS else summary[:SUMMARY_CHARS - 3] + "..."


def write_traceback(error: BaseException, folder: epath.Path, command: list[str]) -> str:
    """Writes this process's command line, versions and the full traceback of `error` to a new file in `folder`
    named after `command` (e.g. ["generate", "image"]), or, where that cannot be written, to the system's temporary
    folder; returns its path."""
    import jax

    text = "".join([
        f"command: {' '.join(sys.argv)}\n",
        f"time: {time.strftime('%Y-%m-%dT%H:%M:%S')}\n",
        f"python {platform.python_version()}, jax {jax.__version__}, {platform.platform()}\n\n",
        *traceback.format_exception(error),
    ])
    name = f"{'-'.join(command) or 'cm3jax'}-{time.strftime('%Y%m%d-%H%M%S')}-pid{os.getpid()}.txt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        atomic_write_text(path, text)
        return os.fspath(path)
    except Exception:  # the report must not hide the error it reports (a full disk, a lost bucket)
        fallback = os.path.join(tempfile.gettempdir(), f"cm3jax-{name}")
        with open(fallback, "w", encoding="utf-8") as f:
            f.write(text)
        return fallback
