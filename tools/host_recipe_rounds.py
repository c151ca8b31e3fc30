"""Host-only augmentation against torchvision's recipe on one core, in alternating rounds.

    python tools/host_recipe_rounds.py --torch_python=/path/to/torch-venv/bin/python \
        --photos=PATH/TO/photos --rounds=4 [--checkout=before:/path/to/other/checkout]
        [--variant=malloc:TF_CPU_ALLOCATOR_USE_BFC=false]

Each round runs, one after the other and each pinned to the same core (`taskset -c CORE`),
the torchvision reference (tools/torchvision_reference.py: PIL decode, two SimCLR views
with Pillow's blur, one thread; its first pass over the files is untimed, the second is
the round's figure) and `python -m wcl_tf.tools.benchmark pipeline --augment_on=host
--blur --threads=1` of this checkout (and of each --checkout, to put a before and an
after into the same rounds, and of this checkout with each --variant's environment). It
prints a table of images per second of each process's CPU time (which other processes on
a shared machine do not dilute) and each wcl_tf figure's ratio to the round's torchvision
figure, with the load average at the start of the round.

PyTorch is not a dependency of wcl_tf: --torch_python is the interpreter of a separate
virtualenv with torch and torchvision installed. This script starts both as child
processes and imports neither.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _pinned(core, args, env=None, cwd=None):
    proc = subprocess.run(["taskset", "-c", str(core), *args], capture_output=True,
                          text=True, env=env, cwd=cwd, check=False)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr[-2000:]}")
    return proc.stdout


def torchvision_rate(torch_python, train_folder, core, image_size, num_images):
    """torchvision's images per CPU second: the second of two passes over the files."""
    out = _pinned(core, [torch_python, os.path.join(HERE, "torchvision_reference.py"),
                         f"--images={train_folder}", f"--image_size={image_size}",
                         f"--num_images={num_images}", "--rounds=2"])
    rates = re.findall(r"([0-9.]+) per CPU second", out)
    if len(rates) != 2:
        sys.exit(f"unexpected torchvision_reference output:\n{out}")
    return float(rates[-1])


def wcl_tf_rate(checkout, photos, core, image_size, batch_size, repeats, extra_env=None):
    """images per CPU second of the host-only pipeline of the wcl_tf in `checkout`, with
    `extra_env` added to the environment."""
    env = dict(os.environ, PYTHONPATH=checkout, TF_CPP_MIN_LOG_LEVEL="2", **(extra_env or {}))
    with tempfile.TemporaryDirectory() as tmp:
        out_json = os.path.join(tmp, "out.json")
        _pinned(core, [sys.executable, "-m", "wcl_tf.tools.benchmark", "pipeline",
                       f"--dataset=folder:{photos}", f"--image_size={image_size}",
                       f"--batch_size={batch_size}", "--augment_on=host", "--blur",
                       "--threads=1", f"--repeats={repeats}", f"--out={out_json}"],
                env=env, cwd=tmp)
        with open(out_json) as f:
            result = json.load(f)
    rows = result["rows"] if isinstance(result, dict) else result
    return float(rows[-1]["images_per_cpu_s"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch_python", required=True,
                        help="python of a virtualenv with torch and torchvision")
    parser.add_argument("--photos", required=True,
                        help="image folder with a train/ subfolder (the JPEGs timed)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--core", type=int, default=1, help="the one core both run on")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_images", type=int, default=320,
                        help="torchvision: images per pass")
    parser.add_argument("--repeats", type=int, default=3, help="wcl_tf: timed repeats")
    parser.add_argument("--checkout", action="append", default=[],
                        help="NAME:PATH of another wcl_tf checkout to time in the same "
                             "rounds (e.g. before:/tmp/main-before); repeatable")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:VAR=VALUE[,VAR=VALUE...]: this checkout again with these "
                             "environment variables (e.g. malloc:TF_CPU_ALLOCATOR_USE_BFC="
                             "false); repeatable")
    args = parser.parse_args()
    checkouts = [("this", ROOT, {})] + [(*c.split(":", 1), {}) for c in args.checkout]
    for variant in args.variant:
        name, _, assignments = variant.partition(":")
        checkouts.append((name, ROOT, dict(a.split("=", 1) for a in assignments.split(","))))
    train = os.path.join(args.photos, "train")
    header = ["round", "load average (1 min)", "torchvision"] + [
        f"wcl_tf {name}" for name, _, _ in checkouts]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    for number in range(1, args.rounds + 1):
        load = os.getloadavg()[0]
        reference = torchvision_rate(args.torch_python, train, args.core, args.image_size,
                                     args.num_images)
        cells = [str(number), f"{load:.1f}", f"{reference:.1f}"]
        for _, path, extra_env in checkouts:
            rate = wcl_tf_rate(path, args.photos, args.core, args.image_size,
                               args.batch_size, args.repeats, extra_env)
            cells.append(f"{rate:.1f} ({rate / reference:.2f}x)")
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\nImages per second of each process's CPU time, on core {args.core}; "
          "(ratio to the round's torchvision figure).")


if __name__ == "__main__":
    main()
