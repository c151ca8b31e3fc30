"""A training run's folder (model_dir): its file names, and every read and write of it.

Training (`wcl_tf.training`), the export (`wcl_tf.export`) and the tools
(`wcl_tf.tools.*`) all go through this module, so a model_dir may be a local folder or
any URL that TensorFlow's file systems know (`gs://bucket/run` on a TPU VM, `ram://` in
the tests): operations on a URL go through `tf.io.gfile`, and a path is kept as given
(never made absolute). Local paths use os and open (same behaviour, and no TensorFlow:
the tools check their flags and the run folder before TensorFlow starts and logs).

What a model_dir holds (written by training; see wcl_tf/checkpointing.py for how a run resumes):

    config.json                   the settings (CONFIG_FILE)
    flags.txt                     the command line's flags, written by wcl_tf/train.py
    checkpoints/epoch_NNN.keras   model + optimizer after epoch NNN (checkpoint_path)
    checkpoints/step_NNNNNNN.keras  model + optimizer after optimizer step N, saved mid-epoch
                                  when the run is preempted (SIGTERM); superseded (deleted)
                                  by the next epoch checkpoint (mid_epoch_checkpoint_path)
    train_state.json              per-epoch logs, random-encoder kNN, training seconds
    history.csv                   the per-epoch logs, one row per epoch
    final.keras, results.json     the trained model and the summary, written last
    logs/                         TensorBoard event files
    export/                       the serving SavedModel (wcl_tf.tools.export's default)

Safe writes. JSON, CSV and text files are written to `<name>.tmp` and renamed. A `.keras`
file is written to `.<name>.partial.keras` in the same folder and renamed once complete;
on a remote file system Keras writes to a local temporary file that is copied to that
hidden name first. Renaming is atomic on local disks but not on every object store (on
gs:// it is a copy then a delete), so readers do not rely on it: `latest_checkpoint` only
takes a checkpoint whose zip central directory (written last) reads (`is_complete`), and
`prune_checkpoints` runs only after the new checkpoint is complete, so the previous one
is never deleted before its successor exists. A mid-epoch checkpoint has a name of its
own (never the name of an epoch checkpoint), so writing one never touches the epoch
checkpoints, and it is deleted only once a later checkpoint reads whole.

In a multi-worker run only the chief writes here; the other workers only read (the same
model_dir view is assumed: a shared file system or bucket).
"""

import contextlib
import csv
import io
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile

CONFIG_FILE = "config.json"
FLAGS_FILE = "flags.txt"
STATE_FILE = "train_state.json"
RESULTS_FILE = "results.json"
HISTORY_FILE = "history.csv"
FINAL_CHECKPOINT = "final.keras"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
EXPORT_DIR = "export"
CHECKPOINT_NAME = re.compile(r"^epoch_(\d+)\.keras$")
MID_EPOCH_NAME = re.compile(r"^step_(\d+)\.keras$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _tf():
    """TensorFlow, imported on first use of a URL."""
    import tensorflow  # pylint: disable=import-outside-toplevel

    return tensorflow


def file_errors():
    """What a failed file operation raises: OSError, or tf.errors.OpError through gfile
    (only possible once TensorFlow is loaded, so checking does not import it)."""
    tf = sys.modules.get("tensorflow")
    errors = getattr(tf, "errors", None)
    return (OSError,) if errors is None else (OSError, errors.OpError)


def is_remote(path):
    """Whether `path` is a URL (gs://, s3://, ram://, ...) rather than a local path."""
    return bool(_URL.match(str(path)))


def join(path, *parts):
    """os.path.join, which keeps a URL's scheme (`gs://b/run` + `x` -> `gs://b/run/x`)."""
    return os.path.join(str(path), *parts)


def parent(path):
    """The folder holding `path`: absolute for a local path, the URL's prefix for a URL."""
    path = str(path)
    if is_remote(path):
        return path.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path))


def _open(path, mode):
    if is_remote(path):
        return _tf().io.gfile.GFile(path, mode)
    return open(path, mode)  # pylint: disable=unspecified-encoding


def exists(path):
    return _tf().io.gfile.exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path):
    """Whether `path` is a folder. On ram:// any prefix of a stored name counts as one."""
    return _tf().io.gfile.isdir(path) if is_remote(path) else os.path.isdir(path)


def isfile(path):
    return exists(path) and not isdir(path)


def makedirs(path):
    """Creates the folder `path` and its parents (no error when it exists)."""
    if is_remote(path):
        _tf().io.gfile.makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path):
    """Names in the folder `path` ([] when it does not exist)."""
    if not isdir(path):
        return []
    if not is_remote(path):
        return os.listdir(path)
    return [name.rstrip("/") for name in _tf().io.gfile.listdir(path)]


def remove(path):
    if is_remote(path):
        _tf().io.gfile.remove(path)
    else:
        os.remove(path)


def error_text(err):
    """A short reason for a failed file operation (OSError or tf.errors.OpError)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = getattr(err, "message", None) or str(err) or type(err).__name__
    return text.strip().splitlines()[0]


def ensure_writable(model_dir):
    """Creates `model_dir` and writes and deletes a probe file in it.

    Raises one of file_errors() (local folder not creatable, bucket not writable, ...).
    """
    makedirs(model_dir)
    probe = join(model_dir, ".write_test")
    with _open(probe, "w") as f:
        f.write("ok")
    remove(probe)


# ----- Text, JSON and CSV files, written atomically. -----

def _replace(tmp, path):
    """Renames tmp to path, replacing it (atomic locally; copy + delete on gs://)."""
    if is_remote(path):
        _tf().io.gfile.rename(tmp, path, overwrite=True)
    else:
        os.replace(tmp, path)


def write_text(path, text):
    """Writes `text` to `path` via `<path>.tmp` and a rename."""
    tmp = f"{path}.tmp"
    with _open(tmp, "w") as f:
        f.write(text)
    _replace(tmp, path)


def read_text(path):
    with _open(path, "r") as f:
        return f.read()


def write_json(path, obj, **kwargs):
    """Writes JSON atomically: a reader (or a resumed run) never sees half a file."""
    write_text(path, json.dumps(obj, indent=2, **kwargs))


def read_json(path):
    """The JSON in `path`, or None when it is missing or not valid JSON."""
    try:
        return json.loads(read_text(path))
    except (*file_errors(), ValueError):
        return None


def read_config(model_dir):
    """config.json of the run in `model_dir` as a dict, or None when there is none.

    Raises ValueError when the file exists but is not a JSON object.
    """
    path = join(model_dir, CONFIG_FILE)
    if not exists(path):
        return None
    config = json.loads(read_text(path))
    if not isinstance(config, dict):
        raise ValueError(f"{path!r} is not a JSON object of settings.")
    return config


def write_history_csv(model_dir, rows):
    """history.csv: one row per epoch; columns: epoch, then every key any epoch logged."""
    keys = sorted({k for row in rows for k in row} - {"epoch"})
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, ["epoch", *keys], restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text(join(model_dir, HISTORY_FILE), out.getvalue())


def _read_csv_rows(path, epochs_done):
    """{epoch: row} of a history.csv written by Keras' CSVLogger (0-based epochs)."""
    try:
        text = read_text(path)
    except file_errors():
        return {}
    rows = {}
    for row in csv.DictReader(io.StringIO(text, newline="")):
        try:
            epoch = int(row.pop("epoch")) + 1
            values = {k: float(v) for k, v in row.items() if v not in ("", "NA", None)}
        except (KeyError, TypeError, ValueError):
            continue
        if epoch <= epochs_done:
            rows[epoch] = {"epoch": epoch, **values}  # The last copy of a row wins.
    return rows


def read_history(model_dir, epochs_done):
    """(rows, state): logs of epochs 1..epochs_done saved by a previous process, one dict
    each, and the rest of train_state.json ({} when there is none)."""
    state = read_json(join(model_dir, STATE_FILE)) or {}
    rows = {r["epoch"]: r for r in state.get("history", []) if r["epoch"] <= epochs_done}
    if len(rows) < epochs_done:
        # A model_dir written by Keras' CSVLogger (0-based epochs, appended rows).
        rows = {**_read_csv_rows(join(model_dir, HISTORY_FILE), epochs_done), **rows}
    return [rows[e] for e in sorted(rows)], state


def finished_results(model_dir, epochs):
    """results.json of a finished run (all `epochs` checkpointed), or None."""
    results = read_json(join(model_dir, RESULTS_FILE))
    if results is None:
        return None
    epochs_done, _ = latest_checkpoint(model_dir)
    return results if epochs_done >= epochs else None


# ----- .keras checkpoints. -----

def checkpoint_path(model_dir, epoch):
    """<model_dir>/checkpoints/epoch_NNN.keras: the state after `epoch` (1-based) epochs."""
    return join(model_dir, CHECKPOINT_DIR, f"epoch_{epoch:03d}.keras")


def is_zip(path):
    """Whether `path` is a readable zip archive (what a .keras file is)."""
    try:
        with _open(path, "rb") as f:
            return zipfile.is_zipfile(f)
    except file_errors():
        return False


def is_complete(path):
    """A .keras zip whose central directory (written last) can be read."""
    try:
        # A file object: gfile's GFile for a URL (zipfile seeks and reads through it).
        with _open(path, "rb") as f, zipfile.ZipFile(f) as archive:
            return "model.weights.h5" in archive.namelist()
    except (*file_errors(), zipfile.BadZipFile):
        return False


def checkpoint_epochs(model_dir):
    """Epochs of the `epoch_NNN.keras` names in model_dir/checkpoints, ascending."""
    names = listdir(join(model_dir, CHECKPOINT_DIR))
    return sorted(int(m.group(1)) for m in map(CHECKPOINT_NAME.match, names) if m)


def latest_checkpoint(model_dir):
    """(epochs done, path) of the newest complete epoch checkpoint; (0, None) if none."""
    for epoch in reversed(checkpoint_epochs(model_dir)):
        path = checkpoint_path(model_dir, epoch)
        if is_complete(path):  # Cut short by a kill, or a remote rename in progress.
            return epoch, path
    return 0, None


def prune_checkpoints(model_dir, keep):
    """Deletes all but the newest `keep` epoch checkpoints (call after a complete save)."""
    for epoch in checkpoint_epochs(model_dir)[:-keep]:
        remove(checkpoint_path(model_dir, epoch))


def mid_epoch_checkpoint_path(model_dir, step):
    """<model_dir>/checkpoints/step_NNNNNNN.keras: the state after optimizer step `step`,
    saved in the middle of an epoch (preemption)."""
    return join(model_dir, CHECKPOINT_DIR, f"step_{step:07d}.keras")


def mid_epoch_steps(model_dir):
    """Optimizer steps of the `step_NNNNNNN.keras` names in model_dir/checkpoints, ascending."""
    names = listdir(join(model_dir, CHECKPOINT_DIR))
    return sorted(int(m.group(1)) for m in map(MID_EPOCH_NAME.match, names) if m)


def latest_mid_epoch_checkpoint(model_dir):
    """(optimizer step, path) of the newest complete mid-epoch checkpoint; (0, None) if none.

    Whether it is newer than the newest epoch checkpoint is the caller's question (it
    knows the steps per epoch)."""
    for step in reversed(mid_epoch_steps(model_dir)):
        path = mid_epoch_checkpoint_path(model_dir, step)
        if is_complete(path):
            return step, path
    return 0, None


def remove_mid_epoch_checkpoints(model_dir, before_step):
    """Deletes the mid-epoch checkpoints of steps < `before_step` (call once a checkpoint
    at `before_step` or later reads whole: they are superseded)."""
    for step in mid_epoch_steps(model_dir):
        if step < before_step:
            remove(mid_epoch_checkpoint_path(model_dir, step))


def partial_path(path):
    """The hidden name a .keras file is written under before it is renamed to `path`."""
    folder, name = os.path.split(str(path))
    return join(folder, f".{name[:-len('.keras')]}.partial.keras")


def save_model(model, path):
    """model.save(path), so that a file named `path` is always complete.

    Locally, Keras writes the hidden partial_path(path) next to it, which is renamed. On
    a URL, Keras writes a local temporary file, which is copied to partial_path(path) and
    renamed (copy + delete on gs://: readers check is_complete).
    """
    tmp = partial_path(path)
    if not is_remote(path):
        model.save(tmp)
        os.replace(tmp, path)
        return
    with tempfile.TemporaryDirectory() as local_dir:
        local = os.path.join(local_dir, os.path.basename(str(path)))
        model.save(local)
        _tf().io.gfile.copy(local, tmp, overwrite=True)
    _replace(tmp, path)


@contextlib.contextmanager
def local_copy(path):
    """A local path with the contents of `path`: `path` itself when it is local, else a
    temporary copy (deleted on exit), for readers that need a local file (Keras, h5py)."""
    if not is_remote(path):
        yield str(path)
        return
    with tempfile.TemporaryDirectory() as local_dir:
        local = os.path.join(local_dir, os.path.basename(str(path).rstrip("/")))
        _tf().io.gfile.copy(path, local, overwrite=True)
        yield local


def load_model(path, **kwargs):
    """keras.saving.load_model of a local or remote .keras file."""
    import keras  # pylint: disable=import-outside-toplevel

    with local_copy(path) as local:
        return keras.saving.load_model(local, **kwargs)


def load_weights(model, path):
    """model.load_weights of a local or remote .keras file."""
    with local_copy(path) as local:
        model.load_weights(local)


# ----- Space. -----

def free_bytes(path):
    """Free bytes on the disk holding the local folder `path`; None for a URL (object
    stores have no free-space figure, and the check is skipped)."""
    if is_remote(path):
        return None
    return shutil.disk_usage(path).free


def directory_bytes(path):
    """Total size of the files under the folder `path` (local or URL)."""
    if not is_remote(path):
        return sum(os.path.getsize(os.path.join(root, f))
                   for root, _, files in os.walk(path) for f in files)
    gfile = _tf().io.gfile
    return sum(gfile.stat(join(root, f)).length
               for root, _, files in gfile.walk(path) for f in files)
