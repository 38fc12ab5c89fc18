"""Every test process sees 8 CPU devices, so sharded code runs here exactly as on an 8-chip host."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
def xla_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def compilation_cache(xla_cache_dir):
    """Modules that rerun a pipeline compile its programs again: they are served from one on-disk cache."""
    from helpers import compilation_cache

    with compilation_cache(xla_cache_dir):
        yield


@pytest.fixture(scope="session")
def tiny_pipeline_run(tmp_path_factory, xla_cache_dir):
    """DIR after the whole tiny pipeline (helpers.tiny_pipeline_config), unbroken, on a local disk; built once per
    session, changed only on copies."""
    from cm3jax.pipeline import run_pipeline
    from cm3jax.workdir import Workdir

    from helpers import compilation_cache, tiny_pipeline_config

    workdir = str(tmp_path_factory.mktemp("tiny_pipeline_run"))
    with compilation_cache(xla_cache_dir):
        assert run_pipeline(tiny_pipeline_config(), Workdir(workdir))
    return workdir
