"""Cost of the per-block health checks (`liveavatar_core.health.HealthMonitor.observe`) on this CPU.

    python bench/health_bench.py                            # 704x384, 100 blocks, OpenCV on 1 thread
    python bench/health_bench.py --size 384x704 --blocks 200
    python bench/health_bench.py --threads 0                # OpenCV's default thread count

The stream is synthetic (`liveavatar_core/health/synthetic.py`): the example picture fitted to the
size with the pack's resize-and-crop rule, a mouth that opens with the example speech (looped),
one-pixel jitter and sensor noise; 12 frames per block (9 in the first). Blocks are rendered one at
a time and only `observe` is timed (it writes its sidecar line to a temporary folder, as in a
run). Printed: median, p90 and max ms per block, and the median as a share of the time a block
plays at 16 FPS (12 / 16 = 0.75 s) and at 25 FPS (0.48 s); then the time of the final plot.
No GPU and no downloads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from liveavatar_core.config import FRAMES_PER_BLOCK  # noqa: E402
from liveavatar_core.health import HealthMonitor, health_paths  # noqa: E402
from liveavatar_core.health.checks import fit_reference  # noqa: E402
from liveavatar_core.health.synthetic import TalkingScene, mouth_openings, read_speech, red_lips  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "example_inputs"
FPS = 25
FIRST_BLOCK_FRAMES = 9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="704x384", help="W x H of the video")
    parser.add_argument("--blocks", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="cv2.setNumThreads; 0 keeps OpenCV's default")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.threads:
        cv2.setNumThreads(args.threads)

    reference = np.asarray(Image.open(EXAMPLES / "liveavatar_reference.png").convert("RGB"))
    picture = fit_reference(reference, height, width)
    frames_total = FIRST_BLOCK_FRAMES + (args.blocks - 1) * FRAMES_PER_BLOCK
    audio, rate = read_speech(EXAMPLES / "liveavatar_speech.wav", frames_total / FPS + 1)
    openings = mouth_openings(audio, rate, FPS)
    scene = TalkingScene(picture, red_lips(picture))
    per_frame = rate // FPS

    with tempfile.TemporaryDirectory() as folder:
        jsonl, png = health_paths(Path(folder) / "bench.mp4")
        monitor = HealthMonitor(picture, FPS, "warn", sidecar=jsonl, plot_path=png)
        times, start = [], 0
        for block in range(args.blocks):
            n = FIRST_BLOCK_FRAMES if block == 0 else FRAMES_PER_BLOCK
            frames = scene.render(openings[start:start + n])
            samples = audio[start * per_frame:(start + n) * per_frame]
            t0 = time.perf_counter()
            record = monitor.observe(frames, samples, rate)
            times.append(time.perf_counter() - t0)
            start += n
        t0 = time.perf_counter()
        monitor.close()
        plot_s = time.perf_counter() - t0
        face_blocks = sum(1 for line in jsonl.read_text().splitlines() if '"face_found":true' in line)

    ms = np.array(times[1:]) * 1e3  # the first block also pays for first-call set-up
    median = float(np.median(ms))
    print(f"health checks, {width}x{height}: {len(ms)} blocks of {FRAMES_PER_BLOCK} frames timed after the first; "
          f"OpenCV {cv2.__version__}, {cv2.getNumThreads()} thread(s)")
    print(f"observe per block: median {median:.2f} ms, p90 {np.percentile(ms, 90):.2f} ms, max {ms.max():.2f} ms "
          f"(first block {times[0] * 1e3:.1f} ms)")
    for fps in (16, 25):
        block_s = FRAMES_PER_BLOCK / fps
        print(f"  share of a block's time at {fps} FPS ({block_s:.2f} s): {median / (block_s * 1e3) * 100:.2f} %")
    print(f"face found in {face_blocks}/{args.blocks} blocks; last A/V offset {record.av_offset} "
          f"(confidence {record.av_confidence:.2f}); alarms raised: "
          f"{sorted({a.name for a in monitor.events if a.state == 'raised'}) or 'none'}")
    print(f"plot at close: {plot_s * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
