"""The inductor-compiled DiT (regional compilation) reproduces the official calls (golden/07).

The same replay as test_dit.py with `compile_regions()`, on the CPU (inductor's C++ code) and, where
present, a CUDA GPU (Triton code), in the fixtures' fp32 with the fp32 math attention: compiled
kernels may reorder reductions, the results stay within the forward tolerance.
"""

import copy
import re

import pytest
import torch

from liveavatar_core.model.cache import make_step_caches

from tests.parity.tolerance import DIT_FORWARD, assert_parity

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA GPU"))]


@pytest.fixture(autouse=True)
def ieee_fp32():
    """cuDNN runs fp32 convolutions (the patch embeddings) in TF32 by default: on an H200, 4220 of
    6144 elements of the first eager prediction then differ from the reference by more than 2e-4."""
    backends = [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")]
    previous = [getattr(obj, attr) for obj, attr in backends]
    for obj, attr in backends:
        setattr(obj, attr, False)
    yield
    for (obj, attr), value in zip(backends, previous):
        setattr(obj, attr, value)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_predictions_match_golden(tiny_dit, golden, manifest, device):
    model = copy.deepcopy(tiny_dit).to(device)
    model.compile_regions()
    text, vae, g7 = golden("01_text"), golden("04_vae"), golden("07_dit_clip0_blocks01")
    settings = manifest["settings"]
    ref, motion = vae["ref_latents"].to(device), vae["motion_latents"].to(device)
    caches = make_step_caches(model.cfg, *ref.shape[-2:], num_steps=settings["sample_steps"],
                              cache_frames=settings["lat_target_frames"], dtype=model.dtype, device=device)
    text_cache = model.encode_text(text["context"].to(device))
    model.sink(ref, motion, text_cache, caches)
    blocks = sorted({int(m.group(1)) for k in g7 if (m := re.match(r"clip0\.block(\d+)\.step0\.x$", k))})
    calls = [c for c in manifest["runs"]["offline"]["calls"]
             if c["kind"] == "infer" and c["clip"] == 0 and c["block"] in blocks]
    assert calls
    for call in calls:
        b, s = call["block"], call["step"]
        prefix = f"clip0.block{b}.step{s}"
        pred = model.denoise_block(g7[f"{prefix}.x"][None].to(device), g7[f"{prefix}.t"], text_cache,
                                   g7[f"clip0.block{b}.step0.audio_input"].to(device), None, caches[s],
                                   call["current_start"], call["randint_relative_dist"][0])
        assert_parity(pred[0], g7[f"{prefix}.pred"], DIT_FORWARD, prefix)
