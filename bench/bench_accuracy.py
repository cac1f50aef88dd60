"""Test accuracy after training through estimator_bridge, next to the tutorial's published figures.

For each network: train from scratch with ``estimator_bridge.train`` (fresh model_dir), then
``estimator_bridge.evaluate`` on the test split, and compare with the accuracy the tutorial
published. The default recipe ``tutorial`` is the tutorial's budget: batch 128, Adam 1e-3
constant, cnn 3 epochs, rnn 3, birnn 2, cnn_rnn 6. The recipe ``strong`` trains longer with a
cosine learning-rate schedule and random-shift augmentation. PASS means the test accuracy is at
least the published figure minus ``--tolerance`` percentage points.

Note that the project's recurrent networks train with dropout before the logits, which the
tutorial's recurrent notebooks did not use (they fed the pre-dropout tensor to the output).

Quick check (a hundredth of the budget; FAIL is expected)::

    .venv/bin/python bench/bench_accuracy.py --models=cnn --epochs_scale=0.01
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
import traceback
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tfenv  # noqa: E402 - must precede TensorFlow

tfenv.silence_python_logging()

import benchlib  # noqa: E402

import estimator_bridge  # noqa: E402
import keras_models  # noqa: E402

# Test accuracy the tutorial's notebooks published, per network.
PUBLISHED = {"cnn": 0.9890, "rnn": 0.9848, "birnn": 0.9791, "cnn_rnn": 0.9819}
TUTORIAL_EPOCHS = {"cnn": 3, "rnn": 3, "birnn": 2, "cnn_rnn": 6}
# Config fields per recipe; "epochs" is per network.
RECIPES: Dict[str, Dict[str, Any]] = {
    "tutorial": {
        "epochs": TUTORIAL_EPOCHS,
        "batch_size": 128,
        "learning_rate": 1e-3,
        "lr_schedule": "constant",
        "augment": False,
    },
    "strong": {
        "epochs": {"cnn": 10, "rnn": 10, "birnn": 8, "cnn_rnn": 12},
        "batch_size": 128,
        "learning_rate": 1e-3,
        "lr_schedule": "cosine",
        "augment": True,
        "augment_shift": 2,
    },
}
FLAG_ORDER = (
    "models",
    "recipe",
    "precision",
    "epochs_scale",
    "seed",
    "tolerance",
    "work_dir",
    "source_dir",
    "json_out",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=benchlib.csv_list, default=list(keras_models.MODEL_NAMES))
    parser.add_argument("--recipe", default="tutorial", choices=sorted(RECIPES))
    parser.add_argument("--precision", default="float32", choices=estimator_bridge.PRECISIONS)
    parser.add_argument(
        "--epochs_scale",
        type=float,
        default=1.0,
        help="Multiply every network's epochs (e.g. 0.01 for a quick check).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Graph and input-order seed.")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="PASS if accuracy >= published - tolerance (percentage points).",
    )
    parser.add_argument("--work_dir", default=benchlib.DEFAULT_WORK_DIR)
    parser.add_argument(
        "--source_dir", default=benchlib.default_source_dir(), help="MNIST (default $MNIST_DIR)."
    )
    parser.add_argument("--json_out", default=None, help="Write results as JSON here.")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(PUBLISHED))
    if unknown or not args.models:
        parser.error(f"bad --models {args.models}; choose from {sorted(PUBLISHED)}")
    if not args.epochs_scale > 0:
        parser.error("--epochs_scale must be positive")
    args.work_dir = os.path.abspath(args.work_dir)
    return args


def make_config(args, model: str, data_dir: str, model_dir: str) -> estimator_bridge.Config:
    recipe = dict(RECIPES[args.recipe])
    epochs = recipe.pop("epochs")[model] * args.epochs_scale
    return estimator_bridge.Config(
        model=model,
        data_dir=data_dir,
        model_dir=model_dir,
        epochs=epochs,
        precision=args.precision,
        seed=args.seed,
        eval_split="test",
        progress=False,
        save_checkpoints_steps=1000,
        keep_checkpoint_max=2,
        **recipe,
    )


def run_one(args, model: str, data_dir: str) -> Dict[str, Any]:
    run_name = f"{args.recipe}-{args.precision}-seed{args.seed}-x{args.epochs_scale:g}"
    model_dir = os.path.join(args.work_dir, "accuracy", run_name, model)
    shutil.rmtree(model_dir, ignore_errors=True)  # always from scratch
    config = make_config(args, model, data_dir, model_dir)
    started = time.perf_counter()
    trained = estimator_bridge.train(config)
    train_wall = time.perf_counter() - started
    metrics = estimator_bridge.evaluate(dataclasses.replace(config, eval_split="test"))
    published = PUBLISHED[model]
    accuracy = float(metrics["accuracy"])
    return {
        "model": model,
        "epochs": config.epochs,
        "global_step": int(trained["global_step"]),
        "train_wall_seconds": round(train_wall, 1),
        "examples_per_sec": round(float(trained["examples_per_sec"]), 1),
        "test_accuracy": accuracy,
        "test_loss": float(metrics["loss"]),
        "test_examples": int(metrics["examples"]),
        "published": published,
        "delta_points": round(100 * (accuracy - published), 2),
        "pass": accuracy >= published - args.tolerance / 100,
        "model_dir": model_dir,
        "config": dataclasses.asdict(config),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    command = benchlib.command_line(__file__, args, FLAG_ORDER)
    info = benchlib.machine_info()
    benchlib.print_header(
        f"test accuracy via estimator_bridge, recipe {args.recipe!r}", command, info
    )
    recipe = {k: v for k, v in RECIPES[args.recipe].items() if k != "epochs"}
    print(
        f"recipe {args.recipe}: {recipe}; epochs "
        + ", ".join(
            f"{m} {RECIPES[args.recipe]['epochs'][m] * args.epochs_scale:g}" for m in args.models
        )
        + f"; precision {args.precision}; seed {args.seed}"
    )
    data_dir = benchlib.ensure_project_data(args.work_dir, args.source_dir)
    results: List[Dict[str, Any]] = []
    for model in args.models:
        try:
            result = run_one(args, model, data_dir)
        except Exception as error:  # noqa: BLE001 - report, keep the other networks going
            traceback.print_exc()
            result = {"model": model, "error": f"{type(error).__name__}: {error}"}
        results.append(result)
        if "error" in result:
            print(f"{model}: ERROR {result['error']}", flush=True)
        else:
            print(
                f"{model}: test accuracy {100 * result['test_accuracy']:.2f}% after "
                f"{result['epochs']:g} epochs ({result['global_step']} steps, "
                f"{result['train_wall_seconds']:.0f}s)",
                flush=True,
            )

    rows = []
    for r in results:
        if "error" in r:
            published = f"{100 * PUBLISHED[r['model']]:.2f}%"
            rows.append([r["model"], "-", "-", "-", published, "-", "ERROR"])
            continue
        rows.append(
            [
                r["model"],
                f"{r['epochs']:g}",
                r["global_step"],
                f"{100 * r['test_accuracy']:.2f}%",
                f"{100 * r['published']:.2f}%",
                f"{r['delta_points']:+.2f}",
                "PASS" if r["pass"] else "FAIL",
            ]
        )
    print()
    print(
        f"test accuracy ({args.recipe} recipe, {args.precision}) vs the tutorial's published "
        f"figure; PASS = at least published - {args.tolerance:g} points"
    )
    headers = ["model", "epochs", "steps", "accuracy", "tutorial", "delta pts", "verdict"]
    benchlib.print_table(headers, rows)
    passed = sum(1 for r in results if r.get("pass"))
    print(f"{passed}/{len(results)} PASS")
    print(f"command: {command}")
    benchlib.write_json(
        args.json_out,
        {
            "benchmark": "accuracy",
            "command": command,
            "machine": info,
            "settings": {k: getattr(args, k) for k in FLAG_ORDER},
            "recipe": RECIPES[args.recipe],
            "results": results,
        },
    )
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
