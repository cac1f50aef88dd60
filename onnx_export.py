"""The exported network as ONNX, written beside the SavedModel's own files for faster engines.

``jobs.export`` calls :func:`write_onnx` on each new SavedModel version folder. tf2onnx converts
the ``predict`` signature (the same predict graph as the SavedModel: raw images, ``image``
float32 ``[N, H, W, C]`` in [0, 1], in; ``classes``, ``probabilities`` and ``logits`` out) into
``<version>/model.onnx``. The ``tf.Example`` receivers stay SavedModel-only: the parse of
serialized records is a TensorFlow op that ONNX engines do not run. A string output (class names)
is left out of the ONNX graph, which holds numeric outputs only; the dataset's class names go
into the file's metadata instead, and ``serving`` answers ``class_names`` from them.

TF Serving and ``tf.saved_model.load`` read only ``saved_model.pb``, ``variables/`` and
``assets/`` of a version folder and ignore other files (tested). The file is written under a
temporary name and renamed, so a reader never sees half a model; a full disk is not a reason
to skip it but an error (``jobs.export`` then removes the version folder).

Needs the ``onnx`` extra (``pip install -e '.[onnx]'``: onnx, tf2onnx, onnxruntime); without
it, or when tf2onnx lacks an op of a user's network, the export still writes its SavedModel and
:func:`write_onnx` returns the reason the ONNX file was skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Optional, Sequence, Tuple

ONNX_FILE = "model.onnx"
# The signature converted: the image receiver with every numeric output.
SIGNATURE = "predict"
# Opset 17: supported by tf2onnx 1.17 and by onnxruntime since 1.13, OpenVINO since 2022.3.
OPSET = 17
# Metadata keys written into the ONNX file (``ModelProto.metadata_props``).
CLASS_NAMES_KEY = "class_names"
SIGNATURE_KEY = "signature"
CHECKPOINT_KEY = "checkpoint"


def onnx_path(saved_model_dir: str) -> str:
    """Where the ONNX file of a SavedModel version folder is (or would be)."""
    return os.path.join(saved_model_dir, ONNX_FILE)


def write_onnx(
    saved_model_dir: str,
    class_names: Optional[Sequence[str]] = None,
    checkpoint: Optional[str] = None,
    opset: int = OPSET,
) -> Tuple[Optional[str], Optional[str]]:
    """Converts the SavedModel's ``predict`` signature to ``<saved_model_dir>/model.onnx``.

    Args:
        saved_model_dir: A SavedModel version folder written by ``jobs.export``.
        class_names: The dataset's class names, by class index, kept in the file's metadata.
        checkpoint: The checkpoint exported, kept in the metadata (which weights these are).
        opset: The ONNX opset to target.

    Returns:
        ``(path, None)`` when written, ``(None, reason)`` when skipped (the one-line reason:
        the extra is not installed, or tf2onnx could not convert the network).

    Raises:
        data_pipeline.DiskFullError: The file did not fit (no temporary file is left).
    """
    try:
        import onnx
        import tf2onnx
    except ImportError as error:
        return None, f"{error.name} is not installed (pip install -e '.[onnx]')"
    from data_pipeline import diskfull

    path = onnx_path(saved_model_dir)
    try:
        with _quiet() as unsupported:
            graph_def, inputs, outputs, tables, renames = tf2onnx.tf_loader.from_saved_model(
                saved_model_dir,
                None,
                None,
                tag=["serve"],
                signatures=[SIGNATURE],
                return_initialized_tables=True,
                return_tensors_to_rename=True,
            )
            # A string output (e.g. class names) has no numeric ONNX counterpart: left out.
            numeric = [name for name in outputs if not _is_string(graph_def, name)]
            model, _ = tf2onnx.convert._convert_common(
                graph_def,
                name=os.path.basename(saved_model_dir),
                opset=opset,
                input_names=inputs,
                output_names=numeric,
                tensors_to_rename=renames,
                initialized_tables=tables,
            )
        if unsupported:
            # tf2onnx leaves an op it cannot map in the graph as it is and only logs it.
            raise ValueError(f"tf2onnx cannot convert the ops {', '.join(sorted(unsupported))}")
        onnx.checker.check_model(model)
        metadata = {SIGNATURE_KEY: SIGNATURE}
        if class_names is not None:
            metadata[CLASS_NAMES_KEY] = json.dumps([str(name) for name in class_names])
        if checkpoint is not None:
            metadata[CHECKPOINT_KEY] = checkpoint
        onnx.helper.set_model_props(model, metadata)
        with diskfull.atomic_output(path) as tmp:
            onnx.save_model(model, tmp)
    except Exception as error:  # noqa: BLE001 - any other failure only skips the optional file
        if diskfull.disk_full_error(error) is not None:
            raise  # a full disk fails the export: a version folder is all or nothing
        return None, _one_line(error)
    return path, None


def _is_string(graph_def, tensor_name: str) -> bool:
    """Whether ``tensor_name`` of ``graph_def`` is a string tensor."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    return graph.get_tensor_by_name(tensor_name).dtype == tf.string


def _one_line(error: Exception) -> str:
    """The error's first non-empty line, with its type (tf2onnx's messages run over lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


class _Unsupported(logging.Handler):
    """Collects the TensorFlow op types tf2onnx logs as unsupported."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.ops = set()

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Tensorflow op [") and message.endswith("is not supported"):
            self.ops.add(message.split("]")[0].rsplit(": ", 1)[-1])


@contextlib.contextmanager
def _quiet():
    """Silences tf2onnx's and TensorFlow's Python loggers; yields the unsupported op types.

    tf2onnx's loggers do not propagate to the root; their messages (per-op notes, the ops it
    cannot convert) are caught here instead of printed.
    """
    names = ("tf2onnx", "tensorflow")
    loggers = [logging.getLogger(name) for name in names]
    saved = [(logger.level, logger.handlers[:], logger.propagate) for logger in loggers]
    collector = _Unsupported()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    tf2onnx_logger = loggers[0]
    tf2onnx_logger.handlers = [collector]
    tf2onnx_logger.propagate = False
    try:
        yield collector.ops
    finally:
        for logger, (level, handlers, propagate) in zip(loggers, saved):
            logger.setLevel(level)
            logger.handlers = handlers
            logger.propagate = propagate
