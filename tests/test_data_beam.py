"""``--prepare_engine=beam``: the local engine's records, deterministic shards, safe failures.

Each Beam run starts two worker processes that import TensorFlow (seconds each), so the module
makes few runs and shares them: real MNIST IDX once, the UCI digits PNG folder twice (the
second run resumes one killed with SIGKILL), and a small folder with a corrupt image once.
"""

import collections
import hashlib
import os
import signal
import time

import numpy as np
import pytest
import tensorflow as tf
from cli_helpers import assert_cli_error, fork_main, run_cli
from conftest import DIGIT_NAMES, write_png_folder

import data_pipeline
import estimator_bridge
import jobs
from data_pipeline import beam_writer

TWO_WORKERS = "--beam_options=--direct_num_workers=2"
# The digits' 1,500 train records in 15 shards, so a killed run can leave some complete.
DIGITS_SHARD = 100


def records(spec, split):
    """The split's serialized examples, in shard order."""
    dataset = tf.data.TFRecordDataset(spec.files(split), spec.compression or "").batch(20_000)
    return [record for batch in dataset for record in batch.numpy().tolist()]


def folder_bytes(data_dir):
    """Every non-hidden file's SHA-256 (the output a reader sees), by name."""
    return {
        name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest()
        for name in sorted(os.listdir(data_dir))
        if not name.startswith(".")
    }


def assert_same_dataset(beam_spec, local_spec):
    """Same schema, classes and counts, and per split the same multiset of examples."""
    for field in ("image_shape", "class_names", "num_classes", "features", "compression"):
        assert getattr(beam_spec, field) == getattr(local_spec, field), field
    assert beam_spec.source_checksum == local_spec.source_checksum
    assert set(beam_spec.manifests) == set(local_spec.manifests)
    for split in local_spec.splits:
        assert beam_spec.num_records(split) == local_spec.num_records(split)
        beam, local = records(beam_spec, split), records(local_spec, split)
        assert collections.Counter(beam) == collections.Counter(local), split
        assert beam != local  # Hash-bucketed, not the source's order.


@pytest.fixture(scope="module")
def mnist_beam(mnist_dir, tmp_path_factory):
    """Real MNIST IDX prepared by the Beam engine through the command line, 2 workers."""
    data_dir = tmp_path_factory.mktemp("mnist_beam")
    run = run_cli(
        "--mode=prepare",
        f"--source_dir={mnist_dir}",
        f"--data_dir={data_dir}",
        "--prepare_engine=beam",
        TWO_WORKERS,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr == ""  # Quiet: Beam's and the workers' logs stay out of the terminal.
    return data_pipeline.load_spec(data_dir, check_records=True)


def test_mnist_idx_beam_equals_local(mnist_beam, mnist_data_dir):
    local = data_pipeline.load_spec(mnist_data_dir)
    assert_same_dataset(mnist_beam, local)
    # Hash buckets: about records_per_shard each, as many shards as the local engine writes.
    assert len(mnist_beam.files("train")) == len(local.files("train")) > 50
    assert all(900 < n < 1100 for n in mnist_beam.shard_records("train"))
    assert not any(name.startswith(".") for name in os.listdir(mnist_beam.data_dir))


@pytest.fixture(scope="module")
def digits_local(digits_folder, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("digits_local")
    data_pipeline.prepare(data_dir, digits_folder, records_per_shard=DIGITS_SHARD, progress=False)
    return data_dir


@pytest.fixture(scope="module")
def digits_beam(digits_folder, tmp_path_factory):
    """The digits PNG folder prepared by Beam (2 workers), in process."""
    data_dir = tmp_path_factory.mktemp("digits_beam")
    data_pipeline.prepare(
        data_dir,
        digits_folder,
        records_per_shard=DIGITS_SHARD,
        engine="beam",
        beam_options="--direct_num_workers=2",
    )
    return data_dir


@pytest.fixture(scope="module")
def digits_killed_then_rerun(digits_folder, tmp_path_factory):
    """A Beam prepare SIGKILLed once it has written a shard, then rerun to completion.

    Returns (data_dir, what the killed run left: file names).
    """
    data_dir = tmp_path_factory.mktemp("digits_killed")
    # main.py forked from a warm interpreter (cli_helpers.fork_main): a real process with
    # main.py's imports done, in a session of its own so the kill reaches Beam's workers too.
    proc = fork_main(
        "--mode=prepare",
        f"--source_dir={digits_folder}",
        f"--data_dir={data_dir}",
        f"--records_per_shard={DIGITS_SHARD}",
        "--prepare_engine=beam",
        TWO_WORKERS,
        new_session=True,
    )
    journal = data_dir / beam_writer.WORK_DIR
    deadline = time.monotonic() + 240
    try:
        while not any(journal.glob("*.tfrecord.json")):
            assert proc.poll() is None, "prepare ended before it could be killed mid-run"
            assert time.monotonic() < deadline, "no shard written in 240 s"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    left = sorted(os.listdir(data_dir))
    data_pipeline.prepare(
        data_dir,
        digits_folder,
        records_per_shard=DIGITS_SHARD,
        engine="beam",
        beam_options="--direct_num_workers=2",
    )
    return data_dir, left


def test_killed_beam_prepare_looks_incomplete_and_the_rerun_completes(
    digits_killed_then_rerun, digits_beam
):
    data_dir, left = digits_killed_then_rerun
    assert data_pipeline.spec.SPEC_NAME not in left
    assert not any(name.endswith("-files.txt") for name in left)
    assert beam_writer.WORK_DIR in left  # The journal the rerun resumed from.
    # The resumed run's folder is byte for byte the uninterrupted run's.
    assert folder_bytes(data_dir) == folder_bytes(digits_beam)
    assert not any(name.startswith(".") for name in os.listdir(data_dir))


def test_beam_digits_equal_local_and_the_manifest_names_each_file(
    digits_beam, digits_local, digits_folder
):
    beam, local = data_pipeline.load_spec(digits_beam), data_pipeline.load_spec(digits_local)
    assert_same_dataset(beam, local)
    assert beam.class_names == tuple(sorted(DIGIT_NAMES))
    # The manifest names each record's own file, in the Beam shards' order.
    files = beam.record_files("test")
    examples = records(beam, "test")
    assert len(files) == len(examples) == 297
    for index in (0, 150, 296):
        png = tf.io.decode_png(tf.io.read_file(str(digits_folder / files[index])))
        parsed = tf.io.parse_single_example(
            examples[index], {"image": tf.io.FixedLenFeature([], tf.string)}
        )
        image = tf.io.decode_raw(parsed["image"], tf.uint8).numpy()
        np.testing.assert_array_equal(image, png.numpy().reshape(-1))


def test_train_and_evaluate_from_beam_output(digits_beam, tmp_path):
    config = estimator_bridge.Config(
        model="user_models:build_bn_net",
        data_dir=str(digits_beam),
        model_dir=str(tmp_path / "model"),
        batch_size=64,
        train_steps=150,
        learning_rate=3e-3,
        seed=0,
        save_checkpoints_steps=150,
        progress=False,
    )
    trained = jobs.train(config)
    assert trained["global_step"] == 150
    evaluated = jobs.evaluate(config)
    # Far past chance (0.1): images and labels travelled together. (The local engine's order
    # reaches about 0.85 in these 150 steps; the Beam shards' order gives the same range.)
    assert evaluated["examples"] == 297 and evaluated["accuracy"] > 0.7


def test_corrupt_image_fails_in_a_worker_with_one_line(digits, tmp_path):
    images, labels = digits
    source = write_png_folder(tmp_path / "src", images[:40], labels[:40], DIGIT_NAMES, 30)
    bad = sorted((source / "train").glob("*/*.png"))[-1]
    bad.write_bytes(bad.read_bytes()[:60])  # Cut off in its first chunk.
    data_dir = tmp_path / "data"
    run = run_cli(
        "--mode=prepare",
        f"--source_dir={source}",
        f"--data_dir={data_dir}",
        "--prepare_engine=beam",
        TWO_WORKERS,
    )
    assert_cli_error(run, str(bad), "cannot decode the image", "replace or remove the file")
    assert not (data_dir / data_pipeline.spec.SPEC_NAME).exists()
    # Beam's and the workers' own output is kept for whoever wants the details.
    assert (data_dir / beam_writer.WORK_DIR / beam_writer.LOG_NAME).stat().st_size > 0


def test_beam_options_without_the_beam_engine_is_refused(mnist_small_npz, tmp_path):
    run = run_cli(
        "--mode=prepare",
        f"--source_dir={mnist_small_npz}",
        f"--data_dir={tmp_path / 'data'}",
        TWO_WORKERS,
    )
    assert_cli_error(run, "--beam_options", "--prepare_engine=beam")
    assert not (tmp_path / "data").exists()
