"""An hour of audio on the tiny checkpoint (issue 15): the first block and the peak memory do not
depend on the length of the audio.

Each run is a child process (its peak RSS is its own): load the tiny fixture models, prepare a
10-minute or a 60-minute Opus file, stream one clip in streaming mode into a real MP4 with the
audio muxed (the track is read a second time, lazily). Before issue 15 the 60-minute file did not
reach its first block in 10 minutes, at 3.9 GB of RAM.
"""

import json
import subprocess
import sys

from liveavatar_core.synthetic_inputs import write_long_speech
from liveavatar_core.video.probe import probe_mp4

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import torch
from liveavatar_core.encoders.audio import AudioEncoder
from liveavatar_core.encoders.text import TextEncoder
from liveavatar_core.loading import load_generator, official_folder
from liveavatar_core.pipeline import GenerationSettings, generate, write_mp4

fixtures, audio, out = (Path(a) for a in sys.argv[1:4])
torch.set_num_threads(1)
folder = official_folder(fixtures / "ckpt" / "Wan2.2-S2V-14B")
text = TextEncoder.from_pretrained(folder.t5, dtype=torch.float32).encode("a person talking")
encoder = AudioEncoder.from_pretrained(folder.wav2vec2)
model = load_generator(folder.dit, folder.vae, fixtures / "ckpt" / "LiveAvatar" / "liveavatar.safetensors",
                       precision="fp32")
first = []
t0 = time.perf_counter()
stream = generate(model, text, encoder.prepare(audio), fixtures / "inputs" / "ref_image.png",
                  GenerationSettings(size="128*64", num_clips=1))
write_mp4(stream, out, on_chunk=lambda chunk: first or first.append(time.perf_counter() - t0))
print(json.dumps({"first_block_s": first[0], "total_s": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "clips_estimated": stream.num_clips, "frames": stream.stats.frames_done}))
"""


def _run(fixtures, audio, out) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(fixtures), str(audio), str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# About 30 s on 2 busy cores: two children loading the tiny models, one clip each.
def test_one_hour_first_block_and_memory_do_not_depend_on_length(fixtures, tmp_path):
    runs = {}
    for minutes in (10, 60):
        audio = tmp_path / f"talk{minutes}.opus"
        write_long_speech(audio, minutes * 60)
        runs[minutes] = _run(fixtures, audio, tmp_path / f"out{minutes}.mp4")
        info = probe_mp4(tmp_path / f"out{minutes}.mp4", decode_audio=True)
        assert info.frame_count == 48 - 3 and abs(info.audio_duration_s - info.duration_s) <= 1 / 25
    short, long = runs[10], runs[60]
    assert long["frames"] == short["frames"] == 45
    # Six times the audio: the same first-block time (noise on a busy machine aside) ...
    assert long["first_block_s"] < 1.5 * short["first_block_s"] + 1.0, runs
    # ... and the same peak memory, within 50 MB (an hour of 16 kHz float32 alone is 230 MB).
    assert abs(long["peak_rss_mb"] - short["peak_rss_mb"]) < 50, runs
