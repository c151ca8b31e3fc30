"""The pre-training input pipeline: source -> shuffle -> batch -> views.

Sources whose images are all S x S already (CIFAR-10 at 32 px, MNIST at 28 px):

    load_split -> shard (per input pipeline) -> resize to S (uint8, a no-op) -> cache
    -> shuffle (cfg.seed) -> repeat -> batch (drop_remainder) -> enumerate
    -> two_views per batch (WEAK for the first cfg.weak_aug_epochs epochs, then STRONG)
    -> prefetch

Images of any other size (ImageNet, image folders, 32-px data trained at 224 px) are
cropped one by one from the full-resolution image before batching, as torchvision's
RandomResizedCrop does (a crop of the original, resized to S; never a stretched S x S copy):

    load_split -> shard -> cache (small, fixed-size data only) -> shuffle -> repeat
    -> enumerate -> 2 view crops (+ M local crops) per image, seeded per image
    -> batch -> cropped_views per batch (jitter, grayscale, blur, flip) -> prefetch

Augmentation happens here, in tf.data, never inside the replicated train step
(WCL_SPEC section 2). One input pipeline feeds R = num_replicas_in_sync /
num_input_pipelines replicas, giving consecutive batches to consecutive replicas
(MirroredStrategy on one host: batches 0 and 1 are step 0 of replicas 0 and 1), so
batch k is global step k // R and belongs to epoch (k // R) // steps_per_epoch. Its
stateless augmentation seed is derived from (cfg.seed, k, input pipeline id).
"""

import numpy as np
import tensorflow as tf

from wcl_tf.data import augment
from wcl_tf.data.sources import DataError, load_split, resize_images

# Decoded, resized training images are cached in memory when they take at most this.
_CACHE_LIMIT_BYTES = 2 << 30
_SHUFFLE_BUFFER = 16384


def pretrain_steps_per_epoch(cfg, num_examples):
    """cfg.steps_per_epoch if > 0, else floor(num_examples / cfg.global_batch_size)."""
    if cfg.steps_per_epoch > 0:
        return cfg.steps_per_epoch
    steps = num_examples // cfg.global_batch_size
    if steps == 0:
        raise DataError(
            f"the training split of {cfg.dataset!r} has {num_examples} examples, fewer than "
            f"one global batch of {cfg.global_batch_size}: lower global_batch_size, raise "
            f"max_train_examples (0: all), or set steps_per_epoch.")
    return steps


def use_strong_augmentation(step, steps_per_epoch, weak_aug_epochs):
    """Scalar bool tensor: global step `step` (0-based) is past the weak warm-up, i.e.
    its epoch step // steps_per_epoch is >= weak_aug_epochs."""
    epoch = tf.cast(step, tf.int64) // tf.cast(steps_per_epoch, tf.int64)
    return epoch >= tf.cast(weak_aug_epochs, tf.int64)


def _resize_uint8(image, image_size):
    resized = resize_images(image, image_size)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def make_pretrain_dataset(cfg, batch_size, input_context=None, steps_per_epoch=None,
                          strong_spec=augment.STRONG, weak_spec=augment.WEAK, initial_step=0):
    """Endless dataset of {"view_1", "view_2"}: float32 (batch_size, S, S, 3) in [0, 1],
    plus "local": (batch_size, M, L, L, 3) when cfg.num_local_crops = M > 0.

    batch_size: this pipeline's batch (per replica under a strategy). input_context: a
    tf.distribute.InputContext; the data is sharded when there is more than one input
    pipeline. steps_per_epoch: None computes it from the full split and
    cfg.global_batch_size (pretrain_steps_per_epoch). strong_spec / weak_spec: the two
    recipes (tests pass distinguishable ones). initial_step: the global step of the
    first batch (a resumed run passes its optimizer step so the warm-up is not redone).
    """
    image_size = cfg.image_size
    ds, num_examples, _ = load_split(cfg.dataset, cfg.train_split, cfg.data_dir,
                                     cfg.download, cfg.max_train_examples, cfg.seed,
                                     on_bad_image=cfg.on_bad_image)
    if steps_per_epoch is None:
        steps_per_epoch = pretrain_steps_per_epoch(cfg, num_examples)
    num_pipelines, pipeline_id, replicas_per_pipeline = 1, 0, 1
    if input_context is not None:
        num_pipelines = input_context.num_input_pipelines
        pipeline_id = input_context.input_pipeline_id
        replicas_per_pipeline = max(1, input_context.num_replicas_in_sync // num_pipelines)
        if num_pipelines > 1:
            ds = ds.shard(num_pipelines, pipeline_id)
    local_examples = num_examples // num_pipelines
    if local_examples < batch_size:
        raise DataError(
            f"input pipeline {pipeline_id} gets about {local_examples} of the "
            f"{num_examples} training examples, fewer than its batch of {batch_size}: use "
            f"more data (max_train_examples) or a smaller global_batch_size.")

    seed_base = tf.constant(cfg.seed, tf.int64)
    source_shape = tuple(ds.element_spec[0].shape)
    crop_first = source_shape != (image_size, image_size, 3)
    if crop_first:
        # Images of other sizes: crops come from each image at its own resolution and
        # aspect ratio (torchvision's order), not from a copy squashed to S x S.
        ds = ds.map(lambda image, label: image, num_parallel_calls=tf.data.AUTOTUNE)
        if None not in source_shape and (local_examples * int(np.prod(source_shape))
                                         <= _CACHE_LIMIT_BYTES):
            ds = ds.cache()
    else:
        ds = ds.map(lambda image, label: _resize_uint8(image, image_size),
                    num_parallel_calls=tf.data.AUTOTUNE)
        if local_examples * image_size * image_size * 3 <= _CACHE_LIMIT_BYTES:
            ds = ds.cache()
    ds = ds.shuffle(min(local_examples, _SHUFFLE_BUFFER), seed=cfg.seed,
                    reshuffle_each_iteration=True)
    ds = ds.repeat()

    def is_strong(batch_index):
        step = initial_step + batch_index // replicas_per_pipeline
        return use_strong_augmentation(step, steps_per_epoch, cfg.weak_aug_epochs)

    if crop_first:
        ds = ds.enumerate()
        multi_crop = cfg.num_local_crops > 0

        def crop_image(index, image):
            # Seeds per (pipeline, image), a stream apart from the per-batch seeds below.
            number = initial_step * replicas_per_pipeline * batch_size + index
            seed = tf.random.experimental.stateless_fold_in(
                tf.stack([seed_base, -1 - tf.cast(pipeline_id, tf.int64)]),
                number * num_pipelines + pipeline_id)
            view_seed, local_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
            spec = augment.select_spec(is_strong(index // batch_size), strong_spec, weak_spec)
            # Multi-crop: fixed global / local scales, as in multi_crop_views.
            scale = cfg.global_crop_scale if multi_crop else spec.crop_scale
            crops = {"views": augment.crops_of_image(image, 2, image_size, scale,
                                                     spec.crop_ratio, view_seed)}
            if multi_crop:
                crops["local"] = augment.crops_of_image(
                    image, cfg.num_local_crops, cfg.local_crop_size, cfg.local_crop_scale,
                    spec.crop_ratio, local_seed)
            return crops

        ds = ds.map(crop_image, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.enumerate()

    def make_views(batch_index, images):
        strong = is_strong(batch_index)
        # Unique per (pipeline, batch): replicas must not share crops.
        # A resumed run continues the sequence instead of replaying epoch 1's crops.
        batch_number = initial_step * replicas_per_pipeline + batch_index
        seed = tf.stack([seed_base, batch_number * num_pipelines + pipeline_id])
        if crop_first:
            crops = {"view_1": images["views"][:, 0], "view_2": images["views"][:, 1]}
            if "local" in images:
                crops["local"] = images["local"]
            return augment.cropped_views(crops, strong, image_size, cfg.local_crop_size,
                                         blur=cfg.blur, seed=seed, strong_spec=strong_spec,
                                         weak_spec=weak_spec)
        if cfg.num_local_crops > 0:
            return augment.multi_crop_views(
                images, strong, image_size, cfg.num_local_crops, cfg.local_crop_size,
                global_scale=cfg.global_crop_scale, local_scale=cfg.local_crop_scale,
                blur=cfg.blur, seed=seed, strong_spec=strong_spec, weak_spec=weak_spec)
        view_1, view_2 = augment.two_views(images, strong, image_size, blur=cfg.blur,
                                           seed=seed, strong_spec=strong_spec,
                                           weak_spec=weak_spec)
        return {"view_1": view_1, "view_2": view_2}

    ds = ds.map(make_views, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def distribute_pretrain_dataset(strategy, cfg, initial_step=0):
    """(distributed dataset of per-replica {"view_1", "view_2"}, steps_per_epoch).

    initial_step: global step of the first batch (resumed runs), see make_pretrain_dataset.
    """
    replicas = strategy.num_replicas_in_sync
    if cfg.global_batch_size % replicas:
        raise DataError(
            f"global_batch_size {cfg.global_batch_size} is not divisible by the {replicas} "
            f"replicas: use a multiple of {replicas}.")
    _, num_examples, _ = load_split(cfg.dataset, cfg.train_split, cfg.data_dir, cfg.download,
                                    cfg.max_train_examples, cfg.seed,
                                    on_bad_image=cfg.on_bad_image)
    steps = pretrain_steps_per_epoch(cfg, num_examples)

    def dataset_fn(ctx):
        return make_pretrain_dataset(cfg, ctx.get_per_replica_batch_size(cfg.global_batch_size),
                                     ctx, steps, initial_step=initial_step)

    return strategy.distribute_datasets_from_function(dataset_fn), steps


def save_view_grid(cfg, path, num_images=8):
    """Writes a PNG: original images (top row) and their two strong views (rows 2, 3).

    Uses the first num_images training examples; returns path.
    """
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    ds, _, _ = load_split(cfg.dataset, cfg.train_split, cfg.data_dir, cfg.download,
                          num_images, cfg.seed, on_bad_image=cfg.on_bad_image)
    images = next(iter(ds.map(lambda image, label: _resize_uint8(image, cfg.image_size))
                       .batch(num_images)))
    seed = tf.constant([cfg.seed, 0], tf.int64)
    view_1, view_2 = augment.two_views(images, True, cfg.image_size, blur=cfg.blur, seed=seed)
    rows = [("original", images.numpy() / 255.0), ("view 1", view_1.numpy()),
            ("view 2", view_2.numpy())]
    count = images.shape[0]
    fig, axes = plt.subplots(3, count, figsize=(1.3 * count, 4.2), squeeze=False)
    for r, (title, batch) in enumerate(rows):
        for c in range(count):
            axes[r][c].imshow(batch[c], interpolation="nearest")
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(title)
    fig.suptitle(f"{cfg.dataset}: strong (SimCLR) views at {cfg.image_size} px")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
