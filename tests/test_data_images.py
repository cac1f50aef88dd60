"""Images from anywhere: MNIST byte-identical, UCI digits as .npz and PNG folder, bad inputs.

The digits (scikit-learn's copy of the UCI set, 8x8, values 0..16 scaled to 0..255) are a
second, non-MNIST dataset: other image size, other class names, a source of image files.
"""

import hashlib
import io
import json
import os
import pathlib
import shutil
import struct
import zipfile

import numpy as np
import pytest
import tensorflow as tf
from cli_helpers import assert_cli_error, run_cli
from conftest import DIGIT_NAMES, DIGITS_TRAIN, write_png_folder

import data_pipeline
from data_pipeline import check_shards, encode_example, load_spec, prepare
from data_pipeline.reader import shuffle_buffer_records

PINNED = pathlib.Path(__file__).parent / "data"


def read_split(data_dir, split):
    """Every record of ``split`` in stored order: (uint8 images [N, H, W, C], int64 labels)."""
    images, labels = [], []
    for features, batch_labels in data_pipeline.make_dataset(data_dir, split, 512):
        images.append(np.rint(features["image"].numpy() * 255).astype(np.uint8))
        labels.append(batch_labels.numpy())
    return np.concatenate(images), np.concatenate(labels)


def sha256(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


# --- MNIST stays byte for byte what the writer wrote before streaming sources ------------------


def test_mnist_shards_are_byte_identical(mnist_data_dir):
    # tests/data/mnist_shards.sha256: sha256sum of every shard the earlier writer wrote with
    # default settings from the same IDX files.
    pinned = dict(
        reversed(line.split()) for line in (PINNED / "mnist_shards.sha256").read_text().splitlines()
    )
    written = sorted(p.name for p in mnist_data_dir.glob("*.tfrecord"))
    assert written == sorted(pinned) and len(written) == 65
    for name in written:
        assert sha256(mnist_data_dir / name) == pinned[name], name


def test_spec_written_before_class_names_loads_and_is_reused(
    mnist_data_dir, mnist_source, tmp_path
):
    old_spec = json.loads((PINNED / "mnist_spec_v1.json").read_text())
    assert "class_names" not in old_spec and "fingerprint" not in old_spec
    data_dir = tmp_path / "old"
    data_dir.mkdir()
    for shard in mnist_data_dir.glob("*.tfrecord"):
        os.link(shard, data_dir / shard.name)  # Same bytes (pinned above), no copy.
    shutil.copy(PINNED / "mnist_spec_v1.json", data_dir / "dataset_spec.json")
    spec = load_spec(data_dir)
    assert spec.class_names == tuple(str(i) for i in range(10))
    assert spec.image_shape == (28, 28, 1) and spec.num_classes == 10
    assert spec.record_files("test") is None
    features, labels = next(iter(data_pipeline.make_dataset(data_dir, "test", 100)))
    np.testing.assert_array_equal(labels.numpy(), mnist_source.splits["test"][1][:100])
    # The new writer recognises the old output as complete for the same source and settings.
    before = {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()}
    prepare(data_dir, source=mnist_source, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()} == before


# --- the UCI digits from an .npz and from a folder of PNG files --------------------------------


def test_digits_npz(digits_npz, digits, tmp_path):
    spec = prepare(tmp_path, digits_npz, progress=False)
    assert spec.image_shape == (8, 8, 1) and spec.num_classes == 10
    assert spec.class_names == tuple(str(i) for i in range(10))
    assert spec.num_records("train") == DIGITS_TRAIN and spec.num_records("test") == 297
    assert spec.record_files("train") is None
    images, labels = digits
    for split, rows in (("train", slice(0, DIGITS_TRAIN)), ("test", slice(DIGITS_TRAIN, None))):
        got_images, got_labels = read_split(tmp_path, split)
        np.testing.assert_array_equal(got_images[..., 0], images[rows])
        np.testing.assert_array_equal(got_labels, labels[rows])


def folder_index(relative):
    """Digit index from a manifest line such as ``train/seven/0123.png``."""
    return int(pathlib.PurePath(relative).stem)


def test_digits_png_folder(digits_folder, digits, tmp_path):
    spec = prepare(tmp_path, digits_folder, records_per_shard=400, progress=False)
    # Grayscale PNGs: one channel. Class names: the folders, sorted (not in digit order).
    assert spec.image_shape == (8, 8, 1) and spec.num_classes == 10
    assert spec.class_names == tuple(sorted(DIGIT_NAMES))
    assert spec.num_records("train") == DIGITS_TRAIN and spec.num_records("test") == 297
    assert load_spec(tmp_path).class_names == spec.class_names
    images, labels = digits
    for split in ("train", "test"):
        files = spec.record_files(split)
        assert all(f.startswith(f"{split}/") for f in files)
        index = [folder_index(f) for f in files]
        assert sorted(index) == list(
            range(DIGITS_TRAIN) if split == "train" else range(DIGITS_TRAIN, len(labels))
        )
        got_images, got_labels = read_split(tmp_path, split)
        np.testing.assert_array_equal(got_images[..., 0], images[index])
        names = np.array(spec.class_names)[got_labels]
        np.testing.assert_array_equal(names, np.array(DIGIT_NAMES)[labels[index]])
    # Train records follow one seeded shuffle, so every shard mixes the classes; test records
    # are in sorted file order.
    _, train_labels = read_split(tmp_path, "train")
    assert len(np.unique(train_labels[:400])) == 10
    assert spec.record_files("test") == sorted(spec.record_files("test"))


def test_folder_resize_and_channels(digits_folder, digits, tmp_path):
    spec = prepare(tmp_path, digits_folder, image_size=(16, 12), channels=3, progress=False)
    assert spec.image_shape == (16, 12, 3)
    got, _ = read_split(tmp_path, "test")
    files = spec.record_files("test")
    source = digits[0][[folder_index(f) for f in files[:5]]]
    # Bilinear, as Keras' image_dataset_from_directory resizes, then rounded to uint8.
    expected = tf.image.resize(np.repeat(source[..., None], 3, axis=-1), (16, 12))
    expected = np.clip(np.rint(expected.numpy()), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got[:5], expected)


def test_encode_and_parse_any_shape(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    images = np.stack([image, 255 - image])
    source = data_pipeline.Source(
        "rgb", "1" * 64, {s: (images, np.array([0, 1])) for s in ("train", "test")}
    )
    spec = prepare(tmp_path, source=source, progress=False)
    assert spec.image_shape == (5, 7, 3) and spec.class_names == ("0", "1")
    serialized = tf.constant([encode_example(image, 1), encode_example(255 - image, 0)])
    features, labels = data_pipeline.parse_serialized(serialized, spec)
    np.testing.assert_array_equal(np.rint(features["image"].numpy() * 255), images)
    assert labels.numpy().tolist() == [1, 0]
    # The same bytes as the writer's own records.
    first = next(iter(tf.data.TFRecordDataset(spec.files("train")[0]))).numpy()
    assert first == encode_example(image, 0)


def test_shuffle_buffer_is_bounded_in_bytes(mnist_data_dir, tmp_path):
    assert shuffle_buffer_records(load_spec(mnist_data_dir), 10_000, 256) == 10_000
    big = np.zeros((2, 128, 128, 3), np.uint8)
    source = data_pipeline.Source(
        "big", "2" * 64, {s: (big, np.array([0, 1])) for s in ("train", "test")}
    )
    spec = prepare(tmp_path, source=source, progress=False)
    record = 128 * 128 * 3  # Plus under 100 bytes of framing.
    buffer = shuffle_buffer_records(spec, 10_000, 256)
    assert 256e6 / (record + 100) <= buffer <= 256e6 / record
    assert shuffle_buffer_records(spec, 10_000, 0) == 1


def test_default_shards_are_capped_at_200_mb():
    assert data_pipeline.writer.records_per_shard_for((28, 28, 1)) == 1000
    big = data_pipeline.writer.records_per_shard_for((512, 512, 3))  # 786 kB a record.
    assert big == 200 * 10**6 // (512 * 512 * 3 + 22)
    assert data_pipeline.writer.records_per_shard_for((512, 512, 3), shard_mb=100) == big // 2
    with pytest.raises(ValueError):
        data_pipeline.writer.records_per_shard_for((8, 8, 1), 10, 1.0)


# --- bad input through the command line: one line naming the file, exit 2, no spec -------------


def small_folder(root, count=12, size=(8, 8)):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, *size), dtype=np.uint8)
    labels = np.arange(count) % 3
    return write_png_folder(root, images, labels, ("cat", "dog", "eel"), count - 3)


def _corrupt_image(root):
    bad = root / "train" / "dog" / "0004.png"
    bad.write_bytes(bad.read_bytes()[:40])  # A PNG cut inside its first chunk.
    return [], bad, "cannot decode"


def _absurd_png_header(root):
    bad = root / "train" / "eel" / "0005.png"
    data = bytearray(bad.read_bytes())
    data[16:24] = struct.pack(">II", 100_000, 100_000)  # IHDR width and height.
    bad.write_bytes(bytes(data))
    return [], bad, "100000x100000"


def _mixed_sizes(root):
    bad = root / "train" / "cat" / "0003.png"
    bad.write_bytes(tf.io.encode_png(np.zeros((9, 8, 1), np.uint8)).numpy())
    return [], bad, "--image_size"


def _empty_class(root):
    bad = root / "train" / "fox"
    bad.mkdir()
    (bad / "notes.txt").write_text("not an image")  # Skipped like Keras skips it.
    return [], bad, "no image files"


def _test_class_not_in_train(root):
    bad = root / "test" / "gnu"
    shutil.copytree(root / "test" / "cat", bad)
    return [], bad, "not in train"


def _digits_npz(root, change):
    images = np.zeros((12, 8, 8), np.uint8)
    arrays = {
        "x_train": images[:9],
        "y_train": np.arange(9) % 3,
        "x_test": images[9:],
        "y_test": np.arange(3) % 3,
    }
    change(arrays)
    path = root.parent / "small.npz"
    np.savez(path, **arrays)
    return path


def _npz_test_label_out_of_range(root):
    path = _digits_npz(root, lambda a: a["y_test"].__setitem__(1, 3))
    return [f"--source_dir={path}"], path, "[0, 3)"


def _npz_negative_label(root):
    path = _digits_npz(root, lambda a: a["y_train"].__setitem__(0, -1))
    return [f"--source_dir={path}"], path, "negative label -1"


def _npz_header_claims_more(root):
    path = _digits_npz(root, lambda a: None)
    members = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            members[name] = archive.read(name)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 8, 8)}
    )
    members["x_train.npy"] = header.getvalue() + members["x_train.npy"][128:]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return [f"--source_dir={path}"], path, "claims shape [1000000000, 8, 8]"


BAD_INPUTS = {
    "corrupt-image": _corrupt_image,
    "png-header-100000x100000": _absurd_png_header,
    "mixed-sizes": _mixed_sizes,
    "empty-class-folder": _empty_class,
    "test-class-not-in-train": _test_class_not_in_train,
    "npz-test-label-out-of-range": _npz_test_label_out_of_range,
    "npz-negative-label": _npz_negative_label,
    "npz-header-claims-more-than-archive": _npz_header_claims_more,
}


@pytest.mark.parametrize("damage", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_cli_prepare_bad_input(tmp_path, damage):
    root = small_folder(tmp_path / "src")
    args, bad, problem = damage(root)
    out = tmp_path / "out"
    run = run_cli("--mode=prepare", f"--data_dir={out}", f"--source_dir={root}", *args)
    assert_cli_error(run, bad, problem)
    assert not (out / "dataset_spec.json").exists()


def test_cli_prepare_flags(tmp_path, digits_npz):
    out = tmp_path / "out"
    run = run_cli(
        "--mode=prepare", f"--data_dir={out}", f"--source_dir={digits_npz}", "--image_size=4,4"
    )
    assert_cli_error(run, "--image_size", "image folders")
    assert_cli_error(run_cli("--mode=prepare", "--image_size=4"), "--image_size", "H,W")
    assert_cli_error(run_cli("--mode=prepare", "--channels=2"), "--channels")
    run = run_cli("--mode=prepare", "--records_per_shard=5", "--shard_mb=1")
    assert_cli_error(run, "--records_per_shard or --shard_mb")
    run = run_cli(
        "--mode=prepare", f"--data_dir={out}", f"--source_dir={digits_npz}", "--shard_mb=0.01"
    )
    assert run.returncode == 0, run.stderr[-2000:]
    spec = load_spec(out)
    record = data_pipeline.spec.record_size_range(spec.features["image"])[0]
    assert spec.records_per_shard == 10**4 // record
    assert check_shards(spec) == {"train": 1500, "test": 297}
