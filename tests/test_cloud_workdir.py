"""A workdir in a bucket: the whole tiny pipeline and its samples on gs://, served by a local GCS emulator (no
network), give what the same pipeline gives on a local disk, and nothing is written to a local folder instead.

The emulator speaks the GCS JSON API, so every client of a real bucket is exercised: etils.epath through gcsfs,
and orbax's arrays through tensorstore's GCS driver."""
import os

import numpy as np
import pytest

# gcsfs's hierarchical-namespace probe (gRPC) has no emulator counterpart; it is read when gcsfs is imported.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

from helpers import free_port, tiny_pipeline_config, train_losses  # noqa: E402

pytestmark = pytest.mark.slow

BUCKET = "cm3jax-test"


def _with_generation_headers(handler):
    """GCS answers every object read with x-goog-generation, which tensorstore's GCS driver requires; the emulator
    leaves it out."""
    def handle(request, response, storage, *args, **kwargs):
        handler(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # noqa: BLE001 - no such object: the handler has answered 404
            return
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]
    return handle


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """gs://BUCKET on an in-memory emulator; the clients find it through their documented emulator settings."""
    from gcp_storage_emulator import server as emulator
    from gcp_storage_emulator.handlers import objects

    for _, methods in emulator.HANDLERS:
        for method, handler in methods.items():
            if handler in (objects.download, objects.get):
                methods[method] = _with_generation_headers(handler)
    create_server = emulator.create_server
    port = free_port()
    server = create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    endpoint = f"http://localhost:{port}"
    settings = {"STORAGE_EMULATOR_HOST": endpoint,  # gcsfs
                "TENSORSTORE_GCS_HTTP_URL": endpoint,  # orbax's arrays
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore asks no credential service
                "FSSPEC_GCS_TOKEN": "anon", "GOOGLE_CLOUD_PROJECT": "cm3jax-test", "NO_GCE_CHECK": "True",
                "CM3JAX_CACHE": str(tmp_path_factory.mktemp("mirror_cache"))}
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield f"gs://{BUCKET}"
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.stop()


def test_a_mirrored_object_rewritten_with_the_same_size_is_fetched_again(bucket, tmp_path, monkeypatch):
    """A redone neighbours-*.npy keeps its size; the local mirror follows the object (its generation)."""
    from etils import epath

    from cm3jax import storage

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    remote = epath.Path(f"{bucket}/mirror-test/neighbours-train.npy")
    remote.write_bytes(b"first")
    local = storage.local_mirror(remote)
    assert open(local, "rb").read() == b"first"
    remote.write_bytes(b"again")  # the same size, a new generation
    assert storage.local_mirror(remote) == local and open(local, "rb").read() == b"again"
    before = os.stat(local).st_mtime_ns
    assert storage.local_mirror(remote) == local and os.stat(local).st_mtime_ns == before  # unchanged: kept
    remote.unlink()


def test_the_whole_pipeline_runs_in_a_bucket_as_on_a_local_disk(bucket, tiny_pipeline_run, tmp_path, monkeypatch):
    from cm3jax import stages
    from cm3jax.pipeline import run_pipeline
    from cm3jax.storage import load_arrays
    from cm3jax.workdir import Workdir

    monkeypatch.chdir(tmp_path)  # a stage that wrote to a local path named after the URL would leave "gs:" here
    workdir = Workdir(f"{bucket}/run")
    workdir.check()
    assert run_pipeline(tiny_pipeline_config(), workdir)
    local = Workdir(tiny_pipeline_run)

    for stage in ("data", "vqgan", "tokens", "retrieval", "lm"):
        assert workdir.stage(stage).is_complete(), stage
    shards = sorted(p.name for p in workdir.tokens.path.glob("*.array_record"))
    assert shards == sorted(p.name for p in local.tokens.path.glob("*.array_record"))
    for name in shards:
        assert (workdir.tokens / name).read_bytes() == (local.tokens / name).read_bytes(), name
    for split in ("train", "validation"):
        np.testing.assert_array_equal(load_arrays(workdir.retrieval.neighbours(split)),
                                      load_arrays(local.retrieval.neighbours(split)))
    assert (workdir.retrieval.index / "index.json").exists()
    assert train_losses(workdir.lm.path) == train_losses(local.lm.path)
    assert sorted(p.name for p in workdir.lm.checkpoints.iterdir()) == ["2", "4"]
    assert any(p.name.startswith("events.out.tfevents") for p in workdir.lm.logs.iterdir())
    assert (workdir.vqgan.samples).is_dir()

    config = tiny_pipeline_config()
    config.generate.update(sample_prompts=("a red circle",), num=1, sample_captions=1)
    assert stages.by_command("samples").run(config, workdir)
    assert (workdir.samples / "images.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (workdir.samples / "captions.json").exists()

    assert os.listdir(tmp_path) == []
