"""Resumable training: a run killed with SIGKILL mid-epoch continues where it stopped.

The end-to-end test drives the command line in subprocesses (as a user or a preempted job
would); the in-process test checks that a restored model takes exactly the step the
original would have taken (weights, LARS momentum and iteration count all restored).
"""

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import zipfile

import h5py
import numpy as np
import pytest
import tensorflow as tf

from wcl_tf import checkpointing, distributed, run_folder, training
from wcl_tf.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EPOCHS, STEPS = 4, 6
PEAK_LR = 0.075 * math.sqrt(16)  # lr_scaling=sqrt, global batch 16
ARGS = ["--dataset=embedded_mnist", "--image_size=16", "--backbone=small_cnn", "--width=4",
        "--head_hidden_dim=16", "--head_output_dim=8", "--global_batch_size=16",
        f"--epochs={EPOCHS}", f"--steps_per_epoch={STEPS}", "--warmup_epochs=1",
        "--weak_aug_epochs=2", "--max_eval_examples=100", "--knn_k=5",
        "--eval_every_epochs=1", "--keep_checkpoints=0", "--verbose=2"]


def _expected_lr(step):
    """NumPy reference of the warm-up cosine schedule (warm-up 1 epoch) at `step`."""
    warmup, total = STEPS, EPOCHS * STEPS
    if step >= total:
        return 0.0
    if step < warmup:
        return PEAK_LR * (step + 1) / warmup
    return 0.5 * PEAK_LR * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _optimizer_steps(path):
    """optimizer.iterations stored in a .keras file (Keras keeps it as optimizer var 0)."""
    with zipfile.ZipFile(path) as archive:
        weights = archive.read("model.weights.h5")
    with h5py.File(io.BytesIO(weights), "r") as f:
        return int(f["optimizer/vars/0"][()])


def _command(model_dir):
    return [sys.executable, "-m", "wcl_tf.train", *ARGS, f"--model_dir={model_dir}"]


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def _wait_for(path, proc, deadline, log_path):
    while not os.path.exists(path):
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before writing {path}:\n"
                        + open(log_path).read()[-3000:])
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"no {path} after the time limit:\n" + open(log_path).read()[-3000:])
        time.sleep(0.01)
    return time.time()


# Slow tier (CI's 20 minutes): three training processes. In the default tier, the
# two-worker SIGKILL in epoch 2 (test_multi_worker_run) resumes from the chief's checkpoint,
# and test_preemption's SIGTERM mid-epoch resumes bit-identical to an uninterrupted run.
@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_completes_the_same_schedule(tmp_path):
    model_dir = tmp_path / "run"
    ckpt = model_dir / "checkpoints"
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_command(model_dir), cwd=ROOT, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 240
            t1 = _wait_for(ckpt / "epoch_001.keras", proc, deadline, log_path)
            t2 = _wait_for(ckpt / "epoch_002.keras", proc, deadline, log_path)
            time.sleep(max(0.5 * (t2 - t1), 0.05))  # About half-way through epoch 3.
            assert proc.poll() is None, "the run finished before it could be killed"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # Already gone (and reaped by poll).
                pass
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (model_dir / "results.json").exists()
    killed_after, _ = run_folder.latest_checkpoint(str(model_dir))
    assert 2 <= killed_after <= EPOCHS  # EPOCHS: killed after the last checkpoint.

    out = subprocess.run(_command(model_dir), cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resuming from epoch {killed_after} of {EPOCHS}" in out.stdout
    assert f"Epoch {killed_after}/{EPOCHS}" not in out.stdout
    if killed_after < EPOCHS:
        assert f"Epoch {killed_after + 1}/{EPOCHS}" in out.stdout

    # Every epoch checkpointed once, each after exactly epoch * STEPS optimizer steps.
    names = sorted(n for n in os.listdir(ckpt) if not n.startswith("."))
    assert names == [f"epoch_{e:03d}.keras" for e in range(1, EPOCHS + 1)]
    for e in range(1, EPOCHS + 1):
        assert _optimizer_steps(ckpt / f"epoch_{e:03d}.keras") == e * STEPS
    assert _optimizer_steps(model_dir / "final.keras") == EPOCHS * STEPS

    # history.csv: each epoch once, at the right schedule position (the LR logged at the
    # end of epoch e is the one of step e * STEPS: a restarted schedule would differ).
    with open(model_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert [int(float(r["optimizer_steps"])) for r in rows] == [
        e * STEPS for e in range(1, EPOCHS + 1)]
    np.testing.assert_allclose([float(r["learning_rate"]) for r in rows],
                               [_expected_lr(e * STEPS) for e in range(1, EPOCHS + 1)],
                               rtol=1e-5, atol=1e-7)
    assert all(r["knn_top1"] and r["loss"] for r in rows)

    with open(model_dir / "results.json") as f:
        results = json.load(f)
    assert results["optimizer_steps"] == EPOCHS * STEPS
    assert results["completed_epochs"] == EPOCHS
    assert results["resumed_from_epoch"] == killed_after
    assert [e for e, _ in results["knn_top1_per_epoch"]] == list(range(1, EPOCHS + 1))
    assert results["knn_top1"] == results["knn_top1_per_epoch"][-1][1]
    assert results["final_loss"] == pytest.approx(float(rows[-1]["loss"]))

    # The same command once more: the run is finished, nothing is trained or rewritten.
    final_mtime = os.path.getmtime(model_dir / "final.keras")
    again = subprocess.run(_command(model_dir), cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already holds a finished run" in again.stdout
    assert "Epoch " not in again.stdout
    assert os.path.getmtime(model_dir / "final.keras") == final_mtime
    with open(model_dir / "results.json") as f:
        assert json.load(f) == results


TINY = dict(dataset="embedded_mnist", image_size=16, backbone="small_cnn", width=4,
            head_hidden_dim=16, head_output_dim=8, global_batch_size=16, epochs=2,
            steps_per_epoch=3, warmup_epochs=1, weak_aug_epochs=1, verbose=0)


def test_restored_model_takes_the_same_next_step(tmp_path):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    cfg = Config(model_dir=str(tmp_path), **TINY)
    rng = np.random.default_rng(0)
    batch = {k: rng.uniform(size=(16, 16, 16, 3)).astype("float32")
             for k in ("view_1", "view_2")}
    data = tf.data.Dataset.from_tensors(batch).repeat()

    original = training.build(cfg, strategy, cfg.steps_per_epoch)
    original.fit(data, epochs=1, steps_per_epoch=3, verbose=0)
    path = run_folder.checkpoint_path(str(tmp_path), 1)
    os.makedirs(os.path.dirname(path))
    run_folder.save_model(original, path)
    assert run_folder.latest_checkpoint(str(tmp_path)) == (1, path)

    restored = training.build(cfg, strategy, cfg.steps_per_epoch)
    assert checkpointing.restore(restored, path, strategy) == 3
    momenta = [v for v in restored.optimizer.variables if "momentum" in v.path]
    assert momenta and any(np.abs(v.numpy()).max() > 0 for v in momenta)

    # One more step from each: identical only if momentum and the LR position match.
    for model in (original, restored):
        model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
    for a, b in zip(original.weights, restored.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert float(restored.optimizer.learning_rate) == pytest.approx(
        float(original.optimizer.learning_rate))


def test_restore_under_mirrored_strategy_fills_every_replica(tmp_path, two_replica_strategy):
    strategy = two_replica_strategy
    cfg = Config(model_dir=str(tmp_path), **TINY)
    rng = np.random.default_rng(1)
    saved = training.build(cfg, strategy, cfg.steps_per_epoch)
    with strategy.scope():
        saved.optimizer.build(saved.trainable_variables)
    for v in saved.weights + saved.optimizer.variables:  # Stand-in for trained state.
        v.assign(rng.integers(1, 100, size=v.shape).astype(v.dtype))
    path = str(tmp_path / "epoch_001.keras")
    run_folder.save_model(saved, path)

    restored = training.build(cfg, strategy, cfg.steps_per_epoch)
    steps = int(saved.optimizer.iterations.numpy())
    assert checkpointing.restore(restored, path, strategy) == steps
    pairs = list(zip(saved.weights + saved.optimizer.variables,
                     restored.weights + restored.optimizer.variables))
    assert len(pairs) == len(restored.weights) + len(saved.optimizer.variables)
    for a, b in pairs:
        for replica_value in strategy.experimental_local_results(b.value):
            np.testing.assert_array_equal(replica_value.numpy(), a.numpy())


def test_latest_checkpoint_skips_a_file_cut_short(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    with zipfile.ZipFile(ckpt / "epoch_001.keras", "w") as archive:
        archive.writestr("model.weights.h5", b"weights")
    data = (ckpt / "epoch_001.keras").read_bytes()
    (ckpt / "epoch_002.keras").write_bytes(data[: len(data) // 2])  # A kill mid-write.
    assert run_folder.latest_checkpoint(str(tmp_path)) == (1, str(ckpt / "epoch_001.keras"))
    assert run_folder.latest_checkpoint(str(tmp_path / "nothing")) == (0, None)


def test_resume_point_takes_a_newer_mid_epoch_checkpoint_over_the_epoch_one(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()

    def write(name):
        with zipfile.ZipFile(ckpt / name, "w") as archive:
            archive.writestr("model.weights.h5", b"weights")

    agreement = distributed.WorkerAgreement(tf.distribute.get_strategy())  # One process.
    point = checkpointing.resume_point(str(tmp_path), 3, agreement)
    assert point == checkpointing.ResumePoint(None, 0, 0, False)  # A new run.
    write("epoch_002.keras")
    write("step_0000005.keras")  # Older than epoch 2's end (step 6): superseded.
    point = checkpointing.resume_point(str(tmp_path), 3, agreement)
    assert point == checkpointing.ResumePoint(str(ckpt / "epoch_002.keras"), 6, 2, False)
    write("step_0000008.keras")  # Step 2 of epoch 3.
    point = checkpointing.resume_point(str(tmp_path), 3, agreement)
    assert point == checkpointing.ResumePoint(str(ckpt / "step_0000008.keras"), 8, 2, True)


def test_resumed_run_starts_the_data_pipeline_at_the_restored_step(tmp_path, monkeypatch):
    cfg = Config(model_dir=str(tmp_path), max_eval_examples=50, **{**TINY, "steps_per_epoch": 1})
    training.run(cfg, log=lambda msg: None)
    os.remove(tmp_path / "results.json")  # As if killed during epoch 2 ...
    os.remove(run_folder.checkpoint_path(str(tmp_path), 2))

    starts = []
    make = training.pipeline.distribute_pretrain_dataset

    def recording(strategy, config, initial_step=0):
        starts.append(initial_step)
        return make(strategy, config, initial_step=initial_step)

    monkeypatch.setattr(training.pipeline, "distribute_pretrain_dataset", recording)
    lines = []
    results = training.run(cfg, log=lines.append)  # ... and started again.
    assert starts == [1]  # Epoch 2 gets epoch 2's augmentation (strong: weak_aug_epochs=1).
    assert "resuming from epoch 1 of 2" in "\n".join(lines)
    assert results["optimizer_steps"] == 2 and results["resumed_from_epoch"] == 1
    assert [e for e, _ in results["knn_top1_per_epoch"]] == [2]  # eval_every_epochs=0
