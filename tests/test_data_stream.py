"""Datasets bigger than memory: prepare streams with flat memory and resumes after a SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from cli_helpers import MAIN, REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
import benchlib  # noqa: E402 - bench/ is not a package; its run_peak_rss measures the child.

import data_pipeline
from data_pipeline import check_shards, load_spec, prepare
from data_pipeline.images import write_synthetic_folder

ENV = {**os.environ, "PYTHONPATH": REPO}


def peak_rss_mb(args):
    """Runs ``python main.py ARGS`` and returns the child's own peak resident memory in MB."""
    run = benchlib.run_peak_rss([sys.executable, MAIN, *args])
    assert run["returncode"] == 0, run["stderr"][-3000:]
    return run["peak_mib"]


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


def test_prepare_memory_does_not_grow_with_the_dataset(image_folders, tmp_path):
    small, large = image_folders
    decoded_mb = 4000 * 192 * 192 * 3 / 2**20
    peaks = [
        peak_rss_mb(["--mode=prepare", f"--source_dir={src}", f"--data_dir={tmp_path / name}"])
        for name, src in (("small", small), ("large", large))
    ]
    # 66x the images, yet the peak grows by far less than the decoded data (a few 8 MiB chunks
    # are in flight at once), and the whole process, TensorFlow included, stays under 1 GiB.
    assert peaks[1] - peaks[0] < decoded_mb / 5, (peaks, decoded_mb)
    assert peaks[1] < 1024, peaks
    assert check_shards(tmp_path / "large", parse=False) == {"train": 3600, "test": 400}


# Prepares a folder in shards of 30 records and stalls (flushed) mid-way through shard 12
# until it is killed; shards are finished (fsync, rename) by a second thread.
STALLED_PREPARE = textwrap.dedent(
    """
    import sys, time
    import tfenv
    import tensorflow as tf
    import data_pipeline

    class Stall(tf.io.TFRecordWriter):
        written = 0

        def write(self, record):
            super().write(record)
            Stall.written += 1
            if Stall.written == 12 * 30 + 15:
                self.flush()
                print("READY", flush=True)
                time.sleep(600)

    tf.io.TFRecordWriter = Stall
    data_pipeline.prepare(sys.argv[1], sys.argv[2], records_per_shard=30, progress=False)
    """
)


def shard_stats(data_dir):
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in data_dir.iterdir()
        if ".tfrecord" in p.name and not p.name.startswith(".")
    }


def test_killed_prepare_resumes_without_rewriting_complete_shards(digits_folder, tmp_path):
    data_dir, reference = tmp_path / "data", tmp_path / "reference"
    proc = subprocess.Popen(
        [sys.executable, "-c", STALLED_PREPARE, str(data_dir), str(digits_folder)],
        stdout=subprocess.PIPE,
        env=ENV,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "READY"
        # The finisher thread may still be renaming shard 11.
        for _ in range(3000):
            if len(shard_stats(data_dir)) == 12:
                break
            proc.poll()
            os.sched_yield()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    before = shard_stats(data_dir)
    assert sorted(before) == [f"train-{i:05d}-of-00050.tfrecord" for i in range(12)]
    assert not (data_dir / "dataset_spec.json").exists()
    spec = prepare(data_dir, digits_folder, records_per_shard=30, progress=False)
    after = shard_stats(data_dir)
    assert {name: after[name] for name in before} == before  # Not rewritten.
    assert len(after) == 50 + 10 and not any(p.name.startswith(".") for p in data_dir.iterdir())
    # Equal to an uninterrupted prepare: same spec, same bytes in every shard.
    uninterrupted = prepare(reference, digits_folder, records_per_shard=30, progress=False)
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
