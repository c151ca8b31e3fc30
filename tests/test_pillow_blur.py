"""photometric.gaussian_blur is the authors' blur, Pillow's GaussianBlur: against a NumPy
float reference written from Pillow's C source (pillow_blur_reference.py), edges
included; against Pillow itself within the rounding Pillow does after each pass; per image
in a batch of mixed sigmas; with an empty batch, unknown shapes and under XLA."""

import numpy as np
import pytest
import tensorflow as tf

from pillow_blur_reference import pillow_blur
from wcl_tf.data import augment_layers, photometric

# Both sides of l = 0 | 1 (sqrt(2)), the recipe's range ends, one value in between each.
SIGMAS = np.array([0.1, 0.7, 1.3, 1.4142, 1.5, 2.0], np.float32)


def _reference(images, sigma):
    return np.stack([pillow_blur(i, s) for i, s in zip(images, sigma)])


@pytest.mark.parametrize("height, width", [(32, 32), (9, 30), (13, 12)])
def test_gaussian_blur_matches_pillows_passes_edges_included(height, width):
    """Sides above 12 px take the kernel plus the exact border rows, sides up to 12 px the
    whole three-pass matrix; every pixel equals the per-pass edge-repeating reference."""
    images = np.random.default_rng(0).random((len(SIGMAS), height, width, 3), np.float32)
    out = photometric.gaussian_blur(tf.constant(images), tf.constant(SIGMAS)).numpy()
    np.testing.assert_allclose(out, _reference(images, SIGMAS), atol=2e-6)


def test_gaussian_blur_is_pillows_within_its_rounding():
    """Pillow rounds to uint8 after each of its 6 passes (each pass averages, so the
    differences add up to at most 6 x 0.5 grey levels) and weighs in 24-bit fixed point;
    wcl_tf blurs in float. Measured on these images: at most 2.8 levels, mean 0.3-0.5."""
    image_module = pytest.importorskip("PIL.Image")
    image_filter = pytest.importorskip("PIL.ImageFilter")
    images = np.random.default_rng(1).integers(0, 256, (len(SIGMAS), 24, 31, 3), np.uint8)
    out = 255.0 * photometric.gaussian_blur(
        tf.constant(images, tf.float32) / 255.0, tf.constant(SIGMAS)).numpy()
    for image, sigma, ours in zip(images, SIGMAS, out):
        pillow = np.asarray(image_module.fromarray(image).filter(
            image_filter.GaussianBlur(radius=float(sigma))), np.float64)
        assert np.abs(ours - pillow).max() <= 3.0 + 1e-3
        assert abs((ours - pillow).mean()) < 0.1  # rounding, not a bias


def test_mixed_sigmas_blur_each_image_as_alone():
    images = np.random.default_rng(2).random((len(SIGMAS), 20, 17, 3), np.float32)
    batch = photometric.gaussian_blur(tf.constant(images), tf.constant(SIGMAS)).numpy()
    alone = [photometric.gaussian_blur(tf.constant(images[i:i + 1]),
                                       tf.constant(SIGMAS[i:i + 1])).numpy()[0]
             for i in range(len(SIGMAS))]
    np.testing.assert_allclose(batch, np.stack(alone), atol=1e-6)
    np.testing.assert_allclose(batch, _reference(images, SIGMAS), atol=2e-6)


@pytest.mark.parametrize("side", [8, 32])
def test_empty_batch(side):
    out = photometric.gaussian_blur(tf.zeros([0, side, side, 3]), tf.zeros([0]))
    assert out.shape == (0, side, side, 3)


def test_unknown_shapes_and_xla_give_the_same_blur():
    """Traced with unknown batch and sides (a Keras layer's input), and compiled with XLA
    (static shapes, as in a TPU's train step)."""
    images = np.random.default_rng(3).random((len(SIGMAS), 19, 26, 3), np.float32)
    expected = _reference(images, SIGMAS)
    unknown = tf.function(photometric.gaussian_blur, input_signature=[
        tf.TensorSpec([None, None, None, 3]), tf.TensorSpec([None])])
    xla = tf.function(photometric.gaussian_blur, jit_compile=True)
    for blur in (unknown, xla):
        np.testing.assert_allclose(blur(images, SIGMAS).numpy(), expected, atol=2e-6)


def test_kernel_size_follows_sigma_not_the_image():
    assert photometric.blur_kernel_size() == 13  # sigma <= 2: l <= 1, 3 passes of 5 taps
    assert photometric.blur_kernel_size(1.4) == 7  # l = 0
    # A layer saved with torchvision's image-size kernel still loads.
    config = augment_layers.RandomGaussianBlur(seed=1).get_config()
    layer = augment_layers.RandomGaussianBlur.from_config({**config, "kernel_size": 23})
    assert layer.get_config() == config
