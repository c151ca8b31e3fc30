"""The two augmentation recipes of WCL (docs/method.md section 4.1) and the stateless draws
that every augmentation step takes from a seed.

Order of a view: random resized crop and horizontal flip, in one resampling
(wcl_tf.data.cropping) -> colour jitter (p) -> grayscale (p) -> Gaussian blur (p, only with
blur=True; 32-px data has none) (wcl_tf.data.photometric); wcl_tf.data.view_assembly puts
a view together. The authors' SimCLR recipe flips right after the crop, their MoCo v2
recipe last; the flip commutes with the other steps (docs/method.md section 4.1). WEAK versus
STRONG is chosen per batch by selecting the numbers of the recipe (select_spec), so it costs
nothing: no tf.cond, no second view.

Randomness: every draw (crop boxes, jitter factors and order, blur sigma, flips, the
per-image "apply with p" masks) comes from stateless ops keyed by a (2,) seed tensor that
the pipeline derives from cfg.seed and the batch index, so a view depends only on its
images, the recipe and that seed: bit-reproducible under parallel tf.data maps.
"""

import dataclasses

import tensorflow as tf

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


def _chosen(prob, seed, count):
    """(count,) bool, true with probability prob: the per-image draw of every step applied
    with a probability (photometric's, the crop's flip)."""
    return _uniform([count], seed, 0.0, 1.0) < prob
