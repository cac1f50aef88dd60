"""Training throughput: the project's Estimator bridge vs the tutorial's model_fn vs Keras fit.

For every network and batch size, three contenders train the same network from scratch for the
same number of steps, in one process, in alternating rounds whose contender order rotates (so
slow drift of the machine hits all of them alike):

* ``bridge``: ``jobs.train`` with a fresh model_dir (the project's generic model_fn
  over the project's tf.data pipeline), timed by a ``StepTimerHook`` passed to ``train()``;
* ``tutorial``: the tutorial's model_fn on its float-list records (``tutorial_baseline``), timed
  by the same hook, always float32;
* ``fit``: ``keras_models.build_model`` compiled with Adam 1e-3 and trained by ``model.fit`` on
  ``data_pipeline.make_dataset`` (the bridge's pipeline), timed by the matching callback.

All three exclude the same first ``--warmup_steps`` steps: steady-state throughput is what a
training run of thousands of steps sees. The one-off cost before it (graph building, session or
function set-up, and in an Estimator a second step that is slow because its fetches differ from
the first's, which fetched the step-0 summaries: TensorFlow prunes and optimises the graph anew
for each new fetch set, about 1 s for the GRU graphs) is reported separately as ``startup``:
seconds from the call until the clock starts.

Checkpoints are saved only at step 0 and at the end, both outside the timed window; summaries
follow the Estimator default (every 100 steps) for both Estimator contenders. Prints one line
per run, then per network and batch size the median examples/s over the rounds and the ratios
bridge/tutorial and bridge/fit, the command that reproduces the run and the machine.

Quick check::

    .venv/bin/python bench/bench_throughput.py --models=cnn --batch_sizes=128 --steps=10 --rounds=1
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tfenv  # noqa: E402 - must precede TensorFlow

tfenv.silence_python_logging()

import benchlib  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
import tutorial_baseline  # noqa: E402

import data_pipeline  # noqa: E402
import estimator_bridge  # noqa: E402
import jobs  # noqa: E402
import keras_models  # noqa: E402
import preflight  # noqa: E402

CONTENDERS = ("bridge", "tutorial", "fit")
NO_CHECKPOINTS = 10**9  # save_checkpoints_steps: only the step-0 and final saves happen
FLAG_ORDER = (
    "models",
    "batch_sizes",
    "steps",
    "rounds",
    "warmup_steps",
    "precision",
    "contenders",
    "work_dir",
    "source_dir",
    "json_out",
    "profile",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models",
        type=benchlib.csv_list,
        default=list(keras_models.MODEL_NAMES),
        help="Comma-separated networks (default: all).",
    )
    parser.add_argument("--batch_sizes", type=benchlib.int_list, default=[128, 512])
    parser.add_argument("--steps", type=int, default=100, help="Training steps per run.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds; the median is reported.")
    parser.add_argument(
        "--warmup_steps",
        type=int,
        default=10,
        help="Steps excluded from the timing at the start of every run (all contenders).",
    )
    parser.add_argument(
        "--precision",
        default="float32",
        choices=("auto", *estimator_bridge.PRECISIONS),
        help="For bridge and fit; the tutorial is float32 only. auto: as main.py resolves it.",
    )
    parser.add_argument(
        "--contenders",
        type=benchlib.csv_list,
        default=list(CONTENDERS),
        help="Comma-separated subset of bridge,tutorial,fit.",
    )
    parser.add_argument("--work_dir", default=benchlib.DEFAULT_WORK_DIR)
    parser.add_argument(
        "--source_dir", default=benchlib.default_source_dir(), help="MNIST (default $MNIST_DIR)."
    )
    parser.add_argument("--json_out", default=None, help="Write results as JSON here.")
    parser.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="After the timed rounds, run each case once more under the TensorFlow profiler "
        "and write traces to DIR/<model>-b<batch>-<contender> (view with TensorBoard).",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(keras_models.MODEL_NAMES))
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {list(keras_models.MODEL_NAMES)}")
    unknown = sorted(set(args.contenders) - set(CONTENDERS))
    if unknown or not args.contenders:
        parser.error(f"bad --contenders {args.contenders}; choose from {list(CONTENDERS)}")
    if args.warmup_steps < 1 or args.steps <= args.warmup_steps:
        parser.error("--warmup_steps must be at least 1 and less than --steps")
    if args.rounds < 1 or any(b < 1 for b in args.batch_sizes):
        parser.error("--rounds and --batch_sizes must be positive")
    args.work_dir = os.path.abspath(args.work_dir)
    return args


# --------------------------------------------------------------------------------------------
# One run of each contender
# --------------------------------------------------------------------------------------------


def bridge_config(
    data_dir: str, model_dir: str, model: str, batch: int, steps: int, **overrides
) -> estimator_bridge.Config:
    """The bridge contender's Config: no checkpoint or progress line inside the timed window."""
    return estimator_bridge.Config(
        model=model,
        data_dir=data_dir,
        model_dir=model_dir,
        batch_size=batch,
        train_steps=steps,
        progress=False,
        save_checkpoints_steps=NO_CHECKPOINTS,
        keep_checkpoint_max=1,
        log_every_n_steps=NO_CHECKPOINTS,
        **overrides,
    )


def run_bridge(args, data_dir: str, model: str, batch: int, model_dir: str) -> Dict[str, Any]:
    config = bridge_config(data_dir, model_dir, model, batch, args.steps, precision=args.precision)
    timer = benchlib.StepTimerHook(batch, args.warmup_steps)
    jobs.train(config, hooks=[timer])
    return _timed(timer)


def run_tutorial(args, record_dir: str, model: str, batch: int, model_dir: str) -> Dict[str, Any]:
    result = tutorial_baseline.train(
        model,
        record_dir,
        model_dir,
        batch_size=batch,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        save_checkpoints_steps=NO_CHECKPOINTS,
    )
    return {key: result[key] for key in ("examples_per_sec", "seconds", "clock_start")}


def run_fit(args, data_dir: str, model: str, batch: int) -> Dict[str, Any]:
    keras.backend.clear_session()
    with estimator_bridge.precision_policy(args.precision):
        network = keras_models.build_model(model)
    network.compile(
        optimizer=keras.optimizers.Adam(learning_rate=1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    dataset = data_pipeline.make_dataset(data_dir, "train", batch, num_epochs=None, shuffle=True)
    timer = benchlib.KerasStepTimer(batch, args.warmup_steps)
    with data_pipeline.translate_errors():
        network.fit(dataset, epochs=1, steps_per_epoch=args.steps, verbose=0, callbacks=[timer])
    return _timed(timer)


def _timed(timer) -> Dict[str, Any]:
    return {
        "examples_per_sec": float(timer.examples_per_sec),
        "seconds": timer.seconds,
        "clock_start": timer.clock_start,
    }


def run_one(
    args, data_dir: str, record_dir: str, contender: str, model: str, batch: int
) -> Dict[str, Any]:
    """One timed run in this process -> result dict (or ``{"error": ...}``)."""
    scratch = os.path.join(args.work_dir, "throughput_runs")
    os.makedirs(scratch, exist_ok=True)
    model_dir = tempfile.mkdtemp(prefix=f"{contender}-{model}-b{batch}-", dir=scratch)
    called = time.perf_counter()
    try:
        if contender == "bridge":
            result = run_bridge(args, data_dir, model, batch, model_dir)
        elif contender == "tutorial":
            result = run_tutorial(args, record_dir, model, batch, model_dir)
        else:
            result = run_fit(args, data_dir, model, batch)
        clock_start = result.pop("clock_start", None)
        result["startup_s"] = None if clock_start is None else clock_start - called
        return result
    except Exception as error:  # noqa: BLE001 - report, keep the other runs going
        traceback.print_exc()
        return {"examples_per_sec": None, "error": f"{type(error).__name__}: {error}"}
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)


def make_runner(args, data_dir: str, record_dir: str) -> Callable[..., Dict]:
    """Returns ``run(contender, model, batch, isolated=True)`` -> result dict.

    ``isolated`` runs each contender in a fresh process (``spawn``), as a user would: in one
    long-lived process, thread pools and caches left by earlier contenders (Keras's eager
    runtime next to the Estimator's sessions) skewed later ones by up to 15 %.
    """
    context = multiprocessing.get_context("spawn")

    def run(contender: str, model: str, batch: int, isolated: bool = True) -> Dict[str, Any]:
        job = (args, data_dir, record_dir, contender, model, batch)
        if not isolated:
            return run_one(*job)
        with context.Pool(1) as pool:
            return pool.apply(run_one, job)

    return run


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def summarise(args, runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for model in args.models:
        for batch in args.batch_sizes:
            row: Dict[str, Any] = {"model": model, "batch_size": batch}
            spreads = []
            for contender in args.contenders:
                case = [
                    r
                    for r in runs
                    if (r["model"], r["batch_size"], r["contender"]) == (model, batch, contender)
                ]
                rates = [r["examples_per_sec"] for r in case if r.get("examples_per_sec")]
                value = benchlib.median(rates) if rates else None
                row[contender] = value
                row[f"{contender}_rounds"] = rates
                startups = [r["startup_s"] for r in case if r.get("startup_s") is not None]
                row[f"{contender}_startup_s"] = benchlib.median(startups) if startups else None
                if len(rates) > 1 and value:
                    spreads.append((max(rates) - min(rates)) / value)
            row["max_spread"] = max(spreads) if spreads else None
            row["bridge_over_faster_peer_by_round"] = _paired_ratios(runs, model, batch)
            bridge = row.get("bridge")
            for other in ("tutorial", "fit"):
                theirs = row.get(other)
                row[f"bridge_over_{other}"] = bridge / theirs if bridge and theirs else None
            rows.append(row)
    return rows


def _paired_ratios(runs: List[Dict[str, Any]], model: str, batch: int) -> List[float]:
    """Per round, bridge over the faster peer of the same round (rounds where all three ran).

    Stricter than the ratio of medians: the faster of two noisy peers is itself biased upwards.
    """
    by_round: Dict[int, Dict[str, float]] = {}
    for r in runs:
        if (r["model"], r["batch_size"]) == (model, batch) and r.get("examples_per_sec"):
            by_round.setdefault(r["round"], {})[r["contender"]] = r["examples_per_sec"]
    return [
        rates["bridge"] / max(rates["tutorial"], rates["fit"])
        for _, rates in sorted(by_round.items())
        if set(CONTENDERS) <= set(rates)
    ]


def print_summary(args, rows: List[Dict[str, Any]]) -> None:
    headers = ["model", "batch"]
    headers += [f"{c} ex/s" for c in args.contenders]
    if "bridge" in args.contenders:
        headers += [f"bridge/{c}" for c in ("tutorial", "fit") if c in args.contenders]
    by_round = set(CONTENDERS) <= set(args.contenders)
    if by_round:
        headers.append("bridge/faster peer by round")
    headers.append("spread")
    headers += [f"{c} startup s" for c in args.contenders]
    table = []
    for row in rows:
        cells = [row["model"], row["batch_size"]]
        cells += [benchlib.fmt_rate(row[c]) for c in args.contenders]
        if "bridge" in args.contenders:
            cells += [
                benchlib.fmt_ratio(row["bridge"], row[c])
                for c in ("tutorial", "fit")
                if c in args.contenders
            ]
        if by_round:
            paired = row["bridge_over_faster_peer_by_round"]
            cells.append(" ".join(f"{ratio:.2f}" for ratio in paired) or "-")
        spread = row["max_spread"]
        cells.append("-" if spread is None else f"{100 * spread:.0f}%")
        for contender in args.contenders:
            startup = row[f"{contender}_startup_s"]
            cells.append("-" if startup is None else f"{startup:.1f}")
        table.append(cells)
    print()
    print(
        f"median training examples/s over {args.rounds} round(s) of {args.steps} steps "
        f"(first {args.warmup_steps} excluded); bridge and fit in {args.precision}, "
        "tutorial in float32; by round = bridge over the faster of tutorial and fit in each round; "
        "spread = largest (max-min)/median among the contenders; startup = seconds from the "
        "call to the first timed step (build, session/function set-up, warm-up steps)"
    )
    benchlib.print_table(headers, table)


def run_profile(args, run: Callable) -> List[str]:
    traces = []
    for model in args.models:
        for batch in args.batch_sizes:
            for contender in args.contenders:
                logdir = os.path.join(args.profile, f"{model}-b{batch}-{contender}")
                try:
                    tf.profiler.experimental.start(logdir)
                except Exception as error:  # noqa: BLE001 - profiling is optional
                    benchlib.log(f"profiler unavailable: {error}")
                    return traces
                try:
                    run(contender, model, batch, isolated=False)
                finally:
                    tf.profiler.experimental.stop()
                traces.append(logdir)
                benchlib.log(f"profile: {logdir}")
    return traces


def main(argv=None) -> int:
    args = parse_args(argv)
    command = benchlib.command_line(__file__, args, FLAG_ORDER)
    info = benchlib.machine_info()
    benchlib.print_header(
        "training throughput: estimator_bridge vs tutorial model_fn vs Keras fit", command, info
    )
    args.precision, reason = preflight.choose_precision(args.precision)
    print(f"precision: {args.precision} ({reason or 'asked for'})")
    preflight.warn_if_bf16_is_emulated(args.precision, stream=sys.stdout)
    os.makedirs(args.work_dir, exist_ok=True)
    data_dir = benchlib.ensure_project_data(args.work_dir, args.source_dir)
    record_dir = os.path.join(args.work_dir, "tutorial_records")
    if "tutorial" in args.contenders:
        tutorial_baseline.write_records(record_dir, args.source_dir)
        print(
            f"tutorial records: {tutorial_baseline.record_bytes(record_dir):,.0f} bytes/record "
            f"(float list); project records: "
            f"{_project_record_bytes(data_dir):,.0f} bytes/record"
        )
    run = make_runner(args, data_dir, record_dir)

    runs: List[Dict[str, Any]] = []
    started = time.perf_counter()
    for round_index in range(args.rounds):
        shift = round_index % len(args.contenders)
        order = args.contenders[shift:] + args.contenders[:shift]
        for model in args.models:
            for batch in args.batch_sizes:
                for contender in order:
                    result = run(contender, model, batch)
                    record = {
                        "round": round_index + 1,
                        "model": model,
                        "batch_size": batch,
                        "contender": contender,
                        "precision": "float32" if contender == "tutorial" else args.precision,
                        **result,
                    }
                    runs.append(record)
                    status = result.get("error") or (
                        f"{benchlib.fmt_rate(result['examples_per_sec'])} examples/s "
                        f"({result['seconds']:.1f}s timed, {result['startup_s']:.1f}s startup)"
                    )
                    print(
                        f"round {round_index + 1}/{args.rounds}  {model:<8} batch {batch:<4} "
                        f"{contender:<8} {status}",
                        flush=True,
                    )
    elapsed = time.perf_counter() - started

    rows = summarise(args, runs)
    print_summary(args, rows)
    traces = run_profile(args, run) if args.profile else []
    if traces:
        print(f"profiles: {len(traces)} traces; view with: tensorboard --logdir={args.profile}")
    return benchlib.finish_runs(
        "throughput",
        command,
        info,
        elapsed,
        runs,
        args.json_out,
        settings={**{k: getattr(args, k) for k in FLAG_ORDER}, "tutorial_precision": "float32"},
        summary=rows,
        profiles=traces,
    )


def _project_record_bytes(data_dir: str) -> float:
    spec = data_pipeline.load_spec(data_dir)
    size = sum(os.path.getsize(path) for path in spec.files("train"))
    return size / max(spec.num_records("train"), 1)


if __name__ == "__main__":
    sys.exit(main())
