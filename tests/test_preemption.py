"""Preemption: SIGTERM mid-epoch saves a mid-epoch checkpoint, and the same command resumes.

The end-to-end test drives the command line (`--config=demo`, shrunk) in subprocesses, as
a preempted job would be: SIGTERM during epoch 2, exit status 143 with a message naming
the saved step, then the same command again. The resumed run must end bit-identical to
an uninterrupted run of the same command (the module's reference, which trains alongside
the interrupted one): same optimizer step count, weights, momentum, schedule position
and history. Without the preemption guard SIGTERM ends the process at once (status -15),
with nothing saved since epoch 1, and this test fails.

The in-process test runs a multi-worker run's non-chief worker (the two-worker run
itself: tests/test_multi_worker_run.py): it must resume from the chief's checkpoint and
write nothing to the run folder, and a signal in an epoch's last step stops it after
that epoch, whose checkpoint holds the state (no mid-epoch save).
"""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from wcl_tf import run_folder, strategy as strategy_lib, training
from wcl_tf.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS, STEPS = 3, 12
ARGS = ["--config=demo", "--image_size=16", "--width=4", "--head_hidden_dim=16",
        "--head_output_dim=8", "--global_batch_size=16", f"--epochs={EPOCHS}",
        f"--steps_per_epoch={STEPS}", "--weak_aug_epochs=2", "--max_train_examples=512",
        "--max_eval_examples=100", "--knn_k=5", "--verbose=2"]
TIMEOUT_S = 240  # one run takes ~25 s on an idle 2-core CPU


def _command(model_dir):
    return [sys.executable, "-m", "wcl_tf.train", *ARGS, f"--model_dir={model_dir}"]


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def _read(path):
    with open(path, errors="replace") as f:
        return f.read()


def _weights(path):
    """{name: array} of every variable in a .keras file (model and optimizer)."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read("model.weights.h5")
    arrays = {}
    with h5py.File(io.BytesIO(data), "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return arrays


def _optimizer_steps(path):
    return int(_weights(path)["optimizer/vars/0"])


def _history(model_dir):
    with open(os.path.join(model_dir, "history.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the same command, started at once (it trains while the
    interrupted run does); call the fixture's value to wait for its model_dir."""
    folder = tmp_path_factory.mktemp("reference")
    log = open(folder / "log.txt", "w")
    proc = subprocess.Popen(_command(folder / "run"), cwd=ROOT, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def finished():
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail("the reference run did not finish:\n" + _read(folder / "log.txt")[-3000:])
        assert proc.returncode == 0, _read(folder / "log.txt")[-3000:]
        return folder / "run"

    try:
        yield finished
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_sigterm_mid_epoch_saves_the_step_and_the_same_command_resumes(tmp_path, reference):
    model_dir = tmp_path / "run"
    ckpt = model_dir / "checkpoints"
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_command(model_dir), cwd=ROOT, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            # Keras prints "Epoch 2/3" once epoch 1 is checkpointed: epoch 2 is starting.
            while f"Epoch 2/{EPOCHS}" not in _read(log_path):
                assert proc.poll() is None, "exited before epoch 2:\n" + _read(log_path)[-3000:]
                assert time.monotonic() < deadline, "no epoch 2:\n" + _read(log_path)[-3000:]
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    out = _read(log_path)
    assert rc == 128 + signal.SIGTERM, f"exit status {rc}:\n{out[-3000:]}"
    assert "Run the same command again to resume" in out, out[-3000:]
    line = next(l for l in out.splitlines() if "preempted (SIGTERM) at optimizer step" in l)
    saved = int(line.split("optimizer step ")[1].split()[0])
    assert STEPS < saved < 2 * STEPS, line  # In epoch 2, not at its end.
    assert f"(epoch 2 of {EPOCHS}, step {saved - STEPS} of {STEPS})" in line

    # The mid-epoch checkpoint holds that step; epoch 1's checkpoint is untouched.
    mid = ckpt / f"step_{saved:07d}.keras"
    assert str(mid) in line
    assert run_folder.is_complete(str(mid)) and _optimizer_steps(mid) == saved
    assert sorted(os.listdir(ckpt)) == ["epoch_001.keras", mid.name]
    assert _optimizer_steps(ckpt / "epoch_001.keras") == STEPS
    assert not (model_dir / "results.json").exists()
    assert not (model_dir / "final.keras").exists()

    again = subprocess.run(_command(model_dir), cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=TIMEOUT_S)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (f"resuming in epoch 2 of {EPOCHS} at step {saved - STEPS} of {STEPS} "
            f"({mid}, optimizer step {saved})") in again.stdout
    assert "Epoch 1/" not in again.stdout
    assert f"Epoch 2/{EPOCHS}" in again.stdout and f"Epoch {EPOCHS}/{EPOCHS}" in again.stdout

    # The next epoch checkpoint superseded the mid-epoch one; every epoch saved once.
    assert sorted(os.listdir(ckpt)) == [f"epoch_{e:03d}.keras" for e in range(1, EPOCHS + 1)]
    for e in range(1, EPOCHS + 1):
        assert _optimizer_steps(ckpt / f"epoch_{e:03d}.keras") == e * STEPS
    with open(model_dir / "results.json") as f:
        results = json.load(f)
    assert results["optimizer_steps"] == EPOCHS * STEPS
    assert results["resumed_from_epoch"] == 1 and results["resumed_from_step"] == saved

    # The same as the uninterrupted run: the step in flight was the only thing at stake,
    # and it was finished and saved. Weights, BN statistics, LARS momentum and the
    # iteration count are bit-identical (same batches, augmentation draws, LR positions).
    ref_dir = reference()
    ours, ref = _weights(model_dir / "final.keras"), _weights(ref_dir / "final.keras")
    assert ours.keys() == ref.keys()
    for name in ref:
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)
    rows, ref_rows = _history(model_dir), _history(ref_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert [r["optimizer_steps"] for r in rows] == [r["optimizer_steps"] for r in ref_rows]
    assert [r["learning_rate"] for r in rows] == [r["learning_rate"] for r in ref_rows]
    # Epoch 2's loss averages only its steps after the resume; epochs 1 and 3 match.
    for e in (0, 2):
        assert float(rows[e]["loss"]) == pytest.approx(float(ref_rows[e]["loss"]), rel=1e-6)


TINY = dict(dataset="embedded_mnist", image_size=16, backbone="small_cnn", width=4,
            head_hidden_dim=16, head_output_dim=8, global_batch_size=16, epochs=3,
            steps_per_epoch=3, warmup_epochs=1, weak_aug_epochs=1, max_eval_examples=50,
            knn_k=5, verbose=0)
STEPS_TINY = TINY["steps_per_epoch"]


class _SigtermAt(keras.callbacks.Callback):
    """Sends SIGTERM to this process as batch `batch` of epoch `epoch` (0-based) begins."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at, self.epoch = (epoch, batch), None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_non_chief_writes_nothing_resumes_from_the_chiefs_checkpoint_stops_on_sigterm(
        tmp_path, monkeypatch):
    cfg = Config(model_dir=str(tmp_path), **TINY)
    # The chief's epoch-1 checkpoint (untrained weights will do: only the step counts).
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    chief = training.build(cfg, strategy, STEPS_TINY)
    with strategy.scope():
        chief.optimizer.build(chief.trainable_variables)
    chief.optimizer.iterations.assign(STEPS_TINY)
    os.makedirs(tmp_path / "checkpoints")
    run_folder.save_model(chief, run_folder.checkpoint_path(str(tmp_path), 1))
    listing = {p: os.stat(p).st_mtime_ns for p in map(str, tmp_path.rglob("*"))}

    # A multi-worker run's non-chief: nothing may be written, created or deleted there.
    monkeypatch.setattr(strategy_lib, "is_chief", lambda name: False)

    def refuse(*args, **kwargs):
        raise AssertionError(f"a non-chief worker wrote to the run folder: {args[:1]}")

    for name in ("write_text", "save_model", "makedirs", "ensure_writable", "remove",
                 "write_history_csv", "prune_checkpoints", "remove_mid_epoch_checkpoints"):
        monkeypatch.setattr(run_folder, name, refuse)
    monkeypatch.setattr(keras.callbacks, "TensorBoard", refuse)
    ready, lines = [], []
    before = signal.getsignal(signal.SIGTERM)
    # SIGTERM in epoch 2's last step: no mid-epoch save; training stops once the epoch
    # has ended (its checkpoint, the chief's job, holds the state).
    with pytest.raises(training.Preempted, match=r"after epoch 2 of 3 \(optimizer step 6\)"):
        training.run(cfg, log=lines.append, on_ready=ready.append,
                     callbacks=[_SigtermAt(1, STEPS_TINY - 1)])
    assert signal.getsignal(signal.SIGTERM) is before  # The handler is given back.
    assert "resuming from epoch 1 of 3" in "\n".join(lines)
    assert ready == []  # The CLI writes flags.txt in on_ready: not on a non-chief.
    assert {p: os.stat(p).st_mtime_ns for p in map(str, tmp_path.rglob("*"))} == listing
