"""WCL against SimCLR, CPU-sized, several seeds, three arms by default.

    python -m wcl_tf.tools.reproduce_cifar --data_dir=PATH/TO/tfds --out_dir=runs/repro
    python -m wcl_tf.tools.reproduce_cifar --preset=demo --out_dir=runs/repro_demo

Arms (--arms): simclr (lambda=0), wcl (lambda=1, the graph loss's gradient through its
anchors only, as in the authors' code), wcl_keygrad (lambda=1, --graph_key_grad: the
graph loss's keys carry gradient too). Every run uses the same code, data, budget and
seed pairing; only the objective differs. --preset=cifar10 is the CIFAR-10 configuration
below; --preset=demo is configs/demo.flags (embedded MNIST, offline) with a kNN / purity
check every 2 epochs. After each CIFAR-10 run the fast linear probe runs on it
(wcl_tf.tools.linear_eval --mode=fast). Writes <out_dir>/summary.json, <out_dir>/table.md and
<out_dir>/knn_per_epoch.png. Finished runs (results.json present) are reused, so the
script can be re-run to resume.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from wcl_tf import run_folder  # noqa: E402  (imports TensorFlow only when used)
from wcl_tf.tools import _cli  # noqa: E402

flags.DEFINE_string("data_dir", None, "TFDS folder holding cifar10 (default: TFDS's own).")
flags.DEFINE_string("out_dir", "runs/repro", "Where runs and the summary go.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each runs WCL and SimCLR.")
flags.DEFINE_enum("preset", "cifar10", ["cifar10", "demo"],
                  "cifar10: the flags below; demo: configs/demo.flags (embedded MNIST).")
flags.DEFINE_list("arms", ["simclr", "wcl", "wcl_keygrad"],
                  "Objectives: simclr (lambda 0), wcl (authors' gradient), wcl_keygrad.")
flags.DEFINE_integer("linear_epochs", 100, "Fast linear probe epochs (cifar10; 0: none).")
flags.DEFINE_string("backbone", "small_cnn", "Backbone.")
flags.DEFINE_integer("width", 32, "small_cnn width.")
flags.DEFINE_integer("epochs", 15, "Epochs per run.")
flags.DEFINE_integer("global_batch_size", 256, "Global batch.")
flags.DEFINE_integer("max_train_examples", 10000, "Training images (first N of train).")
flags.DEFINE_integer("max_eval_examples", 10000, "kNN memory / queries per split.")
flags.DEFINE_integer("eval_every_epochs", 3, "kNN and purity every N epochs.")
flags.DEFINE_integer("weak_aug_epochs", 2, "MoCo v2 augmentation epochs first.")
flags.DEFINE_integer("head_hidden_dim", 512, "Head hidden width.")
flags.DEFINE_integer("head_output_dim", 128, "Head output size.")
FLAGS = flags.FLAGS


ARMS = {  # name: (graph_loss_weight, graph_key_grad, label)
    "simclr": (0.0, False, "SimCLR (lambda=0)"),
    "wcl": (1.0, False, "WCL, authors' gradient (keys constant)"),
    "wcl_keygrad": (1.0, True, "WCL, keys carry gradient (--graph_key_grad)"),
}


def _config(seed, arm):
    from wcl_tf.config import Config

    lam, key_grad, _ = ARMS[arm]
    name = f"{arm}_seed{seed}"
    model_dir = os.path.join(FLAGS.out_dir, name)
    if FLAGS.preset == "demo":
        # The values of configs/demo.flags; kNN and purity every 2 epochs.
        return name, Config(
            dataset="embedded_mnist", image_size=28, backbone="small_cnn", width=32,
            head_hidden_dim=256, head_output_dim=64, global_batch_size=128, epochs=10,
            warmup_epochs=1, lr_scaling="sqrt", weak_aug_epochs=10, knn_k=20,
            eval_every_epochs=2, graph_loss_weight=lam, graph_key_grad=key_grad, seed=seed,
            verbose=2, model_dir=model_dir)
    return name, Config(
        dataset="cifar10", data_dir=FLAGS.data_dir, image_size=32,
        backbone=FLAGS.backbone, width=FLAGS.width,
        head_hidden_dim=FLAGS.head_hidden_dim, head_output_dim=FLAGS.head_output_dim,
        global_batch_size=FLAGS.global_batch_size, epochs=FLAGS.epochs, warmup_epochs=1,
        weak_aug_epochs=FLAGS.weak_aug_epochs, max_train_examples=FLAGS.max_train_examples,
        max_eval_examples=FLAGS.max_eval_examples, eval_every_epochs=FLAGS.eval_every_epochs,
        graph_loss_weight=lam, graph_key_grad=key_grad, seed=seed, knn_k=200, verbose=2,
        model_dir=model_dir)


def _scalars(model_dir, tag):
    """[[epoch, value], ...] of a TensorBoard epoch scalar written during training."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(run_folder.join(model_dir, run_folder.LOG_DIR, "train"),
                              size_guidance={ea.TENSORS: 0})
    acc.Reload()
    if f"epoch_{tag}" not in acc.Tags()["tensors"]:
        return []
    return [[e.step + 1, float(tf.make_ndarray(e.tensor_proto))]
            for e in acc.Tensors(f"epoch_{tag}")]


def _num(value):
    """'12.34', or '-' where nothing was measured (no linear probe)."""
    import math

    return "-" if math.isnan(value) else f"{value:.2f}"


def _table(summary, out_dir):
    """Markdown rows per run and mean +- std per method."""
    import numpy as np

    rows, per_method = [], {}
    for name, res in sorted(summary["runs"].items()):
        run_dir = run_folder.join(out_dir, name)
        linear = run_folder.read_json(run_folder.join(run_dir, "linear_eval_fast.json")) or {}
        purity = _scalars(run_dir, "weak_purity")
        sizes = _scalars(run_dir, "weak_component_size_mean")
        res["weak_purity_per_epoch"] = purity
        method = ARMS[name.rsplit("_seed", 1)[0]][2]
        entry = {"knn": 100 * res["knn_top1"],
                 "linear": 100 * linear["top1_last"] if linear else float("nan"),
                 "purity": purity[-1][1] if purity else float("nan"),
                 "size": sizes[-1][1] if sizes else float("nan"),
                 "minutes": res["train_seconds"] / 60}
        per_method.setdefault(method, []).append(entry)
        rows.append(f"| {name} | {entry['knn']:.2f} | {_num(entry['linear'])} | "
                    f"{entry['purity']:.3f} | {entry['size']:.2f} | {entry['minutes']:.1f} |")
    lines = ["| run | kNN top-1 (%) | fast linear top-1, last (%) | weak-label purity, last "
             "epoch | mean component size | train min |", "|---|---|---|---|---|---|"] + rows
    lines += ["", "| method | runs | kNN top-1 (%) | fast linear top-1 (%) |", "|---|---|---|---|"]
    for method, entries in per_method.items():
        knn_values = np.array([e["knn"] for e in entries])
        lin = np.array([e["linear"] for e in entries])
        lines.append(f"| {method} | {len(entries)} | {knn_values.mean():.2f} +- "
                     f"{knn_values.std():.2f} | "
                     f"{_num(lin.mean()) + ' +- ' + _num(lin.std()) if np.isfinite(lin).all() else '-'} |")
    # Per-seed pairs: each WCL arm minus SimCLR of the same seed (kNN, linear).
    by_seed = {}
    for name, res in summary["runs"].items():
        arm, seed = name.rsplit("_seed", 1)
        by_seed.setdefault(int(seed), {})[arm] = name
    pair_arms = [a for a in ("wcl", "wcl_keygrad") if a in FLAGS.arms]
    if "simclr" in FLAGS.arms and pair_arms:
        lines += ["", "| seed | " + " | ".join(f"{a} - simclr, kNN / linear (points)"
                                               for a in pair_arms) + " |",
                  "|---" * (1 + len(pair_arms)) + "|"]
        knn_of = {row.split(" | ")[0][2:]: row for row in rows}
        for seed in sorted(by_seed):
            names = by_seed[seed]
            if "simclr" not in names:
                continue
            cells = []
            for arm in pair_arms:
                if arm not in names:
                    cells.append("-")
                    continue
                a, b = (knn_of[names[x]].split(" | ") for x in (arm, "simclr"))
                linear = ("-" if "-" in (a[2], b[2])
                          else f"{float(a[2]) - float(b[2]):+.2f}")
                cells.append(f"{float(a[1]) - float(b[1]):+.2f} / {linear}")
            lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"wcl": "tab:red", "simclr": "tab:blue", "wcl_keygrad": "tab:orange"}
    first_seed = f"seed{FLAGS.seeds[0]}"
    for name, res in sorted(summary["runs"].items()):
        kind = name.rsplit("_seed", 1)[0]
        label = ARMS[kind][2] if name.endswith(first_seed) else None
        epochs, top1 = zip(*res["knn_top1_per_epoch"])
        ax.plot(epochs, [100 * t for t in top1], color=colours[kind], alpha=0.8,
                marker="o", label=label)
        if res.get("weak_purity_per_epoch"):
            epochs, purity = zip(*res["weak_purity_per_epoch"])
            ax2.plot(epochs, purity, color=colours[kind], alpha=0.8, marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"kNN top-1 on {'MNIST' if FLAGS.preset == 'demo' else 'CIFAR-10'} "
                  "test (%)")
    ax.set_title("kNN accuracy, seeds " + ",".join(FLAGS.seeds))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("fraction of weak-positive pairs of the same class")
    batch = 128 if FLAGS.preset == "demo" else FLAGS.global_batch_size  # the runs' batch
    ax2.set_title(f"weak-label purity (batch of {batch})")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _linear_probe(model_dir):
    """wcl_tf.tools.linear_eval --mode=fast on a finished CIFAR-10 run (skipped when done).

    Runs in a subprocess of its own (its flags differ from this tool's), with the folder
    that holds this wcl_tf package first on its path: the same code, installed or not.
    """
    import subprocess

    import wcl_tf

    if (FLAGS.preset != "cifar10" or not FLAGS.linear_epochs
            or run_folder.exists(run_folder.join(model_dir, "linear_eval_fast.json"))):
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(wcl_tf.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    subprocess.run([sys.executable, "-m", "wcl_tf.tools.linear_eval",
                    f"--model_dir={model_dir}", "--mode=fast",
                    f"--epochs={FLAGS.linear_epochs}",
                    f"--max_examples={FLAGS.max_eval_examples}"], check=True, env=env)


def _main(argv):
    del argv
    from wcl_tf import training

    run_folder.makedirs(FLAGS.out_dir)
    names = [f.name for f in FLAGS.get_key_flags_for_module(sys.argv[0])]
    summary = {"flags": {n: FLAGS[n].value for n in names}, "runs": {}}
    unknown = sorted(set(FLAGS.arms) - set(ARMS))
    if unknown:
        raise app.UsageError(f"unknown arm(s) {unknown}: use {', '.join(ARMS)}.")
    for seed in map(int, FLAGS.seeds):
        for arm in FLAGS.arms:
            name, cfg = _config(seed, arm)
            done = run_folder.read_json(run_folder.join(cfg.model_dir, run_folder.RESULTS_FILE))
            if done is not None:
                summary["runs"][name] = done
            else:
                print(f"=== {name} ({time.strftime('%H:%M:%S')})", flush=True)
                summary["runs"][name] = training.run(cfg, log=lambda m: print(m, flush=True))
            _linear_probe(cfg.model_dir)
            run_folder.write_json(run_folder.join(FLAGS.out_dir, "summary.json"), summary)
    table = _table(summary, FLAGS.out_dir)
    run_folder.write_text(run_folder.join(FLAGS.out_dir, "table.md"), table + "\n")
    run_folder.write_json(run_folder.join(FLAGS.out_dir, "summary.json"), summary)
    _plot(summary, os.path.join(FLAGS.out_dir, "knn_per_epoch.png"))
    print(table)
    print(json.dumps({k: round(100 * v["knn_top1"], 2) for k, v in summary["runs"].items()},
                     indent=1))



def main():
    """Entry point of the module, of tools/reproduce_cifar.py and of the console script."""
    _cli.run(_main, __name__)


if __name__ == "__main__":
    main()
