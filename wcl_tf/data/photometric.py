"""The photometric steps of a view, after its crop, on float (b, S, S, 3) batches in [0, 1]:
torchvision's colour jitter and grayscale and Pillow's Gaussian blur (the authors'), each
applied per image with its probability (photometric() runs them in the recipe's order). The
recipe's horizontal flip is made by the crop (cropping.random_resized_crop's and
crops_of_image's flip): a mirrored resampling costs nothing, flip_left_right below about
1.6 ms per image (two 224-px views, one loaded thread; docs/performance.md, "The horizontal
flip made by the crop").

keras-cv 0.9.0 / Keras 3.15 versus plain TF, measured on this project's shared 2-core CPU
box: batch 64 of 32x32 images inside `tf.data.Dataset.map`, images/s (best of 3-4 repeats;
the box was shared, so +-30%; where two runs differed, both):

    op                       keras-cv / Keras layer        plain TF                     used
    colour jitter (p=0.8)    RandomColorJitter     6,300   color_jitter below    7,100  TF (1)
                             RandomApply(jitter)   3,900   (fixed order:        11,900)
    grayscale (p=0.2)        Grayscale + mask     25,600   rgb_to_grayscale     19,500  keras-cv
                             RandomApply(gray)    23,100
    Gaussian blur (p=0.5)    RandomGaussianBlur   19,300-  per-image depthwise  17,200- TF (2)
                               + mask             27,000     conv + mask        26,200
      224 px, batch 16, k=23 (4)                  520-600                      495-520
    horizontal flip          keras RandomFlip     24,600   tf.where(reverse)    23,000  TF (3)
    (identity map: 157,000-232,000.) The same comparison at 224 px and 32 px with the
    current code: `python tools/benchmark.py ops` (docs/performance.md).

(1) RandomColorJitter is not torchvision's jitter: additive brightness (+-0.8 of the
    range instead of x U(0.2, 1.8)), per-channel contrast mean, saturation sampled
    through x / (1 - x), fixed order. This file's jitter has torchvision's meaning
    and per-image random order at the same speed (fixed order would be ~12,000).
(2) RandomGaussianBlur samples a Gaussian and pads with zeros, so a blurred view has
    a slightly darker frame a few pixels wide, and it draws sigma from its own layer
    generator, which no per-batch seed reaches. gaussian_blur below is the authors'
    blur, Pillow's box passes with their edge repeats, and takes sigma from the
    stateless seed; only ImageNet-sized runs blur.
(3) Same speed within noise; the stateless mask makes views reproducible (--seed). The
    recipe no longer runs it: the crops are mirrored as they are resampled (see above).
(4) Measured with torchvision's blur (sampled Gaussian, reflect padding, 23 taps at
    224 px), which gaussian_blur was before it became Pillow's (13 taps, 1.35-1.39x
    faster for 16 images of 224 px: docs/performance.md, "The authors' blur").
RandomApply runs its layer image by image (tf.map_fn): a per-image mask from the
stateless seed is used instead (apply_with_prob, _on_chosen).
"""

import functools

import keras_cv
import numpy as np
import tensorflow as tf

from wcl_tf.data.recipe import BLUR_SIGMA, _chosen, _split, _uniform

# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


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
    a plain (b, H, W, 3) op 0.22). Unstacking the last axis, not a transpose to
    (3, b, H, W) first: TensorFlow's CPU transpose moves a tensor whose innermost axis is
    3 channels element by element (one thread, batch 32 of 224 px, process CPU time: 9-11
    against 16-22 ms per batch; a product with the 3 x 3 identity 10-27)."""
    return tf.unstack(images, axis=-1)


def _from_planes(planes):
    """[r, g, b] (b, H, W) -> (b, H, W, 3): one stack on the last axis (measured as
    _planes: 28-33 against 61-72 ms per batch for stacking then transposing, 35-39 for
    the product with the identity). Exact copies either way."""
    return tf.stack(planes, axis=-1)


def clip01(x):
    """x clipped to [0, 1]."""
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
    return [v - c * clip01(2.0 - tf.abs(hue - 3.0)),
            v - c * clip01(tf.abs(hue - 2.0) - 1.0),
            v - c * clip01(tf.abs(hue - 4.0) - 1.0)]


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
    return [clip01(factor[:, None, None] * x + target) for x in planes]


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


def _per_image(values):
    """(b,) -> (b, 1, 1, 1), to broadcast against images."""
    return tf.reshape(values, [-1, 1, 1, 1])


def apply_with_prob(prob, seed, augmented, images):
    """Per image: `augmented` with probability prob, else `images`."""
    chosen = _chosen(prob, seed, tf.shape(images)[0])
    return tf.where(_per_image(chosen), augmented, images)


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

    # No row chosen: nothing to compute.
    return tf.cond(tf.reduce_any(chosen), apply, lambda: images)


def flip_left_right(images, flip):
    """Mirrors the images where the (b,) bool `flip` holds: one gather along the width
    (half the time of reversing every image and selecting). Not part of the recipe any
    more (the crop mirrors, view_assembly.view_crop): 25.3 ms of CPU per batch of 32
    views of 224 px on one loaded thread (TensorFlow moves the 3-float slices one by one;
    docs/performance.md); kept for the op table of `python -m wcl_tf.tools.benchmark
    ops`."""
    width = tf.shape(images)[2]
    forward = tf.range(width)
    columns = tf.where(flip[:, None], tf.reverse(forward, [0])[None, :], forward[None, :])
    return tf.gather(images, columns, axis=2, batch_dims=1)


def _box_radius(sigma):
    """Pillow's box radius l + a for a Gaussian of std sigma in 3 passes
    (src/libImaging/BoxBlur.c, _gaussian_blur_radius, after Gwosdek et al. 2011): the
    variance of a pass is sigma^2 / 3, l the integer part of the box radius, a in [0, 1)
    the weight of the two taps at +-(l + 1). Returns (l, a), each shaped as sigma."""
    sigma2 = tf.square(sigma) / 3.0
    length = tf.sqrt(12.0 * sigma2 + 1.0)
    l = tf.floor((length - 1.0) / 2.0)
    a = ((2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2)
         / (6.0 * (sigma2 - tf.square(l + 1.0))))
    return l, a


def _box_half(max_sigma):
    """Half-width l + 1 of the widest pass for sigma <= max_sigma (2 for 2.0)."""
    sigma2 = float(max_sigma) ** 2 / 3.0
    return int(((12.0 * sigma2 + 1.0) ** 0.5 - 1.0) // 2) + 1


def blur_kernel_size(max_sigma=BLUR_SIGMA[1]):
    """Taps of gaussian_blur's kernel per axis (three passes of half-width l + 1): 13 for
    sigma up to 2, whatever the image size."""
    return 6 * _box_half(max_sigma) + 1


def _pass_matrices(sigma, half, n):
    """(b, n, n): one box pass of Pillow's blur on a line of n pixels, edge pixels repeated
    (the clamped indices of ImagingLineBoxBlur), as a matrix per image. Taps: 1 / (2 r + 1)
    for |t| <= l, a / (2 r + 1) at |t| = l + 1 (r = l + a; Pillow's ww and fw in float)."""
    l, a = _box_radius(sigma)
    inner = 1.0 / (2.0 * (l + a) + 1.0)
    far = (1.0 - (2.0 * l + 1.0) * inner) / 2.0
    taps = np.abs(np.arange(-half, half + 1, dtype=np.float32))
    weights = tf.where(taps[None] <= l[:, None], inner[:, None],
                       tf.where(taps[None] == l[:, None] + 1.0, far[:, None], 0.0))
    onehot = np.zeros((2 * half + 1, n, n), np.float32)
    for t in range(-half, half + 1):
        for x in range(n):
            onehot[t + half, x, min(max(x + t, 0), n - 1)] += 1.0
    return tf.einsum("bt,txy->bxy", weights, tf.constant(onehot))


def _blur_axis(stacked, axis, weights, reach):
    """The three passes along `axis` (1 rows, 2 columns) of stacked (1, H, W, C) channels.

    weights: (C, n, n), the three passes on an n-pixel line with per-pass edge repeats;
    reach = 3 (l_max + 1), the composite kernel's half-width. If n is the side (at most
    2 reach + 1 pixels), weights is the whole operator; else (n = 2 reach + 1) its middle
    row is the composite kernel (the interior, one depthwise convolution without padding)
    and its first `reach` rows, over the first 2 reach pixels, the exact border rows (the
    last ones: the same reversed).
    """
    if weights.shape[-1] == stacked.shape[axis]:  # A small side: the whole matrix.
        return tf.einsum("nhwc,cvh->nvwc" if axis == 1 else "nhwc,cvw->nhvc", stacked, weights)
    channels = tf.shape(stacked)[3]
    shape = [2 * reach + 1, 1] if axis == 1 else [1, 2 * reach + 1]
    kernel = tf.reshape(tf.transpose(weights[:, reach]), shape + [channels, 1])
    middle = tf.nn.depthwise_conv2d(stacked, kernel, [1, 1, 1, 1], "VALID")
    border = weights[:, :reach, :2 * reach]
    if axis == 1:
        first = tf.einsum("nhwc,cvh->nvwc", stacked[:, :2 * reach], border)
        last = tf.einsum("nhwc,cvh->nvwc", stacked[:, -2 * reach:], tf.reverse(border, [1, 2]))
    else:
        first = tf.einsum("nhwc,cvw->nhvc", stacked[:, :, :2 * reach], border)
        last = tf.einsum("nhwc,cvw->nhvc", stacked[:, :, -2 * reach:],
                         tf.reverse(border, [1, 2]))
    return tf.concat([first, middle, last], axis)


def gaussian_blur(images, sigma, max_sigma=BLUR_SIGMA[1]):
    """Pillow's GaussianBlur(radius=sigma), the authors' blur (mingkai-zheng/WCL
    data/augmentation.py:8-16), per image: sigma (b,), each at most max_sigma.

    Pillow does not sample a Gaussian: per axis it runs three box passes of radius l + a
    (_box_radius), each repeating the edge pixels. For sigma <= 2, l is 0 or 1, and the
    three passes are one symmetric kernel of 13 taps (7 non-zero for sigma < sqrt(2)),
    whatever the image size (torchvision's GaussianBlur, which this function was before,
    needed 23 taps at 224 px). Edges are Pillow's exactly: the kernel runs on the interior
    without padding, and the 6 rows or columns at each border, which the per-pass edge
    repeats change, are the exact three-pass operator (a 6 x 12 matrix per image) on the
    12 at the border. One edge-repeat pad before the kernel would differ within 2 (l + 1)
    pixels of the border (by up to 0.086 on random images), and cost about as much
    (prototype, 16 images of 224 px, one thread: 30.1-30.5 ms against 30.9-31.8 for the
    exact borders). Sides of at most 13 pixels take the whole three-pass matrix. Floats
    throughout: Pillow rounds to uint8 after each of its six passes (and weighs in 24-bit
    fixed point), so on uint8 images the two differ by at most 3 grey levels, 6 x 0.5
    (tests/test_pillow_blur.py). A side unknown when traced must be at least 12 pixels.

    One separable depthwise convolution for the whole batch: the images are laid side by
    side as the channels of a single image, each with its own kernel.
    """
    b = tf.shape(images)[0]
    # Static sides where known (they choose the form of each axis, see _blur_axis).
    height, width = [images.shape[i] or tf.shape(images)[i] for i in (1, 2)]
    half = _box_half(max_sigma)
    reach = 3 * half
    weights = {}
    for side in (images.shape[1], images.shape[2]):
        # A side unknown when traced takes the kernel-and-borders form (so it must be at
        # least 2 reach pixels).
        n = min(side or 2 * reach + 1, 2 * reach + 1)
        if n not in weights:
            one = _pass_matrices(sigma, half, n)
            weights[n] = tf.repeat(one @ one @ one, 3, axis=0)  # (b * 3, n, n), image-major
    # b * 3, not -1: an empty batch (no image drawn for blur) has no size to infer.
    stacked = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, height, width, b * 3])
    for axis in (1, 2):
        n = min(images.shape[axis] or 2 * reach + 1, 2 * reach + 1)
        stacked = _blur_axis(stacked, axis, weights[n], reach)
    blurred = tf.transpose(tf.reshape(stacked, [height, width, b, 3]), [2, 0, 1, 3])
    blurred.set_shape(images.shape)
    return blurred


def photometric(images, spec, seed, blur=False, grayscale=None, static_shapes=False):
    """Everything of the recipe after the crop and flip, on float (b, S, S, 3) images in
    [0, 1]: colour jitter (p = spec.jitter_prob), grayscale (spec.grayscale_prob),
    Gaussian blur (spec.blur_prob, only when blur is true; sigma ~ U(BLUR_SIGMA)).

    seed: (2,) int tensor; it is split exactly as ViewAugmenter splits a view's seed (the
    first part is the crop's, the seventh the flip's: view_assembly.view_crop draws both),
    so the same crops and seed give the same view whether this runs in tf.data (host) or
    inside train_step (device, wcl_tf.data.augment_layers). The flip commutes with these
    steps (per-pixel colour; the blur's kernel and its edge repeats are symmetric), so flipping
    the crop first gives the views of the former order, flip last.
    grayscale: a callable (b, S, S, 3) -> (b, S, S, 3) that keeps [0, 1]; keras-cv's
    Grayscale by default.
    static_shapes: see color_jitter (for XLA-compiled steps and TPUs).
    Returns float32 (b, S, S, 3) in [0, 1].
    """
    # Seven parts, as before the flip moved to the crop: the same draws as then.
    _, jitter_seed, jitter_p_seed, gray_p_seed, blur_p_seed, sigma_seed, _ = _split(seed, 7)
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
    if blur:
        sigma = _uniform([b], sigma_seed, *BLUR_SIGMA)
        images = _on_chosen(_chosen(spec.blur_prob, blur_p_seed, b), images,
                            lambda x, s: clip01(gaussian_blur(x, s)), (sigma,),
                            static_shapes)
    # Every step above keeps [0, 1] but the blur, whose float sums may pass 1 by a rounding
    # error: its rows alone are clipped (the whole batch was until 2026-12-04: a pass over
    # rows already in range, 0.4 ms of CPU per 224-px view in the host pipeline's profile
    # with malloc, about 0.07 with wcl_tf/__init__.py's pool; one thread).
    # The jitter's blends clip, its hue shift stays in [min, max] of the pixel, the luma
    # weights sum to less than 1; rows no step chose are the input, in [0, 1].
    return images


@functools.lru_cache(maxsize=None)
def grayscale_layer():
    # keras-cv's Grayscale computes torchvision's luma (ITU-R 601) and is as fast as
    # plain TF here (see the table above); float32 whatever the global policy. A matmul of
    # the same weights measured 0.22-0.24 against 0.31-0.32 ms per view on the 20% of
    # images drawn (batch 32 of 224 px, one thread): too little to drop the keras-cv op
    # the project is asked to build its views with.
    return keras_cv.layers.Grayscale(output_channels=3, dtype="float32")
