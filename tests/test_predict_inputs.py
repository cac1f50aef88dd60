"""New image files predicted (``--mode=predict --inputs``), a model dir that knows its dataset,
and ``--precision=auto``.

One cnn is trained a few steps on MNIST from the command line; the equality checks need no
accuracy. New files must give exactly the predictions of the same images read from the prepared
split: MNIST test digits written out as PNG files (no resizing), and the UCI digits as 8x8 PNG
and JPEG files predicted through a 28x28 prepare of the same files (bilinear resizing), which
is also the second dataset the MNIST model dir must recognise as another one.
"""

import csv
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from cli_helpers import assert_cli_error, run_cli
from conftest import DIGIT_NAMES

import data_pipeline
import estimator_bridge
import jobs
import preflight

MNIST_FILES = 40  # MNIST test digits written as files
DIGITS_TRAIN, DIGITS_TEST = 150, 30  # of the UCI digits, for the 28x28 folder dataset


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _listing(folder):
    """Every file under ``folder`` with its size and modification time."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            stat = os.stat(os.path.join(parent, name))
            found[os.path.join(parent, name)] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def model(mnist_data_dir, tmp_path_factory):
    """A cnn trained 6 steps on MNIST by ``main.py`` with the default precision (auto)."""
    root = tmp_path_factory.mktemp("predict_inputs")
    model_dir = root / "model"
    run = run_cli(
        "--mode=train",
        f"--data_dir={mnist_data_dir}",
        f"--model_dir={model_dir}",
        "--batch_size=32",
        "--train_steps=6",
        "--seed=3",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return root, model_dir, run


@pytest.fixture(scope="module")
def mnist_pngs(mnist_source, tmp_path_factory):
    """The first MNIST test digits as PNG files, in nested folders, plus a file that is no image."""
    root = tmp_path_factory.mktemp("mnist_pngs")
    images = mnist_source.splits["test"][0][:MNIST_FILES]
    for index, image in enumerate(images):
        folder = root / ("a" if index < MNIST_FILES // 2 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:03d}.png").write_bytes(tf.io.encode_png(image[..., None]).numpy())
    (root / "notes.txt").write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def digits28(digits, tmp_path_factory):
    """UCI digits as an 8x8 image folder (test files alternately PNG and JPEG), prepared 28x28.

    Returns:
        The folder and the prepared data dir.
    """
    images, labels = digits
    root = tmp_path_factory.mktemp("digits_files")
    for index in range(DIGITS_TRAIN + DIGITS_TEST):
        split = "train" if index < DIGITS_TRAIN else "test"
        folder = root / split / DIGIT_NAMES[labels[index]]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = images[index][..., None]
        if index % 2:
            (folder / f"{index:04d}.jpg").write_bytes(tf.io.encode_jpeg(pixels).numpy())
        else:
            (folder / f"{index:04d}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    data_dir = tmp_path_factory.mktemp("digits28_data")
    spec = data_pipeline.prepare(data_dir, root, image_size=(28, 28), progress=False)
    assert spec.resize == "bilinear" and spec.image_shape == (28, 28, 1)
    return root, data_dir


def _predict(data_dir, model_dir, out, *extra):
    return run_cli(
        "--mode=predict",
        f"--data_dir={data_dir}",
        f"--model_dir={model_dir}",
        f"--output_dir={out}",
        "--precision=float32",
        *extra,
    )


def _split_rows(data_dir, model_dir, out, limit):
    """The prepared test split's predictions (predictions-test.csv) by the same checkpoint."""
    run = _predict(data_dir, model_dir, out, f"--limit={limit}")
    assert run.returncode == 0, run.stderr[-2000:]
    return _rows(out / "predictions-test.csv")


def _assert_same(new_rows, split_rows):
    assert len(new_rows) == len(split_rows)
    for new, old in zip(new_rows, split_rows):
        assert new["class"] == old["class"], (new, old)
        assert abs(float(new["probability"]) - float(old["probability"])) <= 1e-6, (new, old)


def test_training_names_its_precision_first(model):
    _, _, run = model
    precision, reason = preflight.choose_precision("auto")
    first = [line for line in run.stderr.splitlines() if line.strip()][0]
    assert first == f"precision: {precision} ({reason})"


def test_precision_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(preflight, "gpu_compute_capabilities", lambda: [])
    monkeypatch.setattr(preflight.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(preflight, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert preflight.choose_precision("auto") == (
        "mixed_bfloat16",
        "auto: this CPU has avx512_bf16",
    )
    monkeypatch.setattr(preflight, "cpu_flags", lambda: {"avx2", "fma"})
    assert preflight.choose_precision("auto") == (
        "float32",
        "auto: this CPU has no avx512_bf16 or amx_bf16",
    )
    monkeypatch.setattr(preflight, "cpu_flags", lambda: None)  # cannot tell: float32
    assert preflight.choose_precision("auto")[0] == "float32"
    monkeypatch.setattr(preflight, "gpu_compute_capabilities", lambda: [(8, 6)])
    assert preflight.choose_precision("auto")[0] == "mixed_bfloat16"
    monkeypatch.setattr(preflight, "gpu_compute_capabilities", lambda: [(7, 5)])
    assert preflight.choose_precision("auto")[0] == "float32"
    assert preflight.choose_precision("float32") == ("float32", "")  # named: nothing to say


@pytest.fixture(scope="module")
def png_predictions(model, mnist_pngs, mnist_data_dir):
    """``predict --inputs`` of the PNG folder by the checkpoint: the run and its CSV rows."""
    root, model_dir, _ = model
    out = root / "pngs"
    run = _predict(mnist_data_dir, model_dir, out, f"--inputs={mnist_pngs}", "--top_k=3")
    assert run.returncode == 0, run.stderr[-2000:]
    return run, out, _rows(out / "predictions.csv")


def test_a_folder_of_pngs_equals_the_prepared_split(
    model, png_predictions, mnist_pngs, mnist_data_dir
):
    root, model_dir, _ = model
    run, out, rows = png_predictions
    result = json.loads(run.stdout)
    assert result["examples"] == MNIST_FILES and result["csv"] == str(out / "predictions.csv")
    assert list(rows[0]) == [
        "file",
        "class",
        "class_name",
        "probability",
        "class_2",
        "class_name_2",
        "probability_2",
        "class_3",
        "class_name_3",
        "probability_3",
    ]
    # Sorted walk: a/000..019, then b/c/020..039: the split's order.
    assert [os.path.basename(r["file"]) for r in rows] == [f"{i:03d}.png" for i in range(40)]
    _assert_same(rows, _split_rows(mnist_data_dir, model_dir, root / "split", MNIST_FILES))
    for row in rows:
        probabilities = [float(row[k]) for k in ("probability", "probability_2", "probability_3")]
        assert probabilities == sorted(probabilities, reverse=True)
        assert row["class_name"] == row["class"]  # MNIST's classes are named by their index

    # A glob and a single file give the same rows.
    glob_out, one_out = root / "glob", root / "one"
    run = _predict(mnist_data_dir, model_dir, glob_out, f"--inputs={mnist_pngs}/**/0[0-2]*.png")
    assert run.returncode == 0, run.stderr[-2000:]
    assert _rows(glob_out / "predictions.csv") == rows[:30]
    single = rows[25]["file"]
    run = _predict(mnist_data_dir, model_dir, one_out, f"--inputs={single}", "--top_k=1")
    assert run.returncode == 0, run.stderr[-2000:]
    assert _rows(one_out / "predictions.csv") == [
        {k: rows[25][k] for k in ("file", "class", "class_name", "probability")}
    ]


def test_an_export_predicts_the_same(model, png_predictions, mnist_pngs, mnist_data_dir):
    root, model_dir, _ = model
    config = estimator_bridge.Config(
        data_dir=str(mnist_data_dir), model_dir=str(model_dir), export_dir=str(root / "export")
    )
    jobs.export(config)
    out = root / "served"
    run = _predict(
        mnist_data_dir, model_dir, out, f"--inputs={mnist_pngs}", f"--export_dir={root / 'export'}"
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["checkpoint"] is None
    assert_cli_error(
        _predict(mnist_data_dir, model_dir, out, f"--inputs={mnist_pngs}", f"--export_dir={out}"),
        "holds no SavedModel",
        "--mode=export",
    )
    served = _rows(out / "predictions.csv")
    by_checkpoint = png_predictions[2]
    assert [r["file"] for r in served] == [r["file"] for r in by_checkpoint]
    for new, old in zip(served, by_checkpoint):
        assert new["class"] == old["class"]
        assert abs(float(new["probability"]) - float(old["probability"])) <= 1e-5


def test_resized_png_and_jpeg_files_equal_the_prepared_split(model, digits28, mnist_data_dir):
    """8x8 files, bilinearly resized to 28x28 as prepare did, by the MNIST model (a note says)."""
    root, model_dir, _ = model
    folder, data_dir = digits28
    out = root / "digits"
    run = _predict(data_dir, model_dir, out, f"--inputs={folder / 'test'}", "--plot")
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("note: "), lines
    assert f"trained on {mnist_data_dir} (" in lines[0] and str(data_dir) in lines[0]
    rows = _rows(out / "predictions.csv")
    assert {os.path.splitext(r["file"])[1] for r in rows} == {".png", ".jpg"}
    assert {r["class_name"] for r in rows} <= set(DIGIT_NAMES)
    split = _split_rows(data_dir, model_dir, root / "digits_split", DIGITS_TEST)
    assert [os.path.basename(r["file"]) for r in split] == [
        os.path.basename(r["file"]) for r in rows
    ]
    _assert_same(rows, split)
    assert os.path.getsize(out / "samples-inputs.png") > 0


def test_files_that_do_not_load_stop_before_anything_is_written(model, mnist_data_dir, tmp_path):
    _, model_dir, _ = model
    bad = tmp_path / "bad"
    bad.mkdir()
    image = np.zeros((28, 28, 1), np.uint8)
    for index in range(5):
        (bad / f"{index}.png").write_bytes(tf.io.encode_png(image).numpy())
    (bad / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    assert_cli_error(
        _predict(mnist_data_dir, model_dir, out, f"--inputs={bad}"), str(bad / "3.png"), "decode"
    )
    assert not out.exists()

    (bad / "3.png").write_bytes(tf.io.encode_png(np.zeros((20, 20, 1), np.uint8)).numpy())
    out.mkdir()
    assert_cli_error(
        _predict(mnist_data_dir, model_dir, out, f"--inputs={bad}"),
        str(bad / "3.png"),
        "20x20",
        "--image_size",
    )
    assert os.listdir(out) == []

    for inputs, needle in [(tmp_path / "nowhere", "does not exist"), (out, "no image files")]:
        assert_cli_error(_predict(mnist_data_dir, model_dir, out, f"--inputs={inputs}"), needle)
    assert os.listdir(out) == []


def test_a_model_dir_knows_its_dataset(model, mnist_data_dir, digits28, tmp_path):
    root, model_dir, _ = model
    _, digits_dir = digits28
    evaluate = ("--mode=evaluate", f"--model_dir={model_dir}", "--precision=float32", "--limit=50")
    run = run_cli(*evaluate, f"--data_dir={mnist_data_dir}")
    assert run.returncode == 0 and not run.stderr.strip(), run.stderr[-2000:]
    before = _listing(model_dir)

    run = run_cli(
        "--mode=train", f"--data_dir={digits_dir}", f"--model_dir={model_dir}", "--train_steps=9"
    )
    assert_cli_error(
        run,
        str(model_dir),
        str(mnist_data_dir),
        str(digits_dir),
        "--model_dir",
        "--warm_start_from",
    )
    assert _listing(model_dir) == before

    # Evaluating another dataset: one line, and its results in a folder of their own.
    run = run_cli(*evaluate, f"--data_dir={digits_dir}")
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("note: ") and str(digits_dir) in lines[0]
    spec = data_pipeline.load_spec(digits_dir)
    matrix = json.loads(run.stdout)["confusion_matrix"]
    assert os.path.dirname(matrix) == str(model_dir / f"eval_test-{spec.dataset_id[:8]}")
    assert all(_listing(model_dir).get(path) == stat for path, stat in before.items())

    # The same dataset prepared again elsewhere (other shards) is the same dataset.
    assert data_pipeline.load_spec(mnist_data_dir).dataset_id == (
        data_pipeline.prepare(
            tmp_path / "mnist_again",
            source=data_pipeline.open_source(os.environ["MNIST_DIR"]),
            records_per_shard=20000,
            progress=False,
        ).dataset_id
    )


@pytest.mark.parametrize("mode", ["evaluate", "predict", "export"])
def test_a_missing_model_dir_says_train_first(mode, mnist_data_dir, tmp_path):
    run = run_cli(f"--mode={mode}", f"--data_dir={mnist_data_dir}", f"--model_dir={tmp_path / 'x'}")
    assert_cli_error(run, str(tmp_path / "x"), "train first", "--mode=train")


def test_an_export_under_auto_precision_is_float32_and_has_its_onnx_file(model, mnist_data_dir):
    """--precision=auto picks bf16 for training on a bf16 CPU; the export stays float32."""
    import serving

    root, model_dir, _ = model
    config = estimator_bridge.Config(
        data_dir=str(mnist_data_dir),
        model_dir=str(model_dir),
        export_dir=str(root / "export_auto"),
        precision="mixed_bfloat16",
        precision_reason="auto: this CPU has avx512_bf16",
    )
    result = jobs.export(config)
    assert result["onnx"] and os.path.isfile(result["onnx"])  # onnxruntime has no bf16 kernels
    images = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    served = serving.load(result["saved_model"], "predict", engine="tensorflow")(image=images)
    assert served["logits"].dtype == np.float32
    onnx = serving.load(result["saved_model"], "predict", engine="onnxruntime")(image=images)
    np.testing.assert_allclose(onnx["probabilities"], served["probabilities"], atol=1e-5)
