"""The recipe's horizontal flip is made by the crop (its resampling reads the window's
columns in mirrored order): a mirrored crop is the crop of the same box reversed along
the width, on every resampling path; the batched path flips the images the former
photometric flip drew; the per-image crops flip half the time, from their own seeds."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from wcl_tf.data import cropping, photometric, recipe, view_assembly

RATIO = (3.0 / 4.0, 4.0 / 3.0)
FLIP = [True, False, True, True, False, True]
# Full square crops, no colour: a view is its image, possibly mirrored.
WHOLE = dataclasses.replace(recipe.WEAK, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                            jitter_prob=0.0, grayscale_prob=0.0)


def _mirrored_where(crops, flip):
    flip = np.asarray(flip)[:len(crops), None, None, None]
    return np.where(flip, crops[:, :, ::-1], crops)


@pytest.mark.parametrize("side,size", [
    (16, 16), (16, 20),  # padded crop_and_resize (nothing shrunk): boxes with x1 > x2
    (32, 12),  # dense weight matrices (small images): mirrored column weights
    (80, 24),  # one ScaleAndTranslate per image: the result reversed
])
def test_batched_mirrored_crop_is_the_reversed_crop(side, size):
    images = tf.constant(np.random.default_rng(side + size).uniform(size=(6, side, side, 3)),
                         tf.float32)
    seed = tf.constant([3, side + size], tf.int64)
    plain = cropping.random_resized_crop(images, size, (0.08, 1.0), RATIO, seed).numpy()
    flipped = cropping.random_resized_crop(images, size, (0.08, 1.0), RATIO, seed,
                                           flip=tf.constant(FLIP)).numpy()
    np.testing.assert_allclose(flipped, _mirrored_where(plain, FLIP), atol=1e-5)


@pytest.mark.parametrize("shape,count,size,banded_max", [
    ((300, 400), 3, 136, None),  # bands; 136 is not a multiple of _BAND_ROWS
    ((150, 200), 2, 224, None),  # bands, the whole image enlarged (clamped at the edges)
    ((300, 400), 3, 40, None),  # window by window (crops under _BANDED_MIN_SIZE)
    ((300, 400), 3, 136, 0),  # window by window (regions over _BANDED_MAX_PIXELS)
])
def test_per_image_mirrored_crop_is_the_reversed_crop(shape, count, size, banded_max,
                                                      monkeypatch):
    if banded_max is not None:
        monkeypatch.setattr(cropping, "_BANDED_MAX_PIXELS", banded_max)
    image = tf.constant(np.random.default_rng(size).integers(0, 256, shape + (3,)), tf.uint8)
    seed = tf.constant([5, size], tf.int64)
    flip = tf.constant(FLIP[:count])
    plain = cropping.crops_of_image(image, count, size, (0.08, 1.0), RATIO, seed).numpy()
    flipped = cropping.crops_of_image(image, count, size, (0.08, 1.0), RATIO, seed,
                                      flip=flip).numpy()
    # Exact here; one grey level allowed where a float sum in another order rounds apart.
    diff = np.abs(flipped.astype(int) - _mirrored_where(plain, FLIP).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_encoded_jpeg_crops_mirror_too():
    image = np.random.default_rng(1).integers(0, 256, (120, 160, 3)).astype(np.uint8)
    jpeg = tf.io.encode_jpeg(tf.constant(image))
    seed = tf.constant([7, 1], tf.int64)
    plain = cropping.crops_of_encoded(jpeg, 2, 136, (0.3, 1.0), RATIO, seed).numpy()
    flipped = cropping.crops_of_encoded(jpeg, 2, 136, (0.3, 1.0), RATIO, seed,
                                        flip=tf.constant([True, False])).numpy()
    diff = np.abs(flipped.astype(int) - _mirrored_where(plain, [True, False]).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_batched_flips_are_the_former_photometric_draw():
    """two_views (images already S x S) flips view k of image i where photometric drew
    its flip before it moved to the crop: _chosen(0.5, the seventh part of the view's
    seed)."""
    b, size = 32, 12
    rng = np.random.default_rng(2)
    images = tf.constant(rng.integers(0, 256, (b, size, size, 3)), tf.uint8)
    seed = tf.constant([4, 9], tf.int64)
    views = view_assembly.two_views(images, False, size, seed=seed, weak_spec=WHOLE)
    source = images.numpy() / 255.0
    for view, view_seed in zip(views, recipe._split(seed, 2)):
        view = view.numpy()
        drawn = photometric._chosen(0.5, recipe._split(view_seed, 7)[6], b).numpy()
        same = np.abs(view - source).max(axis=(1, 2, 3)) < 1e-5
        mirrored = np.abs(view - source[:, :, ::-1]).max(axis=(1, 2, 3)) < 1e-5
        np.testing.assert_array_equal(mirrored, drawn)
        np.testing.assert_array_equal(same, ~drawn)


def test_per_image_flips_are_fair_and_independent():
    """crop_flips: p = 0.5 per crop, the crops of one seed drawn independently."""
    flips = np.stack([cropping.crop_flips(tf.constant([6, i], tf.int64), 2).numpy()
                      for i in range(400)])
    tol = 4 * np.sqrt(0.25 / flips.size)
    assert abs(flips.mean() - 0.5) < tol
    assert abs((flips[:, 0] != flips[:, 1]).mean() - 0.5) < 4 * np.sqrt(0.25 / 400)

