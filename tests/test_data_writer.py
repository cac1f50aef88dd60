"""Writer: spec contents, sharding, size, atomicity, reuse/overwrite, compression."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

import data_pipeline
from data_pipeline import DataError, check_shards, load_source, load_spec, prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_split(data_dir, split, **kwargs):
    images, labels = [], []
    for features, batch_labels in data_pipeline.make_dataset(data_dir, split, 256, **kwargs):
        images.append(np.rint(features["image"].numpy()[..., 0] * 255).astype(np.uint8))
        labels.append(batch_labels.numpy())
    return np.concatenate(images), np.concatenate(labels)


def shard_files(data_dir):
    return sorted(p for p in os.listdir(data_dir) if ".tfrecord" in p and not p.startswith("."))


def test_spec_contents(mnist_data_dir, mnist_source):
    raw = json.loads((mnist_data_dir / "dataset_spec.json").read_text())
    assert raw["format_version"] == 1
    assert raw["num_classes"] == 10 and raw["image_shape"] == [28, 28, 1]
    assert raw["compression"] is None and raw["records_per_shard"] == 1000
    assert raw["source"]["checksum"] == mnist_source.checksum
    assert raw["features"]["image"] == {
        "dtype": "uint8",
        "shape": [28, 28, 1],
        "encoding": "raw_bytes",
        "tf_type": "bytes_list",
        "isbyte": True,
        "length_type": "fixed",
        "default": None,
    }
    assert raw["features"]["label"]["dtype"] == "int64"
    assert raw["features"]["label"]["shape"] == []
    assert raw["features"]["label"]["isbyte"] is False
    assert raw["features"]["label"]["default"] == -1
    assert raw["splits"]["train"]["num_records"] == 55000
    assert raw["splits"]["test"]["num_records"] == 10000
    spec = load_spec(mnist_data_dir)
    assert spec.num_records("train") == 55000
    train = spec.files("train")
    assert len(train) == 55 and os.path.basename(train[0]) == "train-00000-of-00055.tfrecord"
    assert os.path.basename(spec.files("test")[-1]) == "test-00009-of-00010.tfrecord"
    assert set(shard_files(mnist_data_dir)) == {
        os.path.basename(f) for split in ("train", "test") for f in spec.files(split)
    }
    # Counts per shard are verified by reading every record.
    assert check_shards(mnist_data_dir, parse=False) == {"train": 55000, "test": 10000}


def test_uneven_sharding_is_exact(tmp_path, mnist_small_npz):
    spec = prepare(tmp_path, mnist_small_npz, records_per_shard=400, progress=False)
    assert spec.shard_records("train") == [400, 400, 200]
    assert spec.shard_records("test") == [300]
    assert [os.path.basename(f) for f in spec.files("train")] == [
        f"train-0000{i}-of-00003.tfrecord" for i in range(3)
    ]
    assert check_shards(tmp_path) == {"train": 1000, "test": 300}


def test_bytes_per_example(mnist_data_dir):
    spec = load_spec(mnist_data_dir)
    total = sum(os.path.getsize(f) for s in ("train", "test") for f in spec.files(s))
    per_example = total / 65000
    assert per_example <= 0.3 * 3190, per_example
    assert per_example == 838  # 784 pixel bytes + label + proto framing + TFRecord framing.


def test_gzip_round_trip(tmp_path, mnist_small_npz):
    source = load_source(mnist_small_npz, env={})
    spec = prepare(
        tmp_path, source=source, compression="GZIP", records_per_shard=300, progress=False
    )
    assert spec.compression == "GZIP" and load_spec(tmp_path).compression == "GZIP"
    first = spec.files("train")[0]
    assert first.endswith("train-00000-of-00004.tfrecord.gz")
    with open(first, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    for split in ("train", "test"):
        images, labels = read_split(tmp_path, split)
        np.testing.assert_array_equal(images, source.splits[split][0])
        np.testing.assert_array_equal(labels, source.splits[split][1])


def test_progress_bar_on_stderr(tmp_path, mnist_small_npz, capsys, monkeypatch):
    prepare(tmp_path / "a", mnist_small_npz, progress=True)
    assert capsys.readouterr().err == ""  # Not a terminal: no bar in logs and pipes.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    prepare(tmp_path / "c", mnist_small_npz, progress=True)
    assert "prepare" in capsys.readouterr().err
    prepare(tmp_path / "b", mnist_small_npz, progress=False)
    assert capsys.readouterr().err == ""


def set_old_mtimes(data_dir):
    for name in os.listdir(data_dir):
        os.utime(data_dir / name, ns=(10**18, 10**18))


def mtimes(data_dir):
    return {name: os.stat(data_dir / name).st_mtime_ns for name in os.listdir(data_dir)}


def test_reuse_and_overwrite(tmp_path, mnist_small_npz):
    prepare(tmp_path, mnist_small_npz, records_per_shard=250, progress=False)
    set_old_mtimes(tmp_path)
    before = mtimes(tmp_path)
    prepare(tmp_path, mnist_small_npz, records_per_shard=250, progress=False)
    assert mtimes(tmp_path) == before  # Reused: nothing rewritten.
    prepare(tmp_path, mnist_small_npz, records_per_shard=250, progress=False, overwrite=True)
    after = mtimes(tmp_path)
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in after)


def test_other_settings_need_overwrite(tmp_path, mnist_small_npz):
    prepare(tmp_path, mnist_small_npz, records_per_shard=250, progress=False)
    with pytest.raises(DataError) as info:
        prepare(tmp_path, mnist_small_npz, records_per_shard=500, progress=False)
    assert "--overwrite" in str(info.value) and str(tmp_path) in str(info.value)
    spec = prepare(tmp_path, mnist_small_npz, records_per_shard=500, progress=False, overwrite=True)
    # Shards of the old layout are gone.
    assert shard_files(tmp_path) == sorted(
        os.path.basename(f) for s in ("train", "test") for f in spec.files(s)
    )


def test_damaged_output_is_rewritten(tmp_path, mnist_small_npz):
    spec = prepare(tmp_path, mnist_small_npz, records_per_shard=250, progress=False)
    damaged = spec.files("train")[1]
    with open(damaged, "r+b") as f:
        f.truncate(100)
    prepare(tmp_path, mnist_small_npz, records_per_shard=250, progress=False)
    assert check_shards(tmp_path) == {"train": 1000, "test": 300}


class FailingWriter(tf.io.TFRecordWriter):
    """A TFRecordWriter that fails after a total number of records, across instances."""

    budget = 0

    def write(self, record):
        if FailingWriter.budget <= 0:
            raise RuntimeError("simulated crash")
        FailingWriter.budget -= 1
        super().write(record)


def assert_incomplete_but_clean(data_dir, records_per_shard):
    assert not (data_dir / "dataset_spec.json").exists()
    with pytest.raises(DataError, match="no dataset_spec.json"):
        load_spec(data_dir)
    # Every shard under a final name is complete; partial data only ever lives in .tmp- files.
    for name in shard_files(data_dir):
        count = sum(1 for _ in tf.data.TFRecordDataset(str(data_dir / name)))
        assert count == records_per_shard, name


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "overwriting"])
def test_interrupted_write_then_rerun(tmp_path, mnist_small_npz, monkeypatch, existing):
    if existing:
        prepare(tmp_path, mnist_small_npz, records_per_shard=100, progress=False)
    FailingWriter.budget = 350
    monkeypatch.setattr(tf.io, "TFRecordWriter", FailingWriter)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(
            tmp_path,
            mnist_small_npz,
            records_per_shard=100,
            progress=False,
            overwrite=True,
        )
    monkeypatch.undo()
    assert_incomplete_but_clean(tmp_path, 100)
    # An exception (unlike a kill, tests/test_faults_data.py) removes the shard being written.
    assert not any(name.startswith(".tmp-") for name in os.listdir(tmp_path))
    prepare(tmp_path, mnist_small_npz, records_per_shard=100, progress=False)
    assert not any(name.startswith(".tmp-") for name in os.listdir(tmp_path))
    assert check_shards(tmp_path) == {"train": 1000, "test": 300}


KILLED_PREPARE = textwrap.dedent(
    """
    import sys
    import tfenv
    import tensorflow as tf
    import data_pipeline

    class Stall(tf.io.TFRecordWriter):
        written = 0

        def write(self, record):
            super().write(record)
            Stall.written += 1
            if Stall.written == 250:  # Mid-way through the third shard.
                self.flush()
                print("READY", flush=True)
                import time
                time.sleep(120)

    tf.io.TFRecordWriter = Stall
    data_pipeline.prepare(sys.argv[1], sys.argv[2], records_per_shard=100, progress=False)
    """
)


def test_sigkill_during_prepare_then_rerun(tmp_path, mnist_small_npz):
    data_dir = tmp_path / "data"
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_PREPARE, str(data_dir), str(mnist_small_npz)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "READY"
        # Shards are fsynced and renamed by a second thread: wait for the first two.
        deadline = time.monotonic() + 30
        while len(shard_files(data_dir)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert_incomplete_but_clean(data_dir, 100)
    assert len(shard_files(data_dir)) == 2
    spec = prepare(data_dir, mnist_small_npz, records_per_shard=100, progress=False)
    assert not any(name.startswith(".tmp-") for name in os.listdir(data_dir))
    assert check_shards(spec) == {"train": 1000, "test": 300}


def test_bad_arguments(tmp_path, mnist_small_npz):
    with pytest.raises(ValueError):
        prepare(tmp_path, mnist_small_npz, records_per_shard=0, progress=False)
    with pytest.raises(ValueError):
        prepare(tmp_path, mnist_small_npz, compression="ZLIB9", progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError) as info:
        prepare(blocker / "data", mnist_small_npz, progress=False)
    assert "--data_dir" in str(info.value)
