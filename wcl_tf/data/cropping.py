"""Random resized crops: torchvision's crop boxes, resampled as PIL's bilinear resize
(antialiased when a window is shrunk), on a batch of S x S images (random_resized_crop) or
cut from one full-resolution image (crops_of_image), decoding only the region of a JPEG that
the crops read (crops_of_jpeg, crops_of_encoded).

keras-cv 0.9.0 versus plain TF, measured on this project's shared 2-core CPU box: batch 64
of 32x32 images inside `tf.data.Dataset.map`, images/s (best of 3-4 repeats; the box was
shared, so +-30%):

    op                       keras-cv layer                plain TF                     used
    random resized crop      RandomCropAndResize   6,500   crop_and_resize      66,000  TF
    (identity map: 157,000-232,000.)

keras-cv's RandomCropAndResize runs per image (tf.map_fn), hence its 10x. The row predates
antialiasing: crops are now resampled as torchvision's PIL bilinear resize (antialiased when
shrunk), see the notes above random_resized_crop and _BANDED_MAX_PIXELS for its cost. The
same comparison at 224 px and 32 px with the current code: `python tools/benchmark.py ops`
(docs/performance.md).
"""

import tensorflow as tf

from wcl_tf.data.recipe import _chosen, _split, _uniform

# Random resized crop: candidate boxes drawn per image before falling back to a centre
# crop (torchvision draws up to 10, then takes a centre crop; see crop_boxes).
_CROP_TRIES = 10
# Folded into a crop seed for the flips of its crops (crop_flips), apart from the boxes.
_FLIP_STREAM = 0xF119


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


def crop_flips(seed, count):
    """(count,) bool, each true with probability 0.5: the horizontal flips of the `count`
    crops whose boxes crop_boxes draws from `seed` ((2,) int), for the per-image crops
    (crops_of_image's flip). Drawn from stateless_fold_in(seed, _FLIP_STREAM), a stream
    apart from the boxes' draws: the boxes are those drawn without flips. The flip of
    the authors' recipe comes right after the crop (torchvision RandomHorizontalFlip) and
    commutes with the colour steps and the blur, so the crop makes it (docs/method.md
    section 4.1)."""
    flip_seed = tf.random.experimental.stateless_fold_in(seed, _FLIP_STREAM)
    return _chosen(0.5, flip_seed, count)


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


def random_resized_crop(images, size, scale, ratio, seed, flip=None):
    """torchvision RandomResizedCrop, vectorized: (b, S, S, 3) float -> (b, size, size, 3),
    one crop per (square) image; see crop_boxes. Resampled as PIL's bilinear resize of the
    window (antialiased when it is shrunk, see above).

    flip: None, or (b,) bool: those crops come out mirrored left-right (the crop of the
    same box, reversed along the width), at no cost: the resampling reads the window's
    columns in mirrored order (see the three paths below). The boxes do not depend on it."""
    b = tf.shape(images)[0]
    boxes = crop_boxes(b, scale, ratio, seed)
    images = tf.cast(images, tf.float32)
    side = images.shape[1]
    if side is not None and size >= side:
        # No window (at most S x S) is shrunk to size >= S: plain bilinear, batched.
        # One edge pixel on each side (concat: cheaper than tf.pad's SYMMETRIC mode).
        padded = tf.concat([images[:, :1], images, images[:, -1:]], axis=1)
        padded = tf.concat([padded[:, :, :1], padded, padded[:, :, -1:]], axis=2)
        pil_boxes = _pil_boxes_for_crop_and_resize(boxes, side, side, size)
        if flip is not None:
            # x1 > x2 samples the box right to left: a mirrored crop (tf.image docs).
            y1, x1, y2, x2 = tf.unstack(pil_boxes, axis=1)
            pil_boxes = tf.stack([y1, tf.where(flip, x2, x1), y2, tf.where(flip, x1, x2)],
                                 axis=1)
        return tf.image.crop_and_resize(padded, pil_boxes, tf.range(b), [size, size],
                                        method="bilinear")
    if side is not None and side <= _DENSE_MAX_SIDE:
        # Small images (multi-crop local crops of 32-px images): rows, then columns.
        top, left, bottom, right = tf.unstack(boxes, axis=1)
        rows = _pil_weights(top, bottom, side, size)
        cols = _pil_weights(left, right, side, size)
        if flip is not None:  # Output column j reads what column size - 1 - j reads.
            cols = tf.where(flip[:, None, None], tf.reverse(cols, [1]), cols)
        return tf.einsum("bjx,bixc->bijc", cols, tf.einsum("biy,byxc->bixc", rows, images))
    # Windows may be shrunk (multi-crop local crops): one antialiased resize per image
    # (ScaleAndTranslate takes no mirrored scale: the small result is reversed instead).
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    if flip is None:
        flip = tf.zeros([b], tf.bool)

    def crop(args):
        out = _resample_window(args[0][tf.newaxis], args[1], size, height, width)
        return tf.cond(args[2], lambda: tf.reverse(out, [1]), lambda: out)

    return tf.map_fn(
        crop, (images, boxes, flip),
        fn_output_signature=tf.TensorSpec([size, size, images.shape[-1]], tf.float32))


# Resampling the crops of one image. ScaleAndTranslate (TensorFlow's antialiased resize)
# runs a scalar loop per output pixel and filter tap: about 2 ms per 224-px crop on this
# project's CPU, whatever the window's size. _resample_in_bands computes each crop as
# small matrix products (oneDNN-vectorized) over bands: rows first, one product per
# _BAND_ROWS output rows reading the band of source rows their filters reach, then
# columns, one product per _BAND_ROWS output columns reading a slice of the rows' result.
# The column products take the pixels as they lie, channels innermost: their weights are
# PIL's triangle weights times the 3 x 3 identity (an output channel reads only its own
# channel), 3x the multiply-adds of a product per channel, so that no float tensor is
# transposed on its channel axis. Such transposes (inner axis of 3 floats) run Eigen's
# generic shuffle, about 4 ns per element here. TF profiler, tf.data map of a JPEG's
# partial decode and two 224-px crops, one thread, the shared photos, op time per image on
# a loaded box (one-off script, not kept): the previous version (all crops' rows at once
# over the region's whole width, then a transpose to columns and one back) spent 8.7 ms in
# its 3 Transposes and 6.8 ms in its 2 products; this one 4.6 ms in its 4 products, 0.3 ms
# transposing (runs of 48 floats), about 3 ms in the rest (decode 1.0). Process CPU ms
# per image in the same map, min of 8 interleaved rounds in one process: before 10.0, this
# one 6.95, with 8 output columns per product 8.3, with 8 rows and 8 columns 8.8, with 32
# rows 6.95; in a second run, before 12.4, this one 8.7, and both crops in the same
# products (padded to a common width) 9.8. The crops agree with the previous version's
# to one grey level (8e-6 of the pixels of 64 crops of the photos differ by one);
# tests/test_crop_resampling.py checks both paths against PIL.
# The float32 bands hold about the window's pixels times span / _BAND_ROWS, so regions
# above this many pixels x crops (2 megapixels for two views) go window by window through
# ScaleAndTranslate, whose buffers are a few crop-sized rows.
_BANDED_MAX_PIXELS = 1 << 22
# Crops smaller than this go window by window too: ScaleAndTranslate is faster for small
# crops. Host side of the device recipe with 6 local crops of 96 px, one core, images/s,
# two interleaved rounds (the previous bands): bands for every size 97, 102 against 115,
# 118 window by window; this version's bands, decode and 6 crops in a tf.data map, CPU ms
# per image, min of 6 interleaved rounds: 8.8 against 4.7 window by window.
_BANDED_MIN_SIZE = 128
# Outputs per matrix product, on both axes (see the comparison above).
_BAND_ROWS = 16


def _band_weights(start, extent, size, length, mirror=None):
    """PIL's triangle weights of one axis of one window, in blocks of _BAND_ROWS outputs.

    start, extent: float32 scalars, the window on a source axis of `length` pixels; mirror:
    None or a bool scalar tensor, true for the outputs in reverse order (output i gets the
    weights of output size - 1 - i: a mirrored crop). Returns first (blocks,) int32, the
    first source pixel each block reads; span, the pixels every block reads (first + span
    <= length); taps (blocks, span) int32, those pixels; and weights (blocks, _BAND_ROWS,
    span) float32, renormalized over the pixels inside the source (the axis's border, as
    PIL)."""
    blocks = -(-size // _BAND_ROWS)
    step = extent / size  # source pixels per output pixel
    support = tf.maximum(step, 1.0)  # the triangle's half-width, widened when shrinking
    centre = start + (tf.range(size, dtype=tf.float32) + 0.5) * step
    if mirror is not None:
        centre = tf.where(mirror, tf.reverse(centre, [0]), centre)
    if blocks * _BAND_ROWS > size:
        # The last block's padding outputs (dropped by the callers) repeat its last real
        # output's centre, in either order within (_BAND_ROWS - 1) steps of its lowest.
        centre = tf.concat([centre, tf.fill([blocks * _BAND_ROWS - size], centre[-1])], 0)
    centre = tf.reshape(centre, [blocks, _BAND_ROWS])
    span = tf.minimum(tf.cast(tf.math.ceil((_BAND_ROWS - 1) * step + 2.0 * support), tf.int32)
                      + 2, length)
    # Every pixel a block's filters reach is in [first, first + span) (the block's centres
    # lie within (_BAND_ROWS - 1) steps of its lowest); moved inside the source where it
    # would pass an edge (the weights of the extra pixels are 0).
    first = tf.clip_by_value(tf.cast(tf.floor(tf.reduce_min(centre, 1) - support), tf.int32),
                             0, length - span)
    taps = first[:, None] + tf.range(span)
    weights = tf.nn.relu(1.0 - tf.abs(tf.cast(taps, tf.float32)[:, None, :] + 0.5
                                      - centre[:, :, None]) / support)
    # divide_no_nan: a guard; every output, padding included, has a real centre.
    weights = tf.math.divide_no_nan(weights, tf.reduce_sum(weights, -1, keepdims=True))
    return first, span, taps, weights


def _resample_window_in_bands(region, size, start, extent, mirror=None):
    """One window of _resample_in_bands: float32 (size, size, 3); mirrored left-right
    where the bool scalar `mirror` holds (the column pass's weights in reverse order)."""
    shape = tf.shape(region)
    height, width = shape[0], shape[1]
    # The columns this window's filters reach (plus a pixel), clipped to the region.
    support = tf.maximum(extent[1] / size, 1.0)
    left = tf.clip_by_value(tf.cast(tf.floor(start[1] - support), tf.int32) - 1, 0, width - 1)
    cols = tf.clip_by_value(tf.cast(tf.math.ceil(start[1] + extent[1] + support), tf.int32)
                            + 1, left + 1, width) - left
    window = tf.reshape(tf.slice(region, tf.stack([0, left, 0]), tf.stack([-1, cols, -1])),
                        [height, cols * 3])
    # Rows: (blocks, _BAND_ROWS, span) x (blocks, span, cols * 3), the band of source rows
    # of each block gathered as uint8 (a quarter of a float gather's memory traffic).
    _, _, taps, weights = _band_weights(start[0], extent[0], size, height)
    rows = tf.matmul(weights, tf.cast(tf.gather(window, taps), tf.float32))
    rows = tf.reshape(rows, [-1, cols * 3])[:size]  # (size, cols * 3): pixels, channels
    # Columns: each block's slice of span pixels (x 3 channels) of every row, times its
    # weights with the 3 x 3 identity (weights[b, j, k] * [c == c']), so the products
    # read and write channels innermost, as the pixels lie.
    first, span, _, weights = _band_weights(start[1] - tf.cast(left, tf.float32), extent[1],
                                            size, cols, mirror)
    blocks = -(-size // _BAND_ROWS)
    kron = (tf.transpose(weights, [0, 2, 1])[:, :, None, :, None]
            * tf.eye(3)[None, None, :, None, :])  # (blocks, span, 3, _BAND_ROWS, 3)
    kron = tf.reshape(kron, [blocks, span * 3, _BAND_ROWS * 3])
    pieces = tf.stack([tf.slice(rows, tf.stack([0, first[b] * 3]), tf.stack([size, span * 3]))
                       for b in range(blocks)])  # (blocks, size, span * 3)
    out = tf.matmul(pieces, kron)  # (blocks, size, _BAND_ROWS * 3)
    # Blocks of 48 floats to their place in each row: a transpose of 192-byte runs.
    return tf.reshape(tf.transpose(out, [1, 0, 2]), [size, blocks * _BAND_ROWS, 3])[:, :size]


def _resample_in_bands(region, size, start, extent, flip=None):
    """PIL's bilinear resize (triangle filter widened by the shrink factor, weights
    renormalized at the borders: the convention above) of n windows of one image region.

    region: uint8 (H, W, 3); start, extent: float32 (n, 2), each window's [row, column]
    start and size in pixels of the region, n static; flip: None or (n,) bool, the
    windows to mirror left-right. Returns float32 (n, size, size, 3).

    Window by window (each reads only its own columns), rows first, then columns; both in
    blocks of _BAND_ROWS outputs, one matrix product per block of each pass."""
    return tf.stack([_resample_window_in_bands(region, size, start[i], extent[i],
                                               None if flip is None else flip[i])
                     for i in range(start.shape[0])])


def _crops(shape, read_region, count, size, scale, ratio, seed, flip=None):
    """crops_of_image / crops_of_jpeg: `count` crops of an image of `shape` ([height,
    width, ...]), boxes drawn at its own size and aspect ratio, resampled from the one
    rectangle that holds every window _window_geometry reads (the boxes plus the filter's
    margin): read_region(origin, extent) returns that rectangle, uint8 (rows, cols, 3), for
    its [top, left] origin and [rows, cols] extent. uint8 (count, size, size, 3); count is
    a Python int. flip: None or (count,) bool, the crops to mirror left-right."""
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
                                  tf.maximum(end - start, 1e-3), flip)

    def window_by_window():
        crops = []
        for i in range(count):
            window = tf.slice(region, tf.stack([top[i] - origin[0], left[i] - origin[1], 0]),
                              tf.stack([rows[i], cols[i], -1]))
            crop = _scale_window(window[tf.newaxis], size, [box_scale[0][i], box_scale[1][i]],
                                 [shift[0][i], shift[1][i]])
            if flip is not None:  # No mirrored scale in ScaleAndTranslate: reversed.
                crop = tf.cond(flip[i], lambda c=crop: tf.reverse(c, [1]), lambda c=crop: c)
            crops.append(crop)
        return tf.stack(crops)

    if size < _BANDED_MIN_SIZE:
        crops = window_by_window()
    else:
        crops = tf.cond(extent[0] * extent[1] * count <= _BANDED_MAX_PIXELS, in_bands,
                        window_by_window)
    crops.set_shape([count, size, size, 3])  # The dynamic slices lose the channel count.
    return tf.cast(tf.clip_by_value(tf.round(crops), 0.0, 255.0), tf.uint8)


def crops_of_image(image_uint8, count, size, scale, ratio, seed, flip=None):
    """`count` random resized crops of ONE image of any size: uint8 (H, W, 3) ->
    uint8 (count, size, size, 3).

    Boxes come from the image at its own resolution and aspect ratio (torchvision's
    order: crop, then resize), so nothing is stretched and small crops keep their detail.
    Each window is resampled as PIL's bilinear resize (antialiased when shrunk), from the
    rectangle that holds every window (what crops_of_jpeg decodes), by _crops.
    flip: None, or (count,) bool (e.g. crop_flips(seed, count)): those crops come out
    mirrored left-right, the crop of the same box reversed along the width (at no cost:
    the column weights are taken in mirrored order). The boxes do not depend on it.
    """
    return _crops(tf.shape(image_uint8),
                  lambda origin, extent: tf.slice(image_uint8, tf.concat([origin, [0]], 0),
                                                  tf.concat([extent, [-1]], 0)),
                  count, size, scale, ratio, seed, flip)


def decode_image(contents):
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> uint8 (H, W, 3) (grayscale repeated, alpha
    dropped, the first frame of a GIF)."""
    image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8,
                               expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def crops_of_jpeg(contents, count, size, scale, ratio, seed, flip=None):
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
    touches; tests/test_fused_crop.py bounds it). flip: as crops_of_image."""
    return _crops(tf.image.extract_jpeg_shape(contents),
                  lambda origin, extent: tf.io.decode_and_crop_jpeg(
                      contents, tf.concat([origin, extent], 0), channels=3),
                  count, size, scale, ratio, seed, flip)


def crops_of_encoded(contents, count, size, scale, ratio, seed, flip=None):
    """crops_of_image of an encoded image (scalar string): JPEGs through crops_of_jpeg
    (fused decode and crop, one partial decode per image), other formats (PNG, GIF, BMP,
    WebP) decoded whole, then crops_of_image. uint8 (count, size, size, 3). flip: as
    crops_of_image."""
    return tf.cond(
        tf.io.is_jpeg(contents),
        lambda: crops_of_jpeg(contents, count, size, scale, ratio, seed, flip),
        lambda: crops_of_image(decode_image(contents), count, size, scale, ratio, seed,
                               flip))
