"""Serving speed of an exported network: the SavedModel's ``serving_default`` signature.

Trains the network briefly through ``jobs.train`` (``--train_steps``; or exports an
existing checkpoint with ``--checkpoint_path``), exports it with ``jobs.export``,
loads the SavedModel with ``tf.saved_model.load`` and calls ``serving_default`` on real test
images (float32 ``[batch, 28, 28, 1]`` in [0, 1]):

* latency at batch 1: ``--latency_calls`` timed calls after ``--warmup_calls`` untimed ones,
  each call timed alone (result fetched to numpy); prints p50, p90, p99 and mean in ms;
* throughput at batch ``--throughput_batch`` (512): ``--throughput_calls`` back-to-back calls
  after a few warm-up calls; prints examples/s, and the accuracy of the returned classes on the
  images served, as a sanity check of the export.

Quick check::

    .venv/bin/python bench/bench_serving.py --train_steps=20 --latency_calls=50 --throughput_calls=5
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tfenv  # noqa: E402 - must precede TensorFlow

tfenv.silence_python_logging()

import benchlib  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import data_pipeline  # noqa: E402
import estimator_bridge  # noqa: E402
import jobs  # noqa: E402
import keras_models  # noqa: E402

SIGNATURE = "serving_default"
FLAG_ORDER = (
    "model",
    "train_steps",
    "checkpoint_path",
    "precision",
    "warmup_calls",
    "latency_calls",
    "throughput_batch",
    "throughput_calls",
    "work_dir",
    "source_dir",
    "json_out",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cnn", choices=keras_models.MODEL_NAMES)
    parser.add_argument("--train_steps", type=int, default=200, help="Training before export.")
    parser.add_argument(
        "--checkpoint_path",
        default=None,
        help="Export this checkpoint (prefix or model dir) instead of training; it must be of "
        "--model.",
    )
    parser.add_argument("--precision", default="float32", choices=estimator_bridge.PRECISIONS)
    parser.add_argument("--warmup_calls", type=int, default=50)
    parser.add_argument("--latency_calls", type=int, default=500)
    parser.add_argument("--throughput_batch", type=int, default=512)
    parser.add_argument("--throughput_calls", type=int, default=50)
    parser.add_argument("--work_dir", default=benchlib.DEFAULT_WORK_DIR)
    parser.add_argument(
        "--source_dir", default=benchlib.default_source_dir(), help="MNIST (default $MNIST_DIR)."
    )
    parser.add_argument("--json_out", default=None, help="Write results as JSON here.")
    args = parser.parse_args(argv)
    for name in ("train_steps", "latency_calls", "throughput_batch", "throughput_calls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    if args.warmup_calls < 0:
        parser.error("--warmup_calls must be >= 0")
    if args.checkpoint_path:
        args.train_steps = None  # not used; keeps it out of the printed command
        args.checkpoint_path = os.path.abspath(args.checkpoint_path)
    args.work_dir = os.path.abspath(args.work_dir)
    return args


def export_model(args, data_dir: str) -> Dict[str, Any]:
    """Trains (unless --checkpoint_path) and exports; returns jobs.export's result."""
    base = os.path.join(args.work_dir, "serving", f"{args.model}-{args.precision}")
    model_dir = os.path.join(base, "model")
    config = estimator_bridge.Config(
        model=args.model,
        data_dir=data_dir,
        model_dir=model_dir,
        precision=args.precision,
        checkpoint_path=args.checkpoint_path,
        export_dir=os.path.join(base, "export"),
        progress=False,
    )
    shutil.rmtree(config.export_dir, ignore_errors=True)  # one SavedModel version per run
    if not args.checkpoint_path:
        shutil.rmtree(model_dir, ignore_errors=True)
        config.train_steps = args.train_steps
        jobs.train(config)
    return jobs.export(config)


def percentile(values_ms: List[float], q: float) -> float:
    return float(np.percentile(np.asarray(values_ms), q))


def main(argv=None) -> int:
    args = parse_args(argv)
    command = benchlib.command_line(__file__, args, FLAG_ORDER)
    info = benchlib.machine_info()
    benchlib.print_header(f"serving: {args.model} SavedModel, {SIGNATURE}", command, info)
    data_dir = benchlib.ensure_project_data(args.work_dir, args.source_dir)
    exported = export_model(args, data_dir)
    path = exported["saved_model"]
    print(f"exported {exported['checkpoint']} -> {path}")

    loaded = tf.saved_model.load(path)
    serve = loaded.signatures[SIGNATURE]
    inputs = serve.structured_input_signature[1]
    input_name = "image" if "image" in inputs else next(iter(inputs))
    described = ", ".join(f"{k}: {v.dtype.name} {v.shape}" for k, v in inputs.items())
    print(f"{SIGNATURE}: inputs {{{described}}} -> outputs {sorted(serve.structured_outputs)}")

    images, labels = data_pipeline.load_source(args.source_dir).splits["test"]
    images = (images.astype(np.float32) / 255.0)[..., np.newaxis]

    # Latency at batch 1: distinct real images, each call timed alone.
    singles = [tf.constant(images[i : i + 1]) for i in range(min(len(images), 1000))]
    for i in range(args.warmup_calls):
        serve(**{input_name: singles[i % len(singles)]})["classes"].numpy()
    latencies = []
    for i in range(args.latency_calls):
        x = singles[i % len(singles)]
        start = time.perf_counter()
        serve(**{input_name: x})["classes"].numpy()
        latencies.append(1000 * (time.perf_counter() - start))
    latency = {
        "calls": args.latency_calls,
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "mean_ms": float(np.mean(latencies)),
        "min_ms": float(np.min(latencies)),
    }

    # Throughput at a large batch: back-to-back calls over the test split.
    batch = args.throughput_batch
    starts = list(range(0, max(len(images) - batch, 0) + 1, batch)) or [0]
    batches = [(tf.constant(images[s : s + batch]), labels[s : s + batch]) for s in starts]
    for i in range(min(3, args.warmup_calls) or 1):
        serve(**{input_name: batches[i % len(batches)][0]})["classes"].numpy()
    correct = served = 0
    start = time.perf_counter()
    for i in range(args.throughput_calls):
        x, y = batches[i % len(batches)]
        classes = serve(**{input_name: x})["classes"].numpy()
        correct += int(np.sum(classes == y))
        served += len(y)
    elapsed = time.perf_counter() - start
    throughput = {
        "batch_size": batch,
        "calls": args.throughput_calls,
        "examples_per_sec": served / elapsed,
        "ms_per_batch": 1000 * elapsed / args.throughput_calls,
        "accuracy_on_served": correct / max(served, 1),
    }

    print()
    print(f"{args.model} ({args.precision}) via tf.saved_model.load(...).signatures[{SIGNATURE!r}]")
    benchlib.print_table(
        ["measure", "value"],
        [
            ["batch 1 latency p50", f"{latency['p50_ms']:.2f} ms"],
            ["batch 1 latency p90", f"{latency['p90_ms']:.2f} ms"],
            ["batch 1 latency p99", f"{latency['p99_ms']:.2f} ms"],
            ["batch 1 latency mean", f"{latency['mean_ms']:.2f} ms"],
            [f"  ({args.latency_calls} calls after {args.warmup_calls} warm-up)", ""],
            [f"batch {batch} throughput", f"{throughput['examples_per_sec']:,.0f} examples/s"],
            [f"batch {batch} time per call", f"{throughput['ms_per_batch']:.1f} ms"],
            [f"  ({args.throughput_calls} calls)", ""],
            ["accuracy on the served images", f"{100 * throughput['accuracy_on_served']:.2f}%"],
        ],
    )
    print(f"command: {command}")
    benchlib.write_json(
        args.json_out,
        {
            "benchmark": "serving",
            "command": command,
            "machine": info,
            "settings": {k: getattr(args, k) for k in FLAG_ORDER},
            "saved_model": path,
            "checkpoint": exported["checkpoint"],
            "latency_batch1": latency,
            "throughput": throughput,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
