"""train/metrics.py: the metrics log, resumed runs' logs and the devices' peak FLOP/s."""
import json

from cm3jax.train.metrics import MetricsWriter, peak_flops_per_device


def _rows(log_dir):
    return [json.loads(line) for line in open(log_dir / "metrics.jsonl")]


def test_rows_are_written_per_step_and_split(tmp_path):
    writer = MetricsWriter(str(tmp_path), total_steps=4)
    writer.write(1, {"loss": 2.5})
    writer.write(2, {"loss": 2.0}, prefix="eval")
    writer.close()
    assert _rows(tmp_path) == [{"step": 1, "split": "train", "loss": 2.5}, {"step": 2, "split": "eval", "loss": 2.0}]
    assert list(tmp_path.glob("events.*"))  # TensorBoard event file


def test_a_resumed_run_drops_rows_an_earlier_attempt_wrote_past_its_checkpoint(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    for step in (1, 2, 3, 4):
        writer.write(step, {"loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "spl')  # a row cut short by a kill
    writer = MetricsWriter(str(tmp_path), resumed_step=2)
    writer.write(3, {"loss": 30.0})
    writer.close()
    assert [(r["step"], r["loss"]) for r in _rows(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_peak_flops_come_from_the_config_or_the_device_table():
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3", -1) == 989e12
    assert peak_flops_per_device("TPU v5 lite", -1) == 197e12
    assert peak_flops_per_device("cpu", -1) is None
    assert peak_flops_per_device("cpu", 2.0) == 2e12


def test_logs_for_a_bucket_are_written_locally_and_uploaded_at_sync_and_close(tmp_path, monkeypatch):
    from cm3jax.train import metrics

    bucket = tmp_path / "bucket" / "logs"  # stands for gs://...: the writer treats it as an object store
    monkeypatch.setattr(metrics, "is_remote", lambda path: str(path).startswith(str(tmp_path / "bucket")))
    monkeypatch.setenv("CM3JAX_CACHE", str(tmp_path / "cache"))
    writer = MetricsWriter(str(bucket), upload_every_s=3600)
    writer.write(1, {"loss": 1.0})
    assert not (bucket / "metrics.jsonl").exists()  # not uploaded between syncs
    writer.sync()
    assert [r["step"] for r in _rows(bucket)] == [1]
    writer.write(2, {"loss": 2.0})
    writer.close()
    assert [r["step"] for r in _rows(bucket)] == [1, 2] and list(bucket.glob("events.*"))

    resumed = MetricsWriter(str(bucket), resumed_step=1, upload_every_s=0)  # uploads at every row
    resumed.write(2, {"loss": 20.0})
    assert [(r["step"], r["loss"]) for r in _rows(bucket)] == [(1, 1.0), (2, 20.0)]
    resumed.close()
