"""--seed: two CPU processes running the demo config produce identical losses, step by
step; another seed does not (so the comparison has teeth)."""

import json
import os
import subprocess
import sys

_SCRIPT = os.path.join(os.path.dirname(__file__), "determinism_run.py")
_STEPS = 4


def _losses(model_dir, seed):
    out = subprocess.run([sys.executable, _SCRIPT, str(model_dir), str(seed), str(_STEPS)],
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_same_seed_same_losses_in_two_processes(tmp_path):
    first = _losses(tmp_path / "a", seed=3)
    second = _losses(tmp_path / "b", seed=3)
    assert len(first) == _STEPS
    assert first == second  # bit-identical floats
    other = _losses(tmp_path / "c", seed=4)
    assert other != first
