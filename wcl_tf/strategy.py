"""Build the tf.distribute strategy from one setting."""

import json
import os

import tensorflow as tf


class StrategyError(ValueError):
    """The requested strategy cannot be built here; the message names the fix."""


def _tf_config():
    """TF_CONFIG as a dict; StrategyError when it is missing or not JSON."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise StrategyError(
            "strategy 'multi_worker' needs the TF_CONFIG environment variable "
            '(e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}) on every worker.')
    try:
        return json.loads(raw)
    except ValueError as err:
        raise StrategyError(f"TF_CONFIG is not valid JSON ({err}): fix the variable.") from None


def build_strategy(name="one_device", tpu=""):
    """Returns a tf.distribute.Strategy.

    one_device: the first GPU if there is one, else the CPU.
    mirrored: all local GPUs (the CPU when there is none).
    multi_worker: MultiWorkerMirroredStrategy configured by the TF_CONFIG variable.
    tpu: TPUStrategy on the TPU named by `tpu` ("" = the local / Colab TPU).
    """
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        _tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as err:
            raise StrategyError(
                f"no TPU found (tpu={tpu!r}): {str(err).splitlines()[0]}. Pass --tpu=NAME "
                "or run on a TPU VM, or choose another --strategy.") from None
        return tf.distribute.TPUStrategy(resolver)
    raise StrategyError(
        f"unknown strategy {name!r}: use one_device, mirrored, multi_worker or tpu.")


def is_chief(name="one_device"):
    """Whether this process writes the run folder: always, except under `multi_worker`,
    where only the chief does: the task of type "chief" if the cluster has one, else
    worker 0 (TensorFlow's rule, which `strategy.extended.should_checkpoint` follows).
    Read from TF_CONFIG, so it is known before the strategy is built: a non-chief worker
    must not even create model_dir. StrategyError as build_strategy for a bad TF_CONFIG."""
    if name != "multi_worker":
        return True
    config = _tf_config()
    task = config.get("task", {})
    if "chief" in config.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0
