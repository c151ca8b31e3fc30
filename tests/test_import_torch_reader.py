"""The torch.save reader without PyTorch, on small files that PyTorch wrote
(tests/torch_files/make_torch_files.py), and the import tool's refusals of bad input."""

import os
import pickle
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from wcl_tf import torch_checkpoint, torch_import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = os.path.join(ROOT, "tests", "torch_files")
MARKER = "wcl_torch_marker.txt"


def _file(name):
    return os.path.join(FILES, name)


def test_reads_every_dtype_stride_offset_and_container():
    with torch_checkpoint.Checkpoint(_file("tensors.pt")) as ckpt:
        obj = torch_checkpoint.to_numpy(ckpt.obj)
    weights = obj["model"]
    base = np.arange(12, dtype=np.float32).reshape(3, 4) / 4
    np.testing.assert_array_equal(weights["module.net.shared"], base)
    np.testing.assert_array_equal(weights["module.net.transposed"], base.T)
    np.testing.assert_array_equal(weights["module.net.slice"],
                                  np.arange(7, 13, dtype=np.float32) - 5)
    np.testing.assert_array_equal(weights["module.net.column"], base[:, 1])
    assert weights["module.net.half"].dtype == np.float16
    np.testing.assert_array_equal(weights["module.net.half"], np.arange(6) / 8)
    assert weights["module.net.bfloat"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(weights["module.net.bfloat"].astype(np.float32),
                                  np.arange(6) - 2.5)
    assert weights["module.net.double"].dtype == np.float64
    np.testing.assert_array_equal(weights["module.net.double"], np.arange(3) / 3)
    assert weights["module.net.count"].shape == () and int(weights["module.net.count"]) == 1234
    np.testing.assert_array_equal(weights["module.net.mask"], [True, False, True])
    assert list(weights) == [f"module.net.{k}" for k in (
        "shared", "transposed", "slice", "column", "half", "bfloat", "double", "count",
        "mask")]
    assert obj["epoch"] == 7
    np.testing.assert_array_equal(obj["nested"]["list"][0], base[0])
    assert obj["nested"]["list"][1] == (1, 2.5, "x", None, True)
    assert obj["nested"]["empty"] == {}
    np.testing.assert_array_equal(obj["optimizer"]["state"][0]["momentum_buffer"],
                                  np.full((2, 2), 3.0, np.float32))


def test_shared_storage_is_one_storage_and_unused_storages_are_never_read():
    with torch_checkpoint.Checkpoint(_file("tensors.pt")) as ckpt:
        weights = ckpt.obj["model"]
        assert weights["module.net.shared"].storage is weights["module.net.transposed"].storage
        assert weights["module.net.column"].storage is weights["module.net.shared"].storage
        assert ckpt.bytes_read == 0  # opening reads only the pickle
        momentum = ckpt.obj["optimizer"]["state"][0]["momentum_buffer"]
        weights["module.net.half"].numpy()
        assert ckpt.bytes_read == 12  # six float16 values: only that storage
        assert momentum.storage.key not in ckpt._archive.storages_read


def test_foreign_global_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(torch_checkpoint.UnsafeCheckpointError, match=r"io\.open"):
        torch_checkpoint.Checkpoint(_file("foreign_global.pt"))
    assert not os.path.exists(MARKER)
    # The file is live: an ordinary unpickler creates the marker file.
    with zipfile.ZipFile(_file("foreign_global.pt")) as z:
        data = z.read([n for n in z.namelist() if n.endswith("data.pkl")][0])
    pickle.loads(data)
    assert os.path.exists(MARKER)


def test_legacy_format_says_how_to_resave():
    with pytest.raises(torch_checkpoint.CheckpointError, match=r"legacy \(pre-1.6\).*torch.save"):
        torch_checkpoint.Checkpoint(_file("legacy.pt"))


def test_truncated_and_corrupt_files(tmp_path):
    data = open(_file("tensors.pt"), "rb").read()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(torch_checkpoint.CheckpointError, match="truncated or corrupt"):
        torch_checkpoint.Checkpoint(str(cut))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(torch_checkpoint.CheckpointError, match="not a torch.save"):
        torch_checkpoint.Checkpoint(str(junk))


def test_layout_and_prefix_detection():
    with torch_checkpoint.Checkpoint(_file("tensors.pt")) as ckpt:
        state, where, others = torch_import.state_dict_of(ckpt.obj)
        assert where == "['model']" and others == ["epoch", "nested", "optimizer"]
        stripped, had = torch_import.strip_prefix(state)
        assert had and list(stripped)[0] == "net.shared"


# ----- The import tool's refusals (one line, non-zero exit, nothing written). -----

def _run_import(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "wcl_tf.tools.import_torch", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_import_refuses_bad_input(tmp_path):
    from wcl_tf.tools import import_torch, run_dir

    out = str(tmp_path / "run")

    def refused(checkpoint, pattern):
        with pytest.raises(run_dir.UserError, match=pattern):
            import_torch.import_checkpoint(str(checkpoint), out, log=lambda _: None)
        assert not os.path.exists(out)
        assert not [n for n in os.listdir(tmp_path) if "importing" in n]

    refused(tmp_path / "nope.pth", "not found")
    refused(_file("foreign_global.pt"), r"io\.open")
    refused(_file("legacy.pt"), "legacy")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(open(_file("tensors.pt"), "rb").read()[:1000])
    refused(cut, "truncated or corrupt")
    # A model_dir that holds a run.
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "config.json").write_text("{}")
    with pytest.raises(run_dir.UserError, match="not empty"):
        import_torch.import_checkpoint(_file("tensors.pt"), str(busy))
    assert os.listdir(busy) == ["config.json"]


def test_import_cli_names_the_first_mismatches_in_one_line(tmp_path):
    out = str(tmp_path / "run")
    result = _run_import(f"--checkpoint={_file('other_architecture.pt')}", f"--model_dir={out}")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert ("net.conv1.weight has shape (8, 3, 3, 3), the network needs (64, 3, 7, 7)"
            in lines[0]), lines[0]
    assert "unexpected net.fc.weight (10, 8)" in lines[0] and "missing net.bn1.weight" in lines[0]
    assert os.listdir(tmp_path) == []
