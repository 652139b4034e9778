"""Latency and real-time factor of a live session over its WebSocket, on one GPU, random weights.

The product path end to end on loopback: `LiveEndpoint` on an aiohttp server, a client pushing
speech-like PCM in 20 ms chunks at real-time pace, the fMP4 fragments back. Random full-size
weights (14B DiT, Wan VAE, and a wav2vec2-large-shaped encoder written with transformers), the
prompt a random embedding, 704x384. One warm-up session (compilation), then a timed one.

Printed per precision: the time from the first audio chunk sent to the first fragment received
(with the look-ahead the session waits for), the steady real-time factor (generation + decode
over the 0.48 s a block plays), the block period and FPS, and the wall time from the end of the
audio to the last fragment.

Usage: python bench/live_bench.py [--precisions fp8,bf16] [--seconds 8] [--lookahead_ms 500] [--compile on]
       python bench/live_bench.py --tiny --precisions fp32 --compile off   # smoke run on the CPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.run_bench import build_dit, build_vae  # noqa: E402
from liveavatar_core.config import DiTConfig  # noqa: E402
from liveavatar_core.loading import assemble  # noqa: E402
from liveavatar_core.plan import detect_devices, plan_run  # noqa: E402
from liveavatar_core.synthetic_inputs import make_speech_audio  # noqa: E402

RATE = 16000
CHUNK = RATE // 50


def wav2vec2_large(folder: Path) -> Path:
    """A random encoder with wav2vec2-large-xlsr-53's shapes (its cost per window is the real one)."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    config = Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                            conv_dim=(512,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True,
                            vocab_size=32, feat_proj_dropout=0.0, hidden_dropout=0.0, attention_dropout=0.0)
    Wav2Vec2ForCTC(config).save_pretrained(folder, safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True, "sampling_rate": 16000}))
    return folder


class _Text:
    """The prompt's umT5 embedding, random (the encoder is not what is measured)."""

    def __init__(self, dim: int):
        self.dim = dim

    def encode(self, _prompt: str) -> torch.Tensor:
        return torch.randn(30, self.dim, generator=torch.Generator().manual_seed(1))


def serve(endpoint):
    from aiohttp import web

    loop, ready = asyncio.new_event_loop(), threading.Event()
    box = {}

    async def start():
        app = web.Application()
        endpoint.add_routes(app)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        box["url"] = f"ws://127.0.0.1:{runner.addresses[0][1]}/liveavatar/ws"
        ready.set()

    threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True).start()
    ready.wait(60)
    return box["url"]


async def session(url: str, token: str, pcm: np.ndarray, lookahead_ms: int, size: str) -> dict:
    import aiohttp

    blocks, arrivals = [], []
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
        png = tempfile.mktemp(suffix=".png")
        from PIL import Image

        Image.fromarray(np.random.default_rng(0).integers(0, 255, (768, 448, 3), np.uint8)).save(png)
        import base64

        await ws.send_json({"type": "session.start", "token": token, "prompt": "x", "size": size, "seed": 1,
                            "image": base64.b64encode(Path(png).read_bytes()).decode(), "audio_rate": RATE,
                            "lookahead_ms": lookahead_ms})
        ready = json.loads((await ws.receive()).data)
        assert ready["type"] == "session.ready", ready

        async def push():
            t0 = time.perf_counter()
            for i in range(0, pcm.size, CHUNK):
                await ws.send_bytes(pcm[i:i + CHUNK].tobytes())
                await asyncio.sleep(max(0.0, t0 + (i + CHUNK) / RATE - time.perf_counter()))
            await ws.send_json({"type": "audio.end"})
            return t0, time.perf_counter()

        pusher = asyncio.ensure_future(push())
        async for msg in ws:
            now = time.perf_counter()
            if msg.type == aiohttp.WSMsgType.BINARY:
                arrivals.append(now)
                continue
            m = json.loads(msg.data)
            if m["type"] == "block":
                blocks.append(m)
            elif m["type"] == "segment.ended":
                await ws.send_json({"type": "session.stop"})
        t0, t_end = await pusher
    fragments = arrivals[1:]  # after the init segment
    steady = blocks[2:] or blocks
    return {"first_fragment_s": fragments[0] - t0, "blocks": len(blocks),
            "rtf": float(np.median([b["rtf"] for b in steady])),
            "generation_ms": float(np.median([b["generation_ms"] for b in steady])),
            "decode_ms": float(np.median([b["decode_ms"] for b in steady])),
            "block_period_s": (fragments[-1] - fragments[1]) / max(1, len(fragments) - 2),
            "tail_s": fragments[-1] - t_end, "ready_ms": ready["ready_ms"]}


def run(precision: str, args) -> dict:
    from liveavatar_core.encoders.audio import AudioEncoder
    from liveavatar_core.live.server import LiveEndpoint

    if args.tiny:  # the fixture's architecture on the CPU: a smoke run of this script
        from liveavatar_core.loading import load_generator, official_folder
        from liveavatar_core.synthetic import write_tiny_checkpoint

        folder = official_folder(write_tiny_checkpoint(tempfile.mkdtemp()).ckpt_dir)
        model = load_generator(folder.dit, folder.vae, None, precision="fp32")
        encoder, size, gpu = AudioEncoder.from_pretrained(folder.wav2vec2), "64*64", "CPU"
    else:
        cfg = DiTConfig.wan_s2v_14b()
        devices = detect_devices()
        plan = plan_run(cfg, size=(384, 704), devices=devices, precision=precision, text_encoder="cpu",
                        audio_encoder="cpu").validate()
        dit, _ = build_dit(cfg, plan, "sdpa", args.compile == "on")
        vae = build_vae(torch.device(plan.dit_device), args.compile == "on")
        model = assemble(dit, vae, plan, f"random {precision}")
        encoder = AudioEncoder.from_pretrained(wav2vec2_large(Path(tempfile.mkdtemp()) / "wav2vec2"),
                                               device=plan.dit_device, dtype=torch.bfloat16)
        size, gpu = "704*384", devices[0].label
    endpoint = LiveEndpoint(model, _Text(model.dit.cfg.text_dim), encoder, token="bench")
    url = serve(endpoint)
    pcm = (make_speech_audio(args.seconds, RATE, seed=3) * 32767).astype(np.int16)
    asyncio.run(session(url, "bench", pcm[:RATE * 3], args.lookahead_ms, size))  # warm-up: compilation
    result = asyncio.run(session(url, "bench", pcm, args.lookahead_ms, size))
    result.update(precision=precision, fps=12 / result["block_period_s"], seconds=args.seconds,
                  lookahead_ms=args.lookahead_ms, compile=args.compile, gpu=gpu)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", default="fp8,bf16")
    ap.add_argument("--seconds", type=float, default=8.0, help="speech pushed in the timed session")
    ap.add_argument("--lookahead_ms", type=int, default=500)
    ap.add_argument("--compile", choices=["on", "off"], default="on")
    ap.add_argument("--tiny", action="store_true", help="the fixture's architecture on the CPU (a smoke run)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run(args.one, args)), flush=True)
        return
    import subprocess

    for precision in args.precisions.split(","):
        cmd = [sys.executable, __file__, "--one", precision, "--seconds", str(args.seconds), "--lookahead_ms",
               str(args.lookahead_ms), "--compile", args.compile] + (["--tiny"] if args.tiny else [])
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
        line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{precision}: FAILED\n{out[-3000:]}")
            continue
        r = json.loads(line[7:])
        print(f"{precision} ({r['gpu']}, compile {r['compile']}, look-ahead {r['lookahead_ms']} ms): first fragment "
              f"{r['first_fragment_s']:.2f} s after the first audio chunk; RTF {r['rtf']:.2f} (generation "
              f"{r['generation_ms']:.0f} ms + decode {r['decode_ms']:.0f} ms per 480 ms block); block period "
              f"{r['block_period_s']:.3f} s = {r['fps']:.1f} FPS; last fragment {r['tail_s']:.2f} s after the "
              f"audio ended; {r['blocks']} blocks; session ready in {r['ready_ms']} ms")
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], f"live_{precision}.json").write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
