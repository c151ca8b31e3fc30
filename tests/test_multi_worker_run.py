"""A whole multi-worker run through the CLI: two workers on 127.0.0.1, killed and restarted.

Two `python -m wcl_tf.train --strategy=multi_worker` processes (TF_CONFIG on free
loopback ports) share one model_dir, as workers on one machine or on a shared file
system do. The run is stopped and started again with the same commands, which must
finish it with the step count of an uninterrupted run:

- SIGKILL to both workers during epoch 2 (a lost machine, the OOM killer): the restart
  resumes both from the chief's epoch-1 checkpoint.
- SIGTERM to the non-chief worker only, during epoch 2 (one preempted VM): the workers
  agree to stop after the same step, the chief saves a mid-epoch checkpoint, both exit
  with status 143, and the restart resumes both mid-epoch. ~75 s more on a 2-core CPU,
  so it runs only with WCL_SLOW_TESTS=1 (it passed when this was written).

Only the chief writes the run folder: its TensorBoard files carry the writer's process
id, and all of them must be the chief's. A worker that acted alone (stopping on its own
SIGTERM, resuming from another checkpoint) would leave the other waiting in an
all-reduce: every wait here is bounded, and the processes are killed in `finally`.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import loopback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS, STEPS = 2, 6
ARGS = ["--config=demo", "--image_size=16", "--width=4", "--head_hidden_dim=16",
        "--head_output_dim=8", "--global_batch_size=16", f"--epochs={EPOCHS}",
        f"--steps_per_epoch={STEPS}", "--weak_aug_epochs=1", "--max_train_examples=256",
        "--max_eval_examples=64", "--knn_k=5", "--verbose=2", "--strategy=multi_worker"]
TIMEOUT_S = 240  # one phase takes ~60 s on a 2-core CPU; a hang waits this long


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


class _Workers:
    """The two worker processes of one attempt, logging to tmp_path/<name>_<i>.log."""

    def __init__(self, tmp_path, name, ports, model_dir):
        self.logs = [tmp_path / f"{name}_{i}.log" for i in range(2)]
        workers = [f"127.0.0.1:{p}" for p in ports]
        self.procs = []
        for i, log in enumerate(self.logs):
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="",
                       # Two processes share 2 cores: one op thread each, not two.
                       TF_NUM_INTRAOP_THREADS="1", TF_CONFIG=json.dumps(
                           {"cluster": {"worker": workers},
                            "task": {"type": "worker", "index": i}}))
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "wcl_tf.train", *ARGS, f"--model_dir={model_dir}"],
                    cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                    start_new_session=True))

    def output(self):
        return "".join(f"--- worker {i} ---\n{_read(log)[-2500:]}\n"
                       for i, log in enumerate(self.logs))

    def wait_for_line(self, text, worker=0):
        deadline = time.monotonic() + TIMEOUT_S
        while text not in _read(self.logs[worker]):
            if any(p.poll() is not None for p in self.procs):
                pytest.fail(f"a worker exited before {text!r}:\n" + self.output())
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} after {TIMEOUT_S} s:\n" + self.output())
            time.sleep(0.01)

    def wait(self):
        deadline = time.monotonic() + TIMEOUT_S
        for proc in self.procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"workers still running after {TIMEOUT_S} s:\n" + self.output())
        return [p.returncode for p in self.procs]

    def kill(self):
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _finish(tmp_path, name, ports, model_dir, chief_pids, resumed):
    """The same commands again: both workers log `resumed` and finish the run."""
    workers = _Workers(tmp_path, name, ports, model_dir)
    try:
        chief_pids.append(workers.procs[0].pid)
        codes = workers.wait()
    finally:
        workers.kill()
    out = workers.output()
    assert codes == [0, 0], out
    for log in workers.logs:
        assert resumed in _read(log), out
    with open(model_dir / "results.json") as f:
        results = json.load(f)
    assert results["optimizer_steps"] == EPOCHS * STEPS  # An uninterrupted run's count.
    assert results["replicas"] == 2
    ckpt = model_dir / "checkpoints"
    assert sorted(os.listdir(ckpt)) == [f"epoch_{e:03d}.keras" for e in range(1, EPOCHS + 1)]
    # Only the chief wrote TensorBoard files (their names end in <host>.<pid>.<n>.v2).
    events = glob.glob(str(model_dir / "logs" / "**" / "events.out.tfevents.*"),
                       recursive=True)
    assert events
    assert {int(os.path.basename(e).split(".")[-3]) for e in events} <= set(chief_pids)
    return results


def _until_epoch_2(tmp_path, ports, model_dir, chief_pids, then=None):
    """The first attempt: both workers started, `then(workers)` run once epoch 2 begins
    (nothing by default), then whatever still runs is SIGKILLed. Returns (workers, what
    `then` returned); the chief's pid is appended to chief_pids."""
    first = _Workers(tmp_path, "first", ports, model_dir)
    try:
        chief_pids.append(first.procs[0].pid)
        first.wait_for_line(f"Epoch 2/{EPOCHS}")
        result = then(first) if then is not None else None
    finally:
        first.kill()
    return first, result


def test_two_workers_sigkilled_in_epoch_2_resume_from_the_chiefs_checkpoint(tmp_path):
    model_dir = tmp_path / "run"
    ports = loopback.free_ports(2)
    chief_pids = []
    # Both workers SIGKILLed as epoch 2 starts ("Epoch 2/2": epoch 1 is checkpointed).
    first, _ = _until_epoch_2(tmp_path, ports, model_dir, chief_pids)
    assert not (model_dir / "results.json").exists()
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["epoch_001.keras"], first.output()
    results = _finish(tmp_path, "again", ports, model_dir, chief_pids,
                      f"resuming from epoch 1 of {EPOCHS}")
    assert results["resumed_from_epoch"] == 1


@pytest.mark.slow  # ~75 s more of two-worker runs (WCL_SLOW_TESTS=1)
def test_sigterm_to_one_worker_stops_both_after_the_same_step(tmp_path):
    model_dir = tmp_path / "run"
    ports = loopback.free_ports(2)
    chief_pids = []
    # SIGTERM to the non-chief only, during epoch 2 (one preempted VM): both must stop
    # after the same step (else one would wait in an all-reduce), the chief saving it.
    def preempt_non_chief(workers):
        workers.procs[1].send_signal(signal.SIGTERM)
        return workers.wait()

    first, codes = _until_epoch_2(tmp_path, ports, model_dir, chief_pids, preempt_non_chief)
    out = first.output()
    assert codes == [128 + signal.SIGTERM] * 2, out
    said = [[l for l in _read(log).splitlines() if "preempted (SIGTERM) at" in l]
            for log in first.logs]
    assert all(len(lines) == 1 for lines in said), out
    assert said[0] == said[1], out  # Same step, same checkpoint, on both workers.
    saved = int(said[0][0].split("optimizer step ")[1].split()[0])
    assert STEPS < saved < 2 * STEPS, said[0][0]
    assert sorted(os.listdir(model_dir / "checkpoints")) == [
        "epoch_001.keras", f"step_{saved:07d}.keras"]
    results = _finish(tmp_path, "again", ports, model_dir, chief_pids,
                      f"resuming in epoch 2 of {EPOCHS} at step {saved - STEPS} of {STEPS}")
    assert results["resumed_from_step"] == saved
