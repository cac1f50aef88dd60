"""tf.distribute strategies for the Estimator's ``RunConfig``, and the ``TF_CONFIG`` cluster.

``estimator_bridge.make_estimator`` splats :func:`run_config_kwargs` into
``tf.estimator.RunConfig``; the Estimator reads the cluster and this process' role from the
``TF_CONFIG`` environment variable (see ``docs/DISTRIBUTED.md``). TensorFlow is imported lazily,
so ``STRATEGIES`` can be read without importing it.

What TF 2.15's Estimator does with each strategy (found by running it, see the docs):

* ``none``: no strategy. With a ``TF_CONFIG`` holding ``ps`` tasks the Estimator still trains
  between-graph with ``replica_device_setter`` (classic asynchronous parameter servers).
* ``mirrored``: synchronous data parallelism over this machine's GPUs, or over its logical CPU
  devices when there are several and no GPU. Single machine only.
* ``multi_worker_mirrored``: synchronous all-reduce across ``chief`` + ``worker`` tasks. Works
  with ``--mode=train_and_evaluate`` on TF 2.15.1 (the ``cannot pickle '_thread.lock'`` failure
  of tensorflow#46556 did not reproduce), though TensorFlow calls it unsupported with Estimator.
  It must be built before TF's runtime initialises, and never on the evaluator task.
* ``parameter_server``: asynchronous training on ``tf.compat.v1...ParameterServerStrategy`` (the
  v2 class is rejected by the Estimator) with ``chief``/``worker``/``ps``/``evaluator`` tasks
  from ``TF_CONFIG``.

On a cluster every strategy needs ``--mode=train_and_evaluate``: ``Estimator.train`` and
``evaluate`` raise "Only `STANDALONE_CLIENT` mode is supported ...".
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

STRATEGIES = ("none", "mirrored", "multi_worker_mirrored", "parameter_server")
# Task types of a TF_CONFIG; the evaluator is never part of "cluster" (tensorflow#30121).
TRAINING_TASKS = ("chief", "worker", "ps")
TASK_TYPES = (*TRAINING_TASKS, "evaluator")


def run_config_kwargs(name: str) -> Dict[str, Any]:
    """Keyword arguments for ``tf.estimator.RunConfig`` for the strategy ``name``.

    Returns:
        ``{}`` for ``none``, else ``{"train_distribute": ..., "eval_distribute": ...}``.

    Raises:
        ValueError: ``name`` is not one of :data:`STRATEGIES`.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown distribution {name!r}; choose one of: {', '.join(STRATEGIES)}")
    if name == "none":
        return {}
    # Evaluation runs in one process (the evaluator task, or the chief locally). Mirrored
    # evaluation splits the eval batch over the local devices; the PS and multi-worker
    # strategies have nothing to offer a single evaluator, so it evaluates undistributed.
    eval_strategy = make_strategy(name) if name == "mirrored" else None
    if current_task()["type"] == "evaluator":
        # The evaluator is outside the TF_CONFIG cluster: building a multi-worker strategy
        # there fails (MultiWorkerMirroredStrategy: KeyError: 'evaluator'), and without a
        # train_distribute the Estimator runs it as a plain continuous evaluator.
        return {"eval_distribute": eval_strategy} if eval_strategy else {}
    return {"train_distribute": make_strategy(name), "eval_distribute": eval_strategy}


def make_strategy(name: str):
    """A new ``tf.distribute`` strategy object for ``name`` (``None`` for ``none``)."""
    import tensorflow as tf

    if name == "none":
        return None
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=local_devices())
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "parameter_server":
        # The v2 class makes RunConfig raise ValueError ("Please use
        # `tf.compat.v1.distribute.experimental.ParameterServerStrategy` ... with estimator").
        return tf.compat.v1.distribute.experimental.ParameterServerStrategy()
    raise ValueError(f"unknown distribution {name!r}; choose one of: {', '.join(STRATEGIES)}")


def local_devices() -> Optional[List[str]]:
    """Devices MirroredStrategy should use: every GPU, else every logical CPU if there are two+.

    ``None`` lets MirroredStrategy choose (which on a CPU-only host is only ``/cpu:0``, even when
    the CPU was split into logical devices).
    """
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return [device.name for device in gpus]
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) > 1:
        return [device.name for device in cpus]
    return None


def split_cpu(num_devices: int) -> None:
    """Splits the host CPU into ``num_devices`` logical devices (before TF initialises).

    Raises:
        RuntimeError: TensorFlow's runtime is already initialised in this process.
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)]
    )


# --------------------------------------------------------------------------------------------
# TF_CONFIG
# --------------------------------------------------------------------------------------------


def tf_config(
    cluster: Mapping[str, Sequence[str]], task_type: str, task_index: int = 0
) -> Dict[str, Any]:
    """The ``TF_CONFIG`` dict for one task of ``cluster``.

    Args:
        cluster: ``{"chief": [addr], "worker": [...], "ps": [...]}``. An ``evaluator`` entry, if
            given, is dropped: the evaluator is not part of the training cluster.
        task_type: ``chief``, ``worker``, ``ps`` or ``evaluator``.
        task_index: Index of the task within its type.

    Raises:
        ValueError: An unknown task type, or a training task missing from ``cluster``.
    """
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task type {task_type!r}; choose one of: {TASK_TYPES}")
    training = {k: list(v) for k, v in cluster.items() if k != "evaluator" and v}
    if task_type != "evaluator" and task_index >= len(training.get(task_type, ())):
        raise ValueError(f"TF_CONFIG cluster has no {task_type} task {task_index}: {training}")
    return {
        "cluster": training,
        "task": {"type": task_type, "index": task_index},
    }


def current_task() -> Dict[str, Any]:
    """``{"type", "index", "cluster"}`` from ``TF_CONFIG`` (type ``None`` when not set)."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task") or {}
    return {
        "type": task.get("type"),
        "index": int(task.get("index", 0)),
        "cluster": config.get("cluster") or {},
    }


def session_config_kwargs(name: str) -> Dict[str, Any]:
    """Extra ``tf.compat.v1.ConfigProto`` arguments for the strategy ``name``.

    For ``mirrored``: the Estimator runs ``tf.compat.v1.Session``s, which ignore the eager
    context's logical device configuration, so without ``device_count`` a session has only
    ``/cpu:0`` and a MirroredStrategy over two logical CPUs fails with "Cannot assign a device
    for operation ... was explicitly assigned to ... /device:CPU:1 but available devices are
    [ ... CPU:0 ]". Other strategies get nothing: listing devices initialises TensorFlow's
    runtime, after which MultiWorkerMirroredStrategy cannot be built ("Collective ops must be
    configured at program startup").
    """
    if name != "mirrored":
        return {}
    import tensorflow as tf

    cpus = len(tf.config.list_logical_devices("CPU"))
    return {"device_count": {"CPU": cpus}} if cpus > 1 else {}
