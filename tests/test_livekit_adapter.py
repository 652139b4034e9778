"""The LiveKit Agents adapter (integrations/livekit) called directly, as an AvatarRunner calls it,
against a real live-session server on loopback (skipped unless livekit-agents is installed:
pip install -r integrations/livekit/requirements.txt)."""

import asyncio
import base64
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("livekit.agents")
from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import AudioSegmentEnd  # noqa: E402

from liveavatar_core.live.server import LiveEndpoint  # noqa: E402
from tests.test_audio_stream import speech  # noqa: E402
from tests.test_live_server import TOKEN, Server, picture  # noqa: E402
from tests.test_live_session import parts  # noqa: E402,F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "livekit"))
from liveavatar_livekit import LiveAvatarError, LiveAvatarVideoGenerator  # noqa: E402


def test_the_generator_turns_pushed_frames_into_video_and_the_same_audio(parts):  # noqa: F811
    model, _, _, audio_encoder, text_encoder = parts
    server = Server(LiveEndpoint(model, text_encoder, audio_encoder, token=TOKEN))
    x = (speech(1.3, 16000, seed=14) * 32767).astype(np.int16)

    async def run():
        gen = LiveAvatarVideoGenerator(server.url, TOKEN, image=base64.b64decode(picture()), prompt="a person",
                                       size="64*64", sample_rate=16000)
        await gen.start()
        assert (gen.width, gen.height, gen.fps) == (64, 64, 25)
        for i in range(0, x.size, 320):  # 20 ms frames, as LiveKit's audio output pushes them
            chunk = x[i:i + 320]
            await gen.push_audio(rtc.AudioFrame(chunk.tobytes(), 16000, 1, chunk.size))
        await gen.push_audio(AudioSegmentEnd())
        video, audio = [], []
        async for item in gen:
            if isinstance(item, AudioSegmentEnd):
                break
            (video if isinstance(item, rtc.VideoFrame) else audio).append(item)
        await gen.aclose()
        with pytest.raises(ValueError, match="16000 Hz mono"):
            await gen.push_audio(rtc.AudioFrame(b"\0\0" * 480, 48000, 1, 480))
        bad = LiveAvatarVideoGenerator(server.url, "wrong", image=base64.b64decode(picture()), prompt="x")
        with pytest.raises(LiveAvatarError, match="unauthorized"):
            await bad.start()
        await bad.aclose()
        return video, audio

    try:
        video, audio = asyncio.run(run())
    finally:
        server.stop()
    assert len(video) == 9 + 12 * (-(-x.size // 7680) - 1)
    assert all(v.width == 64 and v.height == 64 and v.type == rtc.VideoBufferType.RGB24 for v in video)
    played = np.concatenate([np.frombuffer(bytes(a.data), np.int16) for a in audio]).astype(np.int32)
    want = x[3 * 640:].astype(np.int32)  # the start drops 3 frames and their audio
    assert played.size == len(video) * 640 and np.abs(played[:want.size] - want).max() <= 1
