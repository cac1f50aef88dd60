"""Fast in-process serving of an exported SavedModel, with TensorFlow alone.

``jobs.export`` writes a TF1-style SavedModel (the TF Serving layout). TensorFlow 2's
``tf.saved_model.load(path).signatures[key](image=...)`` serves it, but slowly: on TF 2.15 every
call first tries to bind its arguments to the signature's structured type, which a TF1 signature
does not have, and the ``TypeError`` it builds (then discards) formats the whole input tensor as
text; that was 9 of the cnn's 14 ms per batch-1 call (README, "Export and serving"). This module
loads the same SavedModel the way TF Serving does, into a ``Session``, folds the variables into
constants (so oneDNN keeps its reordered weights between calls) and runs one
``Session.make_callable`` per signature. Small batches of a raw-image signature can go through the
same frozen graph compiled by XLA instead (the whole network as one program, no per-op dispatch:
the recurrent networks' 28-step loops ran 2-3x faster at batch 1), padded to a power of two so at
most a handful of shapes compile. Whether XLA serves small batches is decided at load by timing
both at batch 1 (XLA was slower for the cnn, whose convolutions and 12.8 MB dense layer oneDNN
runs faster); large batches stay on the Session (README, "Serving speed").

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

import contextlib
import itertools
import os
import sys
import time
from typing import Dict, List, Optional, Union

# TensorFlow prints about 14 lines of C++ start-up notices when it is first imported (CUDA,
# cuDNN, cuFFT, cuBLAS and TensorRT registration on a machine without a GPU, a CPU banner): hidden
# unless the user chose a level, and only if TensorFlow is not imported yet (else it is too late).
if "tensorflow" not in sys.modules:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2

SERVE_TAG = "serve"
# Batches up to this size may go through XLA (see the module docstring).
XLA_MAX_BATCH = 32
_TIMED_CALLS = 15  # batch-1 calls timed per path when xla="auto" (after a warm-up call each)


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
        """Times both paths on batch-1 zeros (the median of a few calls each)."""
        values = [
            np.zeros([1, *[d or 1 for d in shape[1:]]], dtype)
            for dtype, shape in self.inputs.values()
        ]
        timings = []
        for run in (lambda: self._run(*values), lambda: self._xla(values)):
            try:
                run()  # compiles (XLA) or optimises (Session) once
            except tf.errors.OpError:  # A graph XLA cannot compile.
                return False
            times = []
            for _ in range(_TIMED_CALLS):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            timings.append(np.median(times))
        return timings[1] < timings[0]

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


def load(
    path: str,
    signature_key: str = "serving_default",
    freeze: bool = True,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    xla: Union[bool, str] = "auto",
    xla_max_batch: int = XLA_MAX_BATCH,
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
        xla: Whether batches of raw images up to ``xla_max_batch`` run as an XLA-compiled
            program of the frozen graph: ``"auto"`` (time both paths at batch 1 during the load,
            keep the faster), ``True`` or ``False``. Each power of two up to ``xla_max_batch``
            compiles on first use (0.5-1.5 s each here). Not for ``tf.Example`` signatures.
        xla_max_batch: The largest batch XLA may serve; larger ones run on the Session.

    Returns:
        A :class:`ServedModel`: ``model(image=batch)`` -> ``{"classes": ..., ...}``.
    """
    return ServedModel(
        latest_version(path) or path,
        signature_key,
        freeze,
        intra_op_threads,
        inter_op_threads,
        xla,
        xla_max_batch,
    )


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
