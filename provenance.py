"""Which dataset a model dir was trained on: recorded in its checkpoints, checked by the jobs.

Training saves the dataset's identity (``DatasetSpec.dataset_id``, a digest of the records'
content, with the folder, image shape and class count to name it) in a string variable
``DATASET_KEY`` beside the weights, as ``estimator_bridge.MODEL_KEY`` records the model. Then:

* training into a model dir trained on another dataset stops before writing anything
  (:func:`check_same_dataset`);
* evaluating or predicting on another dataset runs, says so in one line
  (:func:`other_dataset_note`), and evaluation writes to ``eval_<split>-<dataset id>/`` instead of
  ``eval_<split>/``, so the training dataset's results are never overwritten
  (:func:`eval_name`).

Checkpoints written before the key existed record nothing; they are taken to match any dataset.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

import tensorflow as tf

# Checkpoint key of a string variable holding the training dataset's identity (JSON).
DATASET_KEY = "estimator_bridge_dataset"


def dataset_record(spec) -> str:
    """What ``DATASET_KEY`` records for ``spec``: its id, folder, image shape and classes (JSON)."""
    return json.dumps(
        {
            "id": spec.dataset_id,
            "data_dir": spec.data_dir,
            "image_shape": list(spec.image_shape),
            "num_classes": spec.num_classes,
        },
        sort_keys=True,
    )


def should_record(model_dir: str) -> bool:
    """Whether training may add ``DATASET_KEY``: a new model dir, or one whose checkpoint has it.

    Restoring a graph holding the variable from a checkpoint without it would fail, so runs
    resuming such a checkpoint record nothing.
    """
    latest = tf.train.latest_checkpoint(model_dir)
    if latest is None:
        return True
    try:
        return DATASET_KEY in dict(tf.train.list_variables(latest))
    except (tf.errors.OpError, ValueError):
        return False


def trained_on(checkpoint: Optional[str]) -> Optional[Dict[str, Any]]:
    """The dataset identity a checkpoint records, or None (none recorded, or no checkpoint)."""
    if not checkpoint:
        return None
    try:
        reader = tf.train.load_checkpoint(checkpoint)
        if not reader.has_tensor(DATASET_KEY):
            return None
        record = json.loads(reader.get_tensor(DATASET_KEY).decode())
    except (tf.errors.OpError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) and "id" in record else None


def describe(record: Dict[str, Any]) -> str:
    """``data/mnist (28x28x1, 10 classes, id 3fa2...)``: a dataset as messages name it."""
    shape = "x".join(str(d) for d in record.get("image_shape", []))
    return (
        f"{record.get('data_dir') or '?'} ({shape}, {record.get('num_classes')} classes, "
        f"id {str(record['id'])[:8]})"
    )


def other_dataset(checkpoint: Optional[str], spec) -> Optional[Dict[str, Any]]:
    """The dataset ``checkpoint`` was trained on if it is not ``spec``'s, else None."""
    record = trained_on(checkpoint)
    if record is None or record["id"] == spec.dataset_id:
        return None
    return record


def check_same_dataset(model_dir: str, spec) -> Optional[str]:
    """Why training ``spec``'s data into ``model_dir`` must stop, or None if it may go on.

    Returns:
        One line naming both datasets and the ways forward, when the model dir's latest
        checkpoint was trained on another dataset.
    """
    latest = tf.train.latest_checkpoint(model_dir)
    record = other_dataset(latest, spec)
    if record is None:
        return None
    return (
        f"{model_dir} was trained on {describe(record)}, not on "
        f"{describe(json.loads(dataset_record(spec)))}; pass another --model_dir for a new "
        "run, or start one from these weights: --mode=export --keras_output=W.keras, then "
        "--mode=train --model_dir=NEW --warm_start_from=W.keras"
    )


def other_dataset_note(checkpoint: str, spec, doing: str) -> Optional[str]:
    """One line when ``checkpoint`` was trained on another dataset than ``spec``'s, else None.

    Args:
        checkpoint: The checkpoint evaluated or predicted.
        spec: The dataset given (``--data_dir``).
        doing: What the job does, e.g. ``"evaluating"``.
    """
    record = other_dataset(checkpoint, spec)
    if record is None:
        return None
    return (
        f"note: {checkpoint} was trained on {describe(record)}; {doing} "
        f"{describe(json.loads(dataset_record(spec)))}"
    )


def eval_name(checkpoint: str, spec, split: str) -> str:
    """The Estimator evaluation name: ``split``, or ``split-<id>`` on another dataset.

    The Estimator writes to ``model_dir/eval_<name>/`` (and the confusion matrices go there):
    another dataset's evaluation gets a folder of its own.
    """
    if other_dataset(checkpoint, spec) is None:
        return split
    return f"{split}-{spec.dataset_id[:8]}"
