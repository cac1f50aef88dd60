"""The benchmarks' arithmetic: bench_throughput's medians, ratios and paired by-round ratio,
bench_serving's medians, ratios to onnxruntime and probability differences, and bench_accuracy's
recipes and verdict."""

import argparse
import os
import sys

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
)
import bench_serving  # noqa: E402
import bench_throughput  # noqa: E402


def _args(contenders=bench_throughput.CONTENDERS):
    return argparse.Namespace(
        models=["cnn"],
        batch_sizes=[128],
        contenders=list(contenders),
        rounds=3,
        steps=100,
        warmup_steps=10,
        precision="float32",
    )


def _runs(rates_by_round):
    return [
        {
            "model": "cnn",
            "batch_size": 128,
            "round": number,
            "contender": contender,
            "examples_per_sec": rate,
            "startup_s": 5.0 + number,
        }
        for number, rates in enumerate(rates_by_round, 1)
        for contender, rate in rates.items()
    ]


def test_summary_medians_ratios_and_rounds_paired_against_the_faster_peer(capsys):
    runs = _runs(
        [
            {"bridge": 1000.0, "tutorial": 900.0, "fit": 1100.0},
            {"bridge": 1200.0, "tutorial": 1000.0, "fit": 1000.0},
            {"bridge": 900.0, "tutorial": 1000.0, "fit": None},  # fit failed: round unpaired
        ]
    )
    (row,) = bench_throughput.summarise(_args(), runs)
    assert (row["bridge"], row["tutorial"], row["fit"]) == (1000.0, 1000.0, 1050.0)
    assert row["bridge_over_tutorial"] == 1.0
    assert row["bridge_over_fit"] == pytest.approx(1000 / 1050)
    assert row["bridge_over_faster_peer_by_round"] == pytest.approx([1000 / 1100, 1200 / 1000])
    assert row["max_spread"] == pytest.approx(300 / 1000)  # bridge: (1200 - 900) / 1000
    assert row["bridge_startup_s"] == 7.0

    bench_throughput.print_summary(_args(), [row])
    lines = capsys.readouterr().out.splitlines()
    assert "bridge/faster peer by round" in lines[-3]
    assert (
        lines[-1].split()
        == "cnn 128 1,000 1,000 1,050 1.00x 0.95x 0.91 1.20 30% 7.0 7.0 7.0".split()
    )


def test_summary_without_both_peers_has_no_by_round_column(capsys):
    runs = _runs([{"bridge": 1000.0, "fit": 800.0}])
    args = _args(contenders=("bridge", "fit"))
    (row,) = bench_throughput.summarise(args, runs)
    assert row["bridge_over_fit"] == 1.25 and row["bridge_over_faster_peer_by_round"] == []
    bench_throughput.print_summary(args, [row])
    lines = capsys.readouterr().out.splitlines()
    header, line = lines[-3], lines[-1]
    assert "by round" not in header
    assert line.split() == "cnn 128 1,000 800 1.25x - 6.0 6.0".split()


def test_serving_summary_takes_medians_ratios_to_onnxruntime_and_differences(capsys):
    args = argparse.Namespace(
        models=["cnn"],
        paths=["serving", "onnxruntime", "tf1_session"],
        rounds=3,
        latency_calls=10,
        warmup_calls=1,
        throughput_batch=512,
        throughput_calls=2,
        threads=1,
    )
    runs = []
    for path, p50s, rates, shift, engines in (
        ("serving", [3.0, 1.0, 2.0], [900.0, 1100.0, 1000.0], 2e-6, ["onnxruntime"] * 2),
        ("onnxruntime", [1.0, 0.5, 2.0], [2000.0, 1000.0, 1500.0], 0.0, [None] * 3),
        ("tf1_session", [4.0, 4.0, 4.0], [500.0, 500.0, 500.0], 0.0, [None] * 3),
    ):
        for p50, rate, engine in zip(p50s, rates, [*engines, "tensorflow"]):
            runs.append(
                {
                    "model": "cnn",
                    "path": path,
                    "load_s": p50 / 2,
                    "engine": engine,
                    "p50_ms": p50,
                    "p90_ms": 2 * p50,
                    "p99_ms": 4 * p50,
                    "examples_per_sec": rate,
                    "probabilities": [[0.25 + shift, 0.75 - shift]],
                }
            )
    runs.append({"model": "cnn", "path": "serving", "error": "RuntimeError: ignored"})
    rows = {row["path"]: row for row in bench_serving.summarise(args, runs)}
    serving = rows["serving"]
    assert serving["rounds"] == 3 and serving["p50_ms"] == 2.0 and serving["p99_ms"] == 8.0
    assert serving["p50_ratio"] == pytest.approx(2.0)  # medians 2.0 / 1.0
    assert serving["throughput_ratio"] == pytest.approx(1000 / 1500)
    assert serving["max_abs_diff"] == pytest.approx(2e-6)
    assert rows["onnxruntime"]["p50_ratio"] == 1.0
    assert rows["tf1_session"]["max_abs_diff"] == 0.0
    # serving.load's choice in each round, and the median load time.
    assert serving["engine"] == "onnxruntime 2, tensorflow 1" and serving["load_s"] == 1.0
    assert rows["onnxruntime"]["engine"] == ""
    bench_serving.print_summary(args, list(rows.values()))
    line = capsys.readouterr().out.splitlines()[-3]
    assert line.split()[:3] == ["cnn", "serving", "2.00"] and "onnxruntime 2, tensorflow 1" in line


def test_accuracy_recipes_take_the_cli_defaults_or_the_tutorials_exact_ones():
    import bench_accuracy

    def config(*flags, model="rnn"):
        args = bench_accuracy.parse_args(["--models", model, *flags])
        return bench_accuracy.make_config(args, model, 0, "data", "model_dir")

    # "tutorial": the tutorial's budget under the CLI's defaults for the network.
    rnn = config()
    assert (rnn.epochs, rnn.batch_size, rnn.augment) == (3, 128, False)
    assert (rnn.learning_rate, rnn.lr_schedule) == (1e-3, "cosine")
    assert config(model="cnn").lr_schedule == "constant"
    # "tutorial_exact": Adam 1e-3 constant for every network; bench flags override recipes.
    exact = config("--recipe=tutorial_exact")
    assert (exact.epochs, exact.learning_rate, exact.lr_schedule) == (3, 1e-3, "constant")
    assert config("--recipe=tutorial_exact", "--lr_schedule=cosine").lr_schedule == "cosine"
    assert config("--learning_rate=2e-3").learning_rate == 2e-3


def test_accuracy_verdict_is_on_the_mean_minus_one_standard_deviation():
    import bench_accuracy

    args = bench_accuracy.parse_args(["--models=rnn", "--seeds=0,1"])
    runs = [
        {"model": "rnn", "seed": s, "epochs": 3, "test_accuracy": a}
        for s, a in ((0, 0.9860), (1, 0.9850))
    ]
    (row,) = bench_accuracy.summarise(args, runs)
    assert row["mean"] == pytest.approx(0.9855) and row["sd"] == pytest.approx(0.000707, abs=1e-6)
    # The mean beats the tutorial's 98.48 %, one sd below it does not.
    assert row["mean_minus_sd"] < 0.9848 and row["verdict"] == "FAIL"
