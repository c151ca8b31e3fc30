"""wcl_tf.run_folder: a model_dir on a local disk or behind a URL.

TensorFlow's in-memory file system (`ram://`) stands in for gs://: it is reached only
through tf.io.gfile, so anything that still uses os/open/zipfile on a path fails there.
A ram:// folder lives in this process only: the export tool runs in-process here.
"""

import io
import json
import uuid
import zipfile

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from wcl_tf import run_folder, training
from wcl_tf.config import Config

TINY = dict(dataset="embedded_mnist", image_size=16, backbone="small_cnn", width=4,
            head_hidden_dim=16, head_output_dim=8, global_batch_size=16, epochs=2,
            steps_per_epoch=2, warmup_epochs=1, weak_aug_epochs=1,
            max_eval_examples=100, knn_k=5, verbose=0)


def _ram_dir():
    return f"ram://wcl_test_{uuid.uuid4().hex}/run"


@pytest.fixture(params=["local", "ram"])
def folder(request, tmp_path):
    return str(tmp_path / "run") if request.param == "local" else _ram_dir()


def _fake_checkpoint(path, complete=True):
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as archive:
        archive.writestr("model.weights.h5", b"weights" * 100)
    value = data.getvalue()
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(value if complete else value[: len(value) // 2])  # Cut short: a kill.


def test_paths_keep_urls_as_given(tmp_path):
    assert run_folder.is_remote("gs://bucket/run") and run_folder.is_remote("ram://x/y")
    assert not run_folder.is_remote(str(tmp_path)) and not run_folder.is_remote("runs/demo")
    assert run_folder.join("gs://bucket/run", "config.json") == "gs://bucket/run/config.json"
    assert run_folder.parent("gs://bucket/run/final.keras") == "gs://bucket/run"
    assert (run_folder.checkpoint_path("gs://b/run", 7)
            == "gs://b/run/checkpoints/epoch_007.keras")
    assert run_folder.free_bytes("gs://bucket/run") is None
    assert run_folder.free_bytes(str(tmp_path)) > 0


def test_json_and_text_writes_are_atomic(folder):
    run_folder.ensure_writable(folder)
    path = run_folder.join(folder, "results.json")
    run_folder.write_json(path, {"a": 1})
    run_folder.write_json(path, {"a": 2, "b": [1, 2]})  # Replaces the existing file.
    assert run_folder.read_json(path) == {"a": 2, "b": [1, 2]}
    assert sorted(run_folder.listdir(folder)) == ["results.json"]  # No .tmp left behind.
    assert run_folder.read_json(run_folder.join(folder, "missing.json")) is None
    run_folder.write_text(run_folder.join(folder, "flags.txt"), "--epochs=1\n")
    assert run_folder.read_text(run_folder.join(folder, "flags.txt")) == "--epochs=1\n"
    assert run_folder.read_config(folder) is None
    run_folder.write_json(run_folder.join(folder, "config.json"), {"image_size": 16})
    assert run_folder.read_config(folder) == {"image_size": 16}


def test_history_csv_round_trip(folder):
    run_folder.makedirs(folder)
    rows = [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5, "knn_top1": 0.3}]
    run_folder.write_json(run_folder.join(folder, run_folder.STATE_FILE),
                          {"history": rows, "train_seconds": 3.0})
    run_folder.write_history_csv(folder, rows)
    header = run_folder.read_text(run_folder.join(folder, "history.csv")).splitlines()[0]
    assert header == "epoch,knn_top1,loss"
    got, state = run_folder.read_history(folder, 1)
    assert got == rows[:1] and state["train_seconds"] == 3.0


def test_latest_checkpoint_skips_an_incomplete_zip_and_pruning_keeps_the_newest(folder):
    assert run_folder.latest_checkpoint(folder) == (0, None)
    run_folder.makedirs(run_folder.join(folder, run_folder.CHECKPOINT_DIR))
    for epoch in range(1, 5):
        _fake_checkpoint(run_folder.checkpoint_path(folder, epoch))
    _fake_checkpoint(run_folder.checkpoint_path(folder, 5), complete=False)  # Cut short.
    tiny = run_folder.checkpoint_path(folder, 6)
    with tf.io.gfile.GFile(tiny, "wb") as f:
        f.write(b"PK")  # Shorter than a zip's end record.
    assert run_folder.is_complete(run_folder.checkpoint_path(folder, 4))
    assert not run_folder.is_complete(tiny) and not run_folder.is_zip(tiny)
    assert run_folder.latest_checkpoint(folder) == (4, run_folder.checkpoint_path(folder, 4))
    run_folder.prune_checkpoints(folder, keep=3)
    assert run_folder.checkpoint_epochs(folder) == [4, 5, 6]
    assert run_folder.latest_checkpoint(folder)[0] == 4


def test_save_and_load_a_keras_model(folder):
    import keras  # pylint: disable=import-outside-toplevel

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = run_folder.join(folder, run_folder.FINAL_CHECKPOINT)
    run_folder.makedirs(folder)
    run_folder.save_model(model, path)
    assert run_folder.is_complete(path)
    assert run_folder.listdir(folder) == ["final.keras"]  # The partial name is gone.
    loaded = run_folder.load_model(path)
    x = np.ones((1, 3), "float32")
    np.testing.assert_allclose(loaded(x), model(x))


def test_training_resume_and_export_on_a_url(tmp_path):
    """The README's gs:// recipe, with ram:// standing in for the bucket."""
    model_dir = _ram_dir()
    cfg = Config(model_dir=model_dir, keep_checkpoints=0, **TINY)
    lines = []
    first = training.run(cfg, log=lines.append)
    assert first["checkpoint"] == run_folder.join(model_dir, "final.keras")
    names = set(run_folder.listdir(model_dir))
    assert {"config.json", "train_state.json", "history.csv", "final.keras",
            "results.json", "checkpoints", "logs"} <= names
    assert run_folder.checkpoint_epochs(model_dir) == [1, 2]
    assert any(f.startswith("events") for _, _, files in
               tf.io.gfile.walk(run_folder.join(model_dir, "logs")) for f in files)
    assert run_folder.read_json(run_folder.join(model_dir, "results.json")) == first

    # As if killed during epoch 2: its checkpoint and the results are gone.
    run_folder.remove(run_folder.join(model_dir, "results.json"))
    run_folder.remove(run_folder.checkpoint_path(model_dir, 2))
    cfg = cfg.replace(keep_checkpoints=1)  # May change on resume.
    again = training.run(cfg, log=lines.append)
    assert again["resumed_from_epoch"] == 1 and again["completed_epochs"] == 2
    assert again["optimizer_steps"] == 2 * TINY["steps_per_epoch"]
    assert "resuming from epoch 1 of 2 (" in "\n".join(lines)
    # Epoch 1 was pruned only after epoch 2 was saved whole.
    assert run_folder.listdir(run_folder.join(model_dir, "checkpoints")) == [
        "epoch_002.keras"]
    assert training.run(cfg, log=lines.append) == again  # Finished: not trained again.

    # Export from the URL, in-process (another process cannot see this ram:// folder).
    from wcl_tf import export  # pylint: disable=import-outside-toplevel
    from wcl_tf.tools import export as export_tool  # pylint: disable=import-outside-toplevel

    export_dir = run_folder.join(model_dir, "export")
    argv = ["export", f"--model_dir={model_dir}"]
    flags.FLAGS(argv)
    # The tool's _main in-process (not its CLI in a subprocess): a ram:// folder lives in
    # this process only.
    try:
        assert export_tool._main(["export"]) == 0
    finally:
        flags.FLAGS.unparse_flags()
    assert export.read_preprocessing(export_dir)["image_size"] == TINY["image_size"]
    loaded = tf.saved_model.load(export_dir)
    images = tf.zeros([2, 20, 24, 3], tf.uint8)
    features = loaded.signatures["serving_default"](images=images)["features"]
    assert features.shape[0] == 2 and np.isfinite(features.numpy()).all()
    # And to a local folder.
    local = str(tmp_path / "exported")
    flags.FLAGS(argv[:1] + [f"--checkpoint={run_folder.join(model_dir, 'final.keras')}",
                            f"--export_dir={local}"])
    try:
        assert export_tool._main(["export"]) == 0
    finally:
        flags.FLAGS.unparse_flags()
    with open(f"{local}/assets/{export.PREPROCESSING_ASSET}") as f:
        assert json.load(f)["image_size"] == TINY["image_size"]
