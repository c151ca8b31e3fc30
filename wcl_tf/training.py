"""`run(cfg)`: one WCL pretraining run, for the CLI and for notebooks alike.

Order of work: validate everything that can be checked before the first step
(settings, model_dir, strategy, dataset) -> build data, model and optimizer inside
the strategy scope -> kNN of the untrained encoder -> model.fit with TensorBoard,
per-epoch checkpoints and resume -> kNN of the trained encoder -> results.json.
"""

import json
import os
import time

import keras
import tensorflow as tf

from wcl_tf import callbacks as callbacks_lib
from wcl_tf import knn
from wcl_tf import optimizers
from wcl_tf import strategy as strategy_lib
from wcl_tf.config import ConfigError
from wcl_tf.data import augment, pipeline, sources
from wcl_tf.models.wcl_model import build_wcl_model

CONFIG_FILE = "config.json"


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
    settings = cfg.to_dict()
    if os.path.exists(path):
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
    with open(path, "w") as f:
        json.dump(settings, f, indent=2, sort_keys=True)


class _LearningRateLogger(keras.callbacks.Callback):
    """Adds the optimizer's current learning rate to the epoch logs (TensorBoard)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


def _knn_arrays(cfg):
    """Labelled (memory, queries) arrays for the kNN evaluation, or None without labels."""
    train = sources.load_arrays(cfg.dataset, cfg.train_split, cfg.image_size, cfg.data_dir,
                                cfg.download, cfg.max_eval_examples)
    test = sources.load_arrays(cfg.dataset, cfg.eval_split, cfg.image_size, cfg.data_dir,
                               cfg.download, cfg.max_eval_examples)
    _, _, num_classes = sources.load_split(cfg.dataset, cfg.eval_split, cfg.data_dir,
                                           cfg.download)
    return train, test, num_classes


def _knn(encoder, arrays, cfg):
    (x_train, y_train), (x_test, y_test), num_classes = arrays
    return knn.evaluate_encoder(encoder, x_train, y_train, x_test, y_test, num_classes,
                                k=cfg.knn_k, temperature=cfg.knn_temperature)


def build(cfg, strategy, steps_per_epoch):
    """WCLModel compiled with LARS + warm-up cosine, inside `strategy.scope()`."""
    replicas = strategy.num_replicas_in_sync
    sync_bn = cfg.sync_bn if cfg.sync_bn is not None else replicas > 1
    with strategy.scope():
        keras.utils.set_random_seed(cfg.seed)
        model = build_wcl_model(
            cfg.backbone, head_hidden_dim=cfg.head_hidden_dim,
            head_output_dim=cfg.head_output_dim, sync_bn=sync_bn, width=cfg.width,
            temperature=cfg.temperature, graph_loss_weight=cfg.graph_loss_weight,
            gather_grad=cfg.gather_grad, image_size=cfg.image_size)
        model.compile(optimizer=optimizers.build_optimizer(cfg, steps_per_epoch))
    return model


def _monitors(cfg, arrays):
    """kNN monitor and weak-label diagnostics on a fixed labelled batch."""
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


def run(cfg, log=print, on_ready=None):
    """Pretrain with WCL as `cfg` says; returns a dict of results (also results.json).

    on_ready(cfg), if given, is called once model_dir is known to be usable (the CLI
    writes flags.txt there).
    """
    cfg.validate()
    _prepare_model_dir(cfg)
    if on_ready is not None:
        on_ready(cfg)
    strategy = strategy_lib.build_strategy(cfg.strategy, cfg.tpu)
    replicas = strategy.num_replicas_in_sync
    dataset, steps_per_epoch = pipeline.distribute_pretrain_dataset(strategy, cfg)
    arrays = _knn_arrays(cfg)
    log(f"wcl_tf: {cfg.backbone} on {cfg.dataset} ({cfg.image_size} px), "
        f"{replicas} replica(s), global batch {cfg.global_batch_size}, "
        f"{steps_per_epoch} steps x {cfg.epochs} epochs, lambda={cfg.graph_loss_weight}, "
        f"gather_grad={cfg.gather_grad}, peak lr {cfg.learning_rate():.4g}")

    model = build(cfg, strategy, steps_per_epoch)
    random_top1 = _knn(model.backbone, arrays, cfg)
    log(f"kNN top-1 of the randomly initialised encoder: {100 * random_top1:.2f}%")

    ckpt_dir = os.path.join(cfg.model_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    monitors = _monitors(cfg, arrays)
    callbacks = monitors + [
        _LearningRateLogger(),
        keras.callbacks.BackupAndRestore(os.path.join(cfg.model_dir, "backup")),
        keras.callbacks.ModelCheckpoint(os.path.join(ckpt_dir, "epoch_{epoch:03d}.keras")),
        keras.callbacks.TensorBoard(os.path.join(cfg.model_dir, "logs"), update_freq="epoch"),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.CSVLogger(os.path.join(cfg.model_dir, "history.csv"), append=True),
    ]
    start = time.time()
    history = model.fit(dataset, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                        callbacks=callbacks, verbose=cfg.verbose, shuffle=False)
    train_seconds = time.time() - start

    final_path = os.path.join(cfg.model_dir, "final.keras")
    model.save(final_path)
    knn_history = monitors[0].history
    top1 = knn_history[-1][1] if knn_history else _knn(model.backbone, arrays, cfg)
    results = {
        "knn_top1": top1,
        "knn_top1_per_epoch": knn_history,
        "random_encoder_knn_top1": random_top1,
        "final_loss": float(history.history["loss"][-1]) if history.history else None,
        "train_seconds": round(train_seconds, 1),
        "epochs": cfg.epochs,
        "steps_per_epoch": steps_per_epoch,
        "replicas": replicas,
        "checkpoint": final_path,
    }
    with open(os.path.join(cfg.model_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    log(f"kNN top-1 (k={cfg.knn_k}, T={cfg.knn_temperature}) on {cfg.dataset}:"
        f"{cfg.eval_split}: WCL encoder {100 * top1:.2f}% | randomly initialised encoder "
        f"{100 * random_top1:.2f}%  (trained {train_seconds / 60:.1f} min; "
        f"model in {final_path})")
    return results
