"""Fused decode and crop of JPEGs (cropping.crops_of_jpeg / crops_of_encoded): the same crop
windows as the full-decode path (cropping.crops_of_image), only each window decoded.

The windows must be the full-decode path's exactly (same boxes for the same seed); the crops
may differ only by libjpeg's decoding of a cropped region, bounded here (measured: identical
on the shared photos and on the generated JPEGs, baseline and progressive).
"""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from wcl_tf.config import Config
from wcl_tf.data import cropping, folder, pipeline

PHOTOS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                      "photos"))
RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Crop settings of the recipes: global views (224 and multi-crop 0.14-1), local crops.
SETTINGS = [(224, (0.08, 1.0)), (96, (0.14, 1.0)), (32, (0.05, 0.14))]
# Bound of the fused path's difference from the full decode, grey levels.
MEAN_ABS_BOUND = 1.0


def _photo_paths():
    return sorted(glob.glob(os.path.join(PHOTOS, "train", "*", "*.jpg")))


def _generated_image(height=333, width=517):
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([127 + 100 * np.sin(x / 23.0), 127 + 100 * np.cos(y / 17.0),
                       (x + y) % 256], axis=-1)
    noisy = smooth + rng.normal(0.0, 12.0, smooth.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _generated_jpegs():
    image = tf.constant(_generated_image())
    return {"baseline": tf.io.encode_jpeg(image, quality=85),
            "progressive": tf.io.encode_jpeg(image, quality=90, progressive=True),
            "grayscale": tf.io.encode_jpeg(tf.image.rgb_to_grayscale(image), quality=80)}


def _assert_same_windows(contents, seed, size, scale):
    """The boxes drawn from the JPEG header equal those drawn from the decoded image, and
    so do the integer pixel windows read for them."""
    decoded = folder.decode(contents)
    header = tf.image.extract_jpeg_shape(contents)
    np.testing.assert_array_equal(header.numpy()[:2], tf.shape(decoded).numpy()[:2])
    full_shape = tf.shape(decoded)
    boxes_full = cropping.crop_boxes(4, scale, RATIO, seed, image_aspect=tf.cast(
        full_shape[1], tf.float32) / tf.cast(full_shape[0], tf.float32))
    boxes_header = cropping.crop_boxes(4, scale, RATIO, seed, image_aspect=tf.cast(
        header[1], tf.float32) / tf.cast(header[0], tf.float32))
    np.testing.assert_array_equal(boxes_full.numpy(), boxes_header.numpy())
    # _window_geometry is private: the fused decode must cut the very window the full
    # decode resamples, and only the geometry function says which that is.
    for box in boxes_full:
        full = cropping._window_geometry(box, size, full_shape[0], full_shape[1])
        fused = cropping._window_geometry(box, size, header[0], header[1])
        np.testing.assert_array_equal(np.array(full[0]), np.array(fused[0]))
        window = np.array(full[0])
        assert (window[:2] >= 0).all() and window[2] > 0 and window[3] > 0
        assert window[0] + window[2] <= full_shape[0] and window[1] + window[3] <= full_shape[1]


def _compare(contents, seed, size, scale):
    expected = cropping.crops_of_image(folder.decode(contents), 4, size, scale, RATIO, seed)
    fused = cropping.crops_of_encoded(contents, 4, size, scale, RATIO, seed)
    assert fused.dtype == tf.uint8 and fused.shape == expected.shape == (4, size, size, 3)
    diff = np.abs(fused.numpy().astype(int) - expected.numpy().astype(int))
    assert diff.mean() < MEAN_ABS_BOUND, (diff.mean(), diff.max())
    return diff


@pytest.mark.parametrize("size,scale", SETTINGS)
def test_real_jpeg_same_windows_and_crops(size, scale):
    paths = _photo_paths()
    if not paths:
        pytest.skip(f"needs real photos in {PHOTOS}: camera JPEGs' encodings "
                    "(test_generated_jpeg_same_windows_and_crops covers generated ones)")
    for i, path in enumerate(paths[::47]):  # a few sizes and orientations
        contents = tf.io.read_file(path)
        seed = tf.constant([i, 11], tf.int64)
        _assert_same_windows(contents, seed, size, scale)
        _compare(contents, seed, size, scale)


@pytest.mark.parametrize("kind", ["baseline", "progressive", "grayscale"])
@pytest.mark.parametrize("size,scale", SETTINGS)
def test_generated_jpeg_same_windows_and_crops(kind, size, scale):
    contents = _generated_jpegs()[kind]
    for i in range(3):
        seed = tf.constant([i, 5], tf.int64)
        _assert_same_windows(contents, seed, size, scale)
        _compare(contents, seed, size, scale)


def test_png_falls_back_to_full_decode_identically():
    contents = tf.io.encode_png(tf.constant(_generated_image(201, 299)))
    assert not tf.io.is_jpeg(contents)
    seed = tf.constant([4, 2], tf.int64)
    expected = cropping.crops_of_image(folder.decode(contents), 3, 64, (0.08, 1.0), RATIO, seed)
    np.testing.assert_array_equal(
        cropping.crops_of_encoded(contents, 3, 64, (0.08, 1.0), RATIO, seed).numpy(),
        expected.numpy())


def test_whole_image_crop_equals_full_decode():
    """The fallback box (a centre crop) and a crop at the image's own size."""
    contents = _generated_jpegs()["baseline"]
    seed = tf.constant([0, 0], tf.int64)
    # Scale (1, 1) at ratio 1 never fits a non-square image: the fallback is used.
    diff = np.abs(
        cropping.crops_of_encoded(contents, 1, 128, (1.0, 1.0), (1.0, 1.0), seed).numpy()
        .astype(int) - cropping.crops_of_image(folder.decode(contents), 1, 128, (1.0, 1.0),
                                               (1.0, 1.0), seed).numpy().astype(int))
    assert diff.mean() < MEAN_ABS_BOUND


def _jpeg_folder(root, fmt="JPEG"):
    rng = np.random.default_rng(0)
    sizes = [(120, 90), (90, 120), (100, 100), (150, 100)]
    for c in range(3):
        os.makedirs(os.path.join(root, f"class_{c}"))
        for k in range(8):
            w, h = sizes[(c + k) % len(sizes)]
            pixels = rng.integers(0, 256, (h // 10, w // 10, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).resize((w, h), Image.BICUBIC)
            ext = "jpg" if fmt == "JPEG" else "png"
            image.save(os.path.join(root, f"class_{c}", f"{k}.{ext}"), fmt)
    return f"folder:{root}"


def _views(cfg, count=3):
    ds = pipeline.make_pretrain_dataset(cfg, 4)
    return [{k: v.numpy() for k, v in batch.items()} for batch in ds.take(count)]


# local=2 in the slow tier (CI's 20 minutes); in the default tier local=0 here, and local
# crops cut from full-resolution originals in test_full_resolution_crops.
@pytest.mark.parametrize("local", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_pipeline_on_jpeg_folder(tmp_path, monkeypatch, local):
    """Same shapes and dtypes as before, deterministic for a seed, and the views equal
    (within the decoding bound) those of the full-decode path."""
    dataset = _jpeg_folder(str(tmp_path / "jpegs"))
    cfg = Config(dataset=dataset, image_size=48, global_batch_size=4, weak_aug_epochs=1,
                 num_local_crops=local, local_crop_size=16, seed=3)
    first, second = _views(cfg), _views(cfg)
    for a, b in zip(first, second):
        assert sorted(a) == sorted(b) == sorted(["view_1", "view_2"] + (["local"] if local
                                                                        else []))
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        assert a["view_1"].shape == a["view_2"].shape == (4, 48, 48, 3)
        assert a["view_1"].dtype == np.float32
        if local:
            assert a["local"].shape == (4, local, 16, 16, 3) and a["local"].dtype == np.float32
        assert 0.0 <= a["view_1"].min() and a["view_1"].max() <= 1.0

    def full_decode(contents, count, size, scale, ratio, seed, flip=None):
        return cropping.crops_of_image(folder.decode(contents), count, size, scale, ratio, seed,
                                       flip)

    monkeypatch.setattr(cropping, "crops_of_encoded", full_decode)
    reference = _views(cfg)
    for a, b in zip(first, reference):
        for key in a:
            assert np.abs(a[key] - b[key]).mean() * 255.0 < MEAN_ABS_BOUND, key


def test_pipeline_on_png_folder_is_unchanged(tmp_path, monkeypatch):
    """PNG files take the full decode: exactly the views of crops_of_image."""
    dataset = _jpeg_folder(str(tmp_path / "pngs"), fmt="PNG")
    cfg = Config(dataset=dataset, image_size=32, global_batch_size=4, weak_aug_epochs=0,
                 seed=1)
    fused = _views(cfg, 2)

    def full_decode(contents, count, size, scale, ratio, seed, flip=None):
        return cropping.crops_of_image(folder.decode(contents), count, size, scale, ratio, seed,
                                       flip)

    monkeypatch.setattr(cropping, "crops_of_encoded", full_decode)
    for a, b in zip(fused, _views(cfg, 2)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_r50_shaped_input_on_two_replicas(fake_imagenet, two_replica_strategy, monkeypatch):
    """The r50 multi-crop input as on ImageNet: variable-size JPEGs streamed from the
    stand-in's TFDS files, decoded crop by crop (crops_of_encoded on the undecoded bytes),
    2 global views of 224 px and 6 local crops of 96 px per image, uint8 for the device
    augmentation, two replicas fed different images."""
    import fake_imagenet as stand_in  # pylint: disable=import-outside-toplevel

    encoded = []
    original = cropping.crops_of_encoded

    def spy(contents, *args, **kwargs):
        encoded.append(contents.dtype)
        return original(contents, *args, **kwargs)

    monkeypatch.setattr(cropping, "crops_of_encoded", spy)
    cfg = Config(dataset=stand_in.NAME, data_dir=fake_imagenet, image_size=224,
                 num_local_crops=6, local_crop_size=96, local_crop_scale=(0.05, 0.14),
                 global_crop_scale=(0.14, 1.0), knn_crops=4, global_batch_size=4,
                 augment_on="device", blur=True, seed=1).validate()
    assert pipeline._training_source(cfg)[0] == "stream"
    dist, steps = pipeline.distribute_pretrain_dataset(two_replica_strategy, cfg)
    assert steps == stand_in.TRAIN // 4
    batch = next(iter(dist))
    assert encoded and set(encoded) == {tf.string}  # the fused decode-and-crop path
    local = two_replica_strategy.experimental_local_results
    views = [v.numpy() for v in local(batch["view_1"])]
    crops = [v.numpy() for v in local(batch["local"])]
    assert [v.shape for v in views] == [(2, 224, 224, 3)] * 2
    assert [c.shape for c in crops] == [(2, 6, 96, 96, 3)] * 2
    assert all(v.dtype == np.uint8 for v in views + crops)
    assert not np.array_equal(views[0], views[1])
