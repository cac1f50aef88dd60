"""estimator_bridge: per-mode EstimatorSpecs for every network, and real training end to end."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from cli_helpers import (
    assert_cli_error,
    estimator_probabilities,
    run_cli,
    run_main,
)

import data_pipeline
import estimator_bridge
import jobs
import keras_models
from estimator_bridge import EVAL, PREDICT, TRAIN
from keras_models import keras3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8


@pytest.fixture(scope="module")
def real_batch(mnist_data_dir):
    """The first 8 real test images and labels."""
    features, labels = next(iter(data_pipeline.make_dataset(mnist_data_dir, "test", BATCH)))
    return features["image"].numpy(), labels.numpy()


def _spec(name_or_builder, mode, real_batch, **params):
    images, labels = real_batch
    with tf.Graph().as_default():
        features = {"image": tf.constant(images)}
        spec = estimator_bridge.model_fn(
            features,
            None if mode == PREDICT else tf.constant(labels),
            mode,
            {"model": name_or_builder, "learning_rate": 1e-3, **params},
        )
        return spec, tf.compat.v1.get_default_graph()


def _cudnn_variants(graph):
    """Names of the graph's cuDNN GRU functions (Keras adds one per GRU for Grappler)."""
    return [
        f.signature.name
        for f in graph.as_graph_def().library.function
        if "gpu_gru" in f.signature.name
    ]


@pytest.mark.parametrize("name", keras_models.MODEL_NAMES)
def test_predict_spec(name, real_batch):
    spec, graph = _spec(name, PREDICT, real_batch, intermediates=True)
    p = spec.predictions
    assert p["classes"].dtype == tf.int64 and p["classes"].shape.as_list() == [BATCH]
    assert p["probabilities"].dtype == tf.float32
    assert p["probabilities"].shape.as_list() == [BATCH, 10]
    assert p["logits"].shape.as_list() == [BATCH, 10]
    # Every named layer's output is exposed, derived from the Keras graph.
    layers = {layer.name for layer in keras_models.build_model(name).layers}
    assert layers - {"image"} <= set(p)
    assert "dense1" in p and p["dense1"].shape.as_list() == [BATCH, 1024]
    assert set(spec.export_outputs) == {"serving_default", "classification", "predict"}
    default = spec.export_outputs["serving_default"].outputs
    assert set(default) == {"classes", "class_names", "probabilities"}
    assert set(spec.export_outputs["predict"].outputs) == {*p, "class_names"}
    assert default["class_names"].dtype == tf.string
    assert default["class_names"].shape.as_list() == [BATCH]
    assert spec.loss is None and spec.train_op is None
    # Exports keep each GRU's cuDNN variant, for a server with a GPU.
    assert bool(_cudnn_variants(graph)) == (name != "cnn")


@pytest.mark.parametrize("name", keras_models.MODEL_NAMES)
def test_eval_spec(name, real_batch):
    spec, graph = _spec(name, EVAL, real_batch)
    assert _cudnn_variants(graph) == []  # no GPU here: Grappler would optimise it for nothing
    assert spec.loss.shape.rank == 0 and spec.loss.dtype == tf.float32
    assert set(spec.eval_metric_ops) == {"accuracy", "mean_per_class_accuracy", "confusion_matrix"}
    value, update = spec.eval_metric_ops["confusion_matrix"]
    assert value.shape.as_list() == [10, 10]
    assert spec.train_op is None


@pytest.mark.parametrize("name", keras_models.MODEL_NAMES)
def test_train_spec(name, real_batch):
    spec, graph = _spec(name, TRAIN, real_batch)
    assert spec.loss.shape.rank == 0 and spec.loss.dtype == tf.float32
    assert spec.train_op is not None
    assert _cudnn_variants(graph) == []
    # Dropout is active in TRAIN mode only: the graph holds a live dropout mask.
    assert any("dropout" in op.name and op.type == "RandomUniform" for op in graph.get_operations())
    summaries = {t.op.name for t in graph.get_collection(tf.compat.v1.GraphKeys.SUMMARIES)}
    assert {"train_accuracy", "learning_rate", "input_images"} <= summaries


def test_mixed_bfloat16_spec_keeps_float32_outputs(real_batch):
    spec, graph = _spec("cnn", TRAIN, real_batch, precision="mixed_bfloat16")
    assert spec.loss.dtype == tf.float32
    kinds = {
        v.dtype.base_dtype for v in graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)
    }
    assert tf.bfloat16 not in kinds  # variables stay float32
    assert any(
        op.type == "Conv2D" and op.get_attr("T") == tf.bfloat16 for op in graph.get_operations()
    )
    assert keras.mixed_precision.global_policy().name == "float32"  # restored


def test_recurrent_layers_get_the_fused_loop_with_the_same_maths(real_batch):
    """In an Estimator graph Keras runs GRUs cell by cell; the bridge restores the fused loop."""
    images, _ = real_batch
    with tf.Graph().as_default() as graph:
        model = keras_models.build_model("birnn")
        generic = model(tf.constant(images), training=False)
        before = {f.signature.name for f in graph.as_graph_def().library.function}
        estimator_bridge._use_fused_recurrent_kernels(model)
        fused = model(tf.constant(images), training=False)
        after = {f.signature.name for f in graph.as_graph_def().library.function}
        grus = [layer for layer in model.layers if isinstance(layer, keras.layers.GRU)]
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            generic_value, fused_value = session.run([generic, fused])
    assert len(grus) == 4 and all(layer._could_use_gpu_kernel for layer in grus)
    assert not any("standard_gru" in name for name in before)
    assert any("standard_gru" in name for name in after - before)
    np.testing.assert_allclose(fused_value, generic_value, rtol=1e-4, atol=1e-5)

    # A GRU the fused loop cannot run (relu activation) keeps Keras' per-step cell.
    inputs = keras.Input((28, 28), name="rows")
    outputs = keras.layers.GRU(4, activation="relu", name="gru")(inputs)
    odd = keras.Model(inputs, outputs)
    estimator_bridge._use_fused_recurrent_kernels(odd)
    assert not odd.get_layer("gru")._could_use_gpu_kernel


def test_fused_gru_trains_in_the_estimator_graph(real_batch):
    images, labels = real_batch
    spec, graph = _spec("rnn", TRAIN, real_batch, intermediates=False)
    with graph.as_default(), tf.compat.v1.Session() as session:
        session.run(tf.compat.v1.global_variables_initializer())
        losses = [session.run([spec.train_op, spec.loss])[1] for _ in range(8)]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]  # eight Adam steps on one batch of 8 fit it


def _bn_l2_model(dropout_rate=0.0):
    """A network with BatchNorm and an L2 regulariser, to check updates and regularisation."""
    inputs = keras.Input((28, 28, 1), name="image")
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = keras.layers.Dense(16, name="dense1", kernel_regularizer=keras.regularizers.l2(0.01))(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("relu", name="relu")(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="bn_l2")


def test_train_runs_batchnorm_updates_and_adds_regularisers(mnist_data_dir, tmp_path, real_batch):
    images, labels = real_batch
    spec, graph = _spec(_bn_l2_model, TRAIN, real_batch)
    with graph.as_default(), tf.compat.v1.Session() as session:
        session.run(tf.compat.v1.global_variables_initializer())
        cross_entropy = graph.get_tensor_by_name("sparse_softmax_cross_entropy_loss/value:0")
        reg = [t for t in graph.get_collection(estimator_bridge.LOSS_COLLECTION)]
        total, ce = session.run([reg[0], cross_entropy])
        kernel = [v for v in tf.compat.v1.global_variables() if v.name == "dense1/kernel:0"][0]
        l2 = 0.01 * np.sum(session.run(kernel) ** 2)
        np.testing.assert_allclose(total - ce, l2, rtol=1e-4)

    model_dir = str(tmp_path / "bn")
    estimator = tf.estimator.Estimator(
        estimator_bridge.model_fn,
        model_dir=model_dir,
        params={"model": _bn_l2_model, "learning_rate": 1e-3},
    )
    estimator.train(
        data_pipeline.make_input_fn(mnist_data_dir, "train", 64, num_epochs=None, limit=512),
        max_steps=5,
    )
    reader = tf.train.load_checkpoint(model_dir)
    assert reader.get_tensor("global_step") == 5
    moving_mean = reader.get_tensor("bn/moving_mean")
    moving_var = reader.get_tensor("bn/moving_variance")
    assert np.abs(moving_mean).max() > 1e-3  # started at 0: the update ops ran
    assert np.abs(moving_var - 1).max() > 1e-3  # started at 1


# ---- end to end on real MNIST ------------------------------------------------------------


@pytest.fixture(scope="session")
def cnn_config(mnist_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cnn_run")
    return estimator_bridge.Config(
        model="cnn",
        data_dir=mnist_data_dir,
        model_dir=str(root / "model"),
        batch_size=64,
        train_steps=60,
        eval_limit=500,
        seed=1,
        save_checkpoints_steps=30,
        export_dir=str(root / "export"),
        output_dir=str(root / "predictions"),
        progress=False,
    )


@pytest.fixture(scope="session")
def trained_cnn(cnn_config):
    result = jobs.train(cnn_config)
    return cnn_config, result


def test_train_reaches_target_step_and_learns(trained_cnn):
    config, result = trained_cnn
    assert result["global_step"] == 60
    assert result["examples_per_sec"] > 0
    assert tf.train.latest_checkpoint(config.model_dir).endswith("model.ckpt-60")
    metrics = jobs.evaluate(config)
    assert metrics["global_step"] == 60 and metrics["examples"] == 500
    assert metrics["accuracy"] > 0.7  # 60 steps of 64 real digits: far above chance (0.1)
    assert 0 < metrics["loss"] < 1.5
    names, matrix = jobs.read_confusion_matrix(metrics["confusion_matrix"])
    assert names == [str(digit) for digit in range(10)]  # the spec's class names
    with open(metrics["confusion_matrix"]) as handle:
        assert handle.readline().strip() == "true \\ predicted," + ",".join(names)
        assert all(line.startswith(f"{name},") for line, name in zip(handle, names))
    assert matrix.shape == (10, 10) and matrix.sum() == 500
    assert np.trace(matrix) / 500 == pytest.approx(metrics["accuracy"], abs=1e-6)


def test_training_batches_are_full_and_static_evaluation_keeps_every_example(cnn_config):
    train = estimator_bridge.make_input_fn(cnn_config, "train", training=True)()
    features, labels = train.element_spec
    assert features["image"].shape.as_list() == [64, 28, 28, 1] and labels.shape == [64]
    # Fewer records than one batch: they repeat before batching, so full batches still come.
    tiny = dataclasses.replace(cnn_config, train_limit=10)
    _, labels = next(iter(estimator_bridge.make_input_fn(tiny, "train", training=True)()))
    _, first_ten = next(iter(data_pipeline.make_dataset(tiny.data_dir, "train", 10, limit=10)))
    assert labels.shape == [64] and set(labels.numpy()) <= set(first_ten.numpy())
    # Evaluation keeps its short last batch: every one of the eval_limit examples is seen.
    evaluation = estimator_bridge.make_input_fn(
        dataclasses.replace(cnn_config, eval_batch_size=300), "test", training=False
    )()
    assert evaluation.element_spec[1].shape.as_list() == [None]
    assert [len(labels) for _, labels in evaluation] == [300, 200]


def test_rerun_resumes_and_stops_at_target(trained_cnn, tmp_path):
    config, _ = trained_cnn
    # Same target: nothing to do.
    assert jobs.train(config)["global_step"] == 60
    # A copy of the model dir trained further resumes from 60, not from 0.
    model_dir = str(tmp_path / "resumed")
    shutil.copytree(config.model_dir, model_dir)
    further = dataclasses.replace(config, model_dir=model_dir, train_steps=70)
    assert jobs.train(further)["global_step"] == 70
    steps = sorted(
        int(f.split("-")[1].split(".")[0]) for f in os.listdir(model_dir) if f.endswith(".index")
    )
    assert steps[-1] == 70 and 60 in steps


def test_cli_evaluate_prints_json_for_both_splits(trained_cnn):
    config, _ = trained_cnn
    run = run_main(
        "--mode=evaluate",
        "--model=cnn",
        f"--data_dir={config.data_dir}",
        f"--model_dir={config.model_dir}",
        "--eval_split=both",
        "--limit=300",
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["split"] == "both" and result["global_step"] == 60
    for split in ("train", "test"):
        assert result[split]["examples"] == 300
        assert 0.5 < result[split]["accuracy"] <= 1
    assert "Traceback" not in run.stderr and "deprecat" not in run.stderr.lower()


def test_predict_writes_csv_and_plots(trained_cnn, tmp_path):
    config, _ = trained_cnn
    out = dataclasses.replace(config, output_dir=str(tmp_path / "pred"), plot=True)
    result = jobs.predict(out)
    rows = np.genfromtxt(result["csv"], delimiter=",", names=True, dtype=None, encoding="utf-8")
    columns = ("index", "label", "class", "probability", "label_name", "class_name")
    assert rows.dtype.names == columns
    assert len(rows) == 500 == result["examples"]
    # The spec's class names (an MNIST spec's are "0" ... "9").
    np.testing.assert_array_equal(rows["label_name"].astype(str), rows["label"].astype(str))
    np.testing.assert_array_equal(rows["class_name"].astype(str), rows["class"].astype(str))
    np.testing.assert_array_equal(rows["index"], np.arange(500))
    _, labels = next(iter(data_pipeline.make_dataset(config.data_dir, "test", 500)))
    np.testing.assert_array_equal(rows["label"], labels.numpy())
    assert np.all((rows["probability"] > 0) & (rows["probability"] <= 1))
    assert result["accuracy"] == pytest.approx(np.mean(rows["label"] == rows["class"]))
    assert [os.path.basename(p) for p in result["plots"]] == ["samples-test.png", "conv1-test.png"]
    for path in result["plots"]:
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def _copy_latest_checkpoint(model_dir, out_dir):
    """Copies the latest checkpoint (and the state file naming it) into ``out_dir``."""
    os.makedirs(out_dir)
    prefix = os.path.basename(tf.train.latest_checkpoint(model_dir))
    for name in os.listdir(model_dir):
        if name == "checkpoint" or name.startswith(prefix + "."):
            shutil.copy(os.path.join(model_dir, name), out_dir)
    return os.path.join(out_dir, prefix)


def test_checkpoint_of_another_network_is_one_line_and_nothing_is_written(trained_cnn, tmp_path):
    config, _ = trained_cnn
    run = run_cli(
        "--mode=evaluate",
        "--model=rnn",
        f"--data_dir={config.data_dir}",
        f"--model_dir={config.model_dir}",
        "--limit=100",
    )
    assert_cli_error(
        run,
        "does not fit --model=rnn",
        "no gru1/gru_cell/kernel",
        "it was trained with --model=cnn;",
    )

    # Same network, other builder arguments: the first weight whose shape differs is named,
    # before the export folder is created.
    narrow = dataclasses.replace(
        config, model_params={"dense_units": 512}, export_dir=str(tmp_path / "export")
    )
    with pytest.raises(estimator_bridge.UsageError) as info:
        jobs.export(narrow)
    assert "dense1/kernel is [3136, 1024] there, the network's is [3136, 512]" in str(info.value)
    assert not os.path.exists(narrow.export_dir)

    # Resuming another network's model dir stops before writing a checkpoint or an event file.
    model_dir = str(tmp_path / "resume")
    _copy_latest_checkpoint(config.model_dir, model_dir)
    before = sorted(os.listdir(model_dir))
    wrong = dataclasses.replace(config, model="cnn_rnn", model_dir=model_dir, train_steps=70)
    with pytest.raises(estimator_bridge.UsageError, match="does not fit --model=cnn_rnn"):
        jobs.train(wrong)
    with pytest.raises(estimator_bridge.UsageError, match="does not fit --model=cnn_rnn"):
        jobs.train_and_evaluate(wrong)
    assert sorted(os.listdir(model_dir)) == before


def test_unreadable_checkpoint_is_one_line(trained_cnn, tmp_path):
    config, _ = trained_cnn
    prefix = _copy_latest_checkpoint(config.model_dir, str(tmp_path / "model"))
    with open(prefix + ".index", "wb") as handle:
        handle.write(b"not a checkpoint index")
    run = run_cli(
        "--mode=predict",
        "--model=cnn",
        f"--data_dir={config.data_dir}",
        f"--model_dir={tmp_path / 'model'}",
        f"--output_dir={tmp_path / 'predictions'}",
    )
    assert_cli_error(run, f"checkpoint {prefix} is unreadable")
    assert not os.path.exists(tmp_path / "predictions")


@pytest.fixture(scope="session")
def exported_cnn(trained_cnn):
    config, _ = trained_cnn
    keras_path = os.path.join(os.path.dirname(config.model_dir), "cnn.keras")
    result = jobs.export(dataclasses.replace(config, keras_output=keras_path))
    return config, result


def test_export_layout(exported_cnn):
    """A TF Serving version folder; its signatures and what they serve: test_networks.py."""
    config, result = exported_cnn
    path = result["saved_model"]
    assert os.path.dirname(path) == config.export_dir
    assert os.path.basename(path).isdigit()  # TF Serving version directory
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    assert os.path.exists(os.path.join(path, "variables", "variables.index"))


def test_keras_round_trip_both_ways(exported_cnn, real_batch, tmp_path):
    config, result = exported_cnn
    images, _ = real_batch
    expected = estimator_probabilities(config, images)
    model = keras3.load_model(result["keras"])  # a Keras 3 file: translated back
    np.testing.assert_allclose(
        tf.nn.softmax(model(images, training=False)).numpy(), expected, atol=1e-5
    )
    # Back again: a fresh Estimator warm-started from the .keras file predicts the same, and
    # one training step from there moves on from step 0 with those weights.
    warm = dataclasses.replace(
        config,
        model_dir=str(tmp_path / "warm"),
        warm_start_from=result["keras"],
        train_steps=1,
        learning_rate=1e-12,
    )
    assert jobs.train(warm)["global_step"] == 1
    np.testing.assert_allclose(estimator_probabilities(warm, images), expected, atol=1e-4)


def test_summaries_reach_tensorboard(trained_cnn):
    config, _ = trained_cnn
    tags = set()
    for path in tf.io.gfile.glob(os.path.join(config.model_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    expected = {"loss", "train_accuracy", "learning_rate", "conv1_feature_maps/image"}
    assert expected <= tags, tags
    assert any(tag.startswith("input_images/image/") for tag in tags)


def test_conv1_feature_maps_are_a_grid_in_tensorboard(trained_cnn):
    config, _ = trained_cnn
    images = []
    for path in tf.io.gfile.glob(os.path.join(config.model_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            images += [v.image for v in event.summary.value if v.tag == "conv1_feature_maps/image"]
    assert images
    # 32 maps of 28 x 28 in a square of 6 x 6 tiles, a one-pixel line between them (not the
    # 28 x 896 strip it was).
    assert {(image.height, image.width) for image in images} == {(6 * 29 - 1, 6 * 29 - 1)}
    pixels = tf.io.decode_png(images[0].encoded_image_string).numpy()
    assert pixels.shape == (173, 173, 1)
    assert (pixels[28, :, 0] == 255).all() and (pixels[:, 28, 0] == 255).all()  # the grid lines
    assert len(np.unique(pixels[:28, :28])) > 10  # a real feature map in the first tile


def test_every_training_step_fetches_the_same_tensors(cnn_config, tmp_path, monkeypatch):
    """Summaries leave a step's fetches alone, so Grappler optimises the training graph once.

    The Estimator's own SummarySaverHook fetched them only on the steps that write them: the
    first and second steps differed. ``SummaryHook`` feeds its predicate on every step instead.
    """
    steps = []
    do_run = tf.compat.v1.Session._do_run

    def recording(self, handle, targets, fetches, feeds, *args):
        names = sorted(tensor.name for tensor in fetches)
        if "sparse_softmax_cross_entropy_loss/value:0" in names:  # a training step
            fed = tuple(sorted(tensor.deref().name for tensor in feeds))
            steps.append((tuple(sorted(op.name for op in targets)), tuple(names), fed))
        return do_run(self, handle, targets, fetches, feeds, *args)

    monkeypatch.setattr(tf.compat.v1.Session, "_do_run", recording)
    config = dataclasses.replace(cnn_config, model_dir=str(tmp_path / "m"), train_steps=3)
    jobs.train(config)
    assert len(steps) == 3 and len(set(steps)) == 1, steps
    assert steps[0][2] == ("summaries_due:0",)
    # Written when due all the same: the first step's, at global step 1.
    written = {}
    for path in tf.io.gfile.glob(os.path.join(config.model_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                written.setdefault(value.tag.split("/")[0], set()).add(event.step)
    for tag in ("loss", "train_accuracy", "learning_rate", "input_images", "conv1_feature_maps"):
        assert written.get(tag) == {1}, (tag, written)


def test_train_and_evaluate_exports_the_best_checkpoint(mnist_data_dir, tmp_path):
    config = estimator_bridge.Config(
        model="cnn",
        data_dir=mnist_data_dir,
        model_dir=str(tmp_path / "model"),
        batch_size=64,
        train_steps=40,
        save_checkpoints_steps=20,
        eval_limit=300,
        eval_throttle_secs=0,
        seed=2,
        progress=False,
    )
    result = jobs.train_and_evaluate(config)
    assert result["global_step"] == 40 and result["split"] == "test"
    assert 0.3 < result["accuracy"] <= 1
    versions = os.listdir(result["best_export_dir"])
    assert versions and all(v.isdigit() for v in versions)
    for version in versions:
        assert os.path.exists(os.path.join(result["best_export_dir"], version, "saved_model.pb"))
