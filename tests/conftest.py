"""Every test process sees 8 CPU devices, so sharded code runs here exactly as on an 8-chip host.

Every program the session compiles, in this process and in the `cm3jax` commands tests start (which inherit the
environment), goes to one on-disk compilation cache: the same tiny recipes are compiled by many tests. The size limit
turns on JAX's file lock, so the two processes of a multi-host test never read an entry while it is being written."""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="cm3jax-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30))

import pytest  # noqa: E402


@pytest.fixture
def tiny_config():
    from configs import tiny

    return tiny.get_config()


def built_once(tmp_path_factory, name: str, build) -> str:
    """The folder `name`, made by `build(folder)` once for the whole run: with pytest-xdist the first worker that asks
    builds it while the others wait for it, then all share it (tests change only copies)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of one run
    folder, done = root / name, root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return str(folder)


def _build_tiny_vqgan_run(workdir) -> None:
    import jax

    from cm3jax.data.embedded import build_embedded
    from cm3jax.train.vqgan import train_vqgan
    from configs import tiny

    build_embedded("digits", str(workdir / "data"))
    config = tiny.get_config()
    config.vqgan.train.steps = 2
    train_vqgan(config, str(workdir / "vqgan"), str(workdir / "data"), jax.devices()[:2])


@pytest.fixture(scope="session")
def tiny_vqgan_run(tmp_path_factory):
    """DIR with the digits dataset (DIR/data) and a tiny VQ-GAN trained for 2 steps on two devices (DIR/vqgan), built
    once per run; tests that change it work on a copy (helpers.copy_run)."""
    import pathlib

    return pathlib.Path(built_once(tmp_path_factory, "tiny_vqgan_run", _build_tiny_vqgan_run))


def _build_tiny_pipeline_run(workdir) -> None:
    from cm3jax.pipeline import run_pipeline
    from cm3jax.workdir import Workdir

    from helpers import tiny_pipeline_config

    assert run_pipeline(tiny_pipeline_config(), Workdir(str(workdir)))


@pytest.fixture(scope="session")
def tiny_pipeline_run(tmp_path_factory):
    """DIR after the whole tiny pipeline (helpers.tiny_pipeline_config), unbroken, on a local disk; built once per
    run, changed only on copies."""
    return built_once(tmp_path_factory, "tiny_pipeline_run", _build_tiny_pipeline_run)
