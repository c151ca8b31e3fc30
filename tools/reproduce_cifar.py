"""WCL (lambda=1) against SimCLR (lambda=0) on real CIFAR-10, CPU-sized, several seeds.

    python tools/reproduce_cifar.py --data_dir=../shared/tfds --out_dir=runs/repro

Every run uses the same code, data, budget and seed pairing; only graph_loss_weight
differs. Writes <out_dir>/summary.json, <out_dir>/table.md and <out_dir>/knn_per_epoch.png.
Finished runs (results.json present) are reused, so the script can be re-run to resume.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

flags.DEFINE_string("data_dir", "../shared/tfds", "TFDS folder holding cifar10.")
flags.DEFINE_string("out_dir", "runs/repro", "Where runs and the summary go.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each runs WCL and SimCLR.")
flags.DEFINE_list("lambdas", ["1.0", "0.0"], "graph_loss_weight values.")
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


def _config(seed, lam):
    from wcl_tf.config import Config

    name = f"{'wcl' if lam > 0 else 'simclr'}_lambda{lam:g}_seed{seed}"
    return name, Config(
        dataset="cifar10", data_dir=FLAGS.data_dir, image_size=32,
        backbone=FLAGS.backbone, width=FLAGS.width,
        head_hidden_dim=FLAGS.head_hidden_dim, head_output_dim=FLAGS.head_output_dim,
        global_batch_size=FLAGS.global_batch_size, epochs=FLAGS.epochs, warmup_epochs=1,
        weak_aug_epochs=FLAGS.weak_aug_epochs, max_train_examples=FLAGS.max_train_examples,
        max_eval_examples=FLAGS.max_eval_examples, eval_every_epochs=FLAGS.eval_every_epochs,
        graph_loss_weight=lam, seed=seed, knn_k=200, verbose=2,
        model_dir=os.path.join(FLAGS.out_dir, name))


def _scalars(model_dir, tag):
    """[[epoch, value], ...] of a TensorBoard epoch scalar written during training."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(os.path.join(model_dir, "logs", "train"),
                              size_guidance={ea.TENSORS: 0})
    acc.Reload()
    if f"epoch_{tag}" not in acc.Tags()["tensors"]:
        return []
    return [[e.step + 1, float(tf.make_ndarray(e.tensor_proto))]
            for e in acc.Tensors(f"epoch_{tag}")]


def _table(summary, out_dir):
    """Markdown rows per run and mean +- std per method."""
    import numpy as np

    rows, per_method = [], {}
    for name, res in sorted(summary["runs"].items()):
        run_dir = os.path.join(out_dir, name)
        linear = {}
        path = os.path.join(run_dir, "linear_eval_fast.json")
        if os.path.exists(path):
            with open(path) as f:
                linear = json.load(f)
        purity = _scalars(run_dir, "weak_purity")
        sizes = _scalars(run_dir, "weak_component_size_mean")
        res["weak_purity_per_epoch"] = purity
        method = "WCL (lambda=1)" if name.startswith("wcl") else "SimCLR (lambda=0)"
        entry = {"knn": 100 * res["knn_top1"],
                 "linear": 100 * linear["top1_last"] if linear else float("nan"),
                 "purity": purity[-1][1] if purity else float("nan"),
                 "size": sizes[-1][1] if sizes else float("nan"),
                 "minutes": res["train_seconds"] / 60}
        per_method.setdefault(method, []).append(entry)
        rows.append(f"| {name} | {entry['knn']:.2f} | {entry['linear']:.2f} | "
                    f"{entry['purity']:.3f} | {entry['size']:.2f} | {entry['minutes']:.1f} |")
    lines = ["| run | kNN top-1 (%) | fast linear top-1, last (%) | weak-label purity, last "
             "epoch | mean component size | train min |", "|---|---|---|---|---|---|"] + rows
    lines += ["", "| method | runs | kNN top-1 (%) | fast linear top-1 (%) |", "|---|---|---|---|"]
    for method, entries in per_method.items():
        knn_values = np.array([e["knn"] for e in entries])
        lin = np.array([e["linear"] for e in entries])
        lines.append(f"| {method} | {len(entries)} | {knn_values.mean():.2f} +- "
                     f"{knn_values.std():.2f} | {lin.mean():.2f} +- {lin.std():.2f} |")
    return "\n".join(lines)


def _plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"wcl": "tab:red", "simclr": "tab:blue"}
    for name, res in sorted(summary["runs"].items()):
        kind = name.split("_")[0]
        label = {"wcl": "WCL", "simclr": "SimCLR"}[kind] if name.endswith("seed0") else None
        epochs, top1 = zip(*res["knn_top1_per_epoch"])
        ax.plot(epochs, [100 * t for t in top1], color=colours[kind], alpha=0.8,
                marker="o", label=label)
        if res.get("weak_purity_per_epoch"):
            epochs, purity = zip(*res["weak_purity_per_epoch"])
            ax2.plot(epochs, purity, color=colours[kind], alpha=0.8, marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 on CIFAR-10 test (%)")
    ax.set_title("kNN accuracy, seeds " + ",".join(FLAGS.seeds))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("fraction of weak-positive pairs of the same class")
    ax2.set_title(f"weak-label purity (batch of {FLAGS.global_batch_size})")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    from wcl_tf import training

    os.makedirs(FLAGS.out_dir, exist_ok=True)
    names = [f.name for f in FLAGS.get_key_flags_for_module(sys.argv[0])]
    summary = {"flags": {n: FLAGS[n].value for n in names}, "runs": {}}
    for seed in map(int, FLAGS.seeds):
        for lam in map(float, FLAGS.lambdas):
            name, cfg = _config(seed, lam)
            done = os.path.join(cfg.model_dir, "results.json")
            if os.path.exists(done):
                with open(done) as f:
                    summary["runs"][name] = json.load(f)
                continue
            print(f"=== {name} ({time.strftime('%H:%M:%S')})", flush=True)
            summary["runs"][name] = training.run(cfg, log=lambda m: print(m, flush=True))
            with open(os.path.join(FLAGS.out_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
    table = _table(summary, FLAGS.out_dir)
    with open(os.path.join(FLAGS.out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(FLAGS.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    _plot(summary, os.path.join(FLAGS.out_dir, "knn_per_epoch.png"))
    print(table)
    print(json.dumps({k: round(100 * v["knn_top1"], 2) for k, v in summary["runs"].items()},
                     indent=1))


if __name__ == "__main__":
    app.run(main)
