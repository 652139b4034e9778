"""Face box (OpenCV Haar cascade, shipped in the wheel) and a weight-free identity proxy (SSIM).

The field's identity metric (ArcFace CSIM) and dlib's embedding need downloaded weights; the SSIM
of an aligned grey upper-face crop against the same crop of the reference is a trend signal only:
it falls when the eyes, brows and hair stop matching the reference, and when the box is misplaced.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from ..errors import InputError
from .alarms import HEALTH_FIX

CASCADE_NAME = "haarcascade_frontalface_default.xml"
# Detection runs on a grey frame whose longest side is this (spec/live.md 6: 2.8 ms at 352x192).
DETECT_LONG_SIDE = 352
# The upper face: brows, eyes, nose and hair, not the mouth (which moves with speech). Fractions of
# the Haar box, whose top sits at the brows and bottom just under the lips.
_UPPER_ROWS = (0.0, 0.6)
_UPPER_COLS = (0.1, 0.9)
CROP_SIZE = 64
_WINDOW = cv2.createHanningWindow((CROP_SIZE, CROP_SIZE), cv2.CV_32F)

Box = tuple[float, float, float, float]  # x, y, width, height in frame pixels


class FaceDetector:
    """Frontal face boxes on a downscaled grey frame; InputError at construction if OpenCV has no cascade."""

    def __init__(self):
        folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
        path = os.path.join(folder, CASCADE_NAME) if folder else None
        if not path or not os.path.isfile(path):
            raise InputError("health", f"OpenCV {cv2.__version__} has no {CASCADE_NAME} (looked in {folder}).",
                             HEALTH_FIX)
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise InputError("health", f"OpenCV could not load {path}.", HEALTH_FIX)

    def grey(self, frame: np.ndarray) -> tuple[np.ndarray, float]:
        """(grey frame at the detection size, scale from frame pixels to it)."""
        h, w = frame.shape[:2]
        scale = min(1.0, DETECT_LONG_SIDE / max(h, w))
        small = cv2.resize(frame, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        return cv2.cvtColor(small, cv2.COLOR_RGB2GRAY), scale

    def detect(self, grey: np.ndarray, scale: float, min_width: float | None = None,
               max_width: float | None = None, near: Box | None = None) -> Box | None:
        """The face box in frame pixels, or None. Widths are in frame pixels; limiting them to a
        range around the reference's face cuts the cost by about 3x (fewer pyramid levels).
        With several candidates, the one closest to `near` (else the largest) wins."""
        kwargs = {}
        if min_width:
            kwargs["minSize"] = (max(24, int(min_width * scale)),) * 2
        if max_width:
            kwargs["maxSize"] = (int(max_width * scale),) * 2
        found = self._cascade.detectMultiScale(grey, scaleFactor=1.2, minNeighbors=3, **kwargs)
        if len(found) == 0:
            return None
        boxes = [tuple(int(round(v / scale)) for v in box) for box in found]
        if near is None:
            return max(boxes, key=lambda b: b[2])
        cx, cy = near[0] + near[2] / 2, near[1] + near[3] / 2
        return min(boxes, key=lambda b: (b[0] + b[2] / 2 - cx) ** 2 + (b[1] + b[3] / 2 - cy) ** 2)


def region(box: Box, rows: tuple[float, float], cols: tuple[float, float],
           shape: tuple[int, ...]) -> tuple[slice, slice]:
    """Slices of a frame of `shape` covering the given row and column fractions of `box`, clipped."""
    x, y, w, h = box
    y0, y1 = max(0, int(y + rows[0] * h)), min(shape[0], int(y + rows[1] * h))
    x0, x1 = max(0, int(x + cols[0] * w)), min(shape[1], int(x + cols[1] * w))
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def upper_face_crop(grey: np.ndarray, scale: float, box: Box) -> np.ndarray | None:
    """The upper face of `box` (frame pixels) cut from a detection-size grey frame, as 64x64 float32."""
    scaled = tuple(v * scale for v in box)
    rows, cols = region(scaled, _UPPER_ROWS, _UPPER_COLS, grey.shape)
    crop = grey[rows, cols]
    if min(crop.shape) < 8:
        return None
    return cv2.resize(crop, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)


def aligned_ssim(crop: np.ndarray, reference: np.ndarray) -> float:
    """SSIM of two upper-face crops after removing their translation (phase correlation): the Haar
    box wanders by a few pixels from frame to frame, which alone costs up to 0.3 SSIM."""
    # phaseCorrelate applies its window in place: hand it copies.
    (dx, dy), _ = cv2.phaseCorrelate(reference.copy(), crop.copy(), _WINDOW)
    shift = np.float32([[1, 0, -dx], [0, 1, -dy]])
    return ssim(cv2.warpAffine(crop, shift, (CROP_SIZE, CROP_SIZE), borderMode=cv2.BORDER_REFLECT), reference)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two grey float images in 0..255, 11x11 Gaussian window, sigma 1.5 (Wang et al. 2004)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x):
        return cv2.GaussianBlur(x, (11, 11), 1.5)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return float((num / den).mean())
