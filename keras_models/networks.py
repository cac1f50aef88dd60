"""The four MNIST networks as pure tf.keras (Keras 2) functional-model builders.

Every builder takes keyword-only hyper-parameters (defaults are the tutorial's) and returns an
uncompiled ``keras.Model`` that maps ``image`` (float32 ``[batch, 28, 28, 1]`` in ``[0, 1]``) to
``logits`` (``[batch, num_classes]``). Nothing here knows about the Estimator: the models train
with ``compile``/``fit``, save to ``.keras``/``.h5`` and serve like any other Keras model.

Layer names are part of the contract: checkpoints and the Estimator bridge (which exposes
intermediate outputs by layer name) depend on them, so do not rename layers.

The ``logits`` layer is always float32, so under a ``mixed_bfloat16`` global policy the body
computes in bfloat16 while the logits, and therefore the loss and softmax, stay float32.
"""

import numbers
from typing import Sequence, Tuple

import tf_keras as keras

NUM_CLASSES = 10
INPUT_SHAPE = (28, 28, 1)
DENSE_UNITS = 1024
DROPOUT_RATE = 0.4


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


def _common(num_classes, input_shape, dense_units, dropout_rate):
    return (
        _positive_int("num_classes", num_classes),
        _input_shape(input_shape),
        _positive_int("dense_units", dense_units),
        _dropout_rate(dropout_rate),
    )


# --- shared pieces ---------------------------------------------------------------------------


def _image_input(input_shape) -> keras.Input:
    return keras.Input(shape=input_shape, name="image", dtype="float32")


def _rows(image, input_shape):
    """Reads the image as a sequence of rows: [batch, height, width * channels]."""
    height, width, channels = input_shape
    return keras.layers.Reshape((height, width * channels), name="rows")(image)


def _gru_stack(x, gru_units, suffix="", go_backwards=False):
    """Two stacked GRUs (``gru1{suffix}`` returns sequences, ``gru2{suffix}`` the last state).

    Only the first layer gets ``go_backwards``: Keras returns its output sequence in processing
    (i.e. reversed) order, so the second layer reading that sequence forwards still walks the
    original rows last to first. Setting it on both would turn the top layer around again.
    """
    units1, units2 = gru_units
    x = keras.layers.GRU(
        units1,
        return_sequences=True,
        go_backwards=go_backwards,
        kernel_initializer="orthogonal",
        name=f"gru1{suffix}",
    )(x)
    return keras.layers.GRU(units2, kernel_initializer="orthogonal", name=f"gru2{suffix}")(x)


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
) -> keras.Model:
    """Builds a two-layer GRU that reads the image one row per time step.

    Layers: ``rows`` -> ``gru1`` -> ``gru2`` (last state) -> ``dense1`` -> ``dropout`` ->
    ``logits``. Both GRUs use orthogonal kernels.

    Unlike the tutorial, which computed dropout and then fed the pre-dropout tensor to the output
    layer, dropout here really sits between ``dense1`` and ``logits``.

    Args:
        num_classes: Number of output logits.
        input_shape: Image shape (height, width, channels); height is the sequence length.
        gru_units: Units of ``gru1`` and ``gru2``.
        dense_units: Units of ``dense1``.
        dropout_rate: Fraction of ``dense1`` activations dropped in training, in [0, 1).

    Returns:
        An uncompiled ``keras.Model`` named ``"rnn"`` mapping ``image`` to ``logits``.

    Raises:
        ValueError: If a hyper-parameter is out of range.
    """
    num_classes, input_shape, dense_units, dropout_rate = _common(
        num_classes, input_shape, dense_units, dropout_rate
    )
    gru_units = _positive_ints("gru_units", gru_units, 2)

    image = _image_input(input_shape)
    x = _gru_stack(_rows(image, input_shape), gru_units)
    logits = _head(x, num_classes, dense_units, dropout_rate)
    return keras.Model(image, logits, name="rnn")


def build_birnn(
    *,
    num_classes: int = NUM_CLASSES,
    input_shape: Sequence[int] = INPUT_SHAPE,
    gru_units: Sequence[int] = (128, 256),
    dense_units: int = DENSE_UNITS,
    dropout_rate: float = DROPOUT_RATE,
) -> keras.Model:
    """Builds two independent GRU stacks, one reading rows top-down and one bottom-up.

    Layers: ``rows`` feeds a forward stack (``gru1_fw`` -> ``gru2_fw``) and a backward stack
    (``gru1_bw`` -> ``gru2_bw``); their last states are summed (``sum_states``) and go through
    ``dense1`` -> ``dropout`` -> ``logits``. This is deliberately not ``layers.Bidirectional``:
    each direction is a whole two-layer stack, as in the tutorial, and only the top states meet.

    Unlike the tutorial, which computed dropout and then fed the pre-dropout tensor to the output
    layer, dropout here really sits between ``dense1`` and ``logits``.

    Args:
        num_classes: Number of output logits.
        input_shape: Image shape (height, width, channels); height is the sequence length.
        gru_units: Units of the first and second GRU of each stack.
        dense_units: Units of ``dense1``.
        dropout_rate: Fraction of ``dense1`` activations dropped in training, in [0, 1).

    Returns:
        An uncompiled ``keras.Model`` named ``"birnn"`` mapping ``image`` to ``logits``.

    Raises:
        ValueError: If a hyper-parameter is out of range.
    """
    num_classes, input_shape, dense_units, dropout_rate = _common(
        num_classes, input_shape, dense_units, dropout_rate
    )
    gru_units = _positive_ints("gru_units", gru_units, 2)

    image = _image_input(input_shape)
    rows = _rows(image, input_shape)
    forward = _gru_stack(rows, gru_units, suffix="_fw")
    backward = _gru_stack(rows, gru_units, suffix="_bw", go_backwards=True)
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
) -> keras.Model:
    """Builds a 1-D convolution over the row sequence followed by the ``rnn`` GRU stack.

    Layers: ``rows`` -> ``conv1`` (Conv1D, relu) -> ``pool1`` (halves the sequence) -> ``gru1``
    -> ``gru2`` -> ``dense1`` -> ``dropout`` -> ``logits``.

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

    image = _image_input(input_shape)
    x = keras.layers.Conv1D(
        conv_filters, kernel_size, padding="same", activation="relu", name="conv1"
    )(_rows(image, input_shape))
    x = keras.layers.MaxPooling1D(2, name="pool1")(x)
    x = _gru_stack(x, gru_units)
    logits = _head(x, num_classes, dense_units, dropout_rate)
    return keras.Model(image, logits, name="cnn_rnn")
