"""The jobs ``main.py`` runs, each taking one :class:`estimator_bridge.Config`.

:func:`train`, :func:`evaluate`, :func:`train_and_evaluate`, :func:`predict` and :func:`export`
orchestrate the Estimator that :mod:`estimator_bridge` builds: what to check before anything is
written, what to print, what to return. The session hooks that show progress and turn signals
into a clean stop, and the prediction plots, live here too.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import math
import os
import re
import signal
import sys
import textwrap
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras as keras

import data_pipeline
import estimator_bridge as bridge
import keras_models
import onnx_export
import preflight
import provenance
from data_pipeline import inputs
from keras_models import keras3


def train(
    config: bridge.Config, hooks: Sequence[tf.estimator.SessionRunHook] = ()
) -> Dict[str, Any]:
    """Trains to :func:`estimator_bridge.target_step`, resuming from ``model_dir``'s checkpoint.

    Args:
        config: The run's settings.
        hooks: Extra ``SessionRunHook``s (e.g. a profiler or a timer), run after the built-in
            progress and signal hooks.

    Returns:
        ``{"global_step", "examples_per_sec", "seconds"}`` for this invocation.
    """
    _preflight(config, "train")
    spec = data_pipeline.load_spec(config.data_dir)
    network = bridge.describe_network(config, spec)  # a model that cannot train stops here
    # Reads only: a refused resume writes nothing, not even a lock.
    _check_same_dataset(config, spec)
    bridge.check_resumable(config, network)
    with preflight.trainer_lock(config.model_dir):
        return _train(config, spec, network, hooks)


def _check_same_dataset(config: bridge.Config, spec) -> None:
    """Training resumes only on the dataset the model dir was trained on."""
    problem = provenance.check_same_dataset(config.model_dir, spec)
    if problem:
        raise bridge.UsageError(problem)


def _noted(note: Optional[str], result: Dict[str, Any]) -> Dict[str, Any]:
    """Returns ``result``, first printing the other-dataset note, if any.

    Printed once the job has succeeded, so that an error stays the only line.
    """
    if note:
        _info(note)
    return result


def _say_precision(config: bridge.Config) -> None:
    """A training run's first line when ``--precision=auto`` chose: the precision and why."""
    if config.precision_reason:
        _info(f"precision: {config.precision} ({config.precision_reason})")


def _preflight(config: bridge.Config, mode: str) -> None:
    """What every job checks before it builds or writes anything."""
    config.validate()
    preflight.check_paths(config, mode)
    preflight.warn_if_bf16_is_emulated(config.precision)


def _train(
    config: bridge.Config, spec, network, hooks: Sequence[tf.estimator.SessionRunHook]
) -> Dict[str, Any]:
    _say_precision(config)
    warm_start = bridge.warm_start_settings(config, network, spec)
    estimator = bridge.make_estimator(config, spec, warm_start)
    target = bridge.target_step(config, spec)
    start = bridge.global_step_of(config.model_dir)
    if start >= target:
        _info(f"{config.model_dir} is already at step {start} (target {target}); nothing to train")
        return {"global_step": start, "examples_per_sec": 0.0, "seconds": 0.0, "interrupted": False}
    if start:
        _info(f"resuming {config.model} from step {start} to {target}")
    hook = ProgressHook(
        batch_size=config.batch_size,
        start_step=start,
        target_step=target,
        every_n_steps=config.log_every_n_steps,
        progress_bar=config.progress,
    )
    stopper = StopOnSignalHook()
    try:
        with _checkpoints_kept_on_full_disk(config.model_dir):
            with data_pipeline.translate_errors(config.data_dir):
                estimator.train(
                    bridge.make_input_fn(config, "train", True),
                    max_steps=target,
                    hooks=[hook, stopper, *hooks],
                )
    except tf.compat.v1.train.NanLossDuringTrainingError:
        raise bridge.TrainingError(
            f"the loss became NaN near step {hook.step}; the last good checkpoint "
            f"({tf.train.latest_checkpoint(config.model_dir) or 'none'}) is kept: "
            "lower --learning_rate or check the data"
        ) from None
    step = bridge.global_step_of(config.model_dir)
    if stopper.interrupted:
        _info(
            f"interrupted: checkpoint saved at step {step} in {config.model_dir}; rerun to resume"
        )
    else:
        _info(
            f"trained {config.model} to step {step} in {hook.seconds:.1f}s "
            f"({hook.examples_per_sec:,.0f} examples/s)"
        )
    return {
        "global_step": step,
        "examples_per_sec": hook.examples_per_sec,
        "seconds": hook.seconds,
        "interrupted": stopper.interrupted,
    }


@contextlib.contextmanager
def _checkpoints_kept_on_full_disk(model_dir: str) -> Iterator[None]:
    """A full disk while training: the partial checkpoint goes, the last good one is named.

    The Saver writes ``model.ckpt-N_temp/`` (then ``.tempstate`` files) and updates the
    ``checkpoint`` state file only after a whole save, so a failed save never becomes the
    latest; its leftovers are removed so they neither hold space nor look like a checkpoint.
    """
    try:
        with data_pipeline.translate_disk_full(model_dir):
            yield
    except data_pipeline.DiskFullError as full:
        latest = tf.train.latest_checkpoint(model_dir)
        _remove_partial_checkpoints(model_dir, latest)
        kept = (
            f"the last good checkpoint {latest} is kept and the rerun resumes from it"
            if latest
            else "no checkpoint was saved; the rerun starts over"
        )
        raise full.with_kept(kept) from full.__cause__


_CHECKPOINT_FILE = re.compile(r"^model\.ckpt-(\d+)(?:\.|_temp)")


def _remove_partial_checkpoints(model_dir: str, latest: Optional[str]) -> None:
    """Removes save leftovers newer than ``latest``: temp folders, tempstate and orphan files.

    Also an unfinished best-export folder of ``train_and_evaluate``.
    """
    last_step = int(latest.rsplit("-", 1)[1]) if latest else -1
    for name in os.listdir(model_dir):
        match = _CHECKPOINT_FILE.match(name)
        partial = ".tempstate" in name or name.startswith("checkpoint.tmp")
        if partial or (match and int(match.group(1)) > last_step):
            data_pipeline.diskfull.remove(os.path.join(model_dir, name))
    # train_and_evaluate's exporter leaves its unfinished temp-<second>/ folder too.
    for folder in tf.io.gfile.glob(os.path.join(model_dir, "export", "*", "temp-*")):
        data_pipeline.diskfull.remove(folder)


def evaluate(config: bridge.Config) -> Dict[str, Any]:
    """Evaluates a checkpoint on ``eval_split`` and writes its confusion matrices as CSV.

    Returns:
        For one split ``{"split", "accuracy", "loss", "mean_per_class_accuracy", "global_step",
        "checkpoint", "confusion_matrix"}``; for ``both``, ``{"split": "both", "global_step",
        "checkpoint", "train": {...}, "test": {...}}``.
    """
    _preflight(config, "evaluate")
    spec = data_pipeline.load_spec(config.data_dir)
    checkpoint = bridge.resolve_checkpoint(config)
    bridge.check_checkpoint_fits(config, checkpoint, spec=spec)
    note = provenance.other_dataset_note(checkpoint, spec, "evaluating")
    estimator = bridge.make_estimator(config, spec)
    splits = ("train", "test") if config.eval_split == "both" else (config.eval_split,)
    results = {}
    for split in splits:
        # eval_<split>/, or eval_<split>-<dataset id>/ for another dataset's evaluation.
        name = provenance.eval_name(checkpoint, spec, split)
        try:
            with data_pipeline.translate_disk_full(config.model_dir):
                with data_pipeline.translate_errors(config.data_dir):
                    metrics = estimator.evaluate(
                        bridge.make_input_fn(config, split, False),
                        checkpoint_path=checkpoint,
                        name=name,
                    )
                results[split] = _summarise_eval(
                    config, split, checkpoint, metrics, name, spec.class_names
                )
        except data_pipeline.DiskFullError as full:
            done = [results[s]["confusion_matrix"] for s in results]
            kept = f"the checkpoint {checkpoint} is untouched" + "".join(
                f", {path} is complete" for path in done
            )
            if full.path.endswith(".csv") and os.path.exists(full.path):
                kept += f", the earlier {os.path.basename(full.path)} is whole"
            raise full.with_kept(kept) from full.__cause__
    if len(splits) == 1:
        return _noted(note, results[splits[0]])
    step = results["test"]["global_step"]
    return _noted(note, {"split": "both", "global_step": step, "checkpoint": checkpoint, **results})


def _summarise_eval(
    config: bridge.Config,
    split: str,
    checkpoint: str,
    metrics,
    name: str,
    class_names: Sequence[str],
) -> Dict[str, Any]:
    step = int(metrics["global_step"])
    matrix = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    path = os.path.join(config.model_dir, f"eval_{name}", f"confusion_matrix-{step}.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_confusion_matrix(path, matrix, class_names)
    return {
        "split": split,
        "accuracy": round(float(metrics["accuracy"]), 6),
        "loss": round(float(metrics["loss"]), 6),
        "mean_per_class_accuracy": round(float(metrics["mean_per_class_accuracy"]), 6),
        "examples": int(matrix.sum()),
        "global_step": step,
        "checkpoint": checkpoint,
        "confusion_matrix": path,
    }


def write_confusion_matrix(path: str, matrix: np.ndarray, class_names: Sequence[str]) -> None:
    """Writes ``matrix`` (rows: true class) as CSV, the class names as header row and first column.

    The top-left cell says which way the matrix reads; written under a temporary name, then renamed.
    """
    with data_pipeline.atomic_output(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, matrix):
            writer.writerow([name, *(int(count) for count in row)])


def read_confusion_matrix(path: str):
    """Reads what ``write_confusion_matrix`` wrote: ``(class_names, int64 matrix)``."""
    with open(path, newline="") as handle:
        header, *rows = list(csv.reader(handle))
    return header[1:], np.array([[int(c) for c in row[1:]] for row in rows], dtype=np.int64)


def train_and_evaluate(config: bridge.Config) -> Dict[str, Any]:
    """``tf.estimator.train_and_evaluate`` with a best-checkpoint (highest accuracy) exporter.

    Returns:
        The final evaluation metrics (scalars only) and where the best export went.
    """
    _preflight(config, "train_and_evaluate")
    spec = data_pipeline.load_spec(config.data_dir)
    network = bridge.describe_network(config, spec)
    _check_same_dataset(config, spec)
    bridge.check_resumable(config, network)
    with preflight.trainer_lock(config.model_dir):
        return _train_and_evaluate(config, spec, network)


def _train_and_evaluate(config: bridge.Config, spec, network) -> Dict[str, Any]:
    _say_precision(config)
    warm_start = bridge.warm_start_settings(config, network, spec)
    estimator = bridge.make_estimator(config, spec, warm_start)
    target = bridge.target_step(config, spec)
    split = "train" if config.eval_split == "train" else "test"
    exporter = tf.estimator.BestExporter(
        name="best",
        serving_input_receiver_fn=bridge.serving_input_receiver_fn(spec),
        compare_fn=higher_accuracy(config.model_dir),
        exports_to_keep=3,
    )
    hook = ProgressHook(
        batch_size=config.batch_size,
        start_step=bridge.global_step_of(config.model_dir),
        target_step=target,
        every_n_steps=config.log_every_n_steps,
        progress_bar=config.progress,
    )
    train_spec = tf.estimator.TrainSpec(
        bridge.make_input_fn(config, "train", True),
        max_steps=target,
        hooks=[hook, StopOnSignalHook()],
    )
    eval_spec = tf.estimator.EvalSpec(
        bridge.make_input_fn(config, split, False),
        steps=None,
        name=split,
        exporters=[exporter],
        start_delay_secs=0,
        throttle_secs=config.eval_throttle_secs,
    )
    trained = bridge.global_step_of(config.model_dir) >= target
    with (
        _checkpoints_kept_on_full_disk(config.model_dir),
        data_pipeline.translate_errors(config.data_dir),
    ):
        if trained and not os.environ.get("TF_CONFIG"):
            # Nothing to train: the Estimator would neither evaluate nor export. A rerun after
            # a failed evaluation or export (e.g. a full disk) finishes them here.
            checkpoint = tf.train.latest_checkpoint(config.model_dir)
            metrics = estimator.evaluate(eval_spec.input_fn, name=split)
            best = os.path.join(config.model_dir, "export", "best")
            exporter.export(estimator, best, checkpoint, metrics, is_the_final_export=True)
            outcome = (metrics, None)
        else:
            # None on a TF_CONFIG cluster: with a strategy the distribute coordinator returns
            # nothing, and so do ps/evaluator tasks; the evaluator's metrics are in
            # model_dir/eval_<split>.
            outcome = tf.estimator.train_and_evaluate(estimator, train_spec, eval_spec)
    metrics = outcome[0] if outcome else None
    result = {k: float(v) for k, v in (metrics or {}).items() if np.ndim(v) == 0}
    result["global_step"] = int(result.get("global_step", bridge.global_step_of(config.model_dir)))
    result["split"] = split
    result["best_export_dir"] = os.path.join(config.model_dir, "export", "best")
    return result


def higher_accuracy(model_dir: Optional[str] = None):
    """BestExporter's ``compare_fn``: a higher accuracy, or the best one never exported.

    BestExporter remembers the best accuracy from the evaluation's summaries, also of an
    evaluation whose export then failed (a full disk): the same checkpoint evaluated again
    (equal accuracy, with its step: not a summary) is exported if no export in ``model_dir`` is
    newer than it. Without ``model_dir``, only a higher accuracy. BestExporter accepts only
    the two arguments' names, hence a closure rather than a third argument.
    """

    def compare(best_eval_result, current_eval_result) -> bool:
        if current_eval_result["accuracy"] > best_eval_result["accuracy"]:
            return True
        step = current_eval_result.get("global_step")
        if model_dir is None or step is None:
            return False
        if current_eval_result["accuracy"] != best_eval_result["accuracy"]:
            return False
        index = os.path.join(model_dir, f"model.ckpt-{int(step)}.index")
        folder = os.path.join(model_dir, "export", "best")
        exports = (
            [int(name) for name in os.listdir(folder) if name.isdigit()]
            if os.path.isdir(folder)
            else []
        )
        return os.path.exists(index) and max(exports, default=0) < os.path.getmtime(index)

    return compare


def predict(config: bridge.Config) -> Dict[str, Any]:
    """Writes ``predictions-<split>.csv`` and optional plots (new files: :func:`predict_inputs`).

    The CSV's columns are index, label, class, probability (of the predicted class), then
    label_name and class_name (the dataset's class names), and for a dataset prepared from an
    image folder, file (the image's path in that folder).

    Returns:
        ``{"csv", "examples", "accuracy", "checkpoint", "plots"}``.
    """
    if config.inputs is not None:
        return predict_inputs(config)
    _preflight(config, "predict")
    spec = data_pipeline.load_spec(config.data_dir)
    checkpoint = bridge.resolve_checkpoint(config)
    network = bridge.check_checkpoint_fits(config, checkpoint, spec=spec)
    note = provenance.other_dataset_note(checkpoint, spec, "predicting")
    names = bridge.class_names(spec)
    keys = ["classes", "probabilities"]
    if config.plot and "conv1" in network.layers:
        keys.append("conv1")
    estimator = bridge.make_estimator(config, spec, intermediates="conv1" in keys)
    split = config.predict_split
    input_fn = data_pipeline.make_input_fn(
        config.data_dir, split, config.eval_batch_size, num_epochs=1, limit=config.eval_limit
    )
    labels = _labels(config, split)
    plotted = set(sample_indices(labels, _PLOTTED_DIGITS)) if config.plot else set()
    files = spec.record_files(split)  # None unless prepared from an image folder
    os.makedirs(config.output_dir, exist_ok=True)
    csv_path = os.path.join(config.output_dir, f"predictions-{split}.csv")
    try:
        with data_pipeline.translate_disk_full(csv_path):
            count, correct, samples = _write_predictions(
                config,
                estimator,
                input_fn,
                keys,
                checkpoint,
                csv_path,
                labels,
                names,
                files,
                plotted,
            )
    except data_pipeline.DiskFullError as full:
        raise full.with_kept(f"no new {os.path.basename(csv_path)} was written") from full.__cause__
    try:
        with data_pipeline.translate_disk_full(config.output_dir):
            plots = _plot_predictions(config, samples, labels, names) if config.plot else []
    except data_pipeline.DiskFullError as full:
        raise full.with_kept(f"{csv_path} is complete") from full.__cause__
    return _noted(
        note,
        {
            "csv": csv_path,
            "examples": count,
            "accuracy": round(correct / max(count, 1), 6),
            "checkpoint": checkpoint,
            "plots": plots,
        },
    )


def _write_predictions(
    config, estimator, input_fn, keys, checkpoint, csv_path, labels, names, files, plotted
):
    """Writes the predictions CSV; returns ``(count, correct, samples)`` (samples to plot)."""
    samples: Dict[int, Dict[str, np.ndarray]] = {}
    correct = count = 0
    # Written under a temporary name: an interrupted or failed run leaves no complete-looking CSV.
    errors = data_pipeline.translate_errors(config.data_dir)
    # Closed on any failure: a suspended Estimator generator keeps its graph the default one.
    predictions = contextlib.closing(
        estimator.predict(input_fn, predict_keys=keys, checkpoint_path=checkpoint)
    )
    with data_pipeline.atomic_output(csv_path) as tmp, errors, predictions as generator:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            columns = ["index", "label", "class", "probability", "label_name", "class_name"]
            writer.writerow(columns + (["file"] if files is not None else []))
            for index, prediction in enumerate(generator):
                label, cls = int(labels[index]), int(prediction["classes"])
                probability = f"{prediction['probabilities'][cls]:.6f}"
                source = [files[index]] if files is not None else []
                row = [index, label, cls, probability, names[label], names[cls], *source]
                writer.writerow(row)
                correct += cls == label
                count += 1
                if index in plotted:
                    samples[index] = prediction
    return count, correct, samples


_PLOTTED_DIGITS = 16


def predict_inputs(config: bridge.Config) -> Dict[str, Any]:
    """Classifies new image files (``config.inputs``) into ``output_dir/predictions.csv``.

    The files are decoded, converted and resized as prepare did for ``data_dir``'s data
    (:mod:`data_pipeline.inputs`) and predicted in batches by the checkpoint or, with
    ``predict_export``, by that export through :func:`serving.load`. The CSV has one row per
    file: ``file, class, class_name, probability``, then ``class_K, class_name_K,
    probability_K`` for the next ``top_k - 1`` classes by probability (K = 2, 3, ...). It is
    written under a temporary name and renamed at the end: a file that does not load stops the
    run with one line naming it and leaves nothing behind.

    Returns:
        ``{"csv", "examples", "checkpoint", "export", "plots"}``.
    """
    _preflight(config, "predict")
    spec = data_pipeline.load_spec(config.data_dir)
    total = inputs.count_files(config.inputs)  # also: a missing --inputs stops here
    checkpoint = note = None
    if config.predict_export:
        rows = _served_rows(config, spec)
        next(rows)  # loads and checks the export now, before anything is written
    else:
        checkpoint = bridge.resolve_checkpoint(config)
        network = bridge.check_checkpoint_fits(config, checkpoint, spec=spec)
        note = provenance.other_dataset_note(checkpoint, spec, "decoding the new images as")
        keys = ["probabilities"] + (["conv1"] if config.plot and "conv1" in network.layers else [])
        estimator = bridge.make_estimator(config, spec, intermediates=len(keys) > 1)
        rows = estimator.predict(
            lambda: inputs.make_dataset(config.inputs, spec, config.eval_batch_size),
            predict_keys=keys,
            checkpoint_path=checkpoint,
        )
    names = bridge.class_names(spec)
    top_k = min(config.top_k, spec.num_classes)
    created = not os.path.isdir(config.output_dir)
    os.makedirs(config.output_dir, exist_ok=True)
    csv_path = os.path.join(config.output_dir, "predictions.csv")
    samples: Dict[int, Dict[str, np.ndarray]] = {}
    files = inputs.iter_files(config.inputs)
    count = 0
    try:
        with open(csv_path + ".tmp", "w", newline="") as handle, _progress(config, total) as bar:
            writer = csv.writer(handle)
            header = ["file", "class", "class_name", "probability"]
            for k in range(2, top_k + 1):
                header += [f"class_{k}", f"class_name_{k}", f"probability_{k}"]
            writer.writerow(header)
            # rows first: its end closes the Estimator's generator and the graph it holds.
            for row, path in zip(rows, files):
                probabilities = np.asarray(row["probabilities"])
                best = np.argsort(-probabilities, kind="stable")[:top_k]
                line = [path]
                for cls in best:
                    line += [int(cls), names[cls], f"{probabilities[cls]:.6f}"]
                writer.writerow(line)
                count += 1
                bar.update(1)
                if len(samples) < _PLOTTED_DIGITS:
                    samples[len(samples)] = {"classes": best[0], **row}
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as error:
        _discard(csv_path + ".tmp", config.output_dir if created else None)
        failed = itertools.islice(inputs.iter_files(config.inputs), count, None)
        raise inputs.bad_file_error(failed, spec, error) from None
    except BaseException as error:
        _discard(csv_path + ".tmp", config.output_dir if created else None)
        rows.close()  # a suspended Estimator generator keeps its graph the default one
        # Python reports a failed flush at close without a file name: name the CSV.
        full = (
            data_pipeline.disk_full_error(error, csv_path) if isinstance(error, Exception) else None
        )
        if full is None:
            raise
        raise full.with_kept(f"no new {os.path.basename(csv_path)} was written") from error
    os.replace(csv_path + ".tmp", csv_path)
    plots = []
    if config.plot:
        first = next(iter(inputs.make_dataset(config.inputs, spec, len(samples))))
        images = dict(enumerate(first["image"].numpy()))
        try:
            with data_pipeline.translate_disk_full(config.output_dir):
                plots = _plot_predictions(
                    config, samples, None, names, images=images, name="inputs"
                )
        except data_pipeline.DiskFullError as full:
            raise full.with_kept(f"{csv_path} is complete") from full.__cause__
    return _noted(
        note,
        {
            "csv": csv_path,
            "examples": count,
            "checkpoint": checkpoint,
            "export": config.predict_export,
            "plots": plots,
        },
    )


def _served_rows(config: bridge.Config, spec):
    """``{"probabilities": ...}`` per input file, from the export through ``serving.load``.

    The first item is None, once the export is loaded and checked against ``spec``.
    """
    import serving

    path = serving.latest_version(config.predict_export) or config.predict_export
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise bridge.UsageError(
            f"--export_dir={config.predict_export} holds no SavedModel; export first "
            "(--mode=export), or pass a folder that --mode=export wrote"
        )
    # A batch job: the first engine that can serve (onnxruntime where the export has
    # model.onnx), not load()'s batch-1 timing of both, which would cost seconds at load.
    model = serving.load(path, engine=serving.available_engines(path)[0])
    shape = model.inputs.get("image", (None, ()))[1][1:]
    if tuple(shape) != tuple(spec.image_shape):
        raise bridge.UsageError(
            f"the export {path} takes images of shape {list(shape)}, but --data_dir="
            f"{config.data_dir} holds {list(spec.image_shape)}; pass the --data_dir it was "
            "trained on"
        )
    yield None  # the export is loaded and fits: predict_inputs goes on
    for batch in inputs.make_dataset(config.inputs, spec, config.eval_batch_size):
        for probabilities in model(image=batch["image"].numpy())["probabilities"]:
            yield {"probabilities": probabilities}


def _progress(config: bridge.Config, total: int):
    """A tqdm bar over the files on a terminal; otherwise a stand-in that shows nothing."""
    if config.progress and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, unit="image", file=sys.stderr, dynamic_ncols=True, leave=False)
    return _NoProgress()


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int) -> None:
        pass


def _discard(tmp: str, created_dir: Optional[str]) -> None:
    """Removes a half-written file, and the output folder if this run made it (and it's empty)."""
    with contextlib.suppress(OSError):
        os.remove(tmp)
    if created_dir:
        with contextlib.suppress(OSError):
            os.rmdir(created_dir)


def sample_indices(labels: Sequence[int], count: int) -> List[int]:
    """Which records to plot: ``count`` of them spanning the classes, the same every time.

    Round robin over the classes present (the first image of each, then the second, ...); with
    more classes than ``count``, ``count`` classes evenly spread over them. In record order.
    """
    labels = np.asarray(labels)
    present = np.unique(labels)
    if len(present) > count:
        present = present[np.linspace(0, len(present) - 1, count).round().astype(int)]
    queues = [np.flatnonzero(labels == label) for label in present]
    chosen: List[int] = []
    for depth in range(max((len(q) for q in queues), default=0)):
        chosen.extend(int(q[depth]) for q in queues if depth < len(q))
        if len(chosen) >= count:
            break
    return sorted(chosen[:count])


def _labels(config: bridge.Config, split: str) -> np.ndarray:
    """The split's labels in record order, read through the same pipeline."""
    dataset = data_pipeline.make_dataset(
        config.data_dir, split, 4096, num_epochs=1, limit=config.eval_limit
    )
    return np.concatenate([labels.numpy() for _, labels in dataset])


def _plot_predictions(
    config: bridge.Config,
    samples: Dict[int, Dict[str, np.ndarray]],
    labels,
    names: Sequence[str],
    images: Optional[Dict[int, np.ndarray]] = None,
    name: Optional[str] = None,
) -> List[str]:
    """Writes a grid of the sampled images with their predictions and the conv1 feature maps.

    Args:
        config: The run's config (split, output folder, model label).
        samples: Record index -> its prediction, for the records :func:`sample_indices` chose.
        labels: Every record's label; None for new image files (their captions are black).
        names: The class names.
        images: Record index -> image for new image files; by default read from the split.
        name: What the file names say instead of the predict split (``inputs``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = name or config.predict_split
    if images is None:
        images = _images_at(config, split, sorted(samples))
    rows = [
        (images[i], samples[i], None if labels is None else int(labels[i])) for i in sorted(samples)
    ]
    model_name = keras_models.model_label(config.model)
    fig = samples_figure(rows, names, model_name)
    paths = [os.path.join(config.output_dir, f"samples-{split}.png")]
    _save_figure(fig, paths[-1])

    first = samples[min(samples)] if samples else {}
    maps = np.asarray(first["conv1"]) if "conv1" in first else None
    if maps is not None and maps.ndim in (2, 3):
        if maps.ndim == 2:  # Conv1D: [rows, channels], one image
            fig, ax = plt.subplots(figsize=(6, 3))
            ax.imshow(maps.T, cmap="viridis", aspect="auto")
            ax.set_xlabel("row position")
            ax.set_ylabel("channel")
        else:  # Conv2D: [height, width, channels], one panel per channel
            cols = 8
            rows = math.ceil(maps.shape[-1] / cols)
            fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.3))
            for channel, ax in enumerate(axes.flat):
                ax.axis("off")
                if channel < maps.shape[-1]:
                    ax.imshow(maps[..., channel], cmap="viridis")
                    ax.set_title(str(channel), fontsize=7)
        fig.suptitle(f"{_short(model_name, 40)}: conv1 feature maps of a {split} image")
        paths.append(os.path.join(config.output_dir, f"conv1-{split}.png"))
        _save_figure(fig, paths[-1])
    return paths


def _save_figure(fig, path: str) -> None:
    """Saves a PNG under a temporary name renamed when whole (a full disk leaves none)."""
    import matplotlib.pyplot as plt

    try:
        with data_pipeline.atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def _images_at(config: bridge.Config, split: str, indices: Sequence[int]) -> Dict[int, Any]:
    """The images of records ``indices`` of a split, read in record order until the last one."""
    wanted, found, start = set(indices), {}, 0
    dataset = data_pipeline.make_dataset(
        config.data_dir, split, 256, num_epochs=1, limit=config.eval_limit
    )
    for features, _ in dataset:
        batch = features["image"].numpy()
        for offset in wanted.intersection(range(start, start + len(batch))):
            found[offset] = batch[offset - start]
        start += len(batch)
        if len(found) == len(wanted):
            break
    return found


def samples_figure(rows, names: Sequence[str], model_name: str):
    """A 4x4 grid of ``(image, prediction, label)`` rows, each captioned with its prediction.

    Images of any size are shown: one channel in grey, three or four as colour, others by their
    first channel. Captions stay inside their cell whatever the class names (long names are
    cut with an ellipsis; a wrong prediction puts the true class on a second line).
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 4, figsize=(7, 8.2))
    for ax, (image, row, label) in zip(axes.flat, rows):
        if image.shape[-1] not in (3, 4):
            image = image[..., 0]
        cls = int(row["classes"])
        ax.imshow(np.clip(image, 0, 1), cmap="gray", vmin=0, vmax=1)
        title = f"{_wrap(names[cls], 2)} {row['probabilities'][cls]:.2f}"
        if label is not None and cls != label:
            title += f"\n≠ {_wrap(names[label], 1)}"
        color = "black" if label is None else "green" if cls == label else "red"
        ax.set_title(title, color=color, fontsize=7.5)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(
        f"{_short(model_name, 40)}: predicted class and probability\n"
        "green: right; red: wrong, ≠ the true class",
        fontsize=10,
    )
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.01, top=0.86, wspace=0.15, hspace=0.6)
    return fig


def _wrap(name: str, lines: int, width: int = 20) -> str:
    """``name`` on at most ``lines`` lines of ``width`` characters, the rest cut (…)."""
    wrapped = textwrap.wrap(name, width, break_long_words=True) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = _short(wrapped[-1] + " …", width)
    return "\n".join(wrapped)


def _short(name: str, width: int = 10) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def export(config: bridge.Config) -> Dict[str, Any]:
    """Writes a SavedModel under ``export_dir/<timestamp>/`` and, optionally, a Keras file.

    ``keras_output`` (``.keras`` or ``.h5``) is written for Keras 3 unless ``keras_format`` is
    ``tf_keras`` (see ``keras_models.keras3``); optimizer state is not part of it.

    The version folder also gets ``model.onnx`` (``onnx_export``) when the ``onnx`` extra is
    installed; when it cannot be converted the SavedModel is kept and one line says why, but a
    full disk fails the export and removes the new version folder (all or nothing).

    An export computes in float32 unless ``mixed_bfloat16`` was asked for by name: what
    ``--precision=auto`` picks for training on this machine's CPU says nothing of the machine that
    serves, and onnxruntime has no bfloat16 kernels for these graphs (``model.onnx`` is skipped).

    Returns:
        ``{"saved_model", "onnx", "checkpoint", "keras"}`` (``onnx``: None when skipped).
    """
    if config.precision_reason:  # chosen by --precision=auto, not by the user
        config = dataclasses.replace(config, precision="float32", precision_reason="")
    _preflight(config, "export")
    spec = data_pipeline.load_spec(config.data_dir)
    checkpoint = bridge.resolve_checkpoint(config)
    bridge.check_checkpoint_fits(config, checkpoint, spec=spec)
    note = provenance.other_dataset_note(
        checkpoint, spec, "exporting with the shape and class names of"
    )
    estimator = bridge.make_estimator(config, spec)
    os.makedirs(config.export_dir, exist_ok=True)
    before = set(os.listdir(config.export_dir))
    result = {"saved_model": None, "onnx": None, "checkpoint": checkpoint, "keras": None}
    try:
        with data_pipeline.translate_disk_full(config.export_dir):
            _export(config, spec, estimator, checkpoint, result)
    except data_pipeline.DiskFullError as full:
        # A version folder is all or nothing: one without its model.onnx goes, and so does the
        # Estimator's unfinished temp-<second>/; every file the job writes itself goes through
        # atomic_output, which removes its temporary name.
        for name in set(os.listdir(config.export_dir)) - before:
            path = os.path.join(config.export_dir, name)
            if name.startswith("temp-") or (name.isdigit() and path != result["saved_model"]):
                data_pipeline.diskfull.remove(path)
        versions = sorted(n for n in before if n.isdigit())
        kept = [
            f"{p} is complete"
            for p in (result["saved_model"], result["onnx"], result["keras"])
            if p
        ]
        if versions:
            kept.append(f"the earlier export {versions[-1]} in {config.export_dir} is untouched")
        raise full.with_kept(", ".join(kept) or "nothing was exported") from full.__cause__
    return _noted(note, result)


def _export(config: bridge.Config, spec, estimator, checkpoint: str, result: Dict[str, Any]):
    """Writes each export file in turn, recording each in ``result`` once it is complete."""
    _wait_for_a_free_timestamp(config.export_dir)
    path = estimator.export_saved_model(
        config.export_dir, bridge.serving_input_receiver_fn(spec), checkpoint_path=checkpoint
    )
    path = path.decode() if isinstance(path, bytes) else path
    onnx_path, skipped = onnx_export.write_onnx(path, bridge.class_names(spec), checkpoint)
    if skipped:
        _info(f"note: {onnx_export.ONNX_FILE} skipped, the SavedModel is complete: {skipped}")
    result["saved_model"], result["onnx"] = path, onnx_path  # the version is complete
    if config.keras_output:
        model = bridge.keras_model_from_checkpoint(config, checkpoint, spec)
        _atomic_keras_save(model, config.keras_output, config.keras_format)
        result["keras"] = config.keras_output


def _wait_for_a_free_timestamp(export_dir: str) -> None:
    """Waits out the current second while an interrupted export's ``temp-<second>`` is there.

    The Estimator writes to ``temp-<unix second>`` and renames it to ``<unix second>``; it skips
    a second whose final folder exists but not one whose temp folder does, and the SavedModel
    builder then fails with a bare AssertionError. A rerun within a second of a killed export
    would hit that.
    """
    while os.path.exists(os.path.join(export_dir, f"temp-{int(time.time())}")):
        time.sleep(0.05)


def _atomic_keras_save(model: keras.Model, path: str, keras_format: str = "tf_keras") -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    suffix = os.path.splitext(path)[1]
    # Keras picks the format from the extension: the temporary name keeps it.
    with data_pipeline.atomic_output(path, f"{path}.tmp{suffix}") as tmp:
        if keras_format == "keras3":
            keras3.to_keras3_model(model, tmp)
        else:
            model.save(tmp)


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


class ProgressHook(tf.estimator.SessionRunHook):
    """Logs step, loss and examples/s every N steps, with a progress bar and ETA on a terminal."""

    def __init__(
        self,
        batch_size: int,
        start_step: int,
        target_step: int,
        every_n_steps: int = 100,
        progress_bar: bool = True,
        stream=None,
    ):
        self._batch_size = batch_size
        self._start_step = start_step
        self._target = target_step
        self._every = every_n_steps
        self._stream = stream or sys.stderr
        self._bar_wanted = progress_bar and getattr(self._stream, "isatty", lambda: False)()
        self._bar = None
        self.seconds = 0.0
        self.examples_per_sec = 0.0
        self.step = start_step

    def begin(self):
        self._global_step = tf.compat.v1.train.get_global_step()
        self._loss = tf.compat.v1.get_collection(bridge.LOSS_COLLECTION)[0]

    def after_create_session(self, session, coord):
        self._step = int(session.run(self._global_step))
        self._first_step = self._step
        self._t0 = self._last_t = None
        self._last_step = self._step
        if self._bar_wanted:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self._target,
                initial=self._step,
                unit="step",
                file=self._stream,
                dynamic_ncols=True,
                leave=False,
            )

    def before_run(self, run_context):
        fetches = {"step": self._global_step}
        if (self._step + 1) % self._every == 0 or self._step + 1 >= self._target:
            fetches["loss"] = self._loss
        return tf.estimator.SessionRunArgs(fetches)

    def after_run(self, run_context, run_values):
        now = time.perf_counter()
        step = int(run_values.results["step"]) + 1
        if self._t0 is None:  # time from the end of the first step: it includes graph warm-up
            self._t0 = self._last_t = now
            self._timed_from = self._last_step = step
        if self._bar is not None:
            self._bar.update(step - self._step)
        self._step = self.step = step
        if "loss" in run_values.results:
            line = f"step {step:>7d}/{self._target}  loss {run_values.results['loss']:.4f}"
            if now > self._last_t:
                rate = (step - self._last_step) * self._batch_size / (now - self._last_t)
                line += f"  {rate:,.0f} examples/s"
            if self._bar is not None:
                self._bar.write(line, file=self._stream)
            else:
                print(line, file=self._stream, flush=True)
            self._last_t, self._last_step = now, step

    def end(self, session):
        if self._bar is not None:
            self._bar.close()
        if self._t0 is not None:
            self.seconds = time.perf_counter() - self._t0
            steps = self._step - self._timed_from
            self.examples_per_sec = steps * self._batch_size / self.seconds if steps > 0 else 0.0


class StopOnSignalHook(tf.estimator.SessionRunHook):
    """Turns SIGINT/SIGTERM into a clean stop, so the Estimator saves a final checkpoint.

    A second signal is handled as usual (KeyboardInterrupt), for a user who really wants out.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.interrupted = False
        self._previous = {}

    def _handle(self, signum, frame):
        self.interrupted = True
        for sig, handler in self._previous.items():  # the next signal acts as before
            signal.signal(sig, handler)

    def after_create_session(self, session, coord):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def after_run(self, run_context, run_values):
        if self.interrupted:
            run_context.request_stop()

    def end(self, session):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
