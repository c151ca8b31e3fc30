"""Serving SavedModel of the encoder: fresh-process serving, signatures, size, fine-tuning, CLI."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from wcl_tf import export
from wcl_tf.models.wcl_model import WCLModel, build_wcl_model

S = 16  # exported image size
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}


def _tiny_model(seed=3):
    """The tiny test model with every backbone variable (BN statistics too) made non-trivial,
    so a wrong BN mode or a variable not restored changes the features."""
    keras.utils.set_random_seed(seed)
    model = build_wcl_model("small_cnn", head_hidden_dim=16, head_output_dim=8, width=4,
                            image_size=S)
    rng = np.random.default_rng(seed)
    for v in model.backbone.variables:
        if "moving_variance" in v.path or "gamma" in v.path:
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype(np.float32))
        elif "moving_mean" in v.path or "beta" in v.path:
            v.assign(rng.normal(0.0, 0.3, v.shape).astype(np.float32))
    return model


def _reference_features(backbone, images_uint8):
    x = tf.image.resize(tf.cast(images_uint8, tf.float32), [S, S], method="bilinear",
                        antialias=False) / 255.0
    return backbone(x, training=False).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _tiny_model()
    path = str(tmp_path_factory.mktemp("export") / "encoder")
    spec = export.export_encoder(model, path, S)
    return model, path, spec


def test_serving_default_in_a_fresh_process_without_wcl_tf(exported, tmp_path):
    model, path, spec = exported
    rng = np.random.default_rng(0)
    images = {
        "same": rng.integers(0, 256, (3, S, S, 3), dtype=np.uint8),
        "other": rng.integers(0, 256, (2, 23, 11, 3), dtype=np.uint8),  # not S x S
    }
    floats = rng.uniform(size=(2, S, S, 3)).astype(np.float32)
    for name, x in images.items():
        np.save(tmp_path / f"{name}.npy", x)
    np.save(tmp_path / "floats.npy", floats)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import tensorflow as tf
        loaded = tf.saved_model.load({path!r})
        serve = loaded.signatures["serving_default"]
        for name in ("same", "other"):
            x = tf.constant(np.load(name + ".npy"))
            np.save(name + "_features.npy", serve(images=x)["features"].numpy())
        pre = loaded.signatures["preprocessed"](images=tf.constant(np.load("floats.npy")))
        np.save("floats_features.npy", pre["features"].numpy())
        with open(loaded.preprocessing_asset.asset_path.numpy().decode()) as f:
            print(json.dumps(json.load(f)))
        assert "wcl_tf" not in sys.modules, "the SavedModel pulled in wcl_tf"
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=QUIET_ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    for name, x in images.items():
        served = np.load(tmp_path / f"{name}_features.npy")
        assert served.shape == (x.shape[0], spec["feature_dim"]) and served.dtype == np.float32
        np.testing.assert_allclose(served, _reference_features(model.backbone, x), atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "floats_features.npy"),
                               model.backbone(floats, training=False).numpy(), atol=1e-5)
    # Features are not all alike: a constant encoder would pass the comparisons above.
    assert np.abs(np.diff(np.load(tmp_path / "same_features.npy"), axis=0)).max() > 1e-3

    asset = json.loads(result.stdout.strip().splitlines()[-1])
    assert asset == export.read_preprocessing(path)
    assert asset["image_size"] == S and asset["feature_dim"] == 32
    assert asset["resize"]["mode"] == "direct" and asset["resize"]["method"] == "bilinear"
    assert asset["resize"]["antialias"] is False
    assert asset["normalization"]["inside_model"] is True
    assert {k: spec[k] for k in asset} == asset  # export_encoder returns the same contract


def test_saved_model_cli_lists_both_signatures(exported):
    _, path, _ = exported
    cli = shutil.which("saved_model_cli")
    command = ([cli] if cli else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"])
    result = subprocess.run(command + ["show", "--dir", path, "--all"], env=QUIET_ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "signature_def['serving_default']" in out
    assert "signature_def['preprocessed']" in out
    serving = out.split("signature_def['serving_default']")[1].split("signature_def[")[0]
    preprocessed = out.split("signature_def['preprocessed']")[1].split("signature_def[")[0]
    assert "DT_UINT8" in serving and "(-1, -1, -1, 3)" in serving
    assert "DT_FLOAT" in preprocessed and f"(-1, {S}, {S}, 3)" in preprocessed
    assert "outputs['features']" in serving and "outputs['features']" in preprocessed


def test_variables_are_stored_once(exported, tmp_path):
    model, path, spec = exported
    backbone = model.backbone
    stored = export.saved_variable_bytes(path)
    graph_bytes = stored.pop(export.OBJECT_GRAPH_KEY)
    assert len(stored) == len(backbone.variables)  # one checkpoint entry per variable
    assert sum(stored.values()) == export.variable_bytes(backbone) == spec["variable_bytes"]
    # The folder holds the values once plus the object-graph description and an index.
    assert spec["variables_dir_bytes"] <= 1.1 * spec["variable_bytes"] + graph_bytes
    assert spec["object_graph_bytes"] == graph_bytes

    # A wider (still small) bare backbone: the object graph is negligible, within 10 %.
    keras.utils.set_random_seed(0)
    wide = build_wcl_model("small_cnn", head_hidden_dim=16, head_output_dim=8, width=16,
                           image_size=S).backbone
    wide_spec = export.export_encoder(wide, str(tmp_path / "wide"), S)
    ratio = wide_spec["variables_dir_bytes"] / wide_spec["variable_bytes"]
    assert wide_spec["variable_bytes"] > 300_000
    assert 1.0 <= ratio <= 1.1, ratio


def test_tfsm_layer_fine_tuning_trains_the_encoder(exported):
    model, path, _ = exported
    backbone = model.backbone
    encoder = export.load_encoder_for_finetuning(path)
    assert len(encoder.trainable_weights) == len(backbone.trainable_variables) > 0
    assert len(encoder.non_trainable_weights) == len(backbone.non_trainable_variables)

    rng = np.random.default_rng(1)
    x = rng.uniform(size=(8, S, S, 3)).astype(np.float32)
    y = np.arange(8) % 3
    np.testing.assert_allclose(encoder(x).numpy(), backbone(x, training=False).numpy(),
                               atol=1e-5)

    keras.utils.set_random_seed(2)
    classifier = keras.Sequential([keras.Input((S, S, 3)), encoder, keras.layers.Dense(3)])
    classifier.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    trainable_before = [w.numpy().copy() for w in encoder.trainable_weights]
    frozen_before = [w.numpy().copy() for w in encoder.non_trainable_weights]
    loss_before = classifier.evaluate(x, y, verbose=0)
    history = classifier.fit(x, y, batch_size=8, epochs=3, verbose=0)  # 3 steps
    loss_after = classifier.evaluate(x, y, verbose=0)

    assert len(history.history["loss"]) == 3
    assert loss_after < loss_before
    moved = [np.abs(a - w.numpy()).max() for a, w in zip(trainable_before,
                                                          encoder.trainable_weights)]
    assert min(moved) > 0 and max(moved) > 1e-4, moved  # every wrapped variable changed
    for a, w in zip(frozen_before, encoder.non_trainable_weights):
        np.testing.assert_array_equal(a, w.numpy())  # BN statistics stay in inference mode


def test_load_checkpoint_round_trip(tmp_path):
    model = _tiny_model()
    path = str(tmp_path / "final.keras")
    model.save(path)
    loaded = export.load_checkpoint(path)
    assert isinstance(loaded, WCLModel)
    x = np.random.default_rng(4).uniform(size=(2, S, S, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-6)


def _run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "export.py"), *args],
                          env=QUIET_ENV, cwd=REPO, capture_output=True, text=True,
                          timeout=180)


def test_cli_exports_a_checkpoint_from_a_model_dir(tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    model = _tiny_model()
    model.save(str(model_dir / "final.keras"))
    size = 20  # from config.json, not the default or the built size
    (model_dir / "config.json").write_text(json.dumps({"image_size": size, "epochs": 1}))
    out_dir = tmp_path / "exported"

    result = _run_cli(f"--model_dir={model_dir}", f"--export_dir={out_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "serving_default" in result.stdout and "preprocessed" in result.stdout
    assert "Variable bytes" in result.stdout and "Export size" in result.stdout
    assert "Traceback" not in result.stderr
    assert export.read_preprocessing(str(out_dir))["image_size"] == size

    loaded = tf.saved_model.load(str(out_dir))
    x = np.random.default_rng(5).uniform(size=(2, size, size, 3)).astype(np.float32)
    features = loaded.signatures["preprocessed"](images=tf.constant(x))["features"].numpy()
    np.testing.assert_allclose(features, model.backbone(x, training=False).numpy(), atol=1e-5)


@pytest.mark.parametrize("flag", ["--checkpoint", "--model_dir"])
def test_cli_missing_checkpoint_is_one_line(tmp_path, flag):
    missing = tmp_path / "no_run"
    value = missing / "final.keras" if flag == "--checkpoint" else missing
    result = _run_cli(f"{flag}={value}", f"--export_dir={tmp_path / 'out'}")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(missing / "final.keras") in lines[0]
    assert "wcl_tf.train" in lines[0]  # says how to produce one
    assert not (tmp_path / "out").exists()
