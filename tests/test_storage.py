"""cm3jax/storage.py on a local disk (tests/test_cloud_workdir.py runs the same code against a bucket)."""
import os

import numpy as np
import pytest

from cm3jax import storage


def test_a_staged_file_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "shard.bin"
    with pytest.raises(RuntimeError):
        with storage.staged_file(target) as local:
            with open(local, "wb") as f:
                f.write(b"half")
            raise RuntimeError("killed while writing")
    assert os.listdir(tmp_path) == []
    with storage.staged_file(target) as local:
        with open(local, "wb") as f:
            f.write(b"whole")
        assert not target.exists()
    assert target.read_bytes() == b"whole" and os.listdir(tmp_path) == ["shard.bin"]


def test_atomic_writes_replace_a_file_and_leave_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    storage.atomic_write_text(path, "old")
    storage.atomic_write_text(path, "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["config.json"]


def test_arrays_round_trip_as_npy_and_npz(tmp_path):
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    storage.save_arrays(tmp_path / "ids.npy", array=ids)
    storage.save_arrays(tmp_path / "bank.npz", vectors=ids.astype(np.float32), multimodal=np.array([True, False]))
    np.testing.assert_array_equal(storage.load_arrays(tmp_path / "ids.npy"), ids)
    bank = storage.load_arrays(tmp_path / "bank.npz")
    np.testing.assert_array_equal(bank["multimodal"], [True, False])


def test_a_local_folder_is_its_own_mirror_and_a_url_is_remote(tmp_path):
    assert storage.local_mirror(tmp_path) == str(tmp_path)
    assert storage.is_remote("gs://bucket/run") and not storage.is_remote(tmp_path)


def test_move_carries_a_folder_with_its_files(tmp_path):
    (tmp_path / "4" / "state").mkdir(parents=True)
    (tmp_path / "4" / "state" / "manifest").write_bytes(b"m")
    storage.move(tmp_path / "4", tmp_path / "aside" / "4-then")
    assert (tmp_path / "aside" / "4-then" / "state" / "manifest").read_bytes() == b"m"
    assert not (tmp_path / "4").exists()


def test_replace_folder_moves_the_earlier_folder_aside_before_naming_the_new_one(tmp_path):
    for name in ("new", "out", "newer"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(name)
    kept = storage.replace_folder(tmp_path / "new", tmp_path / "out", keep_replaced=True)
    assert (tmp_path / "out" / "f").read_text() == "new" and (kept / "f").read_text() == "out"
    assert storage.replace_folder(tmp_path / "newer", tmp_path / "out", keep_replaced=False) is None
    assert (tmp_path / "out" / "f").read_text() == "newer" and (kept / "f").read_text() == "out"
    assert sorted(os.listdir(tmp_path)) == sorted(["out", kept.name])


def test_each_process_writes_its_own_partial_folder_and_dead_ones_are_cleared(tmp_path):
    """Two commands writing the same folder at once (an eval of the step a training run is scoring) must not remove
    each other's files; what a finished or killed process left is cleared."""
    import socket
    import subprocess
    import sys

    from cm3jax.storage import process_partial_folder

    destination = tmp_path / "eval" / "lm-200"
    host = socket.gethostname()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / "eval" / f"lm-200.partial-{host}-{int(ended.stdout)}"
    legacy = tmp_path / "eval" / "lm-200.partial"
    alive = tmp_path / "eval" / f"lm-200.partial-{host}-{os.getppid()}"  # another running process's folder
    elsewhere = tmp_path / "eval" / f"lm-200.partial-another-host-{int(ended.stdout)}"  # cannot be checked here
    other = tmp_path / "eval" / f"lm-2000.partial-{host}-{int(ended.stdout)}"  # another destination's
    for folder in (dead, legacy, alive, elsewhere, other):
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text("{}")
    mine = process_partial_folder(destination)
    assert mine.name == f"lm-200.partial-{host}-{os.getpid()}" and list(mine.iterdir()) == []
    assert not dead.exists() and not legacy.exists()
    for kept in (alive, elsewhere, other):
        assert (kept / "metrics.json").exists(), kept
