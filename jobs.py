"""The jobs ``main.py`` runs, each taking one :class:`estimator_bridge.Config`.

:func:`train`, :func:`evaluate`, :func:`train_and_evaluate`, :func:`predict` and :func:`export`
orchestrate the Estimator that :mod:`estimator_bridge` builds: what to check before anything is
written, what to print, what to return. The session hooks that show progress and turn signals
into a clean stop, and the prediction plots, live here too.
"""

from __future__ import annotations

import csv
import math
import os
import signal
import sys
import textwrap
import threading
import time
from typing import Any, Dict, List, Sequence

import numpy as np
import tensorflow as tf
import tf_keras as keras

import data_pipeline
import estimator_bridge as bridge
import keras_models
import preflight


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
    bridge.check_resumable(config, network)
    with preflight.trainer_lock(config.model_dir):
        return _train(config, spec, network, hooks)


def _preflight(config: bridge.Config, mode: str) -> None:
    """What every job checks before it builds or writes anything."""
    config.validate()
    preflight.check_paths(config, mode)
    preflight.warn_if_bf16_is_emulated(config.precision)


def _train(
    config: bridge.Config, spec, network, hooks: Sequence[tf.estimator.SessionRunHook]
) -> Dict[str, Any]:
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
    estimator = bridge.make_estimator(config, spec)
    splits = ("train", "test") if config.eval_split == "both" else (config.eval_split,)
    results = {}
    for split in splits:
        with data_pipeline.translate_errors(config.data_dir):
            metrics = estimator.evaluate(
                bridge.make_input_fn(config, split, False), checkpoint_path=checkpoint, name=split
            )
        results[split] = _summarise_eval(config, split, checkpoint, metrics, spec.class_names)
    if len(splits) == 1:
        return results[splits[0]]
    step = results["test"]["global_step"]
    return {"split": "both", "global_step": step, "checkpoint": checkpoint, **results}


def _summarise_eval(
    config: bridge.Config, split: str, checkpoint: str, metrics, class_names: Sequence[str]
) -> Dict[str, Any]:
    step = int(metrics["global_step"])
    matrix = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    path = os.path.join(config.model_dir, f"eval_{split}", f"confusion_matrix-{step}.csv")
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
    with open(path + ".tmp", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, matrix):
            writer.writerow([name, *(int(count) for count in row)])
    os.replace(path + ".tmp", path)


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
    bridge.check_resumable(config, network)
    with preflight.trainer_lock(config.model_dir):
        return _train_and_evaluate(config, spec, network)


def _train_and_evaluate(config: bridge.Config, spec, network) -> Dict[str, Any]:
    warm_start = bridge.warm_start_settings(config, network, spec)
    estimator = bridge.make_estimator(config, spec, warm_start)
    target = bridge.target_step(config, spec)
    split = "train" if config.eval_split == "train" else "test"
    exporter = tf.estimator.BestExporter(
        name="best",
        serving_input_receiver_fn=bridge.serving_input_receiver_fn(spec),
        compare_fn=_higher_accuracy,
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
    with data_pipeline.translate_errors(config.data_dir):
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


def _higher_accuracy(best_eval_result, current_eval_result) -> bool:
    return current_eval_result["accuracy"] > best_eval_result["accuracy"]


def predict(config: bridge.Config) -> Dict[str, Any]:
    """Writes ``predictions-<split>.csv`` and optional plots.

    The CSV's columns are index, label, class, probability (of the predicted class), then
    label_name and class_name (the dataset's class names), and for a dataset prepared from an
    image folder, file (the image's path in that folder).

    Returns:
        ``{"csv", "examples", "accuracy", "checkpoint", "plots"}``.
    """
    _preflight(config, "predict")
    spec = data_pipeline.load_spec(config.data_dir)
    checkpoint = bridge.resolve_checkpoint(config)
    network = bridge.check_checkpoint_fits(config, checkpoint, spec=spec)
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
    samples: Dict[int, Dict[str, np.ndarray]] = {}
    correct = count = 0
    # Written under a temporary name: an interrupted run leaves no complete-looking CSV.
    errors = data_pipeline.translate_errors(config.data_dir)
    with errors, open(csv_path + ".tmp", "w", newline="") as handle:
        writer = csv.writer(handle)
        columns = ["index", "label", "class", "probability", "label_name", "class_name"]
        writer.writerow(columns + (["file"] if files is not None else []))
        predictions = estimator.predict(input_fn, predict_keys=keys, checkpoint_path=checkpoint)
        for index, prediction in enumerate(predictions):
            label, cls = int(labels[index]), int(prediction["classes"])
            probability = f"{prediction['probabilities'][cls]:.6f}"
            source = [files[index]] if files is not None else []
            writer.writerow([index, label, cls, probability, names[label], names[cls], *source])
            correct += cls == label
            count += 1
            if index in plotted:
                samples[index] = prediction
    os.replace(csv_path + ".tmp", csv_path)
    plots = _plot_predictions(config, samples, labels, names) if config.plot else []
    return {
        "csv": csv_path,
        "examples": count,
        "accuracy": round(correct / max(count, 1), 6),
        "checkpoint": checkpoint,
        "plots": plots,
    }


_PLOTTED_DIGITS = 16


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
    config: bridge.Config, samples: Dict[int, Dict[str, np.ndarray]], labels, names
) -> List[str]:
    """Writes a grid of the sampled images with their predictions and the conv1 feature maps.

    Args:
        config: The run's config (split, output folder, model label).
        samples: Record index -> its prediction, for the records :func:`sample_indices` chose.
        labels: Every record's label.
        names: The class names.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = config.predict_split
    images = _images_at(config, split, sorted(samples))
    rows = [(images[i], samples[i], int(labels[i])) for i in sorted(samples)]
    model_name = keras_models.model_label(config.model)
    fig = samples_figure(rows, names, model_name)
    paths = [os.path.join(config.output_dir, f"samples-{split}.png")]
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

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
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


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
        if cls != label:
            title += f"\n≠ {_wrap(names[label], 1)}"
        ax.set_title(title, color="green" if cls == label else "red", fontsize=7.5)
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
    """Writes a SavedModel under ``export_dir/<timestamp>/`` and, optionally, a ``.keras`` file.

    Returns:
        ``{"saved_model", "checkpoint", "keras"}``.
    """
    _preflight(config, "export")
    spec = data_pipeline.load_spec(config.data_dir)
    checkpoint = bridge.resolve_checkpoint(config)
    bridge.check_checkpoint_fits(config, checkpoint, spec=spec)
    estimator = bridge.make_estimator(config, spec)
    os.makedirs(config.export_dir, exist_ok=True)
    _wait_for_a_free_timestamp(config.export_dir)
    path = estimator.export_saved_model(
        config.export_dir, bridge.serving_input_receiver_fn(spec), checkpoint_path=checkpoint
    )
    path = path.decode() if isinstance(path, bytes) else path
    result = {"saved_model": path, "checkpoint": checkpoint, "keras": None}
    if config.keras_output:
        model = bridge.keras_model_from_checkpoint(config, checkpoint, spec)
        _atomic_keras_save(model, config.keras_output)
        result["keras"] = config.keras_output
    return result


def _wait_for_a_free_timestamp(export_dir: str) -> None:
    """Waits out the current second while an interrupted export's ``temp-<second>`` is there.

    The Estimator writes to ``temp-<unix second>`` and renames it to ``<unix second>``; it skips
    a second whose final folder exists but not one whose temp folder does, and the SavedModel
    builder then fails with a bare AssertionError. A rerun within a second of a killed export
    would hit that.
    """
    while os.path.exists(os.path.join(export_dir, f"temp-{int(time.time())}")):
        time.sleep(0.05)


def _atomic_keras_save(model: keras.Model, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    suffix = os.path.splitext(path)[1]
    tmp = f"{path}.tmp{suffix}"
    model.save(tmp)
    os.replace(tmp, path)


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
