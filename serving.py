"""Fast in-process serving of an export, on the fastest engine installed.

``jobs.export`` writes a TF1-style SavedModel (the TF Serving layout) and, with the ``onnx``
extra installed, the same predict graph as ``model.onnx`` in the version folder
(``onnx_export``). :func:`load` picks the engine when it loads (docs/serving.md):

* ``"onnxruntime"``: the ONNX file on onnxruntime, for the raw-image signatures
  (``serving_default``, ``predict``) when the file is there and onnxruntime imports.
* ``"tensorflow"``: the SavedModel, always available and the only engine for the ``tf.Example``
  signatures. It loads the SavedModel the way TF Serving does, into a ``Session``, folds the
  variables into constants (so oneDNN keeps its reordered weights between calls) and runs one
  ``Session.make_callable`` per signature. Small batches of a raw-image signature can go through
  the same frozen graph compiled by XLA instead, padded to a power of two so at most a handful of
  shapes compile; whether XLA serves them is decided at load by timing both at batch 1.

When both can serve, :func:`load` loads both and times each at batch 1 the same way, keeping the
faster at batch 1, then on one large batch: if the other engine is clearly faster there, both
stay loaded and large batches go to it (:class:`RoutedModel`). Which wins depends on the
network, the CPU and the machine's load (docs/serving.md). ``engine=`` forces one without
timing; ``model.engine`` says which serves batch 1, ``model.large_batch_engine`` and
``model.large_batch_from`` which serves large batches and from what size,
``model.engine_timings`` what the timing found, and the ``serving`` logger says so at INFO
level. Calls are thread-safe on both engines. The module imports neither
``tensorflow_estimator`` nor anything else of this project, and onnxruntime only when it is
used, so it loads where only TensorFlow is installed, newer versions included::

    import serving

    model = serving.load("exports/cnn/1795760585")       # a SavedModel version folder
    model.engine                                         # "onnxruntime" or "tensorflow"
    out = model(image=images)                            # float32 [N, 28, 28, 1] in [0, 1]
    out["probabilities"], out["classes"]                 # numpy arrays
    by_example = serving.load(path, "examples:serving_default")
    by_example(examples=[serialized_tf_example, ...])
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Union

# TensorFlow prints about 14 lines of C++ start-up notices when it is first imported (CUDA,
# cuDNN, cuFFT, cuBLAS and TensorRT registration on a machine without a GPU, a CPU banner): hidden
# unless the user chose a level, and only if TensorFlow is not imported yet (else it is too late).
if "tensorflow" not in sys.modules:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from tensorflow.core.protobuf import saved_model_pb2

SERVE_TAG = "serve"
ENGINES = ("onnxruntime", "tensorflow")
# The signatures the ONNX file serves (raw images in); the tf.Example ones need TensorFlow.
ONNX_SIGNATURES = ("serving_default", "predict")
# Kept in step with onnx_export (not imported: it is not needed where only TensorFlow is).
ONNX_FILE = "model.onnx"
_log = logging.getLogger(__name__)
# Batches up to this size may go through XLA (see the module docstring).
XLA_MAX_BATCH = 32
# Timing at load (xla="auto", engine="auto"; _call_seconds): _WARMUP_CALLS untimed calls of
# each candidate, then _BLOCKS turns each of one untimed and up to _BLOCK_CALLS timed calls
# (fewer once _BLOCK_BUDGET_S has passed), so a slow network's timing stays near a second or two.
_WARMUP_CALLS = 1
_BLOCKS = 3
_BLOCK_CALLS = 5
_BLOCK_BUDGET_S = 0.2
# Before each turn of timed calls, a pause that lets the engine timed last go idle: onnxruntime's
# and TensorFlow's pool threads spin for a while after a call and would slow the next engine's
# calls, which a server running that engine alone never sees.
_SETTLE_S = 0.01
# engine="auto" keeps the first engine of available_engines unless another one's batch-1 median
# is this much lower: a few percent apart is the noise of a dozen calls on a shared machine.
_ENGINE_MARGIN = 0.9
# engine="auto" also times the engines on one large batch of zeros: LARGE_BATCH examples, fewer
# (a power of two) when they would hold more than _LARGE_BATCH_BYTES of input (MNIST: 512;
# 224x224x3 images: 4), 1 untimed and 3 timed calls each. An engine whose time there is below
# _LARGE_MARGIN times the batch-1 choice's serves batches from the size where the two engines'
# straight lines through their batch-1 and large-batch times cross. 3 large calls are noisier
# than the batch-1 timing (the quiet birnn's engines, within 10 % at batch 512, were routed).
LARGE_BATCH = 512
_LARGE_BATCH_BYTES = 4 << 20
_LARGE_MARGIN = 0.8


class ServedModel:
    """One signature of a SavedModel, callable with numpy arrays; returns numpy arrays.

    Attributes:
        path: The SavedModel folder.
        signature_key: The signature served.
        engine: ``"tensorflow"``.
        engine_timings: Engine -> batch-1 time in ms, as timed by :func:`load` (or empty).
        large_batch_engine: ``None``: this engine serves every batch (see :class:`RoutedModel`).
        large_batch_from: ``None``.
        inputs: Input key -> ``(dtype, shape)`` of the signature (``None`` for unknown sizes).
        outputs: The output keys, in the order they are returned.
    """

    engine = "tensorflow"
    large_batch_engine: Optional[str] = None
    large_batch_from: Optional[int] = None

    def __init__(
        self,
        path: str,
        signature_key: str = "serving_default",
        freeze: bool = True,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        xla: Union[bool, str] = "auto",
        xla_max_batch: int = XLA_MAX_BATCH,
    ):
        # The TF1 loader and the freezing log deprecation notices; this is their intended use.
        with _python_log_level("ERROR"):
            self.path = path
            self.signature_key = signature_key
            config = tf.compat.v1.ConfigProto(
                intra_op_parallelism_threads=intra_op_threads,
                inter_op_parallelism_threads=inter_op_threads,
            )
            rewrite = config.graph_options.rewrite_options
            if "disable_tfg_optimizer" in rewrite.DESCRIPTOR.fields_by_name:
                # Grappler's MLIR pass changes nothing but takes time on each new graph.
                rewrite.disable_tfg_optimizer = True
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
            numeric = all(np.dtype(dtype).kind in "fiub" for dtype, _ in self.inputs.values())
            self._xla = None
            if xla and freeze and xla_max_batch > 0 and numeric and tf.executing_eagerly():
                strings = [
                    n for n in output_names if graph.get_tensor_by_name(n).dtype == tf.string
                ]
                self._xla = _XlaProgram(
                    graph_def, input_names, output_names, xla_max_batch, strings
                )
                if xla == "auto" and not self._xla_is_faster():
                    self._xla = None

    @property
    def xla(self) -> bool:
        """Whether batches up to ``xla_max_batch`` run as an XLA program (else the Session)."""
        return self._xla is not None

    def _xla_is_faster(self) -> bool:
        """Times both paths on batch-1 zeros (:func:`_call_seconds`)."""
        values = list(_batch1_zeros(self.inputs).values())
        try:
            session, xla = _call_seconds([lambda: self._run(*values), lambda: self._xla(values)])
        except tf.errors.OpError:  # A graph XLA cannot compile.
            return False
        return xla < session

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
        if self._xla is not None and 0 < len(values[0]) <= self._xla.max_batch:
            try:
                return dict(zip(self.outputs, self._xla(values)))
            except tf.errors.OpError:  # A graph XLA cannot compile: the Session from now on.
                self._xla = None
        return dict(zip(self.outputs, self._run(*values)))

    def close(self) -> None:
        """Releases the session."""
        self._session.close()

    def __enter__(self) -> ServedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _python_log_level(level: str):
    """Sets TensorFlow's Python logger to ``level`` for the ``with`` block."""
    logger = tf.get_logger()
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _batch1_zeros(inputs: Dict[str, tuple], size: int = 1) -> Dict[str, np.ndarray]:
    """A batch of ``size`` zero inputs per key of a model's ``inputs`` (unknown sizes become 1)."""
    return {
        key: np.zeros([size, *[d or 1 for d in shape[1:]]], dtype)
        for key, (dtype, shape) in inputs.items()
    }


def _large_batch(inputs: Dict[str, tuple]) -> int:
    """The batch size :func:`load` times large batches at (see ``LARGE_BATCH``)."""
    example = sum(array.nbytes for array in _batch1_zeros(inputs).values())
    fits = max(1, min(LARGE_BATCH, _LARGE_BATCH_BYTES // max(example, 1)))
    return 1 << (fits.bit_length() - 1)


def _call_seconds(runs: Sequence[Callable[[], object]], large: bool = False) -> List[float]:
    """The median time of a call of each of ``runs``, for comparing them.

    Each run is called ``_WARMUP_CALLS`` times untimed first (the first call compiles, optimises
    and allocates). Then the runs take turns, ``_BLOCKS`` times, each turn after a pause of
    ``_SETTLE_S`` (the previous run's spinning pool threads go idle, so each run is timed as
    if it were alone in the process) one untimed call and up to ``_BLOCK_CALLS`` timed ones, at
    least two, fewer once ``_BLOCK_BUDGET_S`` has passed; with ``large`` (slow calls), one timed
    call a turn and no untimed one. A run's time is the median of all its timed calls. Taking
    turns spreads a change in the machine's load over all runs, and the median leaves out a
    burst that hits a few calls; a slowdown that lasts (an engine whose threads wait on each
    other while other processes hold the cores) counts. An error in a run propagates.
    """
    for run in runs:
        for _ in range(_WARMUP_CALLS):
            run()
    times: List[List[float]] = [[] for _ in runs]
    for _ in range(_BLOCKS):
        for run, found in zip(runs, times):
            time.sleep(_SETTLE_S)
            if not large:
                run()
            spent = 0.0
            for call in range(1 if large else _BLOCK_CALLS):
                if call >= 2 and spent > _BLOCK_BUDGET_S:
                    break
                start = time.perf_counter()
                run()
                found.append(time.perf_counter() - start)
                spent += found[-1]
    return [float(np.median(found)) for found in times]


_PROGRAMS = itertools.count()


def _rename_functions(graph_def, suffix: str) -> None:
    """Adds ``suffix`` to the name of every function in ``graph_def`` and to each use of it.

    Importing a graph in eager mode registers its functions (e.g. a dropout ``cond``'s branches)
    process-wide by name; two exports with a same-named but different function would collide.
    """
    names = {function.signature.name for function in graph_def.library.function}
    if not names:
        return

    def rename_attrs(attrs):
        for value in attrs.values():
            if value.HasField("func") and value.func.name in names:
                value.func.name += suffix
            for func in value.list.func:
                if func.name in names:
                    func.name += suffix

    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        function.signature.name += suffix
        nodes.extend(function.node_def)
    for gradient in graph_def.library.gradient:
        if gradient.function_name in names:
            gradient.function_name += suffix
        if gradient.gradient_func in names:
            gradient.gradient_func += suffix
    for node in nodes:
        if node.op in names:
            node.op += suffix
        rename_attrs(node.attr)


class _XlaProgram:
    """The frozen signature as one XLA program per power-of-two batch size up to ``max_batch``.

    The fed tensors become plain placeholders, so what only feeds their defaults (the
    ``tf.Example`` parse behind ``image``'s ``placeholder_with_default``) is pruned away. XLA
    computes no strings: string outputs are computed after it from its numeric outputs, in
    numpy when they look a numeric output up in a constant (``class_names``: the names gathered
    by ``classes``; a second TensorFlow call would add a tenth of a millisecond or more to a
    batch-1 call), else by plain TensorFlow.
    """

    def __init__(self, graph_def, input_names, output_names, max_batch, strings=()):
        self.max_batch = max_batch
        numeric = [name for name in output_names if name not in strings]
        pruned = graph_pb2.GraphDef()
        pruned.CopyFrom(graph_def)
        fed = {name.split(":")[0] for name in input_names}
        for node in pruned.node:
            if node.name in fed:
                dtype, shape = node.attr["dtype"], node.attr["shape"]
                node.op = "Placeholder"
                del node.input[:]
                node.attr.clear()
                node.attr["dtype"].CopyFrom(dtype)
                node.attr["shape"].CopyFrom(shape)
        pruned = tf.compat.v1.graph_util.extract_sub_graph(
            pruned, sorted({name.split(":")[0] for name in output_names})
        )
        _rename_functions(pruned, f"_served{next(_PROGRAMS)}")

        def program(feeds, fetches):
            def imported(*inputs):
                return tf.compat.v1.import_graph_def(
                    pruned, input_map=dict(zip(feeds, inputs)), return_elements=fetches, name=""
                )

            specs = [tf.TensorSpec(*_shape_and_dtype(pruned, name)) for name in feeds]
            wrapped = tf.compat.v1.wrap_function(imported, specs)
            return wrapped.prune(feeds=wrapped.inputs, fetches=wrapped.outputs)

        network = program(list(input_names), numeric)
        self._function = tf.function(lambda *inputs: network(*inputs), jit_compile=True)
        tables = {name: _lookup(pruned, name, numeric) for name in strings}
        rest = [name for name in strings if tables[name] is None]
        self._strings = program(numeric, rest) if rest else None
        # Where each output comes from: ("n", i) numeric output i; ("t", (i, table)) a lookup of
        # numeric output i; ("s", i) output i of the string program.
        self._order = []
        for name in output_names:
            if name in numeric:
                self._order.append(("n", numeric.index(name)))
            elif tables[name] is not None:
                self._order.append(("t", tables[name]))
            else:
                self._order.append(("s", rest.index(name)))

    def __call__(self, values):
        size = len(values[0])
        padded = 1 << (size - 1).bit_length()  # 1, 2, 4, 8, ...: few shapes to compile
        if padded != size:
            values = [np.concatenate([v, np.repeat(v[-1:], padded - size, 0)]) for v in values]
        numeric = [output.numpy()[:size] for output in self._function(*values)]
        strings = []
        if self._strings is not None:
            strings = [s.numpy() for s in self._strings(*map(tf.constant, numeric))]
        out = []
        for kind, where in self._order:
            if kind == "t":
                out.append(where[1][numeric[where[0]]])
            else:
                out.append((numeric if kind == "n" else strings)[where])
        return out


def _lookup(graph_def, name: str, numeric: List[str]):
    """``(numeric output index, table)`` if output ``name`` gathers a constant by that output."""
    nodes = {node.name: node for node in graph_def.node}
    node = nodes.get(name.split(":")[0])
    if node is None or node.op != "GatherV2" or len(node.input) != 3:
        return None
    table, index, axis = (nodes.get(i.split(":")[0]) for i in node.input)
    wanted = {n if ":" in n else f"{n}:0" for n in node.input[1:2]}
    if not (table and axis and table.op == axis.op == "Const") or index is None:
        return None
    if tf.make_ndarray(axis.attr["value"].tensor) != 0 or not wanted & set(numeric):
        return None
    values = tf.make_ndarray(table.attr["value"].tensor)
    return numeric.index(next(iter(wanted))), np.asarray(values, dtype=object)


def _shape_and_dtype(graph_def, tensor_name: str):
    """``(shape, dtype)`` of a placeholder, or of an output of any node, in a GraphDef."""
    node = next(n for n in graph_def.node if n.name == tensor_name.split(":")[0])
    if node.op == "Placeholder":
        return tf.TensorShape(node.attr["shape"].shape), node.attr["dtype"].type
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    tensor = graph.get_tensor_by_name(tensor_name)
    return tensor.shape, tensor.dtype


class OnnxModel:
    """A raw-image signature served from the export's ``model.onnx`` on onnxruntime.

    Called like :class:`ServedModel`, with the same inputs and outputs as the SavedModel's
    signature. The call adds almost nothing to onnxruntime's own: the output names are bound at
    load, the input is passed on as it is when it is already a C-contiguous float32 array, and
    the session's C++ ``run`` is called directly (``InferenceSession.run`` re-checks the feed in
    Python on every call; this class checks the input key itself). onnxruntime sessions may be
    called from several threads at once.

    Attributes:
        path: The SavedModel version folder.
        onnx_path: The ONNX file.
        signature_key: The signature served.
        engine: ``"onnxruntime"``.
        engine_timings: Engine -> batch-1 time in ms, as timed by :func:`load` (or empty).
        large_batch_engine: ``None``: this engine serves every batch (see :class:`RoutedModel`).
        large_batch_from: ``None``.
        inputs: ``{"image": (np.float32, shape)}`` (``None`` for unknown sizes).
        outputs: The output keys, in the order they are returned.
        class_names: The dataset's class names by class index, from the file's metadata.
    """

    engine = "onnxruntime"
    large_batch_engine: Optional[str] = None
    large_batch_from: Optional[int] = None

    def __init__(
        self,
        path: str,
        signature_key: str = "serving_default",
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
    ):
        import onnxruntime

        self.path = path
        self.onnx_path = os.path.join(path, ONNX_FILE)
        self.signature_key = signature_key
        signature_outputs = _signature_outputs(path, signature_key)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        session = onnxruntime.InferenceSession(
            self.onnx_path, options, providers=["CPUExecutionProvider"]
        )
        metadata = session.get_modelmeta().custom_metadata_map
        names = metadata.get("class_names")
        # As bytes in an object array, the form TensorFlow gives string outputs in.
        self.class_names = (
            None if names is None else np.array([n.encode() for n in json.loads(names)], object)
        )
        (image,) = session.get_inputs()
        self._input = image.name
        self.inputs: Dict[str, tuple] = {
            "image": (np.float32, tuple(d if isinstance(d, int) else None for d in image.shape))
        }
        self.outputs: List[str] = signature_outputs
        available = {output.name for output in session.get_outputs()}
        self._names = [key for key in signature_outputs if key in available]
        # String outputs (class names) are not in the ONNX graph: looked up from the metadata.
        self._looked_up = [key for key in signature_outputs if key not in available]
        if self._looked_up and (self.class_names is None or "classes" not in self._names):
            raise ValueError(f"{self.onnx_path} lacks the outputs {', '.join(self._looked_up)}")
        self._session = session
        self._run = getattr(session, "_sess", session).run

    def __call__(self, *args, **kwargs) -> Dict[str, np.ndarray]:
        """Runs the signature: ``model(images)`` or ``model(image=images)`` -> outputs by key."""
        if args:
            if len(args) != 1 or kwargs:
                raise TypeError(
                    f"pass the inputs by name: image (signature {self.signature_key!r})"
                )
            images = args[0]
        elif len(kwargs) == 1 and "image" in kwargs:
            images = kwargs["image"]
        else:
            raise TypeError(
                f"signature {self.signature_key!r} takes image, "
                f"got {', '.join(sorted(kwargs)) or 'nothing'}"
            )
        if not (type(images) is np.ndarray and images.dtype == np.float32):
            images = np.asarray(images, dtype=np.float32)
        if not images.flags.c_contiguous:
            images = np.ascontiguousarray(images)
        out = dict(zip(self._names, self._run(self._names, {self._input: images}, None)))
        for key in self._looked_up:
            out[key] = self.class_names[out["classes"]]
        return out

    def close(self) -> None:
        """Releases the session (onnxruntime frees it with the object)."""
        self._session = self._run = None

    def __enter__(self) -> OnnxModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _signature_outputs(path: str, signature_key: str) -> List[str]:
    """The output keys of a signature, read from ``saved_model.pb`` (sorted, as TensorFlow's)."""
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as handle:
        saved_model.ParseFromString(handle.read())
    for meta_graph in saved_model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            signatures = meta_graph.signature_def
            if signature_key not in signatures:
                raise KeyError(
                    f"{path} has no signature {signature_key!r}; it has: "
                    + ", ".join(sorted(signatures))
                )
            return sorted(signatures[signature_key].outputs)
    raise KeyError(f"{path} has no {SERVE_TAG!r} graph")


class RoutedModel:
    """Two engines loaded for one signature, each serving the batch sizes it was faster at.

    :func:`load` returns one when the engine faster at batch 1 (``engine``) was clearly slower
    on a large batch: batches of ``large_batch_from`` examples or more go to
    ``large_batch_engine``. Called like either engine; other attributes are the batch-1
    engine's. Both engines are thread-safe, and so is the routing (it keeps no state).

    Attributes:
        engine: The engine serving batches below ``large_batch_from``.
        engine_timings: Engine -> batch-1 time in ms, as timed by :func:`load`.
        large_batch_engine: The engine serving batches from ``large_batch_from``.
        large_batch_from: The smallest batch ``large_batch_engine`` serves.
        large_batch_size: The batch size the engines were timed at for large batches.
        large_batch_timings: Engine -> the time of one call at ``large_batch_size``, in ms.
    """

    def __init__(self, small, large, large_batch_from: int, size: int, timings: Dict[str, float]):
        self._small, self._large = small, large
        self.engine = small.engine
        self.large_batch_engine = large.engine
        self.large_batch_from = large_batch_from
        self.large_batch_size = size
        self.large_batch_timings = timings

    def __getattr__(self, name):
        # Only for what this class does not set itself: path, inputs, outputs, class_names, ...
        if "_small" not in self.__dict__:  # e.g. copy's probe of a bare instance
            raise AttributeError(name)
        return getattr(self.__dict__["_small"], name)

    def __call__(self, *args, **kwargs) -> Dict[str, np.ndarray]:
        """Runs the signature on the engine for this batch size (:class:`ServedModel`)."""
        batch = args[0] if args else next(iter(kwargs.values()), None)
        size = len(batch) if hasattr(batch, "__len__") else 0
        model = self._large if size >= self.large_batch_from else self._small
        return model(*args, **kwargs)

    def close(self) -> None:
        """Releases both engines."""
        self._small.close()
        self._large.close()

    def __enter__(self) -> RoutedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def available_engines(path: str, signature_key: str = "serving_default") -> List[str]:
    """The engines that can serve ``signature_key`` of the export at ``path``.

    In :func:`load`'s order of preference: the first is kept unless another is clearly faster.
    """
    path = latest_version(path) or path
    engines = []
    if signature_key in ONNX_SIGNATURES and os.path.exists(os.path.join(path, ONNX_FILE)):
        try:
            import onnxruntime  # noqa: F401 - only whether it imports
        except ImportError:
            pass
        else:
            engines.append("onnxruntime")
    return engines + ["tensorflow"]


def load(
    path: str,
    signature_key: str = "serving_default",
    freeze: bool = True,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    xla: Union[bool, str] = "auto",
    xla_max_batch: int = XLA_MAX_BATCH,
    engine: str = "auto",
) -> Union[OnnxModel, ServedModel]:
    """Loads one signature of an export for fast in-process serving, on the fastest engine.

    Args:
        path: A SavedModel version folder (``EXPORT_DIR/<timestamp>``), or an export folder
            holding numeric versions, in which case the newest is served.
        signature_key: ``serving_default`` (raw images), ``predict`` (adds the logits),
            ``examples:serving_default``, ``examples:predict`` or ``examples:classification``.
        freeze: TensorFlow engine: fold the variables into constants at load (faster; the same
            probabilities).
        intra_op_threads: Threads per op (0: the engine decides, one per core).
        inter_op_threads: Ops run at once (0: the engine decides).
        xla: TensorFlow engine: whether batches of raw images up to ``xla_max_batch`` run as an
            XLA-compiled program of the frozen graph: ``"auto"`` (time both paths at batch 1
            during the load, keep the faster), ``True`` or ``False``. Each power of two up to
            ``xla_max_batch`` compiles on first use (0.5-1.5 s each). Not for ``tf.Example``
            signatures.
        xla_max_batch: The largest batch XLA may serve; larger ones run on the Session.
        engine: ``"auto"``: the faster of the engines that can serve (:func:`available_engines`),
            timed at load on batch-1 zeros of the export's input shape (the median of up to 15
            calls each, in 3 turns alternating between the engines); the first listed,
            onnxruntime, is kept unless another is 10 % faster. Then both are timed on one
            large batch (up to ``LARGE_BATCH`` examples and 4 MiB of input, 3 timed calls
            each); if the other engine is 20 % faster there, both stay loaded and large
            batches go to it (:class:`RoutedModel`). Or ``"onnxruntime"`` or
            ``"tensorflow"``, forced without timing.

    Returns:
        An :class:`OnnxModel`, a :class:`ServedModel` or a :class:`RoutedModel`:
        ``model(image=batch)`` -> ``{"classes": ..., ...}``. ``.engine`` says which engine
        serves batch 1, ``.large_batch_engine`` and ``.large_batch_from`` which serves large
        batches and from what size (``None``: ``.engine`` serves all); ``.engine_timings``
        maps each engine timed at load to its batch-1 time in milliseconds (empty when one
        engine was forced or only one could serve).

    Raises:
        ValueError: An unknown engine, or one that cannot serve this export or signature.
    """
    path = latest_version(path) or path
    choices = available_engines(path, signature_key)
    if engine == "auto":
        candidates = choices
    elif engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose from auto, {', '.join(ENGINES)}")
    elif engine not in choices:
        raise ValueError(
            f"engine {engine!r} cannot serve {signature_key!r} of {path} (it needs "
            f"{ONNX_FILE} in the export, the onnx extra installed and a raw-image signature)"
        )
    else:
        candidates = [engine]

    def build(name: str) -> Union[OnnxModel, ServedModel]:
        if name == "onnxruntime":
            return OnnxModel(path, signature_key, intra_op_threads, inter_op_threads)
        return ServedModel(
            path, signature_key, freeze, intra_op_threads, inter_op_threads, xla, xla_max_batch
        )

    if len(candidates) == 1:
        model = build(candidates[0])
        model.engine_timings = {}
    else:
        model = _fastest(candidates, build)
    timed = ", ".join(f"{name} {ms:.3g} ms" for name, ms in model.engine_timings.items())
    routed = ""
    if model.large_batch_engine:
        large = ", ".join(f"{n} {ms:.3g} ms" for n, ms in model.large_batch_timings.items())
        routed = (
            f"; batches from {model.large_batch_from} on {model.large_batch_engine} "
            f"(batch-{model.large_batch_size} time: {large})"
        )
    _log.info(
        "serving %s (%s) on %s%s%s",
        path,
        signature_key,
        model.engine,
        f" (batch-1 time at load: {timed})" if timed else "",
        routed,
    )
    return model


def _fastest(
    candidates: List[str], build: Callable[[str], Union[OnnxModel, ServedModel]]
) -> Union[OnnxModel, ServedModel, RoutedModel]:
    """Loads each engine and keeps the fastest at batch 1 and, if another, at large batches.

    (:func:`load`, :func:`_call_seconds`.) An engine other than the last (TensorFlow, the
    fallback) that fails to load or to run is skipped with a warning on the ``serving`` logger.
    """
    models, calls = {}, {}
    for name in candidates:
        model = None
        try:
            model = build(name)
            calls[name] = functools.partial(model, **_batch1_zeros(model.inputs))
            calls[name]()  # fails here, if at all
        except Exception as error:  # noqa: BLE001 - the last engine still serves
            calls.pop(name, None)
            if model is not None:
                model.close()
            if name == candidates[-1]:
                raise
            _log.warning("serving: engine %s skipped: %s: %s", name, type(error).__name__, error)
            continue
        models[name] = model
    seconds = dict(zip(calls, _call_seconds(list(calls.values()))))
    first = next(iter(seconds))
    best = min(seconds, key=seconds.get)
    chosen = best if seconds[best] < _ENGINE_MARGIN * seconds[first] else first
    size = _large_batch(models[chosen].inputs)
    large, big = None, {}
    if len(models) > 1 and size > 1:
        runs = [functools.partial(m, **_batch1_zeros(m.inputs, size)) for m in models.values()]
        big = dict(zip(models, _call_seconds(runs, large=True)))
        fastest = min(big, key=big.get)
        if fastest != chosen and big[fastest] < _LARGE_MARGIN * big[chosen]:
            large = fastest
    for name, model in models.items():
        if name not in (chosen, large):
            model.close()
    model = models[chosen]
    model.engine_timings = {name: 1000 * value for name, value in seconds.items()}
    if large is None:
        return model
    # Where t = a + b * batch through each engine's batch-1 and batch-`size` times cross.
    slope = {n: (big[n] - seconds[n]) / (size - 1) for n in (chosen, large)}
    steeper = slope[chosen] - slope[large]
    cross = (seconds[large] - seconds[chosen]) / steeper + 1 if steeper > 0 else 2
    start = min(max(int(np.ceil(cross)), 2), size)
    timings = {name: 1000 * value for name, value in big.items()}
    routed = RoutedModel(model, models[large], start, size, timings)
    routed.engine_timings = model.engine_timings
    return routed


def latest_version(export_dir: str) -> Optional[str]:
    """The newest numeric version folder under ``export_dir`` (as TF Serving picks), or None.

    ``temp-*`` folders (an export still being written, or killed) are skipped, as TF Serving does.
    """
    if os.path.exists(os.path.join(export_dir, "saved_model.pb")) or not os.path.isdir(export_dir):
        return None
    versions = [
        name
        for name in os.listdir(export_dir)
        if name.isdigit() and os.path.isdir(os.path.join(export_dir, name))
    ]
    if not versions:
        return None
    return os.path.join(export_dir, max(versions, key=int))
