"""Live session core (issue 19): audio pushed in real-time-sized chunks and in bursts, blocks out as
they are made with the exact audio that drove them, hold between segments on one timeline, clear.
The tiny checkpoint on CPU (fp32), real speech-like audio."""

import time

import numpy as np
import pytest
import torch

from liveavatar_core.encoders.audio import AudioEncoder
from liveavatar_core.encoders.text import TextEncoder
from liveavatar_core.errors import InputError
from liveavatar_core.live.session import LiveBlock, LiveSession, SegmentEnded
from liveavatar_core.loading import load_generator, official_folder
from liveavatar_core.pipeline import GenerationSettings
from liveavatar_core.synthetic import write_tiny_checkpoint
from tests.test_audio_stream import speech

RATE = 24000
SETTINGS = GenerationSettings(size="64*64", seed=5)
PER_FRAME = RATE // 25


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """The tiny model and encoders, loaded once for every live-session test module."""
    tiny = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), audio_seconds=1.0)
    folder = official_folder(tiny.ckpt_dir)
    text_encoder = TextEncoder.from_pretrained(folder.t5, dtype=torch.float32)
    model = load_generator(folder.dit, folder.vae, tiny.lora, precision="fp32")
    return model, text_encoder.encode(tiny.prompt), tiny.image, AudioEncoder.from_pretrained(folder.wav2vec2), \
        text_encoder


def session(parts, **kw) -> LiveSession:
    model, text, image, encoder, _ = parts
    return LiveSession(model, text, image, encoder, SETTINGS, audio_rate=RATE, lookahead_s=0.3, **kw)


def collect(live: LiveSession, until, timeout: float = 60.0) -> list:
    """Events until `until(events)` holds (the session keeps running)."""
    events, deadline = [], time.monotonic() + timeout
    it = iter(live)
    while not until(events):
        assert time.monotonic() < deadline, events
        events.append(next(it))
    return events


def blocks_of(events, segment=None):
    return [e for e in events if isinstance(e, LiveBlock) and (segment is None or e.segment == segment)]


def test_two_segments_on_one_timeline_with_the_audio_that_drove_them(parts):
    first, second = speech(1.5, RATE, seed=1), speech(1.0, RATE, seed=2)
    live = session(parts)
    for i in range(0, first.size, RATE // 50):  # 20 ms chunks at real-time pace
        live.push_audio(first[i:i + RATE // 50], RATE)
        time.sleep(0.02)
    live.end_segment()
    events = collect(live, lambda ev: any(isinstance(e, SegmentEnded) for e in ev))
    assert isinstance(events[-1], SegmentEnded) and not events[-1].interrupted and events[-1].segment == 0
    seg0 = blocks_of(events, 0)
    assert len(seg0) == -(-first.size // (12 * PER_FRAME))
    assert [len(b.frames) for b in seg0] == [9] + [12] * (len(seg0) - 1)  # the official start drops 3
    assert all(b.frames.shape[1:] == (64, 64, 3) and b.frames.dtype == np.uint8 for b in seg0)
    played = np.concatenate([b.audio for b in seg0])
    assert played.size == sum(len(b.frames) for b in seg0) * PER_FRAME
    assert np.array_equal(played[:first.size - 3 * PER_FRAME], first[3 * PER_FRAME:])  # exact samples
    assert all(b.rtf > 0 and b.generate_s > 0 and b.latency_s >= 0 for b in seg0)
    # Held: nothing more comes until the next segment, which continues the same stream.
    time.sleep(0.5)
    live.push_audio((second * 32767).astype(np.int16).tobytes())
    live.end_segment()
    more = collect(live, lambda ev: any(isinstance(e, SegmentEnded) for e in ev))
    seg1 = blocks_of(more, 1)
    assert seg1 and seg1[0].index == 0 and all(len(b.frames) == 12 for b in seg1)
    assert seg1[0].frame0 == sum(len(b.frames) for b in seg0)
    assert more[-1] == SegmentEnded(1, False, (seg1[-1].frame0 + 12) / 25)
    live.close()
    assert list(live) == []


def test_the_same_audio_in_bursts_gives_the_same_video(parts):
    x = speech(1.3, RATE, seed=3)
    videos = []
    for chunk in (RATE // 50, x.size):
        live = session(parts)
        for i in range(0, x.size, chunk):
            live.push_audio(x[i:i + chunk])
        live.end_segment()
        live.close()
        videos.append(blocks_of(list(live)))
    a, b = videos
    assert len(a) == len(b) > 1 and all(np.array_equal(p.frames, q.frames) for p, q in zip(a, b))


def test_clear_ends_the_segment_interrupted_after_the_block_in_flight(parts):
    live = session(parts)
    live.push_audio(speech(4.0, RATE, seed=4))
    events = collect(live, lambda ev: len(blocks_of(ev)) >= 1)
    live.clear()
    events += collect(live, lambda ev: any(isinstance(e, SegmentEnded) for e in ev))
    ended = [e for e in events if isinstance(e, SegmentEnded)]
    assert ended[-1].segment == 0 and ended[-1].interrupted
    assert len(blocks_of(events)) < 4.0 * 25 / 12  # fewer blocks than the audio held
    assert live.audio.buffered_s == 0
    # The session goes on: a new segment after the interrupt.
    live.push_audio(speech(0.6, RATE, seed=5))
    live.end_segment()
    after = collect(live, lambda ev: any(isinstance(e, SegmentEnded) for e in ev))
    assert blocks_of(after, 1) and not after[-1].interrupted
    live.close()
    list(live)


def test_refusals(parts):
    model, text, image, encoder, _ = parts
    with pytest.raises(InputError, match="streaming mode"):
        LiveSession(model, text, image, encoder, GenerationSettings(size="64*64", mode="official"))
    live = session(parts)
    with pytest.raises(InputError, match="16000 Hz pushed into a session started at 24000"):
        live.push_audio(np.zeros(10, np.float32), 16000)
    live.close()
    assert list(live) == []


def test_idle_motion_between_segments_on_request(parts):
    live = session(parts, idle="generate")
    idle = collect(live, lambda ev: len(blocks_of(ev)) >= 2)  # no audio yet: idle motion
    assert all(b.segment is None and not b.audio.any() for b in blocks_of(idle))
    assert [len(b.frames) for b in blocks_of(idle)][:2] == [9, 12]
    x = speech(1.0, RATE, seed=6)
    live.push_audio(x)
    live.end_segment()
    more = collect(live, lambda ev: any(isinstance(e, SegmentEnded) for e in ev))
    spoken = blocks_of(more, 0)
    assert len(spoken) == -(-x.size // (12 * PER_FRAME)) and spoken[0].index == 0
    assert np.array_equal(np.concatenate([b.audio for b in spoken])[:x.size], x)
    frames = [b.frame0 for b in blocks_of(idle + more)]
    assert frames == sorted(frames)  # one timeline: idle blocks, then the segment
    live.close()
    list(live)
    with pytest.raises(InputError, match="unknown value 'dance'"):
        session(parts, idle="dance")
