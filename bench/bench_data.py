"""Benchmarks the data pipeline: MNIST prepare/read, and prepare scaling on image folders.

MNIST part: prepare time for all 65,000 images (IDX files to sharded TFRecords, plain and
GZIP), bytes per example, the input pipeline alone in examples/s (shuffled train split), and a
tutorial-style writer for comparison (one tf.train.Example per image with the pixels as a
FloatList of 784 floats, written one at a time).

Image-folder part: generated PNG folders of ``--image_counts`` images (``--image_shape``, 10
classes, 90 % train), each prepared by ``main.py --mode=prepare`` in its own process: images/s,
the process' peak resident memory (its ``VmHWM``, TensorFlow included), shard
bytes, then the reader's shuffled examples/s on the result. Time should grow linearly with the
image count and memory stay flat. The largest folder is generated once and kept under
``--work_dir`` (about 8.4 kB per 128x128x3 PNG); smaller ones are hard links to its first files.

Engine part (``--engine_images=N``): the same generated folder prepared by the local engine and
by the Beam engine with 1 and 2 local worker processes, in alternating rounds; images/s and the
peak resident memory of the whole process tree (Beam's workers are processes of their own).
``plain1``/``plain2`` run the Beam workers' shard work in plain processes without Beam
(``plain_workers.py``): the most N workers get on this machine, against which Beam's own cost
and the machine's limit (one worker already keeps more than one core busy) are told apart.

Run from the repository root (under the CPU lock: timings are meaningless otherwise):
    flock /tmp/cpu.lock .venv/bin/python bench/bench_data.py --source_dir=$MNIST_DIR
Quick check:
    .venv/bin/python bench/bench_data.py --skip_tutorial --seconds=1 --image_counts=500,1000
"""

import argparse
import math
import os
import shutil
import subprocess
import sys
import time

import benchlib  # Puts the repo on sys.path and imports tfenv before TensorFlow.
import tensorflow as tf

import data_pipeline
from data_pipeline.images import write_synthetic_folder

REPO = benchlib.REPO


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source_dir",
        default=benchlib.default_source_dir(),
        help="MNIST IDX folder or mnist.npz (default: $MNIST_DIR)",
    )
    parser.add_argument(
        "--work_dir",
        default=os.path.join(REPO, "build", "bench", "data"),
        help="scratch folder; generated image folders are kept there for the next run",
    )
    parser.add_argument("--batch_sizes", type=benchlib.int_list, default=[128, 512])
    parser.add_argument("--seconds", type=float, default=5.0, help="time per throughput run")
    parser.add_argument("--records_per_shard", type=int, default=1000)
    parser.add_argument(
        "--tutorial_limit",
        type=int,
        default=None,
        help="examples for the tutorial-style writer (default: all)",
    )
    parser.add_argument("--skip_tutorial", action="store_true")
    parser.add_argument("--skip_mnist", action="store_true")
    parser.add_argument(
        "--image_counts",
        type=benchlib.int_list,
        default=[10_000, 30_000, 100_000],
        help="image-folder sizes to prepare (empty: skip the image-folder part)",
    )
    parser.add_argument("--image_shape", type=benchlib.int_list, default=[128, 128, 3])
    parser.add_argument(
        "--engine_images",
        type=benchlib.int_list,
        default=[],
        help="engine comparison: generated folders of these many images (two sizes separate "
        "fixed costs from the per-image rate), prepared with each --engines entry",
    )
    parser.add_argument(
        "--engines",
        default="local,beam1,beam2,plain1,plain2",
        help="local; beamN: the Beam engine with N local worker processes; plainN: the Beam "
        "workers' shard work in N plain processes, no Beam (the ceiling of N workers here)",
    )
    parser.add_argument("--engine_rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--json_out", default=None, help="also write the results as JSON here")
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


def mnist_part(args, work_dir, results):
    start = time.perf_counter()
    source = data_pipeline.load_source(args.source_dir, allow_download=False)
    load_s = time.perf_counter() - start
    total = sum(source.num_records(split) for split in source.splits)
    print(f"source: {source.name}, {total} examples, read+validated in {load_s:.2f} s")
    plain_dir = os.path.join(work_dir, "mnist-plain")
    plain_s, spec = time_prepare(plain_dir, args.source_dir, args.records_per_shard, None)
    print(
        f"prepare (uncompressed, incl. reading the source): {plain_s:.2f} s for {total} "
        f"examples, {bytes_per_example(spec):.1f} bytes/example"
    )
    gzip_dir = os.path.join(work_dir, "mnist-gzip")
    gzip_s, gzip_spec = time_prepare(gzip_dir, args.source_dir, args.records_per_shard, "GZIP")
    print(f"prepare (GZIP): {gzip_s:.2f} s, {bytes_per_example(gzip_spec):.1f} bytes/example")
    results["mnist"] = {
        "prepare_s": plain_s,
        "prepare_gzip_s": gzip_s,
        "bytes_per_example": bytes_per_example(spec),
        "bytes_per_example_gzip": bytes_per_example(gzip_spec),
        "pipeline_examples_per_sec": {},
    }
    for batch_size in args.batch_sizes:
        rate = throughput(plain_dir, batch_size, args.seconds)
        results["mnist"]["pipeline_examples_per_sec"][batch_size] = rate
        print(f"pipeline, train, shuffled, batch {batch_size}: {rate:,.0f} examples/s")
    rate = throughput(gzip_dir, 512, args.seconds)
    results["mnist"]["pipeline_gzip_512_examples_per_sec"] = rate
    print(f"pipeline, train, shuffled, batch 512, GZIP shards: {rate:,.0f} examples/s")
    if not args.skip_tutorial:
        path = os.path.join(work_dir, "tutorial.tfrecord")
        seconds, count, size = tutorial_writer(source, path, args.tutorial_limit)
        results["mnist"]["tutorial_writer"] = {"s": seconds, "examples": count, "bytes": size}
        print(
            f"tutorial-style writer (FloatList, one example at a time): {seconds:.2f} s for "
            f"{count} examples ({seconds / count * total:.1f} s per {total}), "
            f"{size:.1f} bytes/example"
        )
    for folder in (plain_dir, gzip_dir):
        shutil.rmtree(folder, ignore_errors=True)


def split_counts(count):
    test = count // 10
    return {"train": count - test, "test": test}


def image_folder(work_dir, count, largest, shape):
    """The generated folder of ``count`` images: hard links to the first files of the largest."""
    tag = "x".join(map(str, shape))
    full = os.path.join(work_dir, f"images-{tag}-{largest}")
    if not os.path.isfile(os.path.join(full, ".complete")):
        benchlib.log(f"generating {largest} PNG files of {tag} in {full} (kept for reruns)")
        shutil.rmtree(full, ignore_errors=True)
        write_synthetic_folder(full, split_counts(largest), tuple(shape))
        open(os.path.join(full, ".complete"), "w").close()
    if count == largest:
        return full
    subset = os.path.join(work_dir, f"images-{tag}-{count}")
    shutil.rmtree(subset, ignore_errors=True)
    for split, n in split_counts(count).items():
        for index in range(n):
            name = os.path.join(split, f"class_{index % 10:02d}", f"{index:08d}.png")
            os.makedirs(os.path.dirname(os.path.join(subset, name)), exist_ok=True)
            os.link(os.path.join(full, name), os.path.join(subset, name))
    return subset


def prepare_command(source_dir, data_dir, *flags):
    """``python main.py --mode=prepare`` for ``source_dir`` into ``data_dir``, plus ``flags``."""
    return [
        sys.executable,
        os.path.join(REPO, "main.py"),
        "--mode=prepare",
        f"--source_dir={source_dir}",
        f"--data_dir={data_dir}",
        *flags,
    ]


def prepare_process(source_dir, data_dir):
    """Runs ``main.py --mode=prepare`` in a fresh process; returns (seconds, peak RSS in MiB)."""
    run = benchlib.run_peak_rss(prepare_command(source_dir, data_dir, "--overwrite"))
    if run["returncode"] != 0:
        sys.exit(f"bench_data.py: prepare failed: {run['stderr'].strip()[-2000:]}")
    return run["seconds"], run["peak_mib"]


def startup_seconds(source_dir, data_dir):
    """Seconds a prepare process takes for an already prepared folder (start-up, no writing)."""
    start = time.perf_counter()
    subprocess.run(
        prepare_command(source_dir, data_dir),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def images_part(args, work_dir, results):
    largest = max(args.image_counts)
    rows = []
    results["image_folders"] = []
    for count in sorted(args.image_counts):
        source_dir = image_folder(work_dir, count, largest, args.image_shape)
        data_dir = os.path.join(work_dir, f"prepared-{count}")
        seconds, peak_mib = prepare_process(source_dir, data_dir)
        # A rerun finds the output complete: what remains is start-up and the source scan.
        fixed = startup_seconds(source_dir, data_dir)
        spec = data_pipeline.load_spec(data_dir)
        shard_bytes = sum(os.path.getsize(f) for s in spec.splits for f in spec.files(s))
        decoded_mib = count * math.prod(args.image_shape) / 2**20
        rate = throughput(data_dir, 128, args.seconds)
        row = {
            "images": count,
            "prepare_s": seconds,
            "images_per_sec": count / seconds,
            "rerun_s": fixed,
            "peak_rss_mib": peak_mib,
            "decoded_mib": decoded_mib,
            "shard_bytes": shard_bytes,
            "shards": sum(len(spec.files(s)) for s in spec.splits),
            "reader_examples_per_sec": rate,
        }
        results["image_folders"].append(row)
        rows.append(
            [
                f"{count:,}",
                f"{seconds:.1f}",
                f"{count / seconds:,.0f}",
                f"{fixed:.1f}",
                f"{peak_mib:,.0f}",
                f"{decoded_mib:,.0f}",
                f"{shard_bytes / 1e9:.2f} GB in {row['shards']}",
                f"{rate:,.0f}",
            ]
        )
        shutil.rmtree(data_dir, ignore_errors=True)
        benchlib.log(f"{count} images: {seconds:.1f} s, peak {peak_mib:.0f} MiB, {rate:.0f} ex/s")
    tag = "x".join(map(str, args.image_shape))
    print(f"image folders ({tag} PNG, 10 classes, 90 % train), prepare in a fresh process:")
    benchlib.print_table(
        [
            "images",
            "prepare s",
            "images/s",
            "rerun s",
            "peak RSS MiB",
            "decoded MiB",
            "shards",
            "reader ex/s (b128, shuffled)",
        ],
        rows,
    )


def _descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def _rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_tree_peak_rss(args):
    """Runs a command; returns seconds and the peak of its whole process tree's resident memory.

    Beam's local workers are separate processes, so the driver's own VmHWM would miss them: the
    sum of VmRSS over the process and all its descendants is sampled every 100 ms.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        list(args),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    peak_kib = 0
    while proc.poll() is None:
        peak_kib = max(peak_kib, sum(_rss_kib(pid) for pid in _descendants(proc.pid)))
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"bench_data.py: {' '.join(args)} failed: {stderr.strip()[-2000:]}")
    return seconds, peak_kib / 1024


def engine_command(engine, source_dir, data_dir):
    """The command for ``local``, ``beamN`` (the Beam engine with N local workers) or ``plainN``.

    ``plainN``: the Beam workers' shard work in N plain processes without Beam
    (``plain_workers.py``), the ceiling of N workers on this machine.
    """
    if engine.startswith("plain"):
        script = os.path.join(REPO, "bench", "plain_workers.py")
        return [sys.executable, script, source_dir, data_dir, engine[len("plain") :]]
    flags = ["--overwrite"]
    if engine != "local":
        workers = int(engine[len("beam") :])
        flags += ["--prepare_engine=beam", f"--beam_options=--direct_num_workers={workers}"]
    return prepare_command(source_dir, data_dir, *flags)


def engines_part(args, work_dir, results):
    """Each engine prepares the same folders, in alternating rounds, in a fresh process.

    With two folder sizes, the difference between them gives each engine's rate without its
    fixed costs (process start, TensorFlow imported by every Beam worker, Beam's set-up and
    tear-down): the figure that scales to millions of images.
    """
    counts = sorted(args.engine_images)
    largest = counts[-1]
    engines = args.engines.split(",")
    runs = {(engine, count): [] for engine in engines for count in counts}
    for round_ in range(args.engine_rounds):
        order = engines if round_ % 2 == 0 else engines[::-1]
        for count in counts:
            source_dir = image_folder(work_dir, count, largest, args.image_shape)
            for engine in order:
                data_dir = os.path.join(work_dir, f"prepared-{engine}")
                seconds, peak_mib = run_tree_peak_rss(engine_command(engine, source_dir, data_dir))
                shutil.rmtree(data_dir, ignore_errors=True)
                runs[engine, count].append({"seconds": seconds, "peak_mib": peak_mib})
                benchlib.log(
                    f"round {round_ + 1}, {count} images, {engine}: {seconds:.1f} s, "
                    f"peak {peak_mib:.0f} MiB"
                )
    rows, summary = [], {}
    for engine in engines:
        best = {count: min(run["seconds"] for run in runs[engine, count]) for count in counts}
        peak = {count: max(run["peak_mib"] for run in runs[engine, count]) for count in counts}
        marginal = None
        if len(counts) > 1 and best[largest] > best[counts[0]]:
            marginal = (largest - counts[0]) / (best[largest] - best[counts[0]])
        summary[engine] = {
            "best_s": best,
            "images_per_sec": {count: count / best[count] for count in counts},
            "peak_mib": peak,
            "marginal_images_per_sec": marginal,
        }
        for count in counts:
            times = ", ".join(f"{run['seconds']:.1f}" for run in runs[engine, count])
            extra = ""
            if count == largest and len(counts) > 1:
                # None: the larger folder was not slower (noise swamped the per-image time).
                extra = f"{marginal:,.0f}" if marginal else "n/a (noise)"
            rows.append(
                [
                    engine,
                    f"{count:,}",
                    times,
                    f"{count / best[count]:,.0f}",
                    extra,
                    f"{peak[count]:,.0f}",
                ]
            )
    results["engines"] = {
        "runs": {f"{engine}/{count}": r for (engine, count), r in runs.items()},
        "summary": summary,
    }
    tag = "x".join(map(str, args.image_shape))
    print(f"engines on {tag} PNGs (fresh process each, alternating rounds):")
    benchlib.print_table(
        [
            "engine",
            "images",
            "seconds per round",
            "images/s (best)",
            "images/s without fixed costs",
            "peak RSS MiB (process tree)",
        ],
        rows,
    )
    for key, label in (("images_per_sec", "whole runs"), ("marginal_images_per_sec", "")):
        if key == "marginal_images_per_sec" and len(counts) == 1:
            continue

        def rate(engine, key=key):
            value = summary[engine][key]
            return value[largest] if isinstance(value, dict) else value

        label = label or f"without fixed costs ({counts[0]:,} -> {largest:,} images)"
        if "beam1" in engines and "beam2" in engines and rate("beam1") and rate("beam2"):
            print(f"{label}: beam2 / beam1 {rate('beam2') / rate('beam1'):.2f}x (goal >= 1.6x)")
        if "local" in engines and "beam2" in engines and rate("local") and rate("beam2"):
            print(f"{label}: beam2 / local {rate('beam2') / rate('local'):.2f}x (goal >= 0.8x)")
        if "plain1" in engines and "plain2" in engines and rate("plain1") and rate("plain2"):
            ceiling = rate("plain2") / rate("plain1")
            print(f"{label}: plain2 / plain1 {ceiling:.2f}x (2 workers' ceiling on this machine)")
            for n in (1, 2):
                if f"beam{n}" in engines and rate(f"beam{n}"):
                    share = rate(f"beam{n}") / rate(f"plain{n}")
                    print(f"{label}: beam{n} / plain{n} {share:.2f}x (Beam's own cost)")


def main(argv=None):
    args = parse_args(argv)
    command = benchlib.command_line(
        __file__,
        args,
        [
            "source_dir",
            "work_dir",
            "batch_sizes",
            "seconds",
            "records_per_shard",
            "tutorial_limit",
            "skip_tutorial",
            "skip_mnist",
            "image_counts",
            "image_shape",
            "engine_images",
            "engines",
            "engine_rounds",
            "json_out",
        ],
    )
    benchlib.print_header("data pipeline", command, benchlib.machine_info())
    os.makedirs(args.work_dir, exist_ok=True)
    results = {}
    if not args.skip_mnist:
        if not args.source_dir:
            sys.exit("bench_data.py: pass --source_dir or set MNIST_DIR (or --skip_mnist)")
        mnist_part(args, args.work_dir, results)
    if args.image_counts:
        images_part(args, args.work_dir, results)
    if args.engine_images:
        engines_part(args, args.work_dir, results)
    benchlib.write_json(args.json_out, {"command": command, "results": results})
    print(f"reproduce: {command}")


if __name__ == "__main__":
    main()
