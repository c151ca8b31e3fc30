"""An imported run folder goes through every tool (no PyTorch needed).

A ResNet-50 + heads checkpoint in the authors' layout (module.net.*, module.head1/2.*,
an optimizer entry) is written in torch.save's zip format by tests/torch_zip_writer.py
(the reader is checked against files PyTorch wrote in test_import_torch_reader.py and,
with torch installed, test_import_torch.py), imported with the CLI, then used by
knn_eval (default tier) and by export, linear_eval --mode=fast, finetune and one epoch of
continued pretraining with --init_from (slow tier: ResNet-50 on this CPU). The backbone is the real
resnet50; the images are 32 px and the heads small (64/32: the import reads head sizes
from the weight shapes) to keep it cheap on a CPU.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import torch_zip_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN, OUT = 64, 32


def _run(module, *args):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                            text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _images(root):
    """folder dataset: train/ and test/, two classes (dark / bright), 4 images each."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, level in (("dark", 60), ("bright", 190)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.normal(level, 30, (40, 40, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return f"folder:{root}"


def _checkpoint(path):
    """Random weights of the right shapes in the authors' DDP layout, BN variance > 0."""
    from wcl_tf import torch_import

    info = {"layout": torch_import.PRETRAINING, "head_hidden_dim": HIDDEN,
            "head_output_dim": OUT}
    model, _, _ = torch_import.build_models(info)
    rng = np.random.default_rng(0)
    state = {}
    for key, shape, _, _ in torch_import.targets(model):
        value = rng.normal(0, 0.05, shape)
        if key.endswith("running_var") or key.endswith(".weight") and len(shape) == 1:
            value = 1.0 + np.abs(value)
        state["module." + key] = value.astype(np.float32)
    first = next(iter(state))
    torch_zip_writer.save({"model": state, "epoch": 3,
                           "optimizer": {"state": {0: {"momentum_buffer": state[first]}}}},
                          str(path))
    return state


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("import_tools")
    state = _checkpoint(root / "wcl-3.pth")
    run = root / "run"
    log = _run("wcl_tf.tools.import_torch", f"--checkpoint={root / 'wcl-3.pth'}",
               f"--model_dir={run}", "--image_size=32")
    assert "imported" in log
    return root, run, state, _images(root / "images")


def test_import_then_knn_eval(imported):
    from wcl_tf import export

    _, run, state, dataset = imported
    config = json.loads((run / "config.json").read_text())
    assert (config["backbone"], config["head_hidden_dim"], config["head_output_dim"]) == (
        "resnet50", HIDDEN, OUT)
    record = json.loads((run / "import_record.json").read_text())
    assert record["skipped"]["top_level_entries"] == ["epoch", "optimizer"]
    model = export.load_checkpoint(str(run / "final.keras"))
    np.testing.assert_array_equal(model.get_layer("backbone").get_layer("conv1").kernel.numpy(),
                                  state["module.net.conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        model.graph_head.get_layer("graph_head_fc3").kernel.numpy(),
        state["module.head2.linear3.weight"].T)

    log = _run("wcl_tf.tools.knn_eval", f"--model_dir={run}", f"--dataset={dataset}",
               "--eval_split=test", "--k=3")
    assert "kNN top-1" in log
    assert json.loads((run / "knn_eval.json").read_text())["knn_top1"] >= 0.0


@pytest.mark.slow
def test_import_then_export(imported):
    import tensorflow as tf

    from wcl_tf import export

    root, run, _, _ = imported
    model = export.load_checkpoint(str(run / "final.keras"))
    _run("wcl_tf.tools.export", f"--model_dir={run}", f"--export_dir={root / 'export'}")
    served = tf.saved_model.load(str(root / "export")).signatures["serving_default"]
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = served(images=tf.constant(images))["features"].numpy()
    np.testing.assert_allclose(out, model.backbone(images / 255.0, training=False).numpy(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_import_then_linear_eval_finetune_and_continued_pretraining(imported):
    root, run, _, dataset = imported
    _run("wcl_tf.tools.linear_eval", f"--model_dir={run}", f"--dataset={dataset}",
         "--eval_split=test", "--mode=fast", "--epochs=2", "--batch_size=8")
    assert (run / "linear_eval_fast.json").exists()
    _run("wcl_tf.tools.finetune", f"--model_dir={run}", f"--dataset={dataset}",
         "--eval_split=test", "--epochs=1", "--label_fraction=0.5", "--batch_size=4")
    assert list(run.glob("finetune_*.json"))
    log = _run("wcl_tf.train", f"--init_from={run}", f"--model_dir={root / 'continued'}",
               f"--dataset={dataset}", "--eval_split=test", "--backbone=resnet50",
               f"--head_hidden_dim={HIDDEN}", f"--head_output_dim={OUT}", "--image_size=32",
               "--epochs=1", "--warmup_epochs=0", "--weak_aug_epochs=0", "--global_batch_size=4",
               "--augment_on=host", "--knn_k=3", "--verbose=2")
    assert f"initialised the backbone and both heads from {run}" in log
    assert json.loads((root / "continued" / "results.json").read_text())["optimizer_steps"] == 2


@pytest.mark.slow
def test_init_from_copies_backbone_and_heads(imported, tmp_path):
    import tensorflow as tf

    from wcl_tf import export, warm_start
    from wcl_tf.config import ConfigError
    from wcl_tf.models.wcl_model import build_wcl_model

    _, run, _, _ = imported
    fresh = build_wcl_model("resnet50", head_hidden_dim=HIDDEN, head_output_dim=OUT,
                            image_size=32)
    warm_start.initialise(fresh, str(run), tf.distribute.get_strategy())
    source = export.load_checkpoint(str(run / "final.keras"))
    for a, b in zip(source.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    other = build_wcl_model("small_cnn", width=4, head_hidden_dim=8, head_output_dim=4,
                            image_size=16)
    with pytest.raises(ConfigError, match="architecture"):
        warm_start.initialise(other, str(run), tf.distribute.get_strategy())
    with pytest.raises(ConfigError, match="not found"):
        warm_start.initialise(other, str(tmp_path), tf.distribute.get_strategy())
