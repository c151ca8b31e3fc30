"""`run(cfg)`: one WCL pretraining run, for the CLI and for notebooks alike.

Order of work: validate everything that can be checked before the first step
(settings, model_dir, strategy, dataset size) -> a finished run in model_dir is reported,
not retrained -> build the model and optimizer inside the strategy scope -> kNN of the
untrained encoder -> restore the newest epoch checkpoint, if any -> the dataset, starting
at the restored optimizer step -> model.fit with TensorBoard and per-epoch checkpoints ->
kNN of the trained encoder -> results.json.

What model_dir holds, and how a run resumes:

    config.json               the settings; a run with other settings is refused
    checkpoints/epoch_NNN.keras   model + optimizer (LARS momentum, iteration count) after
                              epoch NNN (1-based); written to a hidden file and renamed, so
                              a file with this name is always complete
    train_state.json          per-epoch logs of every finished epoch (loss, kNN, learning
                              rate, optimizer_steps), kNN of the random encoder, training
                              seconds so far; written just before the checkpoint
    history.csv               the same per-epoch logs, one row per epoch (rewritten, never
                              appended, so a resumed run has no duplicate rows)
    final.keras, results.json the trained model and the summary, written last

Running the same command again resumes: the newest complete `epoch_NNN.keras` gives the
weights and the optimizer state, the data pipeline starts at the restored optimizer step
(so the weak-to-strong augmentation switch stays where it was), fit continues at epoch
NNN + 1, and the logs of epochs 1..NNN come from train_state.json. A process killed at
any moment loses at most the epoch in flight. A run whose results.json is written and
whose last epoch is checkpointed is finished: running it again returns its results.json
without training (use a new model_dir to train again).
"""

import csv
import json
import math
import os
import re
import shutil
import time
import zipfile

import keras
import tensorflow as tf

from wcl_tf import callbacks as callbacks_lib
from wcl_tf import knn
from wcl_tf import optimizers
from wcl_tf import strategy as strategy_lib
from wcl_tf.config import ConfigError
from wcl_tf.data import augment, folder, pipeline, sources
from wcl_tf.models.wcl_model import build_wcl_model

CONFIG_FILE = "config.json"
STATE_FILE = "train_state.json"
RESULTS_FILE = "results.json"
HISTORY_FILE = "history.csv"
FINAL_CHECKPOINT = "final.keras"
CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^epoch_(\d+)\.keras$")


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss; the message says where and what to do."""


def _prepare_model_dir(cfg):
    """Create model_dir, refuse to mix runs with different settings, write config.json."""
    try:
        os.makedirs(cfg.model_dir, exist_ok=True)
        probe = os.path.join(cfg.model_dir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ConfigError(
            f"model_dir {cfg.model_dir!r} is not writable ({err.strerror}): "
            "choose another --model_dir.") from None
    path = os.path.join(cfg.model_dir, CONFIG_FILE)
    # Through JSON, so that tuples compare equal to the lists read back.
    settings = json.loads(json.dumps(cfg.to_dict()))
    # Only a run that has saved training state binds the folder: a run that stopped
    # before its first checkpoint (say, on a wrong data_dir) may be retried with fixes.
    if os.path.exists(path) and latest_checkpoint(cfg.model_dir)[1] is not None:
        with open(path) as f:
            previous = json.load(f)
        ignore = {"verbose"}
        changed = sorted(k for k in settings
                         if k not in ignore and previous.get(k) != settings[k])
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {settings[k]!r}" for k in changed)
            raise ConfigError(
                f"model_dir {cfg.model_dir!r} holds a run with other settings ({details}). "
                "Use a new --model_dir, or the same settings to resume.")
    _write_json(path, settings, sort_keys=True)


def _write_json(path, obj, **kwargs):
    """Writes JSON atomically: a reader (or a resumed run) never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, **kwargs)
    os.replace(tmp, path)


def _save_model(model, path):
    """model.save(path) atomically (a hidden .keras file in the same folder, renamed)."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name[:-len('.keras')]}.partial.keras")
    model.save(tmp)
    os.replace(tmp, path)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def checkpoint_path(model_dir, epoch):
    """<model_dir>/checkpoints/epoch_NNN.keras: the state after `epoch` (1-based) epochs."""
    return os.path.join(model_dir, CHECKPOINT_DIR, f"epoch_{epoch:03d}.keras")


def _is_complete(path):
    """A .keras zip whose central directory (written last) can be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            return "model.weights.h5" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def latest_checkpoint(model_dir):
    """(epochs done, path) of the newest complete epoch checkpoint; (0, None) if none."""
    folder = os.path.join(model_dir, CHECKPOINT_DIR)
    epochs = sorted((int(m.group(1)) for m in map(_CHECKPOINT_NAME.match,
                                                   os.listdir(folder)) if m),
                    reverse=True) if os.path.isdir(folder) else []
    for epoch in epochs:
        path = checkpoint_path(model_dir, epoch)
        if _is_complete(path):  # Files from before atomic saving may be cut short.
            return epoch, path
    return 0, None


def _prune_checkpoints(model_dir, keep):
    """Deletes all but the newest `keep` epoch checkpoints."""
    folder = os.path.join(model_dir, CHECKPOINT_DIR)
    epochs = sorted(int(m.group(1)) for m in map(_CHECKPOINT_NAME.match, os.listdir(folder))
                    if m)
    for epoch in epochs[:-keep]:
        os.remove(checkpoint_path(model_dir, epoch))


def _epoch_rows(model_dir, epochs_done):
    """Logs of epochs 1..epochs_done as saved by a previous process, one dict each."""
    state = _read_json(os.path.join(model_dir, STATE_FILE)) or {}
    rows = {r["epoch"]: r for r in state.get("history", []) if r["epoch"] <= epochs_done}
    if len(rows) < epochs_done:
        # A model_dir written by Keras' CSVLogger (0-based epochs, appended rows).
        rows = {**_read_csv_rows(os.path.join(model_dir, HISTORY_FILE), epochs_done), **rows}
    return [rows[e] for e in sorted(rows)], state


def _read_csv_rows(path, epochs_done):
    if not os.path.exists(path):
        return {}
    rows = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                epoch = int(row.pop("epoch")) + 1
                values = {k: float(v) for k, v in row.items() if v not in ("", "NA", None)}
            except (KeyError, TypeError, ValueError):
                continue
            if epoch <= epochs_done:
                rows[epoch] = {"epoch": epoch, **values}  # The last copy of a row wins.
    return rows


def _write_history_csv(path, rows):
    """One row per epoch; columns: epoch, then every key any epoch logged."""
    keys = sorted({k for row in rows for k in row} - {"epoch"})
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", *keys], restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def finished_results(cfg):
    """results.json of a finished run in cfg.model_dir (all epochs checkpointed), or None."""
    results = _read_json(os.path.join(cfg.model_dir, RESULTS_FILE))
    if results is None:
        return None
    epochs_done, _ = latest_checkpoint(cfg.model_dir)
    return results if epochs_done >= cfg.epochs else None


class _LearningRateLogger(keras.callbacks.Callback):
    """Adds the optimizer's current learning rate to the epoch logs (TensorBoard)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class _EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch: train_state.json, then checkpoints/epoch_NNN.keras, then history.csv.

    The checkpoint is the commit point: a run resumes from the newest complete one and
    takes the logs of the epochs up to it from train_state.json. An epoch cut short by
    the non-finite guard (or whose loss is not finite) is not saved. Only the newest
    `keep` epoch checkpoints stay on disk (0: all).
    """

    def __init__(self, model_dir, rows, state, write=True, guard=None, keep=0):
        super().__init__()
        self.model_dir, self.rows, self.state, self.write = model_dir, rows, state, write
        self.guard, self.keep = guard, keep
        self._started = time.time()
        self._seconds_before = state.get("train_seconds", 0.0)

    def train_seconds(self):
        return self._seconds_before + time.time() - self._started

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        if not math.isfinite(float(logs.get("loss", 0.0))) or (
                self.guard is not None and self.guard.tripped is not None):
            return
        row = {"epoch": epoch + 1}
        row.update({k: float(v) for k, v in logs.items()})
        row["optimizer_steps"] = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.rows[:] = [r for r in self.rows if r["epoch"] < epoch + 1] + [row]
        self.state.update(history=self.rows, train_seconds=round(self.train_seconds(), 1))
        if not self.write:
            return
        _write_json(os.path.join(self.model_dir, STATE_FILE), self.state)
        _save_model(self.model, checkpoint_path(self.model_dir, epoch + 1))
        _write_history_csv(os.path.join(self.model_dir, HISTORY_FILE), self.rows)
        if self.keep:
            _prune_checkpoints(self.model_dir, self.keep)


def _knn_arrays(cfg, log):
    """Labelled (memory, queries) arrays for the kNN evaluation, or None without labels."""
    try:
        _, _, num_classes = sources.load_split(cfg.dataset, cfg.eval_split, cfg.data_dir,
                                               cfg.download, on_bad_image=cfg.on_bad_image)
    except folder.FolderError as err:  # An image folder without an evaluation split.
        log(f"no kNN evaluation: {err}")
        return None
    if num_classes == 0:
        log(f"no kNN evaluation: {cfg.dataset} has no labels (class subfolders).")
        return None
    train = sources.load_arrays(cfg.dataset, cfg.train_split, cfg.image_size, cfg.data_dir,
                                cfg.download, cfg.max_eval_examples, cfg.on_bad_image)
    test = sources.load_arrays(cfg.dataset, cfg.eval_split, cfg.image_size, cfg.data_dir,
                               cfg.download, cfg.max_eval_examples, cfg.on_bad_image)
    return train, test, num_classes


def _knn(encoder, arrays, cfg):
    if arrays is None:
        return None
    (x_train, y_train), (x_test, y_test), num_classes = arrays
    return knn.evaluate_encoder(encoder, x_train, y_train, x_test, y_test, num_classes,
                                k=cfg.knn_k, temperature=cfg.knn_temperature)


def build(cfg, strategy, steps_per_epoch):
    """WCLModel compiled with LARS + warm-up cosine, inside `strategy.scope()`.

    cfg.precision sets Keras' global dtype policy (the losses stay float32 whatever it
    is); mixed_float16 adds dynamic loss scaling around LARS.
    """
    replicas = strategy.num_replicas_in_sync
    sync_bn = cfg.sync_bn if cfg.sync_bn is not None else replicas > 1
    keras.mixed_precision.set_global_policy(cfg.precision)
    with strategy.scope():
        keras.utils.set_random_seed(cfg.seed)
        model = build_wcl_model(
            cfg.backbone, head_hidden_dim=cfg.head_hidden_dim,
            head_output_dim=cfg.head_output_dim, sync_bn=sync_bn, width=cfg.width,
            temperature=cfg.temperature, graph_loss_weight=cfg.graph_loss_weight,
            gather_grad=cfg.gather_grad, graph_key_grad=cfg.graph_key_grad,
            image_size=cfg.image_size,
            knn_crops=cfg.knn_crops, local_loss_weight=cfg.local_loss_weight)
        optimizer = optimizers.build_optimizer(cfg, steps_per_epoch)
        if cfg.precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer)
    return model


def restore(model, path, strategy):
    """Loads weights and optimizer state (momentum, iterations) of a training checkpoint.

    `model` comes from `build` with the same settings. Returns the optimizer step.
    """
    with strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(path)
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def _monitors(cfg, arrays):
    """kNN monitor and weak-label diagnostics on a fixed labelled batch (none without
    labels)."""
    if arrays is None:
        return []
    (x_train, y_train), _, num_classes = arrays
    every = cfg.eval_every_epochs or cfg.epochs
    n = min(cfg.global_batch_size, len(x_train))
    images = tf.cast(tf.round(x_train[:n] * 255.0), tf.uint8)
    view_1, _ = augment.two_views(images, True, cfg.image_size, cfg.blur,
                                  seed=tf.constant([cfg.seed, 7], tf.int64))
    return [
        callbacks_lib.KNNMonitor(arrays[0], arrays[1], num_classes, every=every,
                                 k=cfg.knn_k, temperature=cfg.knn_temperature),
        callbacks_lib.WeakLabelDiagnostics(view_1.numpy(), y_train[:n], every=every),
    ]


def _steps_per_epoch(cfg):
    _, num_examples, _ = sources.load_split(cfg.dataset, cfg.train_split, cfg.data_dir,
                                            cfg.download, cfg.max_train_examples, cfg.seed,
                                            on_bad_image=cfg.on_bad_image)
    return pipeline.pretrain_steps_per_epoch(cfg, num_examples)


def _check_replicas(cfg, replicas):
    if cfg.global_batch_size % replicas:
        raise ConfigError(
            f"global_batch_size {cfg.global_batch_size} is not divisible by the {replicas} "
            f"replicas of --strategy={cfg.strategy}: use a multiple of {replicas} (e.g. "
            f"{replicas * max(1, round(cfg.global_batch_size / replicas))}).")


def checkpoint_bytes(model):
    """Rough size of one training checkpoint: model variables + optimizer slots, float32."""
    count = sum(int(math.prod(v.shape)) for v in model.weights)
    count += sum(int(math.prod(v.shape)) for v in model.trainable_weights)  # momentum
    return 4 * count


def _check_disk_space(cfg, model):
    """Room for the kept epoch checkpoints plus final.keras, with a 10% margin."""
    needed = checkpoint_bytes(model) * ((cfg.keep_checkpoints or cfg.epochs) + 1) * 1.1
    free = shutil.disk_usage(cfg.model_dir).free
    if free < needed:
        raise ConfigError(
            f"not enough free disk for checkpoints in {cfg.model_dir!r}: {free / 2**20:,.0f} "
            f"MiB free, about {needed / 2**20:,.0f} MiB needed ("
            f"{checkpoint_bytes(model) / 2**20:,.0f} MiB per checkpoint, "
            f"{cfg.keep_checkpoints or cfg.epochs} kept + final.keras): free space, choose "
            f"another --model_dir, or lower --keep_checkpoints.")


def _nonfinite_message(cfg, info, model_dir):
    epochs_done, path = latest_checkpoint(model_dir)
    kept = (f"the last good checkpoint is {path} (epoch {epochs_done}); running the same "
            f"command again resumes from it" if path else
            "no epoch had finished, so there is no checkpoint to keep")
    skipped = (f" after skipping {info['skipped_so_far'] - 1} such step(s)"
               if cfg.skip_nonfinite_steps else "")
    return (f"training stopped: non-finite loss or gradients at optimizer step "
            f"{info['optimizer_step']} (epoch {info['epoch']}, batch {info['batch']}, "
            f"learning rate {info['learning_rate']:.4g}){skipped}; that update was not "
            f"applied and {kept}. Try a lower --base_lr, --precision=float32, or "
            f"--skip_nonfinite_steps=N to step over rare bad batches.")


def _percent(value):
    return "n/a (no labels)" if value is None else f"{100 * value:.2f}%"


def _summary(cfg, results):
    if results.get("knn_top1") is None and results.get("random_encoder_knn_top1") is None:
        return (f"trained {cfg.backbone} on {cfg.dataset} for "
                f"{results['train_seconds'] / 60:.1f} min without a kNN evaluation (no "
                f"labelled {cfg.eval_split!r} split); model in {results['checkpoint']}")
    return (f"kNN top-1 (k={cfg.knn_k}, T={cfg.knn_temperature}) on {cfg.dataset}:"
            f"{cfg.eval_split}: {'WCL' if cfg.graph_loss_weight > 0 else 'SimCLR'} encoder "
            f"{_percent(results['knn_top1'])} | randomly "
            f"initialised encoder {_percent(results['random_encoder_knn_top1'])}  (trained "
            f"{results['train_seconds'] / 60:.1f} min; model in {results['checkpoint']})")


def run(cfg, log=print, on_ready=None, callbacks=()):
    """Pretrain with WCL as `cfg` says, resuming a run in cfg.model_dir; returns results.

    The results dict is also written to results.json. A finished run in cfg.model_dir is
    not trained again: its results.json is returned. on_ready(cfg), if given, is called
    once model_dir is known to be usable (the CLI writes flags.txt there). callbacks:
    extra Keras callbacks for model.fit. Raises ConfigError / DataError before the first
    step for bad settings or data, NonFiniteLossError when a non-finite step stops
    training (the epoch checkpoints stay as they were).
    """
    cfg.validate()
    _prepare_model_dir(cfg)
    if on_ready is not None:
        on_ready(cfg)
    done = finished_results(cfg)
    if done is not None:
        log(f"wcl_tf: {cfg.model_dir} already holds a finished run ({cfg.epochs} of "
            f"{cfg.epochs} epochs): nothing to train, returning its {RESULTS_FILE}. "
            "Use a new --model_dir to train again.")
        log(_summary(cfg, done))
        return done

    strategy = strategy_lib.build_strategy(cfg.strategy, cfg.tpu)
    replicas = strategy.num_replicas_in_sync
    _check_replicas(cfg, replicas)
    steps_per_epoch = _steps_per_epoch(cfg)
    if folder.is_folder_dataset(cfg.dataset):
        log(folder.scan_folder(cfg.dataset, cfg.train_split, cfg.on_bad_image).report())
    arrays = _knn_arrays(cfg, log)
    log(f"wcl_tf: {cfg.backbone} on {cfg.dataset} ({cfg.image_size} px), "
        f"{replicas} replica(s), global batch {cfg.global_batch_size}, "
        f"{steps_per_epoch} steps x {cfg.epochs} epochs, lambda={cfg.graph_loss_weight}, "
        f"gather_grad={cfg.gather_grad}, graph_key_grad={cfg.graph_key_grad}, "
        f"peak lr {cfg.learning_rate():.4g}")

    model = build(cfg, strategy, steps_per_epoch)
    _check_disk_space(cfg, model)
    epochs_done, path = latest_checkpoint(cfg.model_dir)
    rows, state = _epoch_rows(cfg.model_dir, epochs_done)
    random_top1 = state.get("random_encoder_knn_top1")
    if random_top1 is None:  # Before restoring: the weights are the random ones here.
        random_top1 = _knn(model.backbone, arrays, cfg)
    if random_top1 is not None:
        log(f"kNN top-1 of the randomly initialised encoder: {100 * random_top1:.2f}%")
    initial_step = 0
    if path is not None:
        initial_step = restore(model, path, strategy)
        log(f"resuming from epoch {epochs_done} of {cfg.epochs} ({path}, optimizer step "
            f"{initial_step})")
        if initial_step != epochs_done * steps_per_epoch:
            log(f"warning: {path} holds {initial_step} optimizer steps, not "
                f"{epochs_done} x {steps_per_epoch}; the data pipeline starts at step "
                f"{initial_step}")
    dataset, _ = pipeline.distribute_pretrain_dataset(strategy, cfg, initial_step=initial_step)

    is_chief = strategy.extended.should_checkpoint
    state = {"random_encoder_knn_top1": random_top1,
             "train_seconds": state.get("train_seconds", 0.0), "history": rows}
    ckpt_dir = os.path.join(cfg.model_dir, CHECKPOINT_DIR)
    os.makedirs(ckpt_dir, exist_ok=True)
    history_csv = os.path.join(cfg.model_dir, HISTORY_FILE)
    if is_chief:
        _write_history_csv(history_csv, rows)  # Drops rows of epochs not checkpointed.
    guard = callbacks_lib.NonFiniteGuard(cfg.skip_nonfinite_steps, log)
    checkpoint = _EpochCheckpoint(cfg.model_dir, rows, state, write=is_chief, guard=guard,
                                  keep=cfg.keep_checkpoints)
    all_callbacks = _monitors(cfg, arrays) + [
        _LearningRateLogger(),
        guard,
        checkpoint,
        keras.callbacks.TensorBoard(os.path.join(cfg.model_dir, "logs"), update_freq="epoch"),
        *callbacks,
    ]
    train_seconds = state["train_seconds"]
    if epochs_done < cfg.epochs:
        model.fit(dataset, epochs=cfg.epochs, initial_epoch=epochs_done,
                  steps_per_epoch=steps_per_epoch, callbacks=all_callbacks,
                  verbose=cfg.verbose, shuffle=False)
        train_seconds = checkpoint.train_seconds()
    if guard.tripped is not None:
        raise NonFiniteLossError(_nonfinite_message(cfg, guard.tripped, cfg.model_dir))

    final_path = os.path.join(cfg.model_dir, FINAL_CHECKPOINT)
    if is_chief:
        _save_model(model, final_path)
    knn_history = [[r["epoch"], r["knn_top1"]] for r in rows if "knn_top1" in r]
    final_row = rows[-1] if rows else {}
    top1 = final_row.get("knn_top1")
    if top1 is None:
        top1 = _knn(model.backbone, arrays, cfg)
    results = {
        "knn_top1": top1,
        "knn_top1_per_epoch": knn_history,
        "random_encoder_knn_top1": random_top1,
        "final_loss": final_row.get("loss"),
        "train_seconds": round(train_seconds, 1),
        "epochs": cfg.epochs,
        "completed_epochs": final_row.get("epoch", 0),
        "resumed_from_epoch": epochs_done,
        "steps_per_epoch": steps_per_epoch,
        "optimizer_steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "replicas": replicas,
        "graph_loss_weight": cfg.graph_loss_weight,
        "gather_grad": cfg.gather_grad,
        "graph_key_grad": cfg.graph_key_grad,
        "checkpoint": final_path,
    }
    if is_chief:
        _write_json(os.path.join(cfg.model_dir, RESULTS_FILE), results)
    log(_summary(cfg, results))
    return results
