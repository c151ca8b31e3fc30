"""The imported network equals the authors' PyTorch network (runs where torch is installed).

A PyTorch WCL (torchvision ResNet-50 + two 3-layer heads written after the authors'
network/head.py, tests/torch_wcl.py) with random weights and non-trivial BatchNorm
statistics is saved in each of the authors' formats, imported with
wcl_tf.tools.import_torch, and both are run in inference mode on real photos (when
present) and on generated images: pooled features and both heads' outputs agree to 1e-4
relative; the exported SavedModel's serving_default gives the Keras model's features.

    PYTHONPATH=$PWD /path/to/python-with-torch -m pytest -q tests/test_import_torch.py
"""

import glob
import os
import sys

import numpy as np
import pytest

# torch's optional GPU compiler (triton) crashes the process when it is imported after
# TensorFlow (this session has loaded it); torch runs on the CPU without it.
sys.modules.setdefault("triton", None)
torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

import torch_wcl  # noqa: E402  (tests/, needs torch)

from wcl_tf import torch_checkpoint  # noqa: E402

# The shared photos next to the checkout (WCL_PHOTOS overrides); skipped when absent.
PHOTOS = os.environ.get("WCL_PHOTOS") or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "photos")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
TOLERANCE = 1e-4


def _photos():
    """Up to 6 photos (one per class folder), resized to 256 on the short side and
    centre-cropped to 224, as float32 in [0, 1]; [] when the photos are absent."""
    from PIL import Image

    paths = sorted(glob.glob(os.path.join(PHOTOS, "test", "*", "*")))
    chosen, seen = [], set()
    for path in paths:
        folder = os.path.dirname(path)
        if folder not in seen:
            seen.add(folder)
            chosen.append(path)
    images = []
    for path in chosen[:6]:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        scale = 256 / min(w, h)
        image = image.resize((max(256, round(w * scale)), max(256, round(h * scale))),
                             Image.BILINEAR)
        w, h = image.size
        left, top = (w - 224) // 2, (h - 224) // 2
        images.append(np.asarray(image.crop((left, top, left + 224, top + 224)),
                                 np.float32) / 255.0)
    return images


def _generated(n=2, seed=0):
    """Smooth random colour images (bilinear upsampling of 8x8 noise), 224 px."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 1, (n, 8, 8, 3)).astype(np.float32)
    return list(tf.image.resize(small, [224, 224]).numpy().clip(0, 1))


def _relative(ours, theirs):
    """max over images of max|ours - theirs| / max|theirs| (per image)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    err = np.abs(ours - theirs).reshape(len(ours), -1).max(axis=1)
    scale = np.abs(theirs).reshape(len(theirs), -1).max(axis=1)
    return float((err / scale).max())


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    # The paper's head sizes (2048/128): sizes are read from the weight shapes.
    return torch_wcl.randomise(torch_wcl.WCL(hidden=2048, out=128))


@pytest.fixture(scope="module")
def imported(torch_model, tmp_path_factory):
    from wcl_tf.tools import import_torch

    root = tmp_path_factory.mktemp("imports")
    runs = {}
    for fmt in ("ddp", "plain", "bare"):
        path = str(root / f"wcl-{fmt}.pth")
        torch_wcl.save(torch_model, path, fmt)
        runs[fmt] = (path, str(root / f"run_{fmt}"))
        runs[fmt] += (import_torch.import_checkpoint(path, runs[fmt][1], log=print),)
    return runs


def _images():
    images = _photos() + _generated()
    return np.stack(images)


def test_reader_gives_torch_load_arrays(imported):
    path = imported["ddp"][0]
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    with torch_checkpoint.Checkpoint(path) as ckpt:
        ours = torch_checkpoint.to_numpy(ckpt.obj)
    assert list(ours["model"]) == list(theirs["model"])
    for key, value in theirs["model"].items():
        np.testing.assert_array_equal(ours["model"][key], value.numpy(), err_msg=key)
    momentum = theirs["optimizer"]["state"]
    for index, slot in momentum.items():
        np.testing.assert_array_equal(ours["optimizer"]["state"][index]["momentum_buffer"],
                                      slot["momentum_buffer"].numpy())
    assert ours["epoch"] == theirs["epoch"] == 200


def test_record_and_optimizer_never_read(imported):
    record = imported["ddp"][2]
    assert record["layout"] == "pretraining" and record["module_prefix_removed"]
    assert (record["head_hidden_dim"], record["head_output_dim"]) == (2048, 128)
    assert record["skipped"]["top_level_entries"] == ["epoch", "optimizer"]
    assert all(k.endswith("num_batches_tracked")
               for k in record["skipped"]["state_dict_entries"])
    # The optimizer's momentum (as large as the parameters) was never read.
    assert record["storage_bytes_read"] < 0.55 * record["storage_bytes_in_file"]
    assert record["mapping"]["head2.linear3.weight"] == "graph_head_fc3/kernel"


def test_every_format_imports_the_same_weights(imported):
    from wcl_tf import export

    reference = export.load_checkpoint(os.path.join(imported["ddp"][1], "final.keras"))
    for fmt in ("plain", "bare"):
        other = export.load_checkpoint(os.path.join(imported[fmt][1], "final.keras"))
        for a, b in zip(reference.weights, other.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=f"{fmt}: {a.path}")


def test_features_and_heads_equal_pytorch(torch_model, imported, tmp_path):
    import tensorflow as tf

    from wcl_tf import export
    from wcl_tf.data import eval_input

    images = _images()
    with torch.no_grad():
        x = torch.from_numpy(((images - MEAN) / STD).transpose(0, 3, 1, 2).copy())
        feats = torch_model.net(x)
        theirs = [feats.numpy(), torch_model.head1(feats).numpy(),
                  torch_model.head2(feats).numpy()]
    model = export.load_checkpoint(os.path.join(imported["ddp"][1], "final.keras"))
    features = model.backbone(images, training=False)
    ours = [features.numpy(), model.instance_head(features, training=False).numpy(),
            model.graph_head(features, training=False).numpy()]
    print(f"{len(images)} images ({len(images) - 2} photos)")
    for name, a, b in zip(("features", "instance head", "graph head"), ours, theirs):
        assert a.shape == b.shape
        print(f"{name}: max relative difference {_relative(a, b):.2e}")
        assert _relative(a, b) <= TOLERANCE, (name, _relative(a, b))

    # The SavedModel's serving_default (uint8 photos of any size) = the Keras model on the
    # same preprocessing.
    spec = export.export_encoder(model, str(tmp_path / "export"), 224)
    assert spec["preprocessing"] == "resize_center_crop"
    served = tf.saved_model.load(str(tmp_path / "export")).signatures["serving_default"]
    rng = np.random.default_rng(1)
    raw = [rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)]
    for path in sorted(glob.glob(os.path.join(PHOTOS, "test", "*", "*")))[:2]:
        raw.append(tf.io.decode_image(tf.io.read_file(path), channels=3).numpy())
    for image in raw:
        out = served(images=tf.constant(image[None]))["features"].numpy()
        crop = eval_input.resize_center_crop(tf.constant(image[None]), 224) / 255.0
        keras_out = model.backbone(tf.clip_by_value(crop, 0.0, 1.0), training=False).numpy()
        print(f"serving_default {image.shape}: max relative difference "
              f"{_relative(out, keras_out):.2e}")
        assert _relative(out, keras_out) <= 1e-5


def test_linear_eval_checkpoint_gives_their_logits(tmp_path):
    import tensorflow as tf

    from wcl_tf import export
    from wcl_tf.tools import import_torch

    torch.manual_seed(1)
    linear = torch_wcl.randomise(torch_wcl.LinearHead())
    path = str(tmp_path / "eval_wcl.pth")
    torch_wcl.save(linear, path, "linear")
    record = import_torch.import_checkpoint(path, str(tmp_path / "run"), log=print)
    assert record["layout"] == "linear_eval"
    assert record["skipped"]["top_level_entries"] == ["epoch", "optimizer", "scheduler"]
    images = np.stack(_generated(3, seed=2))
    with torch.no_grad():
        x = torch.from_numpy(((images - MEAN) / STD).transpose(0, 3, 1, 2).copy())
        theirs = linear.fc(linear.net(x)).numpy()
    classifier = export.load_checkpoint(str(tmp_path / "run" / "classifier.keras"))
    ours = classifier(images, training=False).numpy()
    assert ours.shape == (3, 1000)
    print(f"classifier logits: max relative difference {_relative(ours, theirs):.2e}")
    assert _relative(ours, theirs) <= TOLERANCE
    # Exported, the SavedModel returns the class logits.
    export.export_encoder(classifier, str(tmp_path / "export"), 224)
    served = tf.saved_model.load(str(tmp_path / "export")).signatures["preprocessed"]
    logits = served(images=tf.constant(images))["logits"].numpy()
    assert _relative(logits, theirs) <= TOLERANCE
