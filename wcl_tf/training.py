"""`run(cfg)`: one WCL pretraining run, for the CLI and for notebooks alike.

Order of work: validate everything that can be checked before the first step
(settings, model_dir, strategy, dataset size) -> a finished run in model_dir is reported,
not retrained -> build the model and optimizer inside the strategy scope -> kNN of the
untrained encoder -> restore the newest checkpoint, if any -> the dataset, starting
at the restored optimizer step -> model.fit with TensorBoard, per-epoch checkpoints and
the preemption guard -> kNN of the trained encoder -> results.json.

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

Preemption. While model.fit runs, SIGTERM (what Cloud TPUs and spot VMs send, a grace
period before SIGKILL) lets the step in flight finish, saves checkpoints/step_N.keras
(an epoch's last step: the epoch checkpoint instead), stops training and raises
`Preempted`: the CLI exits with status 143 (128 + SIGTERM, what a supervisor sees when
SIGTERM ends a process: restart policies treat it as such), saying where it stopped.
Running the same command again resumes from that step: the rest of the interrupted epoch
is a model.fit of its own (Keras gives every epoch of one fit the same number of steps),
cut after that epoch, then the remaining full epochs; epochs keep their numbers and
history.csv its one row per epoch (the resumed epoch's loss averages its steps after the
resume). Nothing is lost but the step in flight.

Multi-worker (MultiWorkerMirroredStrategy). Only the chief writes the run folder
(config.json, flags.txt, checkpoints, logs, results); the other workers read it, which
assumes one model_dir view (shared file system or bucket). Decisions taken on the host
are made common with one small all-reduce (wcl_tf.distributed.WorkerAgreement): every
worker restores the checkpoint the chief chose, and one worker's SIGTERM stops all of
them after the same step.

A run whose results.json is written and whose last epoch is checkpointed is finished:
running it again returns its results.json without training (use a new model_dir to train
again).
"""

import contextlib
import json
import math
import time

import keras
import tensorflow as tf

from wcl_tf import callbacks as callbacks_lib
from wcl_tf import distributed
from wcl_tf import knn
from wcl_tf import optimizers
from wcl_tf import run_folder
from wcl_tf import seeding
from wcl_tf import strategy as strategy_lib
from wcl_tf import warm_start
from wcl_tf import config as config_lib
from wcl_tf.config import ConfigError
from wcl_tf.data import (augment_layers, eval_input, folder, pipeline, sources,
                         view_assembly)
from wcl_tf.models.wcl_model import build_wcl_model

class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss; the message says where and what to do."""


class Preempted(RuntimeError):
    """SIGTERM stopped training after a step whose state is saved; the message says where,
    and that the same command resumes. `info`: the PreemptionGuard's dict."""

    def __init__(self, message, info):
        super().__init__(message)
        self.info = info


def _has_training_state(model_dir):
    return (run_folder.latest_checkpoint(model_dir)[1] is not None
            or run_folder.latest_mid_epoch_checkpoint(model_dir)[1] is not None)


def _prepare_model_dir(cfg, writes=True):
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


def finished_results(cfg):
    """results.json of a finished run in cfg.model_dir (all epochs checkpointed), or None."""
    return run_folder.finished_results(cfg.model_dir, cfg.epochs)


class _LearningRateLogger(keras.callbacks.Callback):
    """Adds the optimizer's current learning rate to the epoch logs (TensorBoard)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class _EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch: train_state.json, then checkpoints/epoch_NNN.keras, then history.csv.

    The checkpoint is the commit point: a run resumes from the newest complete one and
    takes the logs of the epochs up to it from train_state.json. An epoch cut short (the
    non-finite guard, preemption: fewer steps than fit's epoch) or whose loss is not
    finite is not saved. Only the newest `keep` epoch checkpoints stay (0: all), pruned
    once the new one is complete; mid-epoch checkpoints it supersedes are deleted then.
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


class _StopAfterOneEpoch(keras.callbacks.Callback):
    """Ends a fit() after its first epoch (the rest of an interrupted epoch); `other`
    records whether something else had stopped it already (a guard, EarlyStopping)."""

    other = False

    def on_epoch_end(self, epoch, logs=None):
        self.other = bool(self.model.stop_training)
        self.model.stop_training = True


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
    train = eval_input.load_arrays(cfg.dataset, cfg.train_split, cfg.image_size, cfg.data_dir,
                                   cfg.download, cfg.max_eval_examples, cfg.on_bad_image)
    test = eval_input.load_arrays(cfg.dataset, cfg.eval_split, cfg.image_size, cfg.data_dir,
                                  cfg.download, cfg.max_eval_examples, cfg.on_bad_image)
    return train, test, num_classes


def _knn(encoder, arrays, cfg):
    if arrays is None:
        return None
    (x_train, y_train), (x_test, y_test), num_classes = arrays
    return knn.evaluate_encoder(encoder, x_train, y_train, x_test, y_test, num_classes,
                                k=cfg.knn_k, temperature=cfg.knn_temperature)


def execution_steps(requested, steps):
    """Train steps per execution for epochs of `steps` steps: the largest divisor of
    `steps` not above `requested` (cfg.steps_per_execution).

    Keras 3 runs ceil(steps / N) * N steps per epoch from an endless dataset: with an N
    that does not divide the epoch, the LR schedule, the weak-to-strong switch and the
    data epochs would drift from Keras' epochs (and a mid-epoch resume would compute the
    wrong epoch)."""
    requested, steps = int(requested), int(steps)
    return max(d for d in range(1, max(1, min(requested, steps)) + 1) if steps % d == 0)


def build(cfg, strategy, steps_per_epoch):
    """WCLModel compiled with LARS + warm-up cosine, inside `strategy.scope()`.

    cfg.precision is Keras' dtype policy of the layers built here (the losses stay float32
    whatever it is); mixed_float16 adds dynamic loss scaling around LARS. The global
    policy and random seeds are set for the build and restored afterwards. Steps per
    execution: execution_steps(cfg.steps_per_execution, steps_per_epoch).
    """
    replicas = strategy.num_replicas_in_sync
    sync_bn = cfg.sync_bn if cfg.sync_bn is not None else replicas > 1
    # Seeds and policy for the build only: a notebook gets its own back afterwards.
    with seeding.scoped(cfg.seed, cfg.precision), strategy.scope():
        model = build_wcl_model(
            cfg.backbone, head_hidden_dim=cfg.head_hidden_dim,
            head_output_dim=cfg.head_output_dim, sync_bn=sync_bn, width=cfg.width,
            temperature=cfg.temperature, graph_loss_weight=cfg.graph_loss_weight,
            gather_grad=cfg.gather_grad, graph_key_grad=cfg.graph_key_grad,
            image_size=cfg.image_size,
            knn_crops=cfg.knn_crops, local_loss_weight=cfg.local_loss_weight,
            view_augmentation=device_augmentation(cfg))
        optimizer = optimizers.build_optimizer(cfg, steps_per_epoch)
        if cfg.precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer, steps_per_execution=execution_steps(
            cfg.steps_per_execution, steps_per_epoch))
    # The schedule's epoch length: model.fit uses it unless told otherwise.
    model.steps_per_epoch = steps_per_epoch
    return model


def augment_side(cfg):
    """Where cfg.augment_on resolves ("auto" included): "device" or "host"."""
    return "device" if view_assembly.augment_on_device(cfg.augment_on) else "host"


def device_augmentation(cfg):
    """The model's ViewAugmentation when cfg.augment_on resolves to the device (the input
    pipeline then yields uint8 crops), else None."""
    if not view_assembly.augment_on_device(cfg.augment_on):
        return None
    return augment_layers.ViewAugmentation(
        cfg.image_size, cfg.local_crop_size if cfg.num_local_crops else None, blur=cfg.blur,
        seed=cfg.seed, weak_aug_epochs=cfg.weak_aug_epochs, name="view_augmentation")


def restore(model, path, strategy):
    """Loads weights and optimizer state (momentum, iterations) of a training checkpoint.

    `model` comes from `build` with the same settings. Returns the optimizer step.
    """
    with strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        run_folder.load_weights(model, path)
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
    view_1, _ = view_assembly.two_views(images, True, cfg.image_size, cfg.blur,
                                        seed=tf.constant([cfg.seed, 7], tf.int64))
    return [
        callbacks_lib.KNNMonitor(arrays[0], arrays[1], num_classes, every=every,
                                 k=cfg.knn_k, temperature=cfg.knn_temperature),
        callbacks_lib.WeakLabelDiagnostics(view_1.numpy(), y_train[:n], every=every),
    ]


def steps_per_epoch(cfg):
    """Optimizer steps per epoch of cfg's training split (cfg.steps_per_epoch if set):
    what the LR schedule, the weak-to-strong switch and fit() must all agree on."""
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


def _nonfinite_message(cfg, info, model_dir):
    epochs_done, path = run_folder.latest_checkpoint(model_dir)
    kept = (f"the last good checkpoint is {path} (epoch {epochs_done}); running the same "
            f"command again resumes from it" if path else
            "no epoch had finished, so there is no checkpoint to keep")
    skipped = (f" after skipping {info['skipped_so_far'] - 1} such step(s)"
               if cfg.skip_nonfinite_steps else "")
    where = (f"optimizer step {info['optimizer_step']} (epoch {info['epoch']}, batch "
             f"{info['batch']}, learning rate {info['learning_rate']:.4g})"
             if info.get("first_step", info["optimizer_step"]) == info["optimizer_step"]
             else callbacks_lib.describe_step(info) + " (--steps_per_execution > 1)")
    return (f"training stopped: non-finite loss or gradients at {where}{skipped}; that "
            f"update was not "
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


@contextlib.contextmanager
def _steps_per_execution(model, n):
    """model trains n steps per execution within the block (Keras reads the attribute
    when it traces the train function and when fit starts an epoch)."""
    saved = model.steps_per_execution
    if n == saved:
        yield
        return
    model.steps_per_execution, model.train_function = n, None
    try:
        yield
    finally:
        model.steps_per_execution, model.train_function = saved, None


def _resume_point(cfg, steps, agreement):
    """(checkpoint path or None, optimizer step it holds, epochs done, mid-epoch?) to
    resume from.

    The newest complete epoch checkpoint, or a newer mid-epoch one. Every worker takes the
    chief's choice (a worker seeing another newest file would train a different number
    of steps, and the first all-reduce where they part would wait forever), and all stop
    if any worker cannot read that file.
    """
    epochs_done, path = run_folder.latest_checkpoint(cfg.model_dir)
    mid_step, mid_path = run_folder.latest_mid_epoch_checkpoint(cfg.model_dir)
    if mid_path is None or mid_step <= epochs_done * steps:
        mid_step = 0
    (epochs_done, mid_step), _ = agreement.chief_values([epochs_done, mid_step])
    if mid_step:
        path, step = run_folder.mid_epoch_checkpoint_path(cfg.model_dir, mid_step), mid_step
        epochs_done = mid_step // steps
    elif epochs_done:
        path, step = run_folder.checkpoint_path(cfg.model_dir, epochs_done), epochs_done * steps
    else:
        path, step = None, 0
    _, missing = agreement.chief_values([], path is not None and not run_folder.is_complete(path))
    if missing:
        raise RuntimeError(
            f"a worker cannot read {path}, the checkpoint the chief resumes from: every "
            "worker needs the same view of model_dir (a shared file system or bucket).")
    return path, step, epochs_done, bool(mid_step)


def _preempted_message(cfg, info, steps):
    step = info["optimizer_step"]
    if info["path"] is None:
        where = (f"after epoch {info['epoch']} of {cfg.epochs} (optimizer step {step}); "
                 f"that state is {run_folder.checkpoint_path(cfg.model_dir, info['epoch'])}")
    else:
        where = (f"at optimizer step {step} (epoch {info['epoch']} of {cfg.epochs}, step "
                 f"{step - (info['epoch'] - 1) * steps} of {steps}); checkpoint saved: "
                 f"{info['path']}")
    return (f"preempted (SIGTERM) {where}. Run the same command again to resume from "
            f"optimizer step {step}.")


def run(cfg, log=print, on_ready=None, callbacks=()):
    """Pretrain with WCL as `cfg` says, resuming a run in cfg.model_dir; returns results.

    The results dict is also written to results.json. A finished run in cfg.model_dir is
    not trained again: its results.json is returned. on_ready(cfg), if given, is called
    once model_dir is known to be usable (the CLI writes flags.txt there; not on a
    multi-worker run's non-chief workers, which write nothing). callbacks: extra Keras
    callbacks for model.fit. Raises ConfigError / DataError before the first step for bad
    settings or data, NonFiniteLossError when a non-finite step stops training (the
    epoch checkpoints stay as they were), Preempted when SIGTERM stopped training (the
    state after the last step is saved; the same call resumes).
    """
    cfg.validate()
    writes = strategy_lib.is_chief(cfg.strategy)  # Multi-worker: the chief only.
    _prepare_model_dir(cfg, writes)
    if on_ready is not None and writes:
        on_ready(cfg)
    done = finished_results(cfg)
    if done is not None:
        log(f"wcl_tf: {cfg.model_dir} already holds a finished run ({cfg.epochs} of "
            f"{cfg.epochs} epochs): nothing to train, returning its {run_folder.RESULTS_FILE}. "
            "Use a new --model_dir to train again.")
        log(_summary(cfg, done))
        return done

    strategy = strategy_lib.build_strategy(cfg.strategy, cfg.tpu)
    replicas = strategy.num_replicas_in_sync
    _check_replicas(cfg, replicas)
    steps = steps_per_epoch(cfg)
    if folder.is_folder_dataset(cfg.dataset):
        log(folder.scan_folder(cfg.dataset, cfg.train_split, cfg.on_bad_image).report())
    arrays = _knn_arrays(cfg, log)
    log(f"wcl_tf: {cfg.backbone} on {cfg.dataset} ({cfg.image_size} px), "
        f"{replicas} replica(s), global batch {cfg.global_batch_size}, "
        f"{steps} steps x {cfg.epochs} epochs, lambda={cfg.graph_loss_weight}, "
        f"gather_grad={cfg.gather_grad}, graph_key_grad={cfg.graph_key_grad}, "
        f"augmentation on the {augment_side(cfg)}, peak lr {cfg.learning_rate():.4g}")

    model = build(cfg, strategy, steps)
    if model.steps_per_execution != cfg.steps_per_execution:
        log(f"wcl_tf: --steps_per_execution={cfg.steps_per_execution} does not divide the "
            f"{steps} steps per epoch: using {model.steps_per_execution}, the largest "
            f"divisor of {steps} not above it (Keras would round every epoch up to a "
            f"multiple of {cfg.steps_per_execution} steps)")
    if writes:
        _check_disk_space(cfg, model)
    agreement = distributed.WorkerAgreement(strategy)
    path, initial_step, epochs_done, mid_epoch = _resume_point(cfg, steps, agreement)
    rows, state = run_folder.read_history(cfg.model_dir, epochs_done)
    random_top1 = state.get("random_encoder_knn_top1")
    if random_top1 is None:  # Before restoring: the weights are the random ones here.
        random_top1 = _knn(model.backbone, arrays, cfg)
    if random_top1 is not None:
        log(f"kNN top-1 of the randomly initialised encoder: {100 * random_top1:.2f}%")
    into_epoch = 0
    if path is not None:
        expected, initial_step = initial_step, restore(model, path, strategy)
        if mid_epoch:
            into_epoch = initial_step - epochs_done * steps
            log(f"resuming in epoch {epochs_done + 1} of {cfg.epochs} at step {into_epoch} "
                f"of {steps} ({path}, optimizer step {initial_step})")
        else:
            log(f"resuming from epoch {epochs_done} of {cfg.epochs} ({path}, optimizer "
                f"step {initial_step})")
        if initial_step != expected:
            log(f"warning: {path} holds {initial_step} optimizer steps, not {expected}; "
                f"the data pipeline starts at step {initial_step}")
        if writes:  # Older mid-epoch checkpoints are superseded (a kill before cleanup).
            run_folder.remove_mid_epoch_checkpoints(cfg.model_dir, initial_step)
    elif cfg.init_from:  # A new run from another run's weights (wcl_tf/warm_start.py).
        log(warm_start.initialise(model, cfg.init_from, strategy))

    def dataset_from(step):
        # tf.data ops take TensorFlow's global seed with their own: make it cfg.seed's.
        with seeding.scoped(cfg.seed):
            return pipeline.distribute_pretrain_dataset(strategy, cfg, initial_step=step)[0]

    dataset = dataset_from(initial_step)
    state = {"random_encoder_knn_top1": random_top1,
             "train_seconds": state.get("train_seconds", 0.0), "history": rows}
    if writes:  # Drops rows of epochs not checkpointed.
        run_folder.makedirs(run_folder.join(cfg.model_dir, run_folder.CHECKPOINT_DIR))
        run_folder.write_history_csv(cfg.model_dir, rows)
    guard = callbacks_lib.NonFiniteGuard(cfg.skip_nonfinite_steps, log)
    checkpoint = _EpochCheckpoint(cfg.model_dir, rows, state, write=writes, guard=guard,
                                  keep=cfg.keep_checkpoints)

    def save_mid_epoch(step):
        path = run_folder.mid_epoch_checkpoint_path(cfg.model_dir, step)
        if writes:
            state.update(train_seconds=round(checkpoint.train_seconds(), 1))
            run_folder.write_json(run_folder.join(cfg.model_dir, run_folder.STATE_FILE), state)
            run_folder.save_model(model, path)
            if run_folder.is_complete(path):
                run_folder.remove_mid_epoch_checkpoints(cfg.model_dir, step)
        return path

    preemption = callbacks_lib.PreemptionGuard(save_mid_epoch, agree=agreement.any_worker)
    all_callbacks = _monitors(cfg, arrays) + [
        _LearningRateLogger(),
        guard,
        checkpoint,  # Before the preemption guard: an epoch's end saves first.
        preemption,
    ]
    if writes:
        all_callbacks.append(keras.callbacks.TensorBoard(
            run_folder.join(cfg.model_dir, run_folder.LOG_DIR), update_freq="epoch"))
    all_callbacks += list(callbacks)

    def stopped():
        return guard.tripped is not None or preemption.preempted is not None

    train_seconds = state["train_seconds"]
    epoch = epochs_done
    if epoch < cfg.epochs and into_epoch:
        # The rest of the interrupted epoch: Keras gives every epoch of one fit() the same
        # number of steps, so it is a fit() of its own, stopped after that epoch (epochs
        # still count to cfg.epochs in the logs and callbacks).
        stop = _StopAfterOneEpoch()
        # Steps per execution that divide the rest of the epoch too (a checkpoint saved
        # under another --steps_per_execution may stop between this one's executions).
        with _steps_per_execution(model, execution_steps(model.steps_per_execution,
                                                         steps - into_epoch)):
            model.fit(dataset, epochs=cfg.epochs, initial_epoch=epoch,
                      steps_per_epoch=steps - into_epoch, callbacks=all_callbacks + [stop],
                      verbose=cfg.verbose, shuffle=False)
        train_seconds = checkpoint.train_seconds()
        epoch += 1
        if stop.other:  # A user callback (EarlyStopping, ...) ended training.
            epoch = cfg.epochs
        elif epoch < cfg.epochs and not stopped():
            dataset = dataset_from(epoch * steps)
    if epoch < cfg.epochs and not stopped():
        model.fit(dataset, epochs=cfg.epochs, initial_epoch=epoch,
                  steps_per_epoch=steps, callbacks=all_callbacks,
                  verbose=cfg.verbose, shuffle=False)
        train_seconds = checkpoint.train_seconds()
    if guard.tripped is not None:
        raise NonFiniteLossError(_nonfinite_message(cfg, guard.tripped, cfg.model_dir))
    if preemption.preempted is not None:
        raise Preempted(_preempted_message(cfg, preemption.preempted, steps),
                        preemption.preempted)

    final_path = run_folder.join(cfg.model_dir, run_folder.FINAL_CHECKPOINT)
    if writes:
        run_folder.save_model(model, final_path)
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
        "resumed_from_step": initial_step,
        "steps_per_epoch": steps,
        "optimizer_steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "replicas": replicas,
        "graph_loss_weight": cfg.graph_loss_weight,
        "gather_grad": cfg.gather_grad,
        "graph_key_grad": cfg.graph_key_grad,
        "augment_on": augment_side(cfg),  # cfg.augment_on resolved ("auto")
        "checkpoint": final_path,
    }
    if writes:
        run_folder.write_json(run_folder.join(cfg.model_dir, run_folder.RESULTS_FILE), results)
    log(_summary(cfg, results))
    return results
