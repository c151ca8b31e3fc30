"""Images from a folder on disk: `dataset="folder:/path/to/images"`.

Layout, per split:

    /path/<split>/...   when /path has a subfolder named like the split (train, test, ...)
    /path/...           otherwise, for the training split only

Inside that root, if it holds only subfolders, each subfolder is a class (labels 0..C-1 in
sorted name order, images found recursively below it); otherwise every image below the
root is used without labels (label -1, no kNN evaluation possible).

Files are chosen by extension (JPEG, PNG, GIF, BMP, WebP; any case). Every candidate is
decoded once when the split is first opened (a parallel tf.data pass), so a truncated
JPEG, a text file named `.jpg` or an empty file is found before training starts: it is
skipped and counted, and `scan_folder(...).report()` names the first few (or, with
on_bad_image="fail", a DataError lists them). Decoding gives 3-channel uint8 whatever the
file holds: grayscale is repeated, alpha dropped, 16-bit PNGs scaled to 8 bits, the first
frame of a GIF kept. The training pipeline decodes again and drops any file that turns
bad later (`ignore_errors`), so a file changed mid-run never stops an epoch.

Order: `select_files` / `load_folder` list the files class by class (sorted) unless given
a seed, then as a seeded permutation of the whole list; `max_examples` always keeps a
seeded sample across all classes (the first entries of that permutation). The training
pipeline permutes the (sampled) list again every epoch, see wcl_tf.data.pipeline.
"""

import functools
import os

import numpy as np
import tensorflow as tf

from wcl_tf.config import ON_BAD_IMAGE  # the one list (config has no TensorFlow)
from wcl_tf.data import cropping
from wcl_tf.data.errors import DataError

PREFIX = "folder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
_REPORTED_PATHS = 5


class FolderError(DataError):
    """The folder cannot serve as a dataset; the message says what to do."""


def is_folder_dataset(dataset):
    return isinstance(dataset, str) and dataset.startswith(PREFIX)


def folder_path(dataset):
    return os.path.abspath(os.path.expanduser(dataset[len(PREFIX):]))


class FolderScan:
    """What scanning one split of a folder found.

    files: good image paths (sorted); labels: int64 per file (-1 without classes);
    class_names: sorted class folder names ([] without classes); bad: paths that have an
    image extension but do not decode; root: the scanned folder.
    """

    def __init__(self, root, files, labels, class_names, bad):
        self.root, self.files, self.labels = root, files, labels
        self.class_names, self.bad = class_names, bad

    @property
    def num_classes(self):
        return len(self.class_names)

    def report(self):
        """One line for the run log: counts, classes, and the first skipped files."""
        classes = (f"{self.num_classes} classes" if self.class_names
                   else "no class subfolders (unlabelled)")
        line = f"{self.root}: {len(self.files)} images, {classes}"
        if self.bad:
            shown = ", ".join(os.path.relpath(p, self.root) for p in self.bad[:_REPORTED_PATHS])
            more = f" and {len(self.bad) - _REPORTED_PATHS} more" if len(
                self.bad) > _REPORTED_PATHS else ""
            line += (f"; skipped {len(self.bad)} file(s) that are not readable images: "
                     f"{shown}{more}")
        return line


def decode(contents):
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> uint8 (H, W, 3)."""
    return cropping.decode_image(contents)


def _split_root(path, split):
    candidate = os.path.join(path, split)
    if os.path.isdir(candidate):
        return candidate
    if split == "train":
        return path
    raise FolderError(
        f"folder {path!r} has no {split!r} subfolder: create {candidate} (with the same "
        f"class subfolders), or use a folder with 'train' and {split!r} subfolders.")


def _image_files(root):
    found = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(folder, n) for n in sorted(names)
                     if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))
    return found


def _class_names(root):
    """Sorted class subfolder names when `root` holds only subfolders, else []."""
    entries = [e for e in sorted(os.listdir(root)) if not e.startswith(".")]
    subfolders = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    return subfolders if subfolders and len(subfolders) == len(entries) else []


def _list(root, reference_classes=()):
    """(paths, labels, class_names) before decoding. reference_classes: the training
    split's classes, so that every split numbers a class the same way."""
    classes = _class_names(root)
    if not classes:
        paths = _image_files(root)
        return paths, [-1] * len(paths), []
    names = list(reference_classes) or classes
    unknown = sorted(set(classes) - set(names))
    if unknown:
        raise FolderError(
            f"class folder(s) {', '.join(unknown)} in {root!r} are not in the training "
            f"split's classes ({', '.join(names)}): every split needs the same class names.")
    paths, labels = [], []
    for name in classes:
        files = _image_files(os.path.join(root, name))
        paths += files
        labels += [names.index(name)] * len(files)
    return paths, labels, names


def list_images(root):
    """(paths, labels, class_names) of every image file below `root` (by extension, not
    decoded), in the order training lists them: class by class when `root` holds only
    subfolders (labels 0..C-1), else all files recursively with label -1."""
    return _list(root)


def _decodable(paths):
    """Boolean list: which paths decode (one parallel tf.data pass)."""
    if not paths:
        return []

    def check(index, path):
        # The shape is returned so that the decode is not pruned from the graph.
        return index, tf.shape(decode(tf.io.read_file(path)))

    good = tf.data.Dataset.from_tensor_slices(
        (tf.range(len(paths), dtype=tf.int64), tf.constant(paths)))
    good = good.map(check, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    ok = [False] * len(paths)
    for index, _ in good.batch(4096).as_numpy_iterator():
        for i in index:
            ok[int(i)] = True
    return ok


@functools.lru_cache(maxsize=16)
def _scan_cached(root, reference_classes, mtime):
    del mtime  # Part of the cache key only: a folder changed on disk is scanned again.
    paths, labels, class_names = _list(root, reference_classes)
    ok = _decodable(paths)
    files = [p for p, good in zip(paths, ok) if good]
    kept = [label for label, good in zip(labels, ok) if good]
    bad = [p for p, good in zip(paths, ok) if not good]
    return FolderScan(root, files, kept, class_names, bad)


def scan_folder(dataset, split, on_bad_image="skip"):
    """FolderScan of one split of `dataset` ("folder:/path"); cached per process."""
    if on_bad_image not in ON_BAD_IMAGE:
        raise FolderError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got "
                          f"{on_bad_image!r}.")
    path = folder_path(dataset)
    if not os.path.isdir(path):
        raise FolderError(f"image folder {path!r} does not exist: check the path after "
                          f"'{PREFIX}' in --dataset.")
    root = _split_root(path, split)
    train_root = os.path.join(path, "train")
    reference = (tuple(_class_names(train_root))
                 if split != "train" and os.path.isdir(train_root) else ())
    scan = _scan_cached(root, reference, os.stat(root).st_mtime_ns)
    if not scan.files:
        raise FolderError(
            f"no readable images in {root!r} (looked for {', '.join(IMAGE_EXTENSIONS)}"
            f"{f'; {len(scan.bad)} files did not decode' if scan.bad else ''}): point "
            f"--dataset=folder:... at a folder of images or of class subfolders.")
    if scan.bad and on_bad_image == "fail":
        listed = "\n  ".join(scan.bad[:20])
        raise FolderError(
            f"{len(scan.bad)} file(s) in {root!r} are not readable images "
            f"(--on_bad_image=fail):\n  {listed}\nremove or fix them, or pass "
            f"--on_bad_image=skip to train without them.")
    return scan


def select_files(dataset, split, max_examples=0, on_bad_image="skip", seed=None):
    """(paths, labels) of one split, before any decoding.

    seed None: sorted order (class by class). Otherwise a permutation of the whole list
    drawn with `seed`. max_examples > 0 keeps the first max_examples of that permutation
    (seed None counts as 0): a fixed, seeded sample across all classes, never the first
    classes only.
    """
    scan = scan_folder(dataset, split, on_bad_image)
    files, labels = list(scan.files), list(scan.labels)
    if seed is None and max_examples <= 0:
        return files, labels
    order = np.random.default_rng([int(seed or 0), 0x5EED]).permutation(len(files))
    if max_examples > 0:
        order = order[:max_examples]
    return [files[i] for i in order], [labels[i] for i in order]


def load_folder(dataset, split, max_examples=0, on_bad_image="skip", seed=None):
    """(tf.data.Dataset of (uint8 (H, W, 3), int64 label), num_examples, num_classes).

    The files come in the order select_files gives (seeded permutation, or sorted order
    when seed is None and max_examples is 0)."""
    files, labels = select_files(dataset, split, max_examples, on_bad_image, seed)
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(files), tf.constant(labels, tf.int64)))
    ds = ds.map(lambda path, label: (decode(tf.io.read_file(path)), label),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.ignore_errors(), len(files), scan_folder(dataset, split,
                                                       on_bad_image).num_classes
