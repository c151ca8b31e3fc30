"""The tools take --config=NAME (packaged flagfiles) like wcl_tf.train."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "wcl_tf.tools.linear_eval", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_tool_reads_a_packaged_config_and_later_flags_override_it():
    # _cli._parse_flags is private to the tools, but it is exactly the parse every tool's
    # main runs; calling it shows the parsed values without running an evaluation.
    code = ("from absl import flags; from wcl_tf.tools import _cli, linear_eval; "
            "_cli._parse_flags(['linear_eval', '--config=r50_linear', '--epochs=3']); "
            "F = flags.FLAGS; print(F.mode, F.epochs, F.lr, F.batch_size)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # mode, lr and batch from the config; epochs 80 -> 3 by the later flag.
    assert out.stdout.split() == ["full", "3", "3.2", "4096"], out.stdout


def test_unknown_tool_config_lists_the_names():
    out = _tool("--config=nope")
    assert out.returncode == 2
    assert "unknown --config='nope'" in out.stderr and "r50_linear" in out.stderr
