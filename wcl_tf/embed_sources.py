"""The images an embedding reads: a folder of image files or a TFDS split.

`ImageFolder(root)` and `TfdsSplit(dataset, split)` list their images in a fixed order and
give them, a range at a time, as tf.data of ((index, label), uint8 image); each names its
rows (path or "<split>/<index>", class) and hashes its listing, so that wcl_tf.embedding
can write them into shards and resume a killed run.
"""

import hashlib
import os

import tensorflow as tf

from wcl_tf.data import folder, sources
from wcl_tf.embed_errors import EmbedError


class ImageFolder:
    """Every image file below `root` (recursively), with its class folder when `root`
    holds only subfolders (wcl_tf.data.folder's rule); or the one image file `root`."""

    def __init__(self, root):
        self.root = os.path.abspath(os.path.expanduser(root))
        if os.path.isfile(self.root):  # one image
            paths, labels, classes = [self.root], [-1], []
            self.root = os.path.dirname(self.root)
        elif not os.path.isdir(self.root):
            raise EmbedError(f"{self.root!r} does not exist: name a folder of images (or, "
                             "for queries, an image file).")
        else:
            paths, labels, classes = folder.list_images(self.root)
        if not paths:
            raise EmbedError(f"no images in {self.root!r} (looked for "
                             f"{', '.join(folder.IMAGE_EXTENSIONS)} files, recursively): "
                             "point --images at a folder of images.")
        self.paths, self.classes = paths, classes
        self.labels = [classes[i] if i >= 0 else "" for i in labels]

    def __len__(self):
        return len(self.paths)

    def record(self):
        return {"images": self.root}

    def row_name(self, index, label):
        """(path relative to root, class folder or "") of listing entry `index`."""
        del label
        return os.path.relpath(self.paths[index], self.root), self.labels[index]

    def listing_hash(self):
        digest = hashlib.sha256()
        for index in range(len(self)):
            digest.update("{}\t{}\n".format(*self.row_name(index, -1)).encode())
        return digest.hexdigest()

    def images(self, start, stop):
        """tf.data of ((listing index, -1), uint8 (h, w, 3)) of entries [start, stop)."""
        ds = tf.data.Dataset.from_tensor_slices(
            (tf.range(start, stop, dtype=tf.int64), tf.constant(self.paths[start:stop])))
        return ds.map(lambda i, path: ((i, tf.constant(-1, tf.int64)),
                                       folder.decode(tf.io.read_file(path))),
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class TfdsSplit:
    """The images of a TFDS split (or embedded_mnist), named "<split>/<index>";
    max_examples > 0: its first ones only."""

    def __init__(self, dataset, split, data_dir=None, download=False, max_examples=0):
        self.dataset, self.split, self.data_dir = dataset, split, data_dir
        self.ds, self.count, _ = sources.load_split(dataset, split, data_dir, download,
                                                    max_examples)
        self.class_names = []
        if dataset != sources.EMBEDDED_MNIST:
            label = sources.tfds_builder(dataset, data_dir).info.features.get("label")
            self.class_names = list(getattr(label, "names", []) or [])
        if not self.count:
            raise EmbedError(f"split {split!r} of {dataset!r} has no examples.")

    def __len__(self):
        return self.count

    def record(self):
        return {"dataset": self.dataset, "split": self.split, "num_examples": self.count}

    def listing_hash(self):
        return hashlib.sha256(f"{self.dataset}:{self.split}:{self.count}".encode()).hexdigest()

    def row_name(self, index, label):
        """("<split>/<index>", class name) of example `index`."""
        label = int(label)
        name = self.class_names[label] if 0 <= label < len(self.class_names) else (
            str(label) if label >= 0 else "")
        return f"{self.split}/{index}", name

    def images(self, start, stop):
        """tf.data of ((index, label), uint8 (h, w, 3)) of examples [start, stop)."""
        ds = self.ds.enumerate().skip(start).take(stop - start)
        return ds.map(lambda i, pair: ((i, tf.cast(pair[1], tf.int64)), pair[0]))
