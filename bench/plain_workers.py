"""The Beam engine's shard work in N plain worker processes, without Beam: its ceiling here.

Runs exactly what a Beam worker runs for an image folder (``beam_writer._EncodeShard``: read,
decode, encode and write one shard per work item, TensorFlow imported with one thread per pool
in each fresh worker process) in a ``multiprocessing`` pool of N processes fed one shard at a
time. What Beam with N workers cannot beat on this machine, so ``bench_data.py`` can tell
Beam's own cost (driver, runner, data plane) from the machine's: a worker whose decoding
overlaps its encoding keeps more than one core busy, so two workers on two cores get less than
2x one's rate, with or without Beam. Writes shards only (no spec): for timing, not for use.

    .venv/bin/python bench/plain_workers.py SOURCE_DIR DATA_DIR WORKERS
"""

import multiprocessing
import os
import shutil
import sys

import benchlib  # noqa: F401 - puts the repo on sys.path and imports tfenv before TensorFlow.

from data_pipeline import open_source
from data_pipeline.beam_writer import WORK_DIR, _EncodeShard, _shard_items, shard_plan
from data_pipeline.sources import CHUNK_BYTES
from data_pipeline.writer import records_per_shard_for

_worker = None


def _start(encode):
    global _worker
    _worker = encode
    _worker.setup()


def _run(item):
    return list(_worker.process(item))


def main(source_dir, data_dir, workers):
    source = open_source(source_dir, allow_download=False)
    per_shard = records_per_shard_for(source.image_shape, None, None)
    num_shards, names = shard_plan(source, per_shard, None)
    shutil.rmtree(data_dir, ignore_errors=True)
    work_dir = os.path.join(data_dir, WORK_DIR)
    os.makedirs(work_dir)
    items = list(_shard_items(source, num_shards, set()))
    encode = _EncodeShard(source.image_shape, data_dir, names, None, work_dir, CHUNK_BYTES)
    # spawn: each worker starts a fresh interpreter and imports TensorFlow, as Beam's do.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start, initargs=(encode,)) as pool:
        written = sum(len(done) for done in pool.imap_unordered(_run, items))
    print(f"{written} shards in {data_dir}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
