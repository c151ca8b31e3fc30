"""The photometric half of the augmentation recipe as Keras layers, to run on the device.

With `augment_on="device"` the input pipeline stops after the crops (uint8, decoded and
cropped on the host, 4x fewer bytes to feed than float views) and `WCLModel.train_step`
runs `ViewAugmentation` on each replica's batch: colour jitter (torchvision semantics,
random order per image), grayscale, Gaussian blur, for the two views and the multi-crop
local crops alike (the horizontal flip is made by the host's crops, mirrored as they are
resampled: see view_assembly.view_crop and cropping.crop_flips). It computes exactly what
the host path computes (`view_assembly.cropped_views`, the same functions), only with
seeds drawn on the device:

    seed of a replica's batch = fold_in(fold_in((cfg.seed, _DEVICE_STREAM), step), replica)

step = the optimizer's iteration (restored on resume, so a resumed run continues the
sequence), replica = `replica_id_in_sync_group` (global under MultiWorkerMirrored and TPU
strategies), so `--seed` reproduces a run and two replicas never draw the same views. The
weak (MoCo v2) recipe is used while step // steps_per_epoch < weak_aug_epochs, as on the
host.

The single-op layers (ColorJitter, RandomGrayscale, RandomGaussianBlur,
RandomHorizontalFlip; ViewAugmentation does not use the last) can be used on their own in a
user's model: float images in [0, 1],
applied when training=True, seeded per call from a Keras SeedGenerator (or a (2,) seed
passed to call). keras-cv is used where it computes the same transform (Grayscale); its
RandomColorJitter, RandomGaussianBlur and RandomApply are not torchvision's transforms or
not stateless per image (the reasons are listed at the top of photometric.py).
"""

import dataclasses

import keras
import tensorflow as tf

from wcl_tf.data import photometric, recipe, view_assembly
from wcl_tf.data.pipeline import use_strong_augmentation

# Tag of the device-side augmentation seeds (apart from the host's per-batch seeds).
_DEVICE_STREAM = 0xA06D


def _spec_config(spec):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()}


def _spec_from_config(config):
    return recipe.AugmentSpec(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in config.items()})


def replica_seed(seed, step, replica_id):
    """(2,) int64 stateless seed of one replica's batch at optimizer step `step`."""
    fold = tf.random.experimental.stateless_fold_in
    base = tf.constant([int(seed), _DEVICE_STREAM], tf.int64)
    return fold(fold(base, tf.cast(step, tf.int64)), tf.cast(replica_id, tf.int64))


class _RandomLayer(keras.layers.Layer):
    """Base of the single-op layers: float32 in and out, a seed per call."""

    def __init__(self, probability=1.0, seed=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.probability = float(probability)
        self.seed = seed
        self._seed_generator = keras.random.SeedGenerator(seed)

    def _draw_seed(self, seed):
        if seed is not None:
            return tf.cast(seed, tf.int64)
        drawn = keras.random.randint([2], 0, 2**31 - 1, dtype="int32",
                                     seed=self._seed_generator)
        return tf.cast(drawn, tf.int64)

    def call(self, images, training=True, seed=None):
        if not training:
            return images
        images = tf.cast(images, tf.float32)
        op_seed, prob_seed = tf.unstack(
            tf.random.experimental.stateless_split(self._draw_seed(seed), 2))
        return photometric.apply_with_prob(self.probability, prob_seed,
                                           self._transform(images, op_seed), images)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"probability": self.probability, "seed": self.seed})
        return config


@keras.saving.register_keras_serializable(package="wcl_tf")
class ColorJitter(_RandomLayer):
    """torchvision ColorJitter (per image, random order of the four operations), applied
    with `probability`. Strengths as recipe.AugmentSpec."""

    def __init__(self, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, **kwargs):
        super().__init__(**kwargs)
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.saturation, self.hue = float(saturation), float(hue)

    def _transform(self, images, seed):
        # Static shapes: usable in XLA-compiled models and on TPUs.
        return photometric.color_jitter(images, self.brightness, self.contrast,
                                        self.saturation, self.hue, seed, static_shapes=True)

    def get_config(self):
        config = super().get_config()
        config.update({"brightness": self.brightness, "contrast": self.contrast,
                       "saturation": self.saturation, "hue": self.hue})
        return config


@keras.saving.register_keras_serializable(package="wcl_tf")
class RandomGrayscale(_RandomLayer):
    """torchvision RandomGrayscale (ITU-R 601 luma, 3 channels), keras-cv's Grayscale."""

    def __init__(self, probability=0.2, **kwargs):
        super().__init__(probability=probability, **kwargs)
        self._grayscale = photometric.grayscale_layer()

    def _transform(self, images, seed):
        del seed
        return self._grayscale(images)


@keras.saving.register_keras_serializable(package="wcl_tf")
class RandomGaussianBlur(_RandomLayer):
    """Pillow's GaussianBlur (the authors' blur, photometric.gaussian_blur) with
    sigma ~ U(sigma), per image; its kernel spans 13 pixels for sigma up to 2."""

    def __init__(self, sigma=recipe.BLUR_SIGMA, probability=0.5, **kwargs):
        super().__init__(probability=probability, **kwargs)
        self.sigma = tuple(float(s) for s in sigma)

    def _transform(self, images, seed):
        sigma = tf.random.stateless_uniform([tf.shape(images)[0]], seed, *self.sigma)
        return photometric.gaussian_blur(images, sigma, max_sigma=self.sigma[1])

    def get_config(self):
        config = super().get_config()
        config.update({"sigma": list(self.sigma)})
        return config

    @classmethod
    def from_config(cls, config):
        # Configs saved before the blur became Pillow's have a kernel_size (torchvision's,
        # about 10% of the side); the kernel now follows from sigma alone.
        config = {k: v for k, v in config.items() if k != "kernel_size"}
        return cls(**config)


@keras.saving.register_keras_serializable(package="wcl_tf")
class RandomHorizontalFlip(_RandomLayer):
    """Mirror left-right with `probability`, per image."""

    def __init__(self, probability=0.5, **kwargs):
        super().__init__(probability=probability, **kwargs)

    def _transform(self, images, seed):
        del seed
        return tf.reverse(images, axis=[2])


@keras.saving.register_keras_serializable(package="wcl_tf")
class ViewAugmentation(keras.layers.Layer):
    """The recipe after the crop for a batch of cropped views, inside train_step.

    call(views, step, steps_per_epoch, replica_id=0, static_shapes=False): views
    {"view_1", "view_2": uint8 (b, S, S, 3)[, "local": uint8 (b, M, L, L, 3)]}, the
    crops (already flipped) the input pipeline makes with augment_on="device". Returns
    the same keys as float32 in [0, 1]: what the host path's view_assembly.cropped_views
    returns for the same crops and the seed replica_seed(seed, step, replica_id).
    static_shapes: no data-dependent shapes (an XLA-compiled step, a TPU;
    photometric.color_jitter says what it costs).
    """

    def __init__(self, image_size, local_size=None, blur=False, seed=0, weak_aug_epochs=0,
                 strong_spec=None, weak_spec=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.local_size = None if local_size is None else int(local_size)
        self.blur = bool(blur)
        self.seed = int(seed)
        self.weak_aug_epochs = int(weak_aug_epochs)
        self.strong_spec = strong_spec or recipe.STRONG
        self.weak_spec = weak_spec or recipe.WEAK
        self.built = True  # No weights: nothing to build.

    def call(self, views, step, steps_per_epoch, replica_id=0, static_shapes=False):
        for key, value in views.items():
            if value.dtype != tf.uint8:
                raise ValueError(
                    f"ViewAugmentation expects the uint8 crops of the augment_on='device' "
                    f"input pipeline; {key!r} is {value.dtype.name}. Build the dataset with "
                    f"the same augment_on as the model (wcl_tf.pretrain_dataset(cfg)).")
        strong = use_strong_augmentation(step, steps_per_epoch, self.weak_aug_epochs)
        return view_assembly.cropped_views(
            views, strong, self.image_size, self.local_size, blur=self.blur,
            seed=replica_seed(self.seed, step, replica_id), strong_spec=self.strong_spec,
            weak_spec=self.weak_spec, static_shapes=static_shapes)

    def get_config(self):
        config = super().get_config()
        config.update({"image_size": self.image_size, "local_size": self.local_size,
                       "blur": self.blur, "seed": self.seed,
                       "weak_aug_epochs": self.weak_aug_epochs,
                       "strong_spec": _spec_config(self.strong_spec),
                       "weak_spec": _spec_config(self.weak_spec)})
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("strong_spec", "weak_spec"):
            if isinstance(config.get(key), dict):
                config[key] = _spec_from_config(config[key])
        return cls(**config)
