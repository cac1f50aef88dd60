"""Process-wide TensorFlow settings; import this before TensorFlow at every entry point.

TensorFlow reads ``TF_CPP_MIN_LOG_LEVEL``, ``TF_USE_LEGACY_KERAS`` and ``TF_ENABLE_ONEDNN_OPTS``
only once, when it is first imported, so entry points (``main.py``, ``bench/*``,
``tests/conftest.py``) import this module first. Library modules change no process state on
import, with one exception: ``serving``, ``data_pipeline`` and ``keras_models``, imported before
TensorFlow in a user's own script, default ``TF_CPP_MIN_LOG_LEVEL`` as below, so TensorFlow's
start-up notices stay hidden there too.
"""

import logging
import os
import warnings

# C++ INFO/WARNING logs (oneDNN notices, CPU feature banners) off unless the user asked for them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One Keras only: the Keras 2 API from tf_keras (mixing keras/tf.keras/tf_keras loses variables).
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# oneDNN kernels on every x86 CPU. TensorFlow 2.15 turns them on by default only where it finds
# AVX-512 features; on an AVX2-only EPYC they trained the cnn about 1.6x faster (README,
# "Where the time went on VM B"). Set TF_ENABLE_ONEDNN_OPTS=0 to compare against the stock kernels.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def silence_python_logging() -> None:
    """Hides TensorFlow's Python-side deprecation warnings and INFO logs.

    The Estimator wraps its symbols in deprecation warnings that go through Python logging, so the
    C++ setting above is not enough (tensorflow/tensorflow#25996).
    """
    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)
    # NanTensorHook logs this at ERROR before raising; the bridge reports it in one line instead.
    tf.get_logger().addFilter(lambda record: "Model diverged" not in record.getMessage())
    tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.ERROR)
    try:
        from tensorflow.python.util import deprecation

        deprecation._PRINT_DEPRECATION_WARNINGS = False
    except ImportError:  # pragma: no cover - private module moved
        pass
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(tensorflow|tf_keras|keras)")
    # Under app.run, absl shows Python logging at INFO (e.g. matplotlib's font cache notice).
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
