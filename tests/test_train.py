"""End-to-end: the library entry point and the command line, on tiny settings."""

import json
import os
import subprocess
import sys
import zipfile

import pytest

from wcl_tf import checkpointing, training
from wcl_tf.config import Config, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(dataset="embedded_mnist", image_size=16, backbone="small_cnn", width=4,
            head_hidden_dim=16, head_output_dim=8, global_batch_size=16, epochs=2,
            steps_per_epoch=2, warmup_epochs=1, weak_aug_epochs=1,
            max_eval_examples=100, knn_k=5, verbose=0)


def test_run_writes_checkpoints_logs_and_results(tmp_path):
    cfg = Config(model_dir=str(tmp_path / "run"), **TINY)
    results = training.run(cfg, log=lambda msg: None)
    run_dir = tmp_path / "run"
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch_001.keras", "epoch_002.keras"]
    assert (run_dir / "final.keras").exists()
    assert any(f.startswith("events") for _, _, fs in os.walk(run_dir / "logs") for f in fs)
    with open(run_dir / "results.json") as f:
        assert json.load(f) == results
    assert 0.0 <= results["knn_top1"] <= 1.0 and results["steps_per_epoch"] == 2
    with open(run_dir / "history.csv") as f:
        header = f.readline()
    for key in ("loss", "instance_loss", "graph_loss", "instance_acc", "num_components",
                "learning_rate"):
        assert key in header


def test_model_dir_with_other_settings_is_refused(tmp_path):
    # _prepare_model_dir is private: it is run()'s first check, tested without training.
    cfg = Config(model_dir=str(tmp_path), **TINY)
    checkpointing.prepare_model_dir(cfg)
    # No checkpoint yet (e.g. the first try stopped on a wrong data_dir): may be retried.
    checkpointing.prepare_model_dir(cfg.replace(temperature=0.3))
    os.makedirs(tmp_path / "checkpoints")
    with zipfile.ZipFile(tmp_path / "checkpoints" / "epoch_001.keras", "w") as archive:
        archive.writestr("model.weights.h5", b"")
    with pytest.raises(ConfigError, match="temperature: 0.3 -> 0.2"):
        checkpointing.prepare_model_dir(cfg.replace(temperature=0.2))
    # Settings of an attempt, not of the run, may change (what the NaN message advises).
    checkpointing.prepare_model_dir(cfg.replace(
        temperature=0.3, skip_nonfinite_steps=4, data_dir=str(tmp_path / "elsewhere"),
        eval_every_epochs=1, keep_checkpoints=1, verbose=2, strategy="mirrored"))
    for change in ({"seed": 1}, {"global_batch_size": 32}, {"graph_key_grad": True},
                   {"epochs": TINY["epochs"] + 1}, {"precision": "mixed_bfloat16"}):
        with pytest.raises(ConfigError, match=f"{next(iter(change))}: "):
            checkpointing.prepare_model_dir(cfg.replace(temperature=0.3, **change))


def _cli(*args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "wcl_tf.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# Slow tier (CI's 20 minutes). In the default tier, test_installed_package trains
# --config=demo through the CLI and checks the kNN line and flags.txt, and
# test_top_level_configs_folder_is_the_packaged_one checks configs/ (this test's flagfile).
@pytest.mark.slow
def test_cli_demo_flagfile_runs_and_reports_knn(tmp_path):
    out = _cli("--flagfile=configs/demo.flags", f"--model_dir={tmp_path}", "--epochs=1",
               "--steps_per_epoch=2", "--max_eval_examples=200", "--verbose=0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kNN top-1" in out.stdout and "randomly initialised encoder" in out.stdout
    flags_txt = (tmp_path / "flags.txt").read_text()
    assert "--dataset=embedded_mnist" in flags_txt and "--epochs=1" in flags_txt


_BAD_INPUTS = [
    (["--temperature=0"], "temperature must be > 0"),
    (["--warmup_epochs=50", "--epochs=10"], "warmup_epochs must be between 0 and epochs"),
    (["--dataset=cifar10", "--data_dir={tmp}"], "not prepared"),
    (["--dataset=no_such_dataset_xyz"], "no_such_dataset_xyz"),
    (["--global_batch_size=8192"], "global batch"),
]


def test_cli_bad_input_gives_one_clear_message(tmp_path):
    """Each bad input: exit status 2, one line naming it, no traceback. The five CLI
    processes run side by side (their TensorFlow start-ups overlap)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    procs = []
    for k, (args, message) in enumerate(_BAD_INPUTS):
        args = [a.replace("{tmp}", str(tmp_path / "empty")) for a in args]
        command = [sys.executable, "-m", "wcl_tf.train", "--flagfile=configs/demo.flags",
                   f"--model_dir={tmp_path / f'run{k}'}", *args]
        procs.append((message, subprocess.Popen(command, cwd=ROOT, env=env, text=True,
                                                stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)))
    try:
        for message, proc in procs:
            stdout, stderr = proc.communicate(timeout=240)
            assert proc.returncode == 2, (message, stdout[-2000:] + stderr[-2000:])
            assert message in stderr, (message, stderr[-2000:])
            assert "Traceback" not in stderr
    finally:
        for _, proc in procs:
            proc.kill()


def test_cli_unknown_backbone_is_refused_by_the_flag_parser(tmp_path):
    out = _cli("--backbone=vgg", f"--model_dir={tmp_path}", timeout=120)
    assert out.returncode != 0
    assert "resnet50" in out.stderr and "Traceback" not in out.stderr
