"""How far windowed wav2vec2 features are from whole-file ones, per window/context size (CPU).

    python bench/audio_windows.py --seconds 30 60 --model tiny
    python bench/audio_windows.py --seconds 30 --model large --windows 8:4 16:4

Speech comes from espeak-ng when it is installed (several paragraphs, natural pauses), else from
`synthetic_inputs.make_speech_audio`. For each (window, context) it prints the maximum absolute and
the relative L2 difference of the bucketed 25 fps features against `AudioEncoder.encode`, with
the normalisations a stream can use: `running` (what `WindowedFeatures` does: the statistics of
everything up to the window's end plus a 30 s look-ahead), `running0` (no look-ahead), `first`
(the statistics of the first window only) and `exact` (a first pass over the whole file for the
statistics; isolates the windowing). The 30 Hz grid is the official one (the length is declared).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liveavatar_core.encoders.audio import SAMPLE_RATE, AudioEncoder, load_audio  # noqa: E402
from liveavatar_core.encoders.audio_stream import DEFAULT_STATS_LOOKAHEAD_S, WindowedFeatures  # noqa: E402
from liveavatar_core.synthetic_inputs import make_speech_audio  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. Live avatars speak for hours, and the audio "
        "encoder has to keep up with them. Every window sees a little of its neighbours, so the seams "
        "stay smooth. Numbers like three hundred and twenty samples per frame matter here. ")


def speech(seconds: float, workdir: Path) -> np.ndarray:
    """16 kHz speech of about `seconds` (espeak-ng if available)."""
    if shutil.which("espeak-ng"):
        wav = workdir / "speech.wav"
        words = int(seconds * 2.6) + 10  # espeak-ng speaks about 160 words a minute
        text = (TEXT * (words // len(TEXT.split()) + 1))
        subprocess.run(["espeak-ng", "-s", "160", "-w", str(wav), text], check=True, capture_output=True)
        x = load_audio(wav)[: int(seconds * SAMPLE_RATE)]
        if x.size >= int(seconds * SAMPLE_RATE) * 0.9:
            return x
    return make_speech_audio(seconds, SAMPLE_RATE, seed=1)


def windowed(encoder: AudioEncoder, x: np.ndarray, window: float, context: float, stats,
             lookahead: float = DEFAULT_STATS_LOOKAHEAD_S) -> torch.Tensor:
    enc = WindowedFeatures(encoder, window_s=window, context_s=context, expected_samples=x.size, stats=stats,
                           stats_lookahead_s=lookahead)
    parts = []
    for start in range(0, x.size, 8000):
        enc.push(x[start:start + 8000])
        if enc.available_frames > enc.frames_out:
            parts.append(enc.features_until(enc.available_frames))
    enc.finish()
    parts.append(enc.features_until(enc.total_frames))
    return torch.cat(parts, dim=-1)


def build(model: str, ckpt: Path) -> AudioEncoder:
    if model == "tiny":
        return AudioEncoder.from_pretrained(ckpt / "wav2vec2-large-xlsr-53-english")
    from transformers import Wav2Vec2Model

    from liveavatar_core.weights.wav2vec2 import Wav2Vec2Arch

    arch = Wav2Vec2Arch()
    torch.manual_seed(0)
    return AudioEncoder(Wav2Vec2Model(arch.to_hf_config()).eval().requires_grad_(False), arch,
                        description="random wav2vec2-large")


def decoded_blocks(ckpt: Path, fixtures: Path, seconds: float, windows: list[str], workdir: Path) -> None:
    """Streaming-mode video of 2 clips on the tiny checkpoint, whole-file vs windowed features:
    max abs (0-255) and relative L2 difference of the decoded frames, worst block."""
    from liveavatar_core.encoders.audio_stream import StreamedAudioFeatures
    from liveavatar_core.encoders.text import TextEncoder
    from liveavatar_core.loading import load_generator, official_folder
    from liveavatar_core.pipeline import GenerationSettings, generate
    from liveavatar_core.synthetic import write_wav

    folder = official_folder(ckpt)
    text = TextEncoder.from_pretrained(folder.t5, dtype=torch.float32).encode("a person talking")
    encoder = AudioEncoder.from_pretrained(folder.wav2vec2)
    model = load_generator(folder.dit, folder.vae, ckpt.parent / "LiveAvatar" / "liveavatar.safetensors",
                           precision="fp32")
    wav = workdir / "speech16k.wav"
    write_wav(wav, speech(seconds, workdir), SAMPLE_RATE)
    settings = GenerationSettings(size="128*64", num_clips=2)
    image = fixtures / "inputs" / "ref_image.png"

    def frames(audio):
        return [c.frames.astype(np.float32) for c in generate(model, text, audio, image, settings)]

    ref = frames(encoder.encode(wav))
    for spec in windows:
        window, context = (float(v) for v in spec.split(":"))
        got = frames(StreamedAudioFeatures(encoder, wav, window_s=window, context_s=context))
        worst = max(((np.abs(a - b).max(), np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(got, ref)),
                    key=lambda d: d[1])
        print(f"  decoded blocks, window {window} s context {context} s: worst block max abs {worst[0]:.1f} / 255, "
              f"rel L2 {worst[1]:.5f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "large"], default="tiny")
    p.add_argument("--ckpt", type=Path, default=Path("/work/shared/fixtures/liveavatar_tiny/ckpt/Wan2.2-S2V-14B"))
    p.add_argument("--seconds", type=float, nargs="+", default=[30.0, 60.0])
    p.add_argument("--windows", nargs="+", default=["2:1", "4:2", "8:2", "8:4", "16:4"],
                   help="window:context in seconds")
    p.add_argument("--blocks", action="store_true", help="compare decoded video blocks instead (tiny checkpoint)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    if args.blocks:
        with tempfile.TemporaryDirectory() as tmp:
            for seconds in args.seconds:
                print(f"tiny {seconds:.0f} s of speech, 2 clips:")
                decoded_blocks(args.ckpt, args.ckpt.parents[1], seconds, args.windows, Path(tmp))
        return
    encoder = build(args.model, args.ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in args.seconds:
            x = speech(seconds, Path(tmp))
            t = time.perf_counter()
            whole = encoder.encode({"waveform": torch.from_numpy(x)[None, None], "sample_rate": SAMPLE_RATE})
            print(f"{args.model} {x.size / SAMPLE_RATE:.1f} s: whole file {time.perf_counter() - t:.1f} s")
            ref = whole.embedding
            for spec in args.windows:
                window, context = (float(v) for v in spec.split(":"))
                first = x[: int((window + context) * SAMPLE_RATE)]
                for name, stats, ahead in (("running", None, DEFAULT_STATS_LOOKAHEAD_S), ("running0", None, 0.0),
                                           ("first", (float(first.mean()), float(first.var())), 0.0),
                                           ("exact", (float(x.mean()), float(x.var())), 0.0)):
                    t = time.perf_counter()
                    got = windowed(encoder, x, window, context, stats, ahead)
                    d = (got - ref).abs()
                    rel = (d.norm() / ref.norm()).item()
                    print(f"  window {window:4.1f} s context {context:4.1f} s {name:8s} max abs {d.max():.4f} "
                          f"rel L2 {rel:.5f} ({time.perf_counter() - t:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
