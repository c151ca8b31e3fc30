"""RandomResizedCrop's fallback, when none of the 10 candidate boxes fits: torchvision's
centre crop clamped to the aspect-ratio range (issue #19: wcl_tf stretched the whole image).

The reference below is written from torchvision's documented behaviour
(transforms.RandomResizedCrop.get_params, "Fallback to central crop"), in pixels with its
rounding; wcl_tf's boxes are continuous, so they agree to within a pixel. A second test
checks the reference against torchvision itself where it is installed (e.g. run pytest
with a Python that has torchvision).
"""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from wcl_tf.data import cropping

RATIO = (3.0 / 4.0, 4.0 / 3.0)
# (height, width): wider than 4:3, narrower than 3:4, inside the range, near its edges.
SHAPES = [(12, 120), (120, 12), (50, 60), (37, 300), (300, 37), (90, 121), (121, 90)]


def torchvision_fallback(height, width, ratio):
    """(top, left, h, w) in pixels of torchvision's fallback crop."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _fallback_boxes(height, width, ratio, count=4, seed=(3, 1)):
    # Scale (1, 1): a candidate fits only at the image's own aspect ratio, which a
    # continuous draw never hits, so every image falls back.
    boxes = cropping.crop_boxes(count, (1.0, 1.0), ratio, tf.constant(seed, tf.int64),
                                image_aspect=width / height).numpy()
    top, left, bottom, right = boxes.T
    return np.stack([top * height, left * width, (bottom - top) * height,
                     (right - left) * width], axis=1)


@pytest.mark.parametrize("height,width", SHAPES)
def test_fallback_is_torchvisions_centre_crop(height, width):
    got = _fallback_boxes(height, width, RATIO)
    want = np.array(torchvision_fallback(height, width, RATIO), np.float64)
    # Every image takes the same (centred, not random) box; torchvision rounds the size
    # and floors the offset, wcl_tf keeps fractions: within one pixel.
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=1.0)
    np.testing.assert_allclose(got, np.broadcast_to(got[0], got.shape), atol=1e-4)


def test_fallback_crop_reads_the_centre_of_a_wide_image():
    """Through crops_of_image: a 20 x 200 image, black except a white centre band 40
    px wide; the fallback (20 x 26.7 px, centred) sees white only, the old stretched whole
    image mostly black."""
    image = np.zeros((20, 200, 3), np.uint8)
    image[:, 80:120] = 255
    crops = cropping.crops_of_image(tf.constant(image), 3, 16, (1.0, 1.0), RATIO,
                                    tf.constant([5, 0], tf.int64)).numpy()
    assert crops.min() == 255


# Outside the ratio range no candidate can fit (with any rounding), so torchvision's
# get_params returns its fallback whatever its random draws.
OUTSIDE = [(12, 120), (120, 12), (37, 300), (300, 37), (20, 31), (31, 20)]


_TORCHVISION = """
import json, sys, torch
from torchvision import transforms
torch.manual_seed(0)
out = [transforms.RandomResizedCrop.get_params(torch.zeros(3, h, w), [1.0, 1.0], %r)
       for h, w in %r]
print(json.dumps(out))
"""


def test_torchvision_itself_agrees():
    """torchvision's get_params on the shapes where its tries cannot fit, in a process of
    its own (torch imported next to TensorFlow crashes in this environment); skips
    without torchvision."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision not installed")
    out = subprocess.run([sys.executable, "-c", _TORCHVISION % (list(RATIO), OUTSIDE)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for (height, width), got in zip(OUTSIDE, json.loads(out.stdout.splitlines()[-1])):
        assert tuple(got) == torchvision_fallback(height, width, RATIO)
        ours = _fallback_boxes(height, width, RATIO)[0]
        np.testing.assert_allclose(ours, np.array(got, np.float64), atol=1.0)
