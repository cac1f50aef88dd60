"""One generic Estimator ``model_fn`` for any functional Keras model, and what the Estimator needs.

The Keras networks in :mod:`keras_models` know nothing of the Estimator. This module builds the
network named in ``params`` inside :func:`model_fn` (a registry name,
``package.module:function`` or a model file, resolved by :func:`keras_models.resolve_model`),
calls it under the mode flag and returns ``EstimatorSpec`` objects. Around it sit the run's
:class:`Config`, the Estimator and its input_fns (:func:`make_estimator`,
:func:`make_input_fn`), checkpoint checks, the serving receivers and the bridges back to plain
Keras (:func:`keras_model_from_checkpoint`, :func:`keras_weights_to_checkpoint`). The jobs that
``main.py`` runs are in :mod:`jobs`.

Pitfalls of Keras inside ``model_fn`` on TF 2.15 that shape the code below:

* the model is built inside ``model_fn`` (each mode gets a fresh graph) and called with an
  explicit ``training=`` flag (the Estimator never sets Keras' learning phase);
* BatchNorm moving-average updates are not in ``UPDATE_OPS``: they are taken from the model
  (``get_updates_for``) and grouped with the train op;
* regularisation losses live in ``model.losses`` and are added to the loss by hand;
* a ``tf.compat.v1.train`` optimizer drives the global step;
* checkpoint keys are the variable names of a fresh graph (:func:`describe_network` builds the
  network in a throwaway ``tf.Graph`` to list them); an eager Keras model's weights are matched
  to them by position, because Keras names unnamed layers from a per-graph counter in graph mode
  but from a process-wide one eagerly (``dense`` in every Estimator graph, ``dense_2`` in the
  third eager build).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import threading
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf
import tf_keras as keras
from tf_keras.src import backend as keras_backend  # RandomGenerator has no public name
from tf_keras.src.layers.rnn import gru_lstm_utils  # see _without_cudnn_variants

import data_pipeline
import distribution
import keras_models
import provenance
import summaries
from keras_models import keras3

TRAIN = tf.estimator.ModeKeys.TRAIN
EVAL = tf.estimator.ModeKeys.EVAL
PREDICT = tf.estimator.ModeKeys.PREDICT

PRECISIONS = ("float32", "mixed_bfloat16")
# --keras_output's format: a Keras 3 file (keras_models.keras3) or tf_keras's own.
KERAS_FORMATS = ("keras3", "tf_keras")
LR_SCHEDULES = ("constant", "cosine", "exponential")
# Config's training settings for models without their own (keras_models.training_defaults).
COMMON_TRAINING = {"learning_rate": 1e-3, "lr_schedule": "constant"}
EVAL_SPLITS = ("train", "test", "both")
# Graph collection holding the total training loss (cross-entropy plus regularisers).
LOSS_COLLECTION = "estimator_bridge_total_loss"
# Checkpoint key of a string variable recording the --model and --model_params trained.
MODEL_KEY = "estimator_bridge_model"
# Key of the model's own output among the layer outputs, when no single layer gives it.
_OUTPUT = ":output"
# Global steps between TensorBoard summaries of training (the Estimator's default).
SUMMARY_STEPS = 100


class UsageError(Exception):
    """A problem with what the user asked for; the CLI prints it on one line and exits with 2."""

    exit_code = 2


class TrainingError(Exception):
    """Training cannot go on (a NaN loss); the last good checkpoint is kept. Exit code 1."""

    exit_code = 1


@dataclasses.dataclass
class Config:
    """Everything one run needs; ``main.py`` fills it from flags, tests build it directly.

    Attributes:
        model: A registry name (``keras_models.MODEL_NAMES``), ``package.module:function`` (a
            builder returning a functional ``keras.Model``) or a ``.keras``/``.h5`` model file
            (its weights start training unless ``warm_start_from`` is set).
        data_dir: Folder holding the TFRecord shards and ``dataset_spec.json``.
        model_dir: Checkpoints and TensorBoard summaries.
        batch_size: Training batch size.
        eval_batch_size: Batch size for evaluation and prediction.
        epochs: Training length in passes over the train split, counted from step 0.
        train_steps: Training length as a global step; overrides ``epochs`` when set.
        learning_rate: Peak learning rate for Adam; ``None``: the network's default
            (``keras_models.training_defaults``), else 1e-3.
        lr_schedule: ``constant``, ``cosine`` (to 0 at the last step) or ``exponential``;
            ``None``: the network's default (``cosine`` for the rnn), else ``constant``.
        dropout_rate: Dropout before the logits layer (for builders taking ``dropout_rate``).
        model_params: Keyword arguments for the builder; they override the dataset's
            ``input_shape``/``num_classes`` and ``dropout_rate``.
        precision: ``float32`` or ``mixed_bfloat16`` (bf16 compute, float32 variables/loss);
            ``--precision=auto`` is resolved to one of them when the config is built
            (``preflight.choose_precision``).
        precision_reason: Why ``precision`` was chosen; training prints it as its first line.
        augment: Random shifts of up to ``augment_shift`` pixels on training images.
        augment_shift: Largest shift, in pixels.
        seed: Seeds every random choice (initial weights, dropout, input order, augmentation):
            two runs with the same seed write bit-identical checkpoints, resumed or not (on
            one machine, ``distribution="none"``). ``None``: a different run every time.
        checkpoint_path: Checkpoint (prefix or folder) for evaluate/predict/export.
        eval_split: ``train``, ``test`` or ``both``.
        eval_limit: Evaluate/predict only the first N examples of the split.
        train_limit: Train only on the first N examples of the train split.
        export_dir: Parent folder of SavedModel versions.
        predict_split: Split that ``predict`` reads.
        inputs: New image files for ``predict`` instead of a split: a file, a folder or a glob
            (``jobs.predict_inputs``).
        top_k: ``predict`` with ``inputs``: the classes listed per file, most probable first.
        predict_export: ``predict`` with ``inputs``: an export (``serving.load``'s path) to
            predict with instead of the checkpoint.
        output_dir: Where ``predict`` writes its CSV and plots.
        plot: Write PNG plots of predictions and feature maps.
        warm_start_from: Keras weights file (``.keras``/``.h5``, Keras 2 or 3) to initialise
            training from.
        keras_output: Path of the ``.keras``/``.h5`` file that ``export`` also writes
            (``None``: skip).
        keras_format: ``keras3`` (loads in Keras 3, see ``keras_models.keras3``) or
            ``tf_keras`` (Keras 2) for ``keras_output``.
        unsafe_deserialization: Let model files' serialised Python (``Lambda`` code) run;
            otherwise such files are refused before anything is built.
        save_checkpoints_steps: Checkpoint interval in steps.
        keep_checkpoint_max: Checkpoints kept on disk.
        log_every_n_steps: Progress line interval.
        progress: Show a progress bar (only when stderr is a terminal).
        intra_op_threads: TensorFlow intra-op threads (0: TensorFlow decides).
        inter_op_threads: TensorFlow inter-op threads (0: TensorFlow decides).
        eval_throttle_secs: Least seconds between evaluations in train_and_evaluate.
        distribution: ``none``, ``mirrored``, ``multi_worker_mirrored`` or
            ``parameter_server`` (see :mod:`distribution`); the cluster comes from ``TF_CONFIG``.
    """

    model: str = "cnn"
    data_dir: str = "data/mnist"
    model_dir: str = "models/cnn"
    batch_size: int = 128
    eval_batch_size: int = 1000
    epochs: float = 1.0
    train_steps: Optional[int] = None
    learning_rate: Optional[float] = None
    lr_schedule: Optional[str] = None
    dropout_rate: float = 0.4
    model_params: Dict[str, Any] = dataclasses.field(default_factory=dict)
    precision: str = "float32"
    precision_reason: str = ""
    augment: bool = False
    augment_shift: int = 2
    seed: Optional[int] = None
    checkpoint_path: Optional[str] = None
    eval_split: str = "test"
    eval_limit: Optional[int] = None
    train_limit: Optional[int] = None
    export_dir: str = "exports"
    predict_split: str = "test"
    inputs: Optional[str] = None
    top_k: int = 3
    predict_export: Optional[str] = None
    output_dir: str = "predictions"
    plot: bool = False
    warm_start_from: Optional[str] = None
    keras_output: Optional[str] = None
    keras_format: str = "keras3"
    unsafe_deserialization: bool = False
    save_checkpoints_steps: int = 500
    keep_checkpoint_max: int = 5
    log_every_n_steps: int = 100
    progress: bool = True
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    eval_throttle_secs: int = 60
    distribution: str = "none"

    def __post_init__(self) -> None:
        # Fields left None take the network's training defaults, then everyone's.
        defaults = {**COMMON_TRAINING, **keras_models.training_defaults(self.model)}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def validate(self) -> None:
        """Raises UsageError (or ``keras_models.ModelError``) for values no run can use."""
        resolve(self)
        if self.warm_start_from:  # before anything is written: code in the file is refused
            keras3.check_file(self.warm_start_from, self.unsafe_deserialization)
        for name in (
            "batch_size",
            "eval_batch_size",
            "save_checkpoints_steps",
            "log_every_n_steps",
            "top_k",
        ):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.train_steps is not None and self.train_steps <= 0:
            raise UsageError(f"--train_steps must be a positive integer, got {self.train_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise UsageError(f"--epochs must be positive, got {self.epochs}")
        if not self.learning_rate > 0:
            raise UsageError(f"--learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.dropout_rate < 1:
            raise UsageError(f"--dropout_rate must be in [0, 1), got {self.dropout_rate}")
        choices = {
            "precision": PRECISIONS,
            "lr_schedule": LR_SCHEDULES,
            "eval_split": EVAL_SPLITS,
            "predict_split": ("train", "test"),
            "keras_format": KERAS_FORMATS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(
                    f"--{name}={getattr(self, name)} is not valid; choose one of: "
                    + ", ".join(allowed)
                )


# --------------------------------------------------------------------------------------------
# The model_fn
# --------------------------------------------------------------------------------------------


def model_fn(features, labels, mode, params, config=None):
    """Generic Estimator model_fn for any functional Keras classifier.

    With a ``train_distribute``/``eval_distribute`` strategy the Estimator calls the model_fn
    through AutoGraph (``call_for_each_replica``), which would convert the whole Keras build
    (~30 s per graph on a busy 2-core host); the model_fn is plain graph-building Python, so the
    work is done by :func:`_model_fn`, which AutoGraph leaves alone.

    Args:
        features: ``{"image": float32 [batch, H, W, C]}``.
        labels: int64 ``[batch]`` class ids (``None`` in PREDICT).
        mode: A ``tf.estimator.ModeKeys`` value.
        params: Dict with ``model`` (what ``--model`` takes, or a builder callable),
            ``learning_rate``, and optionally ``model_params`` (builder kwargs),
            ``dropout_rate``, ``input_shape`` and ``num_classes`` (offered to builders that take
            them), ``class_names``, ``lr_schedule`` + ``decay_steps``, ``precision``,
            ``intermediates`` (add every layer's output to the predictions),
            ``model_identity`` (recorded under ``MODEL_KEY`` when training),
            ``dataset_identity`` (under ``provenance.DATASET_KEY``) and
            ``summary_steps`` (the model_fn then writes the training summaries itself, see
            :class:`summaries.SummaryHook`; the Estimator's ``save_summary_steps`` must be 0).
        config: The Estimator's ``RunConfig`` (only the chief writes summaries).

    Returns:
        A ``tf.estimator.EstimatorSpec`` for ``mode``.
    """
    return _model_fn(features, labels, mode, params, config)


@tf.autograph.experimental.do_not_convert
def _model_fn(features, labels, mode, params, config=None):
    images = features["image"]
    training = mode == TRAIN
    _seed_initializers(params.get("seed"))
    model = _build_model({"input_shape": images.shape[1:], **params})
    if training and params.get("seed") is not None:
        _seed_random_layers_by_step(model, params["seed"])
    # One call of a multi-output view of the same layers gives the output and, for free, every
    # layer's intermediate tensor (the tutorial listed conv1, pool1, ... by hand).
    outputs_model, output_key = _layer_outputs_model(model)
    with _without_cudnn_variants(mode != PREDICT):
        layer_outputs = outputs_model(images, training=training)
    logits = _logits(layer_outputs[output_key])
    probabilities = tf.nn.softmax(logits)
    classes = tf.argmax(logits, axis=-1)

    if mode == PREDICT:
        predictions = {"classes": classes, "probabilities": probabilities, "logits": logits}
        if params.get("intermediates"):
            for name, tensor in layer_outputs.items():
                if name != _OUTPUT:
                    predictions.setdefault(name, tf.cast(tensor, tf.float32))
        return tf.estimator.EstimatorSpec(
            mode,
            predictions=predictions,
            export_outputs=_export_outputs(predictions, params.get("class_names")),
        )

    labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
    cross_entropy = tf.compat.v1.losses.sparse_softmax_cross_entropy(labels, logits)
    regularization = [tf.cast(loss, tf.float32) for loss in model.losses]
    loss = tf.add_n([cross_entropy, *regularization]) if regularization else cross_entropy
    num_classes = int(logits.shape[-1])

    if mode == EVAL:
        metrics = {
            "accuracy": tf.compat.v1.metrics.accuracy(labels, classes),
            "mean_per_class_accuracy": tf.compat.v1.metrics.mean_per_class_accuracy(
                labels, classes, num_classes
            ),
            "confusion_matrix": _confusion_matrix_metric(labels, classes, num_classes),
        }
        return tf.estimator.EstimatorSpec(mode, loss=loss, eval_metric_ops=metrics)

    global_step = tf.compat.v1.train.get_or_create_global_step()
    learning_rate = _learning_rate(params, global_step)
    optimizer = tf.compat.v1.train.AdamOptimizer(learning_rate)
    minimize = optimizer.minimize(loss, global_step, var_list=model.trainable_variables)
    # BatchNorm moving averages: Keras keeps them on the model, not in UPDATE_OPS.
    updates = model.get_updates_for(None) + model.get_updates_for(images)
    train_op = tf.group(minimize, *updates)
    tf.compat.v1.add_to_collection(LOSS_COLLECTION, loss)  # for ProgressHook
    for key, identity in (
        (MODEL_KEY, params.get("model_identity")),
        (provenance.DATASET_KEY, params.get("dataset_identity")),
    ):
        if identity:
            # Saved with the checkpoints (not trained), so a mismatch can name the model (or
            # dataset) trained.
            tf.compat.v1.Variable(
                identity,
                trainable=False,
                name=key,
                collections=[tf.compat.v1.GraphKeys.GLOBAL_VARIABLES],
            )
    shown = (images, labels, classes, learning_rate, layer_outputs)
    hooks = []
    if not params.get("summary_steps"):
        summaries.train_summaries(*shown)  # for the Estimator's own SummarySaverHook
    elif config is not None and config.is_chief:
        due = tf.compat.v1.placeholder_with_default(False, [], name="summaries_due")
        # The loss too, which the Estimator adds for its own hook.
        summary = tf.cond(
            due,
            lambda: tf.compat.v1.summary.merge(
                [*summaries.train_summaries(*shown), tf.compat.v1.summary.scalar("loss", loss)]
            ),
            lambda: tf.constant(""),
        )
        hooks.append(summaries.SummaryHook(params["summary_steps"], config.model_dir, summary, due))
    return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op, training_hooks=hooks)


def _build_model(params: Mapping[str, Any]) -> keras.Model:
    """Builds the network from ``params`` under the requested dtype policy."""
    resolved = keras_models.resolve_model(
        params["model"],
        params.get("model_params"),
        unsafe_deserialization=params.get("unsafe_deserialization", False),
    )
    input_shape = params.get("input_shape")
    with precision_policy(params.get("precision", "float32")):
        model = resolved.build(
            None if input_shape is None else tuple(input_shape),
            params.get("num_classes"),
            dropout_rate=params.get("dropout_rate"),
        )
    _use_fused_recurrent_kernels(model)
    return model


def _seed_initializers(seed: Optional[int]) -> None:
    """Makes the Keras initialisers of the next build draw from ``seed``.

    A tf_keras 2.15 initialiser built with ``seed=None`` (every layer default, and each block of
    ``keras_models.GateOrthogonal``) runs a *stateless* op whose seed it takes, when first
    called, from Keras's own seed generator, else from Python's unseeded ``random``: the graph
    seed (``RunConfig.tf_random_seed``) never reaches it, so two runs with the same ``--seed``
    started from different weights. ``keras.utils.set_random_seed`` seeds that generator (and
    the graph, Python and NumPy seeds); layers are built in a fixed order, so each initialiser
    gets the same seed on every run.
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)


class _StepSeededGenerator(keras_backend.RandomGenerator):
    """Stateless draws keyed on (seed, layer, replica, global step) instead of a stateful stream.

    A stateful random op (what Keras' Dropout uses in a graph) restarts its stream in every new
    session, so a resumed run would repeat the first run's dropout masks; keyed on the global
    step, step N draws the same mask whether or not the run was resumed before it.
    """

    def __init__(self, seed: int, layer_index: int):
        super().__init__(seed=seed, rng_type=self.RNG_STATELESS)
        self._layer_index = layer_index

    def make_seed_for_stateless_op(self):
        self._maybe_init()
        replica = tf.distribute.get_replica_context()
        replica_id = replica.replica_id_in_sync_group if replica else 0
        key = tf.constant([self._seed, self._layer_index], tf.int64)
        key = tf.random.experimental.stateless_fold_in(key, replica_id)
        step = tf.compat.v1.train.get_global_step()
        return tf.random.experimental.stateless_fold_in(key, tf.cast(step, tf.int64))


def _seed_random_layers_by_step(model: keras.Model, seed: int) -> None:
    """Gives every random layer (Dropout, GaussianNoise, ...) a step-keyed stateless generator."""
    for index, layer in enumerate(model.submodules):
        if isinstance(getattr(layer, "_random_generator", None), keras_backend.RandomGenerator):
            layer._random_generator = _StepSeededGenerator(seed, index)  # private: see the class


def _softmax_input(output: tf.Tensor) -> Optional[tf.Tensor]:
    """The logits under a softmax output, as Keras' own ``categorical_crossentropy`` finds them.

    A ``Softmax`` op, possibly behind ``Cast`` (a float32 output of a bfloat16 softmax, or the
    other way round) or ``Identity`` ops, gives its input; anything else gives None.
    """
    logits = getattr(output, "_keras_logits", None)  # set by keras.activations.softmax
    if logits is not None:
        return logits
    tensor = output
    while tensor.op.type in ("Cast", "Identity"):
        tensor = tensor.op.inputs[0]
    return tensor.op.inputs[0] if tensor.op.type == "Softmax" else None


def _logits(output: tf.Tensor) -> tf.Tensor:
    """Float32 logits of the model's output: the output itself, or the input of its softmax.

    Training on the softmax's input keeps the cross-entropy numerically stable (no log of a
    rounded probability), and a softmax model exports the same signatures as a logits one.
    """
    logits = _softmax_input(output)
    return tf.cast(output if logits is None else logits, tf.float32)


def _use_fused_recurrent_kernels(model: keras.Model) -> None:
    """Gives Keras GRU/LSTM layers the fused loop they get in ``fit``, in the Estimator graph.

    Keras decides at layer construction whether a GRU/LSTM may run its fused implementation
    (``standard_gru``: the input projection for all timesteps in one matmul, then a tight
    ``while`` loop; cuDNN on GPU). The check includes "executing eagerly outside functions",
    which is false in an Estimator's TF1 graph, so there the layers fall back to the generic
    per-step cell loop: the same maths, measured about 9 % slower on the rnn (1,765 vs 1,917
    examples/s at batch 128). The remaining conditions are the layer's own; this re-evaluates
    them without the eager one.
    """
    for layer in model.submodules:
        if not isinstance(layer, (keras.layers.GRU, keras.layers.LSTM)):
            continue
        cell = layer.cell
        layer._could_use_gpu_kernel = (  # private: see the docstring
            cell.activation in (keras.activations.tanh, tf.tanh)
            and cell.recurrent_activation in (keras.activations.sigmoid, tf.sigmoid)
            and cell.recurrent_dropout == 0
            and not layer.unroll
            and cell.use_bias
            and getattr(cell, "reset_after", True)
        )


_recurrent_build = threading.local()  # per thread: MirroredStrategy builds replicas in threads


@contextlib.contextmanager
def _without_cudnn_variants(skip: bool) -> Iterator[None]:
    """Keeps GRU/LSTM layers called in the block from adding their cuDNN variant, on a CPU host.

    In a graph, a fused GRU/LSTM adds two implementations: the loop it runs and a cuDNN one (with
    its gradients) that Grappler's implementation selector swaps in on a GPU. Without a GPU the
    cuDNN variant never runs, yet Grappler optimises it for every distinct ``Session.run`` of the
    training graph: the birnn's 3-step training took 1.4x as long with it, with the same evaluation
    afterwards (``bench/bench_startup.py``; README, "The model_fn"). ``_model_fn`` skips it for
    TRAIN and EVAL only: an export keeps it, so it still runs cuDNN where it is served on a GPU.
    """
    previous = getattr(_recurrent_build, "skip_cudnn", False)
    _recurrent_build.skip_cudnn = skip and not tf.config.list_physical_devices("GPU")
    try:
        yield
    finally:
        _recurrent_build.skip_cudnn = previous


def _register_unless_skipped(register: Callable) -> Callable:
    """Wraps Keras' ``function_register`` (which adds the cuDNN variant) for the switch above."""

    def function_register(func, *args, **kwargs):
        if getattr(_recurrent_build, "skip_cudnn", False):
            return None  # Keras' GRU and LSTM ignore the returned function
        return register(func, *args, **kwargs)

    return function_register


gru_lstm_utils.function_register = _register_unless_skipped(gru_lstm_utils.function_register)


@contextlib.contextmanager
def precision_policy(precision: str) -> Iterator[None]:
    """Sets the Keras global dtype policy while layers are built, then restores it."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _layer_outputs_model(model: keras.Model) -> Tuple[keras.Model, str]:
    """A model sharing ``model``'s layers whose outputs are ``{layer name: output}``.

    Only layers with one unambiguous output in ``model`` are included: a shared layer (called
    more than once) has none, nor has a layer returning several tensors; a nested model's
    output is the one of its call inside ``model``, not its own internal one. (The node keys
    are Keras' private ``<layer>_ib-<node index>`` names of the nodes that belong to the model.)

    Returns:
        The model and the key of ``model``'s own output among its outputs.
    """
    outputs = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        nodes = [
            index
            for index in range(len(layer._inbound_nodes))
            if f"{layer.name}_ib-{index}" in model._network_nodes
        ]
        if len(nodes) != 1:
            continue
        output = layer.get_output_at(nodes[0])
        if isinstance(output, tf.Tensor) and output.shape.rank:
            outputs[layer.name] = output
    output_key = next((k for k, t in outputs.items() if t is model.outputs[0]), None)
    if output_key is None:
        outputs[_OUTPUT] = model.outputs[0]
        output_key = _OUTPUT
    return keras.Model(model.inputs, outputs, name=f"{model.name}_layer_outputs"), output_key


def _export_outputs(
    predictions: Mapping[str, tf.Tensor], class_names: Optional[Sequence[str]] = None
) -> Dict[str, Any]:
    """Serving signatures: a small predict signature, a classification one, and everything.

    The classification signature's ``classes`` are the dataset's class names (``"0"`` ...
    ``"N-1"`` when it has none); the others add ``class_names``, each row's predicted name.
    """
    probabilities = predictions["probabilities"]
    num_classes = int(probabilities.shape[-1])
    names = tf.constant(
        list(class_names) if class_names else [str(i) for i in range(num_classes)], tf.string
    )
    classes = tf.tile(names[None], [tf.shape(probabilities)[0], 1])
    named = {"class_names": tf.gather(names, predictions["classes"], name="class_names")}
    export = tf.estimator.export
    return {
        "serving_default": export.PredictOutput(
            {"classes": predictions["classes"], "probabilities": probabilities, **named}
        ),
        "classification": export.ClassificationOutput(scores=probabilities, classes=classes),
        "predict": export.PredictOutput({**predictions, **named}),
    }


def _confusion_matrix_metric(labels, predictions, num_classes: int):
    """A streaming confusion matrix (rows: true class, columns: predicted) for eval_metric_ops."""
    total = tf.compat.v1.Variable(
        tf.zeros([num_classes, num_classes], tf.int64),
        trainable=False,
        collections=[
            tf.compat.v1.GraphKeys.LOCAL_VARIABLES,
            tf.compat.v1.GraphKeys.METRIC_VARIABLES,
        ],
        # One copy per replica under a distribution strategy, summed when read.
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.SUM,
        name="confusion_matrix",
    )
    batch = tf.math.confusion_matrix(labels, predictions, num_classes, dtype=tf.int64)
    update = total.assign_add(batch)
    # Read in cross-replica context (as tf.compat.v1.metrics do): the sum over replicas, a
    # plain tensor rather than a PerReplica value a Session cannot fetch.
    value = tf.distribute.get_replica_context().merge_call(
        lambda _, variable: tf.identity(variable), args=(total,)
    )
    return value, update


def _learning_rate(params: Mapping[str, Any], global_step) -> tf.Tensor:
    """The peak rate, held constant or decayed over ``decay_steps``."""
    base = float(params["learning_rate"])
    schedule = params.get("lr_schedule", "constant")
    decay_steps = max(int(params.get("decay_steps") or 1), 1)
    step = tf.cast(global_step, tf.float32)
    if schedule == "cosine":
        progress = tf.minimum(step / decay_steps, 1.0)
        return base * 0.5 * (1.0 + tf.cos(math.pi * progress))
    if schedule == "exponential":
        # Ends at 1% of the peak rate after decay_steps.
        return base * tf.pow(0.01, step / decay_steps)
    return tf.constant(base, tf.float32)


# --------------------------------------------------------------------------------------------
# Estimator construction
# --------------------------------------------------------------------------------------------


def resolve(config: Config) -> keras_models.ResolvedModel:
    """``config.model`` and ``config.model_params`` resolved (``keras_models.resolve_model``)."""
    return keras_models.resolve_model(
        config.model, config.model_params, unsafe_deserialization=config.unsafe_deserialization
    )


def class_names(spec) -> Tuple[str, ...]:
    """The dataset's class names; ``"0"`` ... ``"N-1"`` for specs written without them."""
    names = getattr(spec, "class_names", None)
    return tuple(names) if names else tuple(str(i) for i in range(spec.num_classes))


def model_params(config: Config, spec) -> Dict[str, Any]:
    """The network part of the model_fn's ``params``: what to build and for which data."""
    return {
        "model": config.model,
        "model_params": dict(config.model_params),
        "dropout_rate": config.dropout_rate,
        "input_shape": tuple(spec.image_shape),
        "num_classes": spec.num_classes,
        "unsafe_deserialization": config.unsafe_deserialization,
    }


@dataclasses.dataclass(frozen=True)
class Network:
    """What a build of the network in a throwaway graph says about it.

    Attributes:
        keys: Checkpoint keys of its weights, in ``model.weights`` order: the variable names
            an Estimator graph gives them.
        shapes: The weights' shapes, in the same order.
        layers: Its layer names.
        softmax: Whether its output is a softmax (the bridge then trains on the softmax's input).
    """

    keys: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    layers: Tuple[str, ...]
    softmax: bool


def describe_network(config: Config, spec=None) -> Network:
    """Builds the network (float32) in a throwaway graph and lists its checkpoint layout.

    Jobs call it first: a builder that fails or returns a model the bridge cannot train
    (``keras_models.ModelError``) stops the job before anything is written. The layouts of the
    project's own networks are kept for the process; a user's builder or file is built each time.
    """
    spec = spec or data_pipeline.load_spec(config.data_dir)
    params = model_params(config, spec)
    if not (isinstance(config.model, str) and config.model in keras_models.MODEL_NAMES):
        return _describe(params)
    # The project's own builders are pure: the same params give the same layout, so the jobs
    # of one process (a notebook, train then export) build it once (birnn: 1.6-2.2 s).
    key = json.dumps(params, sort_keys=True, default=repr)
    network = _REGISTERED_LAYOUTS.get(key)
    if network is None:
        network = _REGISTERED_LAYOUTS[key] = _describe(params)
    return network


_REGISTERED_LAYOUTS: Dict[str, Network] = {}  # describe_network's, by params


def _describe(params: Mapping[str, Any]) -> Network:
    with tf.Graph().as_default():
        model = _build_model(params)
        return Network(
            keys=tuple(_variable_key(w) for w in model.weights),
            shapes=tuple(tuple(w.shape.as_list()) for w in model.weights),
            layers=tuple(layer.name for layer in model.layers),
            softmax=_softmax_input(model.outputs[0]) is not None,
        )


def _variable_key(weight: tf.Variable) -> str:
    return re.sub(r":\d+$", "", weight.name)


def model_identity(config: Config) -> str:
    """What ``MODEL_KEY`` records: the ``--model`` and ``--model_params`` of the run (JSON)."""
    return json.dumps({"model": config.model, "model_params": config.model_params}, sort_keys=True)


def make_estimator(
    config: Config,
    spec=None,
    warm_start: Optional[tf.estimator.WarmStartSettings] = None,
    intermediates: bool = False,
) -> tf.estimator.Estimator:
    """Builds the Estimator for ``config``.

    Args:
        config: The run's settings.
        spec: The dataset spec (loaded from ``config.data_dir`` if omitted).
        warm_start: Initial values for a model dir without checkpoints.
        intermediates: Add every named layer's output to PREDICT's predictions.
    """
    spec = spec or data_pipeline.load_spec(config.data_dir)
    params = {
        **model_params(config, spec),
        "class_names": class_names(spec),
        "model_identity": _identity_to_record(config),
        "dataset_identity": (
            provenance.dataset_record(spec) if provenance.should_record(config.model_dir) else None
        ),
        "learning_rate": config.learning_rate,
        "lr_schedule": config.lr_schedule,
        "decay_steps": target_step(config, spec),
        "precision": config.precision,
        "intermediates": intermediates,
        "seed": config.seed,
        "summary_steps": SUMMARY_STEPS,  # written by the model_fn's SummaryHook
    }
    session_config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=config.intra_op_threads,
        inter_op_parallelism_threads=config.inter_op_threads,
        **distribution.session_config_kwargs(config.distribution),
    )
    # Grappler's MLIR pass changes nothing in TensorFlow 2.15 ("it won't run any optimizations
    # right now", grappler/optimizers/meta_optimizer.cc) but converts each graph and function
    # there and back for every distinct Session.run (README, "The model_fn").
    session_config.graph_options.rewrite_options.disable_tfg_optimizer = True
    run_config = tf.estimator.RunConfig(
        **distribution.run_config_kwargs(config.distribution),
        model_dir=config.model_dir,
        tf_random_seed=config.seed,
        save_checkpoints_steps=config.save_checkpoints_steps,
        save_checkpoints_secs=None,
        keep_checkpoint_max=config.keep_checkpoint_max,
        session_config=session_config,
        log_step_count_steps=None,
        save_summary_steps=0,
    )
    return tf.estimator.Estimator(
        model_fn, config=run_config, params=params, warm_start_from=warm_start
    )


def _identity_to_record(config: Config) -> Optional[str]:
    """The model identity to save when training, None when resuming a checkpoint without one.

    A checkpoint written before ``MODEL_KEY`` existed lacks the variable, and restoring a graph
    that has it from such a checkpoint would fail: those runs resume without recording it.
    """
    latest = tf.train.latest_checkpoint(config.model_dir)
    if latest is None:
        return model_identity(config)
    try:
        stored = dict(tf.train.list_variables(latest))
    except (tf.errors.OpError, ValueError):
        return None
    return model_identity(config) if MODEL_KEY in stored else None


def target_step(config: Config, spec=None) -> int:
    """The global step training stops at: ``train_steps``, else ``epochs`` over the train split.

    Both count from step 0, so rerunning the same command resumes from the last checkpoint and
    stops at the same step; a finished run is not trained further unless the target is raised.
    """
    if config.train_steps is not None:
        return int(config.train_steps)
    spec = spec or data_pipeline.load_spec(config.data_dir)
    examples = spec.num_records("train")
    if config.train_limit is not None:
        examples = min(examples, config.train_limit)
    return max(1, math.ceil(config.epochs * examples / config.batch_size))


def make_input_fn(config: Config, split: str, training: bool):
    """The Estimator ``input_fn`` for ``split``: shuffled, repeated full batches when training."""
    if training:
        input_fn = data_pipeline.make_input_fn(
            config.data_dir,
            "train",
            config.batch_size,
            num_epochs=None,
            shuffle=True,
            # The records repeat before batching, so every batch is full anyway; a static batch
            # dimension gave the rnn's step about 5 % (diagnose_step.py, variant dynamic_batch).
            drop_remainder=True,
            seed=config.seed,
            deterministic=config.seed is not None,
            limit=config.train_limit,
            augment_shift=config.augment_shift if config.augment else 0,
        )
        on_a_cluster = config.distribution != "none" or distribution.current_task()["cluster"]
        if config.seed is not None and not on_a_cluster:
            return _skipping_consumed_batches(input_fn, config.model_dir)
        return input_fn
    return data_pipeline.make_input_fn(
        config.data_dir, split, config.eval_batch_size, num_epochs=1, limit=config.eval_limit
    )


def _skipping_consumed_batches(input_fn, model_dir: str):
    """``input_fn`` whose dataset starts after the batches the checkpoint has already trained on.

    A seeded pipeline yields the same batches in the same order on every run, but it restarts
    from its first batch when training resumes. Skipping ``global_step`` batches (read through
    the pipeline, so the shuffles and the augmentation draws advance exactly as they did) makes a
    resumed run see what an uninterrupted one would have. On a cluster the workers share the
    global step, so there the pipeline simply restarts.
    """

    def skipping_input_fn(input_context=None):
        dataset = input_fn(input_context)
        return dataset.skip(global_step_of(model_dir))

    return skipping_input_fn


def global_step_of(model_dir: str) -> int:
    """The global step of ``model_dir``'s latest checkpoint (0 without one)."""
    latest = tf.train.latest_checkpoint(model_dir)
    if latest is None:
        return 0
    return int(tf.train.load_checkpoint(latest).get_tensor("global_step"))


def resolve_checkpoint(config: Config) -> str:
    """The checkpoint to read: ``checkpoint_path`` (a prefix or a folder) or the latest one.

    Whether it can be read, and fits the network, is :func:`check_checkpoint_fits`'s job.
    """
    path = config.checkpoint_path or config.model_dir
    if config.checkpoint_path is None and not os.path.exists(path):
        raise UsageError(
            f"{path} does not exist: train first (--mode=train --model_dir={path}), or pass "
            "the --model_dir (or --checkpoint_path) of a trained model"
        )
    if os.path.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise UsageError(
                f"no checkpoint in {path}; train first (--mode=train) or pass --checkpoint_path"
            )
        return latest
    if not os.path.exists(path + ".index"):
        raise UsageError(
            f"checkpoint {path} does not exist (no {path}.index); pass a checkpoint prefix such as "
            f"{os.path.join(config.model_dir, 'model.ckpt-1000')} or a model dir"
        )
    return path


def check_checkpoint_fits(
    config: Config, checkpoint: str, network: Optional[Network] = None, spec=None
) -> Network:
    """Raises ``UsageError`` unless ``checkpoint`` holds every weight of the network, same shapes.

    Jobs call it before restoring anything, so a checkpoint from another ``--model`` (or other
    builder arguments) is one line naming the mismatch (and, from its ``MODEL_KEY``, the model
    it was trained with) instead of a restore traceback, and no export, prediction or
    checkpoint has been written yet.

    Args:
        config: Names the network and its builder arguments.
        checkpoint: A checkpoint prefix.
        network: :func:`describe_network`'s result, if already known.
        spec: The dataset spec (loaded from ``config.data_dir`` if needed and omitted).

    Returns:
        The network's :class:`Network`.
    """
    try:
        reader = tf.train.load_checkpoint(checkpoint)
        stored = reader.get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError) as error:
        raise UsageError(f"checkpoint {checkpoint} is unreadable ({_first_line(error)})") from None
    network = network or describe_network(config, spec)
    expected = dict(zip(network.keys, network.shapes))
    missing = [key for key in expected if key not in stored]
    wrong = [key for key in expected if key in stored and tuple(stored[key]) != expected[key]]
    if missing:
        problem = f"no {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")
    elif wrong:
        key = wrong[0]
        problem = f"{key} is {list(stored[key])} there, the network's is {list(expected[key])}"
    else:
        return network
    raise UsageError(
        f"checkpoint {checkpoint} does not fit --model={config.model} ({problem})"
        f"{_trained_with(reader, stored)}; pass the --model and network settings it was trained "
        "with, or another --model_dir"
    )


def _trained_with(reader, stored) -> str:
    """``"; it was trained with --model=X [--model_params=...]"`` from ``MODEL_KEY``, or ``""``."""
    if MODEL_KEY not in stored:  # written before the key existed
        return ""
    try:
        identity = json.loads(reader.get_tensor(MODEL_KEY).decode())
        text = f"; it was trained with --model={identity['model']}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return ""
    if identity.get("model_params"):
        text += f" --model_params='{json.dumps(identity['model_params'], sort_keys=True)}'"
    return text


def check_resumable(config: Config, network: Optional[Network] = None) -> None:
    """Training resumes from ``model_dir``'s latest checkpoint, if any: it must fit the network."""
    latest = tf.train.latest_checkpoint(config.model_dir)
    if latest:
        check_checkpoint_fits(config, latest, network)


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "message", "") or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------------------------
# Export and the Keras round trip
# --------------------------------------------------------------------------------------------


def serving_input_receiver_fn(spec) -> Callable[[], tf.estimator.export.ServingInputReceiver]:
    """Receivers for raw ``image`` tensors (the default) and serialized ``tf.Example`` records.

    ``ServingInputReceiver`` maps every receiver onto one ``features`` dict, so the image feature
    is a ``placeholder_with_default`` over the decoded examples: feeding ``image`` (float32
    ``[None, 28, 28, 1]`` in [0, 1]) overrides the default, feeding ``examples`` (serialized
    ``tf.Example`` strings in the records' own format) computes it. The default receiver gives
    the ``serving_default``, ``predict`` and ``classification``-less signatures; the ``examples``
    alternative adds ``examples:classification``, which TF Serving's Classify API needs.
    """

    def receiver_fn():
        serialized = tf.compat.v1.placeholder(tf.string, [None], name="examples")
        decoded, _ = data_pipeline.parse_serialized(serialized, spec)
        image = tf.compat.v1.placeholder_with_default(
            decoded["image"], [None, *spec.image_shape], name="image"
        )
        return tf.estimator.export.ServingInputReceiver(
            features={"image": image},
            receiver_tensors={"image": image},
            receiver_tensors_alternatives={"examples": {"examples": serialized}},
        )

    return receiver_fn


def _eager_model(config: Config, spec) -> keras.Model:
    with precision_policy("float32"):
        return resolve(config).build(
            tuple(spec.image_shape), spec.num_classes, dropout_rate=config.dropout_rate
        )


def _keyed_weights(
    config: Config, network: Network, model: keras.Model
) -> List[Tuple[str, tf.Variable]]:
    """Pairs the eager model's weights with the network's checkpoint keys, by position."""
    shapes = tuple(tuple(w.shape.as_list()) for w in model.weights)
    if shapes != network.shapes:
        raise UsageError(
            f"--model={config.model}: the builder gave {len(shapes)} weights this time and "
            f"{len(network.shapes)} (or other shapes) before; it must build the same network "
            "every time it is called"
        )
    return list(zip(network.keys, model.weights))


def keras_model_from_checkpoint(
    config: Config, checkpoint: Optional[str] = None, spec=None
) -> keras.Model:
    """The network as a plain (float32) Keras model with the Estimator checkpoint's weights.

    The eager model's weights take the checkpoint's values by position in the network's
    layout (:func:`describe_network`), so unnamed layers (``dense_7`` eagerly, ``dense`` in the
    Estimator graph) load correctly.
    """
    checkpoint = checkpoint or resolve_checkpoint(config)
    spec = spec or data_pipeline.load_spec(config.data_dir)
    network = check_checkpoint_fits(config, checkpoint, spec=spec)
    model = _eager_model(config, spec)
    reader = tf.train.load_checkpoint(checkpoint)
    for key, weight in _keyed_weights(config, network, model):
        weight.assign(reader.get_tensor(key))
    return model


def keras_weights_to_checkpoint(
    config: Config, weights_path: str, out_dir: str, network: Optional[Network] = None, spec=None
) -> List[str]:
    """Writes a Keras weights file as a name-keyed checkpoint an Estimator can warm-start from.

    Returns:
        The checkpoint keys written (the network's, see :func:`describe_network`).
    """
    if not os.path.exists(weights_path):
        raise UsageError(f"--warm_start_from {weights_path} does not exist")
    spec = spec or data_pipeline.load_spec(config.data_dir)
    network = network or describe_network(config, spec)
    model = _eager_model(config, spec)
    try:
        if keras3.is_model_file(weights_path):  # Keras 2 or 3, config checked before building
            saved = keras3.load_model(
                weights_path, unsafe_deserialization=config.unsafe_deserialization
            )
            model.set_weights(saved.get_weights())
        else:  # weights only: no config, nothing to build
            model.load_weights(weights_path)
    except keras_models.ModelError:
        raise
    except (OSError, ValueError) as error:
        raise UsageError(
            f"cannot load Keras weights for {config.model!r} from {weights_path}: "
            f"{_first_line(error)}"
        ) from None
    values = {key: weight.numpy() for key, weight in _keyed_weights(config, network, model)}
    return _write_keyed_checkpoint(values, out_dir)


def _write_keyed_checkpoint(values: Mapping[str, Any], out_dir: str) -> List[str]:
    """Writes ``out_dir/keras_weights``, a name-keyed (TF1) checkpoint as warm starts read."""
    os.makedirs(out_dir, exist_ok=True)
    with tf.Graph().as_default():
        graph_vars = {
            name: tf.compat.v1.Variable(value, name=name) for name, value in values.items()
        }
        saver = tf.compat.v1.train.Saver(var_list=graph_vars)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, os.path.join(out_dir, "keras_weights"), write_meta_graph=False)
    return sorted(values)


def warm_start_settings(
    config: Config, network: Optional[Network] = None, spec=None
) -> Optional[tf.estimator.WarmStartSettings]:
    """Where a new model dir's training starts: ``warm_start_from``, or a model file's weights.

    Returns:
        None when ``model_dir`` already has a checkpoint (training resumes from it) or there is
        nothing to start from.
    """
    if tf.train.latest_checkpoint(config.model_dir):
        return None
    out_dir = os.path.join(config.model_dir, "warm_start")
    if config.warm_start_from:
        names = keras_weights_to_checkpoint(config, config.warm_start_from, out_dir, network, spec)
    else:
        weights = resolve(config).weights
        if weights is None:
            return None
        network = network or describe_network(config, spec)
        if tuple(tuple(w.shape) for w in weights) != network.shapes:
            raise UsageError(f"the weights in {config.model} do not fit its own architecture")
        names = _write_keyed_checkpoint(dict(zip(network.keys, weights)), out_dir)
    return tf.estimator.WarmStartSettings(
        ckpt_to_initialize_from=os.path.join(out_dir, "keras_weights"),
        # Matched with re.match against graph names such as "conv1/kernel:0"; the colon stops
        # "conv1/kernel" from also matching the optimizer's "conv1/kernel/Adam" slots.
        vars_to_warm_start=[f"{re.escape(name)}:" for name in names],
    )
