"""The project's four MNIST networks as plain tf.keras (Keras 2, ``tf_keras``) models.

Use them without any Estimator::

    from keras_models import build_model

    model = build_model("cnn", dropout_rate=0.5)  # an uncompiled keras.Model

Importing this package imports TensorFlow and ``tf_keras`` but never ``tensorflow_estimator``.
"""

from types import MappingProxyType
from typing import Callable, Mapping, Tuple

import tf_keras as keras

from keras_models.networks import build_birnn, build_cnn, build_cnn_rnn, build_rnn

# Read-only so that importers cannot swap a builder out from under the Estimator bridge.
MODELS: Mapping[str, Callable[..., keras.Model]] = MappingProxyType(
    {
        "cnn": build_cnn,
        "rnn": build_rnn,
        "birnn": build_birnn,
        "cnn_rnn": build_cnn_rnn,
    }
)
MODEL_NAMES: Tuple[str, ...] = tuple(sorted(MODELS))


def get_builder(name: str) -> Callable[..., keras.Model]:
    """Returns the builder registered under ``name``.

    Args:
        name: One of ``MODEL_NAMES``.

    Returns:
        A function taking keyword hyper-parameters and returning an uncompiled ``keras.Model``.

    Raises:
        ValueError: If ``name`` is not registered; the message lists the choices.
    """
    try:
        return MODELS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name such as a list
        raise ValueError(
            f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}"
        ) from None


def build_model(name: str, **hparams) -> keras.Model:
    """Builds the network registered under ``name``.

    Args:
        name: One of ``MODEL_NAMES``.
        **hparams: Keyword hyper-parameters for that network's builder; omitted ones take the
            tutorial's defaults.

    Returns:
        An uncompiled ``keras.Model`` mapping ``image`` to float32 ``logits``.

    Raises:
        ValueError: If ``name`` is unknown or a hyper-parameter is out of range.
        TypeError: If ``hparams`` holds an argument the builder does not take.
    """
    return get_builder(name)(**hparams)


__all__ = [
    "MODELS",
    "MODEL_NAMES",
    "build_birnn",
    "build_cnn",
    "build_cnn_rnn",
    "build_model",
    "build_rnn",
    "get_builder",
]
