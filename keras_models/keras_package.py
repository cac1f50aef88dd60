"""The ``keras`` 2.15 package beside tf_keras: builders that ``import keras`` train all the same.

TensorFlow 2.15 installs ``keras`` 2.15, a twin of tf_keras with its own classes, which the
Estimator cannot train. Two ways in, both used by :mod:`keras_models.resolve`:

- :func:`alias_to_tf_keras`: before the bridge imports a builder's module, ``import keras`` and
  every ``keras.*`` module are made the very modules of ``tf_keras``, so the builder's code
  builds tf_keras layers. This covers every builder named ``package.module:function``.
- :func:`to_tf_keras`: a model of the real package (its caller imported ``keras`` first and hands
  the bridge a builder function) is rebuilt in tf_keras from its config. Once imported, the
  package has overwritten TensorFlow's export table (``keras.layers.Dense`` and the rest) with its
  own classes, and tf_keras's ``from_config`` would build the wrong package's layers and loop
  forever; the table points at tf_keras for the rebuild only.

Nothing here imports the Estimator.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any, Callable, Mapping

import tensorflow as tf
import tf_keras
from tensorflow.python.util import tf_export


def is_keras_package_model(model: Any) -> bool:
    """Whether ``model`` is a model of the ``keras`` package rather than of tf_keras."""
    module = type(model).__module__ or ""
    return not isinstance(model, tf_keras.Model) and module.startswith("keras.")


def package_loaded() -> bool:
    """Whether the real ``keras`` package (not the tf_keras alias) is imported in this process."""
    module = sys.modules.get("keras")
    return module is not None and module is not tf_keras


class _KerasAsTfKeras(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``keras`` and ``keras.*`` as the very modules ``tf_keras`` and ``tf_keras.*``."""

    def find_spec(self, name, path=None, target=None):
        if name == "keras" or name.startswith("keras."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("tf_" + spec.name)  # the module object itself, shared

    def exec_module(self, module):
        pass  # already executed when tf_keras imported it


def alias_to_tf_keras() -> None:
    """From now on ``import keras`` gives tf_keras, unless the real package is imported already.

    The alias stays for the process (a builder may import ``keras.applications`` when called),
    as ``tf.keras`` already is tf_keras here.
    """
    if not package_loaded() and not any(isinstance(f, _KerasAsTfKeras) for f in sys.meta_path):
        sys.meta_path.insert(0, _KerasAsTfKeras())


def build_as_tf_keras(
    builder: Callable[..., Any], rebuild: Callable[[type, Mapping], Any], **kwargs
) -> Any:
    """Calls ``builder``; a model of the ``keras`` package comes back rebuilt in tf_keras.

    The package's model is built in a graph of its own, so that none of its variables lands in
    the caller's graph (the Estimator's); ``rebuild(config)`` makes the tf_keras model in the
    caller's graph from the tf_keras class (``Model`` or ``Sequential``) and the config, with
    fresh weights from the same initializers, as any builder's call gives.
    A builder that returns a tf_keras model is called a second time in the caller's graph.
    """
    if not package_loaded():
        return builder(**kwargs)
    with tf.Graph().as_default():
        probe = builder(**kwargs)
        if not is_keras_package_model(probe):
            probe = None
        else:
            sequential = type(probe).__name__ == "Sequential"
            config = probe.get_config()
    if probe is None:
        return builder(**kwargs)
    with _export_table_of_tf_keras():
        return rebuild(tf_keras.Sequential if sequential else tf_keras.Model, config)


@contextlib.contextmanager
def _export_table_of_tf_keras():
    """For the block, TensorFlow's ``keras.*`` export names resolve to tf_keras's objects."""
    table = tf_export._NAME_TO_SYMBOL_MAPPING  # noqa: SLF001 - the table Keras looks classes up in
    patch = {}
    for name, value in table.items():
        if name.startswith("keras.") and (getattr(value, "__module__", "") or "").startswith(
            "keras."
        ):
            ours = _tf_keras_symbol(name)
            if ours is not None:
                patch[name] = ours
    saved = {name: table[name] for name in patch}
    table.update(patch)
    try:
        yield
    finally:
        table.update(saved)


def _tf_keras_symbol(name: str):
    value = tf_keras
    for part in name.split(".")[1:]:
        value = getattr(value, part, None)
        if value is None:
            return None
    return value
