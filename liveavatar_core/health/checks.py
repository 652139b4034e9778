"""Raw per-block measurements: colour statistics, face box and identity, motion, seams, broken
frames and the audio-to-mouth offset. Alarms and baselines are the monitor's business.

Cost is kept to a few ms per 12-frame 704x384 block by measuring each signal at the coarsest
resolution that still shows it: colour (of every other frame), motion and black frames on every
4th pixel (nearest neighbour; means need no more), face detection on one frame per block (two if
Haar misses the first) at 352 px, the mouth on every 2nd pixel.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .alarms import HealthThresholds
from .colour import lab_stats
from .face import Box, FaceDetector, aligned_ssim, region, upper_face_crop
from .sync import OffsetEstimator, audio_activity, frame_rms

_COARSE = 4
# Mouth: lower part of the Haar box (which ends just under the lips), central columns.
_MOUTH_ROWS, _MOUTH_COLS = (0.6, 1.0), (0.2, 0.8)
# Faces are searched between half and twice the reference's width: 3x cheaper than all sizes, and a
# face outside that range is an alarm anyway (face_size, or face_lost).
_FACE_RANGE = (0.5, 2.0)
_IDENTITY_SCALES = (0.92, 1.0, 1.08)
# A block "is speaking" (a freeze counts) when at least this share of its frames has speech.
_SPEAKING = 0.5
# Seam ratio denominator floor (8-bit levels): a nearly static video must not turn sensor noise at
# a boundary into a large ratio.
_MOTION_FLOOR = 1.0
# A frame is broken when nearly constant (any colour), or nearly black with a little noise.
_CONSTANT_STD, _BLACK_MEAN, _BLACK_STD = 2.0, 12.0, 6.0


def _coarse(frames: np.ndarray) -> np.ndarray:
    h, w = frames.shape[1:3]
    size = (max(1, w // _COARSE), max(1, h // _COARSE))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_NEAREST) for f in frames])


def _grey(rgb: np.ndarray) -> np.ndarray:
    """uint8 [n, h, w, 3] -> uint8 [n, h, w] luma, in one cv2 call."""
    n, h, w = rgb.shape[:3]
    flat = np.ascontiguousarray(rgb).reshape(n * h, w, 3)
    return cv2.cvtColor(flat, cv2.COLOR_RGB2GRAY).reshape(n, h, w)


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    # cv2's L1 norm of the difference: no int16 copies, 5x faster than numpy here.
    return cv2.norm(a, b, cv2.NORM_L1) / a.size


def _motion(grey: np.ndarray) -> np.ndarray:
    """Mean absolute difference of each pair of consecutive frames."""
    return np.array([_mean_abs_diff(grey[i], grey[i + 1]) for i in range(len(grey) - 1)])


def _face_pixels(coarse: np.ndarray, box: Box) -> np.ndarray:
    """The face box (frame pixels) of coarse frames [n, h, w, 3]."""
    rows, cols = region(tuple(v / _COARSE for v in box), (0.0, 1.0), (0.0, 1.0), coarse.shape[1:3])
    return coarse[:, rows, cols]


def fit_reference(reference: np.ndarray, height: int, width: int) -> np.ndarray:
    """The reference at the output size, by the pack's own resize-and-crop rule (encoders.image)."""
    if reference.shape[:2] == (height, width):
        return reference
    from PIL import Image

    # Imported here: that module needs torch, which only this resize does (callers usually pass the
    # reference already at the output size).
    from ..encoders.image import resize_and_crop

    return resize_and_crop(Image.fromarray(reference), height, width)


class BlockChecks:
    """Measures blocks of one stream against its reference image (uint8 [H, W, 3] RGB)."""

    def __init__(self, reference: np.ndarray, thresholds: HealthThresholds, detector: FaceDetector):
        self.detector = detector
        self.thresholds = thresholds
        self._original = reference
        self.offset = OffsetEstimator(thresholds.av_window_frames, thresholds.av_max_lag,
                                      thresholds.av_min_speech_frames)
        self._speech_floor = 10.0 ** (thresholds.speech_floor_dbfs / 20.0)
        self.prepare(*reference.shape[:2])

    def prepare(self, height: int, width: int) -> None:
        """Reference statistics at the output size (again if the frames' size differs); a new stream."""
        ref = fit_reference(self._original, height, width)
        self.size = (height, width)
        self._prev_frame = None  # last frame of the previous block (full size, for the mouth)
        self._prev_grey = None  # and its coarse grey (for the boundary)
        self._prev_motion = None
        self._prev_rms = 0.0
        self._prev_broken = False
        grey, scale = self.detector.grey(ref)
        self.ref_box = self.detector.detect(grey, scale)
        self.box = self.ref_box
        coarse = _coarse(ref[None])
        self.ref_lab_frame = lab_stats(coarse)[0]
        self.ref_lab_face = self.ref_crop = None
        if self.ref_box is not None:
            self.ref_lab_face = lab_stats(_face_pixels(coarse, self.ref_box))[0]
            self.ref_crop = upper_face_crop(grey, scale, self.ref_box)

    def _identity(self, grey: np.ndarray, scale: float, face: Box) -> float | None:
        """Best aligned SSIM over a few box scales: Haar's box size wanders by about 10 % from frame
        to frame, which phase correlation (translation only) cannot undo."""
        if self.ref_crop is None:
            return None
        x, y, w, h = face
        scores = []
        for factor in _IDENTITY_SCALES:
            box = (x + w * (1 - factor) / 2, y + h * (1 - factor) / 2, w * factor, h * factor)
            crop = upper_face_crop(grey, scale, box)
            if crop is not None:
                scores.append(aligned_ssim(crop, self.ref_crop))
        return max(scores, default=None)

    def measure(self, frames: np.ndarray, audio: np.ndarray) -> dict:
        """Signals of one block by HealthRecord field name (absent: not measurable); "lab_frame" and
        "lab_face" are (mean, spread) pairs."""
        n = frames.shape[0]
        out = {}
        coarse = _coarse(frames)
        grey = _grey(coarse)

        # 1. Broken frames: nearly constant or nearly black.
        means, stds = np.array([cv2.meanStdDev(g) for g in grey]).reshape(-1, 2).T
        broken = (stds < _CONSTANT_STD) | ((means < _BLACK_MEAN) & (stds < _BLACK_STD))
        out["black_frames"] = int(broken.sum())

        # 2. Face box and identity on the middle frame, or on the last one if Haar misses it.
        face = None
        if self.ref_box is not None:
            for index in dict.fromkeys((n // 2, n - 1)):
                if broken[index]:
                    continue
                small, scale = self.detector.grey(frames[index])
                width = self.ref_box[2]
                face = self.detector.detect(small, scale, _FACE_RANGE[0] * width, _FACE_RANGE[1] * width,
                                            near=self.box)
                if face is not None:
                    out["identity_ssim"] = self._identity(small, scale, face)
                    break
        if self.ref_box is not None:
            out["face_found"] = face is not None
            out["face_size"] = face[2] / self.ref_box[2] if face is not None else None
        if face is not None:
            self.box = face
        out["face_box"] = list(self.box) if self.box is not None else None

        # 3. Colour of the whole frame and of the face box, on every other coarse frame.
        out["lab_frame"] = lab_stats(coarse[::2])
        if self.box is not None:
            out["lab_face"] = lab_stats(_face_pixels(coarse[::2], self.box))

        # 4. Motion within the block, the boundary jump against the previous block, freeze.
        within = _motion(grey)
        motion = float(np.median(within)) if within.size else None
        out["motion"] = motion
        if self._prev_frame is not None:
            boundary = _mean_abs_diff(grey[0], self._prev_grey)
            typical = max(v for v in (motion, self._prev_motion, _MOTION_FLOOR) if v is not None)
            out["seam_ratio"] = boundary / typical

        # 5. Audio per frame, mouth motion per frame, the offset estimate over the window.
        rms = frame_rms(np.asarray(audio, dtype=np.float32).reshape(-1), n)
        speech = rms > self._speech_floor
        out["speech_fraction"] = float(speech.mean())
        out["audio_dbfs"] = 20.0 * math.log10(float(np.sqrt(np.mean(np.square(rms)))) + 1e-10)
        out["freeze_motion"] = motion if motion is not None and speech.mean() >= _SPEAKING else None
        if self.box is not None:
            rows, cols = region(self.box, _MOUTH_ROWS, _MOUTH_COLS, frames.shape[1:3])
            seq = frames[:, rows, cols] if self._prev_frame is None else \
                np.concatenate([self._prev_frame[None, rows, cols], frames[:, rows, cols]])
            mouth = _motion(_grey(seq[:, ::2, ::2]))
            # A broken frame or a seam is not mouth motion: left out of the window (NaN), or one
            # black block would set the offset for the next 8 s.
            first = n - mouth.size  # the stream's first frame has no predecessor: audio left out too
            after = np.concatenate([[self._prev_broken], broken])[first:n]
            mouth[broken[first:] | after] = np.nan
            if first == 0 and out.get("seam_ratio", 0.0) >= self.thresholds.seam.on:
                mouth[0] = np.nan
            activity = audio_activity(rms, self._prev_rms)
            self.offset.push(activity[first:], mouth, speech[first:])
            out["av_offset"], out["av_confidence"] = self.offset.estimate()

        self._prev_frame = frames[-1].copy()
        self._prev_grey = grey[-1]
        self._prev_motion = motion
        self._prev_rms = float(rms[-1])
        self._prev_broken = bool(broken[-1])
        return out
