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


def write_long_speech(path, seconds: float, seed: int = 0, loop_seconds: float = 10.0) -> None:
    """An Opus file (Ogg) of `seconds` of speech-like audio, written in about a second per hour.

    `loop_seconds` of speech are encoded once and their packets muxed again and again with later
    timestamps (Opus packets carry no position), one loop in five quieter so the loudness varies.
    For tests and benchmarks of hours-long audio; 48 kHz, about 3 kB per second.
    """
    import io

    import av

    rate = 48000
    speech = make_speech_audio(loop_seconds, rate, seed=seed)
    encoded = [_opus(speech, rate), _opus(speech * 0.2, rate)]
    with av.open(io.BytesIO(encoded[0]), format="ogg") as first:
        template = first.streams.audio[0]
        loops = []
        for data in encoded:
            with av.open(io.BytesIO(data), format="ogg") as src:
                loops.append([(bytes(p), p.pts, p.duration) for p in src.demux(src.streams.audio[0]) if p.size])
        span = sum(d for _, _, d in loops[0])
        with av.open(str(path), "w", format="ogg") as out:
            stream = out.add_stream_from_template(template)
            for r in range(int(np.ceil(seconds / loop_seconds))):
                for data, pts, duration in loops[1 if r % 5 == 4 else 0]:
                    packet = av.Packet(data)
                    packet.pts = packet.dts = pts + r * span
                    packet.duration, packet.time_base, packet.stream = duration, template.time_base, stream
                    out.mux(packet)


def _opus(samples: np.ndarray, rate: int) -> bytes:
    """Ogg Opus bytes of mono float samples."""
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=rate)
        stream.layout = "mono"
        stream.bit_rate = 24000
        for i in range(0, samples.size, 960):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[None, i:i + 960], np.float32),
                                               format="flt", layout="mono")
            frame.sample_rate = rate
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode(None):
            out.mux(p)
    return buf.getvalue()
