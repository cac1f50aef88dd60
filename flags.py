"""Command-line flags; only ``main.py`` and this module touch absl flags."""

import textwrap

from absl import flags

MODES = ("prepare", "train", "evaluate", "train_and_evaluate", "predict", "export")
# Kept here rather than imported so `--help` does not import TensorFlow.
MODEL_NAMES = ("birnn", "cnn", "cnn_rnn", "rnn")
# distribution.STRATEGIES, repeated so `--help` does not import the project.
DISTRIBUTIONS = ("none", "mirrored", "multi_worker_mirrored", "parameter_server")

# What `main.py --help` shows: the flags by task, in this order. A name not defined (yet) is
# skipped; a defined flag in no group is shown under "other" (and every one is in --helpfull).
HELP_GROUPS = (
    ("every job", ("mode", "model", "model_params", "data_dir", "model_dir", "seed")),
    (
        "prepare: images or MNIST into TFRecord shards",
        (
            "source_dir",
            "image_size",
            "channels",
            "records_per_shard",
            "shard_mb",
            "gzip",
            "overwrite",
            "prepare_engine",
            "beam_options",
        ),
    ),
    (
        "train (also train_and_evaluate)",
        (
            "epochs",
            "train_steps",
            "batch_size",
            "learning_rate",
            "lr_schedule",
            "dropout_rate",
            "augment",
            "augment_shift",
            "precision",
            "warm_start_from",
            "limit",
            "save_checkpoints_steps",
            "keep_checkpoint_max",
            "log_every_n_steps",
        ),
    ),
    (
        "evaluate",
        ("eval_split", "checkpoint_path", "eval_batch_size", "eval_throttle_secs"),
    ),
    ("predict", ("predict_split", "inputs", "top_k", "output_dir", "plot")),
    (
        "export",
        ("export_dir", "keras_output", "keras_format", "unsafe_deserialization"),
    ),
    (
        "threads and clusters",
        ("distribution", "intra_op_threads", "inter_op_threads"),
    ),
)


def help_text(flag_values, usage: str) -> str:
    """The short ``--help`` page: ``usage``, then one line per flag, grouped by task.

    Args:
        flag_values: the absl ``FlagValues`` holding the flags ``define_flags`` defined.
        usage: text printed first (main.py's docstring).
    """
    ours = {flag.name: flag for flag in flag_values.get_flags_for_module(__name__)}
    grouped = [(title, [n for n in names if n in ours]) for title, names in HELP_GROUPS]
    listed = {name for _, names in grouped for name in names}
    grouped.append(("other", sorted(set(ours) - listed)))
    lines = [usage.strip(), ""]
    for title, names in grouped:
        if not names:
            continue
        lines.append(f"{title}:")
        for name in names:
            flag = ours[name]
            if flag.boolean:
                head = f"--[no]{name}"
            else:
                default = "" if flag.default is None else flag.default_as_str.strip("'")
                head = f"--{name}={default}"
            lines.extend(
                textwrap.wrap(
                    " ".join(flag.help.split()),
                    width=100,
                    initial_indent=f"  {head:<29} " if len(head) < 30 else f"  {head}  ",
                    subsequent_indent=" " * 32,
                )
            )
        lines.append("")
    lines.append("--helpfull: every flag with its full text, absl's own included.")
    return "\n".join(lines)


def define_flags() -> None:
    """Defines every flag; called once from ``main.py`` so importing this module has no effect."""
    f = flags
    f.DEFINE_enum("mode", "train", MODES, "What to run.")
    f.DEFINE_string(
        "model",
        "cnn",
        f"Network: one of {', '.join(MODEL_NAMES)}; or package.module:function, a builder "
        "returning a functional keras.Model (it gets input_shape/num_classes from the data if it "
        "takes them); or a .keras/.h5 model file (its weights start training).",
    )
    f.DEFINE_string(
        "model_params",
        None,
        """Builder keyword arguments as a JSON object, e.g. '{"dense_units": 512}'.""",
    )
    # Data.
    f.DEFINE_string("data_dir", "data/mnist", "Folder of TFRecord shards + dataset_spec.json.")
    f.DEFINE_string(
        "source_dir",
        None,
        "prepare: IDX files, an .npz archive (x_train, y_train, x_test, y_test) or an image "
        "folder SRC/train/<class>/*.png|jpg + SRC/test/<class>/... (else $MNIST_DIR).",
    )
    f.DEFINE_integer(
        "records_per_shard",
        None,
        "prepare: records per TFRecord shard (default 1000, fewer if a shard would exceed 200 MB).",
        lower_bound=1,
    )
    f.DEFINE_float(
        "shard_mb",
        None,
        "prepare: instead of --records_per_shard, shards of about this many MB (TensorFlow "
        "suggests 100-200).",
        lower_bound=0.001,
    )
    f.DEFINE_list(
        "image_size", None, "prepare, image folders: resize every image to H,W (bilinear)."
    )
    f.DEFINE_enum(
        "channels",
        None,
        ["1", "3"],
        "prepare, image folders: 1 (grayscale) or 3 (RGB); default: the first train image's.",
    )
    f.DEFINE_bool("gzip", False, "prepare: GZIP-compress the shards.")
    f.DEFINE_bool("overwrite", False, "prepare: rewrite complete output instead of reusing it.")
    f.DEFINE_enum(
        "prepare_engine",
        "local",
        ["local", "beam"],
        "prepare: local (this process, streaming) or beam (an Apache Beam pipeline: one worker "
        "per core here, or any Beam runner through --beam_options).",
    )
    f.DEFINE_string(
        "beam_options",
        None,
        "prepare, --prepare_engine=beam: Beam pipeline options, passed through, e.g. "
        "'--direct_num_workers=2' or '--runner=FlinkRunner --flink_master=HOST:8081'.",
    )
    # Training.
    f.DEFINE_string(
        "model_dir",
        None,
        "Checkpoints and summaries (default models/<label>: the registry name, builder function "
        "name or model file stem).",
    )
    f.DEFINE_integer("batch_size", 128, "Training batch size (the tutorial's 128).")
    f.DEFINE_integer("eval_batch_size", 1000, "Evaluation and prediction batch size.")
    f.DEFINE_float(
        "epochs",
        1.0,
        "Train until global step ceil(epochs x the train split's records / --batch_size), "
        "counted from step 0 (a rerun resumes; raise it to train further).",
    )
    f.DEFINE_integer(
        "train_steps", None, "Train until this global step; overrides --epochs (from step 0)."
    )
    # Unset, these two take the network's own training defaults (keras_models.TRAINING_DEFAULTS,
    # spelled out here so that --help does not import TensorFlow).
    f.DEFINE_float("learning_rate", None, "Peak Adam learning rate (default 1e-3).")
    f.DEFINE_enum(
        "lr_schedule",
        None,
        ("constant", "cosine", "exponential"),
        "Learning-rate decay over the run; cosine ends at 0 (default: cosine for rnn, constant for "
        "the others; --lr_schedule=constant is the tutorial's).",
    )
    f.DEFINE_float(
        "dropout_rate", 0.4, "Dropout before the logits layer (builders taking dropout_rate)."
    )
    f.DEFINE_bool("augment", False, "Shift training images randomly by up to --augment_shift px.")
    f.DEFINE_integer("augment_shift", 2, "Largest random shift in pixels.", lower_bound=0)
    f.DEFINE_enum(
        "precision",
        "auto",
        ("auto", "float32", "mixed_bfloat16"),
        "Compute dtype (variables stay float32); auto: mixed_bfloat16 where the devices have bf16 "
        "arithmetic, float32 elsewhere.",
    )
    f.DEFINE_integer(
        "seed", None, "Seed everything random: reruns write bit-identical checkpoints."
    )
    f.DEFINE_string(
        "warm_start_from",
        None,
        "Keras weights or model file (.keras/.h5, Keras 2 or Keras 3) to start from.",
    )
    f.DEFINE_bool(
        "unsafe_deserialization",
        False,
        "Let --model/--warm_start_from files run the Python they carry (a Lambda's code); "
        "without it such files are refused before anything is built. Only for files you trust.",
    )
    f.DEFINE_integer("save_checkpoints_steps", 500, "Checkpoint every N steps.")
    f.DEFINE_integer("keep_checkpoint_max", 5, "Checkpoints kept.")
    f.DEFINE_integer("log_every_n_steps", 100, "Progress line every N steps.")
    f.DEFINE_integer("intra_op_threads", 0, "TensorFlow intra-op threads (0: automatic).")
    f.DEFINE_integer("inter_op_threads", 0, "TensorFlow inter-op threads (0: automatic).")
    f.DEFINE_enum(
        "distribution",
        "none",
        DISTRIBUTIONS,
        "tf.distribute strategy; the cluster comes from TF_CONFIG (docs/DISTRIBUTED.md).",
    )
    f.DEFINE_integer("limit", None, "Use only the first N examples of each split (quick runs).")
    # Evaluation, prediction, export.
    f.DEFINE_string("checkpoint_path", None, "Checkpoint prefix or folder (default: latest).")
    f.DEFINE_enum("eval_split", "test", ("train", "test", "both"), "Split(s) to evaluate.")
    f.DEFINE_integer("eval_throttle_secs", 60, "train_and_evaluate: least seconds between evals.")
    f.DEFINE_enum("predict_split", "test", ("train", "test"), "predict: split to predict.")
    f.DEFINE_string(
        "inputs",
        None,
        "predict: new image files instead of --predict_split: a file, a folder (recursive) or a "
        "glob; decoded as prepare did; with --export_dir, predicted by that export.",
    )
    f.DEFINE_integer("top_k", 3, "predict --inputs: classes per file in predictions.csv.")
    f.DEFINE_string("output_dir", None, "predict: CSV and plots (default predictions/<label>).")
    f.DEFINE_bool("plot", False, "predict: also write PNGs of sample digits and conv1 maps.")
    f.DEFINE_string("export_dir", None, "export: SavedModel parent (default exports/<label>).")
    f.DEFINE_string(
        "keras_output", None, "export: also save the trained network here (.keras or .h5)."
    )
    f.DEFINE_enum(
        "keras_format",
        "keras3",
        ("keras3", "tf_keras"),
        "export: --keras_output for Keras 3 (keras.saving.load_model in TF 2.16+) or tf_keras.",
    )
    flags.register_validator(
        "image_size",
        lambda v: v is None or (len(v) == 2 and all(s.isdigit() and int(s) > 0 for s in v)),
        message="--image_size must be two positive integers H,W, e.g. --image_size=128,128",
    )
    flags.register_multi_flags_validator(
        ["records_per_shard", "shard_mb"],
        lambda v: v["records_per_shard"] is None or v["shard_mb"] is None,
        message="pass --records_per_shard or --shard_mb, not both",
    )
