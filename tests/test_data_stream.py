"""Datasets bigger than memory: prepare streams with flat memory and resumes after a SIGKILL."""

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest
from cli_helpers import REPO, run_fresh_python

import data_pipeline
from data_pipeline import check_shards, load_spec, prepare
from data_pipeline.images import write_synthetic_folder

ENV = {**os.environ, "PYTHONPATH": REPO}


# Runs main.py's prepare in one process for each SOURCE DATA_DIR pair of its arguments and prints
# the process's own peak resident memory (VmHWM, MiB) after each: the first peak is what
# TensorFlow and the pipeline take whatever the data, the next ones add what grows with it.
PREPARES_WITH_PEAKS = textwrap.dedent(
    """
    import sys

    import tfenv  # noqa: F401
    from absl import flags as absl_flags

    import flags
    import main

    flags.define_flags()
    for source, data_dir in zip(sys.argv[1::2], sys.argv[2::2]):
        argv = ["--mode=prepare", "--source_dir=" + source, "--data_dir=" + data_dir]
        main.main(main.parse_flags([main.__file__, *argv]))
        absl_flags.FLAGS.unparse_flags()
        with open("/proc/self/status") as status:
            peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
        print("peak_mib", int(peak) / 1024, flush=True)
    """
)


def peak_rss_mb(*source_and_data_dirs):
    """Prepares each ``(source, data_dir)`` in turn in one process; returns its peak after each.

    One process for all: the first prepare's peak is the baseline (TensorFlow and the pipeline,
    whatever the data); a process of its own per prepare would only add a 4-7 s cold start each.
    """
    args = [str(path) for pair in source_and_data_dirs for path in pair]
    run = run_fresh_python(PREPARES_WITH_PEAKS, *args, timeout=600)
    return [float(line.split()[1]) for line in run.stdout.splitlines() if line.startswith("peak")]


def linked_folder(seed, root, counts):
    """A folder of ``counts`` images per split, hard links to the few images of ``seed``."""
    for split, count in counts.items():
        sources = sorted(seed.glob(f"{split}/*/*.png"))
        for index in range(count):
            source = sources[index % len(sources)]
            target = root / split / source.parent.name / f"{index:06d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, target)
    return root


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    """Two PNG folders of 192x192x3 images: 60 and 4,000 (442 MB decoded)."""
    root = tmp_path_factory.mktemp("synthetic")
    seed = write_synthetic_folder(root / "seed", {"train": 30, "test": 10}, (192, 192, 3))
    small = linked_folder(seed, root / "small", {"train": 50, "test": 10})
    large = linked_folder(seed, root / "large", {"train": 3600, "test": 400})
    return small, large


@pytest.fixture
def ram_dir(tmp_path):
    """A fresh folder in /dev/shm (RAM) where there is one, else ``tmp_path``.

    The large prepare writes 440 MB of shards, each fsynced: to disk that takes 2-3 s more, and
    the test is about the process's memory, not the disk. (Files in /dev/shm are not part of
    the writer's resident memory.)
    """
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        yield pathlib.Path(folder)


def test_prepare_memory_does_not_grow_with_the_dataset(image_folders, ram_dir):
    small, large = image_folders
    decoded_mb = 4000 * 192 * 192 * 3 / 2**20
    peaks = peak_rss_mb((small, ram_dir / "small"), (large, ram_dir / "large"))
    assert len(peaks) == 2, peaks
    # 66x the images, yet the peak grows by far less than the decoded data (a few 8 MiB chunks
    # are in flight at once), and the whole process, TensorFlow included, stays under 1 GiB.
    assert peaks[1] - peaks[0] < decoded_mb / 5, (peaks, decoded_mb)
    assert peaks[1] < 1024, peaks
    assert check_shards(ram_dir / "large", parse=False) == {"train": 3600, "test": 400}


# Prepares SOURCE into DATA_DIR in shards of N records and stalls (flushed) mid-way through
# shard K until it is killed; shards are finished (fsync, rename) by a second thread.
STALLED_PREPARE = textwrap.dedent(
    """
    import sys, time
    import tfenv
    import tensorflow as tf
    import data_pipeline

    records_per_shard, stall_in_shard = int(sys.argv[3]), int(sys.argv[4])

    class Stall(tf.io.TFRecordWriter):
        written = 0

        def write(self, record):
            super().write(record)
            Stall.written += 1
            if Stall.written == stall_in_shard * records_per_shard + records_per_shard // 2:
                self.flush()
                print("READY", flush=True)
                time.sleep(600)

    tf.io.TFRecordWriter = Stall
    data_pipeline.prepare(
        sys.argv[1], sys.argv[2], records_per_shard=records_per_shard, progress=False
    )
    """
)


def shard_stats(data_dir):
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in data_dir.iterdir()
        if ".tfrecord" in p.name and not p.name.startswith(".")
    }


# 15 train and 3 test shards of the 1,797 digits, the kill in train shard 6: shards on both sides
# of it, few enough that check_shards (a tf.data pipeline per shard) stays quick.
RECORDS_PER_SHARD, KILLED_IN_SHARD = 100, 6


def test_killed_prepare_resumes_without_rewriting_complete_shards(digits_folder, tmp_path):
    data_dir, reference = tmp_path / "data", tmp_path / "reference"
    args = [data_dir, digits_folder, RECORDS_PER_SHARD, KILLED_IN_SHARD]
    proc = subprocess.Popen(
        [sys.executable, "-c", STALLED_PREPARE, *map(str, args)],
        stdout=subprocess.PIPE,
        env=ENV,
        text=True,
    )
    try:
        # The uninterrupted prepare to compare with, done while the child imports TensorFlow.
        uninterrupted = prepare(
            reference, digits_folder, records_per_shard=RECORDS_PER_SHARD, progress=False
        )
        assert proc.stdout.readline().strip() == "READY"
        # The finisher thread may still be renaming the shard before.
        for _ in range(3000):
            if len(shard_stats(data_dir)) == KILLED_IN_SHARD:
                break
            proc.poll()
            os.sched_yield()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    before = shard_stats(data_dir)
    assert sorted(before) == [f"train-{i:05d}-of-00015.tfrecord" for i in range(KILLED_IN_SHARD)]
    assert not (data_dir / "dataset_spec.json").exists()
    spec = prepare(data_dir, digits_folder, records_per_shard=RECORDS_PER_SHARD, progress=False)
    after = shard_stats(data_dir)
    assert {name: after[name] for name in before} == before  # Not rewritten.
    assert len(after) == 15 + 3 and not any(p.name.startswith(".") for p in data_dir.iterdir())
    # Equal to an uninterrupted prepare: same spec, same bytes in every shard.
    assert spec.to_json() == uninterrupted.to_json() == load_spec(data_dir).to_json()
    for split in ("train", "test"):
        for mine, theirs in zip(spec.files(split), uninterrupted.files(split)):
            assert open(mine, "rb").read() == open(theirs, "rb").read(), mine
        assert spec.record_files(split) == uninterrupted.record_files(split)
    assert check_shards(data_dir) == {"train": 1500, "test": 297}


def test_resume_trusts_only_journalled_shards_of_the_same_plan(digits_npz, tmp_path):
    source = data_pipeline.open_source(digits_npz)
    spec = prepare(tmp_path, source=source, records_per_shard=100, progress=False)
    names = [os.path.basename(f) for s in ("train", "test") for f in spec.files(s)]
    sizes = [os.path.getsize(f) for s in ("train", "test") for f in spec.files(s)]
    journal = tmp_path / data_pipeline.writer.PROGRESS_NAME

    def interrupted(fingerprint, lines):
        (tmp_path / "dataset_spec.json").unlink()
        journal.write_text(fingerprint + "\n" + "".join(line + "\n" for line in lines))
        before = shard_stats(tmp_path)
        prepare(tmp_path, source=source, records_per_shard=100, progress=False)
        after = shard_stats(tmp_path)
        assert not journal.exists() and after.keys() == before.keys()
        return sorted(name for name in before if after[name] != before[name])

    journalled = [f"{name} {size}" for name, size in zip(names, sizes)]
    # Another plan's journal (other source or settings): every shard is written again.
    assert interrupted("0" * 64, journalled) == sorted(names)
    # This plan's journal: shards journalled with their size are kept; one journalled with
    # another size, one not journalled and a torn last line are written again.
    lines = [journalled[0], f"{names[1]} 5", *journalled[3:], journalled[2][:-3]]
    assert interrupted(spec.fingerprint, lines) == sorted(names[1:3])
    assert check_shards(tmp_path) == {"train": 1500, "test": 297}
