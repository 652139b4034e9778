"""The layer layout with real worker processes over gloo on CPU ranks (tiny checkpoint, fp32):
each rank runs a layer range of every step in wavefront order (parallel/layers.py); the frames and
the sampler's tensors must be those of one process, and a cancelled run must resume on the step
layout into the same video."""

from math import gcd

import pytest
import torch

from liveavatar_core.errors import InputError
from liveavatar_core.parallel.layers import cell_time, skew
from liveavatar_core.parallel.layout import layer_layout, split_layers, step_layout
from liveavatar_core.parallel.remote import load_parallel
from liveavatar_core.pipeline import generate, write_mp4
from liveavatar_core.resume import load_resume_state
from liveavatar_core.video.probe import probe_mp4
from tests.test_parallel import OFFICIAL, STREAMING, _same, _sampler_tensors, inputs, single, tiny  # noqa: F401


def _load(tiny, inputs, layout):
    folder = inputs[0]
    return load_parallel(folder.dit, folder.vae, tiny.lora, precision="fp32", layout=layout)


def _check(stream, single, mode):
    got = [c.frames for c in stream]
    assert _same(got, single[mode]), mode
    want, have = single[mode + " state"], _sampler_tensors(stream)
    assert sorted(have) == sorted(want) and any("latents" in k for k in want)
    assert all(torch.equal(have[k], want[k]) for k in want), [k for k in want if not torch.equal(have[k], want[k])]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_layer_layout_gives_the_frames_and_tensors_of_one_process(tiny, inputs, single, n):
    _, text, audio = inputs
    model = _load(tiny, inputs, layer_layout(["cpu"] * n, 4))
    try:
        for settings in (STREAMING, OFFICIAL) if n == 3 else (STREAMING,):
            _check(generate(model, text, audio, tiny.image, settings), single, settings.mode)
    finally:
        model.close()
    assert all(p.poll() is not None for p in model.group.procs)
