"""`run(cfg)`: one WCL pretraining run, for the CLI and for notebooks alike.

run() reads as its phases, each a function of its own: open model_dir (settings checked
against the run already there, config.json; a finished run is reported, not retrained)
-> the run's setup (strategy, epoch length, kNN data, all checked before anything is
built) -> the model, built and compiled inside the strategy scope -> the resume point
(kNN of the untrained encoder, then the newest checkpoint restored, if any) -> fit from
there (the dataset starts at the restored optimizer step; TensorBoard, per-epoch
checkpoints, the non-finite and preemption guards) -> finish (final.keras, kNN of the
trained encoder, results.json).

What model_dir holds and how a run resumes: wcl_tf/checkpointing.py.

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
import dataclasses
from typing import Callable

import keras
import tensorflow as tf

from wcl_tf import callbacks as callbacks_lib
from wcl_tf import checkpointing
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
    done = _open_model_dir(cfg, writes, on_ready, log)
    if done is not None:
        return done
    setup = _setup(cfg, writes, log)
    model = _model(setup)
    start = _resume(setup, model)
    rows, train_seconds = _fit(setup, model, start, callbacks)
    return _finish(setup, model, start, rows, train_seconds)


@dataclasses.dataclass(frozen=True, eq=False)
class _Setup:
    """What run() settles before it builds the model; the later phases read it."""

    cfg: config_lib.Config
    log: Callable[[str], None]
    writes: bool  # Whether this process writes model_dir (multi-worker: the chief only).
    strategy: tf.distribute.Strategy
    agreement: distributed.WorkerAgreement  # Host-side decisions common to all workers.
    steps: int  # Optimizer steps per epoch.
    arrays: tuple | None  # kNN (memory, queries, num_classes); None without labels.


@dataclasses.dataclass(frozen=True)
class _Start:
    """Where fit starts: the checkpoint restored (None: a new run), the optimizer step the
    model holds, the epochs done before it, the steps of the next epoch already taken (a
    mid-epoch resume; else 0), and what the epochs done left: their logs, the training
    seconds so far, the randomly initialised encoder's kNN top-1."""

    path: str | None
    step: int
    epochs_done: int
    into_epoch: int
    rows: tuple
    train_seconds: float
    random_top1: float | None


def _open_model_dir(cfg, writes, on_ready, log):
    """Binds model_dir to cfg (config.json) and calls on_ready; returns the results of a
    finished run there (logged: nothing to train), else None."""
    checkpointing.prepare_model_dir(cfg, writes)
    if on_ready is not None and writes:
        on_ready(cfg)
    done = run_folder.finished_results(cfg.model_dir, cfg.epochs)
    if done is not None:
        log(f"wcl_tf: {cfg.model_dir} already holds a finished run ({cfg.epochs} of "
            f"{cfg.epochs} epochs): nothing to train, returning its {run_folder.RESULTS_FILE}. "
            "Use a new --model_dir to train again.")
        log(_summary(cfg, done))
    return done


def _setup(cfg, writes, log):
    """The strategy, the epoch length and the kNN data, checked before anything is built;
    logs the run's one-line description."""
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
    return _Setup(cfg, log, writes, strategy, distributed.WorkerAgreement(strategy), steps,
                  arrays)


def _model(setup):
    """The compiled model (`build`); says when steps per execution had to change, checks
    the disk has room for the checkpoints."""
    cfg, steps = setup.cfg, setup.steps
    model = build(cfg, setup.strategy, steps)
    if model.steps_per_execution != cfg.steps_per_execution:
        setup.log(f"wcl_tf: --steps_per_execution={cfg.steps_per_execution} does not divide "
                  f"the {steps} steps per epoch: using {model.steps_per_execution}, the "
                  f"largest divisor of {steps} not above it (Keras would round every epoch "
                  f"up to a multiple of {cfg.steps_per_execution} steps)")
    if setup.writes:
        checkpointing.check_disk_space(cfg, model)
    return model


def _resume(setup, model):
    """The _Start: the kNN of the randomly initialised encoder (saved by an earlier
    process, or measured now), then the resume point's checkpoint restored into `model`,
    or for a new run the --init_from weights."""
    cfg, log, steps = setup.cfg, setup.log, setup.steps
    point = checkpointing.resume_point(cfg.model_dir, steps, setup.agreement)
    rows, state = run_folder.read_history(cfg.model_dir, point.epochs_done)
    random_top1 = state.get("random_encoder_knn_top1")
    if random_top1 is None:  # Before restoring: the weights are the random ones here.
        random_top1 = _knn(model.backbone, setup.arrays, cfg)
    if random_top1 is not None:
        log(f"kNN top-1 of the randomly initialised encoder: {100 * random_top1:.2f}%")
    step, into_epoch = point.step, 0
    if point.path is not None:
        step = checkpointing.restore(model, point.path, setup.strategy)
        if point.mid_epoch:
            into_epoch = step - point.epochs_done * steps
            log(f"resuming in epoch {point.epochs_done + 1} of {cfg.epochs} at step "
                f"{into_epoch} of {steps} ({point.path}, optimizer step {step})")
        else:
            log(f"resuming from epoch {point.epochs_done} of {cfg.epochs} ({point.path}, "
                f"optimizer step {step})")
        if step != point.step:
            log(f"warning: {point.path} holds {step} optimizer steps, not {point.step}; "
                f"the data pipeline starts at step {step}")
        if setup.writes:  # Older mid-epoch checkpoints are superseded (a kill before cleanup).
            run_folder.remove_mid_epoch_checkpoints(cfg.model_dir, step)
    elif cfg.init_from:  # A new run from another run's weights (wcl_tf/warm_start.py).
        log(warm_start.initialise(model, cfg.init_from, setup.strategy))
    return _Start(point.path, step, point.epochs_done, into_epoch, tuple(rows),
                  state.get("train_seconds", 0.0), random_top1)


def _dataset(setup, step):
    """The distributed dataset of views from optimizer step `step` on."""
    # tf.data ops take TensorFlow's global seed with their own: make it cfg.seed's.
    with seeding.scoped(setup.cfg.seed):
        return pipeline.distribute_pretrain_dataset(setup.strategy, setup.cfg,
                                                    initial_step=step)[0]


def _fit(setup, model, start, callbacks):
    """model.fit from `start` to cfg.epochs, with the monitors, the guards, the epoch
    checkpoints, TensorBoard and `callbacks`; returns (logs of the epochs done, one dict
    each, training seconds). Raises NonFiniteLossError or Preempted when a guard stopped
    training."""
    cfg, steps = setup.cfg, setup.steps
    dataset = _dataset(setup, start.step)
    rows = list(start.rows)
    state = {"random_encoder_knn_top1": start.random_top1,
             "train_seconds": start.train_seconds, "history": rows}
    if setup.writes:  # Drops rows of epochs not checkpointed.
        run_folder.makedirs(run_folder.join(cfg.model_dir, run_folder.CHECKPOINT_DIR))
        run_folder.write_history_csv(cfg.model_dir, rows)
    guard = callbacks_lib.NonFiniteGuard(cfg.skip_nonfinite_steps, setup.log)
    checkpoint = checkpointing.EpochCheckpoint(cfg.model_dir, rows, state, write=setup.writes,
                                               guard=guard, keep=cfg.keep_checkpoints)
    preemption = callbacks_lib.PreemptionGuard(checkpoint.save_mid_epoch,
                                               agree=setup.agreement.any_worker)
    all_callbacks = _monitors(cfg, setup.arrays) + [
        callbacks_lib.LearningRateLogger(),
        guard,
        checkpoint,  # Before the preemption guard: an epoch's end saves first.
        preemption,
    ]
    if setup.writes:
        all_callbacks.append(keras.callbacks.TensorBoard(
            run_folder.join(cfg.model_dir, run_folder.LOG_DIR), update_freq="epoch"))
    all_callbacks += list(callbacks)

    def stopped():
        return guard.tripped is not None or preemption.preempted is not None

    train_seconds = start.train_seconds
    epoch = start.epochs_done
    if epoch < cfg.epochs and start.into_epoch:
        # The rest of the interrupted epoch: Keras gives every epoch of one fit() the same
        # number of steps, so it is a fit() of its own, stopped after that epoch (epochs
        # still count to cfg.epochs in the logs and callbacks).
        stop = callbacks_lib.StopAfterOneEpoch()
        rest = steps - start.into_epoch
        # Steps per execution that divide the rest of the epoch too (a checkpoint saved
        # under another --steps_per_execution may stop between this one's executions).
        with _steps_per_execution(model, execution_steps(model.steps_per_execution, rest)):
            model.fit(dataset, epochs=cfg.epochs, initial_epoch=epoch, steps_per_epoch=rest,
                      callbacks=all_callbacks + [stop], verbose=cfg.verbose, shuffle=False)
        train_seconds = checkpoint.train_seconds()
        epoch += 1
        if stop.other:  # A user callback (EarlyStopping, ...) ended training.
            epoch = cfg.epochs
        elif epoch < cfg.epochs and not stopped():
            dataset = _dataset(setup, epoch * steps)
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
    return rows, train_seconds


def _finish(setup, model, start, rows, train_seconds):
    """final.keras, the trained encoder's kNN (the last epoch's, when it has one), and
    results.json; logs the summary and returns the results."""
    cfg = setup.cfg
    final_path = run_folder.join(cfg.model_dir, run_folder.FINAL_CHECKPOINT)
    if setup.writes:
        run_folder.save_model(model, final_path)
    knn_history = [[r["epoch"], r["knn_top1"]] for r in rows if "knn_top1" in r]
    final_row = rows[-1] if rows else {}
    top1 = final_row.get("knn_top1")
    if top1 is None:
        top1 = _knn(model.backbone, setup.arrays, cfg)
    results = {
        "knn_top1": top1,
        "knn_top1_per_epoch": knn_history,
        "random_encoder_knn_top1": start.random_top1,
        "final_loss": final_row.get("loss"),
        "train_seconds": round(train_seconds, 1),
        "epochs": cfg.epochs,
        "completed_epochs": final_row.get("epoch", 0),
        "resumed_from_epoch": start.epochs_done,
        "resumed_from_step": start.step,
        "steps_per_epoch": setup.steps,
        "optimizer_steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "replicas": setup.strategy.num_replicas_in_sync,
        "graph_loss_weight": cfg.graph_loss_weight,
        "gather_grad": cfg.gather_grad,
        "graph_key_grad": cfg.graph_key_grad,
        "augment_on": augment_side(cfg),  # cfg.augment_on resolved ("auto")
        "checkpoint": final_path,
    }
    if setup.writes:
        run_folder.write_json(run_folder.join(cfg.model_dir, run_folder.RESULTS_FILE), results)
    setup.log(_summary(cfg, results))
    return results
