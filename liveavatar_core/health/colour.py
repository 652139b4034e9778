"""CIELAB colour statistics of frames, in numpy (sRGB, D65 white), and the CIE76 colour difference.

CIE76 (Euclidean distance in L*a*b*) is used rather than CIEDE2000: the signal is a drift of the
mean colour against a baseline, where CIE76's known overestimate for saturated colours does not
matter, and it is one line. A difference of about 2.3 is a just-noticeable one.
"""

from __future__ import annotations

import cv2
import numpy as np

# sRGB transfer function per 8-bit code (IEC 61966-2-1), as a table: no power per pixel.
_CODES = np.arange(256) / 255.0
_LINEAR = np.where(_CODES > 0.04045, ((_CODES + 0.055) / 1.055) ** 2.4, _CODES / 12.92).astype(np.float32)

# Linear sRGB -> XYZ (D65), each row divided by the D65 white point so that white maps to (1, 1, 1).
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_RGB_TO_XYZN = (np.array([[0.4124564, 0.3575761, 0.1804375],
                          [0.2126729, 0.7151522, 0.0721750],
                          [0.0193339, 0.1191920, 0.9503041]]) / _WHITE_D65[:, None]).astype(np.float32)

_DELTA = 6.0 / 29.0


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 sRGB `[..., 3]` -> float32 CIELAB `[..., 3]` (L* in 0..100), D65 white."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    flat = rgb.reshape(-1, 1, 3)
    # cv2.LUT and cv2.transform do the per-pixel table and 3x3 product in C, a few times faster
    # than numpy's fancy indexing and matmul on small inner dimensions.
    linear = cv2.LUT(flat, _LINEAR)
    xyz = cv2.transform(linear, _RGB_TO_XYZN).reshape(-1, 3)
    f = np.where(xyz > _DELTA ** 3, np.cbrt(xyz), xyz / (3 * _DELTA ** 2) + 4.0 / 29.0)
    lab = np.empty_like(f)
    lab[:, 0] = 116.0 * f[:, 1] - 16.0
    lab[:, 1] = 500.0 * (f[:, 0] - f[:, 1])
    lab[:, 2] = 200.0 * (f[:, 1] - f[:, 2])
    return lab.reshape(rgb.shape)


def lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (the spread) of L*, a*, b* over all pixels of `rgb` `[..., 3]`."""
    # cv2 reduces the interleaved channels in one pass, 100x faster than numpy's axis-0 reductions.
    mean, std = cv2.meanStdDev(srgb_to_lab(rgb).reshape(-1, 1, 3))
    return mean.reshape(3), std.reshape(3)


def delta_e76(lab1: np.ndarray, lab2: np.ndarray) -> float:
    """CIE76 colour difference between two L*a*b* colours."""
    return float(np.linalg.norm(np.asarray(lab1, dtype=np.float64) - np.asarray(lab2, dtype=np.float64)))
