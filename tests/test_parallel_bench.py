"""The parallel benchmark's CPU smoke run: random tiny weights built on every rank, gloo ranks,
frames compared with one process (bench/parallel_bench.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("extra", [["--ranks", "2"], ["--ranks", "3", "--vae_gpu", "--shard", "fsdp"]],
                         ids=["2", "3+vae fsdp"])
def test_cpu_smoke_run_gives_the_frames_of_one_process(tmp_path, extra):
    cmd = [sys.executable, str(ROOT / "bench" / "parallel_bench.py"), "--config", "tiny", "--device", "cpu",
           "--clips", "2", "--check_exact", "--out", str(tmp_path), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single, run = json.loads((tmp_path / "parallel_results.json").read_text())
    assert single["run"] == "single" and run["ranks_dit"] == int(extra[1])
    assert run["world_size"] == run["ranks_dit"] + ("--vae_gpu" in extra) and run["backend"] == "gloo"
    assert run["exact"]["bit_identical"] and run["exact"]["max_abs_diff"] == 0
    assert run["exact"]["frames_compared"] == run["frames"] == single["frames"] > 0
    assert run["steady_fps"] > 0 and run["first_frame_s"] > 0 and run["vs_single"] > 0
    assert len(run["ranks"]) == run["world_size"]
    if "fsdp" in extra:  # each DiT rank holds the base and a third of the units
        held = [r["dit_weights_gib"] for r in run["ranks"][:3]]
        assert run["run"] == "3+vae fsdp" and max(held) - min(held) < 0.01 * max(held)
    assert "frames vs one process: bit-identical" in proc.stdout
