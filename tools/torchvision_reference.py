"""The authors' host-side augmentation (torchvision on PIL) timed on a folder of JPEGs.

The reference the host-only recipe (`--augment_on=host`) is compared with per core in
docs/performance.md. Runs only where PyTorch and torchvision are installed (a separate
virtualenv: neither is a dependency of wcl_tf):

    taskset -c 1 /path/to/torch-venv/bin/python tools/torchvision_reference.py \
        --images=PATH/TO/photos/train --image_size=224 --num_images=256 --rounds=2

Each image is opened and decoded by PIL (as torchvision's ImageFolder does), then two
views of the SimCLR recipe of the paper (crop scale (0.08, 1), jitter 0.8/0.8/0.8/0.2 at
p=0.8, grayscale p=0.2, PIL Gaussian blur with sigma in (0.1, 2) at p=0.5 as MoCo v2's
loader does, flip, ToTensor) are made, with one PyTorch thread. Prints images/s (each
image with both views) per round, by the clock and per second of the process's CPU time
(which other processes on a busy machine do not dilute); --profile prints the CPU
milliseconds per image of each step instead (decode, then each transform, both views).
"""

import argparse
import os
import random
import time

import torch
from PIL import Image, ImageFilter
from torchvision import transforms


class PilGaussianBlur:
    """PIL's Gaussian blur with a random sigma (MoCo v2's loader; the authors use it)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image):
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def recipe(image_size, blur=True):
    """The strong (SimCLR) view as a list of transforms."""
    steps = [
        transforms.RandomResizedCrop(image_size, scale=(0.08, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
    ]
    if blur:
        steps.append(transforms.RandomApply([PilGaussianBlur()], p=0.5))
    steps += [transforms.RandomHorizontalFlip(), transforms.ToTensor()]
    return steps


def _files(folder):
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.join(root, n) for n in names
                  if n.lower().endswith((".jpg", ".jpeg", ".png"))]
    if not found:
        raise SystemExit(f"torchvision_reference: no JPEG/PNG files under {folder}")
    return sorted(found)


def _decode(path):
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of images (any depth)")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--num_images", type=int, default=256, help="images per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--noblur", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="CPU ms per image of the decode and of each transform")
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    files = _files(args.images)
    steps = recipe(args.image_size, blur=not args.noblur)
    view = transforms.Compose(steps)
    order = [files[i % len(files)] for i in range(args.num_images)]
    for i in range(args.rounds):
        if args.profile:
            spent = {"decode": 0.0, **{type(s).__name__ + (
                f"[{type(s.transforms[0]).__name__}]" if hasattr(s, "transforms") else ""): 0.0
                for s in steps}}
            for path in order:
                start = time.process_time()
                image = _decode(path)
                spent["decode"] += time.process_time() - start
                for _ in range(2):
                    x = image
                    for step, name in zip(steps, list(spent)[1:]):
                        start = time.process_time()
                        x = step(x)
                        spent[name] += time.process_time() - start
            print(f"round {i + 1}: ms per image (both views): " + ", ".join(
                f"{k} {1e3 * v / len(order):.2f}" for k, v in spent.items()), flush=True)
            continue
        start, cpu_start = time.perf_counter(), time.process_time()
        for path in order:
            image = _decode(path)
            view(image), view(image)
        rate = len(order) / (time.perf_counter() - start)
        cpu_rate = len(order) / (time.process_time() - cpu_start)
        print(f"round {i + 1}: {rate:.1f} images/s, {cpu_rate:.1f} per CPU second "
              f"({args.image_size} px, {'no blur' if args.noblur else 'blur'}, two views "
              "each)", flush=True)


if __name__ == "__main__":
    main()
