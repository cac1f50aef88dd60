"""The small things a new user meets first: TensorFlow's start-up noise, prediction plots that fit,
a corrupt image found fast with nothing half-written left behind."""

import os
import subprocess
import sys

import numpy as np
from cli_helpers import REPO

# TensorFlow 2.15's C++ start-up notices on a machine without a GPU (about 14 lines).
NOISE = ("cuda", "cudnn", "cufft", "cublas", "tensorrt", "cpu_feature_guard", "onednn")


def _fresh(script):
    """Starts ``python -c script`` as a user's own script would run: no log level set."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO)
    return subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_importing_the_project_prints_no_tensorflow_start_up_noise():
    scripts = {
        "serving": "import serving, tensorflow as tf; print(tf.constant(1).numpy())",
        "keras_models": "import keras_models; print(keras_models.build_model('cnn').name)",
        # The control: TensorFlow imported first, before any project module could choose.
        "tensorflow first": "import tensorflow, serving",
    }
    runs = {name: _fresh(script) for name, script in scripts.items()}
    results = {name: run.communicate(timeout=120) for name, run in runs.items()}
    for name, run in runs.items():
        assert run.returncode == 0, results[name][1][-2000:]
    for name in ("serving", "keras_models"):
        stderr = results[name][1].lower()
        assert not [word for word in NOISE if word in stderr], results[name][1]
    # Without the project's default the same machine prints the noise: the check above means it.
    assert any(word in results["tensorflow first"][1].lower() for word in NOISE)


def test_sample_indices_span_the_classes():
    import jobs

    # Sorted test folders: every record of class 0 first, then class 1, ...
    labels = np.repeat(np.arange(10), 50)
    chosen = jobs.sample_indices(labels, 16)
    assert len(chosen) == 16 and chosen == sorted(set(chosen))
    assert sorted(set(labels[chosen])) == list(range(10))  # every class, not 16 zeros
    assert chosen == jobs.sample_indices(labels, 16)  # the same every time
    # More classes than cells: 16 classes spread from the first to the last, one image each.
    many = np.repeat(np.arange(40), 3)
    picked = many[jobs.sample_indices(many, 16)]
    assert len(set(picked)) == 16 and picked.min() == 0 and picked.max() == 39
    assert jobs.sample_indices(np.array([3, 3, 3]), 16) == [0, 1, 2]


def test_samples_plot_fits_long_class_names(tmp_path):
    """24 classes with 40-character names: the title and captions stay inside the figure and
    apart from each other, and the sampled cells show 16 different classes."""
    import matplotlib

    matplotlib.use("Agg")
    from conftest import write_png_folder

    import data_pipeline
    import estimator_bridge
    import jobs

    names = [f"category number {i:02d} with a long descriptive name" for i in range(24)]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, [24 * 4, 8, 8], dtype=np.uint8)
    labels = np.repeat(np.arange(24), 4)
    order = np.r_[
        np.arange(0, 96, 4), np.arange(1, 96, 4), np.arange(2, 96, 4), np.arange(3, 96, 4)
    ]
    folder = write_png_folder(tmp_path / "src", images[order], labels[order], names, 48)
    spec = data_pipeline.prepare(str(tmp_path / "data"), source_dir=str(folder))
    test_labels = np.array(
        [
            spec.class_names.index(os.path.basename(os.path.dirname(f)))
            for f in spec.record_files("test")
        ]
    )
    config = estimator_bridge.Config(
        model="a_model_file_with_a_rather_long_name_for_a_title.keras",
        data_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path / "out"),
        plot=True,
    )
    os.makedirs(config.output_dir)
    chosen = jobs.sample_indices(test_labels, 16)
    probabilities = np.full(24, 0.01)
    samples = {
        i: {"classes": np.int64((test_labels[i] + n % 2) % 24), "probabilities": probabilities}
        for n, i in enumerate(chosen)
    }
    paths = jobs._plot_predictions(config, samples, test_labels, spec.class_names)
    assert paths == [os.path.join(config.output_dir, "samples-test.png")]
    assert os.path.getsize(paths[0]) > 10_000

    rows = [(np.zeros([8, 8, 1]), samples[i], int(test_labels[i])) for i in chosen]
    fig = jobs.samples_figure(rows, spec.class_names, "a_model_file_with_a_rather_long_name")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    texts = [fig._suptitle] + [ax.title for ax in fig.axes]
    boxes = [t.get_window_extent(renderer) for t in texts if t.get_text()]
    assert len(boxes) == 17
    for box in boxes:  # inside the figure
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1
    for i, a in enumerate(boxes):  # no two captions (or the title) overlap
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)
    # The captions name 16 different true classes (red ones name theirs on a second line).
    shown = {int(test_labels[i]) for i in chosen}
    assert len(shown) == 16


def test_a_corrupt_image_is_named_and_leaves_no_temporary_shard(digits_folder, tmp_path):
    import shutil

    import pytest

    import data_pipeline
    from data_pipeline.writer import TMP_PREFIX

    source = tmp_path / "src"
    shutil.copytree(digits_folder, source)
    files = sorted((source / "train").rglob("*.png"))
    bad = files[len(files) // 2]  # amid a chunk of ~1,500 good images
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated PNG: its header reads, its data do not
    data_dir = tmp_path / "data"
    with pytest.raises(data_pipeline.DataError, match="cannot decode the image") as raised:
        data_pipeline.prepare(str(data_dir), source_dir=str(source), records_per_shard=500)
    assert str(bad) in str(raised.value)
    left = sorted(p.name for p in data_dir.iterdir())
    assert not [name for name in left if name.startswith(TMP_PREFIX)], left
    assert "dataset_spec.json" not in left
