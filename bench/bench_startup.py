r"""Start-up of short Estimator jobs: the bridge as it is against it without its start-up changes.

For every network in ``--models`` and every variant, one fresh process trains ``--train_steps``
steps from scratch (batch 16, seeded, with augmentation: the test suite's seeded run), evaluates
``--eval_limit`` test images and exports, each job timed from the call to its return. Rounds
alternate, and the variant order rotates from round to round. The variants:

* ``bridge``: the code as it is;
* ``with_cudnn_variant``: Keras' GRU/LSTM keep their cuDNN variant in TRAIN and EVAL graphs
  (``estimator_bridge._without_cudnn_variants`` patched to do nothing);
* ``with_tfg``: Grappler's MLIR pass on (``disable_tfg_optimizer`` cleared on the Estimator's
  session config);
* ``with_stock_summaries``: the Estimator's own SummarySaverHook, which fetches the summaries
  only on the steps that write them (so the first and second training steps differ), instead of
  ``summaries.SummaryHook``;
* ``without_describe_memo``: ``estimator_bridge.describe_network`` builds the network again for
  every job instead of once per process (only evaluate and export can gain);
* ``before``: all four.

Prints one line per run, then the median seconds of each job per variant, with the ratio to
``bridge``, and whether each variant's evaluation gave the same accuracy and loss.

Quick check::

    .venv/bin/python bench/bench_startup.py --models=cnn --rounds=1 --eval_limit=200
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List

import benchlib  # puts the repo root on sys.path and imports tfenv before TensorFlow

VARIANTS = (
    "bridge",
    "with_cudnn_variant",
    "with_tfg",
    "with_stock_summaries",
    "without_describe_memo",
    "before",
)
JOBS = ("train", "evaluate", "export")
FLAG_ORDER = ("models", "variants", "rounds", "train_steps", "eval_limit", "work_dir", "source_dir")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=benchlib.csv_list, default=["cnn", "birnn"])
    parser.add_argument("--variants", type=benchlib.csv_list, default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train_steps", type=int, default=3)
    parser.add_argument("--eval_limit", type=int, default=1000)
    parser.add_argument("--work_dir", default=benchlib.DEFAULT_WORK_DIR)
    parser.add_argument("--source_dir", default=benchlib.default_source_dir())
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {unknown}; choose from {list(VARIANTS)}")
    return args


def run_one(args, data_dir: str, model: str, variant: str) -> Dict[str, Any]:
    """Trains, evaluates and exports ``model`` in this (fresh) process; seconds per job."""
    import estimator_bridge
    import jobs

    if variant in ("with_cudnn_variant", "before"):
        estimator_bridge._without_cudnn_variants = lambda skip: contextlib.nullcontext()
    if variant in ("with_tfg", "before"):
        make_estimator = estimator_bridge.make_estimator

        def with_tfg(*a, **k):
            estimator = make_estimator(*a, **k)
            # The Estimator keeps this very message and passes it to every session it creates.
            estimator.config.session_config.graph_options.rewrite_options.disable_tfg_optimizer = (
                False
            )
            return estimator

        estimator_bridge.make_estimator = with_tfg
    if variant in ("with_stock_summaries", "before"):
        steps = estimator_bridge.SUMMARY_STEPS
        estimator_bridge.SUMMARY_STEPS = None  # the model_fn adds the summaries to the graph
        make_estimator_ = estimator_bridge.make_estimator

        def with_stock_summaries(*a, **k):
            estimator = make_estimator_(*a, **k)
            estimator._config = estimator.config.replace(save_summary_steps=steps)
            return estimator

        estimator_bridge.make_estimator = with_stock_summaries
    if variant in ("without_describe_memo", "before"):

        class Forgetful(dict):
            def __setitem__(self, key, value):
                pass  # every job builds its layout again

        estimator_bridge._REGISTERED_LAYOUTS = Forgetful()
    model_dir = tempfile.mkdtemp(prefix=f"startup_{model}_", dir=args.work_dir)
    try:
        config = estimator_bridge.Config(
            model=model,
            data_dir=data_dir,
            model_dir=model_dir,
            export_dir=os.path.join(model_dir, "export"),
            batch_size=16,
            train_steps=args.train_steps,
            train_limit=500,
            seed=7,
            augment=True,
            eval_limit=args.eval_limit,
            progress=False,
        )
        seconds, results = {}, {}
        for job in JOBS:
            started = time.perf_counter()
            results[job] = getattr(jobs, job)(config)
            seconds[job] = time.perf_counter() - started
        evaluated = results["evaluate"]
        return {**seconds, "accuracy": evaluated["accuracy"], "loss": evaluated["loss"]}
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)


def run_isolated(args, data_dir: str, model: str, variant: str) -> Dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(run_one, (args, data_dir, model, variant))


def main(argv=None) -> int:
    args = parse_args(argv)
    command = benchlib.command_line(__file__, args, FLAG_ORDER)
    info = benchlib.machine_info()
    benchlib.print_header("start-up of short Estimator jobs", command, info)
    os.makedirs(args.work_dir, exist_ok=True)
    data_dir = benchlib.ensure_project_data(args.work_dir, args.source_dir)
    started = time.perf_counter()
    runs: List[Dict[str, Any]] = []
    for number in range(args.rounds):
        shift = number % len(args.variants)
        order = args.variants[shift:] + args.variants[:shift]
        for model in args.models:
            for variant in order:
                run = {"round": number + 1, "model": model, "variant": variant}
                run.update(run_isolated(args, data_dir, model, variant))
                runs.append(run)
                print(
                    f"round {run['round']} {model:8s} {variant:19s} "
                    + "  ".join(f"{job} {run[job]:5.1f}s" for job in JOBS)
                    + f"  accuracy {run['accuracy']:.4f} loss {run['loss']:.6f}",
                    flush=True,
                )
    rows = []
    for model in args.models:
        medians = {
            variant: {
                job: benchlib.median(
                    [r[job] for r in runs if r["model"] == model and r["variant"] == variant]
                )
                for job in JOBS
            }
            for variant in args.variants
        }
        reference = {(r["accuracy"], r["loss"]) for r in runs if r["model"] == model}
        bridge = medians.get("bridge", {})
        for variant in args.variants:
            rows.append(
                [
                    f"{model} {variant}",
                    *(f"{medians[variant][job]:.1f}" for job in JOBS),
                    *(benchlib.fmt_ratio(medians[variant][job], bridge.get(job)) for job in JOBS),
                    "yes" if len(reference) == 1 else "no",
                ]
            )
    print()
    benchlib.print_table(
        [
            "network, variant",
            *(f"{job} s" for job in JOBS),
            *(f"{job} / bridge" for job in JOBS),
            "evaluation equal in every run",
        ],
        rows,
    )
    return benchlib.finish_runs(
        "bench_startup", command, info, time.perf_counter() - started, runs, None
    )


if __name__ == "__main__":
    sys.exit(main())
