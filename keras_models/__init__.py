"""The project's four MNIST networks as plain Keras models, and the model resolver.

Use the networks without any Estimator::

    from keras_models import build_model

    model = build_model("cnn", dropout_rate=0.5)  # an uncompiled keras.Model

Or any other classifier: ``resolve_model("my_pkg.nets:build_net", {"width": 64})`` and
``resolve_model("net.keras")`` give a :class:`ResolvedModel` whose ``build()`` returns a fresh
model each call (see :mod:`keras_models.resolve`).

Importing this package imports TensorFlow and ``tf_keras`` but never ``tensorflow_estimator``.
Where only Keras 3 is installed (TensorFlow 2.16+, no ``tf_keras``), the package gives the four
networks as Keras 3 models (``build_model``, ``get_builder``, ``MODELS``); the resolver, which
feeds the Estimator, needs Keras 2 and is left out there.
"""

import os
import sys
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, Tuple

# TensorFlow prints about 14 lines of C++ start-up notices when it is first imported (CUDA,
# cuDNN, cuFFT, cuBLAS and TensorRT registration on a machine without a GPU, a CPU banner): hidden
# unless the user chose a level, and only if TensorFlow is not imported yet (else it is too late).
if "tensorflow" not in sys.modules:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from keras_models.backend import KERAS3, keras  # noqa: E402
from keras_models.networks import (  # noqa: E402
    NETWORKS,
    TRAINING_DEFAULTS,
    build_birnn,
    build_cnn,
    build_cnn_rnn,
    build_rnn,
)

if not KERAS3:
    from keras_models.resolve import (
        LOGITS,
        SOFTMAX,
        ModelError,
        ResolvedModel,
        check_classifier,
        model_label,
        parse_model_params,
        resolve_model,
    )
    from keras_models.resolve import REGISTRY as MODELS
else:
    MODELS: Mapping[str, Callable[..., keras.Model]] = MappingProxyType(dict(NETWORKS))

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


def training_defaults(name) -> Dict[str, Any]:
    """The training settings that the network registered as ``name`` uses by default.

    Args:
        name: A registry name, or any other model source (which has none).

    Returns:
        A new dict of settings such as ``{"lr_schedule": "cosine"}``; empty where the model
        trains with the common defaults.
    """
    return dict(TRAINING_DEFAULTS.get(name, {})) if isinstance(name, str) else {}


__all__ = [
    "LOGITS",
    "MODELS",
    "MODEL_NAMES",
    "SOFTMAX",
    "ModelError",
    "ResolvedModel",
    "build_birnn",
    "build_cnn",
    "build_cnn_rnn",
    "build_model",
    "build_rnn",
    "check_classifier",
    "get_builder",
    "model_label",
    "parse_model_params",
    "resolve_model",
    "training_defaults",
]
