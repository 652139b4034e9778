"""Wan 2.1 VAE: file formats and refusals, key table, official chunking, streaming equivalence."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from liveavatar_core.errors import InputError, WeightsError
from liveavatar_core.vae import VAEConfig, WanVAE, load_vae
from liveavatar_core.vae.layers import CausalConv3d
from liveavatar_core.weights.io import open_checkpoint
from liveavatar_core.weights.vae import (describe_vae, expected_vae_shapes, inspect_vae, to_file_keys,
                                         vae_state_dict)


@pytest.fixture(scope="module")
def vae_path(ckpt_dir):
    return ckpt_dir / "Wan2.1_VAE.pth"


@pytest.fixture(scope="module")
def vae(vae_path):
    return load_vae(vae_path)


@pytest.fixture(scope="module")
def official_sd(vae_path):
    return dict(torch.load(vae_path, map_location="cpu", weights_only=True))


def _latents(t, h=2, w=4, seed=0):
    return torch.randn(1, 16, t, h, w, generator=torch.Generator().manual_seed(seed))


def _pixels(t, h=16, w=32, seed=0):
    return torch.rand(1, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- weights ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("base_dim", [8, 96])
def test_key_table_matches_model(base_dim):
    with torch.device("meta"):
        model = WanVAE(VAEConfig(base_dim=base_dim))
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert model_shapes == expected_vae_shapes(base_dim)
    assert len(model_shapes) == 194


def test_describe_official_file(vae_path):
    sd = open_checkpoint(vae_path)
    base = sd.shape("encoder.conv1.weight")[0]
    text = describe_vae(sd.shapes(), sd.dtype_summary())
    assert text.startswith(f"Wan 2.1 VAE (z=16, base width {base},")
    assert "194 tensors" in text and "fp32" in text


def test_key_map_round_trip(official_sd):
    for prefix in ("", "vae.", "first_stage_model."):
        file_sd = to_file_keys(official_sd, prefix)
        info = inspect_vae({k: tuple(v.shape) for k, v in file_sd.items()})
        assert info.prefix == prefix
        back = vae_state_dict(file_sd, info)
        assert back.keys() == official_sd.keys()
        assert all(torch.equal(back[k], official_sd[k]) for k in back)


@pytest.mark.parametrize("prefix,dtype", [("", torch.bfloat16), ("first_stage_model.", torch.float32),
                                          ("vae.", torch.float16)])
def test_safetensors_with_prefix_loads_like_pth(tmp_path, official_sd, vae, prefix, dtype):
    path = tmp_path / "wan_2.1_vae.safetensors"
    # A bundled checkpoint: other models' tensors next to the prefixed VAE.
    extra = {"model.diffusion_model.x.weight": torch.zeros(2)} if prefix else {}
    save_file({**to_file_keys({k: v.to(dtype) for k, v in official_sd.items()}, prefix), **extra}, str(path))
    loaded = load_vae(path)
    assert prefix in loaded.description or not prefix
    for name, p in loaded.state_dict().items():
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, official_sd[name].to(dtype).float(), rtol=0, atol=0)
    if dtype == torch.float32:
        x = _latents(2)
        torch.testing.assert_close(loaded.decode(x), vae.decode(x), rtol=0, atol=0)


def _wan22_vae():
    return {"encoder.conv1.weight": torch.zeros(16, 12, 3, 3, 3),
            "encoder.downsamples.0.downsamples.0.residual.0.gamma": torch.zeros(16, 1, 1, 1),
            "encoder.downsamples.0.avg_shortcut.proj.weight": torch.zeros(1),
            "conv1.weight": torch.zeros(96, 96, 1, 1, 1), "conv2.weight": torch.zeros(48, 48, 1, 1, 1),
            "decoder.conv1.weight": torch.zeros(64, 48, 3, 3, 3)}


def _sd_vae():
    return {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "encoder.down.0.block.0.norm1.weight": torch.zeros(8),
            "quant_conv.weight": torch.zeros(8, 8, 1, 1), "decoder.conv_in.weight": torch.zeros(16, 4, 3, 3)}


def _diffusers_wan_vae():
    return {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3, 3),
            "encoder.down_blocks.0.resnets.0.norm1.gamma": torch.zeros(8, 1, 1, 1),
            "quant_conv.weight": torch.zeros(32, 32, 1, 1, 1)}


@pytest.mark.parametrize("tensors,expect", [(_wan22_vae, "Wan 2.2 VAE"), (_sd_vae, "image VAE"),
                                            (_diffusers_wan_vae, "diffusers layout")])
def test_refuses_other_vaes(tmp_path, tensors, expect):
    path = tmp_path / "other_vae.safetensors"
    save_file(tensors(), str(path))
    with pytest.raises(WeightsError, match=expect) as err:
        load_vae(path, input_name="vae_name")
    assert str(err.value).startswith("vae_name:") and "Fix:" in str(err.value)


@pytest.mark.parametrize("relpath,expect", [
    ("Wan2.2-S2V-14B/diffusion_pytorch_model.safetensors.index.json", "diffusion model"),
    ("Wan2.2-S2V-14B/models_t5_umt5-xxl-enc-bf16.pth", "T5 text encoder"),
    ("Wan2.2-S2V-14B/wav2vec2-large-xlsr-53-english/model.safetensors", "wav2vec2"),
    ("LiveAvatar/liveavatar.safetensors", "LoRA"),
])
def test_refuses_other_models_of_the_release(fixtures, relpath, expect):
    with pytest.raises(WeightsError, match=expect):
        load_vae(fixtures / "ckpt" / relpath)


def test_names_missing_and_misshaped_keys(tmp_path, official_sd):
    broken = dict(official_sd)
    del broken["decoder.head.2.bias"]
    broken["decoder.middle.1.proj.weight"] = broken["decoder.middle.1.proj.weight"][:, :, :, :1].repeat(1, 1, 1, 2)
    path = tmp_path / "broken.safetensors"
    save_file(broken, str(path))
    with pytest.raises(WeightsError, match=r"1 of 194 expected tensors missing \(e.g. decoder.head.2.bias\).*"
                                           r"decoder.middle.1.proj.weight"):
        load_vae(path)


# --- official protocol -----------------------------------------------------------------------------

def test_encode_protocol_shapes_and_trailing_frames(vae):
    x = _pixels(11)
    z = vae.encode(x)
    assert z.shape == (1, 16, 3, 2, 4) and z.dtype == torch.float32
    # Frames 9 and 10 do not complete a group of 4 and are ignored.
    torch.testing.assert_close(z, vae.encode(x[:, :, :9]), rtol=0, atol=0)
    # Causal: earlier latents do not depend on later frames.
    torch.testing.assert_close(z[:, :, :2], vae.encode(x[:, :, :5]), rtol=0, atol=0)


def test_decode_protocol_shapes(vae):
    y = vae.decode(_latents(4))
    assert y.shape == (1, 3, 13, 16, 32) and y.dtype == torch.float32
    assert y.min() >= -1 and y.max() <= 1


def test_passes_of_several_latents_or_groups_match_upstream_order(vae):
    z = _latents(6)
    torch.testing.assert_close(vae.decode(z, latents_per_pass=4), vae.decode(z), rtol=0, atol=1e-6)
    x = _pixels(17)
    torch.testing.assert_close(vae.encode(x, groups_per_pass=3), vae.encode(x), rtol=0, atol=1e-6)


def test_bf16_constants_are_the_official_wrapper_values(vae):
    mean_fp32, inv_fp32 = vae.latent_constants()
    vae.latent_dtype = torch.bfloat16
    try:
        mean, inv = vae.latent_constants()
    finally:
        vae.latent_dtype = None
    assert mean.dtype == inv.dtype == torch.bfloat16
    std_bf16 = torch.tensor(vae.cfg.latent_std, dtype=torch.bfloat16)
    assert torch.equal(inv.flatten(), (1.0 / std_bf16.float()).to(torch.bfloat16))
    assert torch.equal(mean.float(), mean_fp32.to(torch.bfloat16).float())
    assert inv_fp32.dtype == torch.float32


def test_bf16_weights_run_close_to_fp32(vae_path, vae):
    vae16 = load_vae(vae_path, dtype=torch.bfloat16)
    assert vae16.dtype == torch.bfloat16
    x = _pixels(5, h=8, w=8)
    z16, z32 = vae16.encode(x), vae.encode(x)
    assert z16.dtype == torch.float32
    assert (z16 - z32).abs().max() < 0.1 * z32.abs().max()
    y16, y32 = vae16.decode(z32), vae.decode(z32)
    assert y16.dtype == torch.float32 and (y16 - y32).abs().max() < 0.1


def test_input_errors_name_the_input(vae):
    with pytest.raises(InputError, match="^pixels:"):
        vae.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(InputError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(InputError, match="^latents:"):
        vae.decode(torch.zeros(1, 48, 2, 2, 2))
    with pytest.raises(InputError, match="^latents_per_pass:"):
        vae.stream_decoder(latents_per_pass=0)


# --- streaming -------------------------------------------------------------------------------------

def test_streaming_decode_in_blocks_equals_one_decode(vae):
    z = _latents(8)
    full = vae.decode(z)
    dec = vae.stream_decoder()
    pieces = [dec.decode(z[:, :, :3]), dec.decode(z[:, :, 3:4]), dec.decode(z[:, :, 4:])]
    assert [p.shape[2] for p in pieces] == [9, 4, 16]
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, rtol=0, atol=1e-6)
    dec.reset()
    torch.testing.assert_close(dec.decode(z[:, :, :2]), full[:, :, :5], rtol=0, atol=1e-6)


def test_streaming_decoder_state_is_constant_over_many_blocks(vae):
    dec = vae.stream_decoder(latents_per_pass=3)
    z = _latents(3 * 8, h=1, w=1, seed=1)
    sizes = []
    for b in range(8):
        dec.decode(z[:, :, 3 * b:3 * b + 3])
        sizes.append(dec.state_bytes())
    assert sizes[1] > 0 and len(set(sizes[1:])) == 1


def test_streaming_encode_in_blocks_equals_one_encode(vae):
    x = _pixels(17)
    full = vae.encode(x)
    enc = vae.stream_encoder()
    pieces, start, pending = [], 0, []
    for size in (1, 6, 1, 1, 8):
        pieces.append(enc.encode(x[:, :, start:start + size]))
        pending.append(enc.pending.shape[2] if enc.pending is not None else 0)
        start += size
    assert [p.shape[2] for p in pieces] == [1, 1, 0, 1, 2]
    assert max(pending) <= 3
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, rtol=0, atol=1e-6)


def test_channels_last_layout_gives_the_same_video(vae_path):
    """NDHWC (the layout the loader picks on CUDA) is a storage choice: the same numbers come out,
    frames and causal state included, and it can be switched back."""
    vae = load_vae(vae_path)
    z, x = _latents(7, seed=2), _pixels(9, seed=2)
    decoded, encoded = vae.decode(z), vae.encode(x)
    vae.set_channels_last()
    conv = vae.decoder.conv1
    assert vae.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    convs = [m for m in vae.modules() if isinstance(m, CausalConv3d)]
    # This VAE is narrow: every conv with a temporal kernel runs per tap (CausalConv3d.partials).
    assert all(c.taps == c.tappable for c in convs) and any(c.taps for c in convs)
    dec = vae.stream_decoder()
    pieces = [dec.decode(z[:, :, :1]), dec.decode(z[:, :, 1:4]), dec.decode(z[:, :, 4:])]
    assert pieces[1].is_contiguous(memory_format=torch.channels_last_3d)
    assert all(t.is_contiguous(memory_format=torch.channels_last_3d) for t in dec.cache.slots if t is not None)
    torch.testing.assert_close(torch.cat(pieces, dim=2), decoded, rtol=0, atol=1e-5)
    torch.testing.assert_close(vae.encode(x), encoded, rtol=0, atol=1e-5)
    vae.set_channels_last(False)
    assert not vae.channels_last and conv.weight.is_contiguous() and not any(c.taps for c in convs)
    torch.testing.assert_close(vae.decode(z), decoded, rtol=0, atol=0)


# --- condition latents per picture ----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["streaming", "official"])
def test_a_picture_is_encoded_once_and_its_latents_handed_out_as_copies(vae, mode):
    from liveavatar_core.decoding import CONDITIONS_KEPT, _encode_condition, condition_latents

    encodes = []
    hook = vae.encoder.register_forward_pre_hook(lambda *_: encodes.append(1))
    try:
        pictures = [_pixels(1, seed=s)[0, :, 0] for s in range(CONDITIONS_KEPT + 1)]
        first = condition_latents(vae, pictures[0], mode, 9)
        n = len(encodes)
        assert n > 0
        again = condition_latents(vae, pictures[0].clone(), mode, 9)  # the same picture, another tensor
        assert len(encodes) == n
        fresh = _encode_condition(vae, pictures[0], mode, 9)
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, again, fresh))
        again[1].add_(1)  # a caller's changes stay its own
        assert torch.equal(condition_latents(vae, pictures[0], mode, 9)[1], fresh[1])
        for p in pictures[1:]:  # more pictures than are kept: the first is encoded again
            condition_latents(vae, p, mode, 9)
        before = len(encodes)
        condition_latents(vae, pictures[0], mode, 9)
        assert len(encodes) > before
        before = len(encodes)
        condition_latents(vae, pictures[0], mode, 5)  # another motion length is another encode
        assert len(encodes) > before
    finally:
        hook.remove()


def test_a_kept_warm_decoder_state_skips_the_warm_up_and_decodes_the_same(vae):
    """The second video of a picture starts from the warmed decoder state kept by the first: no
    warm-up decode, the same frames. One picture is kept; keep_warm=False lets it go."""
    from liveavatar_core.decoding import DECODER_WARMUP_LATENTS, start_decoder
    from liveavatar_core.pipeline import GenerationSettings
    from liveavatar_core.sampling.generator import LatentBlock

    settings = GenerationSettings(mode="streaming")
    passes = []
    hook = vae.decoder.register_forward_pre_hook(lambda *_: passes.append(1))
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, vae.cfg.z_dim, 3, 2, 4, generator=g)
    picture, other = (_pixels(1, seed=s)[0, :, 0] for s in (7, 8))

    def video(image, keep_warm=True):
        before = len(passes)
        _, motion, decode = start_decoder(vae, image, settings, 9, lambda _n: True, keep_warm=keep_warm)
        warm_up = len(passes) - before
        assert warm_up in (0, min(DECODER_WARMUP_LATENTS, motion.shape[2]))  # one pass per latent, or none
        return warm_up, decode.launch(None, LatentBlock(0, 0, 0, latents, False)).result()

    try:
        warm_up, frames = video(picture)
        assert warm_up > 0
        again = video(picture)
        assert again[0] == 0 and np.array_equal(again[1], frames)
        assert video(other)[0] > 0  # another picture replaces the kept state
        assert video(picture)[0] > 0
        video(picture, keep_warm=False)  # lets the kept state go
        assert video(picture)[0] > 0
    finally:
        hook.remove()
