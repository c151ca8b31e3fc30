"""Two-view augmentations of WCL (WCL_SPEC section 4), on batches, inside tf.data.

Input: a batch of uint8 images already resized to (S, S, 3). Output: float32 in
[0, 1], shape (b, S, S, 3), static. Every random draw is per image and comes from
stateless ops keyed by a seed tensor, so a pipeline that derives the seed from
(cfg.seed, batch index) is reproducible whatever the tf.data parallelism.

Operations follow torchvision (the authors' code), in the order of the SimCLR and
MoCo v2 recipes: random resized crop -> colour jitter (p) -> grayscale (p) ->
Gaussian blur (p, ImageNet-sized data only) -> horizontal flip.

keras-cv versus tf.image, measured on this project's 2-core CPU box (batch 64 of
32x32 images inside `tf.data.Dataset.map`, images/s; /tmp script, one core busy):

    op                          keras-cv 0.9.0      tf.image (this file)
    random resized crop         MEASURE_CROP
    colour jitter (p=0.8)       MEASURE_JITTER
    grayscale (p=0.2)           MEASURE_GRAY
    Gaussian blur (p=0.5)       MEASURE_BLUR
    horizontal flip             MEASURE_FLIP
    whole strong view           MEASURE_VIEW
"""

import dataclasses
import math

import tensorflow as tf

# ITU-R 601 luma, as torchvision's rgb_to_grayscale and tf.image.rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# Random resized crop: candidate boxes drawn per image before falling back to the
# whole image (torchvision draws up to 10 and then takes a centre crop).
_CROP_TRIES = 10


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """One augmentation recipe; jitter strengths use torchvision's meaning.

    brightness b: multiply by U(1 - b, 1 + b); contrast c: blend with the image's
    mean gray level by U(1 - c, 1 + c); saturation s: blend with the pixel's gray
    level by U(1 - s, 1 + s); hue h: rotate the HSV hue by U(-h, h) turns.
    """

    name: str
    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (3.0 / 4.0, 4.0 / 3.0)
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple = (0.1, 2.0)
    flip_prob: float = 0.5


# SimCLR (after the warm-up).
STRONG = AugmentSpec(name="strong", crop_scale=(0.08, 1.0), brightness=0.8, contrast=0.8,
                     saturation=0.8, hue=0.2)
# MoCo v2 (the first cfg.weak_aug_epochs epochs).
WEAK = AugmentSpec(name="weak", crop_scale=(0.2, 1.0), brightness=0.4, contrast=0.4,
                   saturation=0.4, hue=0.1)


def _split(seed, num):
    return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def _uniform(shape, seed, low, high):
    return tf.random.stateless_uniform(shape, seed, minval=low, maxval=high,
                                       dtype=tf.float32)


def _per_image(mask):
    """(b,) -> (b, 1, 1, 1) for broadcasting against images."""
    return tf.reshape(mask, [-1, 1, 1, 1])


def random_resized_crop(images, size, scale, ratio, seed):
    """torchvision RandomResizedCrop, vectorized: (b, H, W, 3) float -> (b, size, size, 3).

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); the first of
    _CROP_TRIES candidates that fits is used, else the whole image.
    """
    b = tf.shape(images)[0]
    area_seed, ratio_seed, y_seed, x_seed = _split(seed, 4)
    area = _uniform([b, _CROP_TRIES], area_seed, scale[0], scale[1])
    log_ratio = _uniform([b, _CROP_TRIES], ratio_seed, math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    height = tf.sqrt(area / aspect)  # fractions of the image side
    width = tf.sqrt(area * aspect)
    fits = tf.logical_and(height <= 1.0, width <= 1.0)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    any_fits = tf.reduce_any(fits, axis=1)
    height = tf.where(any_fits, tf.gather(height, first, batch_dims=1), 1.0)
    width = tf.where(any_fits, tf.gather(width, first, batch_dims=1), 1.0)
    top = _uniform([b], y_seed, 0.0, 1.0) * (1.0 - height)
    left = _uniform([b], x_seed, 0.0, 1.0) * (1.0 - width)
    boxes = tf.stack([top, left, top + height, left + width], axis=1)
    return tf.image.crop_and_resize(images, boxes, tf.range(b), [size, size],
                                    method="bilinear")


def _gray(images):
    return tf.reduce_sum(images * tf.constant(_LUMA, images.dtype), axis=-1, keepdims=True)


def _blend(images, target, factor):
    return tf.clip_by_value(factor * images + (1.0 - factor) * target, 0.0, 1.0)


def _shift_hue(images, shift):
    hsv = tf.image.rgb_to_hsv(images)
    hue = tf.math.floormod(hsv[..., 0] + shift[:, None, None], 1.0)
    return tf.clip_by_value(tf.image.hsv_to_rgb(tf.stack([hue, hsv[..., 1], hsv[..., 2]], -1)),
                            0.0, 1.0)


def color_jitter(images, brightness, contrast, saturation, hue, seed):
    """torchvision ColorJitter on (b, H, W, 3) floats in [0, 1], per image.

    Each image applies the four operations in its own random order (torchvision
    draws a permutation per call). Vectorized: at each of the 4 steps every image
    gets every operation, with the identity factor unless that operation is the
    image's operation for the step.
    """
    b = tf.shape(images)[0]
    b_seed, c_seed, s_seed, h_seed, order_seed = _split(seed, 5)
    factors = [
        _uniform([b], b_seed, tf.maximum(1.0 - brightness, 0.0), 1.0 + brightness),
        _uniform([b], c_seed, tf.maximum(1.0 - contrast, 0.0), 1.0 + contrast),
        _uniform([b], s_seed, tf.maximum(1.0 - saturation, 0.0), 1.0 + saturation),
        _uniform([b], h_seed, -hue, hue),
    ]
    identity = [1.0, 1.0, 1.0, 0.0]
    # (b, 4): order[i, step] = operation image i applies at that step.
    order = tf.argsort(_uniform([b, 4], order_seed, 0.0, 1.0), axis=1)
    for step in range(4):
        chosen = [tf.equal(order[:, step], op) for op in range(4)]
        f = [tf.where(chosen[op], factors[op], identity[op]) for op in range(4)]
        # Brightness, contrast and saturation are blends; one of them is active.
        gray = _gray(images)
        mean = tf.reduce_mean(gray, axis=[1, 2, 3], keepdims=True)
        target = tf.where(_per_image(chosen[1]), mean,
                          tf.where(_per_image(chosen[2]), gray, 0.0))
        blend_factor = f[0] * f[1] * f[2]  # the two inactive factors are 1
        images = _blend(images, target, _per_image(blend_factor))
        images = tf.where(_per_image(chosen[3]), _shift_hue(images, f[3]), images)
    return images


def to_grayscale(images):
    return tf.tile(_gray(images), [1, 1, 1, 3])


def blur_kernel_size(image_size):
    """Odd kernel of about 10% of the image side (SimCLR: 23 px at 224)."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def gaussian_blur(images, sigma):
    """Separable Gaussian blur with a per-image sigma (b,), reflect padding."""
    b = tf.shape(images)[0]
    size = int(images.shape[1])
    k = blur_kernel_size(size)
    radius = k // 2
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-tf.square(x)[None, :] / (2.0 * tf.square(sigma)[:, None]))
    kernel = kernel / tf.reduce_sum(kernel, axis=1, keepdims=True)  # (b, k)
    # Batch folded into channels: one depthwise convolution for all images.
    kernel = tf.repeat(tf.transpose(kernel), 3, axis=1)  # (k, 3b), channel = 3i + c
    channels = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, size, size, -1])
    padded = tf.pad(channels, [[0, 0], [radius, radius], [radius, radius], [0, 0]],
                    mode="REFLECT")
    out = tf.nn.depthwise_conv2d(padded, tf.reshape(kernel, [1, k, -1, 1]),
                                 [1, 1, 1, 1], "VALID")
    out = tf.nn.depthwise_conv2d(out, tf.reshape(kernel, [k, 1, -1, 1]),
                                 [1, 1, 1, 1], "VALID")
    return tf.transpose(tf.reshape(out, [size, size, b, 3]), [2, 0, 1, 3])


def horizontal_flip(images, prob, seed):
    flip = _uniform([tf.shape(images)[0]], seed, 0.0, 1.0) < prob
    return tf.where(_per_image(flip), tf.reverse(images, axis=[2]), images)
