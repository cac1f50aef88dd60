"""User-style Keras builders for the tests, imported as ``user_models:<function>``.

pytest puts ``tests/`` on ``sys.path``; command-line runs need ``PYTHONPATH=<repo>/tests``. The
layers are deliberately left unnamed (as in most user code), so Keras names them ``conv2d``,
``dense_1``, ... from its counters.
"""

import tensorflow as tf
import tf_keras as keras


def build_bn_net(input_shape=(28, 28, 1), num_classes=10, width=16, l2=1e-4, dropout_rate=0.25):
    """Conv + BatchNorm + L2 + dropout, ending in a softmax: what a user typically writes."""
    regularizer = keras.regularizers.l2(l2)
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Conv2D(width, 3, padding="same", kernel_regularizer=regularizer)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(32, activation="relu", kernel_regularizer=regularizer)(x)
    x = keras.layers.Dropout(dropout_rate)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def build_shared_net(num_classes=10):
    """A Dense layer called twice and a nested Sequential block, ending in logits."""
    inputs = keras.Input(shape=(28, 28, 1))
    block = keras.Sequential(
        [keras.layers.Flatten(), keras.layers.Dense(16, activation="relu")], name="block"
    )
    x = block(inputs)
    shared = keras.layers.Dense(16, activation="relu", name="shared")
    x = shared(shared(x))
    outputs = keras.layers.Dense(num_classes, name="scores")(x)
    return keras.Model(inputs, outputs)


def build_fixed_net(num_classes=10):
    """Takes 32x32x3 images whatever the data (no input_shape argument)."""
    inputs = keras.Input(shape=(32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def build_two_inputs():
    image = keras.Input(shape=(28, 28, 1), name="image")
    extra = keras.Input(shape=(3,), name="extra")
    x = keras.layers.Concatenate()([keras.layers.Flatten()(image), extra])
    return keras.Model([image, extra], keras.layers.Dense(10)(x))


def build_two_outputs(input_shape=(28, 28, 1)):
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    return keras.Model(inputs, [keras.layers.Dense(10)(x), keras.layers.Dense(1)(x)])


def build_sigmoid(input_shape=(28, 28, 1), num_classes=10):
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    return keras.Model(inputs, keras.layers.Dense(num_classes, activation="sigmoid")(x))


def build_raises(input_shape=(28, 28, 1)):
    raise ValueError("width must be even\nsecond line of the explanation")


def build_unconvertible(input_shape=(28, 28, 1), num_classes=10):
    """Starts with an op tf2onnx has no conversion for (BesselI0e): exports without ONNX."""
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Lambda(tf.math.bessel_i0e, name="bessel")(inputs)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))
