"""Image-folder sources: ``SRC/train/<class>/*.png|jpg``, decoded in bounded chunks by tf.data.

The layout is Keras' ``image_dataset_from_directory``: class names are the train sub-folders in
sorted order, files are taken recursively with the extensions Keras accepts (others are
skipped), and images are resized bilinearly when an ``image_size`` is given. Decoding runs in a
tf.data pipeline (``num_parallel_calls``, deterministic order), so it uses every core without
the GIL and holds only a few chunks of decoded images at a time. Each file's header is checked
in-graph before it is decoded, so a header claiming 100000x100000 pixels is refused before
anything that big is allocated.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from data_pipeline.errors import DataError
from data_pipeline.sources import CHUNK_BYTES, SPLITS, DataSource, PathLike
from data_pipeline.spec import check_class_names, check_image_shape

# Keras' image_dataset_from_directory ALLOWLIST_FORMATS.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# How images are resized when prepare is given an image_size (Keras' default), recorded in the
# spec so predict fits new images the same way.
RESIZE_METHOD = "bilinear"
# Largest image decoded, in pixels (8192x8192): 256 MiB as RGBA, so two decoding threads stay
# well inside prepare's memory budget.
MAX_PIXELS = 1 << 26
# The train split is written in one fixed shuffled order (so shards mix classes); changing the
# seed changes every prepared dataset's records, so it is part of the source checksum.
ORDER_SEED = 20261130
# In-graph assertion messages, found again in TensorFlow's error text.
_TOO_LARGE = "data_pipeline: image header too large"
_WRONG_SIZE = "data_pipeline: image size differs"
_ASSERTED = re.compile(
    r"(" + "|".join((_TOO_LARGE, _WRONG_SIZE)) + r")\] \[(.+?)\] \[(\d+)\] \[(\d+)\]"
)
# The same assertion run eagerly (one file decoded outside tf.data) prints its data as bytes.
_ASSERTED_EAGERLY = re.compile(
    r"Summarized data: b'(" + "|".join((_TOO_LARGE, _WRONG_SIZE)) + r")'\s+b'(.+?)'\s+(\d+)\s+(\d+)"
)
_FIX_SIZE = "pass --image_size=H,W to resize every image"


def _byte_weights() -> np.ndarray:
    """Weights turning a header's first 32 bytes into its fields with one matrix product."""
    fields = [  # (first byte, length, big-endian)
        (0, 4, True),  # Magic number.
        (20, 4, True),  # PNG IHDR height.
        (16, 4, True),  # PNG IHDR width.
        (8, 2, False),  # GIF logical screen height.
        (6, 2, False),  # GIF logical screen width.
        (22, 4, False),  # BMP height (signed: negative for top-down rows).
        (18, 4, False),  # BMP width.
    ]
    weights = np.zeros((len(fields), 32))
    for row, (first, length, big) in enumerate(fields):
        for k in range(length):
            weights[row, first + k] = 256.0 ** (length - 1 - k if big else k)
    return weights


_WEIGHTS = _byte_weights()


def _header_size(data: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """(height, width) from a PNG, GIF, BMP or JPEG header, without decoding; 0, 0 if unknown.

    Vectorised (a few ops per image rather than one per header byte), since it runs per file.
    """
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(data, 0, 32), "\0" * 32]), 0, 32)
    head = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.float64)
    magic, png_h, png_w, gif_h, gif_w, bmp_h, bmp_w = tf.unstack(tf.linalg.matvec(_WEIGHTS, head))
    magic16 = tf.floor(magic / 65536)
    is_png, is_gif = tf.equal(magic, 0x89504E47), tf.equal(magic, 0x47494638)
    is_bmp, is_jpeg = tf.equal(magic16, 0x424D), tf.equal(magic16, 0xFFD8)
    bmp_h = tf.abs(tf.where(bmp_h >= 2**31, bmp_h - 2**32, bmp_h))
    height = tf.where(is_png, png_h, tf.where(is_gif, gif_h, tf.where(is_bmp, bmp_h, 0.0)))
    width = tf.where(is_png, png_w, tf.where(is_gif, gif_w, tf.where(is_bmp, bmp_w, 0.0)))
    size = tf.cast(tf.stack([height, width]), tf.int64)
    size = tf.cond(
        is_jpeg, lambda: tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64), lambda: size
    )
    return size[0], size[1]


class ImageFolderSource(DataSource):
    """A folder ``SRC/train/<class>/...``, ``SRC/test/<class>/...`` of image files.

    Args:
        root: The folder holding ``train/`` and ``test/``.
        image_size: Resize every image to (height, width), bilinearly as Keras does; without it
            every image must have the first train image's size.
        channels: 1 or 3 (or 4); default: the first train image's (1 for grayscale, 3 for RGB
            or RGBA).

    The checksum is a cheap fingerprint of every image file's relative path, size and
    modification time (plus the record order), not of its bytes. Train records follow one
    fixed shuffle of the files (seeded), test records the sorted order.

    Raises (on construction):
        DataError: A missing ``train``/``test`` folder, an empty class folder, a test class
            missing from train, or a first image that cannot be read.
    """

    def __init__(
        self,
        root: PathLike,
        image_size: Optional[Tuple[int, int]] = None,
        channels: Optional[int] = None,
    ):
        self.root = Path(root)
        self.name = f"folder:{self.root}"
        fix = "lay images out as SRC/train/<class>/*.png and SRC/test/<class>/*.png"
        for split in SPLITS:
            if not (self.root / split).is_dir():
                raise DataError(f"no {split}/ folder", path=self.root, fix=fix)
        classes = sorted(e.name for e in os.scandir(self.root / "train") if e.is_dir())
        problem = check_class_names(tuple(classes), len(classes))
        if problem:
            raise DataError(
                f"train/ has {len(classes)} class folder(s) ({problem})", path=self.root, fix=fix
            )
        self.class_names = tuple(classes)
        digest = hashlib.sha256(f"order {ORDER_SEED}\n".encode())
        self._files: Dict[str, List[str]] = {}
        self._labels: Dict[str, np.ndarray] = {}
        for split in SPLITS:
            split_dir = self.root / split
            test_only = sorted(
                e.name for e in os.scandir(split_dir) if e.is_dir() and e.name not in classes
            )
            if test_only:
                raise DataError(
                    f"class folder {test_only[0]!r} is not in train/ (classes: "
                    f"{', '.join(classes)})"[:300],
                    path=split_dir / test_only[0],
                    fix="every test class needs train images; rename or remove the folder",
                )
            files, labels = [], []
            for label, name in enumerate(classes):
                if not (split_dir / name).is_dir():
                    continue  # A test split may lack a class.
                found = _image_files(self.root, split_dir / name, digest)
                if not found:
                    raise DataError(
                        f"class folder has no image files ({', '.join(IMAGE_EXTENSIONS)})",
                        path=split_dir / name,
                        fix="add images or remove the folder",
                    )
                files += found
                labels += [label] * len(found)
            order = np.arange(len(files))
            if split == "train":
                first = self.root / files[0]  # In sorted order: the first class's first file.
                # Class-sorted shards would starve the reader's shuffle buffer.
                order = np.random.default_rng(ORDER_SEED).permutation(len(files))
            self._files[split] = [files[i] for i in order]
            self._labels[split] = np.asarray(labels, np.int64)[order]
        self.checksum = digest.hexdigest()
        height, width, found_channels = _probe(first)
        if channels is None:
            channels = 1 if found_channels <= 2 else 3
        self._resize = image_size is not None
        self.resize = RESIZE_METHOD if self._resize else None
        self.image_shape = (*(image_size or (height, width)), channels)
        self._first = first
        problem = check_image_shape(self.image_shape)
        if problem:
            raise DataError(problem, path=first, fix=_FIX_SIZE)

    def num_records(self, split: str) -> int:
        return len(self._files[split])

    def record_files(self, split: str) -> Sequence[str]:
        return self._files[split]

    def subset(self, split: str, indices: Sequence[int]) -> ImageFolderSource:
        """A copy whose ``split`` holds only the records at ``indices``, in that order (as 0..).

        Small to pickle whatever the folder's size: the Beam engine ships one per shard rather
        than the whole file list to every worker.
        """
        part = copy.copy(self)
        files = self._files[split]
        part._files = {split: [files[i] for i in indices]}
        part._labels = {split: self._labels[split][np.asarray(indices, np.int64)]}
        return part

    def chunks(self, split, start=0, stop=None, max_bytes=CHUNK_BYTES):
        files, labels = self._files[split], self._labels[split]
        stop = len(files) if stop is None else stop
        step = self.chunk_records(max_bytes)
        paths = [str(self.root / f) for f in files[start:stop]]
        if not paths:
            return
        dataset = (
            tf.data.Dataset.from_tensor_slices(paths)
            .map(self._load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(step)
            .prefetch(1)
        )
        batches = iter(dataset)
        for first in range(start, stop, step):
            try:
                images = next(batches).numpy()
            except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
                raise self._name_bad_file(e, paths[first - start : first - start + step]) from e
            yield images, labels[first : first + len(images)]

    def _load(self, path: tf.Tensor) -> tf.Tensor:
        """Reads, checks, decodes and (optionally) resizes one image to uint8 [H, W, C]."""
        return load_image(path, self.image_shape, self.resize)

    def _failing(self, paths: List[str]) -> List[str]:
        """The paths that fail to load, found by one parallel pass that skips failures.

        Loading the chunk's files one by one eagerly took 11-15 s for 3,500 PNGs; this pass
        costs about what decoding the chunk did.
        """
        indices = tf.range(len(paths), dtype=tf.int64)
        dataset = (
            tf.data.Dataset.from_tensor_slices((indices, paths))
            .map(
                # The size keeps the decoded image a dependency of what comes out.
                lambda index, path: (index, tf.size(self._load(path))),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            .ignore_errors()
        )
        loaded = {int(index) for index, _ in dataset.as_numpy_iterator()}
        return [path for index, path in enumerate(paths) if index not in loaded]

    def _name_bad_file(self, error: tf.errors.OpError, paths: List[str]) -> DataError:
        """The DataError for a failed chunk, naming the file (decoded one by one if need be)."""
        match = _ASSERTED.search(error.message or "")
        if match is None:
            for path in self._failing(paths):
                try:
                    self._load(tf.constant(path))
                except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
                    error, match = e, _ASSERTED.search(e.message or "")
                    if match is None:
                        return DataError(
                            f"cannot decode the image ({_gist(e)})",
                            path=path,
                            fix="replace or remove the file",
                        )
                    break
        if match is None:
            return DataError(f"cannot decode an image ({_gist(error)})", path=self.root)
        what, path, height, width = match.groups()
        if what == _TOO_LARGE:
            return DataError(
                f"image header claims {height}x{width} pixels, more than {MAX_PIXELS} "
                "(refused before decoding)",
                path=path,
                fix="replace or remove the file",
            )
        first = f"{self.image_shape[0]}x{self.image_shape[1]}"
        return DataError(
            f"image is {height}x{width} but the first train image ({self._first}) is {first}",
            path=path,
            fix=_FIX_SIZE,
        )


def load_image(path: tf.Tensor, image_shape: Tuple[int, ...], resize: Optional[str]) -> tf.Tensor:
    """Reads, checks, decodes and (optionally) resizes one image file to uint8 ``image_shape``.

    The one decoding path of image files: prepare uses it for the training data and
    :mod:`data_pipeline.inputs` for new images to predict, so both see the same pixels.

    Args:
        path: Scalar string tensor.
        image_shape: (H, W, C): the image is decoded to C channels (grey <-> RGB converted).
        resize: None (an image of another size fails an in-graph assertion naming the file)
            or ``"bilinear"`` (resized to H x W, rounded back to uint8).
    """
    data = tf.io.read_file(path)
    height, width = _header_size(data)
    too_large = tf.debugging.Assert(
        height * width <= MAX_PIXELS, [_TOO_LARGE, path, height, width], summarize=1
    )
    with tf.control_dependencies([too_large]):
        image = tf.io.decode_image(data, channels=image_shape[2], expand_animations=False)
    if resize is not None:
        image = tf.image.resize(image, image_shape[:2], method=resize)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    else:
        shape = tf.shape(image, out_type=tf.int64)
        same = tf.reduce_all(tf.equal(shape[:2], image_shape[:2]))
        check = tf.debugging.Assert(same, [_WRONG_SIZE, path, shape[0], shape[1]], summarize=1)
        with tf.control_dependencies([check]):
            image = tf.identity(image)
    return tf.ensure_shape(image, image_shape)


def load_failure(error: tf.errors.OpError) -> Optional[Tuple[str, str, int, int]]:
    """What :func:`load_image`'s assertion in ``error`` says, or None (a file that won't decode).

    Returns:
        ``("too_large" | "wrong_size", path, height, width)`` or None.
    """
    match = _ASSERTED.search(error.message or "") or _ASSERTED_EAGERLY.search(error.message or "")
    if match is None:
        return None
    what, path, height, width = match.groups()
    return ("too_large" if what == _TOO_LARGE else "wrong_size", path, int(height), int(width))


def gist(error: tf.errors.OpError) -> str:
    """The first words of a TensorFlow error, without its graph node names."""
    return _gist(error)


def _gist(error: tf.errors.OpError) -> str:
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message or str(error))
    text = re.sub(r"\s*\[Op:\w+\]( name:\s*\S*)?", "", text)  # an eager op's trailer
    return " ".join(re.sub(r"\s*\[\[\{\{node .*", "", text).split()[:30])


def _image_files(root: Path, folder: Path, digest) -> List[str]:
    """Image files under ``folder`` (recursively, sorted), relative to ``root``.

    Each file's relative path, size and modification time also go into ``digest``.
    """
    found = []
    for parent, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(parent, name)
            relative = os.path.relpath(path, root)
            if "\n" in relative:
                raise DataError("file name holds a line break", path=path, fix="rename the file")
            stat = os.stat(path)
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            found.append(relative)
    return found


def _probe(path: Path) -> Tuple[int, int, int]:
    """(height, width, channels) of one image file, its header checked before it is decoded."""
    try:
        data = tf.io.read_file(str(path))
        height, width = (int(v) for v in _header_size(data))
        if height * width > MAX_PIXELS:
            raise DataError(
                f"image header claims {height}x{width} pixels, more than {MAX_PIXELS} "
                "(refused before decoding)",
                path=path,
                fix="replace or remove the file",
            )
        shape = tf.io.decode_image(data, expand_animations=False).shape
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
        raise DataError(
            f"cannot decode the image ({_gist(e)})", path=path, fix="replace or remove the file"
        ) from e
    return int(shape[0]), int(shape[1]), int(shape[2])


def write_synthetic_folder(
    root: PathLike,
    counts: Dict[str, int],
    image_shape: Tuple[int, int, int] = (128, 128, 3),
    num_classes: int = 10,
    seed: int = 0,
) -> Path:
    """Writes a generated image folder (PNG files) for tests and benchmarks.

    Each image is a smooth pattern of its own (random frequencies and phases per channel,
    quantised to 16 levels), so files are varied yet compress well (about 6 kB for 128x128x3).
    Image ``i`` of a split goes to class ``i % num_classes`` (folders ``class_00`` ...). Encoding
    runs in a parallel tf.data pipeline.

    Args:
        root: The folder to create (``root/train/class_00/00000000.png`` ...).
        counts: Images per split, e.g. ``{"train": 9000, "test": 1000}``.
        image_shape: (H, W, C) of every image.
        num_classes: Number of class folders.
        seed: Generates the same files for the same seed.

    Returns:
        ``root``.
    """
    root = Path(root)
    height, width, channels = image_shape
    for offset, (split, count) in enumerate(counts.items()):
        for label in range(num_classes):
            (root / split / f"class_{label:02d}").mkdir(parents=True, exist_ok=True)

        def write(index, split=split, offset=offset):
            key = tf.stack([tf.constant(seed * 1000 + offset, tf.int64), index])
            params = tf.random.stateless_uniform([3, channels], key)
            rows = tf.cast(tf.range(height), tf.float32)[:, None, None] * (0.02 + 0.2 * params[0])
            cols = tf.cast(tf.range(width), tf.float32)[None, :, None] * (0.02 + 0.2 * params[1])
            wave = tf.sin(rows + cols * tf.cos(rows * 0.05) + 6.3 * params[2])
            image = tf.cast(tf.round(wave * 7.5 + 7.5) * 17, tf.uint8)
            label = tf.strings.as_string(index % num_classes, width=2, fill="0")
            name = tf.strings.as_string(index, width=8, fill="0")
            path = tf.strings.join([str(root / split), "/class_", label, "/", name, ".png"])
            with tf.control_dependencies([tf.io.write_file(path, tf.io.encode_png(image))]):
                return tf.identity(index)

        files = tf.data.Dataset.range(count).map(write, num_parallel_calls=tf.data.AUTOTUNE)
        for _ in files:
            pass
    return root
