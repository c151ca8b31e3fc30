"""Embed a folder of images (or a TFDS split) with a trained encoder, into shards on disk.

    python -m wcl_tf.tools.embed --model_dir=runs/demo --images=PHOTOS --out=emb/photos
    python -m wcl_tf.tools.embed --saved_model=runs/demo/export --images=PHOTOS --out=emb/x
    python -m wcl_tf.tools.embed --model_dir=runs/c10 --dataset=cifar10 --split=test \
        --data_dir=DIR --out=emb/c10

Every image below --images (recursively; class subfolders become the class column) goes
through the evaluation preprocessing (resize the shorter side + centre crop, or the small
models' squash, as the exported model does), the encoder in inference mode on every
device of --strategy, and is L2-normalised (--normalize). --out receives
embeddings-NNNNN.npy (float16 or float32, np.load / faiss read them), files-NNNNN.csv
(path, class, height, width) and manifest.json (the encoder, its fingerprint, the
settings, the skipped files). A killed run resumes from its last complete shard when
rerun with the same command. Then: python -m wcl_tf.tools.neighbors --embeddings=OUT ...
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import flags  # noqa: E402

from wcl_tf.tools import _cli, _encoder, run_dir  # noqa: E402

FLAGS = flags.FLAGS
_encoder.define_encoder_flags()
flags.DEFINE_string("images", None, "Folder of images (searched recursively; class "
                    "subfolders give the class column).")
flags.DEFINE_string("dataset", None, "Instead of --images: a TFDS dataset name (or "
                    "embedded_mnist).")
flags.DEFINE_string("split", "test", "TFDS split with --dataset.")
flags.DEFINE_string("data_dir", None, "TFDS data directory with --dataset.")
flags.DEFINE_bool("download", False, "Let TFDS download a missing --dataset.")
flags.DEFINE_string("out", None, "Folder to write the embeddings to.")
flags.DEFINE_bool("normalize", True, "L2-normalise the embeddings.")
flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "Stored dtype.")
flags.DEFINE_integer("batch_size", 64, "Images per batch.", lower_bound=1)
flags.DEFINE_integer("shard_size", 4096, "Images per shard (the unit of resuming).",
                     lower_bound=1)
flags.DEFINE_enum("on_bad_image", "skip", ["skip", "fail"], "Files that do not decode: "
                  "skip and list them in manifest.json, or stop.")
flags.DEFINE_enum("strategy", "one_device", ["one_device", "mirrored"], "Devices: the "
                  "first GPU (else the CPU), or all local GPUs.")
flags.DEFINE_bool("overwrite", False, "Replace embeddings of other settings in --out "
                  "(otherwise refused; the same settings resume).")


class _Progress:
    """A Keras progress bar over the listing, with images/s."""

    def __init__(self, total, begin):
        import keras  # pylint: disable=import-outside-toplevel

        self.bar = keras.utils.Progbar(total, unit_name="image", stateful_metrics=["img/s"])
        self.begin = begin

    def __call__(self, done, total, seconds, shard):
        del total
        if shard is None:
            rate = (done - self.begin) / max(seconds, 1e-9)
            self.bar.update(done, [("img/s", rate)])


def embed_main():
    if bool(FLAGS.images) == bool(FLAGS.dataset):
        raise run_dir.UserError("pass --images=FOLDER or --dataset=NAME (one of them).")
    if not FLAGS.out:
        raise run_dir.UserError("pass --out=FOLDER, where the embeddings are written.")
    if not _encoder.encoder_given():
        raise run_dir.UserError("pass --model_dir=RUN_DIR (or --saved_model=EXPORT_DIR): "
                                "the encoder to embed with.")
    from wcl_tf import (  # pylint: disable=import-outside-toplevel
        embed_errors, embed_sources, embedding, strategy)

    if FLAGS.images:
        source = embed_sources.ImageFolder(FLAGS.images)
    else:
        source = embed_sources.TfdsSplit(FLAGS.dataset, FLAGS.split, FLAGS.data_dir,
                                         FLAGS.download)
    encoder = _encoder.load_from_flags()
    try:
        begin = embedding.read_manifest(FLAGS.out)["shards"][-1]["stop"]
    except (embed_errors.EmbedError, IndexError, KeyError):
        begin = 0
    run_dir.log(f"embedding {len(source)} images of {source.record()} with "
                f"{encoder.describe()} -> {FLAGS.out}"
                + (f" (resuming after {begin})" if begin and not FLAGS.overwrite else ""))
    manifest = embedding.embed_to_folder(
        encoder, source, FLAGS.out, batch_size=FLAGS.batch_size, dtype=FLAGS.dtype,
        normalize=FLAGS.normalize, shard_size=FLAGS.shard_size,
        on_bad_image=FLAGS.on_bad_image, strategy=strategy.build_strategy(FLAGS.strategy),
        overwrite=FLAGS.overwrite, progress=_Progress(len(source), begin))
    bad = [b for s in manifest["shards"] for b in s["bad"]]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        print(f"skipped {len(bad)} file(s) that are not readable images: {shown}",
              file=sys.stderr)
    run_dir.log(f"wrote {manifest['num_embedded']} embeddings ({manifest['dim']} "
                f"{FLAGS.dtype}) in {len(manifest['shards'])} shard(s) to {FLAGS.out}")
    return 0


def main():
    """Entry point of the module, of tools/embed.py and of the console script."""
    _cli.run(run_dir.main_wrapper(embed_main), __name__)


if __name__ == "__main__":
    main()
