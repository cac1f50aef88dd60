"""Fast in-process serving of an exported SavedModel, with TensorFlow alone.

``jobs.export`` writes a TF1-style SavedModel (the TF Serving layout). TensorFlow 2's
``tf.saved_model.load(path).signatures[key](image=...)`` serves it, but slowly: on TF 2.15 every
call first tries to bind its arguments to the signature's structured type, which a TF1 signature
does not have, and the ``TypeError`` it builds (then discards) formats the whole input tensor as
text; that was 9 of the cnn's 14 ms per batch-1 call (README, "Export and serving"). This module
loads the same SavedModel the way TF Serving does, into a ``Session``, folds the variables into
constants (so oneDNN keeps its reordered weights between calls) and runs one
``Session.make_callable`` per signature.

It imports neither ``tensorflow_estimator`` nor anything else of this project, so it loads where
only TensorFlow is installed, newer versions included (checked with TensorFlow 2.21)::

    import serving

    model = serving.load("exports/cnn/1795760585")       # a SavedModel version folder
    out = model(image=images)                            # float32 [N, 28, 28, 1] in [0, 1]
    out["probabilities"], out["classes"]                 # numpy arrays
    by_example = serving.load(path, "examples:serving_default")
    by_example(examples=[serialized_tf_example, ...])
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

SERVE_TAG = "serve"


class ServedModel:
    """One signature of a SavedModel, callable with numpy arrays; returns numpy arrays.

    Attributes:
        path: The SavedModel folder.
        signature_key: The signature served.
        inputs: Input key -> ``(dtype, shape)`` of the signature (``None`` for unknown sizes).
        outputs: The output keys, in the order they are returned.
    """

    def __init__(
        self,
        path: str,
        signature_key: str = "serving_default",
        freeze: bool = True,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
    ):
        self.path = path
        self.signature_key = signature_key
        config = tf.compat.v1.ConfigProto(
            intra_op_parallelism_threads=intra_op_threads,
            inter_op_parallelism_threads=inter_op_threads,
        )
        graph = tf.Graph()
        session = tf.compat.v1.Session(graph=graph, config=config)
        with graph.as_default():
            meta_graph = tf.compat.v1.saved_model.load(session, [SERVE_TAG], path)
        signatures = meta_graph.signature_def
        if signature_key not in signatures:
            session.close()
            raise KeyError(
                f"{path} has no signature {signature_key!r}; it has: "
                + ", ".join(sorted(signatures))
            )
        signature = signatures[signature_key]
        input_keys = sorted(signature.inputs)
        self.outputs: List[str] = sorted(signature.outputs)
        input_names = [signature.inputs[key].name for key in input_keys]
        output_names = [signature.outputs[key].name for key in self.outputs]
        if freeze:
            # Variables read on every call stop oneDNN from caching its reordered weights;
            # as constants they are reordered once (cnn batch 1: 2.6-3.4 -> 1.8-2.1 ms).
            graph_def = tf.compat.v1.graph_util.convert_variables_to_constants(
                session,
                graph.as_graph_def(),
                sorted({name.split(":")[0] for name in output_names}),
            )
            session.close()
            graph = tf.Graph()
            with graph.as_default():
                tf.compat.v1.import_graph_def(graph_def, name="")
            session = tf.compat.v1.Session(graph=graph, config=config)
        self._session = session
        feeds = [graph.get_tensor_by_name(name) for name in input_names]
        self.inputs: Dict[str, tuple] = {
            key: (tensor.dtype.as_numpy_dtype, tuple(tensor.shape.as_list()))
            for key, tensor in zip(input_keys, feeds)
        }
        # One callable per signature: the feeds and fetches are resolved once, not on every run.
        self._run = session.make_callable(
            [graph.get_tensor_by_name(name) for name in output_names], feeds
        )

    def __call__(self, *args, **kwargs) -> Dict[str, np.ndarray]:
        """Runs the signature.

        Args:
            *args: The input, for a signature with exactly one (e.g. the image batch).
            **kwargs: Inputs by key (``image=...``; ``examples=[bytes, ...]``).

        Returns:
            Output key -> numpy array (``classes``, ``probabilities``, ...).
        """
        if args:
            if len(args) != 1 or kwargs or len(self.inputs) != 1:
                raise TypeError(
                    f"pass the inputs by name: {', '.join(self.inputs)} "
                    f"(signature {self.signature_key!r})"
                )
            kwargs = {next(iter(self.inputs)): args[0]}
        if set(kwargs) != set(self.inputs):
            raise TypeError(
                f"signature {self.signature_key!r} takes {', '.join(sorted(self.inputs))}, "
                f"got {', '.join(sorted(kwargs)) or 'nothing'}"
            )
        # Strings stay Python bytes objects: a fixed-width numpy "S" array would drop the
        # trailing NUL bytes of a serialized tf.Example.
        values = [np.asarray(kwargs[key], dtype=dtype) for key, (dtype, _) in self.inputs.items()]
        return dict(zip(self.outputs, self._run(*values)))

    def close(self) -> None:
        """Releases the session."""
        self._session.close()

    def __enter__(self) -> ServedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(
    path: str,
    signature_key: str = "serving_default",
    freeze: bool = True,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
) -> ServedModel:
    """Loads one signature of a SavedModel for fast in-process serving.

    Args:
        path: A SavedModel version folder (``EXPORT_DIR/<timestamp>``), or an export folder
            holding numeric versions, in which case the newest is served.
        signature_key: ``serving_default`` (raw images), ``predict`` (adds the logits),
            ``examples:serving_default``, ``examples:predict`` or ``examples:classification``.
        freeze: Fold the variables into constants at load (faster; the same probabilities).
        intra_op_threads: Threads per op (0: TensorFlow decides, one per core).
        inter_op_threads: Ops run at once (0: TensorFlow decides).

    Returns:
        A :class:`ServedModel`: ``model(image=batch)`` -> ``{"classes": ..., ...}``.
    """
    return ServedModel(
        latest_version(path) or path, signature_key, freeze, intra_op_threads, inter_op_threads
    )


def latest_version(export_dir: str) -> Optional[str]:
    """The newest numeric version folder under ``export_dir`` (as TF Serving picks), or None.

    ``temp-*`` folders (an export still being written, or killed) are skipped, as TF Serving does.
    """
    if os.path.exists(os.path.join(export_dir, "saved_model.pb")) or not os.path.isdir(export_dir):
        return None
    versions = [name for name in os.listdir(export_dir) if name.isdigit()]
    if not versions:
        return None
    return os.path.join(export_dir, max(versions, key=int))
