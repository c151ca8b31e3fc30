"""Two-view augmentations of WCL (docs/method.md section 4.1), on batches, inside tf.data.

Input: a batch of uint8 images already resized to (S, S, 3). Output: float32 in
[0, 1], shape (b, S, S, 3), static. All draws are per image. Order, as in the SimCLR
and MoCo v2 recipes of the authors' code (torchvision): random resized crop ->
colour jitter (p) -> grayscale (p) -> Gaussian blur (p, only with blur=True; 32-px
data has none) -> horizontal flip.

keras-cv 0.9.0 / Keras 3.15 versus plain TF, measured on this project's shared
2-core CPU box: batch 64 of 32x32 images inside `tf.data.Dataset.map`, images/s
(best of 3-4 repeats; the box was shared, so +-30%; where two runs differed, both):

    op                       keras-cv / Keras layer        plain TF                     used
    random resized crop      RandomCropAndResize   6,500   crop_and_resize      66,000  TF
    colour jitter (p=0.8)    RandomColorJitter     6,300   color_jitter below    7,100  TF (1)
                             RandomApply(jitter)   3,900   (fixed order:        11,900)
    grayscale (p=0.2)        Grayscale + mask     25,600   rgb_to_grayscale     19,500  keras-cv
                             RandomApply(gray)    23,100
    Gaussian blur (p=0.5)    RandomGaussianBlur   19,300-  per-image depthwise  17,200- TF (2)
                               + mask             27,000     conv + mask        26,200
      224 px, batch 16, k=23                      520-600                      495-520
    horizontal flip          keras RandomFlip     24,600   tf.where(reverse)    23,000  TF (3)
    whole strong view        all keras-cv (masks)  3,100   this file             3,460
                             (RandomApply)         2,000
    (identity map: 157,000-232,000.) Whole pipeline, CIFAR-10 batch 256, two strong
    views: about 4,000 images/s on the 2 cores. The same comparison at 224 px and 32 px
    with the current code: `python tools/benchmark.py ops` (docs/performance.md).

(1) RandomColorJitter is not torchvision's jitter: additive brightness (+-0.8 of the
    range instead of x U(0.2, 1.8)), per-channel contrast mean, saturation sampled
    through x / (1 - x), fixed order. This file's jitter has torchvision's meaning
    and per-image random order at the same speed (fixed order would be ~12,000).
(2) RandomGaussianBlur pads with zeros (torchvision reflects), so a blurred view has
    a slightly darker frame a few pixels wide, and it draws sigma from its own layer
    generator, which no per-batch seed reaches. gaussian_blur below reflects and takes
    sigma from the stateless seed; only ImageNet-sized runs blur.
(3) Same speed within noise; the stateless mask makes views reproducible (--seed).
The crop row predates antialiasing: crops are now resampled as torchvision's PIL bilinear
resize (antialiased when shrunk), see the notes above random_resized_crop for its cost.
RandomApply runs its layer image by image (tf.map_fn): a per-image mask from the
stateless seed is used instead. keras-cv's RandomCropAndResize also runs per image
(tf.map_fn), hence its 10x. WEAK versus STRONG is chosen per batch by selecting the
numbers of the recipe (select_spec), so it costs nothing: no tf.cond, no second view.

Randomness: every draw (crop boxes, jitter factors and order, blur sigma, flips, the
per-image "apply with p" masks) comes from stateless ops keyed by a (2,) seed tensor that
the pipeline derives from cfg.seed and the batch index, so a view depends only on its
images, the recipe and that seed: bit-reproducible under parallel tf.data maps.
"""

import dataclasses
import functools

import keras_cv
import tensorflow as tf

from wcl_tf.config import AUGMENT_ON

# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# Random resized crop: candidate boxes drawn per image before falling back to a centre
# crop (torchvision draws up to 10, then takes a centre crop; see crop_boxes).
_CROP_TRIES = 10
# Gaussian blur sigma range of both recipes.
BLUR_SIGMA = (0.1, 2.0)


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """One augmentation recipe; jitter strengths have torchvision's meaning.

    brightness b: multiply by U(1 - b, 1 + b); contrast c: blend with the image's
    mean gray level by U(1 - c, 1 + c); saturation s: blend with the pixel's gray
    level by U(1 - s, 1 + s); hue h: rotate the HSV hue by U(-h, h) turns. Flip
    (p = 0.5) and the blur sigma range (BLUR_SIGMA) are the same in both recipes.
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


# SimCLR (after the warm-up).
STRONG = AugmentSpec(name="strong", crop_scale=(0.08, 1.0), brightness=0.8, contrast=0.8,
                     saturation=0.8, hue=0.2)
# MoCo v2 (the first cfg.weak_aug_epochs epochs).
WEAK = AugmentSpec(name="weak", crop_scale=(0.2, 1.0), brightness=0.4, contrast=0.4,
                   saturation=0.4, hue=0.1)

_NUMERIC_FIELDS = ("crop_scale", "crop_ratio", "brightness", "contrast", "saturation",
                   "hue", "jitter_prob", "grayscale_prob", "blur_prob")


def select_spec(strong, strong_spec=STRONG, weak_spec=WEAK):
    """An AugmentSpec whose numbers are float32 tensors: strong_spec's where the
    scalar bool tensor `strong` is true, else weak_spec's. Both recipes have the same
    structure, so choosing the numbers costs nothing (no tf.cond, one graph)."""
    strong = tf.convert_to_tensor(strong, tf.bool)

    def pick(a, b):
        if isinstance(a, tuple):
            return tuple(pick(x, y) for x, y in zip(a, b))
        return tf.where(strong, tf.constant(a, tf.float32), tf.constant(b, tf.float32))

    values = {f: pick(getattr(strong_spec, f), getattr(weak_spec, f)) for f in _NUMERIC_FIELDS}
    return AugmentSpec(name=f"{strong_spec.name}|{weak_spec.name}", **values)


def _split(seed, num):
    return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def _uniform(shape, seed, low, high):
    return tf.random.stateless_uniform(shape, seed, minval=low, maxval=high, dtype=tf.float32)


def _per_image(values):
    """(b,) -> (b, 1, 1, 1), to broadcast against images."""
    return tf.reshape(values, [-1, 1, 1, 1])


def apply_with_prob(prob, seed, augmented, images):
    """Per image: `augmented` with probability prob, else `images`."""
    chosen = _uniform([tf.shape(images)[0]], seed, 0.0, 1.0) < prob
    return tf.where(_per_image(chosen), augmented, images)


def crop_boxes(count, scale, ratio, seed, image_aspect=1.0):
    """torchvision RandomResizedCrop boxes: (count, 4) [top, left, bottom, right] in
    fractions of the image side, for images of width / height `image_aspect`.

    Area fraction ~ U(scale), log aspect ratio (of the crop in pixels) ~ U(log ratio); the
    first of _CROP_TRIES candidates that fits inside the image is used, else torchvision's
    fallback: the centred crop of the whole image clamped to the ratio range (full width
    and height W / min(ratio) for an image narrower than that, full height and width
    H * max(ratio) for one wider than that, else the whole image); torchvision 0.29
    transforms.RandomResizedCrop.get_params, its "Fallback to central crop" branch.
    """
    area_seed, ratio_seed, y_seed, x_seed = _split(seed, 4)
    area = _uniform([count, _CROP_TRIES], area_seed, scale[0], scale[1])
    log_ratio = _uniform([count, _CROP_TRIES], ratio_seed, tf.math.log(ratio[0]),
                         tf.math.log(ratio[1]))
    aspect = tf.exp(log_ratio)  # crop width / height, in pixels
    image_aspect = tf.cast(image_aspect, tf.float32)
    # Pixel sizes sqrt(area H W aspect) x sqrt(area H W / aspect), as fractions of W and H.
    height = tf.sqrt(area * image_aspect / aspect)
    width = tf.sqrt(area * aspect / image_aspect)
    fits = tf.logical_and(height <= 1.0, width <= 1.0)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    any_fits = tf.reduce_any(fits, axis=1)
    low, high = tf.minimum(ratio[0], ratio[1]), tf.maximum(ratio[0], ratio[1])
    fallback_height = tf.minimum(1.0, image_aspect / low)
    fallback_width = tf.minimum(1.0, high / image_aspect)
    height = tf.where(any_fits, tf.gather(height, first, batch_dims=1), fallback_height)
    width = tf.where(any_fits, tf.gather(width, first, batch_dims=1), fallback_width)
    # A fitting box sits uniformly at random, the fallback in the centre.
    top = tf.where(any_fits, _uniform([count], y_seed, 0.0, 1.0), 0.5) * (1.0 - height)
    left = tf.where(any_fits, _uniform([count], x_seed, 0.0, 1.0), 0.5) * (1.0 - width)
    return tf.stack([top, left, top + height, left + width], axis=1)


# Resampling of the crops. torchvision resizes the cropped PIL image with PIL's bilinear
# filter, a triangle whose support widens by the shrink factor when the crop is shrunk
# (antialiasing) and is plain bilinear when it is enlarged. Pixel convention: PIL's
# (chosen here for both paths): pixel k covers [k, k + 1), its centre is k + 0.5, and
# output pixel i of a window [a, b) of the source is the sample at a + (i + 0.5)(b - a) / n;
# sums of weights are renormalized at the image borders (edge pixels are repeated, in
# effect). tf.image.crop_and_resize's own convention maps the box corners to the centres
# of the corner pixels (align-corners, box fractions times H - 1), a sub-pixel shift and
# scale that differs from PIL's; the boxes passed to it below are converted so that it
# samples where PIL does. TensorFlow's ScaleAndTranslate (behind
# tf.image.resize(antialias=True)) with the triangle kernel computes exactly PIL's
# weights for a fractional window, in float32 (PIL rounds to uint8 after its first pass,
# so the two differ by about one grey level).


def _pil_boxes_for_crop_and_resize(boxes, height, width, size):
    """Boxes for tf.image.crop_and_resize on images padded by one edge pixel on each side
    such that it samples at PIL's points (see above): exact PIL bilinear resampling of
    the windows when none is shrunk (the triangle's support is then one pixel)."""
    top, left, bottom, right = tf.unstack(boxes, axis=1)
    size_f = tf.cast(size, tf.float32)

    def axis(start, end, length):
        length = tf.cast(length, tf.float32)
        step = (end - start) * length / size_f  # source pixels per output pixel
        first = start * length + 0.5 * step + 0.5  # + 1 (padding) - 0.5 (centres at k + 0.5)
        last = first + (size_f - 1.0) * step
        return first / (length + 1.0), last / (length + 1.0)  # padded side - 1 = length + 1

    y1, y2 = axis(top, bottom, height)
    x1, x2 = axis(left, right, width)
    return tf.stack([y1, x1, y2, x2], axis=1)


def _window_geometry(box, size, height, width):
    """Where _resample_window reads for one box ([top, left, bottom, right] fractions of an
    image of height x width pixels): the integer pixel window [top, left] + [rows, cols]
    (the box plus a margin of the filter's support, clipped to the image) and the
    ScaleAndTranslate scale / translation of each axis relative to that window.

    Returns (top, left, rows, cols) int32 scalars and (scale_y, scale_x), (shift_y,
    shift_x) float32 scalars; for n boxes given as `box` (4, n), each is (n,)."""
    height = tf.cast(height, tf.float32)
    width = tf.cast(width, tf.float32)
    size_f = float(size)

    def axis(start, end, length):
        start, end = start * length, end * length
        extent = tf.maximum(end - start, 1e-3)
        margin = tf.maximum(extent / size_f, 1.0) + 1.0  # filter support + 1 pixel
        first = tf.cast(tf.maximum(tf.floor(start - margin), 0.0), tf.int32)
        last = tf.cast(tf.minimum(tf.math.ceil(end + margin), length), tf.int32)
        scale = size_f / extent
        return first, last - first, scale, -(start - tf.cast(first, tf.float32)) * scale

    top, rows, scale_y, shift_y = axis(box[0], box[2], height)
    left, cols, scale_x, shift_x = axis(box[1], box[3], width)
    return (top, left, rows, cols), (scale_y, scale_x), (shift_y, shift_x)


def _scale_window(window, size, scale, shift):
    """ScaleAndTranslate (PIL's antialiased bilinear) of a window (1, h, w, C) cut by
    _window_geometry: float32 (size, size, C)."""
    out = tf.raw_ops.ScaleAndTranslate(images=window, size=tf.constant([size, size]),
                                       scale=tf.stack(scale), translation=tf.stack(shift),
                                       kernel_type="triangle", antialias=True)
    return out[0]


def _resample_window(image, box, size, height, width):
    """PIL bilinear resize (antialiased when shrinking) of the window `box` ([top, left,
    bottom, right] fractions) of one image (1, H, W, C) to float32 (size, size, C).

    Only the window and a margin of the filter's support are handed to ScaleAndTranslate
    (it costs in proportion to its input's width, not the window's); the margin keeps
    every weighted source pixel, so the result is that of the whole image."""
    (top, left, rows, cols), scale, shift = _window_geometry(box, size, height, width)
    window = tf.slice(image, tf.stack([0, top, left, 0]), tf.stack([-1, rows, cols, -1]))
    return _scale_window(window, size, scale, shift)


def _pil_weights(start, end, length, size):
    """(n, size, length) weights of PIL's bilinear filter: output pixel i of each window
    [start, end) (fractions of a side of `length` pixels, (n,) each) as a weighted sum of
    the source pixels of that side (see the convention above)."""
    start, extent = start * length, tf.maximum((end - start) * length, 1e-3)
    step = extent / size  # source pixels per output pixel
    centre = start[:, None] + (tf.range(size, dtype=tf.float32)[None, :] + 0.5) * step[:, None]
    support = tf.maximum(step, 1.0)[:, None, None]  # widened when shrinking
    source = tf.range(length, dtype=tf.float32)[None, None, :] + 0.5
    weights = tf.nn.relu(1.0 - tf.abs(source - centre[:, :, None]) / support)
    return weights / tf.reduce_sum(weights, axis=2, keepdims=True)


# Side up to which shrinking batched crops are two dense matrix products per image (PIL's
# weights as (size, S) matrices), above which one ScaleAndTranslate per image (tf.map_fn)
# is faster. Crop op alone, images/s on the shared 2-core box (best of 7, interleaved):
#   32 -> 16, batch 1024:  crop_and_resize (before) 83,000; dense 40,000; map_fn 4,000
#   64 -> 32, batch 256:   crop_and_resize 20,000;          dense  7,800; map_fn 2,000
#   224 -> 96, batch 192:  crop_and_resize  3,700;          dense    780; map_fn 1,140
# Enlarging crops (size >= S): crop_and_resize on edge-padded images, as PIL:
#   32 -> 32, batch 512:   crop_and_resize 29,000; padded 21,000; dense 16,000; map_fn 3,300
#   224 -> 224, batch 32:  crop_and_resize    500; padded    430;               map_fn   270
_DENSE_MAX_SIDE = 64


def random_resized_crop(images, size, scale, ratio, seed):
    """torchvision RandomResizedCrop, vectorized: (b, S, S, 3) float -> (b, size, size, 3),
    one crop per (square) image; see crop_boxes. Resampled as PIL's bilinear resize of the
    window (antialiased when it is shrunk, see above)."""
    b = tf.shape(images)[0]
    boxes = crop_boxes(b, scale, ratio, seed)
    images = tf.cast(images, tf.float32)
    side = images.shape[1]
    if side is not None and size >= side:
        # No window (at most S x S) is shrunk to size >= S: plain bilinear, batched.
        # One edge pixel on each side (concat: cheaper than tf.pad's SYMMETRIC mode).
        padded = tf.concat([images[:, :1], images, images[:, -1:]], axis=1)
        padded = tf.concat([padded[:, :, :1], padded, padded[:, :, -1:]], axis=2)
        return tf.image.crop_and_resize(padded, _pil_boxes_for_crop_and_resize(
            boxes, side, side, size), tf.range(b), [size, size], method="bilinear")
    if side is not None and side <= _DENSE_MAX_SIDE:
        # Small images (multi-crop local crops of 32-px images): rows, then columns.
        top, left, bottom, right = tf.unstack(boxes, axis=1)
        rows = _pil_weights(top, bottom, side, size)
        cols = _pil_weights(left, right, side, size)
        return tf.einsum("bjx,bixc->bijc", cols, tf.einsum("biy,byxc->bixc", rows, images))
    # Windows may be shrunk (multi-crop local crops): one antialiased resize per image.
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    return tf.map_fn(
        lambda args: _resample_window(args[0][tf.newaxis], args[1], size, height, width),
        (images, boxes),
        fn_output_signature=tf.TensorSpec([size, size, images.shape[-1]], tf.float32))


# Resampling the crops of one image. ScaleAndTranslate (TensorFlow's antialiased resize)
# runs a scalar loop per output pixel and filter tap: about 2 ms per 224-px crop on this
# project's CPU, whatever the window's size. _resample_in_bands computes all of an
# image's crops at once as small matrix products (oneDNN-vectorized) over bands of source
# rows, in about 30 ops for any number of crops. Measured on the shared photos, one core,
# process CPU ms per image, min of 4 interleaved rounds (one-off scripts, not kept):
#   decode + two 224-px crops in a tf.data map: ScaleAndTranslate per window 5.85-5.91;
#   these bands 4.75-5.00; the same bands window by window (more ops per crop) 5.20-5.22
#   host side of the device recipe (make_pretrain_dataset, 3 x 20 batches of 32, two
#   rounds): 4.52-7.20 -> 4.40-4.93, a gain as small as this box's noise
# The two agree to 7e-3 of a grey level (float32 sums in another order; 9e-5 of the
# rounded pixels differ by one); tests/test_crop_resampling.py checks both against PIL.
# The float32 bands hold about `count` times the region's pixels, so regions above this
# many pixels x crops (2 megapixels for two views) go window by window through
# ScaleAndTranslate, whose buffers are a few crop-sized rows.
_BANDED_MAX_PIXELS = 1 << 22
# Crops smaller than this go window by window too: six 96-px multi-crop local crops are
# scattered over the image, so each band spans the whole region's width for a small crop.
# Host side of the device recipe with 6 local crops of 96 px, one core, images/s, two
# interleaved rounds: bands for every size 97, 102 against 115, 118 window by window.
_BANDED_MIN_SIZE = 128
# Output rows per matrix product. 16 was the fastest of 8, 16 and 24 window by window
# (2.26, 1.94, 2.38 ms per 224-px crop, one thread); for whole images in tf.data, 8, 16
# and 32 were the same within this box's noise (two views: 5.3-5.9 ms CPU per image).
_BAND_ROWS = 16


def _resample_in_bands(region, size, start, extent):
    """PIL's bilinear resize (triangle filter widened by the shrink factor, weights
    renormalized at the borders: the convention above) of n windows of one image region.

    region: uint8 (H, W, C); start, extent: float32 (n, 2), each window's [row, column]
    start and size in pixels of the region. Returns float32 (n, size, size, C).

    Rows first, then columns. Output rows go in blocks of _BAND_ROWS: a block reads one band
    of `span` consecutive source rows (every row its filters reach), and is one
    (_BAND_ROWS, span) x (span, W * C) product with dense weights."""
    shape = tf.shape(region)
    lengths, channels = shape[:2], shape[2]
    n = tf.shape(start)[0]
    blocks = -(-size // _BAND_ROWS)
    padded = blocks * _BAND_ROWS
    step = extent / size  # source pixels per output pixel, (n, 2)
    support = tf.maximum(step, 1.0)  # the triangle's half-width, widened when shrinking
    centre = (start[..., None]
              + (tf.range(padded, dtype=tf.float32) + 0.5) * step[..., None])
    centre = tf.reshape(centre, [n, 2, blocks, _BAND_ROWS])
    first = tf.cast(tf.floor(centre[..., 0] - support[..., None]), tf.int32)
    first = tf.clip_by_value(first, 0, lengths[:, None] - 1)  # (n, 2, blocks)
    span = tf.cast(tf.math.ceil(tf.reduce_max((_BAND_ROWS - 1) * step + 2.0 * support)),
                   tf.int32) + 2
    taps = first[..., None] + tf.range(tf.minimum(span, tf.reduce_max(lengths)))
    inside = taps < lengths[:, None, None]
    taps = tf.minimum(taps, lengths[:, None, None] - 1)  # past the end: weight 0 below
    weights = tf.nn.relu(1.0 - tf.abs(tf.cast(taps, tf.float32)[..., None, :] + 0.5
                                      - centre[..., None])
                         / support[..., None, None, None])  # (n, 2, blocks, rows, span)
    weights = tf.where(inside[..., None, :], weights, 0.0)
    # divide_no_nan: padding rows of the last block may fall past the region.
    weights = tf.math.divide_no_nan(weights, tf.reduce_sum(weights, -1, keepdims=True))
    # Gathered as uint8, then cast: a quarter of the memory traffic of a float gather.
    flat = tf.reshape(region, [lengths[0], lengths[1] * channels])
    rows = tf.matmul(weights[:, 0], tf.cast(tf.gather(flat, taps[:, 0]), tf.float32))
    rows = tf.reshape(rows, [n, padded, lengths[1], channels])[:, :size]
    rows = tf.reshape(tf.transpose(rows, [0, 2, 1, 3]), [n, lengths[1], size * channels])
    out = tf.matmul(weights[:, 1], tf.gather(rows, taps[:, 1], batch_dims=1))
    out = tf.reshape(out, [n, padded, size, channels])[:, :size]  # (n, column, row, C)
    return tf.transpose(out, [0, 2, 1, 3])


def _crops(shape, read_region, count, size, scale, ratio, seed):
    """crops_of_image / crops_of_jpeg: `count` crops of an image of `shape` ([height,
    width, ...]), boxes drawn at its own size and aspect ratio, resampled from the one
    rectangle that holds every window _window_geometry reads (the boxes plus the filter's
    margin): read_region(origin, extent) returns that rectangle, uint8 (rows, cols, 3), for
    its [top, left] origin and [rows, cols] extent. uint8 (count, size, size, 3); count is
    a Python int."""
    height, width = shape[0], shape[1]
    aspect = tf.cast(width, tf.float32) / tf.cast(height, tf.float32)
    boxes = crop_boxes(count, scale, ratio, seed, image_aspect=aspect)
    (top, left, rows, cols), box_scale, shift = _window_geometry(tf.transpose(boxes), size,
                                                                 height, width)
    origin = tf.stack([tf.reduce_min(top), tf.reduce_min(left)])
    extent = tf.stack([tf.reduce_max(top + rows), tf.reduce_max(left + cols)]) - origin
    region = read_region(origin, extent)

    def in_bands():
        hw = tf.cast(tf.stack([height, width]), tf.float32)
        start = tf.stack([boxes[:, 0], boxes[:, 1]], axis=1) * hw
        end = tf.stack([boxes[:, 2], boxes[:, 3]], axis=1) * hw
        return _resample_in_bands(region, size, start - tf.cast(origin, tf.float32),
                                  tf.maximum(end - start, 1e-3))

    def window_by_window():
        crops = []
        for i in range(count):
            window = tf.slice(region, tf.stack([top[i] - origin[0], left[i] - origin[1], 0]),
                              tf.stack([rows[i], cols[i], -1]))
            crops.append(_scale_window(window[tf.newaxis], size,
                                       [box_scale[0][i], box_scale[1][i]],
                                       [shift[0][i], shift[1][i]]))
        return tf.stack(crops)

    if size < _BANDED_MIN_SIZE:
        crops = window_by_window()
    else:
        crops = tf.cond(extent[0] * extent[1] * count <= _BANDED_MAX_PIXELS, in_bands,
                        window_by_window)
    crops.set_shape([count, size, size, 3])  # The dynamic slices lose the channel count.
    return tf.cast(tf.clip_by_value(tf.round(crops), 0.0, 255.0), tf.uint8)


def crops_of_image(image_uint8, count, size, scale, ratio, seed):
    """`count` random resized crops of ONE image of any size: uint8 (H, W, 3) ->
    uint8 (count, size, size, 3).

    Boxes come from the image at its own resolution and aspect ratio (torchvision's
    order: crop, then resize), so nothing is stretched and small crops keep their detail.
    Each window is resampled as PIL's bilinear resize (antialiased when shrunk), from the
    rectangle that holds every window (what crops_of_jpeg decodes), by _crops.
    """
    return _crops(tf.shape(image_uint8),
                  lambda origin, extent: tf.slice(image_uint8, tf.concat([origin, [0]], 0),
                                                  tf.concat([extent, [-1]], 0)),
                  count, size, scale, ratio, seed)


def decode_image(contents):
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> uint8 (H, W, 3) (grayscale repeated, alpha
    dropped, the first frame of a GIF)."""
    image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8,
                               expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def crops_of_jpeg(contents, count, size, scale, ratio, seed):
    """crops_of_image of the image encoded as JPEG in `contents` (scalar string), decoding
    only what the crops read: uint8 (count, size, size, 3).

    The boxes are drawn exactly as crops_of_image draws them (crop_boxes at the image's
    own size, read from the JPEG header). One decode_and_crop_jpeg decodes the rectangle
    that holds all `count` windows plus the filter's margin (one partial decode per
    image, not per crop: 1.1x faster for two views, 1.85x for eight local crops, one
    thread on the shared photos), and _crops resamples the windows from it with the same
    weights as crops_of_image. The result is
    crops_of_image(decode(contents), ...) up to libjpeg's decoding of a cropped region
    (DCT-block smoothing at the region's border, about one grey level at most pixels it
    touches; tests/test_fused_crop.py bounds it)."""
    return _crops(tf.image.extract_jpeg_shape(contents),
                  lambda origin, extent: tf.io.decode_and_crop_jpeg(
                      contents, tf.concat([origin, extent], 0), channels=3),
                  count, size, scale, ratio, seed)


def crops_of_encoded(contents, count, size, scale, ratio, seed):
    """crops_of_image of an encoded image (scalar string): JPEGs through crops_of_jpeg
    (fused decode and crop, one partial decode per image), other formats (PNG, GIF, BMP,
    WebP) decoded whole, then crops_of_image. uint8 (count, size, size, 3)."""
    return tf.cond(
        tf.io.is_jpeg(contents),
        lambda: crops_of_jpeg(contents, count, size, scale, ratio, seed),
        lambda: crops_of_image(decode_image(contents), count, size, scale, ratio, seed))


def _gray(planes):
    """The ITU-R 601 luma (b, H, W) of [r, g, b] planes."""
    r, g, b = planes
    return r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]


def _planes(images):
    """(b, H, W, 3) -> [r, g, b], three (b, H, W) planes.

    The jitter works on channel planes: every blend and the hue shift are then
    elementwise ops on same-shape tensors, per-image factors broadcast along outer axes,
    and no (b, H, W, 1) tensor is broadcast along the innermost axis (measured, one
    thread, batch 32 of 224 px: a (b, H, W, 1) + (b, H, W, 3) add 0.57 ms per view,
    a plain (b, H, W, 3) op 0.22). One transpose in and one out cost about 0.35 ms per
    view together; tf.stack(planes, axis=-1) instead of the transpose back: 1.2 ms."""
    return tf.unstack(tf.transpose(images, [3, 0, 1, 2]))


def _from_planes(planes):
    """[r, g, b] (b, H, W) -> (b, H, W, 3)."""
    return tf.transpose(tf.stack(planes), [1, 2, 3, 0])


def _clip01(x):
    # One ClipByValue kernel: tf.clip_by_value runs minimum then maximum (two passes,
    # 0.34 against 0.28 ms per view on a (32, 224, 224, 3) batch).
    return tf.raw_ops.ClipByValue(t=x, clip_value_min=tf.constant(0.0),
                                  clip_value_max=tf.constant(1.0))


def _shift_hue(planes, shift):
    """Rotates the HSV hue of [r, g, b] planes (k, H, W) by shift (k,) turns; returns the
    rotated planes, in [0, 1].

    tf.image.rgb_to_hsv / hsv_to_rgb give the same numbers up to float rounding but cost
    3.8 ms per view for the round trip (rgb_to_hsv alone 2.9) against about 1.0 for these
    elementwise ops on planes. With V = max, m = min and C = V - m of the pixel, the hue in
    sixths of a turn is (g - b) / C, (b - r) / C + 2 or (r - g) / C + 4 as V is r, g or
    b; hsv_to_rgb's v (1 - s + s d) is V - C (1 - d), with 1 - d = clamp(2 - |h - 3|),
    clamp(|h - 2| - 1), clamp(|h - 4| - 1) for r, g, b (clamp to [0, 1]). V - C e stays
    in [m, V] for e in [0, 1] without a final clip. Gray pixels (C = 0, hue undefined, 0
    as in TensorFlow) come out unchanged: V - 0.
    """
    r, g, b = planes
    v = tf.maximum(tf.maximum(r, g), b)
    c = v - tf.minimum(tf.minimum(r, g), b)
    r_max, g_max = r == v, g == v
    sixths = tf.math.divide_no_nan(tf.where(r_max, g - b, tf.where(g_max, b - r, r - g)), c)
    hue = sixths + tf.where(r_max, 0.0, tf.where(g_max, 2.0, 4.0)) + 6.0 * shift[:, None, None]
    # Into [0, 6). tf.math.floormod(hue, 6) costs 0.37-0.43 ms per view on one plane,
    # these three ops 0.07.
    hue -= 6.0 * tf.floor(hue * (1.0 / 6.0))
    return [v - c * _clip01(2.0 - tf.abs(hue - 3.0)),
            v - c * _clip01(tf.abs(hue - 2.0) - 1.0),
            v - c * _clip01(tf.abs(hue - 4.0) - 1.0)]


def _jitter_draws(count, brightness, contrast, saturation, hue, seed):
    """Per-image draws of color_jitter: blend factors (count, 4), hue shifts (count,) and
    the order of the operations (count, 4) (0 brightness, 1 contrast, 2 saturation, 3
    hue)."""
    b_seed, c_seed, s_seed, h_seed, order_seed = _split(seed, 5)
    blend_factors = tf.stack([
        _uniform([count], b_seed, tf.maximum(1.0 - brightness, 0.0), 1.0 + brightness),
        _uniform([count], c_seed, tf.maximum(1.0 - contrast, 0.0), 1.0 + contrast),
        _uniform([count], s_seed, tf.maximum(1.0 - saturation, 0.0), 1.0 + saturation),
        tf.ones([count]),  # hue step: no blend
    ], axis=1)
    hue_shift = _uniform([count], h_seed, -hue, hue)
    order = tf.argsort(_uniform([count, 4], order_seed, 0.0, 1.0), axis=1)
    return blend_factors, hue_shift, order


def _blend(planes, blend_factors, op):
    """Step of the jitter where image i blends with its op[i]'s target (0 brightness:
    black, 1 contrast: its mean gray level, 2 saturation: each pixel's gray level, 3 hue:
    factor 1, unchanged): clip(f x + (1 - f) target) on [r, g, b] planes (k, H, W)."""
    factor = tf.gather(blend_factors, op, batch_dims=1)
    gray = _gray(planes)
    # (1 - f) target = a gray + c, with per-image a and c: two passes over one plane.
    a = (1.0 - factor) * tf.cast(op == 2, tf.float32)
    c = (1.0 - factor) * tf.cast(op == 1, tf.float32) * tf.reduce_mean(gray, axis=[1, 2])
    target = gray * a[:, None, None] + c[:, None, None]
    return [_clip01(factor[:, None, None] * x + target) for x in planes]


def _jitter_planes(planes, blend_factors, hue_shift, order, hue_step):
    """The four steps on [r, g, b] planes (k, H, W) of images that all shift their hue
    at step hue_step (a Python int)."""
    for step in range(4):
        if step == hue_step:
            planes = _shift_hue(planes, hue_shift)
        else:
            planes = _blend(planes, blend_factors, order[:, step])
    return planes


def _jitter_with(images, blend_factors, hue_shift, order, static_shapes, chosen=None):
    """color_jitter with its draws on (b, H, W, 3) images; with a (b,) bool `chosen`, only
    on those rows (the others are returned as they are).

    Host form: the images are split once by the step of their hue shift (4 groups of
    dynamic sizes, and a fifth of the rows not chosen); each group runs its 3 blends and its
    hue shift on all its rows, and the groups are stitched back once. Measured (one thread,
    batch 32 of 224 px, ms per view): the previous form's gather and scatter of the hue rows
    at each step cost 0.73, the partition and stitch 0.2, and folding `chosen` into the
    partition saves _on_chosen's gather and scatter (0.4).
    static_shapes: every image blends at every step (factor 1 at its hue step: unchanged)
    and goes through the hue shift at every step, kept only at its hue step. The choice is
    made on the stacked planes, (3, b, H, W): under XLA, selecting plane by plane let the
    compiler fuse each step into the next and repeat its work for every use (the jitter
    then cost 190 ms per view with traced draws, one thread, batch 32 of 224 px; stacked,
    1.5; the previous channel-last form 6.0).
    """
    if static_shapes:
        planes = _planes(images)
        unchanged = planes
        for step in range(4):
            op = order[:, step]
            planes = _blend(planes, blend_factors, op)
            planes = tf.unstack(tf.where((op == 3)[None, :, None, None],
                                         tf.stack(_shift_hue(planes, hue_shift)),
                                         tf.stack(planes)))
        if chosen is not None:
            planes = [tf.where(chosen[:, None, None], x, u) for x, u in zip(planes, unchanged)]
        return _from_planes(planes)
    shape = images.shape
    group = tf.argmax(tf.cast(order == 3, tf.int32), axis=1, output_type=tf.int32)
    if chosen is not None:
        group = tf.where(chosen, group, 4)
    images, blend_factors, hue_shift, order = [
        tf.dynamic_partition(x, group, 5) for x in (images, blend_factors, hue_shift, order)]
    outputs = [_from_planes(_jitter_planes(_planes(images[step]), blend_factors[step],
                                           hue_shift[step], order[step], step))
               for step in range(4)]
    rows = tf.dynamic_partition(tf.range(tf.shape(group)[0]), group, 5)
    jittered = tf.dynamic_stitch(rows, outputs + [images[4]])
    jittered.set_shape(shape)  # The stitch's own batch size is unknown.
    return jittered


def color_jitter(images, brightness, contrast, saturation, hue, seed, static_shapes=False):
    """torchvision ColorJitter on (b, H, W, 3) floats in [0, 1], per image.

    Factors: brightness U(1 - b, 1 + b), contrast U(1 - c, 1 + c), saturation
    U(1 - s, 1 + s) (lower bounds clipped at 0), hue U(-h, h). Each image applies the
    four operations in its own random order, as torchvision does. Brightness,
    contrast and saturation are blends (with black, the mean gray level, the pixel's
    gray level); the hue shift is an HSV rotation (see _shift_hue). Each image does its
    three blends and its hue shift only (see _jitter_with).

    static_shapes=True (XLA, TPU: no data-dependent shapes): every image blends and goes
    through the hue shift at each step, the results selected per image; the same values
    up to float rounding, 4x the hue work and 4/3 the blends.
    """
    draws = _jitter_draws(tf.shape(images)[0], brightness, contrast, saturation, hue, seed)
    return _jitter_with(images, *draws, static_shapes)


def _on_chosen(chosen, images, transform, per_image=(), static_shapes=False):
    """images with transform(images[chosen], *[d[chosen] for d in per_image]) in the rows
    where the (b,) bool `chosen` holds: only those rows are computed, gathered and
    scattered back once (static_shapes: computed for every row, then selected, as
    apply_with_prob does). The result is the same either way."""
    if static_shapes:
        return tf.where(_per_image(chosen), transform(images, *per_image), images)
    rows = tf.where(chosen)  # (k, 1)

    def apply():
        picked = [tf.gather_nd(d, rows) for d in per_image]
        return tf.tensor_scatter_nd_update(images, rows,
                                           transform(tf.gather_nd(images, rows), *picked))

    # No row chosen: nothing to compute (some ops, e.g. the blur's reflect pad, refuse
    # an empty batch).
    return tf.cond(tf.reduce_any(chosen), apply, lambda: images)


def _chosen(prob, seed, count):
    """(count,) bool, true with probability prob: apply_with_prob's draw."""
    return _uniform([count], seed, 0.0, 1.0) < prob


def flip_left_right(images, flip):
    """Mirrors the images where the (b,) bool `flip` holds: one gather along the width
    (half the time of reversing every image and selecting)."""
    width = tf.shape(images)[2]
    forward = tf.range(width)
    columns = tf.where(flip[:, None], tf.reverse(forward, [0])[None, :], forward[None, :])
    return tf.gather(images, columns, axis=2, batch_dims=1)


def _reflect_pad(images, half, axis):
    """Reflect padding of `half` along one spatial axis (1 or 2) of (1, H, W, C): the
    mirrored edges concatenated to the image. Same values as tf.pad(mode="REFLECT"),
    whose CPU kernel is slow: padding both axes with it costs 0.6-0.75 ms per view (batch
    32 of 224 px, k = 23, one thread), about as much as the two convolutions; the two
    concatenations here 0.36 together (tf.reverse of slices instead of the gathers: the
    same)."""
    size = tf.shape(images)[axis]
    first = tf.gather(images, tf.range(half, 0, -1), axis=axis)
    last = tf.gather(images, tf.range(size - 2, size - 2 - half, -1), axis=axis)
    return tf.concat([first, images, last], axis)


def gaussian_blur(images, kernel_size, sigma):
    """torchvision GaussianBlur: per-image sigma (b,), odd kernel_size, reflect padding.

    One separable depthwise convolution for the whole batch: the images are laid side by
    side as the channels of a single image, each with its own 1-D kernel.
    """
    b, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    half = kernel_size // 2
    x = tf.range(-half, half + 1, dtype=tf.float32)
    kernels = tf.exp(-tf.square(x)[None, :] / (2.0 * tf.square(sigma)[:, None]))  # (b, k)
    kernels /= tf.reduce_sum(kernels, axis=1, keepdims=True)
    kernels = tf.transpose(tf.repeat(kernels, 3, axis=0))  # (k, b*3), image-major
    stacked = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, height, width, b * 3])
    # b * 3, not -1: an empty batch (no image drawn for blur) has no size to infer.
    stacked = tf.nn.depthwise_conv2d(_reflect_pad(stacked, half, 1),
                                     tf.reshape(kernels, [kernel_size, 1, b * 3, 1]),
                                     [1, 1, 1, 1], "VALID")
    stacked = tf.nn.depthwise_conv2d(_reflect_pad(stacked, half, 2),
                                     tf.reshape(kernels, [1, kernel_size, b * 3, 1]),
                                     [1, 1, 1, 1], "VALID")
    return tf.transpose(tf.reshape(stacked, [height, width, b, 3]), [2, 0, 1, 3])


def blur_kernel_size(image_size):
    """Odd kernel of about 10% of the image side (SimCLR: 23 px at 224)."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def photometric(images, spec, seed, blur_kernel=None, grayscale=None, static_shapes=False):
    """Everything of the recipe after the crop, on float (b, S, S, 3) images in [0, 1]:
    colour jitter (p = spec.jitter_prob), grayscale (spec.grayscale_prob), Gaussian blur
    (spec.blur_prob, only when blur_kernel is an odd size), horizontal flip (0.5).

    seed: (2,) int tensor; it is split exactly as ViewAugmenter splits a view's seed (the
    first part is the crop's), so the same crops and seed give the same view whether this
    runs in tf.data (host) or inside train_step (device, wcl_tf.data.augment_layers).
    grayscale: a callable (b, S, S, 3) -> (b, S, S, 3); keras-cv's Grayscale by default.
    static_shapes: see color_jitter (for XLA-compiled steps and TPUs).
    Returns float32 (b, S, S, 3) in [0, 1].
    """
    (_, jitter_seed, jitter_p_seed, gray_p_seed, blur_p_seed, sigma_seed,
     flip_seed) = _split(seed, 7)
    images = tf.cast(images, tf.float32)
    b = tf.shape(images)[0]
    # Each step is computed only for the images it applies to (static_shapes: for all,
    # then selected); every draw is made for the whole batch first, so the numbers are
    # those of apply_with_prob(p, seed, op(images), images) whichever way it runs.
    draws = _jitter_draws(b, spec.brightness, spec.contrast, spec.saturation, spec.hue,
                          jitter_seed)
    images = _jitter_with(images, *draws, static_shapes,
                          chosen=_chosen(spec.jitter_prob, jitter_p_seed, b))
    grayscale = grayscale or grayscale_layer()
    images = _on_chosen(_chosen(spec.grayscale_prob, gray_p_seed, b), images, grayscale,
                        static_shapes=static_shapes)
    if blur_kernel:
        sigma = _uniform([b], sigma_seed, *BLUR_SIGMA)
        images = _on_chosen(_chosen(spec.blur_prob, blur_p_seed, b), images,
                            lambda x, s: gaussian_blur(x, blur_kernel, s), (sigma,),
                            static_shapes)
    images = flip_left_right(images, _chosen(0.5, flip_seed, b))
    return _clip01(images)


@functools.lru_cache(maxsize=None)
def grayscale_layer():
    # keras-cv's Grayscale computes torchvision's luma (ITU-R 601) and is as fast as
    # plain TF here (see the table above); float32 whatever the global policy. A matmul of
    # the same weights measured 0.22-0.24 against 0.31-0.32 ms per view on the 20% of
    # images drawn (batch 32 of 224 px, one thread): too little to drop the keras-cv op
    # the project is asked to build its views with.
    return keras_cv.layers.Grayscale(output_channels=3, dtype="float32")


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
    """The crop of a view: random_resized_crop of (b, S, S, 3) images with the crop part of
    a view's seed (as ViewAugmenter draws it); float32 (b, output_size, output_size, 3) in
    [0, 1]."""
    crop_seed = _split(seed, 7)[0]
    images = tf.cast(images_uint8, tf.float32) / 255.0
    return random_resized_crop(images, output_size, spec.crop_scale, spec.crop_ratio,
                               crop_seed)


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
        self._blur_kernel = blur_kernel_size(self.output_size) if self.blur else None

    def _check(self, images, size):
        if tuple(images.shape[1:]) != (size, size, 3):
            raise ValueError(f"ViewAugmenter(image_size={size}) expects (b, {size}, {size}, 3) "
                             f"images, got {images.shape}: resize before batching.")

    def __call__(self, images_uint8, spec, seed, crop=True, static_shapes=False):
        """crop=False: the images are crops already (crops_of_image), of the output size;
        everything after the crop is applied. static_shapes: see color_jitter."""
        self._check(images_uint8, self.image_size if crop else self.output_size)
        if crop:
            images = view_crop(images_uint8, spec, seed, self.output_size)
        else:
            images = tf.cast(images_uint8, tf.float32) / 255.0
        images = photometric(images, spec, seed, self._blur_kernel,
                             static_shapes=static_shapes)
        images.set_shape([images_uint8.shape[0], self.output_size, self.output_size, 3])
        return images

    def crop_only(self, images_uint8, spec, seed):
        """The view's crop alone, rounded to uint8 (b, output_size, output_size, 3): what
        the host hands the device when photometric augmentation runs in train_step."""
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

    Global views use crop scale `global_scale`, local crops `local_scale`; colour, blur
    and flip follow the selected recipe for all of them. Returns a dict:
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
    """The rest of the recipe (jitter, grayscale, blur, flip) on views already cropped from
    the full-resolution images (crops_of_image, in the input pipeline).

    crops: {"view_1", "view_2": uint8 (b, S, S, 3)[, "local": uint8 (b, M, L, L, 3)]}.
    Returns the same keys as float32 in [0, 1], like two_views / multi_crop_views.
    static_shapes: see color_jitter (train_step under XLA or on a TPU).
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
