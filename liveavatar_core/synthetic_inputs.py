"""Deterministic synthetic demo inputs: a cartoon face and a speech-like audio signal.

The demo and the tests need a reference image and an audio track that exist on a fresh machine
without downloads; these are drawn and synthesised from a seed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def make_face_image(width: int = 320, height: int = 180, seed: int = 0) -> Image.Image:
    """A simple cartoon face on a coloured background (RGB)."""
    rng = np.random.default_rng(seed)
    bg = tuple(int(c) for c in rng.integers(40, 200, size=3))
    img = Image.new("RGB", (width, height), bg)
    d = ImageDraw.Draw(img)
    cx, cy = width / 2, height / 2
    r = min(width, height) * 0.38
    skin = tuple(int(c) for c in rng.integers(170, 240, size=3))
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=skin, outline=(30, 30, 30), width=2)
    for sx in (-1, 1):
        ex, ey, er = cx + sx * r * 0.38, cy - r * 0.2, r * 0.12
        d.ellipse([ex - er, ey - er, ex + er, ey + er], fill=(255, 255, 255), outline=(20, 20, 20))
        d.ellipse([ex - er / 2, ey - er / 2, ex + er / 2, ey + er / 2], fill=(20, 20, 60))
    d.arc([cx - r * 0.45, cy + r * 0.05, cx + r * 0.45, cy + r * 0.6], 20, 160, fill=(120, 20, 20), width=3)
    return img


def make_speech_audio(seconds: float = 3.0, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Speech-like mono float32 audio: a glottal pulse train through moving vowel formants, in syllables."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    f0 = 120 + 25 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    source = np.sign(np.sin(phase)) * 0.5 + 0.5 * np.sin(phase)
    out = np.zeros(n)
    syllable = int(0.25 * sample_rate)
    for start in range(0, n, syllable):
        seg = slice(start, min(n, start + syllable))
        f1, f2 = rng.uniform(300, 850), rng.uniform(900, 2300)
        ts = t[seg]
        carrier = source[seg] * (np.sin(2 * np.pi * f1 * ts) + 0.6 * np.sin(2 * np.pi * f2 * ts))
        envelope = np.sin(np.linspace(0, np.pi, ts.size)) ** 2
        out[seg] = carrier * envelope * rng.uniform(0.4, 1.0)
    out += 0.003 * rng.standard_normal(n)
    return (0.3 * out / np.abs(out).max()).astype(np.float32)
