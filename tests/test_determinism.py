"""--seed: two CPU processes running the demo config produce identical losses, step by
step; another seed does not (so the comparison has teeth)."""

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = os.path.join(os.path.dirname(__file__), "determinism_run.py")
_STEPS = 4


def _losses(runs):
    """{name: per-step losses} of determinism_run.py for each (name, model_dir, seed), the
    processes run side by side (their start-ups overlap)."""
    procs = {name: subprocess.Popen([sys.executable, _SCRIPT, str(model_dir), str(seed),
                                     str(_STEPS)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, model_dir, seed in runs}
    out = {}
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, stderr[-3000:]
            out[name] = json.loads(stdout.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            proc.kill()
    return out


# Slow tier (CI's 20 minutes): three training processes. In the default tier,
# test_preemption's resumed run must equal an uninterrupted run of another process bit for
# bit, which needs the same per-process determinism.
@pytest.mark.slow
def test_same_seed_same_losses_in_two_processes(tmp_path):
    losses = _losses([("first", tmp_path / "a", 3), ("second", tmp_path / "b", 3),
                      ("other", tmp_path / "c", 4)])
    assert len(losses["first"]) == _STEPS
    assert losses["first"] == losses["second"]  # bit-identical floats
    assert losses["other"] != losses["first"]
