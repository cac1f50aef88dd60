"""Which model: a registry name, ``package.module:function``, or a Keras model file.

:func:`resolve_model` turns what ``--model`` says (plus ``--model_params``) into a
:class:`ResolvedModel`, whose :meth:`ResolvedModel.build` returns a *fresh* ``keras.Model`` on
every call: the Estimator builds the network once per graph. :func:`check_classifier` says
whether a model is one the Estimator bridge can train (one image input, one
``[batch, num_classes]`` output of logits or of softmax probabilities). Every problem is one
line in a :class:`ModelError`. Nothing here imports the Estimator.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib
import inspect
import json
import os
from types import MappingProxyType
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf
import tf_keras as keras

from keras_models import keras_package, networks

# Read-only so that importers cannot swap a builder out from under the Estimator bridge.
REGISTRY: Mapping[str, Callable[..., keras.Model]] = MappingProxyType(dict(networks.NETWORKS))
MODEL_FILE_SUFFIXES = (".keras", ".h5", ".hdf5")
# Output activations the bridge understands: logits as they are, softmax probabilities.
LOGITS, SOFTMAX = "logits", "softmax"
FORMS = "a registry name, package.module:function, or a .keras/.h5 model file"


class ModelError(ValueError):
    """What ``--model``/``--model_params`` name cannot be used; ``str()`` is one line."""

    exit_code = 2


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """A model source, ready to build.

    Attributes:
        source: What ``--model`` said (or the builder's qualified name for a callable).
        label: A short name for default folders: the registry name, function name or file stem.
        kind: ``registry``, ``builder`` or ``file``.
        builder: Called with keyword arguments, returns a new ``keras.Model``.
        params: Keyword arguments from ``--model_params``; they override everything else.
        weights: A model file's own weights (``get_weights()`` order); None for builders.
    """

    source: str
    label: str
    kind: str
    builder: Callable[..., keras.Model]
    params: Mapping[str, Any]
    weights: Optional[Tuple[np.ndarray, ...]] = None

    @property
    def accepted(self) -> Tuple[FrozenSet[str], bool]:
        """The keyword arguments the builder names, and whether it also takes ``**kwargs``."""
        return _accepted(self.builder)

    def build(
        self,
        input_shape: Optional[Sequence[int]] = None,
        num_classes: Optional[int] = None,
        **offered: Any,
    ) -> keras.Model:
        """Builds a new model, checked with :func:`check_classifier`.

        Args:
            input_shape: The data's image shape (H, W, C); passed to a builder that names an
                ``input_shape`` argument, and checked against the model's input.
            num_classes: The data's class count; passed to a builder naming ``num_classes``,
                and checked against the model's output.
            **offered: Further defaults (e.g. ``dropout_rate``) passed only to a builder that
                names them. ``params`` override all of these.

        Raises:
            ModelError: The builder raised or returned something the bridge cannot train.
        """
        names, _ = self.accepted
        offered = {"input_shape": input_shape, "num_classes": num_classes, **offered}
        kwargs = {k: v for k, v in offered.items() if k in names and v is not None}
        if "input_shape" in kwargs:
            kwargs["input_shape"] = tuple(kwargs["input_shape"])
        kwargs.update(self.params)
        try:
            # `import keras` (the Keras 2.15 package here) gives models the Estimator cannot
            # train; such a model comes back rebuilt in tf_keras.
            model = keras_package.build_as_tf_keras(self.builder, _model_from_config, **kwargs)
        except ModelError:
            raise
        except Exception as error:  # noqa: BLE001 - any builder failure is the user's to fix
            raise ModelError(
                f"--model={self.source}: the builder "
                + (_keras3_api(error) or f"raised {_first_line(error)}")
            ) from None
        check_classifier(model, self.source, input_shape, num_classes)
        return model


def _keras3_api(error: BaseException) -> str:
    """For a builder that reached for Keras 3 (``from keras import ops``): what to do instead."""
    if not isinstance(error, (ImportError, AttributeError)) or "tf_keras" not in str(error):
        return ""
    return (
        f"uses what Keras 2 lacks ({_first_line(error)}); `import keras` is Keras 2 (tf_keras) "
        "here: build and save the model in Keras 3 (model.save('m.keras')) and pass "
        "--model=m.keras"
    )


def _accepted(builder) -> Tuple[FrozenSet[str], bool]:
    try:
        parameters = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):  # no signature to read: assume it takes anything
        return frozenset(), True
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = frozenset(p.name for p in parameters if p.kind in kinds)
    return names, any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)


def parse_model_params(text: Optional[str]) -> Dict[str, Any]:
    """``--model_params`` JSON text -> dict; empty or None gives ``{}``.

    Raises:
        ModelError: The text is not a JSON object.
    """
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ModelError(
            f"--model_params is not valid JSON ({error}); pass an object such as "
            """'{"dense_units": 512}'"""
        ) from None
    if not isinstance(value, dict):
        raise ModelError(f"--model_params must be a JSON object, got {type(value).__name__}")
    return value


def model_label(source: Union[str, Callable]) -> str:
    """A short name for ``source``'s default folders, without resolving it.

    ``cnn`` -> ``cnn``; ``my_pkg.nets:build_net`` -> ``build_net``; ``path/net.keras`` -> ``net``.
    """
    if callable(source):
        return getattr(source, "__name__", type(source).__name__)
    if source.lower().endswith(MODEL_FILE_SUFFIXES):
        return os.path.splitext(os.path.basename(source))[0] or "model"
    if ":" in source:
        return source.rsplit(":", 1)[1].rsplit(".", 1)[-1] or "model"
    return source


def resolve_model(
    source: Union[str, Callable[..., keras.Model]],
    params: Optional[Mapping[str, Any]] = None,
    *,
    unsafe_deserialization: bool = False,
) -> ResolvedModel:
    """Resolves ``--model`` (and ``--model_params``) to a buildable model.

    Args:
        source: A registry name (``cnn``, ...), ``package.module:function`` naming a builder
            that returns a functional ``keras.Model``, a path to a ``.keras``/``.h5`` model
            file (its architecture; its weights become the start of training), or a builder
            callable.
        params: Keyword arguments for a builder (``--model_params``).
        unsafe_deserialization: Let a model file's serialised Python (a ``Lambda``'s code)
            run; without it such a file is refused before anything is built.

    Raises:
        ModelError: The source cannot be found, imported or loaded, or ``params`` holds an
            argument the builder does not take.
    """
    params = dict(params or {})
    if callable(source):
        name = getattr(source, "__qualname__", None) or model_label(source)
        module = getattr(source, "__module__", None)
        resolved = ResolvedModel(
            f"{module}:{name}" if module else name, model_label(source), "builder", source, params
        )
    elif not isinstance(source, str) or not source:
        raise ModelError(f"--model must be {FORMS}, got {source!r}")
    elif source.lower().endswith(MODEL_FILE_SUFFIXES):
        resolved = _resolve_file(source, params, unsafe_deserialization)
    elif ":" in source:
        resolved = _resolve_function(source, params)
    elif source in REGISTRY:
        resolved = ResolvedModel(source, source, "registry", REGISTRY[source], params)
    else:
        raise ModelError(
            f"unknown model {source!r}; choose one of: {', '.join(sorted(REGISTRY))}, or give "
            "package.module:function or a .keras/.h5 model file"
        )
    names, var_keyword = resolved.accepted
    unknown = sorted(set(params) - names)
    if unknown and not var_keyword:
        raise ModelError(
            f"--model_params: the builder of --model={resolved.source} does not take "
            f"{', '.join(unknown)} (it takes: {', '.join(sorted(names)) or 'nothing'})"
        )
    return resolved


def _resolve_function(source: str, params) -> ResolvedModel:
    module_name, _, attribute = source.rpartition(":")
    if not module_name or not attribute:
        raise ModelError(f"--model={source}: write package.module:function")
    try:
        keras_package.alias_to_tf_keras()
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - ImportError, or whatever the module raises
        keras3_api = _keras3_api(error)
        if keras3_api:
            raise ModelError(f"--model={source}: module {module_name!r} {keras3_api}") from None
        raise ModelError(
            f"--model={source}: cannot import module {module_name!r} ({_first_line(error)}); "
            "is its folder on PYTHONPATH?"
        ) from None
    builder = module
    for part in attribute.split("."):
        builder = getattr(builder, part, None)
        if builder is None:
            raise ModelError(
                f"--model={source}: module {module_name!r} has no function {attribute!r}"
            )
    if not callable(builder):
        raise ModelError(f"--model={source}: {attribute!r} in {module_name!r} is not callable")
    return ResolvedModel(source, model_label(source), "builder", builder, params)


def _resolve_file(source: str, params, unsafe: bool = False) -> ResolvedModel:
    if params:
        raise ModelError(
            f"--model_params does not apply to the model file {source}: its architecture is fixed"
        )
    if not os.path.isfile(source):
        raise ModelError(f"model file {source} does not exist (--model={source})")
    stat = os.stat(source)
    model_class, config, weights = _load_model_file(
        os.path.abspath(source), stat.st_mtime_ns, stat.st_size, unsafe
    )
    builder = functools.partial(_model_from_config, model_class, config)
    # A file model takes no arguments: nothing named, so nothing offered is passed.
    return ResolvedModel(source, model_label(source), "file", builder, {}, weights)


@functools.lru_cache(maxsize=4)
def _load_model_file(path: str, mtime_ns: int, size: int, unsafe: bool = False):
    """Loads a model file once (per path and version): its class, config and weights."""
    del mtime_ns, size  # part of the cache key only: a rewritten file is loaded again
    if tf.executing_eagerly():
        return _read_model_file(path, unsafe)
    # Called while a graph is being built (first use inside a model_fn): read it in a new
    # thread, whose eager context and default graph are its own, so the file's model and
    # weights stay out of that graph.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_read_model_file, path, unsafe).result()


def _read_model_file(path: str, unsafe: bool = False):
    """A Keras 2 or Keras 3 file (told apart by contents) as tf_keras: class, config, weights.

    ``keras3.load_model`` reads the config and refuses serialised code before building.
    """
    from keras_models import keras3  # imports this module (ModelError)

    try:
        model = keras3.load_model(path, unsafe_deserialization=unsafe)
    except ModelError:
        raise
    except Exception as error:  # noqa: BLE001 - OSError, ValueError, missing custom objects...
        raise ModelError(f"cannot load the model file {path} ({_first_line(error)})") from None
    if not getattr(model, "_is_graph_network", False):
        raise ModelError(
            f"the model file {path} holds a subclassed {type(model).__name__}; the bridge needs "
            "a functional or Sequential model (whose layers it can see)"
        )
    return type(model), model.get_config(), tuple(model.get_weights())


def _model_from_config(model_class, config: Mapping[str, Any]) -> keras.Model:
    """A new model from a saved config, its layers in the current global dtype policy.

    A saved config pins every layer's dtype (``"float32"``), which would ignore
    ``--precision=mixed_bfloat16``; the layers of a float32 file take the global policy, except
    the output layer, which stays float32 like the built-in networks' logits.
    """
    policy = keras.mixed_precision.global_policy().name
    if policy != "float32":
        config = _with_policy(config, policy, keep=_output_layer_names(config))
    return model_class.from_config(config)


def _output_layer_names(config: Mapping[str, Any]) -> FrozenSet[str]:
    if "output_layers" in config:  # functional: [[layer name, node, tensor], ...]
        return frozenset(entry[0] for entry in config["output_layers"])
    layers = config.get("layers") or []  # Sequential: the last layer
    return frozenset([layers[-1]["config"].get("name")]) if layers else frozenset()


def _with_policy(value, policy: str, keep: FrozenSet[str]):
    """A copy of a model config whose float32 layers (not inputs, not ``keep``) use ``policy``."""
    if isinstance(value, list):
        return [_with_policy(item, policy, keep) for item in value]
    if not isinstance(value, dict):
        return value
    copy = {key: _with_policy(item, policy, keep) for key, item in value.items()}
    layer_config = copy.get("config")
    if (
        "class_name" in copy
        and isinstance(layer_config, dict)
        and copy["class_name"] != "InputLayer"
        and layer_config.get("dtype") == "float32"
        and layer_config.get("name") not in keep
    ):
        copy["config"] = {**layer_config, "dtype": policy}
    return copy


# --------------------------------------------------------------------------------------------
# What the bridge can train
# --------------------------------------------------------------------------------------------


def check_classifier(
    model,
    source: str = "",
    input_shape: Optional[Sequence[int]] = None,
    num_classes: Optional[int] = None,
) -> str:
    """Checks that ``model`` is a classifier the bridge can train; returns its output kind.

    The bridge feeds one image tensor ``[batch, H, W, C]`` and reads one ``[batch,
    num_classes]`` output. That output may be logits (no activation) or softmax probabilities
    (the bridge then trains on the softmax's input, see ``estimator_bridge``); any other final
    activation (sigmoid, relu, ...) is refused.

    Args:
        model: What a builder returned.
        source: The ``--model`` value, for messages.
        input_shape: The data's (H, W, C); None skips the input-shape check.
        num_classes: The data's class count; None skips the class-count check.

    Returns:
        ``"softmax"`` if the output layer's activation is softmax, else ``"logits"``. (The bridge
        also recognises a softmax it can only see in the graph, e.g. inside a Lambda.)

    Raises:
        ModelError: One line saying what the model has and what is needed.
    """
    where = f"--model={source}" if source else "the model"
    if not isinstance(model, keras.Model):
        raise ModelError(
            f"{where}: the builder returned a {type(model).__name__}, not a keras.Model"
        )
    if not getattr(model, "_is_graph_network", False):
        raise ModelError(
            f"{where}: the builder returned a subclassed or unbuilt {type(model).__name__}; the "
            "bridge needs a functional or Sequential model with a defined input shape"
        )
    if len(model.inputs) != 1:
        names = ", ".join(t.name.split(":")[0] for t in model.inputs)
        raise ModelError(
            f"{where} has {len(model.inputs)} inputs ({names}); the bridge feeds one image input"
        )
    shape = list(model.inputs[0].shape)[1:]
    if input_shape is not None:
        wanted = list(input_shape)
        fits = len(shape) == len(wanted) and all(a in (None, b) for a, b in zip(shape, wanted))
        if not fits:
            raise ModelError(
                f"{where} takes input {_fmt(shape)} but the data's images are {_fmt(wanted)}; "
                "build it for that shape, or give a builder that takes input_shape"
            )
    if len(model.outputs) != 1:
        raise ModelError(
            f"{where} has {len(model.outputs)} outputs; the bridge needs one [batch, classes] "
            "output"
        )
    out = list(model.outputs[0].shape)
    if len(out) != 2 or (num_classes is not None and out[1] != num_classes):
        wanted = f"[batch, {num_classes}]" if num_classes is not None else "[batch, classes]"
        raise ModelError(
            f"{where}: its output is {_fmt(out)}, not {wanted}"
            + (" (the data's class count)" if num_classes is not None else "")
            + "; give a builder that takes num_classes, or end the model with that many units"
        )
    layer, activation = _output_activation(model)
    if activation in (None, "linear"):
        return LOGITS
    if activation == "softmax":
        return SOFTMAX
    raise ModelError(
        f"{where}: its output layer {layer!r} applies {activation}; the bridge needs logits "
        "(no activation) or softmax probabilities"
    )


def _fmt(shape) -> str:
    dims = ("batch" if d is None and i == 0 else str(d) for i, d in enumerate(shape))
    return "[" + ", ".join(dims) + "]"


def _output_activation(model: keras.Model) -> Tuple[str, Optional[str]]:
    """The output layer's name and its activation's name (None when it has no activation)."""
    layer = model.get_layer(model.output_names[0])
    while isinstance(layer, keras.Model) and getattr(layer, "_is_graph_network", False):
        layer = layer.get_layer(layer.output_names[0])  # a nested model: its own output layer
    if isinstance(layer, keras.layers.Softmax):
        return layer.name, "softmax"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return layer.name, None
    name = (getattr(activation, "__name__", None) or type(activation).__name__).lower()
    if name.startswith("softmax"):  # keras.activations.softmax, tf.nn.softmax (softmax_v2)
        return layer.name, "softmax"
    if name.startswith(("linear", "log_softmax")):  # log-probabilities are logits too
        return layer.name, "linear"
    return layer.name, name
