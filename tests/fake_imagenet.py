"""A generated stand-in for `imagenet2012` in TFDS, built in seconds with TFDS's own builder.

The features are imagenet2012's (an "image" stored as JPEG of any size, an int "label",
a "file_name"), the splits "train" (in TRAIN_FILES files) and "validation", so wcl_tf reads
it exactly as it reads ImageNet: variable-size JPEG -> the streamed path (per-host files,
per-epoch file order and shuffle) -> the fused decode-and-crop. wcl_tf keys nothing on the
dataset's name (only on its features), and the builder is not registered in TFDS: wcl_tf
opens it with tfds.builder(NAME, data_dir=...) from the prepared files, as any prepared
dataset, in this process and in subprocesses alike.

Images: sides drawn from 150-500 px (so aspect ratios from 0.3 to 3.3), a smooth colour
field whose hue depends on the class plus a little noise, so classes differ and JPEG
sizes vary.
"""

import os

import numpy as np
import tensorflow_datasets as tfds

NAME = "fake_imagenet2012"
NUM_CLASSES = 4
TRAIN, VALIDATION = 96, 24
TRAIN_FILES = 8
MIN_SIDE, MAX_SIDE = 150, 500
_HUES = np.array([[200, 60, 40], [40, 160, 60], [50, 70, 190], [180, 170, 40]], np.float32)


def _image(rng, label):
    height, width = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, 2))
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    phase = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
    field = 0.5 + 0.5 * np.sin(2 * np.pi * (y * 1.5 + x * 2.0) + phase)
    image = _HUES[label] * (0.5 + 0.5 * field) + rng.normal(0, 8, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


class FakeImagenet2012(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """imagenet2012's features and split names, NUM_CLASSES classes, generated images."""

    VERSION = tfds.core.Version("5.1.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train", TRAIN, seed=0),
                "validation": self._generate_examples("validation", VALIDATION, seed=1)}

    def _generate_examples(self, split, count, seed):
        rng = np.random.default_rng(seed)
        for i in range(count):
            label = i % NUM_CLASSES
            name = f"{split}_{i:05d}.JPEG"
            yield name, {"image": _image(rng, label), "label": label, "file_name": name}


def build(data_dir):
    """Prepares the dataset in data_dir (a few seconds, no network); returns data_dir."""
    builder = FakeImagenet2012(data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=TRAIN_FILES))
    return data_dir


def train_files(data_dir):
    """Paths of the train split's files, in their stored order."""
    folder = os.path.join(data_dir, NAME, str(FakeImagenet2012.VERSION))
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.startswith(f"{NAME}-train.tfrecord-"))
