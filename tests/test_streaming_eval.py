"""Streaming evaluation input (wcl_tf/data/eval_input.py): test-time resize + centre crop,
training crops of the original images, the streamed linear probe and kNN, the export's
serving preprocessing."""

import io
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from wcl_tf import export, knn, linear_eval
from wcl_tf.data import eval_input, sources

S = 32
W, H = 300, 200  # the non-square test images (width x height)


def _window(width, height, size):
    """The central crop window of the eval preprocessing, in source pixels:
    (top, left, bottom, right) as floats."""
    target = eval_input.resize_size(size)
    short = min(width, height)
    new_h = target if height <= width else target * height // short
    new_w = target if width <= height else target * width // short
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    sy, sx = height / new_h, width / new_w
    return top * sy, left * sx, (top + size) * sy, (left + size) * sx


def _bordered(centre_blue=255, size=S):
    """uint8 (H, W, 3): blue inside the eval crop window (plus the resampling filter's reach
    and a JPEG margin), red outside it."""
    top, left, bottom, right = _window(W, H, size)
    margin = min(H, W) / eval_input.resize_size(size) + 3  # filter support + JPEG
    image = np.zeros((H, W, 3), np.uint8)
    image[..., 0] = 255
    rows = slice(int(np.floor(top - margin)), int(np.ceil(bottom + margin)))
    cols = slice(int(np.floor(left - margin)), int(np.ceil(right + margin)))
    image[rows, cols] = (0, 0, centre_blue)
    assert rows.start > 0 and cols.start > 0 and rows.stop < H and cols.stop < W
    return image


def _jpeg(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


def _write_folder(root, split, image_fn, per_class=3):
    for label, blue in (("dark", 120), ("light", 255)):
        folder = root / split / label
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{i}.jpg").write_bytes(_jpeg(image_fn(blue)))


@pytest.fixture()
def bordered_folder(tmp_path):
    """train/: plain blue images (no red anywhere); test/: red border, blue centre."""
    _write_folder(tmp_path, "train",
                  lambda blue: np.broadcast_to(np.array([0, 0, blue], np.uint8),
                                               (H, W, 3)).copy())
    _write_folder(tmp_path, "test", _bordered)
    return f"folder:{tmp_path}"


class RedSpy(keras.Model):
    """Features (mean blue, mean red); remembers the largest red value it was ever given."""

    def __init__(self):
        super().__init__()
        self.max_red = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                       name="max_red")

    def call(self, x, training=False):
        self.max_red.assign(tf.maximum(self.max_red, tf.reduce_max(x[..., 0])))
        return tf.stack([tf.reduce_mean(x[..., 2], axis=[1, 2]),
                         tf.reduce_mean(x[..., 0], axis=[1, 2])], axis=1)


def test_the_test_image_has_red_that_a_squash_would_keep():
    image = tf.io.decode_jpeg(_jpeg(_bordered()))
    squashed = eval_input.squash_image(image, S).numpy()
    cropped = eval_input.eval_image(image, S).numpy()
    assert squashed[..., 0].max() > 0.5  # the squash sees the red border
    assert cropped[..., 0].max() < 0.1 and cropped[..., 2].min() > 0.8  # all blue


def test_linear_probe_and_knn_see_only_the_blue_centre_at_test_time(bordered_folder):
    # Linear probe, streamed: the train split has no red at all, so any red the encoder
    # sees comes from a test image that was not centre-cropped.
    spy = RedSpy()
    train, n_train, num_classes, steps = eval_input.train_batches(
        bordered_folder, "train", S, batch_size=4, epochs=2, seed=1)
    test, n_test, _ = eval_input.eval_batches(bordered_folder, "test", S, batch_size=4)
    assert (n_train, n_test, num_classes, steps) == (6, 6, 2, 2)
    result = linear_eval.linear_eval_stream(spy, train, steps, test, num_classes, epochs=2,
                                            batch_size=4, lr=1.0)
    assert result["num_test"] == 6 and len(result["history"]) == 2
    assert float(spy.max_red.numpy()) < 0.1

    # kNN, streamed: memory = train, queries = test.
    spy = RedSpy()
    memory, _, _ = eval_input.eval_batches(bordered_folder, "train", S, batch_size=4)
    queries, _, _ = eval_input.eval_batches(bordered_folder, "test", S, batch_size=4)
    top1, n_memory, n_queries = knn.evaluate_encoder_stream(spy, memory, queries, 2, k=3)
    assert (n_memory, n_queries) == (6, 6) and 0.0 <= top1 <= 1.0
    assert float(spy.max_red.numpy()) < 0.1

    # The in-memory arrays (training-time kNN monitor, fine-tuning) use the same rule.
    x, _ = eval_input.load_arrays(bordered_folder, "test", S)
    assert x.shape == (6, S, S, 3) and x[..., 0].max() < 0.1


def test_training_crops_are_cut_from_the_original_image(bordered_folder):
    """The probe's training crops come from the whole image (red border included), not
    from the centre crop: over a few epochs some crops contain red."""
    train, _, _, _ = eval_input.train_batches(bordered_folder, "test", S, batch_size=6,
                                              epochs=4, seed=0)
    images = np.concatenate([x.numpy() for x, _ in train])
    assert images.shape == (24, S, S, 3)
    assert images[..., 0].max() > 0.5


def test_train_batches_are_reproducible_reshuffled_and_batched_per_epoch(bordered_folder):
    def labels_and_pixels(seed):
        ds, _, _, steps = eval_input.train_batches(bordered_folder, "test", S, batch_size=4,
                                                   epochs=2, seed=seed)
        batches = list(ds)
        assert steps == 2 and [len(y) for _, y in batches] == [4, 2, 4, 2]
        return [y.numpy() for _, y in batches], np.concatenate([x.numpy() for x, _ in batches])

    y1, x1 = labels_and_pixels(3)
    y2, x2 = labels_and_pixels(3)
    _, x3 = labels_and_pixels(4)
    np.testing.assert_array_equal(x1, x2)
    assert [list(a) for a in y1] == [list(a) for a in y2]
    assert not np.array_equal(x1, x3)
    assert x1.min() >= 0.0 and x1.max() <= 1.0


def test_square_images_of_side_at_most_s_keep_the_old_preprocessing(rng):
    # CIFAR at 32 px: the identity; MNIST 28 -> 32: the same bilinear resize as before.
    cifar = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    np.testing.assert_array_equal(eval_input.eval_image(tf.constant(cifar), S).numpy(),
                                  cifar.astype(np.float32) / 255.0)
    mnist = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        eval_input.eval_image(tf.constant(mnist), S).numpy(),
        np.clip(sources.resize_images(mnist, S).numpy() / 255.0, 0, 1), atol=1e-6)


def test_resize_center_crop_matches_pil_resize_256_and_centre_crop_224(rng):
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(image).resize((100, 75)).resize((400, 300)))  # smooth
    ours = eval_input.eval_image(tf.constant(image), 224).numpy() * 255.0
    resized = Image.fromarray(image).resize((341, 256), Image.BILINEAR)  # 256 * 400 // 300
    left, top = round((341 - 224) / 2), round((256 - 224) / 2)
    reference = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float32)
    assert ours.shape == (224, 224, 3)
    assert np.abs(ours - reference).max() <= 2.0  # PIL rounds between its two passes


def test_knn_float16_bank_agrees_with_float32(rng):
    centres = rng.normal(size=(3, 16))
    memory = (centres[np.arange(60) % 3] + 0.3 * rng.normal(size=(60, 16))).astype(np.float32)
    queries = (centres[np.arange(30) % 3] + 0.3 * rng.normal(size=(30, 16))).astype(np.float32)

    def batches(x, y):
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(7)

    identity = lambda x, training=False: x  # noqa: E731
    y_mem, y_q = np.arange(60) % 3, np.arange(30) % 3
    top32 = knn.evaluate_encoder_stream(identity, batches(memory, y_mem),
                                        batches(queries, y_q), 3, k=5)
    top16 = knn.evaluate_encoder_stream(identity, batches(memory, y_mem),
                                        batches(queries, y_q), 3, k=5,
                                        feature_dtype=np.float16)
    assert top32 == top16 and top32[0] > 0.9 and top32[1:] == (60, 30)
    x_mem, _ = knn.extract_features_from_dataset(identity, batches(memory, y_mem),
                                                 np.float16)
    assert x_mem.dtype == np.float16 and x_mem.shape == (60, 16)


def _spy_backbone(size):
    inputs = keras.Input((size, size, 3))
    outputs = keras.layers.GlobalMaxPooling2D()(inputs)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("size, preprocessing, expected", [
    (96, None, "resize_center_crop"), (96, "squash", "squash"), (S, None, "squash")])
def test_export_records_and_applies_the_serving_preprocessing(tmp_path, size, preprocessing,
                                                               expected):
    path = str(tmp_path / "encoder")
    spec = export.export_encoder(_spy_backbone(size), path, size, preprocessing=preprocessing)
    assert spec["preprocessing"] == expected
    stored = export.read_preprocessing(path)
    assert stored["preprocessing"] == expected and stored["resize"]["mode"] == (
        "direct" if expected == "squash" else "resize_center_crop")
    image = _bordered(size=size)
    features = tf.saved_model.load(path).signatures["serving_default"](
        images=tf.constant(image[None]))["features"].numpy()[0]  # max of R, G, B
    if expected == "squash":
        assert features[0] > 0.5  # the red border survives a squash
    else:
        assert features[0] < 0.1 and features[2] > 0.9
        np.testing.assert_allclose(
            features, eval_input.eval_image(tf.constant(image), size).numpy().max(
                axis=(0, 1)), atol=1e-6)


def test_r50_linear_flagfile_drives_the_streamed_tool(bordered_folder, tmp_path):
    """The shipped protocol config parses (absl --flagfile) and runs the streamed probe;
    later flags override it (a tiny random encoder, 1 epoch, batch 4 here)."""
    import json
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flagfile = os.path.join(repo, "wcl_tf", "configs", "r50_linear.flags")
    lines = [line.strip() for line in open(flagfile) if line.startswith("--")]
    for setting in ("--mode=full", "--epochs=80", "--batch_size=4096", "--lr=3.2",
                    "--input=stream"):
        assert setting in lines
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(
        {"dataset": bordered_folder, "image_size": S, "backbone": "small_cnn", "width": 4}))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
    result = subprocess.run(
        [sys.executable, "-m", "wcl_tf.tools.linear_eval", f"--flagfile={flagfile}",
         f"--model_dir={run}", "--random_init", "--eval_split=test", "--epochs=1",
         "--batch_size=4", "--lr=0.1"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((run / "linear_eval_full_random_init.json").read_text())
    assert out["input"] == "stream" and out["mode"] == "full"
    assert (out["num_train"], out["num_test"], out["epochs"], out["lr"]) == (6, 6, 1, 0.1)
    assert len(out["history"]) == 1 and "linear (full) epoch 1/1" in result.stdout


def _probe_epochs(fake_imagenet, seed, epochs=3, size=16):
    """Per epoch: the probe's labels in order, and its images."""
    import fake_imagenet as stand_in  # pylint: disable=import-outside-toplevel

    ds, n, num_classes, steps = eval_input.train_batches(
        stand_in.NAME, "train", size, batch_size=32, epochs=epochs, seed=seed,
        data_dir=fake_imagenet)
    assert (n, num_classes, steps) == (stand_in.TRAIN, stand_in.NUM_CLASSES, 3)
    batches = list(ds)
    assert [len(y) for _, y in batches] == [32] * 3 * epochs
    labels = [np.concatenate([y.numpy() for _, y in batches[e * 3:e * 3 + 3]])
              for e in range(epochs)]
    images = np.concatenate([x.numpy() for x, _ in batches])
    return labels, images


def test_streamed_probe_reads_tfds_in_a_new_order_every_epoch(fake_imagenet, monkeypatch):
    """The ImageNet path of the linear probe (a TFDS stream of variable-size JPEGs): every
    epoch its own order, reproducible from the seed; with a one-image buffer (a split far
    larger than the buffer) the order still changes, from the files' order."""
    import fake_imagenet as stand_in  # pylint: disable=import-outside-toplevel

    labels, images = _probe_epochs(fake_imagenet, seed=3)
    per_class = stand_in.TRAIN // stand_in.NUM_CLASSES
    for epoch in labels:  # every image once per epoch
        assert np.bincount(epoch).tolist() == [per_class] * stand_in.NUM_CLASSES
    assert len({epoch.tobytes() for epoch in labels}) == 3
    labels_again, images_again = _probe_epochs(fake_imagenet, seed=3)
    np.testing.assert_array_equal(np.stack(labels), np.stack(labels_again))
    np.testing.assert_array_equal(images, images_again)

    monkeypatch.setattr(eval_input, "_SHUFFLE_BYTES", 1)  # a buffer of one image
    labels, _ = _probe_epochs(fake_imagenet, seed=3)
    assert len({epoch.tobytes() for epoch in labels}) == 3
