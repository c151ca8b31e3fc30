"""Crops are resampled like torchvision's RandomResizedCrop on PIL images: PIL's bilinear
resize of the window, antialiased when the window is shrunk (tf.image.crop_and_resize,
used before, is not: fine detail aliased into strong moire in shrunk crops)."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from wcl_tf.data import cropping, recipe

PHOTOS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "photos")
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _seed(i):
    return tf.constant([11, i], tf.int64)


def _stripes(side=448, period=2.6):
    """Vertical stripes of period ~2.6 px, std ~90 grey levels, uint8 (side, side, 3)."""
    x = np.arange(side) + 0.5
    row = 127.5 + 127.0 * np.sin(2 * np.pi * x / period)
    image = np.broadcast_to(row[None, :, None], (side, side, 3))
    return np.round(image).astype(np.uint8)


def _pil_crop(image, box, size):
    """PIL's bilinear resize of the window box = [top, left, bottom, right] (fractions)."""
    top, left, bottom, right = box
    height, width = image.shape[:2]
    resized = Image.fromarray(image).resize(
        (size, size), Image.BILINEAR,
        box=(left * width, top * height, right * width, bottom * height))
    return np.asarray(resized).astype(np.float32)


def _old_crops(image, boxes, size):
    """What the crops were before: tf.image.crop_and_resize, no antialiasing."""
    images = tf.constant(image, tf.float32)[tf.newaxis]
    return tf.image.crop_and_resize(images, boxes, tf.zeros([len(boxes)], tf.int32),
                                    [size, size]).numpy()


def _batched(image, count, size, scale, seed):
    """random_resized_crop on `count` copies of image (uint8) -> 0-255 floats."""
    images = tf.constant(np.repeat(image[None], count, 0), tf.float32) / 255.0
    return cropping.random_resized_crop(images, size, scale, RATIO, seed).numpy() * 255.0


def _photo(index=0):
    files = sorted(glob.glob(os.path.join(PHOTOS, "train", "*", "*.jpg")))
    if not files:
        pytest.skip(f"needs real photos in {PHOTOS}: PIL agreement on natural images "
                    "(the generated-image tests here cover the same code)")
    return np.asarray(Image.open(files[index % len(files)]).convert("RGB"))


def test_shrunk_stripes_are_antialiased_like_pil():
    image = _stripes()
    assert abs(image.std() - 90) < 2
    whole = [0.0, 0.0, 1.0, 1.0]
    pil_std = _pil_crop(image, whole, 224).std()
    assert pil_std < 10  # PIL all but removes the stripes (the old crops kept std ~59)
    ours = cropping.crops_of_image(tf.constant(image), 1, 224, (1.0, 1.0), (1.0, 1.0),
                                   _seed(0)).numpy().astype(np.float32)
    np.testing.assert_allclose(cropping.crop_boxes(1, (1.0, 1.0), (1.0, 1.0), _seed(0)), [whole])
    assert abs(ours.std() - pil_std) < 0.2 * pil_std
    batched = _batched(image, 2, 224, (1.0, 1.0), _seed(0))
    assert abs(batched.std() - pil_std) < 0.2 * pil_std
    assert np.abs(ours - _pil_crop(image, whole, 224)).max() <= 1.0
    assert np.abs(batched - _pil_crop(image, whole, 224)).max() <= 1.0


@pytest.mark.parametrize("size", [96, 150])
def test_shrunk_random_windows_match_pil(size):
    """Random windows (a quarter of the area) of the stripes, shrunk to size: every crop
    is PIL's resize of the same window, up to PIL's uint8 rounding."""
    image = _stripes()
    scale = (0.25, 0.25)
    boxes = cropping.crop_boxes(4, scale, RATIO, _seed(1)).numpy()
    reference = np.stack([_pil_crop(image, box, size) for box in boxes])
    ours = cropping.crops_of_image(tf.constant(image), 4, size, scale, RATIO,
                                   _seed(1)).numpy().astype(np.float32)
    batched = _batched(image, 4, size, scale, _seed(1))
    for crops in (ours, batched):
        assert np.abs(crops - reference).max() <= 1.5
        np.testing.assert_allclose(crops.std(axis=(1, 2, 3)), reference.std(axis=(1, 2, 3)),
                                   rtol=0.2)
    old = _old_crops(image, boxes, size)
    assert old.std() > 1.5 * reference.std()  # what antialiasing removes


def test_photo_crops_match_pil():
    image = _photo()
    height, width = image.shape[:2]
    for size, scale in ((64, (0.08, 1.0)), (224, (0.08, 1.0)), (96, (0.05, 0.14))):
        boxes = cropping.crop_boxes(6, scale, RATIO, _seed(2),
                                    image_aspect=width / height).numpy()
        reference = np.stack([_pil_crop(image, box, size) for box in boxes])
        ours = cropping.crops_of_image(tf.constant(image), 6, size, scale, RATIO,
                                       _seed(2)).numpy().astype(np.float32)
        assert np.abs(ours - reference).mean() < 0.6, size
        assert np.abs(ours - reference).max() <= 2.0, size
        if size == 64:  # mostly shrunk windows: the old crops were further from PIL
            old = _old_crops(image, boxes, size)
            assert np.abs(old - reference).mean() > 2 * np.abs(ours - reference).mean()


def test_batched_local_crops_of_a_photo_match_pil():
    """Multi-crop local crops of S x S images (96 px from 224 px) are shrunk too."""
    image = np.asarray(Image.fromarray(_photo(40)).resize((224, 224), Image.BILINEAR))
    scale = (0.05, 0.4)
    boxes = cropping.crop_boxes(8, scale, RATIO, _seed(3)).numpy()
    reference = np.stack([_pil_crop(image, box, 96) for box in boxes])
    batched = _batched(image, 8, 96, scale, _seed(3))
    assert np.abs(batched - reference).mean() < 0.6
    assert np.abs(batched - reference).max() <= 2.0


def test_same_seed_same_crops():
    image = _stripes(120)
    for path in ("one image", "batched"):
        if path == "one image":
            def crops(seed):
                return cropping.crops_of_image(tf.constant(image), 5, 48, (0.08, 1.0), RATIO,
                                               seed).numpy()
        else:
            def crops(seed):
                return _batched(image, 5, 48, (0.08, 1.0), seed)
        first, again, other = crops(_seed(4)), crops(_seed(4)), crops(_seed(5))
        np.testing.assert_array_equal(first, again)
        assert not np.array_equal(first, other)


def test_crops_inside_tf_data_are_static_and_deterministic():
    image = tf.constant(_stripes(64))
    ds = tf.data.Dataset.range(4).map(
        lambda i: cropping.crops_of_image(image, 2, 24, (0.08, 1.0), RATIO,
                                          tf.stack([tf.constant(3, tf.int64), i])),
        num_parallel_calls=2)
    assert ds.element_spec.shape == (2, 24, 24, 3)
    batched = tf.data.Dataset.from_tensors(tf.cast(tf.stack([image] * 3), tf.float32)).map(
        lambda x: cropping.random_resized_crop(x, 16, (0.05, 0.14), RATIO, _seed(6)))
    assert batched.element_spec.shape == (3, 16, 16, 3)
    first, again = list(ds.as_numpy_iterator()), list(ds.as_numpy_iterator())
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_upscaled_crops_stay_close_to_the_old_bilinear_ones():
    """32-px crops of 32-px images are enlarged (never shrunk): plain bilinear as before,
    only sampled at PIL's pixel centres instead of crop_and_resize's corner-aligned grid
    (a shift of under half a source pixel)."""
    photo = Image.fromarray(_photo(100)) if os.path.isdir(PHOTOS) else None
    if photo is not None:
        image = np.asarray(photo.resize((32, 32), Image.BILINEAR, reducing_gap=None))
    else:  # a smooth synthetic image
        y, x = np.mgrid[0:32, 0:32] / 31.0
        image = np.round(255 * np.stack([x, y, (x + y) / 2], -1)).astype(np.uint8)
    images = tf.constant(np.repeat(image[None], 64, 0), tf.float32) / 255.0
    scale = recipe.STRONG.crop_scale
    boxes = cropping.crop_boxes(64, scale, RATIO, _seed(7))
    new = cropping.random_resized_crop(images, 32, scale, RATIO, _seed(7)).numpy()
    old = tf.image.crop_and_resize(images, boxes, tf.range(64), [32, 32]).numpy()
    assert np.abs(new - old).mean() < 0.03  # in [0, 1] units
    # The whole image at its own size is still the identity.
    same = cropping.random_resized_crop(images[:2], 32, (1.0, 1.0), (1.0, 1.0), _seed(8))
    np.testing.assert_allclose(same.numpy(), images[:2].numpy(), atol=1e-5)
    # And it is exactly PIL's bilinear (up to PIL's rounding) on every window.
    reference = np.stack([_pil_crop(image, box, 32) for box in boxes.numpy()])
    assert np.abs(new * 255.0 - reference).max() <= 1.0


def test_upscaled_full_resolution_crop_is_close_to_the_old_one():
    """A small window of a photo enlarged to 224 px (crops_of_image)."""
    image = _photo(7)
    height, width = image.shape[:2]
    scale = (0.08, 0.1)  # windows of ~100-150 px, enlarged
    boxes = cropping.crop_boxes(3, scale, RATIO, _seed(9), image_aspect=width / height)
    new = cropping.crops_of_image(tf.constant(image), 3, 224, scale, RATIO,
                                  _seed(9)).numpy().astype(np.float32)
    old = _old_crops(image, boxes, 224)
    assert np.abs(new - old).mean() < 3.0  # grey levels


@pytest.mark.parametrize("side,size", [(32, 16), (32, 32), (32, 48), (80, 80), (80, 96),
                                       (80, 40)])
def test_every_batched_path_is_pil_bilinear(side, size):
    """random_resized_crop has three implementations (padded crop_and_resize when nothing
    can be shrunk, else dense weights up to 64 px, else one ScaleAndTranslate per image):
    all are PIL's resize of the window."""
    image = np.random.default_rng(side + size).integers(0, 256, (side, side, 3))
    image = image.astype(np.uint8)
    boxes = cropping.crop_boxes(6, (0.08, 1.0), RATIO, _seed(10)).numpy()
    reference = np.stack([_pil_crop(image, box, size) for box in boxes])
    batched = _batched(image, 6, size, (0.08, 1.0), _seed(10))
    assert batched.shape == (6, size, size, 3)
    assert np.abs(batched - reference).max() <= 1.0


@pytest.mark.parametrize("shape,count,size,scale", [
    ((1500, 1900), 2, 224, (0.6, 1.0)),  # shrunk up to ~8x: wide filters, long bands
    ((600, 800), 6, 128, (0.05, 0.14)),  # several small crops scattered over the image
    ((300, 400), 3, 136, (0.01, 0.02)),  # enlarged; 136 is not a multiple of the block
    ((37, 53), 4, 130, (0.08, 1.0)),  # a region smaller than a band
    ((150, 200), 2, 224, (1.0, 1.0)),  # the whole image enlarged: bands clamped at 4 edges
])
def test_banded_and_window_by_window_crops_are_pil_bilinear(shape, count, size, scale,
                                                            monkeypatch):
    """crops_of_image resamples all of an image's windows at once in bands of rows
    (_resample_in_bands), or, for regions over _BANDED_MAX_PIXELS x crops and crops under
    _BANDED_MIN_SIZE, window by window with ScaleAndTranslate: both are PIL's resize of
    every window (noise, the worst case for rounding), and they agree to one grey level."""
    height, width = shape
    image = np.random.default_rng(height).integers(0, 256, (height, width, 3)).astype(np.uint8)
    seed = _seed(height)
    boxes = cropping.crop_boxes(count, scale, RATIO, seed, image_aspect=width / height).numpy()
    reference = np.stack([_pil_crop(image, box, size) for box in boxes])
    banded = cropping.crops_of_image(tf.constant(image), count, size, scale, RATIO, seed)
    monkeypatch.setattr(cropping, "_BANDED_MAX_PIXELS", 0)
    window_by_window = cropping.crops_of_image(tf.constant(image), count, size, scale, RATIO,
                                               seed)
    banded, window_by_window = (c.numpy().astype(np.float32) for c in (banded, window_by_window))
    assert banded.shape == (count, size, size, 3)
    assert np.abs(banded - window_by_window).max() <= 1.0
    for crops in (banded, window_by_window):
        assert np.abs(crops - reference).max() <= 1.5
        assert np.abs(crops - reference).mean() < 0.6
