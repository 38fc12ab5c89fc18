"""Where a run's files live: a local folder or a bucket (gs://...) that every host reads, through one abstraction.

Every file of a run is read and written through `etils.epath` (as orbax and TFDS do), so no stage falls back to
`open`/`os` on a workdir that is not local. Three libraries write and read local files only (ArrayRecord, TFDS's
builders and ScaNN's serializer): they write into a local staging folder that is uploaded when they finish
(`staged_dir`, `staged_file`), and read a local mirror of a remote folder (`local_mirror`), kept under
$CM3JAX_CACHE (default ~/.cache/cm3jax) and refreshed where an object was rewritten (its generation, checksum or
modification time changed, not only its size).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from etils import epath

PathLike = str | os.PathLike
CACHE_ENV = "CM3JAX_CACHE"


def is_remote(path: PathLike) -> bool:
    """True for a `scheme://` store (gs://, s3://, ...), where files are objects: no append, no local handle."""
    return "://" in os.fspath(path)


def absolute_path(path: PathLike) -> epath.Path:
    """A bucket path as it is; a local one with `~` expanded and made absolute against the current directory, once,
    so that no library sees a relative path (orbax and tensorstore refuse one; a subprocess may run elsewhere)."""
    path = os.fspath(path)
    if is_remote(path):
        return epath.Path(path)
    return epath.Path(os.path.abspath(os.path.expanduser(path)))


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Readers see the old file or the whole new one, never a part. An object store gives this for one write; a
    local folder gets a temporary name, fsync and rename."""
    path = epath.Path(path)
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_arrays(path: PathLike, **arrays: np.ndarray) -> None:
    """One array (`array=`) as .npy, several as .npz; the file exists only once it is whole."""
    buffer = io.BytesIO()
    if len(arrays) == 1 and "array" in arrays:
        np.save(buffer, arrays["array"])
    else:
        np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_arrays(path: PathLike) -> Any:
    """What save_arrays wrote: an array for .npy, a mapping of arrays for .npz (no pickles)."""
    return np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False)


def save_png(path: PathLike, image: np.ndarray) -> None:
    """A uint8 [H, W, 3] (or [H, W]) array as a PNG file."""
    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def files_digest(*paths: PathLike) -> str | None:
    """sha256 of the contents of the files among `paths` that exist (None when none does)."""
    digest, found = hashlib.sha256(), False
    for path in map(epath.Path, paths):
        if path.exists():
            found = True
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest() if found else None


def arrays_digest(tree: Any) -> str:
    """sha256 of every array of a pytree (e.g. a model's parameters), in tree order."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(jax.device_get(tree)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def upload_tree(local: PathLike, destination: PathLike) -> None:
    """Copies every file under the local folder to the same relative path under destination."""
    destination = epath.Path(destination)
    for root, _, names in os.walk(local):
        relative = os.path.relpath(root, local)
        target = destination if relative == "." else destination / relative
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            epath.Path(os.path.join(root, name)).copy(target / name, overwrite=True)


@contextlib.contextmanager
def staged_dir(destination: PathLike) -> Iterator[str]:
    """A local folder for a library that writes local files only; its files reach `destination` when the block
    ends without an error. For a local destination this is the destination itself."""
    if not is_remote(destination):
        os.makedirs(destination, exist_ok=True)
        yield os.fspath(destination)
        return
    with tempfile.TemporaryDirectory(prefix="cm3jax-stage-") as local:
        yield local
        upload_tree(local, destination)


@contextlib.contextmanager
def staged_file(destination: PathLike) -> Iterator[str]:
    """A local path to write one file to; it appears at `destination` whole (upload, or rename) when the block
    ends without an error, and nowhere otherwise."""
    destination = epath.Path(destination)
    if not is_remote(destination):
        tmp = f"{destination}.tmp-{os.getpid()}"
        try:
            yield tmp
            os.replace(tmp, destination)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with tempfile.TemporaryDirectory(prefix="cm3jax-stage-") as local:
        tmp = os.path.join(local, destination.name)
        yield tmp
        epath.Path(tmp).copy(destination, overwrite=True)


def cache_root() -> str:
    return os.fspath(absolute_path(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "cm3jax")))


def cache_folder(remote: PathLike, kind: str = "") -> str:
    """This host's local folder for a remote path (under cache_root(), and its `kind` subfolder when given)."""
    return os.path.join(cache_root(), kind, hashlib.sha256(os.fspath(remote).encode()).hexdigest()[:16])


def local_mirror(source: PathLike) -> str:
    """A local path holding the same files as `source` (a folder or one file), for readers of local files only.
    A local source is returned as it is; a remote one is copied under cache_root(), where only files that are
    missing or whose object was rewritten since (`_object_identity`) are fetched again."""
    source = epath.Path(source)
    if not is_remote(source):
        return os.fspath(source)
    local = os.path.join(cache_folder(source), source.name)
    if not source.exists():
        return local  # nothing to mirror: the reader reports what is missing
    if source.is_dir():
        for remote_file, relative in _files_under(source):
            _fetch(remote_file, os.path.join(local, relative))
    else:
        _fetch(source, local)
    return local


def _files_under(folder: epath.Path) -> list[tuple[epath.Path, str]]:
    """(path, path relative to folder) of every file below `folder`, at any depth (buckets refuse a recursive
    glob)."""
    found = []
    for item in folder.iterdir():
        if item.is_dir():
            found += [(path, f"{item.name}/{relative}") for path, relative in _files_under(item)]
        else:
            found.append((item, item.name))
    return found


def _object_identity(remote_file: epath.Path) -> str:
    """What changes whenever an object is rewritten, also with the same size: its generation (GCS), else a
    checksum or ETag, else its modification time; with its size."""
    import fsspec

    fs, key = fsspec.core.url_to_fs(os.fspath(remote_file))
    info = fs.info(key)
    for field in ("generation", "md5Hash", "crc32c", "ETag", "etag", "mtime", "updated", "LastModified", "created"):
        if info.get(field) is not None:
            return f"{field}={info[field]};size={info.get('size')}"
    return f"size={info.get('size')}"


def _fetch(remote_file: epath.Path, local: str) -> None:
    """Copies `remote_file` to `local` unless the copy there was made from the same object; the object's identity
    is kept outside the mirrored folder (a reader of that folder sees only its files)."""
    identity = _object_identity(remote_file)  # FileNotFoundError when it is gone
    record = os.path.join(cache_root(), "identities", hashlib.sha256(local.encode()).hexdigest())
    if os.path.exists(local) and os.path.exists(record):
        with open(record, encoding="utf-8") as f:
            if f.read() == identity:
                return
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with staged_file(local) as tmp:
        remote_file.copy(epath.Path(tmp), overwrite=True)
    os.makedirs(os.path.dirname(record), exist_ok=True)
    atomic_write_text(record, identity)


def unused_name(folder: PathLike, stem: str) -> epath.Path:
    """folder/stem, or folder/stem-2, -3, ... when that is taken (names made of a time to the second)."""
    folder = epath.Path(folder)
    path, attempt = folder / stem, 1
    while path.exists():
        attempt += 1
        path = folder / f"{stem}-{attempt}"
    return path


def process_partial_folder(destination: PathLike) -> epath.Path:
    """An empty folder `<destination>.partial-<host>-<pid>` to write `destination` in before `replace_folder` names
    it: one per process, so two commands writing the same folder at once (an `eval` of the step a training run is
    scoring) never remove each other's files. On a local disk, the partial folders this host's ended processes left
    (and the unnamed ones of earlier versions) are removed first."""
    destination = epath.Path(destination)
    prefix = f"{destination.name}.partial"
    mine = f"{prefix}-{socket.gethostname()}-"
    if not is_remote(destination) and destination.parent.exists():
        for folder in destination.parent.glob(f"{prefix}*"):
            pid = folder.name[len(mine):] if folder.name.startswith(mine) else ""
            if folder.name == prefix or (pid.isdigit() and not _process_running(int(pid))):
                folder.rmtree()
    folder = destination.parent / f"{mine}{os.getpid()}"
    if folder.exists():
        folder.rmtree()
    folder.mkdir(parents=True)
    return folder


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_folder(new: PathLike, destination: PathLike, keep_replaced: bool) -> epath.Path | None:
    """Gives the whole folder `new` the name `destination`. A folder already there is first moved aside, to
    `<destination>.replaced-<time>`, and removed only once `new` has its name (unless `keep_replaced`), so a crash at
    any point keeps every whole folder. Returns where the earlier folder was kept (None when there was none, or it
    was removed)."""
    new, destination = epath.Path(new), epath.Path(destination)
    replaced = None
    if destination.exists():
        replaced = unused_name(destination.parent, f"{destination.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        move(destination, replaced)
    move(new, destination)
    if replaced is not None and not keep_replaced:
        replaced.rmtree()
        return None
    return replaced


def move(source: PathLike, destination: PathLike) -> None:
    """Renames a file or folder; on an object store this copies and deletes."""
    source, destination = epath.Path(source), epath.Path(destination)
    if not is_remote(source):
        shutil.move(os.fspath(source), os.fspath(destination))
    elif source.is_dir():
        for item, relative in _files_under(source):
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            item.copy(target)
        source.rmtree()
    else:
        source.copy(destination)
        source.unlink()
