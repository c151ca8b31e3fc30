"""The photometric augmentation (colour jitter, grayscale, blur, flip) against an
independent NumPy reference: colorsys for the hue rotation, torchvision's meaning for the
blends (brightness blends with black, contrast with the mean of the ITU-R 601 gray image,
saturation with each pixel's gray level, clamp to [0, 1] after each operation, per-image
random order), and Pillow's box passes for the blur (pillow_blur_reference.py).

The draws (factors, order, masks, sigma) are taken from wcl_tf's own draw functions, so
these tests check the formulas of the channel-plane jitter, the hue shift, keras-cv's
grayscale and the blur, in the host form, the static-shape form and under XLA (the
blur alone: test_pillow_blur.py).
"""

import colorsys
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from pillow_blur_reference import pillow_blur
from wcl_tf.data import photometric, recipe, view_assembly

LUMA = np.array([0.299, 0.587, 0.114], np.float64)
KERAS_CV_LUMA = np.array([0.2989, 0.5870, 0.1140], np.float64)


def _images(n, height, width, seed=0):
    """Random colours with some exact 0, 1 and gray pixels (hue undefined)."""
    rng = np.random.default_rng(seed)
    images = rng.random((n, height, width, 3)).astype(np.float32)
    images[:, 0, 0] = 0.0
    images[:, 0, 1] = 1.0
    images[:, 1, 0] = images[:, 1, 0, :1]  # gray
    images[:, 1, 1] = [1.0, 0.0, 0.0]
    images[:, 1, 2] = [0.0, 1.0, 0.5]
    return images


def _hue_reference(image, shift):
    out = np.empty_like(image, np.float64)
    for index in np.ndindex(image.shape[:-1]):
        h, s, v = colorsys.rgb_to_hsv(*image[index].astype(np.float64))
        out[index] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    return out


def _jitter_reference(images, blend_factors, hue_shift, order):
    out = []
    for image, factors, shift, ops in zip(images.astype(np.float64), blend_factors,
                                          hue_shift, order):
        for op in ops:
            gray = (image * LUMA).sum(-1, keepdims=True)
            target = {0: 0.0, 1: gray.mean(), 2: gray}.get(op)
            if op == 3:
                image = _hue_reference(image, shift)
            else:
                image = np.clip(factors[op] * image + (1.0 - factors[op]) * target, 0.0, 1.0)
        out.append(image)
    return np.stack(out) if out else images.astype(np.float64)


def _photometric_reference(images, spec, seed, blur):
    """photometric's recipe with its draws, in NumPy."""
    _, jitter_seed, jitter_p_seed, gray_p_seed, blur_p_seed, sigma_seed, _ = recipe._split(
        seed, 7)
    b = len(images)
    draws = [d.numpy() for d in photometric._jitter_draws(
        b, spec.brightness, spec.contrast, spec.saturation, spec.hue, jitter_seed)]
    out = images.astype(np.float64)
    jitter = photometric._chosen(spec.jitter_prob, jitter_p_seed, b).numpy()
    out[jitter] = _jitter_reference(images[jitter], *[d[jitter] for d in draws])
    gray = photometric._chosen(spec.grayscale_prob, gray_p_seed, b).numpy()
    out[gray] = (out[gray] * KERAS_CV_LUMA).sum(-1, keepdims=True)
    if blur:
        sigma = recipe._uniform([b], sigma_seed, *recipe.BLUR_SIGMA).numpy()
        chosen = photometric._chosen(spec.blur_prob, blur_p_seed, b).numpy()
        for i in np.flatnonzero(chosen):
            out[i] = pillow_blur(out[i], sigma[i])
    # No flip: the crop makes it (view_assembly.view_crop, cropping.crop_flips).
    return np.clip(out, 0.0, 1.0)


@pytest.mark.parametrize("static_shapes", [False, True])
def test_color_jitter_matches_the_numpy_reference(static_shapes):
    images = _images(12, 7, 9)
    seed = tf.constant([5, 9], tf.int64)
    strengths = (0.8, 0.8, 0.8, 0.5)
    draws = [d.numpy() for d in photometric._jitter_draws(12, *strengths, seed)]
    out = photometric.color_jitter(tf.constant(images), *strengths, seed,
                                   static_shapes=static_shapes).numpy()
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out, _jitter_reference(images, *draws), atol=1e-5)


def test_hue_shift_matches_colorsys_and_keeps_gray_pixels():
    images = _images(6, 5, 5, seed=1)
    shift = np.array([-0.5, -0.2, 0.0, 0.1, 0.35, 0.5], np.float32)
    planes = photometric._shift_hue(photometric._planes(tf.constant(images)), tf.constant(shift))
    out = photometric._from_planes(planes).numpy()
    expected = np.stack([_hue_reference(image, s) for image, s in zip(images, shift)])
    np.testing.assert_allclose(out, expected, atol=2e-6)
    np.testing.assert_array_equal(out[:, 1, 0], images[:, 1, 0])  # gray: unchanged


@pytest.mark.parametrize("static_shapes", [False, True])
@pytest.mark.parametrize("blur", [False, True])
def test_photometric_matches_the_numpy_reference(static_shapes, blur):
    images = _images(16, 8, 14, seed=2)  # the blur's two forms: 8 rows <= 12 < 14 columns
    seed = tf.constant([3, 1], tf.int64)
    out = photometric.photometric(tf.constant(images), recipe.STRONG, seed, blur,
                                  static_shapes=static_shapes).numpy()
    expected = _photometric_reference(images, recipe.STRONG, seed, blur)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_photometric_in_tf_data_with_unknown_batch_and_no_image_drawn():
    images = _images(6, 8, 8, seed=4)
    seed = tf.constant([7, 7], tf.int64)
    none = dataclasses.replace(recipe.STRONG, jitter_prob=0.0, grayscale_prob=0.0,
                               blur_prob=0.0)
    for spec in (recipe.STRONG, none):
        for static_shapes in (False, True):
            ds = tf.data.Dataset.from_tensor_slices(images).batch(3).map(
                lambda x, spec=spec, s=static_shapes: photometric.photometric(
                    x, spec, seed, True, static_shapes=s))
            assert ds.element_spec.shape.as_list() in ([None, 8, 8, 3], [3, 8, 8, 3])
            for batch, out in zip((images[:3], images[3:]), ds.as_numpy_iterator()):
                np.testing.assert_allclose(
                    out, _photometric_reference(batch, spec, seed, True), atol=1e-5)


def test_static_jitter_under_xla_matches_the_numpy_reference():
    """Under XLA the stateless draws differ (test_device_augment), so the draws are
    inputs here: the static-shape formulas compile and compute the reference."""
    images = _images(8, 6, 6, seed=5)
    draws = photometric._jitter_draws(8, 0.8, 0.8, 0.8, 0.2, tf.constant([2, 8], tf.int64))
    compiled = tf.function(lambda x, *d: photometric._jitter_with(x, *d, True),
                           jit_compile=True)
    out = compiled(tf.constant(images), *draws).numpy()
    expected = _jitter_reference(images, *[d.numpy() for d in draws])
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_static_batch_size_is_kept():
    """As the previous gather / scatter form: a known batch size stays known, also when
    the seed is traced (a constant seed lets shape inference evaluate the draws)."""
    images = tf.constant(_images(4, 6, 6, seed=6))
    seed = tf.constant([1, 5], tf.int64)
    for static_shapes in (False, True):
        jitter = tf.function(lambda x, sd, s=static_shapes: photometric.color_jitter(
            x, 0.8, 0.8, 0.8, 0.2, sd, static_shapes=s))
        view = tf.function(lambda x, sd, s=static_shapes: photometric.photometric(
            x, recipe.STRONG, sd, True, static_shapes=s))
        for fn in (jitter, view):
            assert fn.get_concrete_function(images, seed).output_shapes == [4, 6, 6, 3]


@pytest.mark.parametrize("static_shapes", [False, True])
def test_views_stay_in_the_unit_range_without_a_final_clip(static_shapes):
    """Only the blurred rows are clipped at the end (photometric's closing comment): every
    other step keeps [0, 1] by itself. Large flat areas of 0 and 1, where a float sum of
    weights above 1 would show, and every draw of many seeds; crops resampled from uint8
    images (ViewAugmenter's crop=True path, clipped where they are made) as well."""
    rng = np.random.default_rng(9)
    images = _images(32, 24, 24, seed=9)
    images[:8] = 1.0
    images[8:16, :12] = 0.0
    images[16:24] = rng.integers(0, 2, (8, 24, 24, 1)).astype(np.float32)
    augmenter = view_assembly.ViewAugmenter(24, blur=True)
    uint8 = tf.constant(np.round(images * 255).astype(np.uint8))
    for k in range(12):
        seed = tf.constant([k, 11], tf.int64)
        for out in (photometric.photometric(tf.constant(images), recipe.STRONG, seed, True,
                                            static_shapes=static_shapes),
                    augmenter(uint8, recipe.STRONG, seed, static_shapes=static_shapes),
                    augmenter(uint8, recipe.STRONG, seed, crop=False,
                              static_shapes=static_shapes)):
            out = out.numpy()
            assert out.min() >= 0.0 and out.max() <= 1.0, (k, out.min(), out.max())
    # Exact 1.0 survives where nothing moved it (all-white images are fixed points of
    # every step but brightness), so the range is reached, not only bounded.
    assert out.max() == 1.0
