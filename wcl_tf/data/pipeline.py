"""The pre-training input pipeline: source -> epoch order -> batch -> views.

Order (`example_order`), like torch's DistributedSampler with drop_last and
set_epoch(e): training epoch e (0-based, steps_per_epoch global steps) walks a
permutation of the whole training split drawn from (cfg.seed, e), a new one every epoch;
global step j of the epoch takes positions j*G .. j*G+G-1 (G = global batch), and if
steps_per_epoch * G exceeds the split the epoch continues with permutations drawn from
(cfg.seed, e, 1), (cfg.seed, e, 2), ... Every input pipeline computes the same
permutation (stateless `index_shuffle`, nothing to keep in memory) and takes only its
replicas' block of each global batch, before anything is decoded. A run resumed at step s
(`initial_step`, mid-epoch too) starts its index stream there: it gets exactly the
batches an uninterrupted run gets from step s on, without reading the skipped part.

Sources (`_training_source`):

    image folder:  paths (a seeded sample across classes for max_train_examples)
                   -> permuted indices -> read + decode only this pipeline's share
                   (JPEGs: only each crop's window, see below)
    fixed-size data that fits _CACHE_LIMIT_BYTES (embedded MNIST, CIFAR, TFDS subsets):
                   decoded once into memory (resized to S when S x S is the batched path's
                   input) -> permuted indices -> gather
    larger TFDS data: only this input pipeline's share read (sources.tfds_stream: its own
                   files, as tfds.ReadConfig(input_context=...) shards them; its part of
                   tfds.even_splits when the split has fewer files than pipelines); epoch e reads the files in a permutation drawn from
                   (cfg.seed, e) and shuffles them in a _SHUFFLE_BUFFER buffer seeded from
                   (cfg.seed, e): its own file order and shuffle; a mid-epoch resume
                   reads and drops the epoch's earlier images. Exact resume needs the same
                   number of input pipelines (each one's epoch is its own share's examples).
                   Images stored as JPEG are read undecoded (tfds.decode.SkipDecoding)

Then, for images that are S x S already (CIFAR-10 at 32 px, MNIST at 28 px):

    -> batch (drop_remainder) -> two_views per batch (WEAK for the first
    cfg.weak_aug_epochs epochs, then STRONG) -> prefetch

Images of any other size (ImageNet, image folders, 32-px data trained at 224 px) are
cropped one by one from the full-resolution image before batching, as torchvision's
RandomResizedCrop does (a crop of the original, resized to S; never a stretched S x S copy):

    -> 2 view crops (+ M local crops) per image, seeded per image, each mirrored with
       p = 0.5 (the recipe's flip, cropping.crop_flips); encoded JPEGs (image
       folders, TFDS JPEG features) decode only each crop's window plus the resampling
       filter's margin (cropping.crops_of_jpeg: the same windows and weights as a full
       decode), other formats are decoded whole
    -> batch -> cropped_views per batch (jitter, grayscale, blur) -> prefetch

With cfg.augment_on = "device" (view_assembly.augment_on_device) each path stops after the
crops: batches hold the views' uint8 crops, and the model's ViewAugmentation
(wcl_tf/data/augment_layers.py) does the rest inside the train step, seeded per replica
and step, so no two replicas draw alike (the trap docs/method.md section 3.3 warns of: a random
generator drawn inside a replicated step gives every replica the same numbers). Otherwise
all augmentation happens here, in tf.data. One input pipeline feeds R = num_replicas_in_sync /
num_input_pipelines replicas, giving consecutive batches to consecutive replicas
(MirroredStrategy on one host: batches 0 and 1 are step 0 of replicas 0 and 1), so
batch k of a pipeline made with initial_step s is global step s + k // R and belongs to
epoch (s + k // R) // steps_per_epoch. That holds inside model.fit too: fit's first step
trains on batch 0, because WCLModel._maybe_symbolic_build gives Keras a batch of zeros to
learn the shapes instead of letting it draw data. Batch k's stateless augmentation seed
is derived from (cfg.seed, s * R + k, input pipeline id), its images' crop seeds from
their number in the pipeline, so a resumed run continues both sequences.
"""

import numpy as np
import tensorflow as tf

from wcl_tf import seeding
from wcl_tf.data import cropping, folder, recipe, view_assembly
from wcl_tf.data.sources import (DataError, load_split, pipeline_examples,
                                  resize_uint8, tfds_stream)

# Training images of one fixed size are decoded once into memory when they take at most
# this (the whole split, on every host: each input pipeline draws from all of it).
_CACHE_LIMIT_BYTES = 2 << 30
# Shuffle buffer of TFDS data streamed from disk (too large for memory).
_SHUFFLE_BUFFER = 16384
# Tag of the random stream that orders the examples (apart from augmentation seeds).
_ORDER_STREAM = 0x0DE7
# Folded into a pass's order seed: the stream's file order (apart from its buffer seed).
_FILES_STREAM = 0xF11E


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


def _training_source(cfg, input_context=None):
    """The training split as one of three kinds, in a fixed order of its own:

    ("files", paths (string tensor), N): an image folder; max_train_examples keeps a
      seeded sample across all classes (folder.select_files with cfg.seed). Read and
      decoded only when drawn (JPEGs decoded crop by crop, cropping.crops_of_encoded).
    ("arrays", uint8 tensor (N, ...), N): data whose images all have one size and fit in
      _CACHE_LIMIT_BYTES, decoded once into memory: resized to S x S when that is the
      batched path's input, at source size otherwise.
    ("stream", images, N): TFDS data too large for memory; images(order_seed) is a
      dataset of the images with the files read in the order drawn from order_seed (a
      stateless seed; None: stored order), see sources.tfds_stream. With input_context
      (several input pipelines), only this pipeline's share of the split is read: its own
      files, or its part of tfds.even_splits when the split has fewer files than
      pipelines. Images stored as JPEG come as encoded bytes (tf.string scalars), decoded
      crop by crop.
    """
    image_size = cfg.image_size
    if folder.is_folder_dataset(cfg.dataset):
        files, _ = folder.select_files(cfg.dataset, cfg.train_split, cfg.max_train_examples,
                                       cfg.on_bad_image, seed=cfg.seed)
        return "files", tf.constant(files), len(files)
    ds, num_examples, _ = load_split(cfg.dataset, cfg.train_split, cfg.data_dir,
                                     cfg.download, cfg.max_train_examples, cfg.seed,
                                     on_bad_image=cfg.on_bad_image)
    source_shape = tuple(ds.element_spec[0].shape)
    stored = source_shape if source_shape != (image_size, image_size, 3) else None
    if stored is None:
        stored = (image_size, image_size, 3)
        ds = ds.map(lambda image, label: (resize_uint8(image, image_size), label),
                    num_parallel_calls=tf.data.AUTOTUNE)
    if None not in stored and num_examples * int(np.prod(stored)) <= _CACHE_LIMIT_BYTES:
        images = np.empty((num_examples, *stored), np.uint8)
        count = 0
        for batch, _ in ds.batch(1024).prefetch(2).as_numpy_iterator():
            images[count:count + len(batch)] = batch
            count += len(batch)
        return "arrays", tf.constant(images[:count]), count
    # Encoded JPEG bytes only where the images are cropped one by one (not S x S already).
    read, num_examples, _ = tfds_stream(cfg.dataset, cfg.train_split, cfg.data_dir,
                                        cfg.download, cfg.max_train_examples, input_context,
                                        encoded_jpeg=source_shape != (image_size, image_size, 3))

    def images(order_seed=None):
        return read(order_seed).map(lambda image, label: image,
                                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    return "stream", images, num_examples


def _epoch_seed(seed, epoch, k):
    """Stateless seed (int64 [2]) of pass k of epoch `epoch` over the data."""
    base = tf.stack([tf.cast(seed, tf.int64), tf.constant(_ORDER_STREAM, tf.int64)])
    fold = tf.random.experimental.stateless_fold_in
    return fold(fold(base, tf.cast(epoch, tf.int64)), tf.cast(k, tf.int64))


def example_order(cfg, num_examples, batch_size, steps_per_epoch, num_pipelines=1,
                  pipeline_id=0, replicas_per_pipeline=1, initial_step=0):
    """Endless dataset of (number, index): this input pipeline's images from global step
    `initial_step` on. number counts this pipeline's images from step 0 (it seeds their
    crops); index is the example's position in the source's fixed order.

    Like torch's DistributedSampler with drop_last: training epoch e (0-based) walks a
    permutation of all num_examples examples drawn from (cfg.seed, e); its step j takes
    positions j*G .. j*G+G-1 (G = global batch); pipeline p takes the block of
    replicas_per_pipeline * batch_size of them that belongs to its replicas, replica after
    replica. When steps_per_epoch * G exceeds num_examples the epoch continues with
    further permutations drawn from (cfg.seed, e, 1), (cfg.seed, e, 2), ...
    Every pipeline computes the same permutations; nothing is skipped by reading.
    """
    per_step = replicas_per_pipeline * batch_size  # this pipeline's images per step
    global_batch = per_step * num_pipelines
    n = tf.constant(num_examples, tf.int64)

    def locate(number):
        step = number // per_step
        epoch = step // steps_per_epoch
        position = ((step % steps_per_epoch) * global_batch + pipeline_id * per_step
                    + number % per_step)
        index = tf.random.experimental.index_shuffle(
            position % n, _epoch_seed(cfg.seed, epoch, position // n), n - 1)
        return number, index

    first = int(initial_step) * per_step
    return tf.data.Dataset.range(first, np.iinfo(np.int64).max).map(
        locate, num_parallel_calls=tf.data.AUTOTUNE)


def _stream_order(cfg, images, local_examples, batch_size, steps_per_epoch,
                  replicas_per_pipeline, initial_step):
    """(number, image) for TFDS data read as a stream: this pipeline's share (already
    sharded by the reader, local_examples images: its own files, or its part of
    tfds.even_splits). Pass k over the share in epoch e reads its files in a permutation
    drawn from (cfg.seed, e, k) and shuffles their images in a buffer seeded from
    (cfg.seed, e, k) too: every epoch its own file order and shuffle. As many passes as
    the epoch needs, cut to the epoch's images; a resumed run (same number of input
    pipelines) starts at its epoch and skips the images of that epoch's earlier steps
    (read and dropped), so it reads what the uninterrupted run read."""
    per_step = replicas_per_pipeline * batch_size
    per_epoch = steps_per_epoch * per_step
    local = max(1, local_examples)
    passes = -(-per_epoch // local)
    buffer = min(local, _SHUFFLE_BUFFER)

    def epoch_images(epoch):
        def one_pass(k):
            pass_seed = _epoch_seed(cfg.seed, epoch, k)
            files_seed = tf.random.experimental.stateless_fold_in(pass_seed, _FILES_STREAM)
            seed = tf.random.stateless_uniform([], pass_seed, minval=0, maxval=2**31 - 1,
                                               dtype=tf.int64)
            return images(files_seed).shuffle(buffer, seed=seed,
                                              reshuffle_each_iteration=False)

        return tf.data.Dataset.range(passes).flat_map(one_pass).take(per_epoch)

    first_epoch, step_in_epoch = divmod(int(initial_step), steps_per_epoch)
    # Traced without a global seed: the per-epoch tensor seed alone sets the order (and a
    # global seed of 0 would make TensorFlow test the tensor seed's truth value).
    with seeding.no_global_tf_seed():
        ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(
            epoch_images)
    ds = ds.skip(step_in_epoch * per_step)
    return ds.enumerate(start=int(initial_step) * per_step)


def make_pretrain_dataset(cfg, batch_size, input_context=None, steps_per_epoch=None,
                          strong_spec=recipe.STRONG, weak_spec=recipe.WEAK, initial_step=0):
    """Endless dataset of {"view_1", "view_2"}: float32 (batch_size, S, S, 3) in [0, 1],
    plus "local": (batch_size, M, L, L, 3) when cfg.num_local_crops = M > 0. With
    cfg.augment_on resolving to the device (view_assembly.augment_on_device): the same keys
    holding only the views' crops, uint8, for the model's ViewAugmentation.

    batch_size: this pipeline's batch (per replica under a strategy). input_context: a
    tf.distribute.InputContext; each of several input pipelines takes its own share of
    every global batch. steps_per_epoch: None computes it from the full split and
    cfg.global_batch_size (pretrain_steps_per_epoch). strong_spec / weak_spec: the two
    recipes (tests pass distinguishable ones). initial_step: the global step of the
    first batch (a resumed run passes its optimizer step): from there on the batches are
    exactly those of an uninterrupted run with the same settings (see example_order).
    """
    image_size = cfg.image_size
    kind, source, num_examples = _training_source(cfg, input_context)
    if steps_per_epoch is None:
        steps_per_epoch = pretrain_steps_per_epoch(cfg, num_examples)
    num_pipelines, pipeline_id, replicas_per_pipeline = 1, 0, 1
    if input_context is not None:
        num_pipelines = input_context.num_input_pipelines
        pipeline_id = input_context.input_pipeline_id
        replicas_per_pipeline = max(1, input_context.num_replicas_in_sync // num_pipelines)
    local_examples = num_examples // num_pipelines
    if kind == "stream" and num_pipelines > 1:
        local_examples = pipeline_examples(cfg.dataset, cfg.train_split, cfg.data_dir,
                                           input_context, cfg.max_train_examples)
    if local_examples < batch_size:
        raise DataError(
            f"input pipeline {pipeline_id} gets about {local_examples} of the "
            f"{num_examples} training examples, fewer than its batch of {batch_size}: use "
            f"more data (max_train_examples) or a smaller global_batch_size.")

    seed_base = tf.constant(cfg.seed, tf.int64)
    per_step = replicas_per_pipeline * batch_size
    # Encoded bytes (image files, TFDS JPEGs): decoded by the crops, see crop_image.
    encoded = kind == "files" or (kind == "stream"
                                  and source().element_spec.dtype == tf.string)
    if encoded:
        crop_first = True
    else:
        element_shape = tuple(source.shape[1:] if kind == "arrays"
                              else source().element_spec.shape)
        crop_first = element_shape != (image_size, image_size, 3)
    order_args = (cfg, num_examples, batch_size, steps_per_epoch, num_pipelines,
                  pipeline_id, replicas_per_pipeline, initial_step)

    def is_strong(number):
        """Image `number` of this pipeline belongs to global step number // per_step."""
        return use_strong_augmentation(number // per_step, steps_per_epoch,
                                       cfg.weak_aug_epochs)

    multi_crop = cfg.num_local_crops > 0
    # augment_on="device": the batches are the uint8 crops, the model does the rest.
    on_device = view_assembly.augment_on_device(cfg.augment_on)

    def crop_image(number, image):
        # Seeds per (pipeline, image), a stream apart from the per-batch seeds below;
        # number counts this pipeline's images from step 0, so a resumed run continues.
        seed = tf.random.experimental.stateless_fold_in(
            tf.stack([seed_base, -1 - tf.cast(pipeline_id, tf.int64)]),
            number * num_pipelines + pipeline_id)
        view_seed, local_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        spec = recipe.select_spec(is_strong(number), strong_spec, weak_spec)
        # Multi-crop: fixed global / local scales, as in multi_crop_views.
        scale = cfg.global_crop_scale if multi_crop else spec.crop_scale
        # Encoded: JPEGs decode only each crop's window (the same crops, see
        # cropping.crops_of_jpeg), other formats are decoded whole.
        crops_of = cropping.crops_of_encoded if encoded else cropping.crops_of_image
        # Each crop mirrored with p = 0.5, drawn from its seed apart from its box
        # (cropping.crop_flips): the recipe's flip, made by the resampling for free.
        crops = {"views": crops_of(image, 2, image_size, scale, spec.crop_ratio, view_seed,
                                   cropping.crop_flips(view_seed, 2))}
        if multi_crop:
            crops["local"] = crops_of(image, cfg.num_local_crops, cfg.local_crop_size,
                                      cfg.local_crop_scale, spec.crop_ratio, local_seed,
                                      cropping.crop_flips(local_seed, cfg.num_local_crops))
        return crops

    if kind == "stream":
        ds = _stream_order(cfg, source, local_examples, batch_size, steps_per_epoch,
                           replicas_per_pipeline, initial_step)
        fetch = None
    else:
        ds = example_order(*order_args)
        if kind == "files":
            def fetch(index):
                return tf.io.read_file(tf.gather(source, index))
        else:
            def fetch(index):
                return tf.gather(source, index)
    if crop_first:
        if fetch is None:
            ds = ds.map(crop_image, num_parallel_calls=tf.data.AUTOTUNE)
        else:
            ds = ds.map(lambda number, index: crop_image(number, fetch(index)),
                        num_parallel_calls=tf.data.AUTOTUNE)
    elif fetch is None:
        ds = ds.map(lambda number, image: resize_uint8(image, image_size),
                    num_parallel_calls=tf.data.AUTOTUNE)
    else:  # In-memory, already S x S.
        ds = ds.map(lambda number, index: fetch(index), num_parallel_calls=tf.data.AUTOTUNE)
    if kind == "files":
        ds = ds.ignore_errors()  # A file that turned unreadable after the scan.
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.enumerate()

    def make_views(batch_index, images):
        # Unique per (pipeline, batch): replicas must not share crops.
        # A resumed run continues the sequence instead of replaying epoch 1's crops.
        batch_number = initial_step * replicas_per_pipeline + batch_index
        strong = is_strong(batch_number * batch_size)
        seed = tf.stack([seed_base, batch_number * num_pipelines + pipeline_id])
        if crop_first:
            crops = {"view_1": images["views"][:, 0], "view_2": images["views"][:, 1]}
            if "local" in images:
                crops["local"] = images["local"]
            if on_device:  # The rest runs in train_step (augment_layers.ViewAugmentation).
                return crops
            return view_assembly.cropped_views(crops, strong, image_size, cfg.local_crop_size,
                                               blur=cfg.blur, seed=seed, strong_spec=strong_spec,
                                               weak_spec=weak_spec)
        if on_device:
            return view_assembly.view_crops(
                images, strong, image_size, seed, num_local=cfg.num_local_crops,
                local_size=cfg.local_crop_size, global_scale=cfg.global_crop_scale,
                local_scale=cfg.local_crop_scale, strong_spec=strong_spec,
                weak_spec=weak_spec)
        if cfg.num_local_crops > 0:
            return view_assembly.multi_crop_views(
                images, strong, image_size, cfg.num_local_crops, cfg.local_crop_size,
                global_scale=cfg.global_crop_scale, local_scale=cfg.local_crop_scale,
                blur=cfg.blur, seed=seed, strong_spec=strong_spec, weak_spec=weak_spec)
        view_1, view_2 = view_assembly.two_views(images, strong, image_size, blur=cfg.blur,
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
    images = next(iter(ds.map(lambda image, label: resize_uint8(image, cfg.image_size))
                       .batch(num_images)))
    seed = tf.constant([cfg.seed, 0], tf.int64)
    view_1, view_2 = view_assembly.two_views(images, True, cfg.image_size, blur=cfg.blur,
                                             seed=seed)
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
