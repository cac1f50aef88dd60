"""Bring your own model: the bridge side by side with ``tf_keras.estimator.model_to_estimator``.

One user-style network that is none of the project's four (:func:`build_peer_net` below: two
conv + BatchNorm blocks with L2, a dense layer, dropout and a softmax output, its layers
unnamed as in most user code) trains through both, on the same TFRecords (the project's
``data_pipeline`` input_fn), batch size, steps, optimizer (Adam 1e-3, epsilon 1e-8) and
``RunConfig`` (seeded, checkpoints only at the start and the end, no step-rate logging):

* ``bridge``: ``jobs.train`` / ``jobs.evaluate`` / ``jobs.export`` with
  ``--model=bench_peer:build_peer_net``;
* ``peer``: ``model_to_estimator`` of the compiled network (``keras.optimizers.legacy.Adam``,
  ``sparse_categorical_crossentropy``, ``accuracy``), then ``train``, ``evaluate`` and
  ``export_saved_model`` with a serving receiver taking the image.

Each seed runs both contenders, each in a fresh process, the order alternating by seed. Per run:
test accuracy (all 10,000 test images), steady-state training examples/s (the first
``--warmup_steps`` steps left out, ``benchlib.StepTimerHook``), the signatures of the export and
the accuracy of the export reloaded with ``tf.saved_model.load``; BatchNorm checks (the moving
mean moved away from 0 in the checkpoint; the export gives an image the same probabilities
alone and inside a batch of 100, i.e. it uses the moving statistics, not the batch's) and, for
the first seed, the prediction keys each Estimator offers. Two probes then try what the table in
the README lists: training under ``mixed_bfloat16`` for ``--probe_steps`` steps, and starting
from a Keras model's weights (one step at a learning rate of 1e-12: the checkpoint's kernels
must equal the Keras model's).

Quick check::

    .venv/bin/python bench/bench_peer.py --seeds=0 --steps=30 --probe_steps=5 --eval_limit=1000
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tfenv  # noqa: E402 - must precede TensorFlow

tfenv.silence_python_logging()

import benchlib  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

import data_pipeline  # noqa: E402
import estimator_bridge  # noqa: E402
import jobs  # noqa: E402

CONTENDERS = ("bridge", "peer")
MODEL = "bench_peer:build_peer_net"
DROPOUT = 0.4
NO_CHECKPOINTS = 10**9
FLAG_ORDER = (
    "seeds",
    "batch_size",
    "epochs",
    "steps",
    "warmup_steps",
    "probe_steps",
    "eval_limit",
    "work_dir",
    "source_dir",
    "json_out",
)


def build_peer_net(input_shape=(28, 28, 1), num_classes=10, dropout_rate=DROPOUT, l2=1e-4):
    """A typical user network: conv + BatchNorm blocks, L2, dropout, softmax; unnamed layers.

    The input is named ``image`` because ``model_to_estimator`` matches features to input
    names; the bridge does not care.
    """
    regularizer = keras.regularizers.l2(l2)
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for filters in (32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", kernel_regularizer=regularizer)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Activation("relu")(x)
        x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation="relu", kernel_regularizer=regularizer)(x)
    x = keras.layers.Dropout(dropout_rate)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=benchlib.int_list, default=[0, 1, 2])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=None, help="Overrides --epochs.")
    parser.add_argument("--warmup_steps", type=int, default=10)
    parser.add_argument("--probe_steps", type=int, default=20)
    parser.add_argument(
        "--eval_limit", type=int, default=None, help="First N test images (default: all)."
    )
    parser.add_argument("--work_dir", default=benchlib.DEFAULT_WORK_DIR)
    parser.add_argument(
        "--source_dir", default=benchlib.default_source_dir(), help="MNIST (default $MNIST_DIR)."
    )
    parser.add_argument("--json_out", default=None)
    args = parser.parse_args(argv)
    if not args.seeds or args.batch_size < 1 or args.probe_steps < 1:
        parser.error("--seeds, --batch_size and --probe_steps must be non-empty and positive")
    args.work_dir = os.path.abspath(args.work_dir)
    return args


# --------------------------------------------------------------------------------------------
# The two contenders (each call runs in a fresh process)
# --------------------------------------------------------------------------------------------


def bridge_config(args, data_dir: str, model_dir: str, seed: int, steps: int, **overrides):
    return estimator_bridge.Config(
        model=MODEL,
        data_dir=data_dir,
        model_dir=model_dir,
        batch_size=args.batch_size,
        train_steps=steps,
        dropout_rate=DROPOUT,
        seed=seed,
        eval_limit=args.eval_limit,
        export_dir=os.path.join(model_dir, "export"),
        save_checkpoints_steps=NO_CHECKPOINTS,
        keep_checkpoint_max=1,
        log_every_n_steps=NO_CHECKPOINTS,
        progress=False,
        **overrides,
    )


def peer_estimator(config: estimator_bridge.Config, keras_model=None, precision="float32"):
    """``model_to_estimator`` over the compiled network, with the bridge's ``RunConfig``."""
    if keras_model is None:
        keras.utils.set_random_seed(config.seed or 0)
        with estimator_bridge.precision_policy(precision):
            keras_model = build_peer_net(dropout_rate=config.dropout_rate)
    keras_model.compile(
        optimizer=keras.optimizers.legacy.Adam(config.learning_rate, epsilon=1e-8),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    run_config = tf.estimator.RunConfig(
        model_dir=config.model_dir,
        tf_random_seed=config.seed,
        save_checkpoints_steps=config.save_checkpoints_steps,
        save_checkpoints_secs=None,
        keep_checkpoint_max=config.keep_checkpoint_max,
        log_step_count_steps=None,
    )
    return keras.estimator.model_to_estimator(keras_model=keras_model, config=run_config)


def image_receiver(spec):
    def receiver_fn():
        image = tf.compat.v1.placeholder(tf.float32, [None, *spec.image_shape], name="image")
        return tf.estimator.export.ServingInputReceiver({"image": image}, {"image": image})

    return receiver_fn


def run_contender(args, data_dir: str, contender: str, seed: int, steps: int, first: bool):
    """Trains, evaluates and exports one contender; returns its measurements."""
    scratch = tempfile.mkdtemp(prefix=f"{contender}-s{seed}-", dir=_scratch(args))
    config = bridge_config(args, data_dir, os.path.join(scratch, "model"), seed, steps)
    spec = data_pipeline.load_spec(data_dir)
    timer = benchlib.StepTimerHook(args.batch_size, args.warmup_steps)
    try:
        if contender == "bridge":
            jobs.train(config, hooks=[timer])
            accuracy = jobs.evaluate(config)["accuracy"]
            export_path = jobs.export(config)["saved_model"]
            keys = _predict_keys(estimator_bridge.make_estimator(config, intermediates=True))
        else:
            estimator = peer_estimator(config)
            with data_pipeline.translate_errors(data_dir):
                estimator.train(
                    estimator_bridge.make_input_fn(config, "train", True),
                    max_steps=steps,
                    hooks=[timer],
                )
                metrics = estimator.evaluate(estimator_bridge.make_input_fn(config, "test", False))
            accuracy = float(metrics["accuracy"])
            export_path = estimator.export_saved_model(config.export_dir, image_receiver(spec))
            export_path = export_path.decode() if isinstance(export_path, bytes) else export_path
            keys = _predict_keys(estimator)
        result = {
            "accuracy": accuracy,
            "examples_per_sec": timer.examples_per_sec,
            "timed_steps": timer.timed_steps,
            **_inspect_export(export_path, data_dir, args.eval_limit),
            "moving_mean_moved": _moving_mean_moved(config.model_dir),
        }
        if first:
            result["predict_keys"] = keys
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _predict_keys(estimator) -> List[str]:
    images = np.zeros([2, 28, 28, 1], np.float32)
    rows = estimator.predict(lambda: tf.data.Dataset.from_tensor_slices({"image": images}).batch(2))
    return sorted(next(iter(rows)))


def _moving_mean_moved(model_dir: str) -> bool:
    reader = tf.train.load_checkpoint(model_dir)
    # "batch_normalization/moving_mean" (bridge) or, in model_to_estimator's object-based
    # checkpoints, "layer_with_weights-1/moving_mean/.ATTRIBUTES/VARIABLE_VALUE".
    means = [k for k in reader.get_variable_to_shape_map() if "/moving_mean" in k]
    return bool(means) and all(np.abs(reader.get_tensor(k)).max() > 1e-3 for k in means)


def _inspect_export(path: str, data_dir: str, limit) -> Dict[str, Any]:
    """The export's signatures, its accuracy on the test split and its batch independence."""
    served = tf.saved_model.load(path)
    default = served.signatures["serving_default"]
    dataset = data_pipeline.make_dataset(data_dir, "test", 1000, limit=limit)
    correct = count = 0
    first = None
    for features, labels in dataset:
        outputs = default(image=features["image"])
        probabilities = _probabilities(outputs)
        correct += int(np.sum(probabilities.argmax(-1) == labels.numpy()))
        count += len(labels)
        if first is None:
            first = features["image"][:100], probabilities[:100]
    images, batch_probabilities = first
    alone = _probabilities(default(image=images[:1]))
    return {
        "export_accuracy": correct / count,
        "export_signatures": sorted(served.signatures),
        "export_outputs": sorted(default.structured_outputs),
        # A BatchNorm using the batch's statistics would give different probabilities here.
        "export_batch_independent": bool(np.allclose(alone[0], batch_probabilities[0], atol=1e-5)),
    }


def _probabilities(outputs: Dict[str, tf.Tensor]) -> np.ndarray:
    if "probabilities" in outputs:
        return outputs["probabilities"].numpy()
    (only,) = outputs.values()  # model_to_estimator: one output, named after the last layer
    return only.numpy()


def run_probe(args, data_dir: str, contender: str, probe: str) -> Dict[str, Any]:
    """``mixed_bfloat16``: train ``probe_steps``; ``keras_start``: do the weights carry over?"""
    scratch = tempfile.mkdtemp(prefix=f"probe-{contender}-{probe}-", dir=_scratch(args))
    try:
        if probe == "mixed_bfloat16":
            steps = args.probe_steps
            config = bridge_config(args, data_dir, os.path.join(scratch, "m"), 0, steps)
            if contender == "bridge":
                jobs.train(dataclasses.replace(config, precision="mixed_bfloat16"))
                loss = jobs.evaluate(dataclasses.replace(config, eval_limit=1000))["loss"]
            else:
                estimator = peer_estimator(config, precision="mixed_bfloat16")
                estimator.train(
                    estimator_bridge.make_input_fn(config, "train", True), max_steps=steps
                )
                eval_config = dataclasses.replace(config, eval_limit=1000)
                loss = estimator.evaluate(
                    estimator_bridge.make_input_fn(eval_config, "test", False)
                )["loss"]
            return {"works": bool(np.isfinite(loss)), "loss": float(loss)}
        # keras_start: a Keras model with known (seeded, random) weights is where training starts.
        keras.utils.set_random_seed(7)
        model = build_peer_net()
        expected = model.get_weights()
        config = bridge_config(
            args, data_dir, os.path.join(scratch, "k"), 0, 1, learning_rate=1e-12
        )
        if contender == "bridge":
            path = os.path.join(scratch, "start.keras")
            model.save(path)
            jobs.train(dataclasses.replace(config, warm_start_from=path))
            network = estimator_bridge.describe_network(config)
            keys = network.keys
        else:
            estimator = peer_estimator(config, keras_model=model)
            estimator.train(estimator_bridge.make_input_fn(config, "train", True), max_steps=1)
            keys = _object_keys(model)
        reader = tf.train.load_checkpoint(config.model_dir)
        kernels = [(k, v) for k, v, w in zip(keys, expected, model.weights) if "kernel" in w.name]
        same = all(np.allclose(reader.get_tensor(k), v, atol=1e-6) for k, v in kernels)
        return {"works": bool(kernels) and same, "kernels_compared": len(kernels)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _object_keys(model: keras.Model) -> List[str]:
    """``model.weights``' keys in model_to_estimator's (object-based) checkpoints."""
    keys = {}
    holders = [layer for layer in model.layers if layer.weights]
    for index, layer in enumerate(holders):
        for weight in layer.weights:
            attribute = weight.name.split(":")[0].split("/")[-1]
            keys[id(weight)] = f"layer_with_weights-{index}/{attribute}/.ATTRIBUTES/VARIABLE_VALUE"
    return [keys[id(weight)] for weight in model.weights]


def _scratch(args) -> str:
    path = os.path.join(args.work_dir, "peer_runs")
    os.makedirs(path, exist_ok=True)
    return path


def _guarded(function, *job) -> Dict[str, Any]:
    try:
        return function(*job)
    except Exception as error:  # noqa: BLE001 - report, keep the other runs going
        traceback.print_exc()
        first = (str(error).strip().splitlines() or [""])[0]
        return {"error": f"{type(error).__name__}: {first}"}


def in_fresh_process(function, *job) -> Dict[str, Any]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_guarded, (function, *job))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _mean_sd(values: List[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f} %"


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    summary = {}
    for contender in CONTENDERS:
        mine = [r for r in runs if r["contender"] == contender and not r.get("error")]
        summary[contender] = {
            "accuracy": [r["accuracy"] for r in mine],
            "export_accuracy": [r["export_accuracy"] for r in mine],
            "examples_per_sec": [r["examples_per_sec"] for r in mine],
        }
    by_seed = {}
    for r in runs:
        if not r.get("error"):
            by_seed.setdefault(r["seed"], {})[r["contender"]] = r["examples_per_sec"]
    summary["speed_ratio_by_seed"] = [
        rates["bridge"] / rates["peer"] for _, rates in sorted(by_seed.items()) if len(rates) == 2
    ]
    return summary


def print_summary(args, steps: int, summary, runs, probes) -> None:
    print()
    print(
        f"test accuracy and training examples/s, {steps} steps of {args.batch_size} per run "
        f"({len(args.seeds)} seed(s)); examples/s leave out the first {args.warmup_steps} steps"
    )
    rows = []
    for contender in CONTENDERS:
        s = summary[contender]
        rows.append(
            [
                contender,
                " / ".join(f"{100 * a:.2f}" for a in s["accuracy"]) or "-",
                _mean_sd(s["accuracy"]),
                " / ".join(f"{100 * a:.2f}" for a in s["export_accuracy"]) or "-",
                " / ".join(benchlib.fmt_rate(v) for v in s["examples_per_sec"]) or "-",
                benchlib.fmt_rate(benchlib.median(s["examples_per_sec"])),
            ]
        )
    benchlib.print_table(
        ["contender", "accuracy by seed", "mean ± sd", "export accuracy", "ex/s by seed", "median"],
        rows,
    )
    ratios = summary["speed_ratio_by_seed"]
    print(
        "bridge/peer examples/s by seed: "
        + (" / ".join(f"{r:.2f}x" for r in ratios) or "-")
        + (f"; median {benchlib.median(ratios):.2f}x" if ratios else "")
    )
    print()
    first = {r["contender"]: r for r in runs if r["seed"] == args.seeds[0] and not r.get("error")}
    table = []
    for contender in CONTENDERS:
        r = first.get(contender, {})
        table.append(
            [
                contender,
                "yes" if r.get("moving_mean_moved") else "no",
                "yes" if r.get("export_batch_independent") else "no",
                len(r.get("predict_keys", [])),
                _probe_cell(probes, contender, "mixed_bfloat16"),
                _probe_cell(probes, contender, "keras_start"),
                " ".join(r.get("export_signatures", [])) or "-",
            ]
        )
    print("what each one does (measured in the runs above and in the probes)")
    benchlib.print_table(
        [
            "contender",
            "BN averages trained",
            "export uses them",
            "predict keys",
            "mixed_bfloat16",
            "starts from Keras weights",
            "export signatures",
        ],
        table,
    )
    for contender in CONTENDERS:
        r = first.get(contender, {})
        print(f"{contender} predict keys: {', '.join(r.get('predict_keys', [])) or '-'}")
        print(
            f"{contender} serving_default outputs: {', '.join(r.get('export_outputs', [])) or '-'}"
        )


def _probe_cell(probes, contender: str, probe: str) -> str:
    result = probes.get(f"{contender}:{probe}", {})
    if result.get("error"):
        return f"fails ({result['error'][:60]})"
    return "yes" if result.get("works") else "no"


def main(argv=None) -> int:
    args = parse_args(argv)
    command = benchlib.command_line(__file__, args, FLAG_ORDER)
    info = benchlib.machine_info()
    benchlib.print_header(
        "bring your own model: estimator_bridge vs tf_keras model_to_estimator", command, info
    )
    os.makedirs(args.work_dir, exist_ok=True)
    data_dir = benchlib.ensure_project_data(args.work_dir, args.source_dir)
    spec = data_pipeline.load_spec(data_dir)
    steps = args.steps or math.ceil(args.epochs * spec.num_records("train") / args.batch_size)

    runs: List[Dict[str, Any]] = []
    started = time.perf_counter()
    for index, seed in enumerate(args.seeds):
        order = CONTENDERS if index % 2 == 0 else CONTENDERS[::-1]
        for contender in order:
            job = (args, data_dir, contender, seed, steps, index == 0)
            result = in_fresh_process(run_contender, *job)
            runs.append({"seed": seed, "contender": contender, **result})
            status = result.get("error") or (
                f"accuracy {100 * result['accuracy']:.2f} %, export "
                f"{100 * result['export_accuracy']:.2f} %, "
                f"{benchlib.fmt_rate(result['examples_per_sec'])} examples/s"
            )
            print(f"seed {seed}  {contender:<6} {status}", flush=True)
    probes = {}
    for probe in ("mixed_bfloat16", "keras_start"):
        for contender in CONTENDERS:
            probes[f"{contender}:{probe}"] = in_fresh_process(
                run_probe, args, data_dir, contender, probe
            )
            print(f"probe {probe:<15} {contender:<6} {probes[f'{contender}:{probe}']}", flush=True)
    elapsed = time.perf_counter() - started
    summary = summarise(runs)
    print_summary(args, steps, summary, runs, probes)
    return benchlib.finish_runs(
        "peer",
        command,
        info,
        elapsed,
        runs,
        args.json_out,
        settings={**{k: getattr(args, k) for k in FLAG_ORDER}, "steps_per_run": steps},
        summary=summary,
        probes=probes,
    )


if __name__ == "__main__":
    sys.exit(main())
