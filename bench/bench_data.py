"""Benchmarks the data pipeline: prepare time, bytes per example, input pipeline throughput.

Also measures a tutorial-style writer for comparison (one tf.train.Example per image with the
pixels as a FloatList of 784 floats, written one at a time with tf.io.TFRecordWriter).

Run from the repository root:
    .venv/bin/python bench/bench_data.py --source_dir=$MNIST_DIR
"""

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # Run as a script: make tfenv and data_pipeline importable.

import tfenv  # noqa: E402, I001 - must come before TensorFlow.
import tensorflow as tf  # noqa: E402

tfenv.silence_python_logging()

import data_pipeline  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source_dir",
        default=os.environ.get("MNIST_DIR"),
        help="MNIST IDX folder or mnist.npz (default: $MNIST_DIR)",
    )
    parser.add_argument(
        "--work_dir", default=None, help="scratch folder (default: a temporary one, removed)"
    )
    parser.add_argument("--batch_sizes", default="128,512", help="comma-separated batch sizes")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per throughput run")
    parser.add_argument("--records_per_shard", type=int, default=1000)
    parser.add_argument(
        "--tutorial_limit",
        type=int,
        default=None,
        help="examples for the tutorial-style writer (default: all)",
    )
    parser.add_argument("--skip_tutorial", action="store_true")
    return parser.parse_args(argv)


def bytes_per_example(spec):
    files = [f for split in spec.splits for f in spec.files(split)]
    records = sum(spec.num_records(split) for split in spec.splits)
    return sum(os.path.getsize(f) for f in files) / records


def time_prepare(data_dir, source_dir, records_per_shard, compression):
    start = time.perf_counter()
    spec = data_pipeline.prepare(
        data_dir,
        source_dir,
        records_per_shard=records_per_shard,
        compression=compression,
        overwrite=True,
        progress=False,
        allow_download=False,
    )
    return time.perf_counter() - start, spec


def throughput(data_dir, batch_size, seconds):
    dataset = data_pipeline.make_dataset(
        data_dir, "train", batch_size, num_epochs=None, shuffle=True, seed=0
    )
    iterator = iter(dataset)
    for _ in range(20):  # Warm-up: fill the shuffle buffer and let AUTOTUNE settle.
        next(iterator)
    examples, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, labels = next(iterator)
        examples += int(labels.shape[0])
    return examples / (time.perf_counter() - start)


def tutorial_writer(source, path, limit):
    """The common tutorial recipe: float pixels, one Example built and written at a time."""
    start, count = time.perf_counter(), 0
    with tf.io.TFRecordWriter(path) as writer:
        for split in ("train", "test"):
            images, labels = source.splits[split]
            for image, label in zip(images, labels):
                if limit is not None and count >= limit:
                    break
                example = tf.train.Example(
                    features=tf.train.Features(
                        feature={
                            "image": tf.train.Feature(
                                float_list=tf.train.FloatList(value=(image / 255.0).reshape(-1))
                            ),
                            "label": tf.train.Feature(
                                int64_list=tf.train.Int64List(value=[int(label)])
                            ),
                        }
                    )
                )
                writer.write(example.SerializeToString())
                count += 1
    return time.perf_counter() - start, count, os.path.getsize(path) / count


def main(argv=None):
    args = parse_args(argv)
    if not args.source_dir:
        sys.exit("bench_data.py: pass --source_dir or set MNIST_DIR")
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="bench_data-")
    os.makedirs(work_dir, exist_ok=True)
    command = " ".join(
        [".venv/bin/python", "bench/bench_data.py", f"--source_dir={args.source_dir}"]
        + [shlex.quote(a) for a in sys.argv[1:] if not a.startswith("--source_dir")]
    )
    try:
        start = time.perf_counter()
        source = data_pipeline.load_source(args.source_dir, allow_download=False)
        load_s = time.perf_counter() - start
        total = sum(source.num_records(split) for split in source.splits)
        print(f"source: {source.name}, {total} examples, read+validated in {load_s:.2f} s")

        plain_dir = os.path.join(work_dir, "plain")
        plain_s, spec = time_prepare(plain_dir, args.source_dir, args.records_per_shard, None)
        print(
            f"prepare (uncompressed, incl. reading the source): {plain_s:.2f} s for {total} "
            f"examples, {bytes_per_example(spec):.1f} bytes/example"
        )
        gzip_dir = os.path.join(work_dir, "gzip")
        gzip_s, gzip_spec = time_prepare(gzip_dir, args.source_dir, args.records_per_shard, "GZIP")
        print(f"prepare (GZIP): {gzip_s:.2f} s, {bytes_per_example(gzip_spec):.1f} bytes/example")

        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            rate = throughput(plain_dir, batch_size, args.seconds)
            print(f"pipeline, train, shuffled, batch {batch_size}: {rate:,.0f} examples/s")
        rate = throughput(gzip_dir, 512, args.seconds)
        print(f"pipeline, train, shuffled, batch 512, GZIP shards: {rate:,.0f} examples/s")

        if not args.skip_tutorial:
            path = os.path.join(work_dir, "tutorial.tfrecord")
            seconds, count, size = tutorial_writer(source, path, args.tutorial_limit)
            print(
                f"tutorial-style writer (FloatList, one example at a time): {seconds:.2f} s for "
                f"{count} examples ({seconds / count * total:.1f} s per {total}), "
                f"{size:.1f} bytes/example"
            )
        print(f"cpus: {os.cpu_count()}, tensorflow {tf.__version__}")
        print(f"reproduce: {command}")
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
