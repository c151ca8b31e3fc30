"""wcl_tf works outside the repository folder: shipped configs by name, nested flagfiles
relative to the flagfile naming them, the tools as package modules, and a non-editable
install run from another directory."""

import os
import shutil
import subprocess
import sys

import pytest

from wcl_tf import flagfiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ["knn_eval", "linear_eval", "finetune", "export", "benchmark", "show_views",
         "raw_pixel_knn", "reproduce_cifar", "embed", "neighbors",
         "benchmark_embed", "import_torch"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", **extra)
    return env


# ----- Flagfiles and --config (no TensorFlow). -----

def test_nested_flagfile_is_relative_to_the_flagfile_naming_it(tmp_path, monkeypatch):
    (tmp_path / "exp" / "base").mkdir(parents=True)
    (tmp_path / "exp" / "base" / "common.flags").write_text("# shared\n--epochs=7\n--seed=1\n")
    (tmp_path / "exp" / "run.flags").write_text(
        "--flagfile=base/common.flags\n\n// comment\n  --seed=2  \n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither file is reachable from the working directory
    args = flagfiles.expand_args(["--width=3", "--flagfile=../exp/run.flags", "--seed=5"])
    assert args == ["--width=3", "--epochs=7", "--seed=1", "--seed=2", "--seed=5"]


def test_flagfile_errors_name_the_file(tmp_path):
    (tmp_path / "a.flags").write_text("--flagfile=missing.flags\n")
    with pytest.raises(flagfiles.FlagfileError, match="missing.flags.*named in.*a.flags"):
        flagfiles.expand_args([f"--flagfile={tmp_path / 'a.flags'}"])
    (tmp_path / "loop.flags").write_text("--flagfile=loop.flags\n")
    with pytest.raises(flagfiles.FlagfileError, match="includes itself"):
        flagfiles.expand_args([f"--flagfile={tmp_path / 'loop.flags'}"])


def test_config_by_name_expands_in_place_and_later_flags_win():
    args = flagfiles.expand_args(["--config", "demo", "--epochs=1"])
    with open(os.path.join(flagfiles.CONFIG_DIR, "demo.flags")) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    assert args == lines + ["--epochs=1"]
    with pytest.raises(flagfiles.FlagfileError, match="unknown --config='nope'.*demo"):
        flagfiles.expand_args(["--config=nope"])


@pytest.mark.parametrize("name", ["demo", "cifar10_r18", "cifar10_r18_multicrop", "r50",
                                  "r50_multicrop"])
def test_shipped_configs_resolve_from_anywhere_and_name_no_workspace_path(
        name, tmp_path, monkeypatch):
    assert name in flagfiles.available_configs()
    monkeypatch.chdir(tmp_path)
    args = flagfiles.expand_args([f"--config={name}"])
    assert args and all(a.startswith("--") for a in args)
    assert not any("flagfile" in a or "config=" in a or "../shared" in a for a in args)
    if name.endswith("_multicrop"):
        assert "--dataset=" + ("cifar10" if "cifar" in name else "imagenet2012") in args


def test_top_level_configs_folder_is_the_packaged_one():
    top = os.path.join(ROOT, "configs")
    assert sorted(os.listdir(top)) == sorted(os.listdir(flagfiles.CONFIG_DIR))
    for name in os.listdir(top):
        with open(os.path.join(top, name)) as a, \
                open(os.path.join(flagfiles.CONFIG_DIR, name)) as b:
            assert a.read() == b.read(), name


def test_train_cli_unknown_config_lists_the_names(tmp_path):
    out = subprocess.run([sys.executable, "-m", "wcl_tf.train", "--config=nope"],
                         cwd=tmp_path, env=_env(PYTHONPATH=ROOT), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown --config='nope'" in out.stderr and "cifar10_r18, " in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_script_launches_the_package_module(tool):
    # Read, not imported: each tool defines its flags on import (one tool per process).
    with open(os.path.join(ROOT, "tools", f"{tool}.py")) as f:
        script = f.read()
    package = os.path.join(ROOT, "wcl_tf", "tools", tool)  # a tool that is a package
    path = os.path.join(package, "__init__.py") if os.path.isdir(package) else package + ".py"
    with open(path) as f:
        module = f.read()
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup_py = f.read()
    assert f"from wcl_tf.tools.{tool} import main" in script and len(script.splitlines()) < 15
    assert "\ndef main():" in module and "sys.path" not in module
    script_name = "wcl-" + tool.replace("_", "-")
    assert f'"{script_name}=wcl_tf.tools.{tool}:main"' in setup_py


def test_show_views_defines_its_flags_when_it_runs_not_on_import():
    # Its --dataset and --out are also wcl_tf.train's and the benchmark's flags: a
    # process that imports more than one tool must not fail with DuplicateFlagError.
    # Only show_views is imported here: wcl_tf.train would define its flags (--model_dir)
    # for the rest of this test process, where test_run_folder imports the export tool.
    from absl import flags

    import wcl_tf.tools.show_views  # noqa: F401

    assert "wcl_tf.tools.show_views" not in flags.FLAGS.flags_by_module_dict()


# ----- A non-editable install, run from outside the checkout. -----

def _install(target, tmp_path):
    """pip install of a copy of the checkout (the build never writes into the checkout)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".benchmarks", ".venv", "exports"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "--quiet", "--target", str(target),
         str(src)], env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


def test_installed_package_trains_a_config_by_name_and_runs_a_tool(tmp_path):
    target, work = tmp_path / "site", tmp_path / "work"
    work.mkdir()
    _install(target, tmp_path)
    env = _env(PYTHONPATH=str(target))

    def python(*args, timeout=600):
        return subprocess.run([sys.executable, *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=timeout)

    where = python("-c", "import wcl_tf, wcl_tf.tools.knn_eval as k; "
                         "from wcl_tf import flagfiles as f; "
                         "print(wcl_tf.__file__); print(k.__file__); "
                         "print(f.expand_args(['--config=r50_multicrop'])[0])")
    assert where.returncode == 0, where.stderr[-3000:]
    init_file, tool_file, first_arg = where.stdout.split()
    for path in (init_file, tool_file):
        assert os.path.realpath(path).startswith(os.path.realpath(target)), path
        assert not os.path.realpath(path).startswith(os.path.realpath(ROOT) + os.sep), path
    assert first_arg == "--dataset=imagenet2012"  # the nested r50.flags, found by the package
    assert (target / "wcl_tf" / "configs" / "demo.flags").is_file()
    assert (target / "bin" / "wcl-knn-eval").is_file()

    run = work / "runs" / "demo"
    train = python("-m", "wcl_tf.train", "--config=demo", "--epochs=1", "--steps_per_epoch=2",
                   "--max_eval_examples=200", "--verbose=0", f"--model_dir={run}")
    assert train.returncode == 0, train.stderr[-3000:]
    assert (run / "results.json").is_file() and (run / "final.keras").is_file()
    assert "--dataset=embedded_mnist" in (run / "flags.txt").read_text()
    assert "kNN top-1" in train.stdout

    knn = python("-m", "wcl_tf.tools.knn_eval", f"--model_dir={run}", "--k=5",
                 "--max_examples=100")
    assert knn.returncode == 0, knn.stderr[-3000:]
    assert (run / "knn_eval.json").is_file() and "kNN top-1" in knn.stdout
