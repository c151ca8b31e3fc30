"""Evaluation suite: linear evaluation, label subsets, fine-tuning and the three CLI tools."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from wcl_tf import finetune, linear_eval
from wcl_tf.models import backbones

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
S = 16


def _separable(rng, num_classes, n, dim=16):
    """Gaussian clusters around well separated centres: linearly separable in practice."""
    centres = 4.0 * np.eye(num_classes, dim)
    labels = rng.integers(0, num_classes, n)
    return (centres[labels] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32), labels


def test_fast_linear_eval_learns_separable_problem_and_chance_on_shuffled_labels(rng):
    x_train, y_train = _separable(rng, 10, 600)
    x_test, y_test = _separable(rng, 10, 1000)
    result = linear_eval.linear_eval_features(x_train, y_train, x_test, y_test, 10, epochs=5,
                                              batch_size=64)
    assert result["top1_last"] == 1.0 and result["top1_best"] == 1.0
    assert result["top5_last"] == 1.0
    assert len(result["history"]) == 5
    assert result["lr"] == pytest.approx(0.2 * 64 / 256)
    # Cosine per step to 0: the learning rate decays within the run and ends at 0.
    lrs = [h["lr"] for h in result["history"]]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < result["lr"] and lrs[-1] == 0.0

    # Labels carrying no information about the features: accuracy is chance (10%).
    shuffled = linear_eval.linear_eval_features(
        x_train, rng.permutation(y_train), x_test, rng.permutation(y_test), 10, epochs=5,
        batch_size=64)
    assert 0.05 < shuffled["top1_last"] < 0.16
    assert shuffled["top1_best"] >= shuffled["top1_last"]


def test_fast_linear_eval_is_reproducible_for_a_seed(rng):
    x, y = _separable(rng, 3, 90)
    x_noisy = x + rng.normal(scale=3.0, size=x.shape).astype(np.float32)
    runs = [linear_eval.linear_eval_features(x_noisy[:60], y[:60], x_noisy[60:], y[60:], 3,
                                             epochs=2, batch_size=16, seed=s)
            for s in (1, 1, 2)]
    losses = [[h["loss"] for h in r["history"]] for r in runs]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    assert not np.allclose(losses[0], losses[2], rtol=1e-3)


def test_topk_accuracy_hand_case():
    logits = np.array([
        [0.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # label 0 ranks 7th: in no top-k below 7
        [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 4 ranks 5th: in top-5, not top-1
        [1.0, 2.0, 9.0, 3.0, 0.0, 0.0, 0.0],  # label 2 ranks 1st
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],  # label 1 ranks 6th: just outside top-5
    ])
    labels = np.array([0, 4, 2, 1])
    assert linear_eval.topk_accuracy(logits, labels, 1) == 0.25
    assert linear_eval.topk_accuracy(logits, labels, 5) == 0.5
    assert linear_eval.topk_accuracy(logits, labels, 6) == 0.75
    # k larger than the number of classes: every label is in the "top-k".
    assert linear_eval.topk_accuracy(logits[:, :5], np.array([0, 4, 2, 1]), 5) == 1.0


def test_label_subset_class_balanced_reproducible_and_sized():
    # 10 classes of unequal size (300 ... 750 examples), 5,250 labels, interleaved.
    labels = np.concatenate([np.full(300 + 50 * c, c) for c in range(10)])
    labels = np.random.default_rng(1).permutation(labels)
    n = len(labels)
    for fraction, per_class in ((0.01, n // 100 // 10), (0.1, n // 10 // 10)):
        index = finetune.label_subset(labels, fraction, seed=0)
        assert len(index) == 10 * per_class
        assert np.all(np.bincount(labels[index], minlength=10) == per_class)
        assert np.all(np.diff(index) > 0)  # sorted, no duplicates
        np.testing.assert_array_equal(index, finetune.label_subset(labels, fraction, seed=0))
        assert not np.array_equal(index, finetune.label_subset(labels, fraction, seed=1))
    assert (n // 100 // 10, n // 10 // 10) == (5, 52)
    # A tiny fraction still gives one example per class.
    assert np.all(np.bincount(labels[finetune.label_subset(labels, 1e-5)]) == 1)
    with pytest.raises(ValueError, match="class 0 has only"):
        finetune.label_subset(np.array([0, 1, 1, 1, 1, 1]), 0.9)
    with pytest.raises(ValueError, match="fraction"):
        finetune.label_subset(labels, 0.0)


def _bright_vs_dark(rng, n):
    """Class 1: bright images, class 0: dark ones, (n, 16, 16, 3) float32 in [0, 1]."""
    labels = np.arange(n) % 2
    level = np.where(labels == 1, 0.75, 0.25)[:, None, None, None]
    images = np.clip(level + 0.15 * rng.normal(size=(n, S, S, 3)), 0.0, 1.0)
    return images.astype(np.float32), labels


def _tiny_backbone(seed=0):
    keras.utils.set_random_seed(seed)
    return backbones.build_backbone("small_cnn", width=4)


def _values(model):
    return [v.numpy().copy() for v in model.variables]


def test_linear_eval_full_keeps_the_backbone_frozen_and_learns(rng):
    x, y = _bright_vs_dark(rng, 48)
    x_test, y_test = _bright_vs_dark(rng, 32)
    backbone = _tiny_backbone()
    before = _values(backbone)
    result = linear_eval.linear_eval_full(backbone, x, y, x_test, y_test, 2, S, epochs=3,
                                          batch_size=16, lr=1.0)
    assert result["top1_last"] >= 0.9
    assert len(result["history"]) == 3
    for old, new in zip(before, _values(backbone)):  # kernels and BN statistics alike
        np.testing.assert_array_equal(old, new)
    with pytest.raises(ValueError, match="already resized"):
        linear_eval.linear_eval_full(backbone, x, y, x_test[:, :8, :8], y_test, 2, S,
                                     epochs=1, batch_size=16)


def test_train_augment_crops_to_size_and_stays_in_range(rng):
    images = rng.uniform(size=(4, 24, 24, 3)).astype(np.float32)
    out = linear_eval.train_augment(images, S, np.array([1, 2], np.int64)).numpy()
    assert out.shape == (4, S, S, 3) and out.min() >= 0.0 and out.max() <= 1.0
    again = linear_eval.train_augment(images, S, np.array([1, 2], np.int64)).numpy()
    other = linear_eval.train_augment(images, S, np.array([1, 3], np.int64)).numpy()
    np.testing.assert_array_equal(out, again)
    assert not np.allclose(out, other)


def test_finetune_learns_bright_vs_dark_and_trains_the_backbone(rng):
    x, y = _bright_vs_dark(rng, 48)
    x_test, y_test = _bright_vs_dark(rng, 32)
    backbone = _tiny_backbone()
    before = {v.path: v.numpy().copy() for v in backbone.variables}
    lines = []
    result = finetune.finetune(backbone, x, y, x_test, y_test, 2, epochs=4, batch_size=16,
                               lr=0.1, seed=0, log=lines.append)
    assert result["top1_last"] >= 0.9
    assert result["top5_best"] == 1.0  # 2 classes: top-5 is top-2
    assert len(lines) == 4 and lines[-1].startswith("finetune epoch 4/4")
    after = {v.path: v.numpy() for v in backbone.variables}
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    assert any("conv" in p and "kernel" in p for p in changed)
    assert any("moving_mean" in p for p in changed)  # BatchNorm ran in training mode


# ----- The three tools, as subprocesses, on a tiny training run. -----

def _run(args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=QUIET_ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("eval_run") / "run")
    result = _run(["-m", "wcl_tf.train", "--dataset=embedded_mnist", f"--image_size={S}",
                   "--backbone=small_cnn", "--width=4", "--head_hidden_dim=16",
                   "--head_output_dim=8", "--global_batch_size=16", "--epochs=1",
                   "--warmup_epochs=0", "--steps_per_epoch=2", "--max_eval_examples=100",
                   "--knn_k=5", "--verbose=0", f"--model_dir={path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(os.path.join(path, "final.keras"))
    return path


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_knn_eval_tool(model_dir):
    result = _run(["tools/knn_eval.py", f"--model_dir={model_dir}", "--k=5",
                   "--max_examples=100"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = _read(os.path.join(model_dir, "knn_eval.json"))
    assert 0.0 <= out["knn_top1"] <= 1.0
    assert (out["k"], out["num_train"], out["num_test"], out["image_size"]) == (5, 100, 100, S)
    assert out["dataset"] == "embedded_mnist"  # from config.json
    assert f"{100 * out['knn_top1']:.2f}%" in result.stdout


def test_linear_eval_tool(model_dir):
    # Fast mode only: a tool run costs ~10 s of CPU, and --mode=full differs from it by one
    # call to linear_eval_full (tested above).
    result = _run(["tools/linear_eval.py", f"--model_dir={model_dir}", "--mode=fast",
                   "--epochs=3", "--max_examples=100", "--batch_size=32"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = _read(os.path.join(model_dir, "linear_eval_fast.json"))
    assert out["mode"] == "fast" and len(out["history"]) == 3
    assert out["checkpoint"].endswith("final.keras") and out["num_train"] == 100
    assert out["lr"] == pytest.approx(0.2 * 32 / 256)
    assert 0.0 <= out["top1_last"] <= out["top1_best"] <= out["top5_best"] <= 1.0
    assert "linear (fast) epoch 3/3" in result.stdout
    assert f"top-1 best {100 * out['top1_best']:.2f}%" in result.stdout


def test_finetune_tool_records_the_subset(model_dir):
    result = _run(["tools/finetune.py", f"--model_dir={model_dir}", "--label_fraction=0.1",
                   "--epochs=1", "--max_examples=200", "--batch_size=16", "--subset_seed=3"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = _read(os.path.join(model_dir, "finetune_10pct.json"))
    subset = out["subset"]
    assert subset["seed"] == 3 and subset["fraction"] == 0.1
    assert subset["per_class_counts"] == [2] * 10 and subset["size"] == 20
    assert len(out["history"]) == 1 and "finetune epoch 1/1" in result.stdout


@pytest.mark.parametrize("tool", ["knn_eval", "linear_eval", "finetune"])
def test_missing_model_dir_is_a_one_line_error(tool, tmp_path):
    missing = str(tmp_path / "no_such_run")
    result = _run([f"tools/{tool}.py", f"--model_dir={missing}"], timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and missing in lines[0], lines


def test_linear_eval_tool_rejects_raw_pixels_in_full_mode(tmp_path):
    result = _run(["tools/linear_eval.py", f"--model_dir={tmp_path}", "--mode=full",
                   "--raw_pixels"], timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--raw_pixels works with --mode=fast only" in result.stderr
