"""MNIST data pipeline: source files -> sharded TFRecords + schema -> tf.data input pipeline.

Public API:
    prepare: The whole ``--mode=prepare`` job (sources -> shards + ``dataset_spec.json``).
    load_spec / DatasetSpec: The validated schema of a prepared folder.
    make_dataset / make_input_fn: The tf.data pipeline and its Estimator ``input_fn``.
    parse_serialized / encode_example: The record format, for serving receivers and clients.
    load_source / Source / read_idx: Finding and reading MNIST (IDX or ``mnist.npz``).
    check_shards / translate_errors: Verifying shards and naming the bad file on read errors.
    DataError: The single error type for bad data; ``str()`` is one line with the fix.
"""

from data_pipeline.checks import check_shards, to_data_error, translate_errors
from data_pipeline.errors import DataError
from data_pipeline.reader import make_dataset, make_input_fn, parse_serialized
from data_pipeline.sources import Source, load_source, read_idx
from data_pipeline.spec import DatasetSpec, FeatureSpec, encode_example, load_spec
from data_pipeline.writer import prepare

__all__ = [
    "DataError",
    "DatasetSpec",
    "FeatureSpec",
    "Source",
    "check_shards",
    "encode_example",
    "load_source",
    "load_spec",
    "make_dataset",
    "make_input_fn",
    "parse_serialized",
    "prepare",
    "read_idx",
    "to_data_error",
    "translate_errors",
]
