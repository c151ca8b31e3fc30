"""Pillow's GaussianBlur in NumPy floats, written from Pillow's C source
(src/libImaging/BoxBlur.c) for clarity: the reference of photometric.gaussian_blur.

_gaussian_blur_radius: the box radius l + a of each of 3 passes for a std `sigma`.
ImagingLineBoxBlur: out[x] = ww (in[x - l] + ... + in[x + l]) + fw (in[x - l - 1] +
in[x + l + 1]), every index clamped to the line (edge pixels repeated at each pass), with
ww = 1 / (2 (l + a) + 1) and fw = (1 - (2 l + 1) ww) / 2 (Pillow: 24-bit fixed point).
ImagingBoxBlur: three passes along the rows, then three along the columns. Pillow rounds
to uint8 after each pass; this reference does not (float64 throughout).
"""

import math

import numpy as np


def box_radius(sigma, passes=3):
    """Pillow's _gaussian_blur_radius (after Gwosdek et al. 2011, equations 7, 11, 14)."""
    sigma2 = sigma * sigma / passes
    length = math.sqrt(12.0 * sigma2 + 1.0)
    l = math.floor((length - 1.0) / 2.0)
    a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1) * (l + 1)))
    return l + a


def box_pass(lines, radius):
    """One pass along the last axis of `lines`, edge pixels repeated (clamped indices)."""
    l = int(radius)
    ww = 1.0 / (2.0 * radius + 1.0)
    fw = (1.0 - (2 * l + 1) * ww) / 2.0
    n = lines.shape[-1]
    index = np.arange(n)

    def at(offset):
        return lines[..., np.clip(index + offset, 0, n - 1)]

    return (ww * sum(at(t) for t in range(-l, l + 1))
            + fw * (at(-l - 1) + at(l + 1)))


def pillow_blur(image, sigma, passes=3):
    """(H, W, C) image blurred as Image.filter(ImageFilter.GaussianBlur(sigma)), in floats."""
    radius = box_radius(sigma, passes)
    x = np.moveaxis(np.asarray(image, np.float64), -1, 0)  # (C, H, W)
    for _ in range(passes):
        x = box_pass(x, radius)  # along the rows (width)
    x = np.swapaxes(x, 1, 2)
    for _ in range(passes):
        x = box_pass(x, radius)  # along the columns
    return np.moveaxis(np.swapaxes(x, 1, 2), 0, -1)
