"""How the benchmarks time: untimed warm-up calls, then timed repeats, each by the clock
and in this process's CPU time; medians, means and rates of them; and what they ran on
(cores, peak memory, the machine line of each report).

Imports no TensorFlow at module level: wcl_tf.tools.benchmark_embed times a child process
whose peak memory a TensorFlow-sized parent would blur.
"""

import dataclasses
import os
import platform
import resource
import statistics
import time


@dataclasses.dataclass(frozen=True)
class Timing:
    """The seconds of each timed repeat: by the clock, and of this process's CPU time (all
    its threads; what a busy machine's other processes do not dilute)."""

    seconds: tuple
    cpu_seconds: tuple

    @property
    def median(self):
        return statistics.median(self.seconds)

    @property
    def mean(self):
        return statistics.mean(self.seconds)

    @property
    def cpu_median(self):
        return statistics.median(self.cpu_seconds)

    def rate(self, units):
        """Median over the repeats of `units` per second (units: what one call does)."""
        return statistics.median(units / s for s in self.seconds)

    def cpu_rate(self, units):
        """Median over the repeats of `units` per CPU second of this process."""
        return statistics.median(units / s for s in self.cpu_seconds)


def timed_in_turns(fns, warmup, repeats):
    """{name: Timing} of each of fns (name -> callable), timed in turns: one call of each
    per round, `repeats` rounds after `warmup` untimed ones, so that a load change on a
    shared machine hits them all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds = {name: [] for name in fns}
    cpu_seconds = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(time.process_time() - cpu_start)
    return {name: Timing(tuple(seconds[name]), tuple(cpu_seconds[name])) for name in fns}


def timed(fn, warmup, repeats):
    """Timing of `repeats` calls of fn after `warmup` untimed ones."""
    return timed_in_turns({"fn": fn}, warmup, repeats)["fn"]


def cores():
    """CPU cores this process may run on (taskset / cgroup affinity), for per-core rates."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux.
        return os.cpu_count()


def peak_memory_mb():
    """The accelerator allocator's peak on a GPU, else this process's peak resident set
    (TensorFlow itself included)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    if tf.config.list_physical_devices("GPU"):
        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def machine():
    """Processor, device and TensorFlow version: the first line of each report."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    gpus = tf.config.list_physical_devices("GPU")
    device = (tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
              if gpus else f"CPU only, {cores()} cores")
    pool = os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "false").lower() in ("true", "1")
    return (f"{platform.processor() or platform.machine()}, {device}, TensorFlow "
            f"{tf.__version__}, host tensors: {'BFC pool' if pool else 'malloc'}")


def minor_faults():
    """Minor page faults of this process so far (0 where the OS does not count them)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
