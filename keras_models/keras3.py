"""Keras 2 (``tf_keras`` 2.15) <-> Keras 3 (3.15) model files, translated as files.

TensorFlow 2.15 pins ``keras<2.16``, so Keras 3 cannot be imported beside the Estimator. The two
versions' files differ only in a known list of places (``docs/keras3.md``): the config JSON
(module strings, dtype objects, the InputLayer's shape key, the form of a node, a few per-layer
keys), the legacy ``.h5`` weight names, and the version in the metadata. The weights themselves
(paths, order, shapes, dtypes) are the same. So this module rewrites the files themselves::

    from keras_models import keras3

    keras3.to_keras3("cnn.keras", "cnn_k3.keras")     # loads in Keras 3: keras.saving.load_model
    keras3.from_keras3("user3.keras", "user2.keras")  # loads in tf_keras
    keras3.file_format("user3.h5")                    # ModelFile(container='h5', major=3, ...)
    keras3.load_model("user3.keras")                  # a tf_keras model, from either version

Nothing in a model file is built before its config has been read and checked: a ``Lambda``
carrying marshalled Python (or any other serialised code) is refused first, in one line, unless
``unsafe_deserialization=True``. What cannot be carried across (a custom class the other
version does not have, a Keras 3 layer Keras 2 lacks, an unknown format version) is one line in
a :class:`~keras_models.resolve.ModelError`. Optimizer state and the compile settings are not
carried: a translated file is uncompiled (its weights and architecture are what move).

The project's ``GateOrthogonal`` initializer is written into Keras 3 files as the built-in
``Orthogonal`` (an initializer only draws fresh weights; the file's trained weights load as
they are), so those files load in Keras 3 with no project code.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import io
import json
import os
import tempfile
import zipfile
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import h5py
import numpy as np
import tensorflow as tf
import tf_keras

from keras_models.resolve import ModelError

# The Keras 3 release whose files this module writes (the version the tests load them with).
KERAS3_VERSION = "3.15.1"
KERAS2_FUNCTIONAL = "tf_keras.src.engine.functional"
KERAS3_FUNCTIONAL = "keras.src.models.functional"
MODEL_CLASSES = ("Functional", "Model", "Sequential")
# The .keras archive's members, the same constants in both versions' saving_lib.py.
CONFIG_NAME, METADATA_NAME, WEIGHTS_NAME = "config.json", "metadata.json", "model.weights.h5"
# Recurrent layers: tf_keras writes these keys, Keras 3 refuses (time_major) or ignores them.
RECURRENT = ("GRU", "LSTM", "SimpleRNN", "GRUV1", "LSTMV1")
# The project's own initializer, as the two forms of its name a file may hold.
GATE_ORTHOGONAL = ("GateOrthogonal", "keras_models>GateOrthogonal")
UNSAFE_HINT = "pass --unsafe_deserialization (unsafe_deserialization=True) only if you trust it"


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """What a model file is, read from its contents (never its name).

    Attributes:
        path: The file.
        container: ``"keras"`` (the zip archive) or ``"h5"`` (the legacy HDF5 full-model save).
        keras_version: The version string the file records (``"2.15.1"``, ``"3.15.1"``, ...).
        major: 2 (tf_keras / Keras 2) or 3 (Keras 3).
        config: The model config (``config.json``, or the ``.h5``'s ``model_config``).
    """

    path: str
    container: str
    keras_version: str
    major: int
    config: Dict[str, Any]


# --------------------------------------------------------------------------------------------
# Reading a file's format and config (nothing is built)
# --------------------------------------------------------------------------------------------


def file_format(path: str) -> ModelFile:
    """Reads which Keras wrote ``path`` and its model config, from the file's contents.

    A ``.keras`` archive says so in ``metadata.json`` (``keras_version``); a legacy ``.h5``
    in its ``keras_version`` attribute, and where that is missing the config's own forms tell
    (Keras 3 writes ``batch_shape`` and ``DTypePolicy`` objects).

    Raises:
        ModelError: Not a Keras model file, or one of a Keras version other than 2 or 3.
    """
    try:
        return _file_format(path)
    except (OSError, ValueError, KeyError) as error:
        if isinstance(error, ModelError):
            raise
        text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise ModelError(
            f"cannot load the model file {path} ({type(error).__name__}: {text})"
        ) from None


def _file_format(path: str) -> ModelFile:
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                metadata = json.loads(archive.read(METADATA_NAME))
                config = json.loads(archive.read(CONFIG_NAME))
        except (KeyError, ValueError, zipfile.BadZipFile) as error:
            raise ModelError(
                f"cannot load the model file {path}: a zip but not a Keras model archive "
                f"({type(error).__name__}: {str(error)[:120]}); save it with "
                "model.save('name.keras')"
            ) from None
        version = str(metadata.get("keras_version", ""))
        return ModelFile(path, "keras", version, _major(path, version, config), config)
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as h5:
            text = h5.attrs.get("model_config")
            version = h5.attrs.get("keras_version", "")
        if text is None:
            raise ModelError(
                f"{path} holds weights only (no model_config); pass it as --warm_start_from "
                "with a --model that has this architecture, or save the whole model"
            )
        text = text.decode() if isinstance(text, bytes) else text
        version = version.decode() if isinstance(version, bytes) else str(version)
        config = json.loads(text)
        return ModelFile(path, "h5", version, _major(path, version, config), config)
    raise ModelError(
        f"cannot load the model file {path}: it is neither a .keras archive nor an HDF5 model "
        "file; save the model with model.save('name.keras')"
    )


def check_file(path: str, unsafe_deserialization: bool = False) -> None:
    """Refuses a whole-model file whose config carries serialised code (:func:`check_safe`).

    Weights-only files (nothing to build) pass.
    """
    if not unsafe_deserialization and os.path.isfile(path) and is_model_file(path):
        check_safe(file_format(path).config, path)


def is_model_file(path: str) -> bool:
    """Whether ``path`` holds a whole model rather than weights only.

    A whole model is a ``.keras`` archive or an ``.h5`` with a ``model_config``.
    """
    if zipfile.is_zipfile(path):
        return True
    if not h5py.is_hdf5(path):
        return False
    with h5py.File(path, "r") as h5:
        return "model_config" in h5.attrs


def _major(path: str, version: str, config) -> int:
    head = version.split(".", 1)[0]
    if head.isdigit():
        major = int(head)
        if major in (2, 3):
            return major
        raise ModelError(
            f"{path} was saved by Keras {version}; only Keras 2 (tf_keras) and Keras 3 "
            "files can be read: save it again with one of those"
        )
    text = json.dumps(config)  # no version recorded: Keras 3's own forms tell
    return 3 if '"batch_shape"' in text or '"DTypePolicy"' in text else 2


# --------------------------------------------------------------------------------------------
# Safety: no code from a model file runs unless the caller says so
# --------------------------------------------------------------------------------------------


def check_safe(config: Mapping[str, Any], path: str = "the model") -> None:
    """Refuses a config that carries serialised Python code, naming the layer.

    Looks for what would run when the model is built or called: a ``Lambda`` whose function
    (or output shape) is marshalled bytecode (``__lambda__`` objects in ``.keras`` files,
    ``function_type: "lambda"`` in legacy ``.h5`` ones), and any other ``__lambda__`` or
    bytecode-carrying function object anywhere in the config.

    Raises:
        ModelError: One line naming the layer and ``--unsafe_deserialization``.
    """
    for layer_name, class_name, what in _code_in(config, None, None):
        raise ModelError(
            f"{path}: layer {layer_name!r} ({class_name}) carries {what}, which would run "
            f"when the model is built; refused before building anything ({UNSAFE_HINT})"
        )


def _code_in(value, layer: Optional[str], class_name: Optional[str]) -> Iterator[Tuple]:
    if isinstance(value, list):
        if len(value) == 3 and isinstance(value[0], str) and _looks_like_bytecode(value[0]):
            yield (
                layer,
                class_name,
                "marshalled Python bytecode",
            )  # legacy (code, defaults, closure)
        for item in value:
            yield from _code_in(item, layer, class_name)
        return
    if not isinstance(value, dict):
        return
    inner = value.get("config")
    if "class_name" in value and isinstance(inner, dict) and "name" in inner:
        layer, class_name = inner["name"], value["class_name"]
    if value.get("class_name") in ("__lambda__", "__bytecode__") or (
        value.get("class_name") == "function" and isinstance(inner, dict) and "code" in inner
    ):
        yield layer, class_name, "a Python lambda (marshalled bytecode)"
    for key in ("function_type", "output_shape_type"):
        if value.get(key) == "lambda":
            yield layer, class_name, "a Python lambda (marshalled bytecode)"
    for item in value.values():
        yield from _code_in(item, layer, class_name)


def _looks_like_bytecode(text: str) -> bool:
    import base64
    import binascii

    if len(text) < 40:
        return False
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=False)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False
    return raw[:1] in (b"\xe3", b"c")  # marshal's TYPE_CODE (with or without FLAG_REF)


# --------------------------------------------------------------------------------------------
# Config translation
# --------------------------------------------------------------------------------------------


def config_to_keras3(config: Mapping[str, Any], shapes: Optional[Mapping] = None) -> Dict:
    """A tf_keras (Keras 2) model config -> the Keras 3 form (``.keras`` or ``.h5`` style).

    Args:
        config: The whole model's ``{"class_name", "config", ...}``.
        shapes: ``{(layer name, node index, tensor index): (shape, dtype)}`` of the model's
            tensors, for Keras 3's ``__keras_tensor__`` nodes; without it, nodes keep the list
            form (which Keras 3 also reads).

    Raises:
        ModelError: A custom class Keras 3 does not have built in.
    """
    config = copy.deepcopy(dict(config))
    config.pop("compile_config", None)
    return _model_to_k3(config, shapes or {}, top=True)


def _model_to_k3(entry: Dict, shapes, top: bool = False) -> Dict:
    cls = entry.get("class_name")
    inner = entry["config"]
    if cls in ("Functional", "Model"):
        if "module" in entry or top:
            entry["module"] = KERAS3_FUNCTIONAL
        entry["class_name"] = "Functional"
        if "registered_name" in entry:
            entry["registered_name"] = "Functional"
        models = _nested_model_names(inner)
        for layer in inner["layers"]:
            layer["inbound_nodes"] = [
                _node_to_k3(node, models, shapes) for node in layer.get("inbound_nodes", [])
            ]
        for key in ("input_layers", "output_layers"):
            refs = inner.get(key)
            if isinstance(refs, list) and refs and isinstance(refs[0], list):
                refs = [_shift(ref, models, -1) for ref in refs]
                # Keras 3 mirrors the input structure: a single one is a bare triple.
                inner[key] = refs[0] if len(refs) == 1 else refs
    if "compile_config" in entry and not top:
        entry["compile_config"] = {}
    if "layers" in inner:
        inner["layers"] = [_layer_to_k3(layer, shapes) for layer in inner["layers"]]
    if cls == "Sequential":
        inner.setdefault("trainable", True)
    return entry


def _shift(ref: List, models, by: int) -> List:
    """A ``[layer, node, tensor]`` reference, renumbered if it is a nested model's node.

    tf_keras counts a nested model's own construction node (so its first call is node 1);
    Keras 3 does not (node 0).
    """
    if ref and ref[0] in models and (by > 0 or ref[1] > 0):
        return [ref[0], ref[1] + by, *ref[2:]]
    return list(ref)


def _node_to_k3(node, models, shapes):
    if not isinstance(node, list):
        return node  # already a Keras 3 node
    tensors, kwargs = [], {}
    for ref in node:
        name, index, tensor = ref[0], ref[1], ref[2]
        kwargs = ref[3] if len(ref) > 3 else {}
        if name in models and index > 0:
            index -= 1  # tf_keras counts a nested model's own construction node; Keras 3 not
        known = shapes.get((name, index, tensor))
        if known is None:  # no shapes: the list form, which Keras 3 reads as well
            return [[ref[0], index if r is ref else r[1], *r[2:]] for r in node]
        shape, dtype = known
        tensors.append(
            {
                "class_name": "__keras_tensor__",
                "config": {"shape": shape, "dtype": dtype, "keras_history": [name, index, tensor]},
            }
        )
    args = [tensors[0]] if len(tensors) == 1 else [tensors]
    return {"args": args, "kwargs": dict(kwargs)}


def _layer_to_k3(layer: Dict, shapes) -> Dict:
    cls = layer.get("class_name")
    if cls in MODEL_CLASSES:
        return _model_to_k3(layer, shapes)
    _check_known(layer, "Keras 3")
    inner = layer.get("config", {})
    if cls == "InputLayer":
        if "batch_input_shape" in inner:
            inner["batch_shape"] = inner.pop("batch_input_shape")
        inner.setdefault("optional", False)
        return layer
    if cls == "BatchNormalization" and isinstance(inner.get("axis"), list):
        if len(inner["axis"]) != 1:
            raise ModelError(
                f"layer {inner.get('name')!r}: BatchNormalization over axes {inner['axis']} "
                "has no Keras 3 form (Keras 3 takes one axis)"
            )
        inner["axis"] = inner["axis"][0]
    if cls in RECURRENT:
        inner.pop("time_major", None)
        inner.pop("implementation", None)
    if cls in ("DepthwiseConv2D", "DepthwiseConv1D", "SeparableConv1D", "SeparableConv2D"):
        if inner.get("groups", 1) != 1:
            raise ModelError(f"layer {inner.get('name')!r}: {cls} with groups has no Keras 3 form")
        inner.pop("groups", None)
    for key, value in list(inner.items()):
        inner[key] = _value_to_k3(key, value, shapes)
    return layer


def _value_to_k3(key: str, value, shapes):
    if key == "dtype":
        return _dtype_to_k3(value)
    if isinstance(value, dict) and value.get("class_name") in MODEL_CLASSES:
        return _model_to_k3(value, shapes)
    if isinstance(value, dict) and "class_name" in value:
        if (
            value["class_name"] in GATE_ORTHOGONAL
            or value.get("registered_name") in GATE_ORTHOGONAL
        ):
            seed = value.get("config", {}).get("seed")
            return _builtin("keras.initializers", "Orthogonal", {"gain": 1.0, "seed": seed})
        if key in ("layer", "backward_layer"):  # wrappers: Bidirectional, TimeDistributed
            return _layer_to_k3(value, shapes)
        _check_known(value, "Keras 3")
        value["config"] = {k: _value_to_k3(k, v, shapes) for k, v in value["config"].items()}
    return value


def _dtype_to_k3(value):
    if isinstance(value, str):
        return _builtin("keras", "DTypePolicy", {"name": value})
    if isinstance(value, dict) and value.get("class_name") in ("Policy", "DTypePolicy"):
        return _builtin("keras", "DTypePolicy", {"name": value["config"]["name"]})
    return value


def _builtin(module: str, class_name: str, config: Dict) -> Dict:
    return {"module": module, "class_name": class_name, "config": config, "registered_name": None}


def config_from_keras3(config: Mapping[str, Any]) -> Dict:
    """A Keras 3 model config -> the tf_keras (Keras 2) form.

    Raises:
        ModelError: A layer or class tf_keras 2.15 does not have, a quantized layer, a model
            whose inputs are a dict, or a node calling a layer with non-tensor arguments.
    """
    config = copy.deepcopy(dict(config))
    config.pop("compile_config", None)
    return _model_to_k2(config, top=True)


def _nested_model_names(inner: Dict) -> set:
    """The names of a functional config's layers that are models themselves."""
    return {
        layer["config"]["name"]
        for layer in inner["layers"]
        if layer.get("class_name") in MODEL_CLASSES
    }


def _model_to_k2(entry: Dict, top: bool = False) -> Dict:
    cls = entry.get("class_name")
    inner = entry["config"]
    if cls in ("Functional", "Model"):
        if "module" in entry or top:
            entry["module"] = KERAS2_FUNCTIONAL
        models = _nested_model_names(inner)
        for layer in inner["layers"]:
            layer["inbound_nodes"] = [
                _node_to_k2(node, models, layer["config"].get("name"))
                for node in layer.get("inbound_nodes", [])
            ]
        for key in ("input_layers", "output_layers"):
            refs = inner.get(key)
            if isinstance(refs, dict):
                raise ModelError(
                    f"model {inner.get('name')!r}: its {key} are a dict; tf_keras needs a list"
                )
            if isinstance(refs, list) and len(refs) == 3 and isinstance(refs[0], str):
                refs = [refs]
            if isinstance(refs, list):
                inner[key] = [_shift(ref, models, +1) for ref in refs]
    entry.pop("compile_config", None)
    if "layers" in inner:
        inner["layers"] = [_layer_to_k2(layer) for layer in inner["layers"]]
    if cls == "Sequential":
        inner.pop("dtype", None)
    return entry


def _node_to_k2(node, models, layer_name):
    if isinstance(node, list):
        return node  # already the list form
    refs = []
    for value in _flatten(node.get("args", [])):
        if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
            name, index, tensor = value["config"]["keras_history"]
            if name in models:
                index += 1  # tf_keras counts a nested model's own construction node
            refs.append([name, index, tensor])
        else:
            raise ModelError(
                f"layer {layer_name!r} is called with a non-tensor argument ({value!r}), "
                "which tf_keras model configs cannot express"
            )
    # Keras 3 records call arguments (mask=None, training=False, ...); training is the
    # Estimator's to set, and a null mask is no argument.
    kwargs = {
        key: value
        for key, value in (node.get("kwargs") or {}).items()
        if key != "training" and value is not None
    }
    return [[*ref, kwargs] for ref in refs]


def _flatten(value) -> List:
    if isinstance(value, (list, tuple)):
        return [item for part in value for item in _flatten(part)]
    return [value]


def _layer_to_k2(layer: Dict) -> Dict:
    cls = layer.get("class_name")
    if cls in MODEL_CLASSES:
        return _model_to_k2(layer)
    _check_known(layer, "Keras 2 (tf_keras 2.15)")
    inner = layer.get("config", {})
    name = inner.get("name")
    if cls == "InputLayer":
        if "batch_shape" in inner:
            inner["batch_input_shape"] = inner.pop("batch_shape")
        if inner.pop("optional", False):
            raise ModelError(f"input {name!r} is optional, which tf_keras does not have")
    if inner.get("quantization_config") is not None or inner.get("dtype") in ("int8", "float8"):
        raise ModelError(
            f"layer {name!r} ({cls}) is quantized, which tf_keras does not have; save the "
            "float model"
        )
    inner.pop("quantization_config", None)
    if inner.get("lora_rank"):
        raise ModelError(f"layer {name!r} ({cls}) has LoRA weights, which tf_keras does not have")
    inner.pop("lora_rank", None)
    inner.pop("lora_alpha", None)
    for key, value in list(inner.items()):
        inner[key] = _value_to_k2(key, value)
    return layer


def _value_to_k2(key: str, value):
    if key == "dtype":
        if isinstance(value, dict) and value.get("class_name") == "DTypePolicy":
            return value["config"]["name"]
        if isinstance(value, dict) and value.get("class_name") == "QuantizedDTypePolicy":
            raise ModelError("a quantized dtype policy has no tf_keras form; save the float model")
        return value
    if isinstance(value, dict) and value.get("class_name") in MODEL_CLASSES:
        return _model_to_k2(value)
    if isinstance(value, dict) and "class_name" in value:
        if key in ("layer", "backward_layer"):
            return _layer_to_k2(value)
        _check_known(value, "Keras 2 (tf_keras 2.15)")
        inner = value.get("config")
        if isinstance(inner, dict):
            for axes in ("input_axes", "output_axes"):  # Keras 3's initializers only
                if inner.get(axes) is None:
                    inner.pop(axes, None)
            value["config"] = {k: _value_to_k2(k, v) for k, v in inner.items()}
    return value


# tf_keras 2.15 classes that Keras 3 dropped; a built-in class is otherwise looked up in
# tf_keras itself (the classes both versions have share their names).
KERAS2_ONLY = frozenset(
    {
        "AbstractRNNCell",
        "CuDNNGRU",
        "CuDNNLSTM",
        "DenseFeatures",
        "GRUV1",
        "LSTMV1",
        "LocallyConnected1D",
        "LocallyConnected2D",
        "ThresholdedReLU",
    }
)
_NAMESPACES = ("layers", "initializers", "regularizers", "constraints")


def _check_known(entry: Mapping[str, Any], target: str) -> None:
    """Refuses a class the target version does not have built in, in one line."""
    cls = entry.get("class_name")
    if not isinstance(cls, str) or cls.startswith("__") or cls in ("function", "DTypePolicy"):
        return
    registered = entry.get("registered_name")
    module = entry.get("module") or ""
    inner = entry.get("config")
    name = inner.get("name") if isinstance(inner, dict) else None
    what = f"layer {name!r} ({cls})" if name else cls
    builtin_module = not module or module == "keras" or module.startswith(("keras.", "tf_keras."))
    custom = registered not in (None, cls) or not builtin_module or ">" in cls
    if target.startswith("Keras 2"):
        if custom and _tf_keras_object(registered or cls, registered=True) is not None:
            return  # registered in this process (e.g. the project's GateOrthogonal)
        if not custom and _tf_keras_object(cls) is not None:
            return
    elif not custom and cls not in KERAS2_ONLY and _tf_keras_object(cls) is not None:
        return
    if custom or _tf_keras_object(cls, registered=True) is None and target.startswith("Keras 3"):
        raise ModelError(
            f"{what} is a custom class ({registered or cls}) that {target} does not have built "
            "in; rebuild the model from built-in layers, or register the class there and load "
            "the file with that Keras itself"
        )
    if target.startswith("Keras 3"):
        raise ModelError(
            f"{what} is a tf_keras class Keras 3 does not have; replace it (e.g. GRU for "
            "CuDNNGRU) or pass --keras_format=tf_keras"
        )
    raise ModelError(
        f"{what} is a Keras 3 class that tf_keras 2.15 does not have, so the bridge cannot "
        "build it; rebuild the model without it"
    )


def _tf_keras_object(cls: str, registered: bool = False):
    """The tf_keras built-in class ``cls`` (or, with ``registered``, a registered one) or None."""
    for namespace in _NAMESPACES:
        found = getattr(getattr(tf_keras, namespace), cls, None)
        if isinstance(found, type):
            return found
    return tf_keras.saving.get_registered_object(cls) if registered else None


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def to_keras3(src: str, dst: str, *, unsafe_deserialization: bool = False) -> ModelFile:
    """Writes ``dst`` (``.keras`` or ``.h5``): the tf_keras model file ``src`` for Keras 3.

    The file loads in Keras 3 with ``keras.saving.load_model(dst)``: no custom objects, no
    project code. Weights are copied as they are (bit-identical); optimizer state and the
    compile settings are not carried. A Keras 3 ``src`` is copied unchanged.

    Returns:
        The :class:`ModelFile` written.

    Raises:
        ModelError: ``src`` holds code (see :func:`check_safe`) or a class Keras 3 lacks.
    """
    source = file_format(src)
    if not unsafe_deserialization:
        check_safe(source.config, src)
    if source.major == 3:
        _atomic_write(dst, lambda tmp: _copy(src, tmp))
        return file_format(dst)
    shapes = _tensor_shapes(source, unsafe_deserialization)
    config = config_to_keras3(source.config, shapes)
    _write(source, dst, config, KERAS3_VERSION, to_keras3=True)
    return file_format(dst)


def from_keras3(src: str, dst: str, *, unsafe_deserialization: bool = False) -> ModelFile:
    """Writes ``dst`` (``.keras`` or ``.h5``): the Keras 3 model file ``src`` for tf_keras.

    A tf_keras ``src`` is copied unchanged. Weights are copied as they are (bit-identical).

    Raises:
        ModelError: ``src`` holds code, or a class or form tf_keras 2.15 does not have.
    """
    source = file_format(src)
    if not unsafe_deserialization:
        check_safe(source.config, src)
    if source.major == 2:
        _atomic_write(dst, lambda tmp: _copy(src, tmp))
        return file_format(dst)
    config = config_from_keras3(source.config)
    _write(source, dst, config, tf_keras.__version__, to_keras3=False)
    return file_format(dst)


def load_model(path: str, *, unsafe_deserialization: bool = False) -> tf_keras.Model:
    """A tf_keras model (uncompiled) from a Keras 2 or Keras 3 ``.keras``/``.h5`` file.

    The config is read and checked before anything is built (:func:`check_safe`).

    Raises:
        ModelError: One line: code in the file, a class tf_keras lacks, an unreadable file.
    """
    source = file_format(path)
    if not unsafe_deserialization:
        check_safe(source.config, path)
    if source.major == 2 and source.container == "h5":
        return _load_tf_keras(path, path, unsafe_deserialization)  # looked up in tf_keras
    config = config_from_keras3(source.config) if source.major == 3 else source.config
    suffix = ".keras" if source.container == "keras" else ".h5"
    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, "model" + suffix)
        _write(source, local, _pinned_to_tf_keras(config), tf_keras.__version__, False)
        return _load_tf_keras(local, path, unsafe_deserialization)


def _pinned_to_tf_keras(value):
    """A config whose ``keras.*`` modules are named ``tf_keras.*``.

    tf_keras resolves ``keras.layers.Dense`` through TensorFlow's export table, which the
    ``keras`` 2.15 package overwrites with its own classes once it has been imported (a user's
    builder may have); a ``tf_keras.*`` module is imported directly.
    """
    if isinstance(value, list):
        return [_pinned_to_tf_keras(item) for item in value]
    if not isinstance(value, dict):
        return value
    copy_ = {key: _pinned_to_tf_keras(item) for key, item in value.items()}
    module = copy_.get("module")
    if isinstance(module, str) and (module == "keras" or module.startswith("keras.")):
        copy_["module"] = "tf_" + module
    return copy_


def _load_tf_keras(local: str, shown: str, unsafe: bool) -> tf_keras.Model:
    try:
        if local.endswith(".keras"):
            return tf_keras.models.load_model(local, compile=False, safe_mode=not unsafe)
        return tf_keras.models.load_model(local, compile=False)
    except ModelError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever Keras raises about the config
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        text = text.split(" Full object config:", 1)[0].split("config={", 1)[0]
        raise ModelError(
            f"cannot load the model file {shown} ({type(error).__name__}: {text[:300]})"
        ) from None


def to_keras3_model(model: tf_keras.Model, dst: str) -> ModelFile:
    """Saves a tf_keras model straight to a Keras 3 file ``dst`` (``.keras`` or ``.h5``)."""
    suffix = ".keras" if dst.endswith(".keras") else ".h5"
    with tempfile.TemporaryDirectory() as folder:
        local = os.path.join(folder, "model" + suffix)
        model.save(local)
        source = file_format(local)
        check_safe(source.config, dst)
        config = config_to_keras3(source.config, _shapes_of(model))
        _write(source, dst, config, KERAS3_VERSION, to_keras3=True)
    return file_format(dst)


def _tensor_shapes(source: ModelFile, unsafe: bool) -> Dict:
    """The tensors' shapes for Keras 3 nodes: the tf_keras model built (no weights)."""
    try:
        model = _from_config(source.config, unsafe)
    except ModelError:
        raise
    except Exception:  # noqa: BLE001 - no shapes: nodes keep the list form Keras 3 reads too
        return {}
    return _shapes_of(model)


def _from_config(config: Mapping[str, Any], unsafe: bool) -> tf_keras.Model:
    if "module" in config:  # .keras style
        with tf_keras.saving.custom_object_scope({}):
            return tf_keras.saving.deserialize_keras_object(dict(config), safe_mode=not unsafe)
    return tf_keras.models.model_from_json(json.dumps(config))


def _shapes_of(model) -> Dict:
    """``{(layer, node, tensor): (shape, dtype)}``, nodes numbered as Keras 3 does.

    Keras 3 numbers only the nodes that belong to the model (a nested model's own construction
    node does not), as tf_keras's ``_network_nodes`` says which do.
    """
    shapes = {}
    kept = getattr(model, "_network_nodes", set())
    for layer in model.layers:
        nodes = [
            node
            for index, node in enumerate(layer._inbound_nodes)
            if f"{layer.name}_ib-{index}" in kept
        ]
        for index, node in enumerate(nodes):
            for tensor_index, tensor in enumerate(tf.nest.flatten(node.outputs)):
                shape = tensor.shape.as_list() if tensor.shape.rank is not None else None
                shapes[(layer.name, index, tensor_index)] = (shape, tensor.dtype.name)
        if isinstance(layer, tf_keras.Model) and getattr(layer, "_is_graph_network", False):
            shapes.update(_shapes_of(layer))
    return shapes


def _write(source: ModelFile, dst: str, config: Dict, version: str, to_keras3: bool) -> None:
    if dst.endswith(".keras") and source.container != "keras":
        raise ModelError(f"{dst}: write a .keras file from a .keras file ({source.path} is .h5)")
    if source.container == "keras":
        _atomic_write(dst, lambda tmp: _write_archive(source.path, tmp, config, version))
    else:
        _atomic_write(dst, lambda tmp: _write_h5(source.path, tmp, config, version, to_keras3))


def _atomic_write(dst: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=os.path.basename(dst) + ".", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _copy(src: str, tmp: str) -> None:
    with open(src, "rb") as source, open(tmp, "wb") as target:
        target.write(source.read())


def _write_archive(src: str, tmp: str, config: Dict, version: str) -> None:
    with zipfile.ZipFile(src) as archive:
        weights = archive.read(WEIGHTS_NAME)
    metadata = {
        "keras_version": version,
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
    }
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(METADATA_NAME, json.dumps(metadata))
        archive.writestr(CONFIG_NAME, json.dumps(config))
        archive.writestr(WEIGHTS_NAME, _model_weights_only(weights))


def _model_weights_only(weights: bytes) -> bytes:
    """``model.weights.h5`` without optimizer and metric state (neither carries across).

    A file without either is kept byte for byte: an h5py copy reorders the file, and Keras
    reads the member through a zip stream where each backward seek rereads it from the start
    (a copied MobileNetV2 loaded 6 times slower).
    """
    with h5py.File(io.BytesIO(weights), "r") as source:
        if not any(key in source for key in ("optimizer", "metrics")):
            return weights
    out = io.BytesIO()
    with h5py.File(io.BytesIO(weights), "r") as source, h5py.File(out, "w") as target:
        for key in source:
            if key not in ("optimizer", "metrics"):
                source.copy(source[key], target, key)
        for key, value in source.attrs.items():
            target.attrs[key] = value
    return out.getvalue()


def _write_h5(src: str, tmp: str, config: Dict, version: str, to_keras3: bool) -> None:
    """A legacy full-model ``.h5``: the config, and the weights under the target's names."""
    depthwise = _layers_of_class(config, ("DepthwiseConv2D", "DepthwiseConv1D"))
    layer_names = set(_layers_of_class(config, None))
    with h5py.File(src, "r") as source, h5py.File(tmp, "w") as target:
        target.attrs["backend"] = "tensorflow"
        target.attrs["keras_version"] = version
        target.attrs["model_config"] = json.dumps(config)
        weights = source["model_weights"]
        group = target.create_group("model_weights")
        group.attrs["backend"] = "tensorflow"
        group.attrs["keras_version"] = version
        names = [_text(n) for n in weights.attrs["layer_names"] if _text(n) in layer_names]
        group.attrs["layer_names"] = np.array([n.encode() for n in names])
        for name in names:
            layer = group.create_group(name)
            weight_names = [_text(w) for w in weights[name].attrs.get("weight_names", [])]
            new_names = [_weight_name(w, name in depthwise, to_keras3) for w in weight_names]
            layer.attrs["weight_names"] = np.array([w.encode() for w in new_names])
            for old, new in zip(weight_names, new_names):
                layer.create_dataset(new, data=weights[name][old][()])


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _weight_name(name: str, depthwise: bool, to_keras3: bool) -> str:
    """``conv/kernel:0`` (tf_keras) <-> ``conv/kernel`` (Keras 3); depthwise kernels renamed."""
    head, _, last = name.rpartition("/")
    if to_keras3:
        last = last[:-2] if last.endswith(":0") else last
        last = "kernel" if depthwise and last == "depthwise_kernel" else last
    else:
        last = "depthwise_kernel" if depthwise and last == "kernel" else last
        last = last if ":" in last else last + ":0"
    return f"{head}/{last}" if head else last


def _layers_of_class(config: Mapping[str, Any], classes) -> Dict[str, str]:
    """The model's top-level layer names (of ``classes``, or all) -> class name."""
    return {
        layer["config"]["name"]: layer["class_name"]
        for layer in config.get("config", {}).get("layers", [])
        if classes is None or layer.get("class_name") in classes
    }
