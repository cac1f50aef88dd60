"""Command-line flags; only ``main.py`` and this module touch absl flags."""

from absl import flags

MODES = ("prepare", "train", "evaluate", "train_and_evaluate", "predict", "export")
# Kept here rather than imported so `--help` does not import TensorFlow.
MODEL_NAMES = ("birnn", "cnn", "cnn_rnn", "rnn")
# distribution.STRATEGIES, repeated so `--help` does not import the project.
DISTRIBUTIONS = ("none", "mirrored", "multi_worker_mirrored", "parameter_server")


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
        "source_dir", None, "prepare: folder of MNIST IDX files or an mnist.npz (else $MNIST_DIR)."
    )
    f.DEFINE_integer(
        "records_per_shard", 1000, "prepare: records per TFRecord shard.", lower_bound=1
    )
    f.DEFINE_bool("gzip", False, "prepare: GZIP-compress the shards.")
    f.DEFINE_bool("overwrite", False, "prepare: rewrite complete output instead of reusing it.")
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
        "epochs", 1.0, "Train until this many passes over the train split (from step 0)."
    )
    f.DEFINE_integer(
        "train_steps", None, "Train until this global step; overrides --epochs (from step 0)."
    )
    f.DEFINE_float("learning_rate", 1e-3, "Peak Adam learning rate.")
    f.DEFINE_enum("lr_schedule", "constant", ("constant", "cosine", "exponential"), "LR decay.")
    f.DEFINE_float(
        "dropout_rate", 0.4, "Dropout before the logits layer (builders taking dropout_rate)."
    )
    f.DEFINE_bool("augment", False, "Shift training images randomly by up to --augment_shift px.")
    f.DEFINE_integer("augment_shift", 2, "Largest random shift in pixels.", lower_bound=0)
    f.DEFINE_enum(
        "precision", "float32", ("float32", "mixed_bfloat16"), "Compute dtype (variables f32)."
    )
    f.DEFINE_integer("seed", None, "Random seed; set it for deterministic input order.")
    f.DEFINE_string("warm_start_from", None, "Keras weights file (.keras/.h5) to start from.")
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
    f.DEFINE_string("output_dir", None, "predict: CSV and plots (default predictions/<label>).")
    f.DEFINE_bool("plot", False, "predict: also write PNGs of sample digits and conv1 maps.")
    f.DEFINE_string("export_dir", None, "export: SavedModel parent (default exports/<label>).")
    f.DEFINE_string("keras_output", None, "export: also save the trained network as .keras here.")
