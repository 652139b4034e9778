"""Synthetic talking-head video for the health tests and benchmark: a still picture whose mouth
opens with the loudness of the audio, with a chosen delay, a one-pixel jitter and sensor noise."""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from .sync import frame_rms

_NOISE_BANK = 4  # noise frames reused in turn: drawing fresh noise for every frame would dominate


def read_speech(path, seconds: float | None = None) -> tuple[np.ndarray, int]:
    """(float32 samples, rate) of an audio file as the pack loads it (16 kHz mono), looped to
    `seconds` if given."""
    from ..encoders.audio import SAMPLE_RATE, load_audio

    samples, rate = load_audio(path), SAMPLE_RATE
    if seconds is not None:
        n = int(seconds * rate)
        samples = np.tile(samples, -(-n // samples.size))[:n]
    return samples, rate


def red_lips(picture: np.ndarray) -> tuple[int, int, int, int]:
    """Mouth (cx, cy, half width, largest half height) of a cartoon with red lips, found by colour
    (the example picture); the mouth opens to 0.4 x the lips' width."""
    r, g, b = (picture[..., i].astype(np.int16) for i in range(3))
    ys, xs = np.nonzero((r > 140) & (g < 90) & (b < 90))
    if xs.size < 50:
        raise ValueError("no red lips in the picture")
    width = int(np.ptp(xs))
    return int(xs.mean()), int(ys.mean()) + 2, int(0.4 * width), int(0.2 * width)


def mouth_openings(audio: np.ndarray, sample_rate: int, fps: int, delay_frames: int = 0) -> np.ndarray:
    """Mouth opening 0..1 per video frame: the frame's audio RMS over a loud level, `delay_frames`
    later (positive: the video lags the audio)."""
    n = int(audio.size * fps // sample_rate)
    rms = frame_rms(audio[:n * sample_rate // fps], n)
    opening = np.clip(rms / (np.percentile(rms, 95) + 1e-9), 0.0, 1.0)
    out = np.zeros(n)
    if delay_frames >= 0:
        out[delay_frames:] = opening[:n - delay_frames]
    else:
        out[:delay_frames] = opening[-delay_frames:]
    return out


@dataclass
class TalkingScene:
    """A picture (uint8 [H, W, 3]) with a mouth ellipse at `mouth` = (cx, cy, half width, largest
    half height) in pixels."""

    picture: np.ndarray
    mouth: tuple[int, int, int, int]
    jitter: int = 1
    noise: int = 2
    seed: int = 0
    _padded: np.ndarray = field(init=False, repr=False)
    _noise: list = field(init=False, repr=False)
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        j = self.jitter
        self._padded = np.pad(self.picture, ((j, j), (j, j), (0, 0)), mode="edge")
        self._rng = np.random.default_rng(self.seed)
        shape = self.picture.shape
        # Symmetric noise as two uint8 planes for cv2's saturating add and subtract.
        self._noise = [(self._rng.integers(0, self.noise + 1, shape, dtype=np.uint8),
                        self._rng.integers(0, self.noise + 1, shape, dtype=np.uint8)) for _ in range(_NOISE_BANK)]

    def render(self, openings: np.ndarray) -> np.ndarray:
        """One frame per opening value, uint8 [n, H, W, 3]."""
        h, w = self.picture.shape[:2]
        cx, cy, half_w, half_h = self.mouth
        out = np.empty((len(openings), h, w, 3), dtype=np.uint8)
        for i, opening in enumerate(openings):
            dy, dx = self._rng.integers(0, 2 * self.jitter + 1, 2)
            frame = self._padded[dy:dy + h, dx:dx + w]
            # The picture moved by (jitter - dx, jitter - dy): the mouth moves with it.
            centre = (cx + self.jitter - int(dx), cy + self.jitter - int(dy))
            plus, minus = self._noise[self._rng.integers(_NOISE_BANK)]
            frame = cv2.subtract(cv2.add(frame, plus), minus)
            height = int(round(opening * half_h))
            if height > 0:
                cv2.ellipse(frame, centre, (half_w, height), 0, 0, 360, (60, 15, 25), -1, cv2.LINE_AA)
            out[i] = frame
        return out
