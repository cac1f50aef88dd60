"""Keras 2 <-> Keras 3 across the move: probability differences and conversion time.

Out: each of the four networks is built in tf_keras (seeded initial weights; the trained cnn and
rnn are checked by tests/test_keras3.py), written for Keras 3 by ``keras_models.keras3`` and
loaded by plain Keras 3 (``.venv-keras3``: TensorFlow 2.21, Keras 3.15) in one process; the
softmax of both on real MNIST test images is compared. In: Keras 3 writes MobileNetV2
(``--size``, 1000 classes, ``weights=None``) and tf_keras reads it through the translation.
Times: ``to_keras3`` (file to file) of tf_keras's MobileNetV2 and ``from_keras3`` /
``keras3.load_model`` of Keras 3's, each the median of ``--rounds``, alternating.

Full run: ``.venv/bin/python bench/bench_keras3.py``.
Quick check: ``.venv/bin/python bench/bench_keras3.py --size=96 --rounds=1 --images=20``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import benchlib  # noqa: F401 - repo root on sys.path, tfenv first
import numpy as np  # noqa: E402
import tf_keras  # noqa: E402

import data_pipeline  # noqa: E402
from keras_models import MODEL_NAMES, build_model, keras3  # noqa: E402

KERAS3_PYTHON = os.path.join(benchlib.REPO, ".venv-keras3", "bin", "python")

LOAD_IN_KERAS3 = """
import json, sys, time, numpy as np, keras
images, files, size = np.load(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
out = {}
for name, path in files.items():
    out[name] = keras.saving.load_model(path).predict(images, verbose=0).tolist()
mobilenet = keras.applications.MobileNetV2(weights=None, input_shape=(size, size, 3))
mobilenet.save(sys.argv[4])
x = np.random.default_rng(0).random((2, size, size, 3), dtype=np.float32)
out["mobilenet_keras3"] = mobilenet.predict(x, verbose=0).tolist()
print(json.dumps(out))
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source_dir", default=benchlib.default_source_dir())
    parser.add_argument("--images", type=int, default=200, help="MNIST test images compared.")
    parser.add_argument("--size", type=int, default=224, help="MobileNetV2 input side.")
    parser.add_argument("--rounds", type=int, default=3, help="Timing rounds (median).")
    parser.add_argument("--json_out", default=None)
    return parser.parse_args(argv)


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    command = benchlib.command_line(
        __file__, args, ["source_dir", "images", "size", "rounds", "json_out"]
    )
    info = benchlib.machine_info()
    benchlib.print_header("Keras 2 <-> Keras 3 model files", command, info)
    source = data_pipeline.load_source(args.source_dir)
    images = source.splits["test"][0][: args.images].astype(np.float32) / 255.0
    images = images.reshape(-1, 28, 28, 1)
    work = tempfile.mkdtemp(prefix="bench_keras3_")
    np.save(os.path.join(work, "images.npy"), images)
    tf_keras.utils.set_random_seed(0)
    ours, files = {}, {}
    for name in MODEL_NAMES:
        model = build_model(name)
        ours[name] = _softmax(model(images, training=False).numpy())
        files[name] = os.path.join(work, f"{name}.keras")
        keras3.to_keras3_model(model, files[name])
    k3_mobilenet = os.path.join(work, "mobilenet_k3.keras")
    run = subprocess.run(
        [KERAS3_PYTHON, "-c", LOAD_IN_KERAS3, os.path.join(work, "images.npy"),
         json.dumps(files), str(args.size), k3_mobilenet],
        capture_output=True, text=True,
        env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
             "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    if run.returncode:
        sys.exit(run.stderr[-3000:])
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    rows, results = [], {"out": {}, "in": {}, "seconds": {}}
    for name in MODEL_NAMES:
        diff = float(np.abs(_softmax(theirs[name]) - ours[name]).max())
        results["out"][name] = diff
        rows.append([f"{name} (tf_keras -> Keras 3)", f"{diff:.2e}", len(images)])
    x = np.random.default_rng(0).random((2, args.size, args.size, 3), dtype=np.float32)
    back = keras3.load_model(k3_mobilenet)
    diff = float(np.abs(back(x, training=False).numpy() - theirs["mobilenet_keras3"]).max())
    results["in"]["mobilenet_v2"] = diff
    rows.append([f"MobileNetV2 {args.size}x{args.size} (Keras 3 -> tf_keras)", f"{diff:.2e}", 2])
    benchlib.print_table(["model", "max |p - p'|", "images"], rows)

    k2_mobilenet = os.path.join(work, "mobilenet_k2.keras")
    tf_keras.applications.MobileNetV2(weights=None, input_shape=(args.size, args.size, 3)).save(
        k2_mobilenet
    )
    timings = {"to_keras3": [], "from_keras3": [], "load_model": []}
    out3, out2 = os.path.join(work, "t3.keras"), os.path.join(work, "t2.keras")
    for _ in range(args.rounds):  # alternating, so that load drifts hit all three alike
        timings["to_keras3"].append(_timed(lambda: keras3.to_keras3(k2_mobilenet, out3)))
        timings["from_keras3"].append(_timed(lambda: keras3.from_keras3(k3_mobilenet, out2)))
        timings["load_model"].append(_timed(lambda: keras3.load_model(k3_mobilenet)))
        tf_keras.backend.clear_session()
    size_mb = os.path.getsize(k2_mobilenet) / 1e6
    rows = [[key, f"{benchlib.median(values):.2f}", len(values)] for key, values in timings.items()]
    print(f"\nMobileNetV2 {args.size}x{args.size}x3, 1000 classes ({size_mb:.1f} MB .keras):")
    benchlib.print_table(["conversion", "median s", "rounds"], rows)
    results["seconds"] = {k: benchlib.median(v) for k, v in timings.items()}
    benchlib.write_json(args.json_out, {"command": command, "machine": info, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
