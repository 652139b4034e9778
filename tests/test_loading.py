"""Generator loading refuses impossible placements before reading any weight."""

import pytest

from liveavatar_core.errors import InputError
from liveavatar_core.loading import load_generator, official_folder


@pytest.mark.parametrize("kwargs,name", [
    ({"offload": "block_swap", "blocks_on_gpu": 10}, "offload"),
    ({"precision": "fp8"}, "fp8"),
    ({"precision": "int4"}, "precision"),
    ({"attention": "nope"}, "attention"),
    ({"offload": "sideways"}, "offload"),
    ({"kv_cache_dtype": "int8"}, "kv_cache_dtype"),
    ({"kv_cache_dtype": "fp8", "precision": "fp32"}, "kv_cache_dtype"),
])
def test_impossible_placements_refused(ckpt_dir, kwargs, name):
    folder = official_folder(ckpt_dir)
    with pytest.raises(InputError) as err:
        load_generator(folder.dit, folder.vae, None, dit_device="cpu", **kwargs)
    assert str(err.value).startswith(f"{name}:") and "Fix:" in str(err.value)


def test_official_folder_names_missing_parts(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="diffusion_pytorch_model.*models_t5_umt5-xxl-enc-bf16.pth"):
        official_folder(tmp_path)


def test_fp8_kv_cache_streams_a_video(ckpt_dir, fixtures):
    """Loaded with kv_cache_dtype='fp8', the generator's step caches are FP8 rings and a stream
    runs through them: the first block (it attends only to itself) equals the bf16-cache run."""
    import numpy as np
    import torch

    from liveavatar_core.encoders.audio import AudioFeatures
    from liveavatar_core.pipeline import GenerationSettings, generate

    folder = official_folder(ckpt_dir)
    runs = {}
    for kv in ("auto", "fp8"):
        model = load_generator(folder.dit, folder.vae, None, precision="bf16", dit_device="cpu", kv_cache_dtype=kv)
        fp8 = kv == "fp8"
        assert (model.kv_cache_dtype == "fp8") == fp8 and ("FP8 KV cache" in model.description) == fp8
        cfg = model.dit.cfg
        g = torch.Generator().manual_seed(0)
        audio = AudioFeatures(embedding=torch.randn(1, cfg.num_wav2vec_layers, cfg.audio_dim, 24, generator=g),
                              num_clips=1, available_clips=1, frames_per_clip=24, fps=25,
                              waveform_16k=np.zeros(16000, np.float32), duration_s=0.96)
        image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        stream = generate(model, torch.randn(5, cfg.text_dim, generator=g), audio, image,
                          GenerationSettings(size="64*64", num_clips=1, frames_per_clip=24, sample_steps=2))
        runs[kv] = [chunk.frames for chunk in stream]
    assert [len(c) for c in runs["fp8"]] == [len(c) for c in runs["auto"]]
    assert np.array_equal(runs["fp8"][0], runs["auto"][0])
    later = np.abs(runs["fp8"][1].astype(int) - runs["auto"][1].astype(int))
    assert later.mean() < 8
