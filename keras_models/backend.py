"""Which Keras builds the networks: Keras 2 (``tf_keras``) where installed, else Keras 3.

Beside TensorFlow 2.15 (this project's environment) ``tf_keras`` is the Keras the Estimator
trains. In an environment of TensorFlow 2.16+ with Keras 3 and no ``tf_keras``, the same builders
make the same networks (layer names, parameter counts, weight order) as Keras 3 models, which load
the weights the bridge exports (``--keras_output``). Nothing here imports the Estimator.
"""

try:
    import tf_keras as keras
except ImportError:  # Keras 3: TensorFlow 2.16+ (or JAX/PyTorch) without tf_keras
    import keras

KERAS_VERSION = keras.__version__
# Keras 3 names its ops module ``keras.ops``; tf_keras has none and uses ``keras.backend``.
KERAS3 = int(KERAS_VERSION.split(".")[0]) >= 3


def concatenate(tensors, axis: int):
    """Concatenates tensors along ``axis`` with the running Keras' own op."""
    if KERAS3:
        return keras.ops.concatenate(tensors, axis=axis)
    return keras.backend.concatenate(tensors, axis=axis)
