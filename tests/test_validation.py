"""Start-up validation: every bad setting fails before the first step, one message each,
naming the setting and the fix (the CLI prints it as `wcl_tf.train: error: ...`)."""

import collections
import os

import pytest

from wcl_tf import run_folder, training
from wcl_tf.config import Config, ConfigError
from wcl_tf.data.sources import DataError

# (changed settings, words the message must contain).
_BAD_SETTINGS = [
    ({"backbone": "resnet101"}, "unknown backbone 'resnet101': use one of"),
    ({"strategy": "horovod"}, "unknown strategy 'horovod'"),
    ({"precision": "float8"}, "precision must be one of"),
    ({"gather_grad": "half"}, "gather_grad must be 'full' or 'local'"),
    ({"lr_scaling": "cubic"}, "lr_scaling must be 'sqrt' or 'linear'"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"graph_loss_weight": -1.0}, "graph_loss_weight (lambda) must be >= 0"),
    ({"global_batch_size": 2}, "global_batch_size must be >= 4"),
    ({"image_size": 4}, "image_size must be >= 8"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"warmup_epochs": 20.0, "epochs": 10}, "warmup_epochs must be between 0 and epochs"),
    ({"weak_aug_epochs": -1}, "weak_aug_epochs must be >= 0"),
    ({"head_hidden_dim": 0}, "head_hidden_dim and head_output_dim must be >= 1"),
    ({"base_lr": -0.1}, "base_lr must be > 0"),
    ({"weight_decay": -1e-6}, "weight_decay must be >= 0"),
    ({"momentum": 1.0}, "momentum must be in [0, 1)"),
    ({"knn_k": 0}, "knn_k must be >= 1"),
    ({"knn_temperature": 0.0}, "knn_temperature must be > 0"),
    ({"eval_every_epochs": -1}, "eval_every_epochs must be >= 0"),
    ({"num_local_crops": -1}, "num_local_crops must be >= 0"),
    ({"num_local_crops": 2, "knn_crops": 3}, "knn_crops (K=3) must be between 0 and "
                                             "num_local_crops (M=2)"),
    ({"local_crop_size": 64, "image_size": 32}, "local_crop_size must be between 4 and "
                                                "image_size (32)"),
    ({"local_crop_scale": (0.5, 0.1)}, "local_crop_scale must be two numbers 0 < low <= "
                                       "high <= 1"),
    ({"global_crop_scale": (0.0, 1.0)}, "global_crop_scale must be two numbers"),
    ({"local_loss_weight": -1.0}, "local_loss_weight (mu) must be >= 0"),
    ({"steps_per_epoch": -1}, "steps_per_epoch must be >= 0"),
    ({"keep_checkpoints": -1}, "keep_checkpoints must be >= 0"),
    ({"on_bad_image": "ignore"}, "on_bad_image must be 'skip' or 'fail'"),
    ({"augment_on": "gpu"}, "augment_on must be one of"),
    ({"skip_nonfinite_steps": -1}, "skip_nonfinite_steps must be >= 0"),
    ({"steps_per_execution": 0}, "steps_per_execution must be >= 1"),
    ({"max_train_examples": -5}, "max_train_examples must be >= 0"),
    ({"max_eval_examples": -5}, "max_eval_examples must be >= 0"),
    ({"trust_coefficient": 0.0}, "trust_coefficient (LARS eta) must be > 0"),
    ({"width": 0}, "width must be >= 1"),
    ({"dataset": ""}, "dataset is empty"),
]


def _validation_message_prefixes():
    """The literal start of every need(...) message in Config.validate (via ast)."""
    import ast
    import inspect
    import re
    import textwrap

    from wcl_tf import config

    tree = ast.parse(textwrap.dedent(inspect.getsource(config.Config.validate)))
    prefixes = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "need"
                and len(node.args) == 2):
            message = node.args[1]
            parts = message.values if isinstance(message, ast.JoinedStr) else [message]
            # Its first three literal words; "*" first when it starts with a formatted
            # value (such as the setting's name).
            starts_literal = isinstance(parts[0], ast.Constant)
            literal = next(p.value for p in parts if isinstance(p, ast.Constant))
            words = " ".join(literal.split()[:3]).rstrip(",:;.")
            prefixes.append(words if starts_literal else "*" + words)
    return prefixes


def test_every_validation_message_is_tested():
    """Each need(...) in Config.validate has a case above whose expected words start like
    its message (a duplicated case cannot hide a missing one)."""
    prefixes = _validation_message_prefixes()
    assert len(prefixes) >= 30  # the parse found the checks
    def covers(prefix, expected):
        return (prefix[1:] in expected if prefix.startswith("*")
                else expected.startswith(prefix))

    untested = [p for p in prefixes
                if not any(covers(p, expected) for _, expected in _BAD_SETTINGS)]
    assert not untested, untested


@pytest.mark.parametrize("changes, expected", _BAD_SETTINGS,
                         ids=[",".join(c) for c, _ in _BAD_SETTINGS])
def test_bad_setting_has_its_own_message(changes, expected):
    with pytest.raises(ConfigError) as err:
        Config(**changes).validate()
    assert expected in str(err.value)


def test_default_config_is_valid():
    Config().validate()


def _small(tmp_path, **changes):
    values = dict(dataset="embedded_mnist", backbone="small_cnn", width=8, image_size=16,
                  head_hidden_dim=16, head_output_dim=8, global_batch_size=16, epochs=1,
                  steps_per_epoch=1, warmup_epochs=0, max_train_examples=64,
                  max_eval_examples=32, knn_k=5, local_crop_size=8,
                  model_dir=str(tmp_path / "run"), verbose=0)
    values.update(changes)
    return Config(**values)


def test_global_batch_not_divisible_by_replicas(tmp_path):
    cfg = _small(tmp_path, strategy="mirrored", global_batch_size=15)  # 2 CPU replicas
    with pytest.raises(ConfigError, match="not divisible by the 2 replicas.*use a multiple "
                                          "of 2"):
        training.run(cfg, log=lambda _: None)


def test_model_dir_not_writable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = _small(tmp_path, model_dir=str(blocker / "run"))
    with pytest.raises(ConfigError, match="is not writable.*choose another --model_dir"):
        training.run(cfg, log=lambda _: None)


def test_not_enough_disk_for_checkpoints(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda _: usage(10**9, 10**9, 1000))
    cfg = _small(tmp_path)
    with pytest.raises(ConfigError, match="not enough free disk.*MiB per checkpoint.*"
                                          "--keep_checkpoints"):
        training.run(cfg, log=lambda _: None)
    assert not os.path.exists(run_folder.checkpoint_path(cfg.model_dir, 1))


@pytest.mark.parametrize("dataset, expected", [
    ("no_such_dataset_xyz", "unknown dataset 'no_such_dataset_xyz'"),
    ("mnist", "is not prepared in"),
    ("folder:/no/such/folder", "does not exist"),
])
def test_missing_dataset(tmp_path, dataset, expected):
    cfg = _small(tmp_path, dataset=dataset, data_dir=str(tmp_path / "tfds"))
    with pytest.raises(DataError, match=expected):
        training.run(cfg, log=lambda _: None)


def test_too_few_examples_for_one_batch(tmp_path):
    cfg = _small(tmp_path, max_train_examples=8, steps_per_epoch=0)
    with pytest.raises(DataError, match="fewer than one global batch of 16"):
        training.run(cfg, log=lambda _: None)
