"""Reader: round trip, pipeline options, distribution sharding, serving parse, bad data."""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

import data_pipeline
from data_pipeline import (
    DataError,
    check_shards,
    encode_example,
    load_spec,
    make_dataset,
    make_input_fn,
    parse_serialized,
    prepare,
    translate_errors,
)


def read_all(dataset):
    images, labels = [], []
    for features, batch_labels in dataset:
        images.append(np.rint(features["image"].numpy()[..., 0] * 255).astype(np.uint8))
        labels.append(batch_labels.numpy())
    if not images:
        return np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.int64)
    return np.concatenate(images), np.concatenate(labels)


@pytest.fixture
def small_data_dir(tmp_path, mnist_small_npz):
    """1000 train / 300 test examples in shards of 100, private to the test (may be damaged)."""
    prepare(tmp_path, mnist_small_npz, records_per_shard=100, progress=False)
    return tmp_path


@pytest.mark.parametrize("split", ["train", "test"])
def test_round_trip_is_byte_identical(mnist_data_dir, mnist_source, split):
    images, labels = read_all(make_dataset(mnist_data_dir, split, 512))
    np.testing.assert_array_equal(images, mnist_source.splits[split][0])
    np.testing.assert_array_equal(labels, mnist_source.splits[split][1])


def test_batch_structure(mnist_data_dir):
    dataset = make_dataset(mnist_data_dir, "test", 32, drop_remainder=True, limit=100)
    features, labels = dataset.element_spec
    assert features["image"].shape.as_list() == [32, 28, 28, 1]
    assert features["image"].dtype == tf.float32 and labels.dtype == tf.int64
    batches = list(dataset)
    assert len(batches) == 3
    image = batches[0][0]["image"].numpy()
    assert image.min() >= 0.0 and image.max() <= 1.0 and image.max() > 0.99


def test_limit_crosses_shards(mnist_data_dir, mnist_source):
    images, labels = read_all(make_dataset(mnist_data_dir, "train", 100, limit=1500))
    np.testing.assert_array_equal(images, mnist_source.splits["train"][0][:1500])
    np.testing.assert_array_equal(labels, mnist_source.splits["train"][1][:1500])
    assert len(read_all(make_dataset(mnist_data_dir, "train", 100, limit=0))[1]) == 0


def test_shuffle_epochs_and_determinism(small_data_dir, mnist_source):
    def labels_of(**kwargs):
        return read_all(make_dataset(small_data_dir, "train", 64, **kwargs))[1]

    ordered = labels_of()
    np.testing.assert_array_equal(ordered, mnist_source.splits["train"][1][:1000])
    first = labels_of(shuffle=True, seed=7, deterministic=True, shuffle_buffer=500)
    again = labels_of(shuffle=True, seed=7, deterministic=True, shuffle_buffer=500)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, ordered)
    assert sorted(first.tolist()) == sorted(ordered.tolist())
    two = labels_of(shuffle=True, seed=7, num_epochs=2, cache=True)
    assert len(two) == 2000 and not np.array_equal(two[:1000], two[1000:])
    # Every record exactly twice. (Not "each half is one epoch": tf.data may fuse shuffle and
    # repeat, which can let a few records cross the epoch boundary; a run in CI saw it.)
    assert sorted(two.tolist()) == sorted(ordered.tolist() * 2)
    forever = make_dataset(small_data_dir, "test", 128, num_epochs=None, shuffle=True)
    assert sum(int(b.shape[0]) for _, b in forever.take(10)) == 1280


def test_augment_shift(small_data_dir, mnist_source):
    originals = mnist_source.splits["test"][0][:64]
    dataset = make_dataset(small_data_dir, "test", 64, augment_shift=2, seed=3, limit=64)
    assert dataset.element_spec[0]["image"].shape.as_list() == [None, 28, 28, 1]
    shifted, _ = read_all(dataset)
    padded = np.pad(originals, [(0, 0), (2, 2), (2, 2)])
    moved = 0
    for image, source in zip(shifted, padded):
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if np.array_equal(image, source[dy : dy + 28, dx : dx + 28])
        ]
        assert matches, "not a shift of the original by at most 2 pixels"
        moved += (2, 2) not in matches
    assert moved > 32
    again, _ = read_all(make_dataset(small_data_dir, "test", 64, augment_shift=2, seed=3, limit=64))
    np.testing.assert_array_equal(again, shifted)


def test_input_context_shards_files(small_data_dir):
    spec = load_spec(small_data_dir)
    seen = []
    for pipeline in range(3):
        context = tf.distribute.InputContext(
            num_input_pipelines=3, input_pipeline_id=pipeline, num_replicas_in_sync=6
        )
        dataset = make_dataset(small_data_dir, "train", 60, input_context=context)
        assert dataset.element_spec[1].shape.as_list() == [None]
        images, _ = read_all(dataset)
        assert next(iter(dataset))[1].shape[0] == 10  # Per-replica batch: 60 / 6.
        seen.append({image.tobytes() for image in images})
    assert sum(len(s) for s in seen) == spec.num_records("train")
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert [len(s) for s in seen] == [400, 300, 300]  # Shards 0,3,6,9 / 1,4,7 / 2,5,8.
    too_many = tf.distribute.InputContext(num_input_pipelines=5, input_pipeline_id=0)
    with pytest.raises(DataError, match="records_per_shard"):
        make_dataset(small_data_dir, "test", 8, input_context=too_many)


def test_make_input_fn(small_data_dir, tmp_path):
    input_fn = make_input_fn(small_data_dir, "test", 50, limit=120)
    dataset = input_fn()
    assert isinstance(dataset, tf.data.Dataset)
    assert [int(b.shape[0]) for _, b in dataset] == [50, 50, 20]
    context = tf.distribute.InputContext(num_input_pipelines=1, num_replicas_in_sync=2)
    assert next(iter(input_fn(input_context=context)))[1].shape[0] == 25
    with pytest.raises(DataError):
        make_input_fn(tmp_path / "nowhere", "train", 10)
    with pytest.raises(DataError, match="no split 'valid'"):
        make_input_fn(small_data_dir, "valid", 10)


def test_parse_serialized_for_serving(mnist_source, small_data_dir):
    images, labels = mnist_source.splits["test"]
    serialized = tf.constant([encode_example(images[i], labels[i]) for i in range(4)])
    spec = load_spec(small_data_dir)
    features, parsed_labels = parse_serialized(serialized, spec)
    np.testing.assert_allclose(features["image"].numpy()[..., 0], images[:4] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(parsed_labels.numpy(), labels[:4])
    # Serving requests carry no label.
    unlabeled = tf.train.Example(
        features=tf.train.Features(
            feature={
                "image": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[images[0].tobytes()])
                )
            }
        )
    ).SerializeToString()
    features, parsed_labels = parse_serialized(tf.constant([unlabeled]), None)
    assert features["image"].shape.as_list() == [1, 28, 28, 1]
    assert parsed_labels.numpy().tolist() == [-1]
    assert parse_serialized(tf.constant([unlabeled]), spec, with_labels=False)[1] is None


def assert_names(error, *names):
    text = str(error)
    assert "\n" not in text and error.exit_code == 2
    for name in names:
        assert name in text, text


def test_missing_empty_and_unprepared_folders(tmp_path):
    with pytest.raises(DataError) as info:
        make_dataset(tmp_path / "missing", "train", 8)
    assert_names(info.value, "missing", "does not exist", "--mode=prepare")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as info:
        load_spec(tmp_path / "empty")
    assert_names(info.value, "empty")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "train-00000-of-00001.tfrecord").write_bytes(b"")
    with pytest.raises(DataError) as info:
        load_spec(tmp_path / "partial")
    assert_names(info.value, "partial", "no dataset_spec.json")


def edit_spec(data_dir, change):
    path = data_dir / "dataset_spec.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def test_bad_spec_files(small_data_dir):
    spec_path = small_data_dir / "dataset_spec.json"
    original = spec_path.read_text()
    spec_path.write_text("{not json")
    with pytest.raises(DataError) as info:
        load_spec(small_data_dir)
    assert_names(info.value, str(spec_path), "unreadable")
    spec_path.write_text(original)
    edit_spec(small_data_dir, lambda raw: raw.pop("splits"))
    with pytest.raises(DataError) as info:
        load_spec(small_data_dir)
    assert_names(info.value, str(spec_path), "splits")
    spec_path.write_text(original)
    edit_spec(small_data_dir, lambda raw: raw["splits"]["test"].update(num_records=301))
    with pytest.raises(DataError) as info:
        load_spec(small_data_dir)
    assert_names(info.value, str(spec_path), "301")
    spec_path.write_text(original)
    missing = small_data_dir / "train-00004-of-00010.tfrecord"
    missing.unlink()
    with pytest.raises(DataError) as info:
        make_dataset(small_data_dir, "train", 8)
    assert_names(info.value, str(missing), "missing")


def truncate_and_fix_size(data_dir, index, cut):
    """Truncates train shard ``index`` by ``cut`` bytes and makes the spec agree on the size."""
    shard = data_dir / f"train-{index:05d}-of-00010.tfrecord"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - cut)
    edit_spec(
        data_dir,
        lambda raw: raw["splits"]["train"]["shards"][index].update(num_bytes=size - cut),
    )
    return shard


def test_truncated_shard(small_data_dir):
    shard = small_data_dir / "train-00003-of-00010.tfrecord"
    with open(shard, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError) as info:
        load_spec(small_data_dir)
    assert_names(info.value, str(shard), "bytes")
    # With a spec that agrees on the size, reading still notices a record cut in half (TF's
    # message names no file: translate_errors asks check_shards)...
    truncate_and_fix_size(small_data_dir, 3, 0)
    with pytest.raises(DataError) as info, translate_errors(small_data_dir, "train"):
        read_all(make_dataset(small_data_dir, "train", 64))
    assert_names(info.value, str(shard), "corrupt")
    with pytest.raises(DataError) as info:
        check_shards(small_data_dir)
    assert_names(info.value, str(shard))


def test_shard_missing_whole_records(small_data_dir):
    # ...and whole records missing, which TFRecord reading alone would not notice.
    shard = truncate_and_fix_size(small_data_dir, 4, 3 * 838)
    with pytest.raises(DataError) as info, translate_errors():
        read_all(make_dataset(small_data_dir, "train", 64, shuffle=True))
    assert_names(info.value, str(shard), "holds 97 records but dataset_spec.json says 100")


def test_corrupt_shard(small_data_dir):
    shard = small_data_dir / "train-00005-of-00010.tfrecord"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    load_spec(small_data_dir)  # Same size: only reading can tell.
    with pytest.raises(tf.errors.DataLossError):
        read_all(make_dataset(small_data_dir, "train", 64))
    with pytest.raises(DataError) as info, translate_errors(small_data_dir, "train"):
        read_all(make_dataset(small_data_dir, "train", 64, shuffle=True))
    assert_names(info.value, str(shard), "corrupt")
    with pytest.raises(DataError) as info:
        check_shards(small_data_dir, "train")
    assert_names(info.value, str(shard), "corrupt")
    with pytest.raises(DataError) as info:
        load_spec(small_data_dir, check_records=True)
    assert_names(info.value, str(shard))


@pytest.mark.parametrize("claimed", [99, 101])
def test_spec_disagrees_with_records(small_data_dir, claimed):
    def change(raw):
        raw["splits"]["test"]["shards"][1]["num_records"] = claimed
        raw["splits"]["test"]["num_records"] = 300 - 100 + claimed

    edit_spec(small_data_dir, change)
    shard = str(small_data_dir / "test-00001-of-00003.tfrecord")
    with pytest.raises(DataError) as info, translate_errors():
        read_all(make_dataset(small_data_dir, "test", 64))
    expected = "more than 99" if claimed == 99 else "holds 100 records"
    assert_names(info.value, shard, expected, f"says {claimed}")
    with pytest.raises(DataError) as info:
        check_shards(small_data_dir, "test")
    assert_names(info.value, shard, "holds 100 records", f"says {claimed}")


def test_translate_errors_passes_other_errors(tmp_path):
    with pytest.raises(tf.errors.InvalidArgumentError), translate_errors(tmp_path):
        raise tf.errors.InvalidArgumentError(None, None, "Matrix size-incompatible: In[0]")
    with pytest.raises(ValueError), translate_errors():
        raise ValueError("not ours")

    @translate_errors()
    def crash():
        raise tf.errors.DataLossError(
            None, None, "corrupted record at 12 in /x/test-00000.tfrecord"
        )

    with pytest.raises(DataError, match="/x/test-00000.tfrecord"):
        crash()


def test_copy_of_prepared_dir_is_relocatable(small_data_dir, tmp_path_factory):
    moved = tmp_path_factory.mktemp("moved") / "data"
    shutil.copytree(small_data_dir, moved)
    assert load_spec(moved).files("test")[0].startswith(str(moved))
    assert len(read_all(data_pipeline.make_dataset(moved, "test", 100))[1]) == 300
