"""The benchmark's command line: its flags, the training Config they describe, and the
dispatch to a mode with plain arguments. The one module of the benchmark that reads flags
(the modes and the timing helper take arguments)."""

import dataclasses
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from wcl_tf import config as config_lib  # noqa: E402
from wcl_tf import flagfiles  # noqa: E402
# Defines every Config field as a flag (and --config), as the training command line has
# them: the benchmark times what those flags mean to training.
from wcl_tf import train  # noqa: E402
from wcl_tf.tools import _cli  # noqa: E402
from wcl_tf.tools.benchmark import gpu, pipeline, ratio, step, timing, weak_labels  # noqa: E402

flags.DEFINE_list("batch_sizes", [], "step / profile: global batch sizes timed (default: "
                  "--global_batch_size; profile times the first).")
flags.DEFINE_bool("jit_compile", None, "step / profile: compile the train step with XLA "
                  "(default: as training compiles it, Keras' 'auto': XLA on a GPU or TPU, "
                  "not on a CPU).")
flags.DEFINE_list("sizes", ["256", "1024", "4096", "16384"], "weak_labels: batch sizes n.")
flags.DEFINE_integer("dim", 128, "weak_labels: embedding size.")
flags.DEFINE_integer("batch_size", None, "pipeline / ops: images per batch (default: "
                     "--global_batch_size).", lower_bound=1)
flags.DEFINE_string("augment", "project", "pipeline: 'project' (wcl_tf.data) or "
                    "'keras_cv' (an all-keras-cv two-view recipe, for comparison).")
flags.DEFINE_list("configs", ["demo", "cifar10_r18", "cifar10_r18_multicrop", "r50",
                              "r50_multicrop"],
                  "ratio: train configs, by name (the shipped ones, as --config=NAME) or as "
                  "flagfile paths.")
flags.DEFINE_string("stand_in_dataset", "cifar10", "ratio: dataset timed (at the config's "
                    "image size, from the config's data_dir) when a config's own dataset "
                    "cannot be loaded.")
flags.DEFINE_integer("max_step_batch", 128, "ratio: time the step and pipeline at "
                     "min(global batch, this) images.")
flags.DEFINE_integer("threads", 0, "photometric, pipeline: TensorFlow threads (0: all); "
                     "pipeline: also tf.data's private thread pool, and its per-core rate is "
                     "divided by this instead of the cores the process may use. For one "
                     "core strictly, pin the process too: taskset -c 1 python -m ...",
                     lower_bound=0)
flags.DEFINE_integer("warmup", 2, "Untimed steps first.")
flags.DEFINE_integer("repeats", 5, "Timed steps.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
FLAGS = flags.FLAGS


def train_config(source=None):
    """The Config wcl_tf.train builds from the same flags.

    source None: this command line (absl has parsed it; --config and --flagfile were
    expanded in place by _cli, as wcl_tf.train expands them). Otherwise a shipped config's
    name or a flagfile's path: the Config of `python -m wcl_tf.train --config=NAME` (or
    `--flagfile=PATH`) followed by the training flags given on this command line. The
    training flags are parsed for it and then put back as they were.
    """
    if source is None:
        return train.config_from_flags()
    names = [field.name for field in dataclasses.fields(config_lib.Config)]
    overrides = [FLAGS[name].serialize() for name in names if FLAGS[name].present]
    is_name = source in flagfiles.available_configs() and not source.endswith(".flags")
    args = flagfiles.expand_args(
        [f"--config={source}" if is_name else f"--flagfile={source}", *overrides])
    saved = {name: (FLAGS[name].value, FLAGS[name].present, FLAGS[name].using_default_value)
             for name in names}
    try:
        for name in names:
            FLAGS[name].unparse()
        extra = FLAGS([sys.argv[0], *args])[1:]
        if extra:
            raise flagfiles.FlagfileError(f"{source}: unexpected arguments {extra}: flags "
                                          "look like --name=value.")
        return train.config_from_flags()
    finally:
        for name, (value, present, using_default) in saved.items():
            flag = FLAGS[name]
            flag.value, flag.present, flag.using_default_value = value, present, using_default


def _batch_sizes(cfg):
    return [int(b) for b in FLAGS.batch_sizes] or [cfg.global_batch_size]


def _batch_size(cfg):
    return FLAGS.batch_size or cfg.global_batch_size


def _run_mode(mode):
    """(rows, markdown table) of `mode`, its arguments read from the flags."""
    warmup, repeats, jit = FLAGS.warmup, FLAGS.repeats, FLAGS.jit_compile
    if mode == "weak_labels":
        return weak_labels.bench_weak_labels([int(n) for n in FLAGS.sizes], FLAGS.dim, repeats)
    if mode == "ratio":
        configs = [(source, train_config(source).validate()) for source in FLAGS.configs]
        return ratio.bench_ratio(configs, FLAGS.stand_in_dataset, FLAGS.max_step_batch, jit,
                                 warmup, repeats)
    if mode in ("ops", "photometric"):  # The recipe's ops alone: no Config validation.
        cfg = train_config()
        if mode == "ops":
            return pipeline.bench_ops(cfg, _batch_size(cfg), warmup, repeats)
        return pipeline.bench_photometric(cfg, _batch_size(cfg), FLAGS.threads, warmup,
                                          repeats)
    cfg = train_config().validate()
    if mode == "step":
        return step.bench_step(cfg, _batch_sizes(cfg), jit, warmup, repeats)
    if mode == "profile":
        return step.bench_profile(cfg, _batch_sizes(cfg)[0], jit, warmup, repeats)
    if mode == "gpu":
        return gpu.bench_gpu(cfg, _batch_sizes(cfg)[0], jit, warmup, repeats)
    return pipeline.bench_pipeline(cfg, _batch_size(cfg), FLAGS.augment, FLAGS.threads,
                                   warmup, repeats)


MODES = ("step", "weak_labels", "pipeline", "profile", "ratio", "ops", "gpu", "photometric")


def _main(argv):
    if len(argv) != 2 or argv[1] not in MODES:
        raise app.UsageError(f"usage: benchmark.py {'|'.join(MODES)} [--flags]")
    logging.set_verbosity(logging.WARNING)
    from wcl_tf.data import DataError  # pylint: disable=import-outside-toplevel

    try:
        rows, table = _run_mode(argv[1])
    except (config_lib.ConfigError, DataError, flagfiles.FlagfileError, flags.Error) as err:
        # What wcl_tf.train reports in one line for the same flags.
        print(f"benchmark: error: {err}", file=sys.stderr)
        return 2
    machine = timing.machine()
    print(f"\nMachine: {machine}\nCommand: python -m wcl_tf.tools.benchmark "
          f"{' '.join(sys.argv[1:])}\n\n{table}")
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump({"machine": machine, "argv": sys.argv[1:], "rows": rows}, f, indent=2)
    return 0


def main():
    """Runs the benchmark's command line (see the package's docstring)."""
    # --help lists the training flags too: they describe the run being timed.
    for flag in FLAGS.get_key_flags_for_module(train.__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    _cli.run(_main, "wcl_tf.tools.benchmark")
