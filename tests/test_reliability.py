"""Checkpoints survive faults: SIGKILL while a checkpoint is being written leaves the
previous one as the newest loadable checkpoint, and the same command resumes from it;
checkpoints load in Keras safe mode, so a .keras file carrying code is refused."""

import os
import signal
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

from wcl_tf import run_folder
from wcl_tf.export import load_checkpoint

_SCRIPT = os.path.join(os.path.dirname(__file__), "checkpoint_kill_run.py")


def _run(model_dir, kill_at):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, _SCRIPT, str(model_dir), str(kill_at)],
                          capture_output=True, text=True, timeout=600, env=env)


# Slow tier (CI's 20 minutes): two training processes. In the default tier,
# test_resume::test_latest_checkpoint_skips_a_file_cut_short checks that a file cut short
# by a kill is skipped, and the SIGKILL / SIGTERM end-to-end runs resume from the newest.
@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_loses_nothing_saved(tmp_path):
    model_dir = tmp_path / "run"
    killed = _run(model_dir, kill_at=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    folder = model_dir / "checkpoints"
    partial = folder / ".epoch_002.partial.keras"
    # The kill really landed mid-write: a half file exists, and it is not a valid archive.
    assert partial.exists() and partial.stat().st_size > 0
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(partial)
    assert not (folder / "epoch_002.keras").exists()
    epochs_done, path = run_folder.latest_checkpoint(str(model_dir))
    assert epochs_done == 1
    model = load_checkpoint(path)
    assert all(np.isfinite(w).all() for w in model.get_weights())
    # The same command resumes from epoch 1 and finishes all 3 epochs.
    rerun = _run(model_dir, kill_at=0)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "RESUMED_FROM 1 COMPLETED 3" in rerun.stdout
    assert run_folder.latest_checkpoint(str(model_dir))[0] == 3


def test_checkpoint_with_code_is_refused(tmp_path):
    """A .keras file whose config carries a Python lambda (arbitrary code) is not loaded."""
    marker = tmp_path / "code_ran"
    inputs = keras.Input((2,))
    outputs = keras.layers.Lambda(
        lambda x, path=str(marker): (open(path, "w").close(), x)[1])(inputs)
    path = str(tmp_path / "untrusted.keras")
    keras.Model(inputs, outputs).save(path)
    marker.unlink()  # Building the model above ran the lambda once.
    with pytest.raises(ValueError, match="safe_mode"):
        load_checkpoint(path)
    assert not marker.exists()


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for epoch in range(1, 6):
        (folder / f"epoch_{epoch:03d}.keras").write_bytes(b"x")
    run_folder.prune_checkpoints(str(tmp_path), keep=2)
    assert sorted(os.listdir(folder)) == ["epoch_004.keras", "epoch_005.keras"]
