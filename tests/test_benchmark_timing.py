"""The benchmark's timing helper, and its modes as library code: plain arguments, no flags."""

import os
import subprocess
import sys

import pytest

from wcl_tf.tools.benchmark import timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_timed_in_turns_warms_up_then_times_each_in_turn():
    calls = []
    result = timing.timed_in_turns({"a": lambda: calls.append("a"),
                                    "b": lambda: calls.append("b")}, warmup=1, repeats=3)
    assert calls == ["a", "b"] * 4
    assert set(result) == {"a", "b"}
    for timed in result.values():
        assert len(timed.seconds) == len(timed.cpu_seconds) == 3
        assert all(s >= 0 for s in timed.seconds + timed.cpu_seconds)
    single = timing.timed(lambda: calls.append("c"), warmup=2, repeats=1)
    assert calls[-3:] == ["c"] * 3 and len(single.seconds) == 1


def test_timing_statistics_and_rates():
    timed = timing.Timing(seconds=(1.0, 4.0, 2.0, 8.0), cpu_seconds=(0.5, 2.0, 1.0, 4.0))
    assert timed.median == 3.0 and timed.mean == 3.75 and timed.cpu_median == 1.5
    # Median of the per-repeat rates (8, 2, 4, 1 units/s), not units over the median time.
    assert timed.rate(8) == 3.0 and timed.rate(8) != pytest.approx(8 / timed.median)
    assert timed.cpu_rate(8) == 6.0


def test_the_modes_and_the_timing_helper_import_without_flags_or_tensorflow():
    """Only wcl_tf.tools.benchmark.cli defines and reads flags; the timing helper starts no
    TensorFlow (benchmark_embed measures a child process's memory with it)."""
    script = ("import sys; from absl import flags; "
              "import wcl_tf.tools.benchmark.timing; "
              "assert 'tensorflow' not in sys.modules, 'timing imported TensorFlow'; "
              "from wcl_tf.tools.benchmark import gpu, pipeline, ratio, step, weak_labels; "
              "assert not any(n in flags.FLAGS for n in ('batch_sizes', 'repeats', 'out')); "
              "import wcl_tf.tools.benchmark.cli; assert 'batch_sizes' in flags.FLAGS")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
