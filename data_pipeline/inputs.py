"""New image files to predict: listed from a file, a folder or a glob, decoded as prepare did.

``--mode=predict --inputs=PATH`` classifies images that were never prepared. PATH is one image
file, a folder (searched recursively for the extensions prepare takes, in sorted order) or a
glob pattern (``photos/*.jpg``, ``photos/**/*.png``; sorted). Each file goes through
:func:`data_pipeline.images.load_image`, the function prepare decodes image folders with, with
the channels and resizing the dataset spec records, then becomes float32 in [0, 1] exactly as
the reader turns records into features. So a file gives the same input as its prepared record.

Files are listed lazily (a folder is walked, never held as a list) and decoded in batches by a
tf.data pipeline, so memory does not grow with the number of files. A file that does not
decode, or has a size the spec cannot take, is named by :func:`bad_file_error`.
"""

from __future__ import annotations

import glob
import os
from typing import Iterator, Optional, Sequence

import tensorflow as tf

from data_pipeline.errors import DataError
from data_pipeline.images import IMAGE_EXTENSIONS, MAX_PIXELS, gist, load_failure, load_image
from data_pipeline.spec import DatasetSpec

_GLOB_CHARS = "*?["


def iter_files(inputs: str) -> Iterator[str]:
    """Yields the image files ``inputs`` names, in a fixed (sorted) order.

    Args:
        inputs: An image file (taken whatever its extension), a folder (recursively, files with
            :data:`IMAGE_EXTENSIONS`, case-insensitive) or a glob pattern (``**`` recurses;
            matches with other extensions are skipped).

    Raises:
        DataError: ``inputs`` is neither an existing file or folder nor a glob pattern.
    """
    if os.path.isfile(inputs):
        yield inputs
    elif os.path.isdir(inputs):
        for parent, dirs, names in os.walk(inputs):
            dirs.sort()
            for name in sorted(names):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    yield os.path.join(parent, name)
    elif any(char in inputs for char in _GLOB_CHARS):
        for path in sorted(glob.iglob(inputs, recursive=True)):
            if os.path.isfile(path) and path.lower().endswith(IMAGE_EXTENSIONS):
                yield path
    else:
        raise DataError(
            "--inputs does not exist",
            path=inputs,
            fix="pass an image file, a folder of images or a glob such as 'photos/*.jpg'",
        )


def count_files(inputs: str) -> int:
    """The number of files :func:`iter_files` yields (a listing pass, nothing decoded).

    Raises:
        DataError: Nothing to predict: no image file found.
    """
    count = sum(1 for _ in iter_files(inputs))
    if not count:
        raise DataError(
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found",
            path=inputs,
            fix="pass an image file, a folder of images or a glob such as 'photos/*.jpg'",
        )
    return count


def make_dataset(inputs: str, spec: DatasetSpec, batch_size: int) -> tf.data.Dataset:
    """Batches of ``{"image": float32 [batch, H, W, C] in [0, 1]}`` for the files of ``inputs``.

    In :func:`iter_files`'s order; decoded, converted and resized as prepare did for ``spec``'s
    data (see the module docstring). A file that fails raises ``tf.errors.OpError`` when its
    batch is read; :func:`bad_file_error` then names it.
    """
    paths = tf.data.Dataset.from_generator(
        lambda: iter_files(inputs), output_signature=tf.TensorSpec([], tf.string)
    )
    shape, resize = tuple(spec.image_shape), spec.resize
    return (
        paths.map(
            lambda path: load_image(path, shape, resize),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        .batch(batch_size)
        # The reader's own conversion (reader.parse_serialized): the same float32 values.
        .map(lambda images: {"image": tf.cast(images, tf.float32) * (1.0 / 255.0)})
        .prefetch(1)
    )


def bad_file_error(
    paths: Sequence[str], spec: DatasetSpec, error: Optional[tf.errors.OpError] = None
) -> DataError:
    """The DataError naming the first of ``paths`` that does not load (decoded one by one).

    Args:
        paths: The files of the batch that failed (and after it).
        spec: The dataset whose decoding the files get.
        error: The pipeline's error, used when no single file can be blamed.
    """
    for path in paths:
        try:
            load_image(tf.constant(path), tuple(spec.image_shape), spec.resize)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
            return _file_error(path, spec, e)
    if error is not None:
        return DataError(f"cannot read an input image ({gist(error)})")
    return DataError("cannot read an input image")


def _file_error(path: str, spec: DatasetSpec, error: tf.errors.OpError) -> DataError:
    failure = load_failure(error)
    if failure is None:
        return DataError(
            f"cannot decode the image as {spec.image_shape[2]} channel(s) ({gist(error)})",
            path=path,
            fix="replace or remove the file",
        )
    what, _, height, width = failure
    if what == "too_large":
        return DataError(
            f"image header claims {height}x{width} pixels, more than {MAX_PIXELS} "
            "(refused before decoding)",
            path=path,
            fix="replace or remove the file",
        )
    size = f"{spec.image_shape[0]}x{spec.image_shape[1]}"
    return DataError(
        f"image is {height}x{width}, but the training data ({spec.data_dir}) is {size} and "
        "was prepared without resizing",
        path=path,
        fix=f"resize the image to {size}, or prepare the training data with --image_size=H,W "
        "(images are then resized, new ones too)",
    )
