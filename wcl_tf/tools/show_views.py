"""Save a PNG of training images and their two augmented views.

    python -m wcl_tf.tools.show_views --dataset=cifar10 --data_dir=DIR --out=views.png
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags, logging  # noqa: E402

from wcl_tf.tools import _cli  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags():
    """The tool's flags, defined when it runs, not when it is imported: wcl_tf.train and
    the benchmark define flags of the same names (--dataset, --out), and a process (a
    test, a notebook) may import more than one tool."""
    flags.DEFINE_string("dataset", "embedded_mnist", "Dataset (TFDS name or embedded_mnist).")
    flags.DEFINE_string("data_dir", None, "TFDS folder.")
    flags.DEFINE_integer("image_size", 32, "View side in pixels.")
    flags.DEFINE_integer("num_images", 8, "Images shown.")
    flags.DEFINE_bool("blur", False, "Include Gaussian blur.")
    flags.DEFINE_string("out", "views.png", "PNG path.")


def _main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from wcl_tf.config import Config
    from wcl_tf.data import DataError, save_view_grid

    cfg = Config(dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, image_size=FLAGS.image_size,
                 blur=FLAGS.blur)
    try:
        print(save_view_grid(cfg, FLAGS.out, FLAGS.num_images))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def main():
    """Entry point of the module, of tools/show_views.py and of the console script."""
    _define_flags()
    _cli.run(_main, __name__)


if __name__ == "__main__":
    main()
