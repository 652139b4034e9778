"""The live page (/liveavatar/live) in a headless Chromium against a real server on loopback: a
session starts from the page, an audio file goes out at its own pace, and the video element plays
the fragments as they come (skipped without a Chromium binary)."""

import asyncio
import base64
import io
import time
import wave

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp")

from liveavatar_core.live.server import PAGE_PATH, LiveEndpoint  # noqa: E402
from tests.test_audio_stream import speech  # noqa: E402
from tests.test_comfyui_browser import CHROMIUM, Page, browser  # noqa: E402,F401
from tests.test_live_server import TOKEN, Server, picture  # noqa: E402
from tests.test_live_session import parts  # noqa: E402,F401

pytestmark = pytest.mark.skipif(not CHROMIUM, reason="no Chromium binary (set CHROMIUM)")


def wav_base64(seconds: float) -> str:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((speech(seconds, 16000, seed=12) * 32767).astype(np.int16).tobytes())
    return base64.b64encode(buf.getvalue()).decode()


def test_the_page_plays_the_video_as_it_is_made(parts, browser):  # noqa: F811
    model, _, _, audio_encoder, text_encoder = parts
    server = Server(LiveEndpoint(model, text_encoder, audio_encoder, token=TOKEN))
    page_url = server.url.replace("ws://", "http://").replace("/liveavatar/ws", PAGE_PATH) + f"?token={TOKEN}"

    async def drive():
        async with aiohttp.ClientSession() as session:
            async with session.put(f"{browser}/json/new?{page_url}") as response:
                target = await response.json()
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Runtime.enable")
                await page.until("window.liveAvatar !== undefined", 30, "the page script")
                assert await page.eval("document.getElementById('token').value") == TOKEN  # from the URL
                await page.eval(f"liveAvatar.start({{image: '{picture()}', prompt: 'a person', size: '64*64'}})")
                await page.until("liveAvatar.buffer !== null", 60, "session.ready and the MediaSource")
                audio = wav_base64(2.0)
                await page.eval(f"liveAvatar.sendAudioFile(Uint8Array.from(atob('{audio}'), c => c.charCodeAt(0))"
                                ".buffer)")
                t0 = time.monotonic()
                played = await page.until("document.getElementById('video').currentTime > 0.5 && "
                                          "document.getElementById('video').currentTime", 120, "the video to play")
                blocks = await page.eval("liveAvatar.blocks")
                errors = await page.eval("liveAvatar.errors")
                await page.eval("document.getElementById('stop').click()")
                await page.until("liveAvatar.ws.readyState === 3", 60, "session.closed")
                return played, blocks, errors, time.monotonic() - t0, page.console

    try:
        played, blocks, errors, waited, console = asyncio.run(drive())
    finally:
        server.stop()
    assert played > 0.5 and blocks >= 2 and errors == [] and console == [], (played, blocks, errors, console)
