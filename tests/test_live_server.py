"""The live session's WebSocket endpoint (issue 19) with a real aiohttp server on loopback and a
real websocket client: the tiny checkpoint on CPU, speech-like audio pushed in real-time-sized
chunks and in bursts, the fMP4 bytes decoded again with PyAV; clear, refusals, time-outs, busy."""

import asyncio
import base64
import io
import json
import threading

import av
import numpy as np
import pytest
from PIL import Image

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from liveavatar_core.live.mp4 import JpegBlocks  # noqa: E402
from liveavatar_core.live.server import PATH, LiveEndpoint  # noqa: E402
from tests.test_audio_stream import speech  # noqa: E402
from tests.test_live_session import parts  # noqa: E402,F401

RATE = 24000
TOKEN = "secret-token"


class Server:
    """An aiohttp app with the endpoint on 127.0.0.1, run on a thread of its own."""

    def __init__(self, endpoint: LiveEndpoint):
        self.endpoint, self.loop = endpoint, asyncio.new_event_loop()
        started = threading.Event()

        async def start():
            app = web.Application()
            endpoint.add_routes(app)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"ws://127.0.0.1:{self.runner.addresses[0][1]}{PATH}"
            started.set()

        threading.Thread(target=lambda: (self.loop.run_until_complete(start()), self.loop.run_forever()),
                         daemon=True).start()
        assert started.wait(30)

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def server(parts):  # noqa: F811
    model, _, _, audio_encoder, text_encoder = parts
    s = Server(LiveEndpoint(model, text_encoder, audio_encoder, token=TOKEN, idle_s=5.0))
    yield s
    s.stop()


def picture(shape=(96, 64)) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*shape, 3), np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def start_message(**kw) -> dict:
    return {"type": "session.start", "token": TOKEN, "image": picture(), "prompt": "a person talking",
            "size": "64*64", "seed": 5, "audio_rate": RATE, "video": "fmp4", "lookahead_ms": 300, **kw}


async def talk(url, actions, headers=None, max_msg_size=0):
    """Connect, run `actions(ws, inbox)` and collect every message until the server closes."""
    inbox = {"json": [], "bytes": []}
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, headers=headers, max_msg_size=max_msg_size) as ws:
            async def read():
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        inbox["json"].append(json.loads(msg.data))
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        inbox["bytes"].append(msg.data)
            reader = asyncio.ensure_future(read())
            await actions(ws, inbox)
            await asyncio.wait_for(reader, 120)
            inbox["close_code"] = ws.close_code
    return inbox


async def until(inbox, predicate, timeout=60.0):
    for _ in range(int(timeout / 0.05)):
        if predicate(inbox):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(inbox["json"])


def types(inbox) -> list[str]:
    return [m["type"] for m in inbox["json"]]


def decode(chunks: list[bytes]):
    """Video frames and mono float audio of concatenated fMP4 bytes."""
    with av.open(io.BytesIO(b"".join(chunks))) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(io.BytesIO(b"".join(chunks))) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return frames, audio


@pytest.mark.parametrize("chunk_s", [0.02, None], ids=["real-time", "burst"])
def test_a_session_streams_playable_fragments_with_the_pushed_audio(server, chunk_s):
    x = speech(1.5, RATE, seed=7)

    async def actions(ws, inbox):
        await ws.send_json(start_message())
        await until(inbox, lambda i: "session.ready" in types(i))
        step = x.size if chunk_s is None else int(chunk_s * RATE)
        for i in range(0, x.size, step):
            await ws.send_bytes((x[i:i + step] * 32767).astype(np.int16).tobytes())
            if chunk_s:
                await asyncio.sleep(chunk_s)
        await ws.send_json({"type": "audio.end"})
        await until(inbox, lambda i: "segment.ended" in types(i))
        await ws.send_json({"type": "session.stop"})

    inbox = asyncio.run(talk(server.url, actions))
    kinds = types(inbox)
    assert kinds[0] == "session.ready" and kinds[-1] == "session.closed" and "error" not in kinds
    ready = inbox["json"][0]
    assert (ready["width"], ready["height"], ready["fps"], ready["block_frames"]) == (64, 64, 25, 12)
    blocks = [m for m in inbox["json"] if m["type"] == "block"]
    n = -(-x.size // (12 * RATE // 25))
    assert len(blocks) == n and [b["frames"] for b in blocks] == [9] + [12] * (n - 1)
    assert all(b["generation_ms"] > 0 and b["rtf"] > 0 and b["latency_ms"] >= 0 and b["credit_s"] > 0 for b in blocks)
    ended = next(m for m in inbox["json"] if m["type"] == "segment.ended")
    assert ended == {"type": "segment.ended", "segment": 0, "interrupted": False,
                     "position_s": sum(b["frames"] for b in blocks) / 25}
    assert inbox["bytes"][0][4:8] == b"ftyp"  # the init segment first, then one fragment per block
    assert len(inbox["bytes"]) >= 1 + n and all(b[4:8] == b"moof" for b in inbox["bytes"][1:])
    frames, audio = decode(inbox["bytes"])
    assert len(frames) == sum(b["frames"] for b in blocks) and frames[0].shape == (64, 64, 3)
    # The audio is the pushed audio from the fourth frame on (the start drops 3 frames), through AAC.
    pushed = x[3 * RATE // 25:]
    assert abs(audio.size - len(frames) * RATE // 25) <= 1024
    m = min(audio.size, pushed.size)
    assert np.corrcoef(audio[1024:m - 1024], pushed[1024:m - 1024])[0, 1] > 0.9


def frame_mode_session(url, mode: str, x: np.ndarray) -> tuple[np.ndarray, bytes]:
    """The frames and PCM of a session in `raw` or `jpeg` mode fed `x`, checked message by message."""
    async def actions(ws, inbox):
        await ws.send_json(start_message(video=mode))
        await ws.send_bytes(x.tobytes())
        await ws.send_json({"type": "audio.end"})
        await until(inbox, lambda i: "segment.ended" in types(i))
        await ws.send_json({"type": "session.stop"})

    inbox = asyncio.run(talk(url, actions))
    blocks = [m for m in inbox["json"] if m["type"] == "block"]
    messages = iter(inbox["bytes"])
    frames, pcm = [], []
    for b in blocks:
        if mode == "raw":
            data = next(messages)
            assert len(data) == b["frames"] * 64 * 64 * 3
            frames.append(np.frombuffer(data, np.uint8).reshape(-1, 64, 64, 3))
        else:
            frames.append(np.stack([np.asarray(Image.open(io.BytesIO(next(messages)))) for _ in range(b["frames"])]))
        pcm.append(next(messages))
        assert len(pcm[-1]) == b["frames"] * (RATE // 25) * 2
    assert next(messages, None) is None and len(blocks) > 1
    return np.concatenate(frames), b"".join(pcm)


def test_frame_modes_send_each_blocks_frames_and_exact_pcm(server):
    """The adapters' modes: per block its frames (RGB24 bytes, or one JPEG each) and the s16le PCM
    that drove them; the same seed and audio give the same frames in both, JPEG's up to its loss."""
    x = (speech(1.2, RATE, seed=13) * 32767).astype(np.int16)
    raw, pcm = frame_mode_session(server.url, "raw", x)
    played = np.frombuffer(pcm, "<i2").astype(np.int32)
    want = x[3 * RATE // 25:].astype(np.int32)  # the start drops 3 frames and their audio
    assert np.abs(played[:want.size] - want).max() <= 1 and not played[want.size:].any()
    jpeg, jpeg_pcm = frame_mode_session(server.url, "jpeg", x)
    assert jpeg_pcm == pcm and jpeg.shape == raw.shape
    assert not np.array_equal(jpeg, raw)
    assert np.array_equal(jpeg, np.stack([jpeg_roundtrip(f, JpegBlocks().quality) for f in raw]))


def jpeg_roundtrip(frame: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf))


def test_health_of_each_block_is_in_its_stats_and_stop_ends_the_session(server):
    """The noise the tiny model makes is off the picture's colours from the first block: warn
    reports the alarm in every block's stats, stop ends the session after that block."""
    x = (speech(1.2, RATE, seed=3) * 32767).astype(np.int16)

    def session(health):
        async def actions(ws, inbox):
            await ws.send_json(start_message(health=health))
            await ws.send_bytes(x.tobytes())
            await ws.send_json({"type": "audio.end"})
            await until(inbox, lambda i: "segment.ended" in types(i) or "error" in types(i))
            if "error" not in types(inbox):
                await ws.send_json({"type": "session.stop"})
        return asyncio.run(talk(server.url, actions))

    warn = [m for m in session("warn")["json"] if m["type"] == "block"]
    assert len(warn) > 1 and all("colour_frame" in b["health"]["active"] for b in warn)
    assert [a["name"] for a in warn[0]["health"]["alarms"] if a["state"] == "raised"][0] == "colour_frame"
    assert all("health" not in b for b in session("off")["json"] if b["type"] == "block")
    stopped = session("stop")["json"]
    assert [m["type"] for m in stopped][-2:] == ["block", "error"]
    assert stopped[-1]["code"] == "health" and stopped[-1]["fatal"] and "after block 0" in stopped[-1]["message"]


def test_clear_interrupts_the_segment_and_the_session_goes_on(server):
    async def actions(ws, inbox):
        await ws.send_json(start_message())
        await ws.send_bytes((speech(4.0, RATE, seed=8) * 32767).astype(np.int16).tobytes())
        await until(inbox, lambda i: "block" in types(i))
        await ws.send_json({"type": "audio.clear"})
        await until(inbox, lambda i: "segment.ended" in types(i))
        await ws.send_bytes((speech(0.6, RATE, seed=9) * 32767).astype(np.int16).tobytes())
        await ws.send_json({"type": "audio.end"})
        await until(inbox, lambda i: types(i).count("segment.ended") == 2)
        await ws.send_json({"type": "session.stop"})

    inbox = asyncio.run(talk(server.url, actions))
    ended = [m for m in inbox["json"] if m["type"] == "segment.ended"]
    assert ended[0]["segment"] == 0 and ended[0]["interrupted"] and not ended[1]["interrupted"]
    assert types(inbox)[-1] == "session.closed"
    assert len(decode(inbox["bytes"])[0]) == sum(m["frames"] for m in inbox["json"] if m["type"] == "block")


def test_refusals_time_outs_and_busy(server):
    async def expect_error(code, message=None, **start):
        async def actions(ws, inbox):
            await ws.send_json(message or start_message(**start))
        inbox = await talk(server.url, actions)
        assert inbox["json"][-1]["type"] == "error" and inbox["json"][-1]["code"] == code, inbox["json"]
        return inbox

    async def scenario():
        await expect_error("unauthorized", token="wrong")
        await expect_error("protocol", message={"type": "audio.end"})
        await expect_error("bad_request", image=base64.b64encode(b"GIF89a not a picture").decode())
        await expect_error("bad_request", audio_rate=44100)
        await expect_error("bad_request", video="webm")
        # A page on another site may not open a session.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await talk(server.url, lambda ws, inbox: asyncio.sleep(0), headers={"Origin": "http://evil.example"})
        assert refused.value.status == 403
        same_site = {"Origin": server.url.replace("ws://", "http://").split(PATH)[0]}

        # Oversized messages: an audio message past its cap, any message past the frame limit.
        async def big_audio(ws, inbox):
            await ws.send_json(start_message())
            await until(inbox, lambda i: "session.ready" in types(i))
            await ws.send_bytes(b"\0" * (2 << 20))
        inbox = await talk(server.url, big_audio, headers=same_site)
        assert inbox["json"][-1]["code"] == "too_large"

        async def huge(ws, inbox):
            await ws.send_bytes(b"\0" * (17 << 20))
        try:  # refused with 1009, or the connection dropped while the client was still sending
            assert (await talk(server.url, huge))["close_code"] == 1009
        except (ConnectionError, aiohttp.ClientError):
            pass
        # Idle time-out (5 s in this server), and a second client while a session runs.
        async def idle_and_busy(ws, inbox):
            await ws.send_json(start_message())
            await until(inbox, lambda i: "session.ready" in types(i))
            second = await expect_error("busy")
            assert "one runs at a time" in second["json"][-1]["message"]
        inbox = await talk(server.url, idle_and_busy)
        assert inbox["json"][-1]["code"] == "timeout" and inbox["json"][-1]["fatal"]

    asyncio.run(scenario())


def test_serve_command_prints_its_url_and_token_and_serves(tmp_path):
    """`python -m liveavatar_core serve` for users without ComfyUI: the tiny checkpoint on CPU."""
    import os
    import re
    import signal
    import subprocess
    import sys

    from liveavatar_core.synthetic import write_tiny_checkpoint

    tiny = write_tiny_checkpoint(tmp_path / "tiny", audio_seconds=1.0)
    proc = subprocess.Popen([sys.executable, "-m", "liveavatar_core", "serve", "--ckpt_dir", str(tiny.ckpt_dir),
                             "--lora_path_dmd", str(tiny.lora), "--device", "cpu", "--precision", "fp32",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stdout:
            found = re.match(r"serving live sessions at (ws://127\.0\.0\.1:\d+/liveavatar/ws) \(token (\S+)\)", line)
            if found:
                break
        else:
            raise AssertionError("serve printed no URL")
        url, token = found.groups()
        assert len(token) >= 24  # a random one when --token is not given

        async def actions(ws, inbox):
            await ws.send_json(start_message(token=token))
            await ws.send_bytes((speech(0.6, RATE, seed=10) * 32767).astype(np.int16).tobytes())
            await ws.send_json({"type": "audio.end"})
            await until(inbox, lambda i: "segment.ended" in types(i))
            await ws.send_json({"type": "session.stop"})
        inbox = asyncio.run(talk(url, actions))
        assert types(inbox)[0] == "session.ready" and types(inbox)[-1] == "session.closed"
        assert len(decode(inbox["bytes"])[0]) == sum(m["frames"] for m in inbox["json"] if m["type"] == "block") > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_the_readme_client_writes_a_playable_video(server, tmp_path):
    """The minimal client of README "Live sessions", run as a user would, against a real server."""
    import re
    import subprocess
    import sys
    import wave
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"A minimal client.*?```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "client.py").write_text(code)
    wav, png, out = tmp_path / "speech.wav", tmp_path / "face.png", tmp_path / "out.mp4"
    x = speech(1.2, 16000, seed=11)
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((x * 32767).astype(np.int16).tobytes())
    png.write_bytes(base64.b64decode(picture()))
    subprocess.run([sys.executable, str(tmp_path / "client.py"), server.url, TOKEN, str(png), str(wav), str(out),
                    "64*64"], check=True, timeout=120)
    frames, audio = decode([out.read_bytes()])
    assert len(frames) == 9 + 12 * (-(-x.size // 7680) - 1) and audio.size > 0.9 * x.size


def test_a_session_ends_at_its_time_limit(parts):  # noqa: F811
    model, _, _, audio_encoder, text_encoder = parts
    server = Server(LiveEndpoint(model, text_encoder, audio_encoder, token=TOKEN, max_session_s=3.0))

    async def actions(ws, inbox):
        await ws.send_json(start_message())
        while not ws.closed:  # a client that keeps talking: the idle time-out never comes
            await ws.send_json({"type": "ping"})
            await asyncio.sleep(0.5)

    try:
        inbox = asyncio.run(talk(server.url, actions))
    finally:
        server.stop()
    assert inbox["json"][-1] == {"type": "error", "code": "timeout", "message": "session time-out", "fatal": True}
    assert "pong" in types(inbox)


class RawClient:
    """A websocket client on a plain socket with a small receive buffer, which reads only when
    asked (aiohttp's client keeps reading into memory, so it is never a slow reader)."""

    def __init__(self, url: str):
        import os
        import socket
        from urllib.parse import urlsplit

        u = urlsplit(url)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        self.sock.connect((u.hostname, u.port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          .encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def send(self, data, binary: bool = False, opcode: int | None = None) -> None:
        import os
        import struct

        payload = data if binary or opcode is not None else json.dumps(data).encode()
        n = len(payload)
        head = bytes([0x80 | (opcode if opcode is not None else 2 if binary else 1)])
        head += bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536
                                                   else bytes([0x80 | 127]) + struct.pack(">Q", n))
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 65536 else \
            (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
        self.sock.sendall(head + mask + masked)

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def receive(self):
        """(opcode, payload) of the next frame (the server sends unfragmented, unmasked frames)."""
        import struct

        b0, b1 = self._take(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self._take(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._take(8))[0]
        return b0 & 0x0F, self._take(n)


def test_a_reader_that_falls_behind_loses_whole_fragments_and_is_told(parts):  # noqa: F811
    """A client that stops reading for a while: the server's sends wait on the full socket, later
    blocks pile up, and the oldest whole fragments are dropped (counted), never a part of one."""
    import time as clock

    x = (speech(5.0, RATE, seed=15) * 32767).astype(np.int16)
    model, _, _, audio_encoder, text_encoder = parts
    # One block may wait: the blocks made while the reader stalls pass that at once.
    server = Server(LiveEndpoint(model, text_encoder, audio_encoder, token=TOKEN, max_behind=1))
    try:
        client = RawClient(server.url)
        client.send(start_message(size="256*256", video="raw", image=picture((256, 256))))
        client.send(x.tobytes(), binary=True)
        client.send({"type": "audio.end"})
        clock.sleep(15)  # not reading: the socket buffers fill up and the server's sends wait
        messages, binaries = [], []
        while True:
            opcode, payload = client.receive()
            if opcode == 9:  # the server's heartbeat
                client.send(payload, opcode=10)
                continue
            if opcode == 2:
                binaries.append(payload)
                continue
            if opcode == 8:
                break
            messages.append(json.loads(payload))
            if messages[-1]["type"] == "segment.ended":
                client.send({"type": "session.stop"})
            if messages[-1]["type"] == "session.closed":
                break
    finally:
        server.stop()
    ready, closed = messages[0], messages[-1]
    assert (ready["width"], ready["height"]) == (256, 256)
    assert closed["type"] == "session.closed" and closed["dropped_fragments"] > 0, closed
    blocks = [m for m in messages if m["type"] == "block"]
    assert len(blocks) + closed["dropped_fragments"] == -(-x.size // (12 * RATE // 25))
    told = [b["dropped_fragments"] for b in blocks]  # every block's stats count the drops so far
    assert told == sorted(told) and told[-1] <= closed["dropped_fragments"]
    assert len(binaries) == 2 * len(blocks)  # every block that was sent came whole: frames and audio
    assert all(len(f) == b["frames"] * 256 * 256 * 3 for f, b in zip(binaries[0::2], blocks))
