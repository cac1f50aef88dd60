"""Run under Keras 3 (``cli_helpers.run_keras3``), not imported: writes the Keras 3 model files
the tests read, all in one process (Keras 3 takes seconds to start).

Usage: ``python keras3_script_models.py OUT_DIR MARKER``. ``MARKER`` is the path the Lambda
models' function would write if it ever ran. Prints one JSON line: each file's name -> the
probabilities Keras 3 gives for ``OUT_DIR/images.npy`` (when the model takes 28x28x1 images).
"""

import json
import os
import sys

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import keras  # noqa: E402

out, marker = sys.argv[1], sys.argv[2]
keras.utils.set_random_seed(0)
L = keras.layers


def user():
    """The user's functional model: Conv2D, BatchNormalization, Dropout, L2, GAP, softmax."""
    image = keras.Input((28, 28, 1), name="image")
    x = L.Conv2D(
        32,
        5,
        strides=2,
        activation="relu",
        kernel_regularizer=keras.regularizers.L2(1e-4),
        name="conv_a",
    )(image)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Dropout(0.2, name="drop")(x)
    x = L.Conv2D(64, 3, strides=2, activation="relu", name="conv_b")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(image, L.Dense(10, activation="softmax", name="probs")(x), name="user3")


def sequential():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            L.Conv2D(8, 3, activation="relu", name="c"),
            L.MaxPooling2D(2, name="p"),
            L.Flatten(name="f"),
            L.Dense(10, name="logits"),
        ],
        name="seq3",
    )


def nested():
    inner_in = keras.Input((784,), name="inner_in")
    inner = keras.Model(
        inner_in, L.Dense(32, activation="relu", name="hidden")(inner_in), name="inner"
    )
    image = keras.Input((28, 28, 1), name="image")
    x = L.Rescaling(1.0, name="scale")(image)
    x = L.Flatten(name="flat")(x)
    return keras.Model(image, L.Dense(10, name="logits")(inner(x)), name="nested3")


def gru():
    image = keras.Input((28, 28, 1), name="image")
    x = L.Reshape((28, 28), name="rows")(image)
    x = L.GRU(16, return_sequences=True, name="g1")(x)
    x = L.Bidirectional(L.GRU(8, name="g2"), name="bi")(x)
    return keras.Model(image, L.Dense(10, name="logits")(x), name="gru3")


def evil():
    image = keras.Input((28, 28, 1), name="image")
    # Writes the marker when run (the path a constant in the bytecode): the tests check that
    # it never is.
    function = eval(f"lambda t: (open({marker!r}, 'w').write('ran'), t)[1]")
    x = L.Lambda(function, name="evil_lambda")(image)
    x = L.Flatten(name="flat")(x)
    return keras.Model(image, L.Dense(10, name="logits")(x), name="evil3")


@keras.saving.register_keras_serializable(package="user")
class Twice(L.Layer):
    def call(self, x):
        return 2 * x


def custom():
    image = keras.Input((28, 28, 1), name="image")
    x = L.Flatten(name="flat")(Twice(name="twice")(image))
    return keras.Model(image, L.Dense(10, name="logits")(x), name="custom3")


images = (
    np.load(os.path.join(out, "images.npy"))
    if os.path.exists(os.path.join(out, "images.npy"))
    else np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
)
probabilities = {}
for name, build in [("user3", user), ("seq3", sequential), ("nested3", nested), ("gru3", gru)]:
    model = build()
    model.save(os.path.join(out, f"{name}.keras"))
    model.save(os.path.join(out, f"{name}.h5"))
    probabilities[name] = model.predict(images, verbose=0).tolist()
mobilenet = keras.applications.MobileNetV2(
    weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10
)
mobilenet.save(os.path.join(out, "mnv2.keras"))
mobilenet.save(os.path.join(out, "mnv2.h5"))
model = evil()
model.save(os.path.join(out, "evil3.keras"))
model.save(os.path.join(out, "evil3.h5"))
custom().save(os.path.join(out, "custom3.keras"))
os.remove(marker) if os.path.exists(marker) else None  # saving traced the Lambda once
print(json.dumps({"probabilities": probabilities, "keras_version": keras.__version__}))
