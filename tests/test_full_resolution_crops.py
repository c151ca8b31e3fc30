"""Images of other sizes than S x S are cropped at their own resolution and aspect ratio
(torchvision's RandomResizedCrop order), never from a copy squashed to S x S."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from wcl_tf.config import Config
from wcl_tf.data import cropping, pipeline


def _seed(i):
    return tf.constant([7, i], tf.int64)


@pytest.mark.parametrize("image_aspect", [1.0, 3.0, 0.5])
def test_crop_boxes_have_the_asked_pixel_aspect_and_area(image_aspect):
    height_px = 60.0
    width_px = height_px * image_aspect
    boxes = cropping.crop_boxes(500, (0.1, 0.3), (1.0, 1.0), _seed(0),
                                image_aspect=image_aspect).numpy()
    top, left, bottom, right = boxes.T
    h, w = (bottom - top) * height_px, (right - left) * width_px
    np.testing.assert_allclose(w / h, 1.0, rtol=1e-4)  # square crops in pixels
    area = (bottom - top) * (right - left)
    assert area.min() >= 0.1 - 1e-5 and area.max() <= 0.3 + 1e-5
    assert boxes.min() >= 0.0 and boxes.max() <= 1.0 + 1e-6


def test_crop_of_a_wide_image_is_not_stretched():
    """A 30x90 image whose left third is black and the rest white. A square crop of the
    full height can only be a third of the width; a squashed copy would mix both."""
    image = np.full((30, 90, 3), 255, np.uint8)
    image[:, :30] = 0
    crops = cropping.crops_of_image(tf.constant(image), 200, 16, (1 / 3, 1 / 3), (1.0, 1.0),
                                    _seed(1)).numpy()
    assert crops.shape == (200, 16, 16, 3) and crops.dtype == np.uint8
    # Every crop is a full-height 30x30 window: its black fraction is (30 - left) / 30.
    boxes = cropping.crop_boxes(200, (1 / 3, 1 / 3), (1.0, 1.0), _seed(1),
                                image_aspect=3.0).numpy()
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], 1.0, atol=1e-5)
    black = (crops[..., 0] < 128).mean(axis=(1, 2))
    expected = np.clip((30 - boxes[:, 1] * 90) / 30, 0, 1)
    np.testing.assert_allclose(black, expected, atol=0.1)


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    os.makedirs(root)
    for i, (h, w) in enumerate([(20, 60), (50, 30), (33, 33), (8, 100)] * 4):
        buffer = io.BytesIO()
        Image.fromarray((rng.uniform(size=(h, w, 3)) * 255).astype(np.uint8)).save(
            buffer, format="PNG")
        (root / f"{i:02d}.png").write_bytes(buffer.getvalue())
    return f"folder:{root}"


@pytest.mark.parametrize("local_crops", [0, 3])
def test_pipeline_on_images_of_mixed_sizes(tmp_path, local_crops):
    cfg = Config(dataset=_folder(tmp_path), image_size=24, global_batch_size=8,
                 num_local_crops=local_crops, local_crop_size=12, knn_crops=min(2, local_crops),
                 seed=5)
    batch = next(iter(pipeline.make_pretrain_dataset(cfg, 8)))
    assert batch["view_1"].shape == (8, 24, 24, 3) and batch["view_2"].shape == (8, 24, 24, 3)
    if local_crops:
        assert batch["local"].shape == (8, 3, 12, 12, 3)
    for view in batch.values():
        assert view.dtype == tf.float32 and 0.0 <= float(tf.reduce_min(view))
        assert float(tf.reduce_max(view)) <= 1.0
    assert not np.array_equal(batch["view_1"], batch["view_2"])
    again = next(iter(pipeline.make_pretrain_dataset(cfg, 8)))
    assert all(np.array_equal(batch[k], again[k]) for k in batch)  # same seed, same views
    other = next(iter(pipeline.make_pretrain_dataset(cfg.replace(seed=6), 8)))
    assert not np.array_equal(batch["view_1"], other["view_1"])
