r"""Serving speed of the exported networks: the engines and paths serving one export, side by side.

For every network in ``--models``: trains it briefly through ``jobs.train`` (``--train_steps``;
weights' values do not change the speed; a model dir already at that step is reused) and exports
it with ``jobs.export``, which writes the SavedModel and, with the ``onnx`` extra, its
``model.onnx``. ``mobilenet_v2`` is a user model of realistic size:
``tf_keras.applications:MobileNetV2`` (224x224x3, 1,000 classes, ``weights=None``) trained
``--mobilenet_steps`` steps of 8 through the bridge on a generated 224x224 image folder (1,000
classes). Then it measures each path, each run in a fresh process, in alternating rounds whose
order rotates:

* ``serving``: ``serving.load(path)``, the recommended in-process path: its own engine choice
  (onnxruntime and TensorFlow timed at batch 1 and on a large batch during the load, the faster
  kept, large batches possibly routed to the other; the run reports which, and what the timing
  found);
* ``serving_onnxruntime``: ``serving.load(path, engine="onnxruntime")``: forced, no timing (its
  load time against ``serving``'s is what the choice costs);
* ``onnxruntime``: a bare ``onnxruntime.InferenceSession`` on the same ``model.onnx`` (default
  options), ``session.run(["probabilities", "classes"], {"image": x})``;
* ``openvino``: OpenVINO's ``compile_model`` on the same ``model.onnx`` (CPU, float32
  inference precision, otherwise default settings), when ``openvino`` imports (not an extra of
  the project: see docs/serving.md);
* ``serving_tensorflow``: ``serving.load(path, engine="tensorflow")``: the SavedModel frozen
  into a Session, XLA for small batches when it was faster at load;
* ``serving_session`` / ``serving_xla``: the same with XLA forced off / on;
* ``tf1_session``: ``tf.compat.v1.saved_model.load`` into a ``Session`` with the default
  config, then ``Session.run`` feeding ``image``: the graph and runtime TF Serving uses;
* ``tf2_signature``: ``tf.saved_model.load(path).signatures["serving_default"](image=...)``.

Every path is handed numpy float32 images in [0, 1] (real MNIST test digits; generated ones for
mobilenet_v2) and returns numpy probabilities; converting them is part of each call. Per run:
the load time (``load_s``; for ``serving``, its timing of the engines included), batch-1
latency over ``--latency_calls`` distinct images after ``--warmup_calls``, each call timed alone
(p50, p90, p99), and batch-``--throughput_batch`` examples/s over ``--throughput_calls``
back-to-back calls after ``--throughput_warmup`` untimed ones. Each run also returns the
probabilities of the first 256 images, and the report gives every path's largest difference
from ``tf1_session``'s. The summary has the median over rounds of each figure and each path's
ratio to bare onnxruntime's (latency: path / onnxruntime, the goal for ``serving`` at most 1.05x
at p50 and 1.2x at p99; throughput: path / onnxruntime, the goal at least 1.0x). All processes
inherit ``tfenv``'s settings (oneDNN kernels on).

Quick check::

    .venv/bin/python bench/bench_serving.py --models=cnn --train_steps=20 --rounds=1 \
        --latency_calls=50 --throughput_calls=2
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import shutil
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import benchlib  # puts the repo root on sys.path and imports tfenv before TensorFlow
import numpy as np

import data_pipeline
import estimator_bridge
import jobs
import keras_models

PATHS = (
    "serving",
    "serving_onnxruntime",
    "onnxruntime",
    "openvino",
    "serving_tensorflow",
    "serving_session",
    "serving_xla",
    "tf1_session",
    "tf2_signature",
)
# openvino only where it imports (it is not an extra of the project).
DEFAULT_PATHS = tuple(
    path
    for path in ("serving", "onnxruntime", "openvino", "serving_tensorflow", "tf1_session")
    if path != "openvino" or importlib.util.find_spec("openvino") is not None
)
# Paths whose one predictor may be called from several threads at once (OpenVINO's single infer
# request may not).
THREAD_SAFE = ("serving", "serving_onnxruntime", "onnxruntime", "serving_tensorflow", "tf1_session")
MOBILENET = "mobilenet_v2"
MODELS = (*keras_models.MODEL_NAMES, MOBILENET)
REFERENCE = "tf1_session"  # the path whose probabilities the others are compared with
CHECKED = 256  # test images whose probabilities every run returns
FLAG_ORDER = (
    "models",
    "paths",
    "train_steps",
    "rounds",
    "warmup_calls",
    "latency_calls",
    "throughput_batch",
    "throughput_calls",
    "throughput_warmup",
    "threads",
    "interleaved",
    "mobilenet_steps",
    "work_dir",
    "source_dir",
    "json_out",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=benchlib.csv_list, default=list(MODELS))
    parser.add_argument("--paths", type=benchlib.csv_list, default=list(DEFAULT_PATHS))
    parser.add_argument("--train_steps", type=int, default=200, help="Training before export.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup_calls", type=int, default=50)
    parser.add_argument("--latency_calls", type=int, default=500)
    parser.add_argument("--throughput_batch", type=int, default=512)
    parser.add_argument("--throughput_calls", type=int, default=10)
    parser.add_argument("--throughput_warmup", type=int, default=3, help="Untimed batch calls.")
    parser.add_argument(
        "--threads", type=int, default=8, help="Threads sharing one predictor (batch 1); 1: off."
    )
    parser.add_argument(
        "--interleaved",
        action="store_true",
        help="Instead: serving.load against bare onnxruntime, calls alternating in one process.",
    )
    parser.add_argument("--mobilenet_steps", type=int, default=3, help="mobilenet_v2's training.")
    parser.add_argument("--work_dir", default=benchlib.DEFAULT_WORK_DIR)
    parser.add_argument(
        "--source_dir", default=benchlib.default_source_dir(), help="MNIST (default $MNIST_DIR)."
    )
    parser.add_argument("--json_out", default=None, help="Write results as JSON here.")
    args = parser.parse_args(argv)
    for name in ("models", "paths"):
        allowed = MODELS if name == "models" else PATHS
        unknown = [v for v in getattr(args, name) if v not in allowed]
        if unknown or not getattr(args, name):
            parser.error(f"--{name}: choose from {', '.join(allowed)}")
    for name in (
        "train_steps",
        "rounds",
        "latency_calls",
        "throughput_batch",
        "throughput_calls",
        "mobilenet_steps",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    if args.warmup_calls < 0 or args.throughput_warmup < 0:
        parser.error("--warmup_calls and --throughput_warmup must be >= 0")
    args.work_dir = os.path.abspath(args.work_dir)
    return args


# --------------------------------------------------------------------------------------------
# Export and conversion (in this process)
# --------------------------------------------------------------------------------------------


def export_model(args, data_dir: str, model: str) -> Dict[str, str]:
    """Trains to ``--train_steps`` (reusing a model dir at that step) and exports (with ONNX)."""
    base = os.path.join(args.work_dir, "serving", model)
    steps = args.train_steps
    settings: Dict[str, Any] = {}
    if model == MOBILENET:
        data_dir = mobilenet_data(args)
        steps = args.mobilenet_steps
        settings = dict(
            model="tf_keras.applications:MobileNetV2",
            model_params={"weights": None, "classes": 1000},
            batch_size=8,
        )
    config = estimator_bridge.Config(
        **{"model": model, **settings},
        data_dir=data_dir,
        model_dir=os.path.join(base, "model"),
        export_dir=os.path.join(base, "export"),
        train_steps=steps,
        seed=0,
        progress=False,
    )
    if estimator_bridge.global_step_of(config.model_dir) != steps:
        shutil.rmtree(config.model_dir, ignore_errors=True)
    jobs.train(config)
    shutil.rmtree(config.export_dir, ignore_errors=True)  # one version: the one measured
    exported = jobs.export(config)
    if not exported["onnx"] and {"onnxruntime", "openvino"} & set(args.paths):
        raise SystemExit(f"error: {model}'s export has no model.onnx (install the onnx extra)")
    benchlib.log(f"{model}: exported {exported['saved_model']}")
    return {"saved_model": exported["saved_model"], "onnx": exported["onnx"]}


def mobilenet_data(args) -> str:
    """A prepared data dir of generated 224x224x3 PNGs in 1,000 classes (one image each)."""
    from data_pipeline.images import write_synthetic_folder
    from data_pipeline.spec import SPEC_NAME

    root = os.path.join(args.work_dir, "serving", "mobilenet_data")
    data_dir = os.path.join(root, "prepared")
    if not os.path.exists(os.path.join(data_dir, SPEC_NAME)):
        shutil.rmtree(root, ignore_errors=True)
        folder = write_synthetic_folder(
            os.path.join(root, "images"), {"train": 1000, "test": 1000}, (224, 224, 3), 1000
        )
        source = data_pipeline.load_source(str(folder))
        data_pipeline.prepare(data_dir, source=source, progress=False)
    return data_dir


# --------------------------------------------------------------------------------------------
# One timed run (in a fresh process)
# --------------------------------------------------------------------------------------------


def make_predict(path: str, saved_model: str, onnx_path: str) -> Callable[[np.ndarray], Any]:
    """Loads ``saved_model`` (or its ``model.onnx``) the ``path`` way.

    Returns:
        ``predict(images) -> probabilities`` (numpy in, numpy out); for the ``serving*`` paths
        with the loaded model as its ``served`` attribute.
    """
    if path == "tf2_signature":
        import tensorflow as tf

        signature = tf.saved_model.load(saved_model).signatures["serving_default"]
        return lambda x: signature(image=tf.constant(x))["probabilities"].numpy()
    if path == "tf1_session":
        import tensorflow as tf

        graph = tf.Graph()
        session = tf.compat.v1.Session(graph=graph)
        with graph.as_default():
            meta_graph = tf.compat.v1.saved_model.load(session, ["serve"], saved_model)
        signature = meta_graph.signature_def["serving_default"]
        image = signature.inputs["image"].name
        fetches = [signature.outputs[k].name for k in ("probabilities", "classes")]
        return lambda x: session.run(fetches, {image: x})[0]
    if path.startswith("serving"):
        import serving

        options = {
            "serving": {},
            "serving_onnxruntime": {"engine": "onnxruntime"},
            "serving_tensorflow": {"engine": "tensorflow"},
            "serving_session": {"engine": "tensorflow", "xla": False},
            "serving_xla": {"engine": "tensorflow", "xla": True},
        }[path]
        served = serving.load(saved_model, **options)

        def predict(x):
            return served(image=x)["probabilities"]

        predict.served = served
        return predict
    if path == "openvino":
        import openvino

        # float32 as the other engines: on a CPU with bfloat16 units OpenVINO defaults to them
        # (probabilities then differ by ~1e-3).
        compiled = openvino.Core().compile_model(
            onnx_path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
        )
        request = compiled.create_infer_request()
        output = compiled.output("probabilities")
        return lambda x: request.infer({"image": x})[output]
    import onnxruntime

    ort = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    return lambda x: ort.run(["probabilities", "classes"], {"image": x})[0]


def test_images(args, model: str) -> np.ndarray:
    """The images every path is fed: MNIST's test digits, or generated 224x224x3 ones."""
    if model == MOBILENET:
        count = max(CHECKED, args.throughput_batch, 1000)
        return np.random.default_rng(0).random((count, 224, 224, 3), dtype=np.float32)
    images, _ = data_pipeline.load_source(args.source_dir).splits["test"]
    return (images.astype(np.float32) / 255.0)[..., np.newaxis]


def measure(args, path: str, model: str, files: Dict[str, str]) -> Dict[str, Any]:
    """Loads one path and times it -> result dict (or ``{"error": ...}``)."""
    try:
        images = test_images(args, model)
        started = time.perf_counter()
        predict = make_predict(path, files["saved_model"], files["onnx"])
        load_s = time.perf_counter() - started
        served = getattr(predict, "served", None)
        checked = np.asarray(predict(images[:CHECKED]))

        singles = [images[i : i + 1] for i in range(1000)]
        for i in range(args.warmup_calls):
            predict(singles[i % len(singles)])
        latencies = []
        for i in range(args.latency_calls):
            x = singles[i % len(singles)]
            start = time.perf_counter()
            predict(x)
            latencies.append(1000 * (time.perf_counter() - start))

        batch = args.throughput_batch
        starts = range(0, max(len(images) - batch, 0) + 1, batch)
        batches = [images[s : s + batch] for s in starts]
        for i in range(args.throughput_warmup):
            predict(batches[i % len(batches)])
        start = time.perf_counter()
        for i in range(args.throughput_calls):
            predict(batches[i % len(batches)])
        elapsed = time.perf_counter() - start
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
        threaded = None
        if path in THREAD_SAFE:
            threaded = threaded_rate(predict, singles, args.threads, args.latency_calls)
        return {
            "load_s": load_s,
            "engine": None if served is None else served.engine,
            "engine_timings_ms": None if served is None else served.engine_timings,
            "large_batch": None if served is None else large_batch(served),
            "p50_ms": float(p50),
            "p90_ms": float(p90),
            "p99_ms": float(p99),
            "examples_per_sec": args.throughput_calls * len(batches[0]) / elapsed,
            "threaded_calls_per_sec": threaded,
            "probabilities": checked.tolist(),
        }
    except Exception as error:  # noqa: BLE001 - report, keep the other runs going
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"}


def threaded_rate(predict, singles, threads: int, calls: int) -> Optional[float]:
    """Batch-1 calls/s of one predictor called from ``threads`` threads at once (``calls``)."""
    if threads < 2:
        return None
    barrier = threading.Barrier(threads + 1)
    per_thread = max(calls // threads, 1)

    def work(offset):
        barrier.wait()
        for i in range(per_thread):
            predict(singles[(offset + i) % len(singles)])

    workers = [threading.Thread(target=work, args=(t * per_thread,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    return threads * per_thread / (time.perf_counter() - start)


def interleaved(args, model: str, files: Dict[str, str]) -> Dict[str, Any]:
    """``serving.load`` and bare onnxruntime on the same file, calls alternating in one process.

    Machine load that drifts between fresh-process runs hits both alike here.

    Returns:
        ``{"serving": {...}, "onnxruntime": {...}}``: batch-1 p50/p90/p99 ms, batch examples/s.
    """
    try:
        import onnxruntime

        import serving

        images = test_images(args, model)
        served = serving.load(files["saved_model"])
        ort = onnxruntime.InferenceSession(files["onnx"], providers=["CPUExecutionProvider"])
        calls = {
            "serving": lambda x: served(image=x)["probabilities"],
            "onnxruntime": lambda x: ort.run(["probabilities", "classes"], {"image": x})[0],
        }
        singles = [images[i : i + 1] for i in range(1000)]
        times: Dict[str, List[float]] = {name: [] for name in calls}
        for i in range(args.warmup_calls + args.latency_calls):
            order = list(calls) if i % 2 else list(calls)[::-1]
            for name in order:
                start = time.perf_counter()
                calls[name](singles[i % len(singles)])
                if i >= args.warmup_calls:
                    times[name].append(1000 * (time.perf_counter() - start))
        batch = images[: args.throughput_batch]
        spent = {name: 0.0 for name in calls}
        for i in range(args.throughput_calls + args.throughput_warmup):
            for name in list(calls) if i % 2 else list(calls)[::-1]:
                start = time.perf_counter()
                calls[name](batch)
                if i >= args.throughput_warmup:
                    spent[name] += time.perf_counter() - start
        result = {}
        for name in calls:
            p50, p90, p99 = np.percentile(times[name], [50, 90, 99])
            rate = args.throughput_calls * len(batch) / spent[name]
            result[name] = {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "examples_per_sec": rate}
        result["engine"] = served.engine
        result["engine_timings_ms"] = served.engine_timings
        result["large_batch"] = large_batch(served)
        return result
    except Exception as error:  # noqa: BLE001 - report, keep the other runs going
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"}


def run_isolated(args, path: str, model: str, files: Dict[str, str]) -> Dict[str, Any]:
    """:func:`measure` in a fresh process (``spawn``): no thread pool or cache of another path."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (args, path, model, files))


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

FIGURES = ("p50_ms", "p90_ms", "p99_ms", "examples_per_sec", "threaded_calls_per_sec", "load_s")


def summarise(args, runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Median of each figure over the rounds, ratios to onnxruntime, largest difference."""
    rows = []
    for model in args.models:
        good = [r for r in runs if r["model"] == model and not r.get("error")]
        reference = [np.asarray(r["probabilities"]) for r in good if r["path"] == REFERENCE]
        medians = {}
        for path in args.paths:
            case = [r for r in good if r["path"] == path]
            medians[path] = {
                f: benchlib.median([r[f] for r in case if r.get(f) is not None]) for f in FIGURES
            }
            medians[path]["rounds"] = len(case)
            # The engines serving.load chose, e.g. "onnxruntime" or "onnxruntime 2, tensorflow 1".
            engines = [r["engine"] for r in case if r.get("engine")]
            medians[path]["engine"] = ", ".join(
                f"{e} {engines.count(e)}" if len(set(engines)) > 1 else e
                for e in sorted(set(engines))
            )
            medians[path]["max_abs_diff"] = (
                max(
                    float(np.abs(np.asarray(r["probabilities"]) - reference[0]).max()) for r in case
                )
                if case and reference
                else None
            )
        ort = medians.get("onnxruntime")
        for path in args.paths:
            row = {"model": model, "path": path, **medians[path]}
            if ort and ort["rounds"]:
                row["p50_ratio"] = row["p50_ms"] / ort["p50_ms"]
                row["p99_ratio"] = row["p99_ms"] / ort["p99_ms"]
                row["throughput_ratio"] = row["examples_per_sec"] / ort["examples_per_sec"]
            rows.append(row)
    return rows


def print_summary(args, rows: List[Dict[str, Any]]) -> None:
    def ratio(row, key):
        value = row.get(key)
        return "-" if value is None or value != value else f"{value:.2f}x"

    print()
    print(
        f"median of {args.rounds} round(s); batch 1: {args.latency_calls} calls after "
        f"{args.warmup_calls} warm-up; batch {args.throughput_batch}: {args.throughput_calls} "
        "calls; ratios to bare onnxruntime (goal for serving: p50 <= 1.05x, p99 <= 1.2x, "
        "examples/s >= 1.0x)"
    )
    benchlib.print_table(
        [
            "network",
            "path",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            f"b{args.throughput_batch} ex/s",
            "p50/ort",
            "p99/ort",
            "ex/s/ort",
            f"b1 x{args.threads} calls/s",
            "load s",
            "engine",
            "max |dp|",
        ],
        [
            [
                row["model"],
                row["path"],
                f"{row['p50_ms']:.2f}",
                f"{row['p90_ms']:.2f}",
                f"{row['p99_ms']:.2f}",
                benchlib.fmt_rate(row["examples_per_sec"]),
                ratio(row, "p50_ratio"),
                ratio(row, "p99_ratio"),
                ratio(row, "throughput_ratio"),
                benchlib.fmt_rate(row["threaded_calls_per_sec"]),
                "-" if row["load_s"] != row["load_s"] else f"{row['load_s']:.2f}",
                row["engine"] or "-",
                "-" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.1e}",
            ]
            for row in rows
        ],
    )


def summarise_interleaved(args, runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Prints and returns the median over rounds of serving.load's ratios to bare onnxruntime."""
    rows = []
    print(f"\nserving.load / bare onnxruntime, calls alternating, median of {args.rounds} round(s)")
    for model in args.models:
        good = [r for r in runs if r["model"] == model and not r.get("error")]
        row = {"model": model}
        for figure in ("p50_ms", "p90_ms", "p99_ms", "examples_per_sec"):
            row[figure] = benchlib.median(
                [r["serving"][figure] / r["onnxruntime"][figure] for r in good]
            )
        print(
            f"{model:14s} batch 1 p50 {row['p50_ms']:.3f}x, p90 {row['p90_ms']:.3f}x, "
            f"p99 {row['p99_ms']:.3f}x; batch {args.throughput_batch} examples/s "
            f"{row['examples_per_sec']:.3f}x"
        )
        rows.append(row)
    return rows


def large_batch(served) -> Optional[str]:
    """``"tensorflow from 23"``: the engine serving large batches and from what size, or None."""
    if not served.large_batch_engine:
        return None
    return f"{served.large_batch_engine} from {served.large_batch_from}"


def chosen(result: Dict[str, Any]) -> str:
    """`` on onnxruntime (timed at load: onnxruntime 0.41 ms, tensorflow 1.9 ms)`` or ``""``."""
    if not result.get("engine"):
        return ""
    timed = ", ".join(f"{k} {v:.3g} ms" for k, v in (result["engine_timings_ms"] or {}).items())
    routed = f", large batches on {result['large_batch']}" if result.get("large_batch") else ""
    return f" on {result['engine']}" + (f" (timed at load: {timed})" if timed else "") + routed


def print_interleaved(model: str, round_index: int, result: Dict[str, Any]) -> None:
    if result.get("error"):
        print(f"{model:8s} interleaved round {round_index}: {result['error']}")
        return
    ours, ort = result["serving"], result["onnxruntime"]
    print(
        f"{model:8s} interleaved round {round_index}: serving.load{chosen(result)} / bare "
        f"onnxruntime: batch 1 p50 {ours['p50_ms']:.3f} / {ort['p50_ms']:.3f} ms "
        f"({ours['p50_ms'] / ort['p50_ms']:.3f}x), p90 {ours['p90_ms'] / ort['p90_ms']:.3f}x, "
        f"p99 {ours['p99_ms']:.3f} / {ort['p99_ms']:.3f} ms "
        f"({ours['p99_ms'] / ort['p99_ms']:.3f}x); batch examples/s "
        f"{ours['examples_per_sec']:,.0f} / {ort['examples_per_sec']:,.0f} "
        f"({ours['examples_per_sec'] / ort['examples_per_sec']:.3f}x)",
        flush=True,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    command = benchlib.command_line(__file__, args, FLAG_ORDER)
    info = benchlib.machine_info()
    benchlib.print_header("serving: engines and paths serving the same export", command, info)
    started = time.perf_counter()
    data_dir = benchlib.ensure_project_data(args.work_dir, args.source_dir)
    runs: List[Dict[str, Any]] = []
    for model in args.models:
        files = export_model(args, data_dir, model)
        if args.interleaved:
            for round_index in range(args.rounds):
                with multiprocessing.get_context("spawn").Pool(1) as pool:
                    result = pool.apply(interleaved, (args, model, files))
                runs.append({"model": model, "path": "interleaved", "round": round_index, **result})
                print_interleaved(model, round_index, result)
            continue
        for round_index in range(args.rounds):
            shift = round_index % len(args.paths)
            for path in args.paths[shift:] + args.paths[:shift]:
                result = run_isolated(args, path, model, files)
                runs.append({"model": model, "path": path, "round": round_index, **result})
                if result.get("error"):
                    print(f"{model:8s} {path:14s} round {round_index}: {result['error']}")
                else:
                    print(
                        f"{model:8s} {path:14s} round {round_index}: batch 1 p50 "
                        f"{result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms; batch "
                        f"{args.throughput_batch} {result['examples_per_sec']:,.0f} ex/s; "
                        f"load {result['load_s']:.2f}s{chosen(result)}",
                        flush=True,
                    )
    if args.interleaved:
        rows = summarise_interleaved(args, runs)
    else:
        rows = summarise(args, runs)
        print_summary(args, rows)
    for run in runs:
        run.pop("probabilities", None)
    return benchlib.finish_runs(
        "serving",
        command,
        info,
        time.perf_counter() - started,
        runs,
        args.json_out,
        settings={k: getattr(args, k) for k in FLAG_ORDER},
        summary=rows,
    )


if __name__ == "__main__":
    sys.exit(main())
