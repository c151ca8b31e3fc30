"""The flags that name an encoder (shared by the embed and neighbors tools), and loading it.

A run folder (--model_dir, optionally --checkpoint), an exported SavedModel
(--saved_model), or the run's architecture freshly initialised (--random_init, the
baseline); --features picks the backbone's pooled features or a head's output.
"""

from absl import flags

FLAGS = flags.FLAGS


def define_encoder_flags():
    flags.DEFINE_string("model_dir", None, "A training run folder (config.json and "
                        "final.keras), e.g. runs/demo, or one made by an importer.")
    flags.DEFINE_string("checkpoint", None, "A .keras checkpoint to use instead of "
                        "<model_dir>/final.keras.")
    flags.DEFINE_string("saved_model", None, "An encoder exported by "
                        "`python -m wcl_tf.tools.export` (instead of --model_dir).")
    flags.DEFINE_bool("random_init", False, "Use a randomly initialised encoder of the run's "
                      "architecture (backbone and width from config.json): the baseline.")
    flags.DEFINE_integer("seed", 0, "Seed of the --random_init weights.")
    flags.DEFINE_enum("features", "backbone", ["backbone", "instance_head", "graph_head"],
                      "What is embedded: the backbone's pooled features, or the output of "
                      "the instance (SimCLR) or graph head.")
    flags.DEFINE_integer("image_size", None, "Side the images are resized/cropped to. "
                         "Default: image_size of the run (config.json) or of the export.",
                         lower_bound=8)
    flags.DEFINE_enum("preprocessing", None, ["resize_center_crop", "squash"], "The "
                      "evaluation preprocessing: resize the shorter side + centre crop, or "
                      "squash to a square. Default: the export's rule (resize_center_crop "
                      "above 64 px).")


def encoder_given():
    return bool(FLAGS.model_dir or FLAGS.checkpoint or FLAGS.saved_model)


def load_from_flags():
    """wcl_tf.encoder.load_encoder with the flags (EmbedError on a mistake)."""
    from wcl_tf import encoder  # pylint: disable=import-outside-toplevel

    return encoder.load_encoder(
        model_dir=FLAGS.model_dir, checkpoint=FLAGS.checkpoint, saved_model=FLAGS.saved_model,
        features=FLAGS.features, random_init=FLAGS.random_init, seed=FLAGS.seed,
        image_size=FLAGS.image_size, preprocessing=FLAGS.preprocessing)


def load_recorded(record):
    """The encoder an embeddings manifest records (its `encoder` entry)."""
    from wcl_tf import encoder  # pylint: disable=import-outside-toplevel

    return encoder.load_encoder(
        model_dir=record.get("model_dir"), checkpoint=record.get("checkpoint"),
        saved_model=record.get("saved_model"), features=record["features"],
        random_init=bool(record.get("random_init")), seed=int(record.get("seed") or 0),
        image_size=record.get("image_size"), preprocessing=record.get("preprocessing"))
