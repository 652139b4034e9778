"""Audio encoding on one GPU with a full-size random wav2vec2 (wav2vec2-large-xlsr-53 shapes, bf16).

    python bench/audio_bench.py --hours 1 --out results.json

Measures, for a generated hour of speech-like Opus audio (`synthetic_inputs.write_long_speech`):
* first features: from `StreamedAudioFeatures` creation to the first clip's features (what the
  first block waits for), and the time to the first window alone;
* windowed throughput over the whole file, seconds of audio per second, end to end (Opus decode,
  resampling, wav2vec2, interpolation, bucketing, copy to the host) and wav2vec2 alone (samples
  decoded beforehand), with peak GPU memory and peak RSS;
* the whole-file encoder (`AudioEncoder.encode`, official mode) at a few lengths, for the scaling.
Needs PyAV and soxr (carry their wheels to a machine without them) and a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liveavatar_core.encoders.audio import SAMPLE_RATE, AudioEncoder  # noqa: E402
from liveavatar_core.encoders.audio_stream import (AudioReader, StreamedAudioFeatures,  # noqa: E402
                                                   WindowedFeatures)
from liveavatar_core.synthetic_inputs import write_long_speech  # noqa: E402
from liveavatar_core.weights.wav2vec2 import Wav2Vec2Arch  # noqa: E402


def large_encoder(device: str) -> AudioEncoder:
    """Random wav2vec2-large (315M parameters) in bf16, as the official GPU pipeline runs it."""
    from transformers import Wav2Vec2Model

    arch = Wav2Vec2Arch()
    torch.manual_seed(0)
    with torch.device(device):
        model = Wav2Vec2Model(arch.to_hf_config("sdpa"))
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    return AudioEncoder(model, arch, description="random wav2vec2-large, bf16")


def sync() -> None:
    torch.cuda.synchronize()


def first_features(encoder: AudioEncoder, path: Path) -> dict:
    t0 = time.perf_counter()
    streamed = StreamedAudioFeatures(encoder, path)
    clip = next(iter(streamed.clips()))
    sync()
    return {"first_clip_features_s": time.perf_counter() - t0, "samples_read_s": streamed.samples_read / SAMPLE_RATE,
            "clip_shape": list(clip.shape), "available_clips_declared": streamed.available_clips}


def windowed_end_to_end(encoder: AudioEncoder, path: Path) -> dict:
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    streamed = StreamedAudioFeatures(encoder, path)
    clips = 0
    for _ in streamed.clips():
        clips += 1
    sync()
    elapsed = time.perf_counter() - t0
    seconds = streamed.samples_read / SAMPLE_RATE
    return {"audio_s": seconds, "clips": clips, "elapsed_s": elapsed, "audio_s_per_s": seconds / elapsed,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}


def windowed_model_only(encoder: AudioEncoder, x: np.ndarray) -> dict:
    """wav2vec2 + stitching alone: samples already decoded, pushed in 1 s chunks."""
    torch.cuda.reset_peak_memory_stats()
    enc = WindowedFeatures(encoder, expected_samples=x.size)
    t0 = time.perf_counter()
    first = None
    for start in range(0, x.size, SAMPLE_RATE):
        enc.push(x[start:start + SAMPLE_RATE])
        if enc.available_frames > enc.frames_out:
            enc.features_until(enc.available_frames)
            if first is None:
                sync()
                first = time.perf_counter() - t0
    enc.finish()
    enc.features_until(enc.total_frames)
    sync()
    elapsed = time.perf_counter() - t0
    return {"audio_s": x.size / SAMPLE_RATE, "elapsed_s": elapsed, "audio_s_per_s": x.size / SAMPLE_RATE / elapsed,
            "first_window_s": first, "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}


def whole_file(encoder: AudioEncoder, x: np.ndarray, seconds: float) -> dict:
    part = x[: int(seconds * SAMPLE_RATE)]
    audio = {"waveform": torch.from_numpy(part)[None, None], "sample_rate": SAMPLE_RATE}
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        encoder.encode(audio)
        sync()
    except torch.OutOfMemoryError:
        return {"audio_s": seconds, "error": "out of memory"}
    elapsed = time.perf_counter() - t0
    return {"audio_s": seconds, "elapsed_s": elapsed, "audio_s_per_s": seconds / elapsed,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hours", type=float, default=1.0)
    p.add_argument("--whole", type=float, nargs="*", default=[60, 300, 600, 1200],
                   help="lengths (s) for the whole-file encoder")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    torch.set_grad_enabled(False)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    encoder = large_encoder("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "talk.opus"
        t0 = time.perf_counter()
        write_long_speech(path, args.hours * 3600)
        results["write_audio_s"] = time.perf_counter() - t0
        # Warm-up: cuDNN/cuBLAS choices and the allocator, on a short window.
        WindowedFeatures(encoder).push(np.zeros(20 * SAMPLE_RATE, np.float32))
        sync()
        results["first_features"] = first_features(encoder, path)
        print(json.dumps(results, indent=1), flush=True)
        results["windowed_end_to_end"] = windowed_end_to_end(encoder, path)
        results["windowed_end_to_end"]["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(results["windowed_end_to_end"]), flush=True)
        t0 = time.perf_counter()
        x = np.concatenate(list(AudioReader(path)))
        results["decode_resample_s"] = time.perf_counter() - t0
        results["windowed_model_only"] = windowed_model_only(encoder, x)
        print(json.dumps(results["windowed_model_only"]), flush=True)
        results["whole_file"] = []
        for seconds in args.whole:
            results["whole_file"].append(whole_file(encoder, x, seconds))
            print(json.dumps(results["whole_file"][-1]), flush=True)
    results["peak_rss_mib_at_end"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # with the decoded hour
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
