"""Imports the authors' trained PyTorch WCL (wcl-100.pth, wcl-200.pth) as a wcl_tf run.

    python -m wcl_tf.tools.import_torch --checkpoint=wcl-200.pth --model_dir=runs/wcl200
    # or: python tools/import_torch.py ...  /  wcl-import-torch ...

Reads the file without PyTorch and without executing it (wcl_tf/torch_checkpoint.py: a
pickle reader that builds only tensors and plain containers and refuses any other global)
and writes an ordinary run folder:

    config.json        backbone resnet50, head sizes read from the weight shapes (4096/256
                       for the authors' released code, 2048/128 for the paper's), the
                       authors' ImageNet settings (224 px, imagenet2012)
    final.keras        the WCLModel: backbone <- net, instance_head <- head1,
                       graph_head <- head2
    classifier.keras   (a linear-evaluation checkpoint only) backbone + its Dense classifier
    import_record.json the source file's name, size and SHA-256, the key mapping, what was
                       skipped (num_batches_tracked, the optimizer, ...)

Accepted: their pretraining checkpoint ({"model": DistributedDataParallel state dict,
"optimizer": ..., "epoch": N}; only the model's tensors are read), the same without the
"module." prefix, a bare state dict, and their linear-evaluation checkpoint (net.* + fc.*).
Every tool that takes --model_dir then works on the folder (knn_eval, linear_eval,
finetune, export), and `python -m wcl_tf.train --init_from=DIR ...` continues the
pretraining from it with a fresh optimizer and schedule.

Nothing is written to --model_dir unless the whole import succeeds (it is assembled in a
hidden folder next to it and renamed); a --model_dir that already holds a run is refused.
"""

import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import flags  # noqa: E402

from wcl_tf import run_folder, torch_checkpoint, torch_import  # noqa: E402
from wcl_tf.tools import _cli, run_dir  # noqa: E402

FLAGS = flags.FLAGS
RECORD_FILE = "import_record.json"
CLASSIFIER_FILE = "classifier.keras"


def _define_flags():
    """The tool's flags, defined when it runs, not when it is imported: the library
    functions below are imported by tests and other tools, whose processes may define
    flags of the same names (export's --checkpoint)."""
    flags.DEFINE_string("checkpoint", None, "The PyTorch file: the authors' wcl-100.pth / "
                        "wcl-200.pth, a state dict, or their linear-evaluation checkpoint.")
    flags.DEFINE_string("model_dir", None, "The run folder to create (must not hold a run).")
    flags.DEFINE_integer("image_size", 224, "image_size recorded in config.json (the "
                         "tools' default input size).", lower_bound=8)


def check_paths(checkpoint, model_dir):
    """Raises run_dir.UserError for a missing checkpoint or a model_dir holding files."""
    if not checkpoint:
        raise run_dir.UserError("pass --checkpoint=PATH, the PyTorch file (e.g. wcl-200.pth).")
    if not model_dir:
        raise run_dir.UserError("pass --model_dir=DIR, the run folder to create.")
    if run_folder.is_remote(checkpoint) or run_folder.is_remote(model_dir):
        raise run_dir.UserError("import to and from local paths; copy the result to a "
                                "bucket afterwards.")
    if not os.path.isfile(checkpoint):
        raise run_dir.UserError(f"checkpoint {checkpoint!r} not found (no such file).")
    if os.path.exists(model_dir):
        if not os.path.isdir(model_dir):
            raise run_dir.UserError(f"model_dir {model_dir!r} exists and is not a folder.")
        if os.listdir(model_dir):
            raise run_dir.UserError(f"model_dir {model_dir!r} is not empty (it may hold a "
                                    "run): choose a new --model_dir.")
    return checkpoint, model_dir


def _config(info, model_dir, image_size):
    from wcl_tf.config import Config  # pylint: disable=import-outside-toplevel

    hidden, output = info["heads"]
    epoch = info.get("epoch")
    epochs = epoch if isinstance(epoch, int) and epoch > 0 else 100  # their 100 or 200
    # The authors' ImageNet recipe (wcl_tf/configs/r50.flags) with the file's epoch count.
    return Config(
        dataset="imagenet2012", train_split="train", eval_split="validation",
        image_size=image_size, backbone="resnet50", head_hidden_dim=hidden,
        head_output_dim=output, global_batch_size=4096, epochs=epochs,
        warmup_epochs=min(10, epochs), weak_aug_epochs=min(10, epochs), blur=True,
        max_eval_examples=10000, model_dir=model_dir).validate()


def import_checkpoint(checkpoint, model_dir, image_size=224, log=run_dir.log):
    """Writes the run folder; returns the import record. Raises run_dir.UserError."""
    check_paths(checkpoint, model_dir)
    start = time.time()
    try:
        ckpt = torch_checkpoint.Checkpoint(checkpoint)
    except torch_checkpoint.CheckpointError as err:
        raise run_dir.UserError(run_dir.one_line(err)) from None
    with ckpt:
        try:
            info = torch_import.describe(os.path.basename(checkpoint), ckpt.obj)
        except torch_import.ImportError_ as err:
            raise run_dir.UserError(f"{checkpoint}: {run_dir.one_line(err)}") from None
        log(f"{checkpoint}: {info['layout']} checkpoint, {info['params']:,} values in the "
            f"state dict at {info['state_dict_at']} ({', '.join(info['float_dtypes'])}); "
            f"reading only those of {len(ckpt.storages)} storages "
            f"({torch_import.round_up_mib(ckpt.storage_bytes)} MiB in the file)")
        import keras  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

        model, classifier, heads = torch_import.build_models(info)
        info["heads"] = heads
        state = info["state"]
        expected = torch_import.targets(
            model, classifier, with_heads=info["layout"] == torch_import.PRETRAINING)
        skipped = torch_import.skipped_keys(state)
        try:
            torch_import.check_keys(state, expected, skipped)
            torch_import.assign(expected, state)
        except (torch_import.ImportError_, torch_checkpoint.CheckpointError) as err:
            raise run_dir.UserError(f"{checkpoint}: {run_dir.one_line(err)}") from None
        bytes_read, storage_bytes = ckpt.bytes_read, ckpt.storage_bytes
    digest = torch_import.sha256(checkpoint)
    cfg = _config(info, model_dir, image_size)
    record = {
        "source": os.path.basename(checkpoint),
        "source_bytes": os.path.getsize(checkpoint),
        "sha256": digest,
        "layout": info["layout"],
        "state_dict_at": info["state_dict_at"],
        "module_prefix_removed": info["module_prefix"],
        "epoch": info["epoch"],
        "head_hidden_dim": heads[0] if info["layout"] == torch_import.PRETRAINING else None,
        "head_output_dim": heads[1] if info["layout"] == torch_import.PRETRAINING else None,
        "heads": ("imported: instance_head <- head1, graph_head <- head2"
                  if info["layout"] == torch_import.PRETRAINING else
                  f"not in the checkpoint: initialised at random ({heads[0]}/{heads[1]})"),
        "stored_dtypes": info["float_dtypes"],
        "storage_bytes_in_file": storage_bytes,
        "storage_bytes_read": bytes_read,
        "mapping": torch_import.mapping_record(expected),
        "skipped": {
            "state_dict_entries": skipped,
            "top_level_entries": info["other_entries"],
        },
        "importer": "wcl_tf.tools.import_torch",
    }
    _write_folder(model_dir, cfg, model, classifier, record)
    log(f"imported {len(expected)} tensors ({info['layout']}; heads {record['heads']}) in "
        f"{time.time() - start:.1f} s -> {model_dir}")
    return record


def _write_folder(model_dir, cfg, model, classifier, record):
    """Writes the folder's files into a hidden sibling folder, then renames it."""
    target = os.path.abspath(model_dir)
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.importing-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private (0700)
    except OSError as err:
        raise run_dir.UserError(f"cannot create {model_dir!r}: {run_folder.error_text(err)}") \
            from None
    try:
        run_folder.write_json(os.path.join(tmp, run_folder.CONFIG_FILE), cfg.to_dict(),
                              sort_keys=True)
        run_folder.save_model(model, os.path.join(tmp, run_folder.FINAL_CHECKPOINT))
        if classifier is not None:
            run_folder.save_model(classifier, os.path.join(tmp, CLASSIFIER_FILE))
        run_folder.write_json(os.path.join(tmp, RECORD_FILE), record)
        if os.path.isdir(target):
            os.rmdir(target)  # Empty (checked before): the rename needs it gone.
        os.rename(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise run_dir.UserError(f"cannot write {model_dir!r}: "
                                    f"{run_folder.error_text(err)}") from None
        raise


def _main():
    import_checkpoint(FLAGS.checkpoint, FLAGS.model_dir, FLAGS.image_size)
    return 0


def main():
    """Entry point of the module, of tools/import_torch.py and of the console script."""
    _define_flags()
    _cli.run(run_dir.main_wrapper(_main), __name__)


if __name__ == "__main__":
    sys.exit(main())
