"""Callbacks used during pretraining: kNN monitor and weak-label diagnostics, the
learning-rate logger, the one-epoch stop, the non-finite guard, and the preemption guard
(SIGTERM: save mid-epoch, stop).

The monitors add keys to the epoch logs, so a TensorBoard or CSVLogger callback placed
after them in the list records the values. They skip an epoch that a guard cut short
(`model.stop_training` set during its steps): its model is not the epoch's, and under
preemption the grace period is better spent elsewhere.
"""

import signal
import threading

import keras
import numpy as np
import tensorflow as tf

from wcl_tf import knn
from wcl_tf import weak_labels as weak_labels_lib


class KNNMonitor(keras.callbacks.Callback):
    """Logs `knn_top1` (weighted kNN of the backbone, inference mode) every N epochs.

    Args:
      train: (images, labels) memory bank, float32 images in [0, 1].
      test: (images, labels) queries.
      num_classes: number of classes.
      every: evaluate after every `every`-th epoch (and after the last one).
      k, temperature: kNN settings.
    """

    def __init__(self, train, test, num_classes, every=1, k=200, temperature=0.1):
        super().__init__()
        self.train, self.test = train, test
        self.num_classes, self.every = num_classes, max(1, int(every))
        self.k, self.temperature = k, temperature
        self.history = []  # [epoch, top1]

    def on_epoch_end(self, epoch, logs=None):
        last = self.params and epoch + 1 == self.params.get("epochs")
        if ((epoch + 1) % self.every and not last) or self.model.stop_training:
            return
        top1 = knn.evaluate_encoder(self.model.backbone, *self.train, *self.test,
                                    self.num_classes, k=self.k, temperature=self.temperature)
        self.history.append([epoch + 1, top1])
        if logs is not None:
            logs["knn_top1"] = top1


def weak_label_statistics(v, labels):
    """Diagnostics of the weak labels built from embeddings v (n, d).

    Returns a dict: num_components, mean and max component size, and purity, the
    fraction of weak-positive pairs (same component, i != j) that share the true class.
    """
    weak = weak_labels_lib.weak_labels(tf.convert_to_tensor(v, tf.float32)).numpy()
    labels = np.asarray(labels)
    sizes = np.bincount(weak, minlength=len(weak))
    sizes = sizes[sizes > 0]
    same_component = weak[:, None] == weak[None, :]
    np.fill_diagonal(same_component, False)
    same_class = labels[:, None] == labels[None, :]
    pairs = same_component.sum()
    return {
        "num_components": int(len(sizes)),
        "component_size_mean": float(sizes.mean()),
        "component_size_max": int(sizes.max()),
        "purity": float((same_component & same_class).sum() / max(pairs, 1)),
    }


class WeakLabelDiagnostics(keras.callbacks.Callback):
    """Logs weak-label statistics of a fixed labelled batch every N epochs.

    The batch is two augmented views (view_1, view_2) of labelled images; the graph
    head embeds them in inference mode and the statistics of view 1's graph are logged
    as `weak_purity`, `weak_components`, `weak_component_size_mean`,
    `weak_component_size_max`.
    """

    def __init__(self, view_1, labels, every=1):
        super().__init__()
        self.view_1, self.labels = view_1, np.asarray(labels)
        self.every = max(1, int(every))

    def on_epoch_end(self, epoch, logs=None):
        last = self.params and epoch + 1 == self.params.get("epochs")
        if ((epoch + 1) % self.every and not last) or self.model.stop_training:
            return
        _, v = self.model.embed(tf.convert_to_tensor(self.view_1), training=False)
        stats = weak_label_statistics(v, self.labels)
        if logs is not None:
            logs["weak_purity"] = stats["purity"]
            logs["weak_components"] = stats["num_components"]
            logs["weak_component_size_mean"] = stats["component_size_mean"]
            logs["weak_component_size_max"] = stats["component_size_max"]


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the optimizer's current learning rate to the epoch logs (TensorBoard)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class StopAfterOneEpoch(keras.callbacks.Callback):
    """Ends a fit() after its first epoch (the rest of an interrupted epoch); `other`
    records whether something else had stopped it already (a guard, EarlyStopping)."""

    other = False

    def on_epoch_end(self, epoch, logs=None):
        self.other = bool(self.model.stop_training)
        self.model.stop_training = True


def learning_rate_at(optimizer, step):
    """The learning rate `optimizer` used (or uses) at 0-based optimizer step `step`."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
    schedule = getattr(optimizer, "_learning_rate", None)
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        return float(keras.ops.convert_to_numpy(schedule(step)))
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def describe_step(info):
    """'optimizer step S (epoch E, batch B), learning rate L' of a NonFiniteGuard info
    dict; 'optimizer steps F-S (epoch E, batches ..B)' when the step is known only within
    one execution of several steps."""
    if info.get("first_step", info["optimizer_step"]) < info["optimizer_step"]:
        span = info["optimizer_step"] - info["first_step"]
        return (f"one of optimizer steps {info['first_step']}-{info['optimizer_step']} "
                f"(epoch {info['epoch']}, batches {info['batch'] - span}-{info['batch']}), "
                f"learning rate about {info['learning_rate']:.4g}")
    return (f"optimizer step {info['optimizer_step']} (epoch {info['epoch']}, batch "
            f"{info['batch']}), learning rate {info['learning_rate']:.4g}")


class NonFiniteGuard(keras.callbacks.Callback):
    """Stops training at a non-finite step, or skips up to `max_skips` of them.

    WCLModel.train_step never applies an update whose loss or gradients are NaN/Inf and
    counts such steps in the `nonfinite_steps` log. This callback watches that count:
    each skipped step is reported through `log` (optimizer step, epoch, learning rate);
    the (max_skips + 1)-th stops training and leaves `tripped` = a dict describing it
    (None while all is well), which the caller turns into an error message.

    The count is read when Keras hands over the logs: after every step, or once per
    execution with compile(steps_per_execution=k) (no device-to-host sync per step).
    With k > 1 a bad step is located within its execution: `first_step` ..
    `optimizer_step` in the info dict, and training stops at the end of that execution.
    """

    def __init__(self, max_skips=0, log=print):
        super().__init__()
        self.max_skips, self.log = int(max_skips), log
        self.skipped = 0
        self.tripped = None
        self._seen_this_epoch = 0
        self._epoch = 0
        self._last_step = None  # optimizer step after the previous logs, this epoch

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._seen_this_epoch = epoch, 0
        self._last_step = None

    def on_train_batch_end(self, batch, logs=None):
        count = int(round(float((logs or {}).get("nonfinite_steps", 0.0))))
        optimizer = self.model.optimizer
        done = int(keras.ops.convert_to_numpy(optimizer.iterations))  # steps counted so far
        first = self._last_step if self._last_step is not None else max(
            0, done - int(getattr(self.model, "steps_per_execution", 1) or 1))
        self._last_step = done
        new = count - self._seen_this_epoch
        if new <= 0:
            return
        self._seen_this_epoch = count
        self.skipped += new
        # The optimizer counted the skipped step too: it was one of first .. done - 1.
        step = done - 1
        info = {
            "optimizer_step": step,
            "first_step": min(first, step),
            "epoch": self._epoch + 1,
            "batch": batch + 1,
            "learning_rate": learning_rate_at(optimizer, step),
            "skipped_so_far": self.skipped,
        }
        where = describe_step(info)
        if self.skipped > self.max_skips:
            self.tripped = info
            self.model.stop_training = True
            return
        self.log(f"warning: non-finite loss or gradients at {where}: "
                 f"{'update' if new == 1 else f'{new} updates'} skipped "
                 f"({self.skipped} of at most {self.max_skips}).")


class PreemptionGuard(keras.callbacks.Callback):
    """On SIGTERM: finish the step in flight, save, stop training.

    Cloud TPUs and spot VMs send SIGTERM and, a grace period later, SIGKILL. While fit
    runs, this callback replaces SIGTERM's action (ending the process) by setting a flag;
    the previous handler is back once fit returns, and a second SIGTERM gets it at once
    (by default: the process ends), for whoever does not want to wait. After each step (each
    execution with steps_per_execution > 1) the flag is read:

    - in the middle of an epoch: `save(optimizer_step)` writes a mid-epoch checkpoint and
      returns its path, and training stops;
    - after an epoch's last step: nothing is saved here; the epoch ends as usual (its
      checkpoint callback, placed before this one, writes the epoch checkpoint) and
      training stops in on_epoch_end. A signal that arrives during the epoch-end work is
      handled there too, before the next epoch's first step.

    A signal after the last epoch's last step stops nothing (training is over).
    `preempted` is then a dict: optimizer_step (steps done and saved), epoch (1-based,
    the one stopped in or after), path (the mid-epoch checkpoint; None when the epoch
    checkpoint holds the state); None while all is well.

    `agree(flag) -> bool` makes the decision common to all workers (multi-worker: a
    worker that stopped alone would leave the others waiting in their next all-reduce);
    every worker calls it at the same points. Default: this process's flag.

    Why not tf.distribute.experimental.PreemptionCheckpointHandler: it saves and restores
    a tf.train.Checkpoint in a folder of its own (resume, export and the tools read the
    run folder's .keras files), it wants to drive the step loop (handler.run(step) or
    save_checkpoint_if_preempted() between steps), which Keras 3's fit owns (Keras 2's
    BackupAndRestore(save_before_preemption=True) wired the two; Keras 3 dropped it),
    and it ends the process itself after saving, with platform-specific exit codes, so
    the caller could not report where the run stopped. A signal handler that sets a flag,
    read between steps, does the same with the run folder's atomic writer.
    """

    def __init__(self, save, agree=None, signum=signal.SIGTERM):
        super().__init__()
        self.save, self.agree, self.signum = save, agree or bool, signum
        self.preempted = None
        self.signalled = False
        self._previous = None
        self._epoch = 0

    def _handler(self, signum, frame):
        del frame
        self.signalled = True
        # A second signal gets the previous action (by default: the process ends).
        signal.signal(signum, self._previous)

    def on_train_begin(self, logs=None):
        # Python delivers signals to the main thread only; elsewhere (a notebook's worker
        # thread) SIGTERM keeps its usual action.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handler)

    def on_train_end(self, logs=None):
        if self._previous is not None and not self.signalled:
            signal.signal(self.signum, self._previous)
        self._previous = None

    def _stop(self, epoch, path):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.preempted = {"optimizer_step": step, "epoch": epoch + 1, "path": path}
        self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        steps = self.params.get("steps")
        if self.preempted is not None or (steps is not None and batch + 1 >= steps):
            return  # The epoch's end comes next, with its own checkpoint.
        if self.agree(self.signalled):
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            self._stop(self._epoch, self.save(step))

    def on_epoch_end(self, epoch, logs=None):
        if self.preempted is not None or epoch + 1 >= (self.params.get("epochs") or 0):
            return
        if self.agree(self.signalled):
            self._stop(epoch, None)
