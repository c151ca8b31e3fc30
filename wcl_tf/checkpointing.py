"""A pretraining run's saved state: the settings that bind model_dir, where a run
resumes, restoring that state, and the saves that make resuming exact (after every
epoch, and mid-epoch on SIGTERM).

What model_dir holds, and how a run resumes (file names, safe writes and reads:
wcl_tf/run_folder.py; model_dir may be a local folder or a URL such as gs://bucket/run):

    config.json               the settings; a run with other settings is refused
    checkpoints/epoch_NNN.keras   model + optimizer (LARS momentum, iteration count) after
                              epoch NNN (1-based); written to a hidden file and renamed,
                              and only taken when its zip reads whole
    checkpoints/step_NNNNNNN.keras  the same after optimizer step N, in the middle of an
                              epoch: written on SIGTERM (preemption), deleted once a later
                              epoch checkpoint reads whole
    train_state.json          per-epoch logs of every finished epoch (loss, kNN, learning
                              rate, optimizer_steps), kNN of the random encoder, training
                              seconds so far; written just before the checkpoint
    history.csv               the same per-epoch logs, one row per epoch (rewritten, never
                              appended, so a resumed run has no duplicate rows)
    final.keras, results.json the trained model and the summary, written last
    flags.txt, logs/          the CLI's flags (wcl_tf/train.py), TensorBoard event files

Running the same command again resumes: the newest complete `epoch_NNN.keras` gives the
weights and the optimizer state, the data pipeline starts at the restored optimizer step
(so the weak-to-strong augmentation switch stays where it was), fit continues at epoch
NNN + 1, and the logs of epochs 1..NNN come from train_state.json. A process killed at
any moment (SIGKILL) loses at most the epoch in flight.
"""

import dataclasses
import json
import math
import time

import keras

from wcl_tf import config as config_lib
from wcl_tf import run_folder
from wcl_tf.config import ConfigError


def _has_training_state(model_dir):
    return (run_folder.latest_checkpoint(model_dir)[1] is not None
            or run_folder.latest_mid_epoch_checkpoint(model_dir)[1] is not None)


def prepare_model_dir(cfg, writes=True):
    """Create model_dir, refuse to mix runs with different settings, write config.json.

    writes=False (a multi-worker run's non-chief): only the check, nothing is written.
    """
    if writes:
        try:
            run_folder.ensure_writable(cfg.model_dir)
        except run_folder.file_errors() as err:
            raise ConfigError(
                f"model_dir {cfg.model_dir!r} is not writable ({run_folder.error_text(err)}): "
                "choose another --model_dir.") from None
    path = run_folder.join(cfg.model_dir, run_folder.CONFIG_FILE)
    # Through JSON, so that tuples compare equal to the lists read back.
    settings = json.loads(json.dumps(cfg.to_dict()))
    # Only a run that has saved training state binds the folder: a run that stopped
    # before its first checkpoint (say, on a wrong data_dir) may be retried with fixes.
    previous = run_folder.read_json(path)
    if previous is not None and _has_training_state(cfg.model_dir):
        changed = sorted(k for k in config_lib.run_defining_fields()
                         if previous.get(k) != settings.get(k))
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {settings[k]!r}" for k in changed)
            raise ConfigError(
                f"model_dir {cfg.model_dir!r} holds a run with other settings ({details}). "
                "Use a new --model_dir, or the same settings to resume (settings that "
                "may change on resume: "
                f"{', '.join(sorted(set(settings) - set(config_lib.run_defining_fields())))}).")
    if writes:
        run_folder.write_json(path, settings, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumes from, as every worker agreed on it.

    path: the checkpoint (None: nothing to resume, a new run); step: the optimizer step
    its name says it holds; epochs_done: the epochs finished before it; mid_epoch: whether
    it was saved in the middle of epoch epochs_done + 1.
    """

    path: str | None
    step: int
    epochs_done: int
    mid_epoch: bool


def resume_point(model_dir, steps, agreement):
    """The ResumePoint of the run in `model_dir`, for epochs of `steps` optimizer steps.

    The newest complete epoch checkpoint, or a newer mid-epoch one. Every worker takes the
    chief's choice (`agreement`: a distributed.WorkerAgreement; a worker seeing another
    newest file would train a different number of steps, and the first all-reduce where
    they part would wait forever), and all stop if any worker cannot read that file.
    """
    epochs_done, path = run_folder.latest_checkpoint(model_dir)
    mid_step, mid_path = run_folder.latest_mid_epoch_checkpoint(model_dir)
    if mid_path is None or mid_step <= epochs_done * steps:
        mid_step = 0
    (epochs_done, mid_step), _ = agreement.chief_values([epochs_done, mid_step])
    if mid_step:
        path, step = run_folder.mid_epoch_checkpoint_path(model_dir, mid_step), mid_step
        epochs_done = mid_step // steps
    elif epochs_done:
        path, step = run_folder.checkpoint_path(model_dir, epochs_done), epochs_done * steps
    else:
        path, step = None, 0
    _, missing = agreement.chief_values([], path is not None and not run_folder.is_complete(path))
    if missing:
        raise RuntimeError(
            f"a worker cannot read {path}, the checkpoint the chief resumes from: every "
            "worker needs the same view of model_dir (a shared file system or bucket).")
    return ResumePoint(path, step, epochs_done, bool(mid_step))


def restore(model, path, strategy):
    """Loads weights and optimizer state (momentum, iterations) of a training checkpoint.

    `model` comes from `training.build` with the same settings. Returns the optimizer step.
    """
    with strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        run_folder.load_weights(model, path)
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


class EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch: train_state.json, then checkpoints/epoch_NNN.keras, then history.csv.

    The checkpoint is the commit point: a run resumes from the newest complete one and
    takes the logs of the epochs up to it from train_state.json. An epoch cut short (the
    non-finite guard, preemption: fewer steps than fit's epoch) or whose loss is not
    finite is not saved. Only the newest `keep` epoch checkpoints stay (0: all), pruned
    once the new one is complete; mid-epoch checkpoints it supersedes are deleted then.
    `save_mid_epoch` is the preemption guard's save.
    """

    def __init__(self, model_dir, rows, state, write=True, guard=None, keep=0):
        super().__init__()
        self.model_dir, self.rows, self.state, self.write = model_dir, rows, state, write
        self.guard, self.keep = guard, keep
        self._started = time.time()
        self._seconds_before = state.get("train_seconds", 0.0)
        self._batches = 0

    def train_seconds(self):
        return self._seconds_before + time.time() - self._started

    def on_epoch_begin(self, epoch, logs=None):
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches = batch + 1  # Keras passes the execution's last step index.

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        if not math.isfinite(float(logs.get("loss", 0.0))) or (
                self.guard is not None and self.guard.tripped is not None) or (
                self._batches < (self.params.get("steps") or 0)):
            return
        row = {"epoch": epoch + 1}
        row.update({k: float(v) for k, v in logs.items()})
        row["optimizer_steps"] = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.rows[:] = [r for r in self.rows if r["epoch"] < epoch + 1] + [row]
        self.state.update(history=self.rows, train_seconds=round(self.train_seconds(), 1))
        if not self.write:
            return
        run_folder.write_json(run_folder.join(self.model_dir, run_folder.STATE_FILE), self.state)
        path = run_folder.checkpoint_path(self.model_dir, epoch + 1)
        run_folder.save_model(self.model, path)
        run_folder.write_history_csv(self.model_dir, self.rows)
        # Never delete an older checkpoint before this one reads whole (a rename on an
        # object store is a copy, then a delete).
        if run_folder.is_complete(path):
            if self.keep:
                run_folder.prune_checkpoints(self.model_dir, self.keep)
            run_folder.remove_mid_epoch_checkpoints(self.model_dir, row["optimizer_steps"] + 1)

    def save_mid_epoch(self, step):
        """train_state.json and checkpoints/step_NNNNNNN.keras after optimizer step `step`
        (write=False: nothing); returns the checkpoint's path."""
        path = run_folder.mid_epoch_checkpoint_path(self.model_dir, step)
        if self.write:
            self.state.update(train_seconds=round(self.train_seconds(), 1))
            run_folder.write_json(run_folder.join(self.model_dir, run_folder.STATE_FILE),
                                  self.state)
            run_folder.save_model(self.model, path)
            if run_folder.is_complete(path):
                run_folder.remove_mid_epoch_checkpoints(self.model_dir, step)
        return path


def checkpoint_bytes(model):
    """Rough size of one training checkpoint: model variables + optimizer slots, float32."""
    count = sum(int(math.prod(v.shape)) for v in model.weights)
    count += sum(int(math.prod(v.shape)) for v in model.trainable_weights)  # momentum
    return 4 * count


def check_disk_space(cfg, model):
    """Room for the kept epoch checkpoints plus final.keras, with a 10% margin (local
    model_dir only: a bucket has no free-space figure)."""
    needed = checkpoint_bytes(model) * ((cfg.keep_checkpoints or cfg.epochs) + 1) * 1.1
    free = run_folder.free_bytes(cfg.model_dir)
    if free is not None and free < needed:
        raise ConfigError(
            f"not enough free disk for checkpoints in {cfg.model_dir!r}: {free / 2**20:,.0f} "
            f"MiB free, about {needed / 2**20:,.0f} MiB needed ("
            f"{checkpoint_bytes(model) / 2**20:,.0f} MiB per checkpoint, "
            f"{cfg.keep_checkpoints or cfg.epochs} kept + final.keras): free space, choose "
            f"another --model_dir, or lower --keep_checkpoints.")
