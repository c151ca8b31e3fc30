"""dataset="folder:/path": mixed formats, bad files skipped and named, labels, splits."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from wcl_tf import run_folder, training
from wcl_tf.config import Config
from wcl_tf.data import eval_input, folder, sources

_RNG = np.random.default_rng(0)
_RGB = (_RNG.uniform(size=(20, 30, 3)) * 255).astype(np.uint8)


def _encode(array, fmt, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _good_files():
    """name -> bytes of readable images of every kind the issue names."""
    gray = _RGB[..., 0]
    rgba = np.concatenate([_RGB, np.full((20, 30, 1), 9, np.uint8)], axis=-1)
    sixteen = (gray.astype(np.uint16) * 257)  # 16-bit PNG, same picture as `gray`
    frames = [Image.fromarray(_RGB).convert("P"), Image.fromarray(255 - _RGB).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    return {
        "photo.jpg": _encode(_RGB, "JPEG"),
        "upper.JPEG": _encode(_RGB, "JPEG"),
        "gray.png": _encode(gray, "PNG"),
        "rgba.png": _encode(rgba, "PNG"),
        "sixteen_bit.png": _encode(sixteen, "PNG"),
        "one_pixel.png": _encode(_RGB[:1, :1], "PNG"),
        "animated.gif": gif.getvalue(),
        "bitmap.bmp": _encode(_RGB, "BMP"),
    }


def _bad_files():
    jpeg = _encode(_RGB, "JPEG")
    return {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "text.jpg": b"this is a text file, not a JPEG\n",
        "empty.png": b"",
    }


def _write(root, files):
    os.makedirs(root, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)


@pytest.fixture()
def messy_folder(tmp_path):
    """Unlabelled folder: 8 good images, 3 bad ones, a README that is ignored."""
    root = tmp_path / "images"
    _write(root, {**_good_files(), **_bad_files(), "README.txt": b"not an image"})
    return str(root)


def test_scan_skips_bad_files_and_names_them(messy_folder):
    scan = folder.scan_folder(f"folder:{messy_folder}", "train")
    assert len(scan.files) == 8
    assert sorted(os.path.basename(p) for p in scan.bad) == [
        "empty.png", "text.jpg", "truncated.jpg"]
    assert scan.num_classes == 0 and set(scan.labels) == {-1}
    report = scan.report()
    assert "8 images" in report and "skipped 3 file(s)" in report
    for name in ("empty.png", "text.jpg", "truncated.jpg"):
        assert name in report
    assert "README" not in report


def test_fail_mode_lists_bad_files(messy_folder):
    with pytest.raises(sources.DataError) as err:
        sources.load_split(f"folder:{messy_folder}", "train", on_bad_image="fail")
    message = str(err.value)
    assert "3 file(s)" in message and "--on_bad_image=skip" in message
    assert "truncated.jpg" in message and "text.jpg" in message


def test_decoded_images_are_rgb_uint8(messy_folder):
    ds, count, num_classes = sources.load_split(f"folder:{messy_folder}", "train")
    images = {os.path.basename(p): None for p in
              folder.scan_folder(f"folder:{messy_folder}", "train").files}
    decoded = [image for image, _ in ds.as_numpy_iterator()]
    assert count == len(decoded) == 8 and num_classes == 0
    by_name = dict(zip(sorted(images), decoded))  # files are listed in sorted order
    for image in decoded:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    np.testing.assert_array_equal(by_name["rgba.png"], _RGB)  # alpha dropped
    np.testing.assert_array_equal(by_name["bitmap.bmp"], _RGB)
    gray = by_name["gray.png"]
    np.testing.assert_array_equal(gray[..., 0], _RGB[..., 0])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    # 16-bit values v*257 come back as v (8 bits), within rounding.
    assert np.abs(by_name["sixteen_bit.png"][..., 0].astype(int) - _RGB[..., 0]).max() <= 1
    assert by_name["one_pixel.png"].shape == (1, 1, 3)
    assert by_name["animated.gif"].shape == (20, 30, 3)  # first frame only


def test_class_subfolders_and_split_folders(tmp_path):
    for split, per_class in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            _write(tmp_path / split / cls,
                   {f"{cls}{i}.png": _encode(_RGB, "PNG") for i in range(per_class)})
    dataset = f"folder:{tmp_path}"
    _, n_train, classes = sources.load_split(dataset, "train")
    ds, n_test, _ = sources.load_split(dataset, "test")
    assert (n_train, n_test, classes) == (6, 4, 2)
    assert sorted(int(label) for _, label in ds.as_numpy_iterator()) == [0, 0, 1, 1]
    x, y = eval_input.load_arrays(dataset, "train", image_size=8)
    assert x.shape == (6, 8, 8, 3) and x.dtype == np.float32 and sorted(y) == [0, 0, 0, 1, 1, 1]


def test_splits_number_classes_like_the_training_split(tmp_path):
    """test/ lacks 'dog': 'fox' must keep the training split's label 2, not become 1."""
    for split, classes in (("train", ("cat", "dog", "fox")), ("test", ("cat", "fox"))):
        for cls in classes:
            _write(tmp_path / split / cls, {f"{cls}.png": _encode(_RGB, "PNG")})
    dataset = f"folder:{tmp_path}"
    ds, _, num_classes = sources.load_split(dataset, "test")
    assert num_classes == 3
    assert sorted(int(label) for _, label in ds.as_numpy_iterator()) == [0, 2]
    _write(tmp_path / "test" / "wolf", {"w.png": _encode(_RGB, "PNG")})
    with pytest.raises(sources.DataError, match="wolf.*not in the training split"):
        sources.load_split(dataset, "test")


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("empty", "no readable images"),
    ("no_test_split", "has no 'test' subfolder"),
])
def test_folder_errors_say_what_to_do(tmp_path, case, expected):
    root = tmp_path / "data"
    if case == "empty":
        _write(root, {"notes.txt": b"x", "broken.jpg": b"x"})
    elif case == "no_test_split":
        _write(root, {"a.png": _encode(_RGB, "PNG")})
    split = "test" if case == "no_test_split" else "train"
    with pytest.raises(sources.DataError, match=expected):
        sources.load_split(f"folder:{root}", split)


def test_training_on_a_messy_folder_reports_skipped_files(messy_folder, tmp_path):
    """Truncated JPEG, text .jpg, empty file, 1x1, 16-bit, RGBA, grayscale, GIF: one step
    trains, the log names the skipped files, and no kNN is attempted without labels."""
    lines = []
    cfg = Config(dataset=f"folder:{messy_folder}", backbone="small_cnn", width=8,
                 image_size=16, head_hidden_dim=16, head_output_dim=8, global_batch_size=4,
                 epochs=1, steps_per_epoch=1, warmup_epochs=0, local_crop_size=8,
                 model_dir=str(tmp_path / "run"), verbose=0)
    results = training.run(cfg, log=lines.append)
    log = "\n".join(lines)
    assert "skipped 3 file(s)" in log and "truncated.jpg" in log, log
    assert "no kNN evaluation" in log
    assert results["optimizer_steps"] == 1 and np.isfinite(results["final_loss"])
    assert results["knn_top1"] is None
    assert os.path.exists(run_folder.checkpoint_path(cfg.model_dir, 1))
