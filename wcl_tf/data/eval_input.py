"""Input for the evaluations (kNN, linear probe): the test-time preprocessing and the
linear probe's training crops, read in batches from tf.data so that memory does not grow
with the number of images (docs/method.md section 5), and `load_arrays`, a small split
whole in memory through the same test-time preprocessing.

Test-time preprocessing (`eval_image`), one image at a time, the authors' `eval_aug`
(`transforms.Resize(256), transforms.CenterCrop(224)`) generalised to any image size S:

- a square image of side <= S (CIFAR at 32 px, MNIST 28 -> 32): resized bilinearly to
  S x S exactly as before (`sources.resize_images`; the identity for S x S images), so the
  published small-image numbers do not move. Applying the ratio rule there would not be
  the identity: 32 -> 37 -> centre 32 drops 5 of 37 rows, a different protocol from the
  one every CIFAR number (ours and solo-learn's) was measured with;
- any other image (larger than S, or not square): the shorter side is resized to
  round(S * 256 / 224) (256 at S = 224; the longer side to int(R * long / short), as
  torchvision does), antialiased bilinear (PIL's filter: tf.image.resize with
  antialias=True is ScaleAndTranslate with the triangle kernel), rounded to uint8 as PIL
  does, then the central S x S window is cut (torchvision's CenterCrop offsets,
  round((H - S) / 2)).

Linear-probe training crops (`train_batches`): RandomResizedCrop (scale (0.08, 1),
torchvision's ratios (3/4, 4/3)) cut from the ORIGINAL decoded image with
`cropping.crops_of_image`, and a horizontal flip, each drawn per image from stateless seeds
(seed, epoch * N + position), so a run is reproducible. Every epoch has its own order, drawn
from (seed, epoch): folders are permuted whole at the level of file names (nothing decoded
is held); TFDS data reads its files in a permutation of the epoch's own
(sources.tfds_stream) and shuffles the crops in a bounded buffer seeded per epoch; the
embedded MNIST digits (in memory) through that per-epoch buffer alone.
"""

import math

import numpy as np
import tensorflow as tf

from wcl_tf import seeding
from wcl_tf.data import cropping, folder, sources

EVAL_RESIZE_RATIO = 256.0 / 224.0
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Bound of the crop shuffle buffer of non-folder sources, in bytes of uint8 crops.
_SHUFFLE_BYTES = 256 << 20


def resize_size(image_size):
    """Side the shorter side is resized to before the centre crop: round(S * 256 / 224)."""
    return int(round(int(image_size) * EVAL_RESIZE_RATIO))


def resize_center_crop(images, image_size):
    """Resize the shorter side to resize_size(S) (antialiased bilinear, rounded to uint8
    values), then the central S x S window: uint8 or float (h, w, 3) or (b, h, w, 3) in
    [0, 255] -> float32 in [0, 255], same rank."""
    size = int(image_size)
    target = resize_size(size)
    shape = tf.shape(images)
    h, w = shape[-3], shape[-2]
    short = tf.minimum(h, w)
    # torchvision Resize(int): the shorter side becomes `target`, the longer int(target *
    # long / short) (truncated).
    new_h = tf.where(h <= w, target, (target * h) // short)
    new_w = tf.where(h <= w, (target * w) // short, target)
    resized = tf.image.resize(tf.cast(images, tf.float32), tf.stack([new_h, new_w]),
                              method="bilinear", antialias=True)
    resized = tf.clip_by_value(tf.round(resized), 0.0, 255.0)
    top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
    out = resized[..., top:top + size, left:left + size, :]
    static = [size, size, images.shape[-1]]
    out.set_shape(images.shape[:-3].concatenate(static))
    return out


def eval_image(image, image_size):
    """The test-time preprocessing of one image (h, w, 3) uint8 -> float32 (S, S, 3) in
    [0, 1] (see the module doc for the rule)."""
    size = int(image_size)
    shape = tf.shape(image)
    small_square = tf.logical_and(tf.equal(shape[0], shape[1]), shape[0] <= size)
    out = tf.cond(small_square,
                  lambda: tf.reshape(sources.resize_images(image[tf.newaxis], size)[0],
                                     [size, size, 3]),
                  lambda: resize_center_crop(image, size))
    out = tf.clip_by_value(out / 255.0, 0.0, 1.0)
    out.set_shape([size, size, 3])
    return out


def squash_image(image, image_size):
    """The old (and export's `squash`) preprocessing: bilinear straight to S x S."""
    return tf.clip_by_value(sources.resize_images(image, int(image_size)) / 255.0, 0.0, 1.0)


def eval_batches(dataset, split, image_size, batch_size, data_dir=None, download=False,
                 max_examples=0, on_bad_image="skip"):
    """(tf.data of (images float32 (b, S, S, 3) in [0, 1], labels int64 (b,)), num_examples,
    num_classes): one pass over the split, in the order load_split gives (no seed), each
    image through `eval_image`. Nothing but the batches in flight is in memory."""
    ds, num_examples, num_classes = sources.load_split(
        dataset, split, data_dir, download, max_examples, on_bad_image=on_bad_image)
    ds = ds.map(lambda image, label: (eval_image(image, image_size), label),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(int(batch_size)).prefetch(2), num_examples, num_classes


def load_arrays(dataset, split, image_size, data_dir=None, download=False, max_examples=0,
                on_bad_image="skip"):
    """The whole split as arrays, for small kNN / linear evaluations (the training-time kNN
    monitor, the fast probe's raw-pixel baseline, fine-tuning). Large splits: stream them
    with `eval_batches` / `train_batches` instead (this holds N * S * S * 3 float32).

    Returns images float32 (N, S, S, 3) in [0, 1], through the test-time preprocessing
    `eval_image` (square images of side <= S: bilinear resize to S, the identity at S;
    others: shorter side to round(S * 256 / 224), centre crop S), and labels int64 (N,).
    """
    ds, num_examples, _ = sources.load_split(dataset, split, data_dir, download, max_examples,
                                             on_bad_image=on_bad_image)
    ds = ds.map(lambda image, label: (eval_image(image, image_size), label),
                num_parallel_calls=tf.data.AUTOTUNE)
    images = np.zeros((num_examples, image_size, image_size, 3), np.float32)
    labels = np.zeros((num_examples,), np.int64)
    count = 0
    for image_batch, label_batch in ds.batch(1024).prefetch(2).as_numpy_iterator():
        n = len(label_batch)
        images[count:count + n] = np.clip(image_batch, 0.0, 1.0)
        labels[count:count + n] = label_batch
        count += n
    return images[:count], labels[:count]


def _crop_and_flip(image, seed, image_size, crop_scale):
    """One RandomResizedCrop of the original image + a flip: uint8 (S, S, 3)."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    crop = cropping.crops_of_image(image, 1, int(image_size), crop_scale, CROP_RATIO,
                                   seeds[0])[0]
    flip = tf.random.stateless_uniform([], seeds[1]) < 0.5
    crop = tf.cond(flip, lambda: tf.reverse(crop, axis=[1]), lambda: crop)
    crop.set_shape([int(image_size), int(image_size), 3])
    return crop


def train_batches(dataset, split, image_size, batch_size, epochs, seed=0, data_dir=None,
                  download=False, max_examples=0, on_bad_image="skip",
                  crop_scale=CROP_SCALE):
    """The linear probe's training input, streamed.

    Returns (tf.data of (images float32 (b, S, S, 3) in [0, 1], labels int64),
    num_examples, num_classes, steps_per_epoch): `epochs` passes, each in a fresh order,
    batched per epoch (the last partial batch of an epoch is kept), each image a random
    resized crop of the original + flip (module doc).
    """
    size, batch_size, epochs, seed = int(image_size), int(batch_size), int(epochs), int(seed)

    def finish(image, label, number):
        crop = _crop_and_flip(image, tf.stack([tf.constant(seed, tf.int64), number]), size,
                              crop_scale)
        return crop, label

    def to_float(images, labels):
        return tf.cast(images, tf.float32) / 255.0, labels

    if folder.is_folder_dataset(dataset):
        files, labels = folder.select_files(dataset, split, max_examples, on_bad_image)
        num_examples = len(files)
        num_classes = folder.scan_folder(dataset, split, on_bad_image).num_classes
        files = tf.constant(files)
        labels = tf.constant(labels, tf.int64)

        def epoch_ds(epoch):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(num_examples, dtype=tf.int64),
                seed=tf.stack([tf.constant(seed * 7919 + 0x11AE, tf.int64), epoch]))
            numbers = epoch * num_examples + tf.range(num_examples, dtype=tf.int64)
            ds = tf.data.Dataset.from_tensor_slices(
                (tf.gather(files, order), tf.gather(labels, order), numbers))
            ds = ds.map(lambda path, label, number: finish(
                folder.decode(tf.io.read_file(path)), label, number),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            return ds.ignore_errors().batch(batch_size)
    else:
        if dataset == sources.EMBEDDED_MNIST:
            examples, num_examples, num_classes = sources.load_split(
                dataset, split, max_examples=max_examples)

            def read(order_seed):
                del order_seed  # In memory, in its fixed order: the buffer shuffles it all.
                return examples
        else:
            read, num_examples, num_classes = sources.tfds_stream(
                dataset, split, data_dir, download, max_examples)
        buffer = max(1, min(num_examples, _SHUFFLE_BYTES // (size * size * 3)))

        def epoch_ds(epoch):
            # Epoch e: files in a permutation drawn from (seed, e), a buffer seeded from it.
            epoch_seed = tf.stack([tf.constant(seed * 7919 + 0x5EED, tf.int64), epoch])
            files_seed, shuffle_seed = tf.unstack(
                tf.random.experimental.stateless_split(epoch_seed, 2))
            ds = read(files_seed).enumerate().map(
                lambda i, pair: finish(pair[0], pair[1], epoch * num_examples + i),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            buffer_seed = tf.random.stateless_uniform(
                [], shuffle_seed, minval=0, maxval=2**31 - 1, dtype=tf.int64)
            return ds.shuffle(buffer, seed=buffer_seed,
                              reshuffle_each_iteration=False).batch(batch_size)

    # Traced without a global seed: the per-epoch tensor seeds alone set the order.
    with seeding.no_global_tf_seed():
        ds = tf.data.Dataset.range(epochs).flat_map(epoch_ds)
    ds = ds.map(to_float, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
    steps_per_epoch = math.ceil(num_examples / batch_size)
    return ds, num_examples, num_classes, steps_per_epoch


def same_protocol_in_memory(dataset, image_size, data_dir=None):
    """Whether every image of `dataset` is square with side <= S, known without decoding
    (embedded_mnist: 28; TFDS: a fixed image shape in its info). Then the in-memory path
    (the split resized to S once, crops of those arrays) is this module's protocol: the
    test-time preprocessing is the identity / plain resize there, and the training crops
    are cut from the whole (square) image. Folders and variable-size TFDS data: False."""
    size = int(image_size)
    if dataset == sources.EMBEDDED_MNIST:
        return 28 <= size
    if folder.is_folder_dataset(dataset):
        return False
    try:
        builder = sources.tfds_builder(dataset, data_dir)
        features = builder.info.features
        key = "image" if "image" in features else None
        shape = tuple(features[key].shape) if key else ()
    except Exception:  # noqa: BLE001  Unknown or unprepared: stream (always correct).
        return False
    return (len(shape) == 3 and shape[0] is not None and shape[0] == shape[1]
            and shape[0] <= size)
