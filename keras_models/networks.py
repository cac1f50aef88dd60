"""The four MNIST networks as pure functional-model builders, in Keras 2 (tf_keras) or Keras 3.

Every builder takes keyword-only hyper-parameters (defaults as in the tutorial, except the two
below) and returns an uncompiled ``keras.Model`` that maps ``image`` (float32
``[batch, 28, 28, 1]`` in ``[0, 1]`` by default; any ``input_shape`` (H, W, C) the layers fit:
the cnn needs 4x4, the cnn_rnn 2 rows; the recurrent networks read each row's W x C values as
one time step) to ``logits`` (``[batch, num_classes]``). Nothing here
knows about the Estimator: the models train with ``compile``/``fit``, save to ``.keras``/``.h5``
and serve like any other Keras model. Where only Keras 3 is installed (TensorFlow 2.16+), the same
builders make Keras 3 models with the same layer names, parameter counts and weight order
(``keras_models.backend``); they load the weights the bridge exports.

Layer names are part of the contract: checkpoints and the Estimator bridge (which exposes
intermediate outputs by layer name) depend on them, so do not rename layers.

The recurrent networks go beyond the tutorial in two places that change no shapes or variables,
both measured with ``bench/bench_accuracy.py`` at the tutorial's budget and both switchable: their
GRU kernels are orthogonal per gate (``gru_initializer``), and their pixels are standardised with
the training set's statistics before the first layer reads them (``standardize``).

The ``logits`` layer is always float32, so under a ``mixed_bfloat16`` global policy the body
computes in bfloat16 while the logits, and therefore the loss and softmax, stay float32.
"""

import numbers
from typing import Sequence, Tuple

from keras_models.backend import concatenate, keras

NUM_CLASSES = 10
INPUT_SHAPE = (28, 28, 1)
DENSE_UNITS = 1024
DROPOUT_RATE = 0.4
# Mean and standard deviation of the pixels (in [0, 1]) of the 55,000 training images.
PIXEL_STATS = (0.1307, 0.3082)
# ``gru_initializer`` choices: per-gate orthogonal (default), or Keras's "orthogonal" over each
# whole fused matrix (the project's first version).
GRU_INITIALIZERS = ("gate_orthogonal", "orthogonal")


# --- hyper-parameter validation ----------------------------------------------------------------


def _positive_int(name: str, value) -> int:
    # bool is an int subclass; `True` units are a caller bug, not 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_ints(name: str, value, length: int) -> Tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != length:
        raise ValueError(f"{name} must be a sequence of {length} positive integers, got {value!r}")
    return tuple(_positive_int(f"{name}[{i}]", v) for i, v in enumerate(value))


def _dropout_rate(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"dropout_rate must be a number in [0, 1), got {value!r}")
    return float(value)


def _input_shape(value) -> Tuple[int, int, int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ValueError(f"input_shape must be 3-D (height, width, channels), got {value!r}")
    return tuple(_positive_int(f"input_shape[{i}]", v) for i, v in enumerate(value))


def _at_least(name: str, input_shape, height: int, width: int, why: str) -> None:
    if input_shape[0] < height or input_shape[1] < width:
        raise ValueError(
            f"{name} needs images of at least {height}x{width} ({why}), got input_shape "
            f"{list(input_shape)}"
        )


def _recurrent(standardize, gru_initializer):
    if not isinstance(standardize, bool):
        raise ValueError(f"standardize must be True or False, got {standardize!r}")
    if gru_initializer not in GRU_INITIALIZERS:
        raise ValueError(
            f"gru_initializer must be one of {', '.join(GRU_INITIALIZERS)}, got {gru_initializer!r}"
        )
    return standardize, gru_initializer


def _common(num_classes, input_shape, dense_units, dropout_rate):
    return (
        _positive_int("num_classes", num_classes),
        _input_shape(input_shape),
        _positive_int("dense_units", dense_units),
        _dropout_rate(dropout_rate),
    )


# --- initialisation ----------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_models")
class GateOrthogonal(keras.initializers.Initializer):
    """A separate orthogonal matrix for each gate's block of a fused recurrent kernel.

    Keras stores a GRU's three gates side by side (``[rows, 3 * units]``), and its
    ``"orthogonal"`` initialiser makes that whole matrix orthogonal, so each gate's square
    recurrent block has singular values of only about sqrt(1/3) (root mean square). With a matrix
    per gate every block is orthogonal (orthonormal rows or columns), and the recurrent networks
    train faster at the tutorial's budget (README, Results).

    Args:
        gates: Number of gate blocks along the last axis (3 for a GRU, 4 for an LSTM).
        seed: Seed of the first block's draw (block ``i`` uses ``seed + i``); ``None`` leaves
            the draws to the global seed.
    """

    def __init__(self, gates: int = 3, seed=None):
        self.gates = _positive_int("gates", gates)
        self.seed = seed

    def __call__(self, shape, dtype=None, **kwargs):
        rows, columns = shape
        if columns % self.gates:
            raise ValueError(f"GateOrthogonal: {columns} columns do not split into {self.gates}")
        blocks = [
            keras.initializers.Orthogonal(seed=None if self.seed is None else self.seed + i)(
                (rows, columns // self.gates), dtype=dtype
            )
            for i in range(self.gates)
        ]
        return concatenate(blocks, axis=1)

    def get_config(self):
        return {"gates": self.gates, "seed": self.seed}


# The legacy .h5 format stores the bare class name, which the decorator's "keras_models>" key
# does not match; without this an .h5 model would not load outside a custom_object_scope.
keras.utils.get_custom_objects().setdefault("GateOrthogonal", GateOrthogonal)


# --- shared pieces ---------------------------------------------------------------------------


def _image_input(input_shape) -> keras.Input:
    return keras.Input(shape=input_shape, name="image", dtype="float32")


def _rows(image, input_shape, standardize):
    """Reads the image as a sequence of rows, [batch, height, width * channels].

    With ``standardize`` the pixels are first shifted and scaled by ``PIXEL_STATS`` (layer
    ``standardize``): the GRU gates are sigmoids and tanh of projections of these rows, and
    zero-mean, unit-variance rows (of raw ones most are 0, the mean is 0.13) train faster.
    """
    x = image
    if standardize:
        mean, std = PIXEL_STATS
        x = keras.layers.Rescaling(1 / std, offset=-mean / std, name="standardize")(x)
    height, width, channels = input_shape
    return keras.layers.Reshape((height, width * channels), name="rows")(x)


def _gru_stack(x, gru_units, gru_initializer, suffix="", go_backwards=False):
    """Two stacked GRUs (``gru1{suffix}`` returns sequences, ``gru2{suffix}`` the last state).

    Only the first layer gets ``go_backwards``: Keras returns its output sequence in processing
    (i.e. reversed) order, so the second layer reading that sequence forwards still walks the
    original rows last to first. Setting it on both would turn the top layer around again.
    """

    def gru(units, name, **kwargs):
        init = (
            GateOrthogonal
            if gru_initializer == "gate_orthogonal"
            else keras.initializers.Orthogonal
        )
        return keras.layers.GRU(
            units, kernel_initializer=init(), recurrent_initializer=init(), name=name, **kwargs
        )

    units1, units2 = gru_units
    x = gru(units1, f"gru1{suffix}", return_sequences=True, go_backwards=go_backwards)(x)
    return gru(units2, f"gru2{suffix}")(x)


def _head(x, num_classes, dense_units, dropout_rate):
    """dense1 (relu) -> dropout -> logits; logits pinned to float32 for mixed precision."""
    x = keras.layers.Dense(dense_units, activation="relu", name="dense1")(x)
    x = keras.layers.Dropout(dropout_rate, name="dropout")(x)
    return keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)


# --- the four networks -----------------------------------------------------------------------


def build_cnn(
    *,
    num_classes: int = NUM_CLASSES,
    input_shape: Sequence[int] = INPUT_SHAPE,
    conv_filters: Sequence[int] = (32, 64),
    kernel_size: int = 5,
    dense_units: int = DENSE_UNITS,
    dropout_rate: float = DROPOUT_RATE,
) -> keras.Model:
    """Builds LeNet: two conv/max-pool blocks, then a dense layer, dropout and the logits.

    Layers: ``conv1`` -> ``pool1`` -> ``conv2`` -> ``pool2`` -> ``flatten`` -> ``dense1`` ->
    ``dropout`` -> ``logits``. With the defaults it has 3,274,634 parameters.

    Args:
        num_classes: Number of output logits.
        input_shape: Image shape (height, width, channels), without the batch dimension.
        conv_filters: Filters of ``conv1`` and ``conv2``.
        kernel_size: Side of the square convolution kernels.
        dense_units: Units of ``dense1``.
        dropout_rate: Fraction of ``dense1`` activations dropped in training, in [0, 1).

    Returns:
        An uncompiled ``keras.Model`` named ``"cnn"`` mapping ``image`` to ``logits``.

    Raises:
        ValueError: If a hyper-parameter is out of range.
    """
    num_classes, input_shape, dense_units, dropout_rate = _common(
        num_classes, input_shape, dense_units, dropout_rate
    )
    filters1, filters2 = _positive_ints("conv_filters", conv_filters, 2)
    kernel_size = _positive_int("kernel_size", kernel_size)
    _at_least("cnn", input_shape, 4, 4, "two 2x2 max-pools")

    image = _image_input(input_shape)
    x = keras.layers.Conv2D(filters1, kernel_size, padding="same", activation="relu", name="conv1")(
        image
    )
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = keras.layers.Conv2D(filters2, kernel_size, padding="same", activation="relu", name="conv2")(
        x
    )
    x = keras.layers.MaxPooling2D(2, name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    logits = _head(x, num_classes, dense_units, dropout_rate)
    return keras.Model(image, logits, name="cnn")


def build_rnn(
    *,
    num_classes: int = NUM_CLASSES,
    input_shape: Sequence[int] = INPUT_SHAPE,
    gru_units: Sequence[int] = (128, 256),
    dense_units: int = DENSE_UNITS,
    dropout_rate: float = DROPOUT_RATE,
    standardize: bool = True,
    gru_initializer: str = "gate_orthogonal",
) -> keras.Model:
    """Builds a two-layer GRU that reads the image one row per time step.

    Layers: ``standardize`` -> ``rows`` -> ``gru1`` -> ``gru2`` (last state) -> ``dense1`` ->
    ``dropout`` -> ``logits``. Both GRUs' kernels are orthogonal per gate (``GateOrthogonal``).

    Unlike the tutorial, which computed dropout and then fed the pre-dropout tensor to the output
    layer, dropout here really sits between ``dense1`` and ``logits``.

    Args:
        num_classes: Number of output logits.
        input_shape: Image shape (height, width, channels); height is the sequence length.
        gru_units: Units of ``gru1`` and ``gru2``.
        dense_units: Units of ``dense1``.
        dropout_rate: Fraction of ``dense1`` activations dropped in training, in [0, 1).
        standardize: Standardise the pixels with ``PIXEL_STATS`` first (layer ``standardize``).
        gru_initializer: ``"gate_orthogonal"`` (``GateOrthogonal`` kernels) or ``"orthogonal"``
            (Keras's, over each whole fused kernel).

    Returns:
        An uncompiled ``keras.Model`` named ``"rnn"`` mapping ``image`` to ``logits``.

    Raises:
        ValueError: If a hyper-parameter is out of range.
    """
    num_classes, input_shape, dense_units, dropout_rate = _common(
        num_classes, input_shape, dense_units, dropout_rate
    )
    gru_units = _positive_ints("gru_units", gru_units, 2)
    standardize, gru_initializer = _recurrent(standardize, gru_initializer)

    image = _image_input(input_shape)
    x = _gru_stack(_rows(image, input_shape, standardize), gru_units, gru_initializer)
    logits = _head(x, num_classes, dense_units, dropout_rate)
    return keras.Model(image, logits, name="rnn")


def build_birnn(
    *,
    num_classes: int = NUM_CLASSES,
    input_shape: Sequence[int] = INPUT_SHAPE,
    gru_units: Sequence[int] = (128, 256),
    dense_units: int = DENSE_UNITS,
    dropout_rate: float = DROPOUT_RATE,
    standardize: bool = True,
    gru_initializer: str = "gate_orthogonal",
) -> keras.Model:
    """Builds two independent GRU stacks, one reading rows top-down and one bottom-up.

    Layers: ``standardize`` -> ``rows`` feeds a forward stack (``gru1_fw`` -> ``gru2_fw``) and a
    backward stack (``gru1_bw`` -> ``gru2_bw``); their last states are summed (``sum_states``)
    and go through ``dense1`` -> ``dropout`` -> ``logits``. This is deliberately not
    ``layers.Bidirectional``: each direction is a whole two-layer stack, as in the tutorial, and
    only the top states meet.

    Unlike the tutorial, which computed dropout and then fed the pre-dropout tensor to the output
    layer, dropout here really sits between ``dense1`` and ``logits``.

    Args:
        num_classes: Number of output logits.
        input_shape: Image shape (height, width, channels); height is the sequence length.
        gru_units: Units of the first and second GRU of each stack.
        dense_units: Units of ``dense1``.
        dropout_rate: Fraction of ``dense1`` activations dropped in training, in [0, 1).
        standardize: Standardise the pixels with ``PIXEL_STATS`` first (layer ``standardize``).
        gru_initializer: ``"gate_orthogonal"`` (``GateOrthogonal`` kernels) or ``"orthogonal"``
            (Keras's, over each whole fused kernel).

    Returns:
        An uncompiled ``keras.Model`` named ``"birnn"`` mapping ``image`` to ``logits``.

    Raises:
        ValueError: If a hyper-parameter is out of range.
    """
    num_classes, input_shape, dense_units, dropout_rate = _common(
        num_classes, input_shape, dense_units, dropout_rate
    )
    gru_units = _positive_ints("gru_units", gru_units, 2)
    standardize, gru_initializer = _recurrent(standardize, gru_initializer)

    image = _image_input(input_shape)
    rows = _rows(image, input_shape, standardize)
    forward = _gru_stack(rows, gru_units, gru_initializer, suffix="_fw")
    backward = _gru_stack(rows, gru_units, gru_initializer, suffix="_bw", go_backwards=True)
    x = keras.layers.Add(name="sum_states")([forward, backward])
    logits = _head(x, num_classes, dense_units, dropout_rate)
    return keras.Model(image, logits, name="birnn")


def build_cnn_rnn(
    *,
    num_classes: int = NUM_CLASSES,
    input_shape: Sequence[int] = INPUT_SHAPE,
    conv_filters: int = 32,
    kernel_size: int = 5,
    gru_units: Sequence[int] = (128, 256),
    dense_units: int = DENSE_UNITS,
    dropout_rate: float = DROPOUT_RATE,
    standardize: bool = True,
    gru_initializer: str = "gate_orthogonal",
) -> keras.Model:
    """Builds a 1-D convolution over the row sequence followed by the ``rnn`` GRU stack.

    Layers: ``standardize`` -> ``rows`` -> ``conv1`` (Conv1D, relu) -> ``pool1`` (halves the
    sequence) -> ``gru1`` -> ``gru2`` -> ``dense1`` -> ``dropout`` -> ``logits``.

    Unlike the tutorial, which computed dropout and then fed the pre-dropout tensor to the output
    layer, dropout here really sits between ``dense1`` and ``logits``.

    Args:
        num_classes: Number of output logits.
        input_shape: Image shape (height, width, channels); height is the sequence length.
        conv_filters: Filters of ``conv1``.
        kernel_size: Width of the ``conv1`` kernel, in rows.
        gru_units: Units of ``gru1`` and ``gru2``.
        dense_units: Units of ``dense1``.
        dropout_rate: Fraction of ``dense1`` activations dropped in training, in [0, 1).
        standardize: Standardise the pixels with ``PIXEL_STATS`` first (layer ``standardize``).
        gru_initializer: ``"gate_orthogonal"`` (``GateOrthogonal`` kernels) or ``"orthogonal"``
            (Keras's, over each whole fused kernel).

    Returns:
        An uncompiled ``keras.Model`` named ``"cnn_rnn"`` mapping ``image`` to ``logits``.

    Raises:
        ValueError: If a hyper-parameter is out of range.
    """
    num_classes, input_shape, dense_units, dropout_rate = _common(
        num_classes, input_shape, dense_units, dropout_rate
    )
    conv_filters = _positive_int("conv_filters", conv_filters)
    kernel_size = _positive_int("kernel_size", kernel_size)
    gru_units = _positive_ints("gru_units", gru_units, 2)
    standardize, gru_initializer = _recurrent(standardize, gru_initializer)
    _at_least("cnn_rnn", input_shape, 2, 1, "a 2-row max-pool")

    image = _image_input(input_shape)
    x = keras.layers.Conv1D(
        conv_filters, kernel_size, padding="same", activation="relu", name="conv1"
    )(_rows(image, input_shape, standardize))
    x = keras.layers.MaxPooling1D(2, name="pool1")(x)
    x = _gru_stack(x, gru_units, gru_initializer)
    logits = _head(x, num_classes, dense_units, dropout_rate)
    return keras.Model(image, logits, name="cnn_rnn")


# Name -> builder; ``keras_models.resolve.REGISTRY`` is a read-only view of it.
NETWORKS = {
    "cnn": build_cnn,
    "rnn": build_rnn,
    "birnn": build_birnn,
    "cnn_rnn": build_cnn_rnn,
}

# Training settings a network trains with by default where they differ from every other model's
# (Adam at 1e-3, constant); an explicit value (a flag, a Config field) always wins. The rnn's
# three epochs end closer to a minimum when the rate decays to 0 over them: measured with
# bench/bench_accuracy.py at the tutorial's budget, three seeds (docs/benchmarks.md).
TRAINING_DEFAULTS = {
    "rnn": {"lr_schedule": "cosine"},
}
