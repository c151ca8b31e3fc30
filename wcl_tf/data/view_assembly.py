"""View assembly: the two augmented views of a batch (two_views), or two global views and
multi-crop local crops (multi_crop_views), from the crop (wcl_tf.data.cropping) and the
photometric steps (wcl_tf.data.photometric) of a recipe (wcl_tf.data.recipe); and the
host/device split (augment_on_device): with the device form the host makes only the crops
(view_crops) and the train step the rest (cropped_views, the same functions).

Input: a batch of uint8 images already resized to (S, S, 3). Output: float32 in [0, 1],
shape (b, S, S, 3), static. All draws are per image.

A whole strong view, measured as the table in wcl_tf/data/photometric.py (batch 64 of 32x32
images inside `tf.data.Dataset.map`, images/s on the shared 2-core box, +-30%): all keras-cv
with masks 3,100, with RandomApply 2,000; these functions 3,460.
"""

import dataclasses
import functools

import tensorflow as tf

from wcl_tf.config import AUGMENT_ON
from wcl_tf.data.cropping import random_resized_crop
from wcl_tf.data.photometric import clip01, photometric
from wcl_tf.data.recipe import STRONG, WEAK, _chosen, _split, select_spec


def augment_on_device(augment_on):
    """Whether the photometric augmentation runs in train_step: "device" yes, "host" no,
    "auto" where TensorFlow sees a GPU or TPU (on a CPU-only machine both forms use the
    same cores, and tf.data overlaps the host form with the step)."""
    if augment_on not in AUGMENT_ON:
        raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got {augment_on!r}")
    if augment_on == "auto":
        return bool(tf.config.list_logical_devices("GPU")
                    or tf.config.list_logical_devices("TPU"))
    return augment_on == "device"


def view_crop(images_uint8, spec, seed, output_size):
    """The crop of a view, horizontal flip included: random_resized_crop of (b, S, S, 3)
    images with the crop part of a view's seed (as ViewAugmenter draws it), mirrored
    where the flip part's draw (p = 0.5 per image) says; float32 (b, output_size,
    output_size, 3) in [0, 1].

    The view's seed splits in 7 as photometric splits it: the first part draws the box,
    the seventh the flip (the draw photometric made when it flipped after the blur, so
    the flips are those of that order; the flip commutes with jitter, grayscale and blur,
    docs/method.md section 4.1). Mirroring in the crop's resampling costs nothing; a
    separate flip of the float views cost about 1.6 ms of CPU per image at 224 px (two
    views, one loaded thread; docs/performance.md)."""
    seeds = _split(seed, 7)
    crop_seed, flip_seed = seeds[0], seeds[6]
    images = tf.cast(images_uint8, tf.float32) / 255.0
    flip = _chosen(0.5, flip_seed, tf.shape(images)[0])
    return random_resized_crop(images, output_size, spec.crop_scale, spec.crop_ratio,
                               crop_seed, flip=flip)


class ViewAugmenter:
    """Makes one augmented view of a batch: `augmenter(images_uint8, spec, seed)`.

    images_uint8: (b, S, S, 3) uint8 (S = image_size); spec: an AugmentSpec (numbers
    may be tensors, see select_spec); seed: (2,) int tensor for the stateless draws.
    Returns float32 (b, S, S, 3) in [0, 1]. Every draw comes from `seed`: the same
    images, spec and seed give the same view. Build it outside tf.data functions and
    reuse it.
    """

    def __init__(self, image_size, blur=False, output_size=None):
        self.image_size = int(image_size)
        # Side of the produced views; smaller than image_size for multi-crop local crops.
        self.output_size = int(output_size or image_size)
        self.blur = bool(blur)

    def _check(self, images, size):
        if tuple(images.shape[1:]) != (size, size, 3):
            raise ValueError(f"ViewAugmenter(image_size={size}) expects (b, {size}, {size}, 3) "
                             f"images, got {images.shape}: resize before batching.")

    def __call__(self, images_uint8, spec, seed, crop=True, static_shapes=False):
        """crop=False: the images are crops already (crops_of_image, flipped there), of
        the output size; everything after the crop and flip is applied. static_shapes:
        see photometric.color_jitter."""
        self._check(images_uint8, self.image_size if crop else self.output_size)
        if crop:
            # Resampled floats may pass 1 by a rounding error; photometric keeps [0, 1]
            # but does not clip rows it leaves alone.
            images = clip01(view_crop(images_uint8, spec, seed, self.output_size))
        else:
            images = tf.cast(images_uint8, tf.float32) / 255.0
        images = photometric(images, spec, seed, self.blur, static_shapes=static_shapes)
        images.set_shape([images_uint8.shape[0], self.output_size, self.output_size, 3])
        return images

    def crop_only(self, images_uint8, spec, seed):
        """The view's crop (flip included) alone, rounded to uint8 (b, output_size,
        output_size, 3): what the host hands the device when photometric augmentation runs
        in train_step."""
        self._check(images_uint8, self.image_size)
        crops = view_crop(images_uint8, spec, seed, self.output_size)
        crops = tf.cast(tf.clip_by_value(tf.round(crops * 255.0), 0.0, 255.0), tf.uint8)
        crops.set_shape([images_uint8.shape[0], self.output_size, self.output_size, 3])
        return crops


@functools.lru_cache(maxsize=None)
def view_augmenter(image_size, blur=False):
    """The ViewAugmenter of the global views for these settings, built once."""
    return ViewAugmenter(image_size, blur)


def two_views(images_uint8, strong, image_size, blur=False, seed=None, strong_spec=STRONG,
              weak_spec=WEAK):
    """Two augmented views of a batch of uint8 (b, S, S, 3) images.

    strong: scalar bool tensor (or bool), strong_spec if true else weak_spec, for the
    whole batch. seed: (2,) int tensor for the stateless draws; None draws one (stateful,
    different at every call). Returns (view_1, view_2), float32 (b, S, S, 3) in [0, 1].
    """
    if seed is None:
        seed = tf.random.uniform([2], maxval=tf.int64.max, dtype=tf.int64)
    spec = select_spec(strong, strong_spec, weak_spec)
    augmenter = view_augmenter(int(image_size), bool(blur))
    seed_1, seed_2 = _split(seed, 2)
    return augmenter(images_uint8, spec, seed_1), augmenter(images_uint8, spec, seed_2)


@functools.lru_cache(maxsize=None)
def local_augmenter(image_size, local_size, blur=False):
    """The ViewAugmenter of multi-crop local crops (image_size -> local_size), built once."""
    return ViewAugmenter(image_size, blur, output_size=local_size)


def multi_crop_views(images_uint8, strong, image_size, num_local, local_size,
                     global_scale=(0.14, 1.0), local_scale=(0.05, 0.14), blur=False,
                     seed=None, strong_spec=STRONG, weak_spec=WEAK):
    """Two global views plus num_local small crops per image (docs/method.md section 6).

    Global views use crop scale `global_scale`, local crops `local_scale`; flip, colour
    and blur follow the selected recipe for all of them. Returns a dict:
    view_1, view_2: float32 (b, S, S, 3); local: float32 (b, M, L, L, 3).
    """
    if seed is None:
        seed = tf.random.uniform([2], maxval=tf.int64.max, dtype=tf.int64)
    spec = select_spec(strong, strong_spec, weak_spec)
    global_spec = dataclasses.replace(
        spec, crop_scale=tuple(tf.constant(x, tf.float32) for x in global_scale))
    local_spec = dataclasses.replace(
        spec, crop_scale=tuple(tf.constant(x, tf.float32) for x in local_scale))
    augmenter = view_augmenter(int(image_size), bool(blur))
    local = local_augmenter(int(image_size), int(local_size), bool(blur))
    seed_1, seed_2, seed_3 = _split(seed, 3)
    b = tf.shape(images_uint8)[0]
    crops = local(tf.repeat(images_uint8, num_local, axis=0), local_spec, seed_3)
    crops = tf.reshape(crops, [b, num_local, local_size, local_size, 3])
    if images_uint8.shape[0] is not None:
        crops.set_shape([images_uint8.shape[0], num_local, local_size, local_size, 3])
    return {"view_1": augmenter(images_uint8, global_spec, seed_1),
            "view_2": augmenter(images_uint8, global_spec, seed_2),
            "local": crops}


def cropped_views(crops, strong, image_size, local_size=None, blur=False, seed=None,
                  strong_spec=STRONG, weak_spec=WEAK, static_shapes=False):
    """The rest of the recipe (jitter, grayscale, blur) on views already cropped and
    flipped from the full-resolution images (crops_of_image with crop_flips, in the input
    pipeline).

    crops: {"view_1", "view_2": uint8 (b, S, S, 3)[, "local": uint8 (b, M, L, L, 3)]}.
    Returns the same keys as float32 in [0, 1], like two_views / multi_crop_views.
    static_shapes: see photometric.color_jitter (train_step under XLA or on a TPU).
    """
    if seed is None:
        seed = tf.random.uniform([2], maxval=tf.int64.max, dtype=tf.int64)
    spec = select_spec(strong, strong_spec, weak_spec)
    augmenter = view_augmenter(int(image_size), bool(blur))
    seed_1, seed_2, seed_3 = _split(seed, 3)
    views = {"view_1": augmenter(crops["view_1"], spec, seed_1, crop=False,
                                 static_shapes=static_shapes),
             "view_2": augmenter(crops["view_2"], spec, seed_2, crop=False,
                                 static_shapes=static_shapes)}
    if "local" in crops:
        local = crops["local"]
        b, m = tf.shape(local)[0], local.shape[1]
        flat = tf.reshape(local, [-1, local_size, local_size, 3])
        out = local_augmenter(int(image_size), int(local_size), bool(blur))(
            flat, spec, seed_3, crop=False, static_shapes=static_shapes)
        views["local"] = tf.reshape(out, [b, m, local_size, local_size, 3])
        if local.shape[0] is not None:
            views["local"].set_shape([local.shape[0], m, local_size, local_size, 3])
    return views


def view_crops(images_uint8, strong, image_size, seed, num_local=0, local_size=None,
               global_scale=None, local_scale=(0.05, 0.14), strong_spec=STRONG,
               weak_spec=WEAK):
    """Only the crops of two_views (num_local=0) or multi_crop_views (num_local > 0), with
    their seeds, rounded to uint8: {"view_1", "view_2": (b, S, S, 3)[, "local":
    (b, M, L, L, 3)]}. The host side of the device recipe for S x S images; the rest
    (cropped_views) runs in train_step. global_scale: multi-crop's global crop scale
    (None: the recipe's)."""
    spec = select_spec(strong, strong_spec, weak_spec)
    b = tf.shape(images_uint8)[0]
    if num_local:
        seed_1, seed_2, seed_3 = _split(seed, 3)
        global_spec = dataclasses.replace(
            spec, crop_scale=tuple(tf.constant(x, tf.float32) for x in global_scale))
        local_spec = dataclasses.replace(
            spec, crop_scale=tuple(tf.constant(x, tf.float32) for x in local_scale))
    else:
        seed_1, seed_2 = _split(seed, 2)
        global_spec = spec
    augmenter = view_augmenter(int(image_size))
    crops = {"view_1": augmenter.crop_only(images_uint8, global_spec, seed_1),
             "view_2": augmenter.crop_only(images_uint8, global_spec, seed_2)}
    if num_local:
        local = local_augmenter(int(image_size), int(local_size)).crop_only(
            tf.repeat(images_uint8, num_local, axis=0), local_spec, seed_3)
        crops["local"] = tf.reshape(local, [b, num_local, local_size, local_size, 3])
        if images_uint8.shape[0] is not None:
            crops["local"].set_shape([images_uint8.shape[0], num_local, local_size,
                                      local_size, 3])
    return crops
