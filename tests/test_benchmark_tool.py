"""The benchmark tool runs and writes its JSON (a smoke test: no timing is asserted), and
reads the training flags as wcl_tf.train reads them."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *args):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "tools/benchmark.py", *args, f"--out={out}",
                           "--warmup=1", "--repeats=1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _config_json(module, code, flagfile):
    """Config.to_dict() printed by `code` after absl parsed --flagfile=flagfile into the
    flags of `module` (wcl_tf.train or wcl_tf.tools.benchmark.cli); no TensorFlow starts."""
    script = (f"import json, sys; from absl import flags; from wcl_tf import flagfiles; "
              f"import {module} as m; "
              f"flags.FLAGS(['x', *flagfiles.expand_args(['--flagfile={flagfile}'])]); "
              f"print(json.dumps({code}))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_a_flagfile_means_to_the_benchmark_what_it_means_to_training(tmp_path):
    # r50 turns blur on; the old hand-written parser read --sync_bn=auto as False and
    # ignored --noblur.
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("--config=r50\n--sync_bn=auto\n--noblur\n--image_size=64\n")
    trained = _config_json("wcl_tf.train", "m.config_from_flags().to_dict()", flagfile)
    assert trained["sync_bn"] is None and trained["blur"] is False
    assert trained["backbone"] == "resnet50" and trained["image_size"] == 64
    # On the benchmark's command line (step, pipeline, ...) and as one of ratio's --configs.
    command_line, listed = _config_json(
        "wcl_tf.tools.benchmark.cli",
        f"[m.train_config().to_dict(), m.train_config('{flagfile}').to_dict()]", flagfile)
    assert command_line == trained and listed == trained


@pytest.mark.slow
def test_weak_label_benchmark(tmp_path):
    result, stdout = _run(tmp_path, "weak_labels", "--sizes=64,128", "--dim=8")
    assert [r["n"] for r in result["rows"]] == [64, 128]
    assert "| 128 |" in stdout


# Slow tier (CI's 20 minutes). In the default tier, the gpu check runs the step
# benchmark with the augmentation on the device, and both host pipelines.
@pytest.mark.slow
def test_step_benchmark_with_local_crops_and_device_augmentation(tmp_path):
    """The step with local crops and the augmentation in the step: the row reports the
    augmentation's own time and its share of the step (host-augmented steps are timed by
    the ratio test)."""
    result, stdout = _run(tmp_path, "step", "--backbone=small_cnn", "--width=4",
                          "--batch_sizes=8", "--image_size=16", "--head_hidden_dim=16",
                          "--head_output_dim=8", "--num_local_crops=2", "--knn_crops=2",
                          "--local_crop_size=8", "--augment_on=device", "--blur")
    row = result["rows"][0]
    assert row["batch"] == 8 and row["local_crops"] == 2 and row["kept_local_crops"] == 2
    assert row["pairs_per_s"] > 0
    assert 0 < row["augment_on_device_s"] and 0 < row["augment_share"]
    # Each figure is rounded to 0.1 ms in the JSON: compare within that rounding.
    assert row["augment_share"] == pytest.approx(row["augment_on_device_s"] / row["step_s"],
                                                 rel=0.05)
    assert "%)" in stdout


@pytest.mark.slow
def test_profile_attributes_op_time_to_parts(tmp_path):
    result, stdout = _run(tmp_path, "profile", "--backbone=small_cnn", "--width=4",
                          "--batch_sizes=8", "--image_size=16", "--head_hidden_dim=16",
                          "--head_output_dim=8")
    row = result["rows"][0]
    assert abs(sum(row["by_part"].values()) - 1.0) < 0.01
    assert row["by_part"]["backbone backward"] > 0 and row["by_part"]["backbone forward"] > 0
    assert any(k.startswith("Conv2D") for k in row["by_op"])
    assert "| op family |" in stdout


@pytest.mark.slow
def test_ratio_reads_a_shipped_flagfile(tmp_path):
    result, _ = _run(tmp_path, "ratio", "--configs=configs/demo.flags", "--max_step_batch=8")
    (row,) = result["rows"]
    assert row["config"] == "configs/demo.flags" and row["batch"] == 8
    assert row["image_size"] == 28 and row["dataset"] == "embedded_mnist"
    assert row["ratio"] == pytest.approx(
        row["pipeline_images_per_s"] / row["step_images_per_s"], abs=0.11)


@pytest.mark.slow
def test_ops_compares_every_augmentation_op(tmp_path):
    result, _ = _run(tmp_path, "ops", "--image_size=16", "--batch_size=4")
    assert [r["op"] for r in result["rows"]] == [
        "random resized crop", "colour jitter (all images)", "grayscale",
        "Gaussian blur (all images)", "horizontal flip"]
    assert all(r["wcl_tf_images_per_s"] > 0 and r["keras_cv_images_per_s"] > 0
               for r in result["rows"])


def test_gpu_check_runs_and_reports_step_host_and_ratio(tmp_path):
    """The prepared accelerator check (docs/performance.md) runs end to end; on this CPU
    it says no GPU is visible, and its ratio is host images/s over step images/s."""
    result, stdout = _run(tmp_path, "gpu", "--config=demo", "--backbone=small_cnn", "--width=4",
                          "--global_batch_size=8", "--image_size=16", "--head_hidden_dim=16",
                          "--head_output_dim=8", "--max_train_examples=64")
    row = result["rows"][0]
    assert "no GPU or TPU visible" in stdout and row["accelerator"] is False
    assert row["batch"] == 8 and row["step_images_per_s"] > 0
    assert row["host_device_recipe_images_per_s"] > 0 and row["host_only_recipe_images_per_s"] > 0
    assert abs(row["ratio_device_recipe"] - row["host_device_recipe_images_per_s"]
               / row["step_images_per_s"]) < 0.01 * row["ratio_device_recipe"] + 0.01


@pytest.mark.slow
def test_photometric_benchmark_times_both_forms(tmp_path):
    result, _ = _run(tmp_path, "photometric", "--image_size=16", "--batch_size=4",
                     "--threads=1", "--blur")
    forms = [r["form"] for r in result["rows"]]
    assert forms == ["host (drawn images only)", "static shapes"]
    assert all(r["ms_per_view"] > 0 and r["blur"] for r in result["rows"])


@pytest.mark.slow
def test_pipeline_per_core_rate_with_threads_and_the_host_only_label(tmp_path):
    """--threads=1: tf.data's pool and TensorFlow's threads are one, the per-core rate is
    the rate itself (not divided by every core of the machine); with --augment_on=host the
    table says the host does all of the augmentation (it read "host (host side)")."""
    result, stdout = _run(tmp_path, "pipeline", "--config=demo", "--batch_size=8",
                          "--image_size=16", "--max_train_examples=64", "--augment_on=host",
                          "--threads=1")
    (row,) = result["rows"]
    assert row["threads"] == 1 and row["cores"] == 1 and row["augment_on"] == "host"
    assert row["images_per_s_per_core"] == row["images_per_s"] > 0
    assert "| host: all of it |" in stdout and "host (host side)" not in stdout
    assert "| 1 / 1 |" in stdout and row["images_per_cpu_s"] > 0
    # The page faults column, and the report's first line says how host tensors are held.
    assert row["page_faults_per_image"] >= 0 and "host tensors: BFC pool" in stdout
