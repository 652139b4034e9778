"""The live session over a WebSocket: `/liveavatar/ws` (README "Live sessions" has the protocol).

`LiveEndpoint` holds what sessions need (the loaded model, the text and audio encoders, the token)
and serves one session at a time; `add_routes` puts it on an aiohttp application, ComfyUI's own
server or the standalone one of `python -m liveavatar_core serve` (`run_server`).

Text frames carry JSON messages, each with a `type`; binary frames from the client are s16le mono
PCM at the session's `audio_rate`, binary frames to it are MP4 bytes: the init segment, then one
fragment per block, so their concatenation is a playable file. A session refuses a wrong token,
a cross-site Origin, an oversized message, a second client (`busy`) and silence past the idle
time-out; nothing a client sends names a path on this machine.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import secrets
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from ..config import FRAMES_PER_BLOCK
from ..encoders.image import DEFAULT_SIZE
from ..errors import InputError
from ..health import DEFAULT_HEALTH, HealthMonitor, HealthRecord, check_health
from ..pipeline import GenerationSettings
from .audio import DEFAULT_LOOKAHEAD_S, DEFAULT_MAX_BUFFER_S
from .mp4 import JpegBlocks, LiveMP4, RawBlocks
from .session import LiveBlock, LiveSession, SegmentEnded

log = logging.getLogger("liveavatar")

PATH = "/liveavatar/ws"
PAGE_PATH = "/liveavatar/live"  # a browser page for sessions (live/page.html)
MAX_MESSAGE_BYTES = 16 << 20  # session.start carries the picture; aiohttp refuses larger frames (1009)
MAX_AUDIO_BYTES = 1 << 20  # one binary message: 10 s of 48 kHz PCM
MAX_BEHIND = 4  # blocks waiting for a slow reader; more, and it loses whole fragments, oldest first
START_TIMEOUT_S = 60.0
IDLE_TIMEOUT_S = 300.0
# fmp4: MP4 bytes (the init segment, then a fragment per block); raw: per block its RGB24 frames
# and its s16le PCM, for adapters on the same machine (about 20 MB/s at 704x384); jpeg: per block
# one JPEG per frame, then its PCM.
VIDEO_MODES = ("fmp4", "raw", "jpeg")
_CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)


class LiveEndpoint:
    """Sessions on one loaded model (see the module docstring).

    model: a `LiveAvatarModel`; text_encoder / audio_encoder: `TextEncoder` / `AudioEncoder`
    (text_encoder None: every session uses `text`); token: what `session.start` must carry
    (default: a new random one); text / image / size / seed: what a session uses when its
    `session.start` gives none (a ComfyUI graph sets them); origins: extra allowed `Origin`
    values besides the server's own host; idle_s / max_session_s: time-outs; max_behind: blocks
    that may wait for a slow reader before the oldest are dropped; health: the health checks of a
    session whose `session.start` names none (`health.HEALTH_MODES`).
    """

    def __init__(self, model, text_encoder, audio_encoder, token: str | None = None, origins=(),
                 idle_s: float = IDLE_TIMEOUT_S, max_session_s: float | None = None,
                 max_buffer_s: float = DEFAULT_MAX_BUFFER_S, text=None, image=None, size: str = DEFAULT_SIZE,
                 seed: int = GenerationSettings.seed, max_behind: int = MAX_BEHIND, health: str = DEFAULT_HEALTH):
        self.model, self.text_encoder, self.audio_encoder = model, text_encoder, audio_encoder
        self.token = token or secrets.token_urlsafe(24)
        self.origins, self.idle_s, self.max_session_s, self.max_buffer_s = set(origins), idle_s, max_session_s, \
            max_buffer_s
        self.text, self.image, self.size, self.seed, self.max_behind = text, image, size, seed, max_behind
        self.health = check_health(health)
        self.sessions = 0  # sessions served so far
        self._busy = threading.Lock()
        self._active: _Connection | None = None

    def stop(self) -> None:
        """End the running session, if any (from any thread): it is told `stopped` and closed."""
        active = self._active
        if active is not None:
            active.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(active.stop()))

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(PATH, self.handle)
        app.router.add_get(PAGE_PATH, page)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, heartbeat=30.0)
        if not self._origin_allowed(request):
            raise web.HTTPForbidden(text="cross-site Origin refused")
        await ws.prepare(request)
        if not self._busy.acquire(blocking=False):
            await _fail(ws, "busy", "a live session is running on this model; one runs at a time.")
            return ws
        try:
            self._active = _Connection(self, ws)
            self.sessions += 1
            await self._active.run()
        finally:
            self._active = None
            self._busy.release()
        return ws

    def _origin_allowed(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:  # not a browser page: the token decides
            return True
        return urlsplit(origin).netloc == request.host or origin in self.origins


class _Connection:
    """One client's session: the protocol on the event loop, generation on the session's thread."""

    def __init__(self, endpoint: LiveEndpoint, ws: web.WebSocketResponse):
        self.endpoint, self.ws = endpoint, ws
        self.loop = asyncio.get_running_loop()
        self.session: LiveSession | None = None
        self.events: asyncio.Queue = asyncio.Queue()
        self.dropped = 0
        self.health: HealthMonitor | None = None

    async def run(self) -> None:
        started = time.monotonic()
        try:
            first = await self.ws.receive(timeout=START_TIMEOUT_S)
        except asyncio.TimeoutError:
            await _fail(self.ws, "timeout", f"no session.start within {START_TIMEOUT_S:g} s.")
            return
        if first.type in _CLOSED:  # gone, or refused by aiohttp (a frame over MAX_MESSAGE_BYTES: 1009)
            return
        start = _json(first)
        if start is None or start.get("type") != "session.start":
            await _fail(self.ws, "protocol", "the first message must be a session.start text message.")
            return
        if not hmac.compare_digest(str(start.get("token", "")).encode(), self.endpoint.token.encode()):
            await _fail(self.ws, "unauthorized", "wrong or missing token.")
            return
        try:
            self.session, mp4 = await self.loop.run_in_executor(None, self._start, start)
        except InputError as exc:
            await _fail(self.ws, "bad_request", str(exc))
            return
        s = self.session
        await self.ws.send_json({"type": "session.ready", "width": s.width, "height": s.height, "fps": s.fps,
                                 "block_frames": FRAMES_PER_BLOCK, "audio_rate": s.rate, "mime": mp4.mime,
                                 "ready_ms": round(s.ready_s * 1000)})
        if mp4.init:
            await self.ws.send_bytes(mp4.init)
        threading.Thread(target=self._pump, daemon=True).start()
        sender = asyncio.ensure_future(self._send(mp4))
        try:
            await self._receive(started)
        finally:
            if self.ws.closed:  # the client has gone: nothing more to make
                s.clear()
            s.close()
            await sender
        if not self.ws.closed:
            await self.ws.send_json({"type": "session.closed", "dropped_fragments": self.dropped})
            await self.ws.close()

    async def stop(self) -> None:
        await self._error("stopped", "the session was ended on the server.", True)

    def _start(self, start: dict):
        """session.start -> (LiveSession, its video messages): the picture and prompt are encoded here."""
        video = start.get("video", "fmp4")
        if video not in VIDEO_MODES:
            raise InputError("video", f"{video!r} is not available.", f"use one of {', '.join(VIDEO_MODES)}.")
        ep = self.endpoint
        image = _picture(start["image"]) if "image" in start else ep.image
        if image is None:
            raise InputError("image", "session.start has no picture.", "send the picture's bytes in base64.")
        if "prompt" in start and ep.text_encoder is None:
            raise InputError("prompt", "this server's prompt is set where it was started (the ComfyUI graph).",
                             "leave the prompt out of session.start.")
        text = ep.text if "prompt" not in start else ep.text_encoder.encode(str(start["prompt"]))
        if text is None:
            raise InputError("prompt", "session.start has no prompt.", "send the prompt.")
        settings = GenerationSettings(size=str(start.get("size", ep.size)), seed=_int(start, "seed", ep.seed))
        health = check_health(start.get("health", ep.health))
        lookahead = _int(start, "lookahead_ms", round(DEFAULT_LOOKAHEAD_S * 1000)) / 1000
        session = LiveSession(ep.model, text.to(ep.model.dit.device), image, ep.audio_encoder, settings,
                              audio_rate=_int(start, "audio_rate", 16000), lookahead_s=lookahead,
                              max_buffer_s=ep.max_buffer_s, idle=str(start.get("idle", "hold")))
        if health != "off":
            self.health = HealthMonitor(session.picture, session.fps, health)
        if video == "fmp4":
            return session, LiveMP4(session.width, session.height, session.fps, session.rate)
        return session, RawBlocks() if video == "raw" else JpegBlocks()

    async def _receive(self, started: float) -> None:
        ep, s = self.endpoint, self.session
        while True:
            timeout = ep.idle_s
            if ep.max_session_s is not None:
                timeout = min(timeout, max(0.0, ep.max_session_s - (time.monotonic() - started)))
            try:
                msg = await self.ws.receive(timeout=timeout)
            except asyncio.TimeoutError:
                await self._error("timeout", "idle time-out" if timeout == ep.idle_s else "session time-out", True)
                return
            if msg.type == WSMsgType.BINARY:
                if len(msg.data) > MAX_AUDIO_BYTES:
                    await self._error("too_large", f"audio messages are at most {MAX_AUDIO_BYTES} bytes.", True)
                    return
                try:
                    s.push_audio(msg.data)
                except InputError as exc:
                    await self._error("buffer_full" if "would wait" in exc.problem else "bad_audio", str(exc), False)
                continue
            if msg.type in _CLOSED:
                return
            data = _json(msg)
            if data is None:
                await self._error("protocol", "text messages are JSON objects with a type.", False)
                continue
            kind = data.get("type")
            if kind == "audio.end":
                s.end_segment()
            elif kind == "audio.clear":
                s.clear()
            elif kind == "session.stop":
                return
            elif kind == "ping":
                await self.ws.send_json({"type": "pong"})
            else:
                await self._error("protocol", f"unknown message type {kind!r}.", False)

    def _pump(self) -> None:
        """The session's events onto the event loop (the session's own thread makes them)."""
        try:
            for event in self.session:
                self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except BaseException as exc:  # the iterating side reports it
            self.loop.call_soon_threadsafe(self.events.put_nowait, exc)
        self.loop.call_soon_threadsafe(self.events.put_nowait, None)

    async def _send(self, mp4: LiveMP4 | RawBlocks) -> None:
        while (event := await self.events.get()) is not None:
            if self.ws.closed:
                continue
            if isinstance(event, BaseException):
                await self._error("internal", f"{type(event).__name__}: {event}", True)
                continue
            if isinstance(event, SegmentEnded):
                await self.ws.send_json({"type": "segment.ended", "segment": event.segment,
                                         "interrupted": event.interrupted, "position_s": event.position_s})
                continue
            messages, health = await self.loop.run_in_executor(None, self._encode, mp4, event)
            if self.events.qsize() >= self.endpoint.max_behind:
                # A slow reader (sends wait for it): this, the oldest fragment in hand, is dropped;
                # the ones after it still play, the stats say how many were lost.
                self.dropped += 1
                continue
            await self.ws.send_json(_stats(event, self.session, self.dropped, health))
            for data in messages:
                await self.ws.send_bytes(data)
            if health is not None and health.should_stop:
                self.session.clear()
                await self._error("health", f"a health alarm ended the session after block {health.block}: "
                                  f"{', '.join(health.active)}.", True)
        if not self.ws.closed:
            for data in mp4.close():
                await self.ws.send_bytes(data)

    def _encode(self, mp4: LiveMP4 | RawBlocks, block: LiveBlock) -> tuple[list[bytes], HealthRecord | None]:
        """A block's video messages and its health record (on an executor thread)."""
        record = None if self.health is None else self.health.observe(block.frames, block.audio, self.session.rate)
        return mp4.block(block.frames, block.audio), record

    async def _error(self, code: str, message: str, fatal: bool) -> None:
        if fatal:
            await _fail(self.ws, code, message)
        elif not self.ws.closed:
            await self.ws.send_json({"type": "error", "code": code, "message": message, "fatal": False})


def _picture(data):
    """A base64 PNG or JPEG as an RGB PIL image."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(base64.b64decode(str(data), validate=True)))
        image.load()
    except (binascii.Error, OSError, ValueError):
        image = None
    if image is None or image.format not in ("PNG", "JPEG"):
        raise InputError("image", "not a base64 PNG or JPEG picture.", "send the picture's bytes in base64.")
    return image.convert("RGB")


def _stats(block: LiveBlock, session: LiveSession, dropped: int, health: HealthRecord | None) -> dict:
    credit = max(0.0, session.audio.max_buffer_s - block.queued_s)
    stats = {"type": "block", "segment": block.segment, "index": block.index, "frame0": block.frame0,
             "frames": len(block.frames), "generation_ms": round(block.generate_s * 1000, 1),
             "decode_ms": round(block.decode_s * 1000, 1), "latency_ms": round(block.latency_s * 1000, 1),
             "queue_s": round(block.queued_s, 3), "credit_s": round(credit, 3), "rtf": round(block.rtf, 3),
             "dropped_fragments": dropped}
    if health is not None:
        stats["health"] = {"active": health.active, "alarms": [a.to_json() for a in health.alarms]}
    return stats


def _json(msg) -> dict | None:
    if msg.type != WSMsgType.TEXT:
        return None
    try:
        data = json.loads(msg.data)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _int(data: dict, key: str, default: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(key, f"{value!r} is not a whole number.", f"send an integer {key}.")
    return value


async def _fail(ws: web.WebSocketResponse, code: str, message: str) -> None:
    if not ws.closed:
        await ws.send_json({"type": "error", "code": code, "message": message, "fatal": True})
        await ws.close()


async def page(_request: web.Request) -> web.Response:
    """The live page: pick a picture and a prompt, then speak or drop an audio file."""
    return web.Response(text=(Path(__file__).parent / "page.html").read_text(), content_type="text/html")


def run_server(endpoint: LiveEndpoint, host: str = "127.0.0.1", port: int = 8189, on_ready=None) -> None:
    """Serve `endpoint` until interrupted; `on_ready(url)` is called once it listens."""
    app = web.Application()
    endpoint.add_routes(app)

    async def main():
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        url = f"ws://{host}:{bound}{PATH}"
        if on_ready is not None:
            on_ready(url)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
