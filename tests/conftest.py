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


@pytest.fixture(scope="session")
def tiny_vqgan_run(tmp_path_factory):
    """DIR with the digits dataset (DIR/data) and a tiny VQ-GAN trained for 2 steps on two devices (DIR/vqgan), built
    once per session; tests that change it work on a copy (helpers.copy_run)."""
    import jax

    from cm3jax.data.embedded import build_embedded
    from cm3jax.train.vqgan import train_vqgan
    from configs import tiny

    workdir = tmp_path_factory.mktemp("tiny_vqgan_run")
    build_embedded("digits", str(workdir / "data"))
    config = tiny.get_config()
    config.vqgan.train.steps = 2
    train_vqgan(config, str(workdir / "vqgan"), str(workdir / "data"), jax.devices()[:2])
    return workdir


@pytest.fixture(scope="session")
def tiny_pipeline_run(tmp_path_factory):
    """DIR after the whole tiny pipeline (helpers.tiny_pipeline_config), unbroken, on a local disk; built once per
    session, changed only on copies."""
    from cm3jax.pipeline import run_pipeline
    from cm3jax.workdir import Workdir

    from helpers import tiny_pipeline_config

    workdir = str(tmp_path_factory.mktemp("tiny_pipeline_run"))
    assert run_pipeline(tiny_pipeline_config(), Workdir(workdir))
    return workdir
