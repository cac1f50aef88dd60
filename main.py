"""Command-line entry point: parse flags, build one config, run one job.

Usage (after `make demo` or `make test` set up .venv; README.md has each task's output):
    .venv/bin/python main.py --mode=prepare --source_dir=my_images --data_dir=data/my_images
    .venv/bin/python main.py --mode=train --model=cnn --data_dir=data/my_images --epochs=3
    .venv/bin/python main.py --mode=evaluate --model=cnn --data_dir=data/my_images
    .venv/bin/python main.py --mode=predict --model=cnn --data_dir=data/my_images --plot
    .venv/bin/python main.py --mode=export --model=cnn --data_dir=data/my_images
"""

import json
import os
import sys

from absl import app
from absl import flags as absl_flags

import flags
import tfenv  # noqa: F401 - must precede TensorFlow: silences its C++ logs

FLAGS = absl_flags.FLAGS


def build_config():
    """One estimator_bridge.Config from the parsed flags."""
    import estimator_bridge
    import keras_models
    import preflight

    label = keras_models.model_label(FLAGS.model)
    precision, precision_reason = preflight.choose_precision(FLAGS.precision)
    return estimator_bridge.Config(
        model=FLAGS.model,
        model_params=keras_models.parse_model_params(FLAGS.model_params),
        data_dir=FLAGS.data_dir,
        model_dir=FLAGS.model_dir or os.path.join("models", label),
        batch_size=FLAGS.batch_size,
        eval_batch_size=FLAGS.eval_batch_size,
        epochs=FLAGS.epochs,
        train_steps=FLAGS.train_steps,
        learning_rate=FLAGS.learning_rate,
        lr_schedule=FLAGS.lr_schedule,
        dropout_rate=FLAGS.dropout_rate,
        precision=precision,
        precision_reason=precision_reason,
        augment=FLAGS.augment,
        augment_shift=FLAGS.augment_shift,
        seed=FLAGS.seed,
        checkpoint_path=FLAGS.checkpoint_path,
        eval_split=FLAGS.eval_split,
        eval_limit=FLAGS.limit,
        train_limit=FLAGS.limit,
        export_dir=FLAGS.export_dir or os.path.join("exports", label),
        predict_split=FLAGS.predict_split,
        inputs=FLAGS.inputs,
        top_k=FLAGS.top_k,
        # predict --inputs: with --export_dir, the export predicts instead of the checkpoint.
        predict_export=FLAGS.export_dir if FLAGS.inputs else None,
        output_dir=FLAGS.output_dir or os.path.join("predictions", label),
        plot=FLAGS.plot,
        warm_start_from=FLAGS.warm_start_from,
        keras_output=FLAGS.keras_output,
        keras_format=FLAGS.keras_format,
        unsafe_deserialization=FLAGS.unsafe_deserialization,
        save_checkpoints_steps=FLAGS.save_checkpoints_steps,
        keep_checkpoint_max=FLAGS.keep_checkpoint_max,
        log_every_n_steps=FLAGS.log_every_n_steps,
        intra_op_threads=FLAGS.intra_op_threads,
        inter_op_threads=FLAGS.inter_op_threads,
        eval_throttle_secs=FLAGS.eval_throttle_secs,
        distribution=FLAGS.distribution,
    )


def run() -> dict:
    """Runs the job named by --mode and returns its result."""
    if FLAGS.mode == "prepare":
        import data_pipeline
        import preflight

        preflight.check_output_dir(FLAGS.data_dir, "--data_dir")

        spec = data_pipeline.prepare(
            FLAGS.data_dir,
            source_dir=FLAGS.source_dir,
            records_per_shard=FLAGS.records_per_shard,
            shard_mb=FLAGS.shard_mb,
            compression="GZIP" if FLAGS.gzip else None,
            overwrite=FLAGS.overwrite,
            image_size=tuple(map(int, FLAGS.image_size)) if FLAGS.image_size else None,
            channels=int(FLAGS.channels) if FLAGS.channels else None,
            engine=FLAGS.prepare_engine,
            beam_options=FLAGS.beam_options,
        )
        return {"data_dir": FLAGS.data_dir, **{s: spec.num_records(s) for s in spec.splits}}
    import jobs

    return getattr(jobs, FLAGS.mode)(build_config())


def main(argv):
    """Runs one job; known failures become one line on stderr and an exit code."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    tfenv.silence_python_logging()
    import data_pipeline
    import estimator_bridge
    import keras_models

    try:
        # A full disk that a job did not translate itself still becomes one line.
        with data_pipeline.diskfull.quiet_background_writers():
            with data_pipeline.translate_disk_full():
                result = run()
    except (
        data_pipeline.DataError,
        data_pipeline.DiskFullError,
        estimator_bridge.UsageError,
        estimator_bridge.TrainingError,
        keras_models.ModelError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    print(json.dumps(result))
    if result.get("interrupted"):
        sys.exit(130)


HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")


def parse_flags(argv):
    """Parses flags like absl, but a bad flag is one line on stderr and exit code 2.

    ``--help`` prints the flags grouped by task (absl's own lists only the main module's flags,
    none here); ``--helpfull`` stays absl's.
    """
    if any(arg in HELP_ARGS for arg in argv[1:]):
        print(flags.help_text(FLAGS, __doc__))
        sys.exit(0)
    try:
        return FLAGS(argv)
    except absl_flags.Error as error:
        print(f"error: {error} (see --helpfull)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    flags.define_flags()
    app.run(main, flags_parser=parse_flags)
