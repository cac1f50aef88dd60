"""Training throughput under ``--precision=auto`` against float32, network by network.

Each case (network, batch size, precision) is one ``bench_throughput.py --contenders=bridge
--rounds=1`` process, so a precision never inherits the other's thread pools or caches. Within a
round the two precisions of a network run back to back, in an order that alternates from round
to round, so slow drift of a shared machine hits both alike; the figure that counts is the
per-round ratio auto / float32, then its median.

    .venv/bin/python bench/bench_precision.py --models=cnn --rounds=1 --steps=30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchlib  # noqa: E402

import keras_models  # noqa: E402
import preflight  # noqa: E402

THROUGHPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_throughput.py")
FLAG_ORDER = ("models", "batch_sizes", "steps", "rounds", "warmup_steps", "work_dir", "source_dir")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=benchlib.csv_list, default=list(keras_models.MODEL_NAMES))
    parser.add_argument("--batch_sizes", type=benchlib.int_list, default=[128])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup_steps", type=int, default=10)
    parser.add_argument("--work_dir", default=benchlib.DEFAULT_WORK_DIR)
    parser.add_argument("--source_dir", default=benchlib.default_source_dir())
    parser.add_argument("--json_out", default=None)
    return parser.parse_args(argv)


def run_case(args, model: str, batch: int, precision: str) -> float:
    """examples/s of one bench_throughput.py process (bridge only, one round)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "run.json")
        command = [
            sys.executable,
            THROUGHPUT,
            f"--models={model}",
            f"--batch_sizes={batch}",
            f"--steps={args.steps}",
            f"--warmup_steps={args.warmup_steps}",
            "--rounds=1",
            "--contenders=bridge",
            f"--precision={precision}",
            f"--work_dir={args.work_dir}",
            f"--json_out={out}",
        ] + ([f"--source_dir={args.source_dir}"] if args.source_dir else [])
        subprocess.run(command, check=True, capture_output=True, text=True)
        with open(out) as handle:
            return json.load(handle)["runs"][0]["examples_per_sec"]


def main(argv=None) -> int:
    args = parse_args(argv)
    command = benchlib.command_line(__file__, args, FLAG_ORDER)
    info = benchlib.machine_info()
    benchlib.print_header("training examples/s: --precision=auto vs float32", command, info)
    auto, reason = preflight.choose_precision("auto")
    print(f"auto resolves to {auto} ({reason})", flush=True)
    started = time.perf_counter()
    results = {}
    for round_index in range(args.rounds):
        order = ("float32", "auto") if round_index % 2 == 0 else ("auto", "float32")
        for model in args.models:
            for batch in args.batch_sizes:
                rates = results.setdefault((model, batch), {"float32": [], "auto": []})
                for precision in order:
                    rate = run_case(args, model, batch, precision)
                    rates[precision].append(rate)
                    print(
                        f"round {round_index + 1}/{args.rounds}  {model:<8} batch {batch:<4} "
                        f"{precision:<8} {benchlib.fmt_rate(rate)} examples/s  "
                        f"(load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
    table, summary = [], []
    for (model, batch), rates in results.items():
        ratios = [a / f for a, f in zip(rates["auto"], rates["float32"])]
        row = {
            "model": model,
            "batch_size": batch,
            "float32": benchlib.median(rates["float32"]),
            "auto": benchlib.median(rates["auto"]),
            "ratios_by_round": ratios,
            "median_ratio": benchlib.median(ratios),
        }
        summary.append(row)
        table.append(
            [
                model,
                batch,
                benchlib.fmt_rate(row["float32"]),
                benchlib.fmt_rate(row["auto"]),
                " ".join(f"{r:.2f}" for r in ratios),
                f"{row['median_ratio']:.2f}",
            ]
        )
    print()
    print(
        f"median examples/s over {args.rounds} round(s) of {args.steps} steps (first "
        f"{args.warmup_steps} excluded); auto = {auto}; ratio = auto / float32 in the same round"
    )
    benchlib.print_table(
        ["model", "batch", "float32 ex/s", "auto ex/s", "auto/f32 by round", "median"], table
    )
    print(f"total {time.perf_counter() - started:.0f}s; load average at the end {os.getloadavg()}")
    print(f"command: {command}")
    benchlib.write_json(
        args.json_out,
        {"command": command, "machine": info, "auto": auto, "reason": reason, "summary": summary},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
