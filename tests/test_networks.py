"""Each network's seeded run: trained again bit for bit, exported, served every way.

Each network trains 3 steps on real MNIST with ``--seed`` once per session (``seeded_network``).
The same config trained again must write a bit-identical checkpoint (initial weights, dropout,
input order and augmentation all seeded), another seed must not. Each run is exported once; one
fresh interpreter that imports only TensorFlow, numpy and ``serving`` (no ``tfenv``, no
Estimator) serves the four exports, one after the other as a server holding several models would,
through ``serving.load`` (onnxruntime on the export's ``model.onnx``; the TensorFlow engine: raw
images through XLA, padded or not, and through the Session; ``tf.Example`` receivers; frozen and
not), TF Serving's loader (``tf.compat.v1.saved_model.load`` + ``Session.run``) and TensorFlow
2's ``signatures``, which must ignore ``model.onnx`` in the version folder; all must match
``estimator.predict`` to 1e-5. Four exports in one process also cover the function names that
XLA's eager import registers process-wide. The same interpreter runs ``saved_model_cli show
--all`` on each. One model is also called from 8 threads at once, and ``serving.load``'s timed
choice between the engines keeps the faster.
"""

import concurrent.futures
import dataclasses
import os
import pickle
import re
import sys
import threading
import time

import numpy as np
import pytest
from cli_helpers import (
    checkpoint_variables,
    differing_variables,
    estimator_probabilities,
    run_fresh_python,
)

import data_pipeline
import estimator_bridge
import jobs
import keras_models
import serving

SIGNATURES = {
    "serving_default",
    "predict",
    "examples:serving_default",
    "examples:predict",
    "examples:classification",
}


@pytest.fixture(scope="session")
def seeded_networks(mnist_data_dir, tmp_path_factory):
    """Name -> config of each network trained 3 steps with --seed=7 and augmentation.

    Treat as read-only: the tests below train the same configs again, or export them.
    """
    configs = {}
    for name in keras_models.MODEL_NAMES:
        root = tmp_path_factory.mktemp(f"seeded_{name}")
        configs[name] = estimator_bridge.Config(
            model=name,
            data_dir=str(mnist_data_dir),
            model_dir=str(root / "model"),
            export_dir=str(root / "export"),
            batch_size=16,
            train_steps=3,
            train_limit=500,
            seed=7,
            augment=True,  # so the augmentation's draws are covered by the determinism check too
            progress=False,
        )
        jobs.train(configs[name])
    return configs


@pytest.fixture(scope="session", params=keras_models.MODEL_NAMES)
def seeded_network(request, seeded_networks):
    """The config of one network's seeded run (read-only)."""
    return seeded_networks[request.param]


def test_same_seed_same_checkpoint(seeded_network, tmp_path):
    again = dataclasses.replace(seeded_network, model_dir=str(tmp_path / "again"))
    jobs.train(again)
    first = checkpoint_variables(seeded_network.model_dir)
    assert int(first["global_step"]) == 3
    assert differing_variables(first, checkpoint_variables(again.model_dir)) == []


@pytest.mark.parametrize("seeded_network", ["rnn"], indirect=True)
def test_other_seed_other_weights(seeded_network, tmp_path):
    other = dataclasses.replace(seeded_network, model_dir=str(tmp_path / "other"), seed=8)
    jobs.train(other)
    # The GRU kernels come from keras_models.GateOrthogonal: the seed reaches them too.
    differing = differing_variables(
        checkpoint_variables(seeded_network.model_dir), checkpoint_variables(other.model_dir)
    )
    assert {"gru1/gru_cell/kernel", "gru1/gru_cell/recurrent_kernel"} <= set(differing)


@pytest.fixture(scope="session")
def exports(seeded_networks):
    """Name -> SavedModel version folder of each network's seeded run."""
    return {name: jobs.export(config)["saved_model"] for name, config in seeded_networks.items()}


@pytest.fixture(scope="session")
def exported(seeded_network, exports):
    """(config, SavedModel version folder) of one network's seeded run."""
    return seeded_network, exports[seeded_network.model]


@pytest.fixture(scope="session")
def test_digits(mnist_source):
    """The first 16 real test images (float32 [16, 28, 28, 1] in [0, 1]) and labels."""
    images, labels = mnist_source.splits["test"]
    return (images[:16, ..., None] / 255.0).astype(np.float32), labels[:16]


SERVE_EVERY_WAY = """
import contextlib, io, os, pickle, sys
import numpy as np, tensorflow as tf
import serving
from tensorflow.python.tools import saved_model_cli

folder, *paths = sys.argv[1:]
images = np.load(os.path.join(folder, "images.npy"))
examples = pickle.loads(open(os.path.join(folder, "examples.pkl"), "rb").read())
for number, path in enumerate(paths):
    out = {}
    # The export's model.onnx sits in the version folder every loader below reads.
    assert os.path.exists(os.path.join(path, "model.onnx"))
    # Each engine forced (serving.load's timed choice between them: test_auto_engine_...).
    out["serving_onnx"] = serving.load(path, engine="onnxruntime")(image=images)["probabilities"]
    out["serving_onnx_predict"] = serving.load(path, "predict", engine="onnxruntime")(
        images)["probabilities"]
    tf_auto = serving.load(path, engine="tensorflow")
    # "auto" kept one of the two raw-image paths; the other is loaded on purpose.
    xla = tf_auto if tf_auto.xla else serving.load(path, xla=True, engine="tensorflow")
    assert xla.xla, "16 raw images should take the XLA path"
    out["serving_xla"] = xla(image=images)["probabilities"]
    # 5 and 11 images: padded to XLA programs for 8 and 16, the padding cut off again.
    out["serving_xla_padded"] = np.concatenate(
        [xla(image=images[:5])["probabilities"], xla(image=images[5:])["probabilities"]])
    session = serving.load(path, xla=False, engine="tensorflow") if tf_auto.xla else tf_auto
    out["serving_session"] = session(image=images)["probabilities"]
    out["serving_unfrozen"] = serving.load(path, freeze=False, engine="tensorflow")(
        image=images)["probabilities"]
    # examples:predict here, examples:serving_default through TensorFlow 2's signatures below.
    by_example = serving.load(path, "examples:predict")
    assert by_example.engine == "tensorflow", "tf.Example signatures are SavedModel-only"
    by_example = by_example(examples=examples)
    out["serving_examples"] = by_example["probabilities"]
    classify = serving.load(path, "examples:classification")(inputs=examples)
    out["serving_classification"] = classify["scores"]
    # class_names (strings) beside the numbers, on every raw-image path and the examples one.
    names = {
        "names_xla": np.concatenate(
            [xla(image=images[:5])["class_names"], xla(image=images[5:])["class_names"]]),
        "names_session": session(image=images)["class_names"],
        "names_examples": by_example["class_names"],
    }
    assert "tensorflow_estimator" not in sys.modules, "serving imported the Estimator"

    # TF Serving's loader.
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    with graph.as_default():
        signature = tf.compat.v1.saved_model.load(session, ["serve"], path).signature_def
    default = signature["serving_default"]
    out["tf1_session"] = session.run(
        default.outputs["probabilities"].name, {default.inputs["image"].name: images})

    # TensorFlow 2's signatures.
    signatures = tf.saved_model.load(path).signatures
    raw = signatures["serving_default"](image=tf.constant(images))
    out["tf2_signature"] = raw["probabilities"].numpy()
    out["tf2_examples"] = signatures["examples:serving_default"](
        examples=tf.constant(examples))["probabilities"].numpy()
    out["tf2_classification"] = signatures["examples:classification"](
        inputs=tf.constant(examples))["scores"].numpy()
    classes = raw["classes"].numpy()
    names["names_tf2"] = raw["class_names"].numpy()

    # `saved_model_cli show --all`, through the console script's own entry point.
    shown = io.StringIO()
    sys.argv = ["saved_model_cli", "show", "--all", "--dir", path]
    with contextlib.redirect_stdout(shown):
        try:
            saved_model_cli.main()
        except SystemExit as exit_:
            assert not exit_.code, exit_.code
    names = {key: np.asarray(value, dtype="S") for key, value in names.items()}
    np.savez(os.path.join(folder, f"out{number}.npz"), classes=classes, **names, **out)
    open(os.path.join(folder, f"shown{number}.txt"), "w").write(shown.getvalue())
"""


@pytest.fixture(scope="session")
def served_networks(exports, test_digits, tmp_path_factory):
    """What one fresh TensorFlow-only interpreter got from the four exports, every way.

    Returns:
        Name -> ``(probabilities by path, predicted classes, saved_model_cli show --all's text,
        class_names by path)``.
    """
    images, labels = test_digits
    folder = tmp_path_factory.mktemp("served")
    examples = [
        data_pipeline.encode_example(np.round(i[..., 0] * 255).astype(np.uint8), int(y))
        for i, y in zip(images, labels)
    ]
    np.save(folder / "images.npy", images)
    (folder / "examples.pkl").write_bytes(pickle.dumps(examples))
    names = list(exports)
    run_fresh_python(SERVE_EVERY_WAY, str(folder), *(exports[name] for name in names), timeout=400)
    served = {}
    for number, name in enumerate(names):
        out = dict(np.load(folder / f"out{number}.npz"))
        names = {key: out.pop(key) for key in list(out) if key.startswith("names_")}
        shown = (folder / f"shown{number}.txt").read_text()
        served[name] = out, out.pop("classes"), shown, names
    return served


@pytest.fixture(scope="session")
def served(exported, served_networks):
    """One network's part of ``served_networks``."""
    return served_networks[exported[0].model]


def test_every_path_gives_the_estimators_probabilities(exported, served, test_digits):
    config, _ = exported
    probabilities, classes, _, names = served
    expected = estimator_probabilities(config, test_digits[0])
    assert len(probabilities) == 12
    for name, value in probabilities.items():
        np.testing.assert_allclose(value, expected, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(classes, expected.argmax(-1))
    # The image signatures name each predicted class with the spec's names ("0".."9" for MNIST).
    assert len(names) == 4
    for path, value in names.items():
        assert [bytes(n) for n in value] == [str(c).encode() for c in classes], path


def test_export_keeps_its_signatures(served):
    """``saved_model_cli show --all`` lists the same five signatures, image ``[-1, 28, 28, 1]``."""
    shown = served[2]
    assert set(re.findall(r"signature_def\['([^']+)'\]", shown)) == SIGNATURES
    assert re.search(
        r"inputs\['image'\] tensor_info:\s+dtype: DT_FLOAT\s+shape: \(-1, 28, 28, 1\)", shown
    )


@pytest.mark.parametrize("engine", serving.ENGINES)
def test_load_describes_the_signature_and_refuses_wrong_inputs(exported, engine):
    _, path = exported
    # Given the export folder, load serves its newest version, as TF Serving does.
    with serving.load(os.path.dirname(path), "predict", xla=False, engine=engine) as model:
        assert model.path == path and model.engine == engine
        assert model.inputs == {"image": (np.float32, (None, 28, 28, 1))}
        assert model.outputs == ["class_names", "classes", "logits", "probabilities"]
        out = model(image=np.zeros([2, 28, 28, 1], np.float32))
        assert out["logits"].shape == (2, 10) and out["classes"].dtype == np.int64
        assert list(out["class_names"]) == [str(c).encode() for c in out["classes"]]
        with pytest.raises(TypeError, match="takes image, got examples"):
            model(examples=[b""])
    with pytest.raises(KeyError, match="no signature 'classify'.*examples:classification"):
        serving.load(path, "classify")


def test_latest_version_picks_the_newest_complete_export(tmp_path):
    for name in ("1795760585", "1795760999", "temp-1795761000", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "1795761001").write_text("a file, not a version folder")
    (tmp_path / "1795760999" / "saved_model.pb").write_bytes(b"")
    newest = str(tmp_path / "1795760999")
    assert serving.latest_version(str(tmp_path)) == newest
    assert serving.latest_version(newest) is None  # already a version folder
    assert serving.latest_version(str(tmp_path / "notes")) is None  # no versions in it


@pytest.mark.parametrize("engine", serving.ENGINES)
def test_one_model_serves_eight_threads_at_once(exports, test_digits, engine):
    """Concurrent calls give what serial calls give (each thread its own images)."""
    images = test_digits[0]
    model = serving.load(exports["rnn"], engine=engine, xla=False)  # xla: TensorFlow's Session
    assert model.engine == engine
    batches = [images[i : i + 1 + i % 3] for i in range(8)]  # batch sizes 1-3
    assert_threads_get_serial_outputs(model, batches, calls=10)


def assert_threads_get_serial_outputs(model, batches, calls):
    """One thread per batch, started together, each calling ``model`` ``calls`` times: every
    output equals the serial call's."""
    serial = [model(image=batch)["probabilities"] for batch in batches]
    barrier = threading.Barrier(len(batches))

    def call(batch):
        barrier.wait()
        return [model(image=batch)["probabilities"] for _ in range(calls)]

    with concurrent.futures.ThreadPoolExecutor(len(batches)) as pool:
        concurrent_results = list(pool.map(call, batches))
    for expected, results in zip(serial, concurrent_results):
        for result in results:
            np.testing.assert_array_equal(result, expected)


def test_engine_choice_without_onnxruntime_and_when_forced(exports, monkeypatch):
    path = exports["cnn"]
    assert serving.available_engines(path) == ["onnxruntime", "tensorflow"]
    assert serving.available_engines(path, "examples:predict") == ["tensorflow"]
    with pytest.raises(ValueError, match="engine 'onnxruntime' cannot serve 'examples:predict'"):
        serving.load(path, "examples:predict", engine="onnxruntime")
    with pytest.raises(ValueError, match="unknown engine 'tpu'"):
        serving.load(path, engine="tpu")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with serving.load(path, xla=False) as model:
        assert model.engine == "tensorflow"


def _slowed(monkeypatch, engine_class, seconds: float, large=None) -> list:
    """Makes ``engine_class`` calls ``seconds`` slower: all of them, or (``large`` True/False)
    only those of batches of 8+ or below 8. Returns the log of every call's batch size."""
    sizes = []
    call = engine_class.__call__

    def slow(self, *args, **kwargs):
        size = len(args[0] if args else kwargs["image"])
        sizes.append(size)
        if large is None or (size >= 8) == large:
            time.sleep(seconds)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(engine_class, "__call__", slow)
    return sizes


def test_auto_engine_is_the_faster_one_timed_at_load(exports, test_digits, monkeypatch):
    path, images = exports["cnn"], test_digits[0]
    auto = serving.load(path, xla=False)
    timings = auto.engine_timings
    assert set(timings) == {"onnxruntime", "tensorflow"} and min(timings.values()) > 0
    # onnxruntime (listed first) unless TensorFlow's batch-1 time was 10 % below its.
    assert (auto.engine == "tensorflow") == (timings["tensorflow"] < 0.9 * timings["onnxruntime"])
    forced = serving.load(path, engine=auto.engine, xla=False)
    np.testing.assert_allclose(
        auto(image=images)["probabilities"], forced(image=images)["probabilities"], atol=1e-6
    )
    # An engine made 50 ms slower per call loses, whichever it is; forcing one times nothing.
    for slow, fast in ((serving.OnnxModel, "tensorflow"), (serving.ServedModel, "onnxruntime")):
        with monkeypatch.context() as patch:
            calls = _slowed(patch, slow, 0.05)
            model = serving.load(path, xla=False)
            assert model.engine == fast, model.engine_timings
            assert model.engine_timings[slow.engine] >= 50 > model.engine_timings[fast]
            assert len(calls) >= 3 * 3  # 3 turns of an untimed and at least 2 timed calls
            calls.clear()
            assert serving.load(path, engine=slow.engine, xla=False).engine_timings == {}
            assert calls == []


def test_auto_engine_falls_back_to_tensorflow_when_onnxruntime_fails(exports, caplog, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("cannot read model.onnx")

    monkeypatch.setattr(serving.OnnxModel, "__init__", broken)
    with caplog.at_level("WARNING", logger="serving"):
        model = serving.load(exports["cnn"], xla=False)
    assert model.engine == "tensorflow" and model.engine_timings.keys() == {"tensorflow"}
    assert "engine onnxruntime skipped: RuntimeError: cannot read model.onnx" in caplog.text
    with pytest.raises(RuntimeError, match="cannot read model.onnx"):  # forced: no fallback
        serving.load(exports["cnn"], engine="onnxruntime")


def test_large_batches_go_to_the_engine_faster_at_them(exports, test_digits, monkeypatch):
    """onnxruntime slow on large batches, TensorFlow on small: both kept, routed by batch size."""
    path, images = exports["rnn"], test_digits[0]
    onnx_sizes = _slowed(monkeypatch, serving.OnnxModel, 0.3, large=True)
    tf_sizes = _slowed(monkeypatch, serving.ServedModel, 0.03, large=False)
    model = serving.load(path, xla=False)
    assert (model.engine, model.large_batch_engine) == ("onnxruntime", "tensorflow")
    assert model.large_batch_size == serving.LARGE_BATCH == 512  # 512 MNIST digits: 1.6 MB
    timings = model.large_batch_timings
    assert timings["onnxruntime"] >= 300 > timings["tensorflow"], timings
    assert model.engine_timings["tensorflow"] >= 30 > model.engine_timings["onnxruntime"]
    # From where the lines through each engine's (1, batch-1 time) and (512, batch-512 time)
    # cross (the slowdowns are steps, so the lines only estimate it).
    slope = {e: (timings[e] - model.engine_timings[e]) / 511 for e in timings}
    cross = (model.engine_timings["tensorflow"] - model.engine_timings["onnxruntime"]) / (
        slope["onnxruntime"] - slope["tensorflow"]
    ) + 1
    assert model.large_batch_from == min(max(int(np.ceil(cross)), 2), 512)
    assert model.inputs == serving.load(path, engine="onnxruntime").inputs  # the batch-1 engine's
    edge = model.large_batch_from
    images = np.resize(images, (edge + 8, *images.shape[1:]))
    onnx_sizes.clear(), tf_sizes.clear()
    small = model(image=images[: edge - 1])["probabilities"]
    large = model(images[:edge])["probabilities"]
    assert onnx_sizes == [edge - 1] and tf_sizes == [edge]
    with serving.load(path, engine="onnxruntime") as alone:
        expected = alone(image=images[: edge - 1])["probabilities"]
        np.testing.assert_allclose(small, expected, atol=1e-6)
    with serving.load(path, engine="tensorflow", xla=False) as alone:
        np.testing.assert_allclose(large, alone(image=images[:edge])["probabilities"], atol=1e-6)
    # Thread-safe across the two engines: 8 threads, batch sizes on both sides of the edge.
    batches = [images[i : i + (1 if i % 2 else edge + i)] for i in range(8)]
    assert_threads_get_serial_outputs(model, batches, calls=3)
    model.close()


def test_engines_faster_everywhere_serve_alone_and_forced_ones_are_not_routed(exports):
    with serving.load(exports["rnn"], engine="tensorflow", xla=False) as forced:
        assert forced.large_batch_engine is forced.large_batch_from is None


def test_timing_waits_for_the_other_engines_pool_threads_to_go_idle():
    """A run whose pool keeps spinning after it returns does not slow the next run's timing."""
    spinning = []

    def spinner(seconds):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:  # holds the interpreter, as a spinning pool the core
            pass

    def leaves_a_spinning_pool():
        spinner(0.001)
        thread = threading.Thread(target=spinner, args=(0.005,))
        thread.start()
        spinning.append(thread)

    def busy_ms():
        spinner(0.001)

    (alone,) = serving._call_seconds([busy_ms])
    _, beside = serving._call_seconds([leaves_a_spinning_pool, busy_ms])
    for thread in spinning:
        thread.join()
    assert beside < 1.5 * alone, (alone, beside)
