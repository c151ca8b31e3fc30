"""Input pipeline: sources (embedded MNIST, TFDS), two-view augmentation, tf.data."""

from wcl_tf.data.recipe import STRONG, WEAK, AugmentSpec
from wcl_tf.data.errors import DataError
from wcl_tf.data.eval_input import load_arrays
from wcl_tf.data.pipeline import (distribute_pretrain_dataset, make_pretrain_dataset,
                                  pretrain_steps_per_epoch, save_view_grid,
                                  use_strong_augmentation)
from wcl_tf.data.sources import load_split
from wcl_tf.data.view_assembly import ViewAugmenter, two_views

__all__ = [
    "AugmentSpec", "DataError", "STRONG", "ViewAugmenter", "WEAK",
    "distribute_pretrain_dataset", "load_arrays", "load_split", "make_pretrain_dataset",
    "pretrain_steps_per_epoch", "save_view_grid", "two_views", "use_strong_augmentation",
]
