"""Starting a new pretraining run from another run's weights (`--init_from=DIR`).

DIR is a run folder (its final.keras; e.g. one written by wcl_tf.tools.import_torch from
the authors' released checkpoints) or a .keras file. The backbone and both heads take its
weights, BatchNorm statistics included; the optimizer (momentum, step count) and the
learning-rate schedule start afresh, as the run's own settings say. A run that resumes
from its own checkpoint ignores init_from (the checkpoint is newer).
"""

from wcl_tf import run_folder
from wcl_tf.config import ConfigError

PARTS = ("backbone", "instance_head", "graph_head")


def source_path(init_from):
    """The .keras file named by --init_from (a run folder's final.keras, or the file)."""
    if str(init_from).endswith(".keras"):
        return init_from
    return run_folder.join(init_from, run_folder.FINAL_CHECKPOINT)


def initialise(model, init_from, strategy):
    """Copies the weights of the backbone and heads of `init_from` into `model` (a fresh
    WCLModel of the same architecture). Returns a line for the log; raises ConfigError
    when the file is missing or its architecture differs."""
    from wcl_tf import export  # pylint: disable=import-outside-toplevel

    path = source_path(init_from)
    if not run_folder.isfile(path):
        raise ConfigError(f"--init_from={init_from!r}: {path!r} not found; pass a run folder "
                          "holding final.keras (or a .keras file).")
    try:
        source = export.load_checkpoint(path)
    except Exception as err:  # noqa: BLE001  A foreign or damaged file, in one line.
        raise ConfigError(f"--init_from: cannot load {path!r} as a WCL model: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else err!r}"
                          ) from None
    for part in PARTS:
        src, dst = getattr(source, part, None), getattr(model, part)
        theirs = [tuple(w.shape) for w in src.weights] if src is not None else None
        ours = [tuple(w.shape) for w in dst.weights]
        if theirs != ours:
            raise ConfigError(
                f"--init_from={init_from!r}: its {part} does not have this run's "
                f"architecture ({len(theirs or [])} weights vs {len(ours)}"
                f"{'' if not theirs else ', first shapes ' + str(theirs[:1]) + ' vs ' + str(ours[:1])}"
                "): use the same --backbone, --head_hidden_dim and --head_output_dim as "
                "its config.json.")
    with strategy.scope():
        for part in PARTS:
            getattr(model, part).set_weights(getattr(source, part).get_weights())
    return (f"initialised the backbone and both heads from {path} (fresh optimizer and "
            "learning-rate schedule)")
