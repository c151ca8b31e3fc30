"""The paper-shaped run: the r50 multi-crop config on the generated stand-in for ImageNet,
killed and resumed.

--config=r50_multicrop as shipped (ResNet-50, heads 4096/256, 224 px global views and six
96 px local crops, LARS, blur, the weak -> strong switch), on variable-size JPEGs read as a
TFDS stream in several files (fused decode-and-crop), 2 replicas (MirroredStrategy over two
logical CPU devices, tests/paper_shaped_run.py), --steps_per_execution=2 and
--augment_on=device. Scaled down only where the CPU forces it: global batch 4 (2 per
replica), 2 epochs of 4 steps (warm-up and weak augmentation 1 epoch each), a kNN over 16
images. The resolutions are the config's; the backbone is the config's ResNet-50 in one
case and a small CNN in the other (on the 2-core CPU shared with other jobs where this was
written, a ResNet-50 process reached its first execution 12 minutes after it started).

The run gets SIGTERM in epoch 2 (after epoch 1's checkpoint): it saves a mid-epoch
checkpoint and exits with 143; the same command resumes from that step mid-epoch (the
stream skips the epoch's earlier images) and must end with the uninterrupted run's step
count and checkpoint, weight for weight. Slow tier: minutes on a 2-core CPU.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fake_imagenet as stand_in
from test_preemption import _history, _optimizer_steps, _read, _weights

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_shaped_run.py")
EPOCHS, STEPS = 2, 4  # STEPS divisible by --steps_per_execution
TIMEOUT_S = 1800


# The config's ResNet-50, and a small CNN in its place: the same run (resolutions, crops,
# replicas, executions, kill and resume) in a few minutes where ResNet-50's take an hour.
BACKBONES = {"resnet50": [], "small_cnn": ["--backbone=small_cnn", "--width=8"]}


def _command(data_dir, model_dir, backbone):
    return [sys.executable, RUNNER, "--config=r50_multicrop", *BACKBONES[backbone],
            f"--dataset={stand_in.NAME}",
            f"--data_dir={data_dir}", "--global_batch_size=4", f"--epochs={EPOCHS}",
            f"--steps_per_epoch={STEPS}", "--warmup_epochs=1", "--weak_aug_epochs=1",
            "--steps_per_execution=2", "--augment_on=device", "--strategy=mirrored",
            "--max_eval_examples=16", "--knn_k=5", "--verbose=2", f"--model_dir={model_dir}"]


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="",
                PYTHONPATH=os.pathsep.join(
                    p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_r50_multicrop_on_two_replicas_killed_and_resumed_ends_as_uninterrupted(
        fake_imagenet, tmp_path, backbone):
    ref_dir, model_dir = tmp_path / "reference", tmp_path / "run"
    ref_log, log_path = tmp_path / "reference.log", tmp_path / "first.log"
    with open(ref_log, "w") as ref_out, open(log_path, "w") as log:
        reference = subprocess.Popen(_command(fake_imagenet, ref_dir, backbone), cwd=ROOT, env=_env(),
                                     stdout=ref_out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        proc = subprocess.Popen(_command(fake_imagenet, model_dir, backbone), cwd=ROOT, env=_env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            # Keras prints "Epoch 2/2" once epoch 1 is checkpointed: epoch 2 is starting.
            while f"Epoch 2/{EPOCHS}" not in _read(log_path):
                assert proc.poll() is None, "exited before epoch 2:\n" + _read(log_path)[-3000:]
                assert time.monotonic() < deadline, "no epoch 2:\n" + _read(log_path)[-3000:]
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=TIMEOUT_S)
            ref_rc = reference.wait(timeout=TIMEOUT_S)
        finally:
            for p in (proc, reference):
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
    out = _read(log_path)
    assert ref_rc == 0, _read(ref_log)[-3000:]
    assert (f"{backbone} on {stand_in.NAME} (224 px), 2 replica(s), global batch 4, "
            f"{STEPS} steps x {EPOCHS} epochs") in out, out[-3000:]
    assert "augmentation on the device" in out, out[-3000:]
    assert rc == 128 + signal.SIGTERM, f"exit status {rc}:\n{out[-3000:]}"
    line = next(l for l in out.splitlines() if "preempted (SIGTERM) at optimizer step" in l)
    saved = int(line.split("optimizer step ")[1].split()[0])
    # Mid-epoch 2, after one execution of 2 steps.
    assert saved == STEPS + 2, line
    assert _optimizer_steps(model_dir / "checkpoints" / f"step_{saved:07d}.keras") == saved

    again = subprocess.run(_command(fake_imagenet, model_dir, backbone), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=TIMEOUT_S)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming in epoch 2 of {EPOCHS} at step 2 of {STEPS}" in again.stdout, (
        again.stdout[-3000:])

    ours, ref = _weights(model_dir / "final.keras"), _weights(ref_dir / "final.keras")
    assert _optimizer_steps(model_dir / "final.keras") == EPOCHS * STEPS
    assert _optimizer_steps(ref_dir / "final.keras") == EPOCHS * STEPS
    assert ours.keys() == ref.keys()
    for name in ref:
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)
    rows, ref_rows = _history(model_dir), _history(ref_dir)
    assert [r["optimizer_steps"] for r in rows] == [r["optimizer_steps"] for r in ref_rows]
    assert [r["learning_rate"] for r in rows] == [r["learning_rate"] for r in ref_rows]
