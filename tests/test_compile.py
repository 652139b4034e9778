"""Regional compilation of the DiT: whole graphs, shared by every layer, same results as eager.

On CPU the regions are traced with the `aot_eager` backend (Dynamo + AOTAutograd, no code
generation): that proves the regions capture without graph breaks, that the layers share the
compiled graphs, and that results are bit-identical. The real (inductor) compilation, on the CPU
and a GPU, is checked against the golden fixtures in tests/parity/test_dit_compiled.py.
"""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from liveavatar_core.errors import InputError
from liveavatar_core.loading import resolve_compile
from liveavatar_core.model.cache import make_step_caches, tokens_per_frame
from liveavatar_core.model.layers import round_to_bf16
from liveavatar_core.weights.dit import load_dit_checkpoint
from tests.dit_support import build_dit


def _model(ckpt_dir):
    return build_dit(load_dit_checkpoint(ckpt_dir))


def _golden(fixtures, name):
    return load_file(str(fixtures / "golden" / f"{name}.safetensors"))


def _stream(model, fixtures, manifest, blocks: int):
    """Sink, then `blocks` block calls through the ring (past its length: warm-up and rolling)."""
    vae, g7 = _golden(fixtures, "04_vae"), _golden(fixtures, "07_dit_clip0_blocks01")
    ref, motion = vae["ref_latents"], vae["motion_latents"]
    lat_h, lat_w = ref.shape[-2:]
    frames = model.cfg.num_frames_per_block
    cache = make_step_caches(model.cfg, lat_h, lat_w, num_steps=1, dtype=model.dtype,
                             cache_frames=manifest["settings"]["lat_target_frames"])[0]
    text = model.encode_text(_golden(fixtures, "01_text")["context"])
    model.sink(ref, motion, text, cache)
    fs = tokens_per_frame(model.cfg, lat_h, lat_w)
    prefix = "clip0.block0.step0"
    x, t, audio = (g7[f"{prefix}.{k}"] for k in ("x", "t", "audio_input"))
    return [model.denoise_block(x[None], t, text, audio, None, cache, b * frames * fs, 9) for b in range(blocks)]


def test_compiled_regions_are_whole_shared_graphs_with_identical_results(ckpt_dir, fixtures, manifest):
    model = _model(ckpt_dir)
    ring_blocks = manifest["settings"]["lat_target_frames"] // model.cfg.num_frames_per_block
    blocks = ring_blocks + 2
    eager = _stream(model, fixtures, manifest, blocks)

    torch._dynamo.reset()
    counters.clear()
    # fullgraph: a graph break anywhere in a region raises instead of silently running eager code.
    model.compile_regions(backend="aot_eager", fullgraph=True)
    assert model.compiled
    try:
        compiled = _stream(model, fixtures, manifest, blocks)
        graphs = counters["stats"]["unique_graphs"]
        again = _stream(model, fixtures, manifest, blocks)
        assert counters["stats"]["unique_graphs"] == graphs, "a second stream recompiled"
    finally:
        model.compile_regions(False)
    assert not model.compiled
    # Per region one graph for the sink's token count and one for a block's; the join one static and
    # one with a dynamic history length; one injection graph. None of it grows with the layer count.
    assert graphs <= 7 < model.cfg.num_layers * 2
    for e, c, a in zip(eager, compiled, again):
        assert torch.equal(e, c) and torch.equal(e, a)


def test_compile_choice_is_checked_before_loading(ckpt_dir, fixtures, tmp_path, capsys):
    from liveavatar_core.cli import main

    assert resolve_compile("auto", torch.device("cpu")) is False
    assert resolve_compile("off", torch.device("cpu")) is False
    for choice, words in (("on", "CUDA"), ("sometimes", "auto, on, off")):
        with pytest.raises(InputError, match=words) as info:
            resolve_compile(choice, torch.device("cpu"))
        assert info.value.input_name == "compile"
    args = ["generate", "--ckpt_dir", str(ckpt_dir), "--image", str(fixtures / "inputs" / "ref_image.png"),
            "--audio", str(fixtures / "inputs" / "audio.wav"), "--prompt", "hi", "--device", "cpu",
            "--compile", "on", "--save_file", str(tmp_path / "o.mp4")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "compile" in err and "CUDA" in err
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_vae_norms_trace_whole_with_identical_results(channels_last):
    from liveavatar_core.vae.config import VAEConfig
    from liveavatar_core.vae.layers import ResidualBlock, RMSNorm
    from liveavatar_core.vae.model import WanVAE

    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(base_dim=8)).eval()
    vae.set_channels_last(channels_last)
    latents = torch.randn(1, 16, 6, 8, 12)
    pixels = torch.rand(1, 3, 9, 64, 96) * 2 - 1
    decoded, encoded = vae.decode(latents), vae.encode(pixels)
    torch._dynamo.reset()
    counters.clear()
    vae.compile_regions(backend="aot_eager", fullgraph=True)
    assert vae.compiled
    try:
        stream = vae.stream_decoder()
        pieces = [stream.decode(latents[:, :, :1]), stream.decode(latents[:, :, 1:4]), stream.decode(latents[:, :, 4:])]
        assert torch.equal(torch.cat(pieces, dim=2), decoded)
        assert torch.equal(vae.encode(pixels), encoded)
    finally:
        vae.compile_regions(False)
    assert not vae.compiled
    # Sizes are dynamic, channel counts static: a graph per kernel, channel count, first chunk,
    # input layout and number of conv partials, not one per call site (52 norms and 24 residual
    # sums in encoder and decoder).
    sites = sum(isinstance(m, RMSNorm | ResidualBlock) for m in vae.modules())
    assert counters["stats"]["unique_graphs"] <= 40 < sites


def test_inductor_keeps_the_bf16_rounding():
    """Inductor may drop a cast round trip through bf16 inside a fused kernel (torch 2.13's C++ code
    does; this layer norm then moves by about 4e-2); the bit arithmetic of `round_to_bf16` it keeps."""
    def through_cast(x):
        return F.layer_norm(x.to(torch.bfloat16).float(), (x.shape[-1],)) * 3

    def through_bits(x):
        return F.layer_norm(round_to_bf16(x), (x.shape[-1],)) * 3

    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.compile(through_bits, dynamic=False)(x), through_cast(x), rtol=0, atol=1e-5)
