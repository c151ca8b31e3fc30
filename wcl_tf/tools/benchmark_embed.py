"""Speed and memory of embedding and searching (wcl_tf.tools.embed / neighbors).

    python -m wcl_tf.tools.benchmark_embed embed --backbone=small_cnn --width=32 \
        --image_size=28 --num_images=1000
    python -m wcl_tf.tools.benchmark_embed embed --backbone=resnet50 --image_size=224 \
        --num_images=128
    python -m wcl_tf.tools.benchmark_embed memory --num_images=1000,10000
    python -m wcl_tf.tools.benchmark_embed search --rows=100000 --dim=2048 --queries=100

embed: `python -m wcl_tf.tools.embed --random_init` (the speed does not depend on the
weights) on --num_images generated JPEGs (--jpeg_side px, random content, in a temporary
folder), in a child process; prints images/s of the whole run and the rate the tool's
progress bar showed last (steady state, after the first batches). memory: the same for
each count of --num_images, and the child's peak resident set size (os.wait4's ru_maxrss:
TensorFlow included). search: faiss exact inner-product search of --queries rows against
--rows x --dim float16 unit vectors (converted to float32 once, when indexed, as
wcl_tf.neighbors does), median of --repeats; --approximate=ivf/hnsw adds that index's
build time, search time and recall@10 against exact.
"""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from wcl_tf.tools import _cli  # noqa: E402
from wcl_tf.tools.benchmark import timing  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("backbone", "small_cnn", "embed / memory: backbone (random weights).")
flags.DEFINE_integer("width", 32, "embed / memory: small_cnn width.")
flags.DEFINE_integer("image_size", 28, "embed / memory: encoder image size.")
flags.DEFINE_list("num_images", ["1000"], "embed / memory: images embedded (one run each).")
flags.DEFINE_integer("jpeg_side", 96, "embed / memory: side of the generated JPEGs.")
flags.DEFINE_integer("batch_size", 64, "embed / memory: --batch_size of the embed tool.")
flags.DEFINE_integer("rows", 100000, "search: embedded vectors.")
flags.DEFINE_integer("dim", 2048, "search: their dimension.")
flags.DEFINE_integer("queries", 100, "search: query vectors.")
flags.DEFINE_integer("k", 10, "search: neighbours per query.")
flags.DEFINE_integer("repeats", 3, "search: timed repeats.")
flags.DEFINE_enum("approximate", None, ["ivf", "hnsw"], "search: also time this index.")
flags.DEFINE_string("out", None, "Write the numbers as JSON here.")


def _jpegs(folder, count, side):
    import numpy as np  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    for i in range(count):
        sub = os.path.join(folder, f"class_{i % 10}")
        os.makedirs(sub, exist_ok=True)
        pixels = rng.integers(0, 256, (side // 8, side // 8, 3), np.uint8)
        Image.fromarray(pixels).resize((side, side)).save(
            os.path.join(sub, f"{i:06d}.jpg"), quality=90)


def _embed_run(tmp, count):
    """(seconds, last progress-bar rate, peak RSS bytes, CPU seconds) of one embed run."""
    images = os.path.join(tmp, f"images_{count}")
    if not os.path.isdir(images):
        _jpegs(images, count, FLAGS.jpeg_side)
    run = os.path.join(tmp, "run")
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"backbone": FLAGS.backbone, "width": FLAGS.width,
                   "image_size": FLAGS.image_size}, f)
    out = os.path.join(tmp, f"out_{count}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "wcl_tf.tools.embed", f"--model_dir={run}", "--random_init",
           f"--images={images}", f"--out={out}", f"--batch_size={FLAGS.batch_size}"]
    start = time.time()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.time() - start
    stdout, stderr = child.stdout.read(), child.stderr.read()
    if status != 0:
        raise SystemExit(f"embed failed: {stderr.strip().splitlines()[-1:]}")
    rates = re.findall(r"img/s: ([0-9.]+)", stdout)
    return (seconds, float(rates[-1]) if rates else None, usage.ru_maxrss * 1024,
            usage.ru_utime + usage.ru_stime)


def _machine():
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def embed_mode():
    rows = []
    with tempfile.TemporaryDirectory(prefix="wcl_embed_bench_") as tmp:
        for count in [int(n) for n in FLAGS.num_images]:
            seconds, rate, peak, cpu = _embed_run(tmp, count)
            rows.append({"images": count, "seconds": round(seconds, 1),
                         "cpu_seconds": round(cpu, 1),
                         "images_per_s_overall": round(count / seconds, 1),
                         "images_per_s_progress": rate,
                         "peak_rss_mib": round(peak / 2**20, 1)})
    print(f"embed: {FLAGS.backbone} (random weights) at {FLAGS.image_size} px, "
          f"{FLAGS.jpeg_side} px JPEGs, batch {FLAGS.batch_size}; {_machine()}")
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print("| images | seconds (process) | CPU seconds | images/s (process) | images/s "
          "(progress bar) | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']} | {r['seconds']} | {r['cpu_seconds']} | "
              f"{r['images_per_s_overall']} | {r['images_per_s_progress']} | "
              f"{r['peak_rss_mib']} |")
    return rows


def search_mode():
    import numpy as np  # pylint: disable=import-outside-toplevel

    from wcl_tf.neighbors import Neighbors  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((FLAGS.rows, FLAGS.dim), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows = rows.astype(np.float16)
    queries = rows[rng.choice(FLAGS.rows, FLAGS.queries, replace=False)].astype(np.float32)
    queries += 0.05 * rng.standard_normal(queries.shape, dtype=np.float32)
    result = {"rows": FLAGS.rows, "dim": FLAGS.dim, "queries": FLAGS.queries, "k": FLAGS.k}
    kinds = ["exact"] + ([FLAGS.approximate] if FLAGS.approximate else [])
    print(f"search: {FLAGS.queries} queries, k={FLAGS.k}, against {FLAGS.rows} x {FLAGS.dim} "
          f"float16; {_machine()}")
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print("| index | build s | search s (median) | search CPU s (median) | queries/s | "
          "recall@10 |")
    print("|---|---|---|---|---|---|")
    for kind in kinds:
        start = time.time()
        index = Neighbors(rows, index=kind)
        build = time.time() - start
        searched = timing.timed(lambda index=index: index.search(queries, FLAGS.k), 0,
                                FLAGS.repeats)
        search, search_cpu = searched.median, searched.cpu_median
        recall = index.recall_at(10, sample=FLAGS.queries) if kind != "exact" else 1.0
        result[kind] = {"build_s": round(build, 2), "search_s": round(search, 3),
                        "search_cpu_s": round(search_cpu, 3), "recall_at_10": recall}
        print(f"| {kind} | {build:.2f} | {search:.3f} | {search_cpu:.3f} | "
              f"{FLAGS.queries / search:.0f} | {recall:.3f} |")
    return result


def _main(argv):
    if len(argv) != 2 or argv[1] not in ("embed", "memory", "search"):
        print("usage: benchmark_embed embed|memory|search [--flags]", file=sys.stderr)
        return 2
    result = search_mode() if argv[1] == "search" else embed_mode()
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def main():
    """Entry point of the module, of tools/benchmark_embed.py and of the console script."""
    _cli.run(_main, __name__)


if __name__ == "__main__":
    main()
