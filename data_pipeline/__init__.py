"""Image data pipeline: source files -> sharded TFRecords + schema -> tf.data input pipeline.

Public API:
    prepare: The whole ``--mode=prepare`` job (a source streamed into shards +
        ``dataset_spec.json``, resumable).
    load_spec / DatasetSpec: The validated schema of a prepared folder (image shape, class
        names, shards; ``spec.record_files(split)`` names each record's source file).
    make_dataset / make_input_fn: The tf.data pipeline and its Estimator ``input_fn``.
    parse_serialized / encode_example: The record format, for serving receivers and clients.
    open_source / DataSource: A streamed source (IDX files, a Keras-layout ``.npz``, an image
        folder ``SRC/train/<class>/*.png``).
    load_source / Source / read_idx: A source read into memory (MNIST and other small data).
    check_shards / translate_errors: Verifying shards and naming the bad file on read errors.
    DataError: The single error type for bad data; ``str()`` is one line with the fix.
    DiskFullError / translate_disk_full / disk_full_error / atomic_output: a full disk or quota
        met by any writer (TensorFlow, h5py, Python, Beam) as one error, and files written
        under temporary names a failure removes; for every job, not only ``prepare``.
"""

import os
import sys

# TensorFlow prints about 14 lines of C++ start-up notices when it is first imported (CUDA,
# cuDNN, cuFFT, cuBLAS and TensorRT registration on a machine without a GPU, a CPU banner): hidden
# unless the user chose a level, and only if TensorFlow is not imported yet (else it is too late).
if "tensorflow" not in sys.modules:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from data_pipeline.checks import check_shards, to_data_error, translate_errors
from data_pipeline.diskfull import (
    DiskFullError,
    atomic_output,
    disk_full_error,
    translate_disk_full,
)
from data_pipeline.errors import DataError
from data_pipeline.reader import make_dataset, make_input_fn, parse_serialized
from data_pipeline.sources import DataSource, Source, load_source, open_source, read_idx
from data_pipeline.spec import DatasetSpec, FeatureSpec, encode_example, load_spec
from data_pipeline.writer import prepare

__all__ = [
    "DataError",
    "DataSource",
    "DiskFullError",
    "atomic_output",
    "disk_full_error",
    "translate_disk_full",
    "DatasetSpec",
    "FeatureSpec",
    "Source",
    "check_shards",
    "encode_example",
    "load_source",
    "load_spec",
    "make_dataset",
    "make_input_fn",
    "open_source",
    "parse_serialized",
    "prepare",
    "read_idx",
    "to_data_error",
    "translate_errors",
]
