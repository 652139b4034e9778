"""A LiveKit Agents avatar backed by a Live Avatar live session.

`LiveAvatarVideoGenerator` is a `livekit.agents.voice.avatar.VideoGenerator`: it connects to a
live session's WebSocket (`python -m liveavatar_core serve`, or ComfyUI while a Live Avatar Live
Session node runs) in `raw` mode, forwards the agent's speech to it and hands back each block's
video frames and the exact audio that drove them, then `AudioSegmentEnd` when the utterance is
done. Run it in an `AvatarRunner` with a `QueueAudioOutput` at the generator's sample rate (see
README.md beside this file). Nothing here imports torch: the model runs in the server.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

import aiohttp
from livekit import rtc
from livekit.agents.voice.avatar import AudioSegmentEnd, VideoGenerator


class LiveAvatarError(RuntimeError):
    """An error message of the session (`code` as the protocol names it)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class LiveAvatarVideoGenerator(VideoGenerator):
    """Video of a Live Avatar session for a LiveKit avatar runner.

    url: the session endpoint (`ws://host:port/liveavatar/ws`); token: the server's token; image:
    the reference picture's PNG or JPEG bytes and prompt (both None under a ComfyUI node, which
    sets them); size, seed: as for the session; sample_rate: the rate of the pushed audio (16000,
    24000 or 48000, mono). Call `start()` first: it returns once the session is ready.
    """

    def __init__(self, url: str, token: str, *, image: bytes | None = None, prompt: str | None = None,
                 size: str = "704*384", seed: int = 420, sample_rate: int = 16000):
        self.url, self.token, self.image, self.prompt = url, token, image, prompt
        self.size, self.seed, self.sample_rate = size, seed, sample_rate
        self.width = self.height = self.fps = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def start(self) -> None:
        """Open the session; afterwards `width`, `height` and `fps` are known."""
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(self.url, max_msg_size=0)
        start = {"type": "session.start", "token": self.token, "size": self.size, "seed": self.seed,
                 "audio_rate": self.sample_rate, "video": "raw"}
        if self.image is not None:
            start["image"] = base64.b64encode(self.image).decode()
        if self.prompt is not None:
            start["prompt"] = self.prompt
        await self._ws.send_json(start)
        ready = await self._next_json()
        self.width, self.height, self.fps = ready["width"], ready["height"], ready["fps"]

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            await self._ws.send_json({"type": "audio.end"})
            return
        if frame.sample_rate != self.sample_rate or frame.num_channels != 1:
            raise ValueError(f"audio at {frame.sample_rate} Hz x {frame.num_channels}: the session takes "
                             f"{self.sample_rate} Hz mono (set the QueueAudioOutput's rate to it)")
        await self._ws.send_bytes(bytes(frame.data))

    def clear_buffer(self):
        return self._ws.send_json({"type": "audio.clear"})

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._stream()

    async def _stream(self):
        frame_bytes = self.width * self.height * 3
        while True:
            message = await self._next_json(allow_closed=True)
            if message is None or message["type"] == "session.closed":
                return
            if message["type"] == "segment.ended":
                yield AudioSegmentEnd()
                continue
            if message["type"] != "block":
                continue
            frames, pcm = await self._next_bytes(), await self._next_bytes()
            yield rtc.AudioFrame(pcm, self.sample_rate, 1, len(pcm) // 2)
            for i in range(message["frames"]):
                yield rtc.VideoFrame(self.width, self.height, rtc.VideoBufferType.RGB24,
                                     frames[i * frame_bytes:(i + 1) * frame_bytes])

    async def aclose(self) -> None:
        """End the session and the connection."""
        if self._ws is not None and not self._ws.closed:
            await self._ws.send_json({"type": "session.stop"})
            await self._ws.close()
        if self._http is not None:
            await self._http.close()

    async def _next_json(self, allow_closed: bool = False) -> dict | None:
        msg = await self._ws.receive()
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            if allow_closed:
                return None
            raise LiveAvatarError("closed", "the session closed")
        data = json.loads(msg.data)
        if data["type"] == "error":
            raise LiveAvatarError(data["code"], data["message"])
        return data

    async def _next_bytes(self) -> bytes:
        msg = await asyncio.wait_for(self._ws.receive(), 60)
        if msg.type != aiohttp.WSMsgType.BINARY:
            raise LiveAvatarError("protocol", f"expected a block's binary message, got {msg.type}")
        return msg.data
