"""Builders written as Keras users write them today: ``import keras``, then ``keras.layers``.

Never imported by a test directly: importing the ``keras`` package (Keras 2.15 here, a twin of
tf_keras) into a test process would break tf_keras there. The bridge imports this module
through ``--model=keras_package_models:...``, which makes ``import keras`` give tf_keras.
"""

import keras
from keras import layers
from keras.layers import Dense


def small_cnn(input_shape=(28, 28, 1), num_classes=10):
    """Conv -> BatchNorm -> pooling -> Dropout -> Dense with L2 and a softmax output."""
    image = keras.Input(input_shape, name="image")
    x = layers.Conv2D(16, 3, activation="relu", name="conv")(image)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    regularizer = keras.regularizers.l2(1e-4)
    outputs = Dense(num_classes, activation="softmax", kernel_regularizer=regularizer, name="probs")
    return keras.Model(image, outputs(x), name="small_cnn")


def uses_keras3_ops(input_shape=(28, 28, 1), num_classes=10):
    """Keras 3's ``keras.ops``, which Keras 2 lacks: refused in one line."""
    from keras import ops  # noqa: F401 - the import is what is refused

    raise AssertionError("unreachable: keras.ops does not exist in Keras 2")


def small_sequential(input_shape=(28, 28, 1), num_classes=10):
    """The same layers as a Sequential model."""
    return keras.Sequential(
        [
            keras.Input(input_shape, name="image"),
            layers.Conv2D(16, 3, activation="relu", name="conv"),
            layers.BatchNormalization(name="bn"),
            layers.MaxPooling2D(name="pool"),
            layers.Flatten(name="flatten"),
            layers.Dense(num_classes, name="logits"),
        ],
        name="small_sequential",
    )
