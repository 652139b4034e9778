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
        assert model.vae.dtype == torch.float32  # on the CPU whatever the precision (plan.vae_compute)
    assert [len(c) for c in runs["fp8"]] == [len(c) for c in runs["auto"]]
    assert np.array_equal(runs["fp8"][0], runs["auto"][0])
    later = np.abs(runs["fp8"][1].astype(int) - runs["auto"][1].astype(int))
    assert later.mean() < 8


def test_loader_logs_its_plan_and_generate_rechecks_it_at_the_real_size(ckpt_dir, caplog):
    """The loader node cannot know the sampler's size: it plans for 704*384 and says so, and the
    stream re-plans the same placement at the real output size, refusing with the planner's message."""
    import dataclasses
    import logging

    import numpy as np
    import torch

    from liveavatar_core.encoders.audio import AudioFeatures
    from liveavatar_core.pipeline import GenerationSettings, generate
    from liveavatar_core.plan import DeviceSpec, plan_run
    from liveavatar_core.sizes import GiB

    folder = official_folder(ckpt_dir)
    with caplog.at_level(logging.INFO, logger="liveavatar"):
        model = load_generator(folder.dit, folder.vae, None, precision="bf16", dit_device="cpu")
    assert "Run plan: 704x384" in caplog.text and "re-checked at its own size" in caplog.text
    assert "placement: everything on the CPU" in caplog.text and "on the GPU" not in caplog.text
    assert (model.plan.geometry.height, model.plan.geometry.width) == (384, 704)

    cfg = model.dit.cfg
    # The same model as if loaded for a 2 GiB GPU: fine at 64x64, too small at 1024x1024.
    small_gpu = plan_run(cfg, size=(64, 64), devices=[DeviceSpec("cuda:0", 2 * GiB, "2 GiB GPU")],
                         host=DeviceSpec("cpu", 64 * GiB), text_encoder="cpu", audio_encoder="cpu").validate()
    model = dataclasses.replace(model, plan=small_gpu)
    g = torch.Generator().manual_seed(0)
    audio = AudioFeatures(embedding=torch.randn(1, cfg.num_wav2vec_layers, cfg.audio_dim, 24, generator=g),
                          num_clips=1, available_clips=1, frames_per_clip=24, fps=25,
                          waveform_16k=np.zeros(16000, np.float32), duration_s=1.0)
    text = torch.randn(5, cfg.text_dim, generator=g)
    settings = GenerationSettings(size="64*64", num_clips=1, frames_per_clip=24, sample_steps=2)
    generate(model, text, audio, np.zeros((64, 64, 3), np.uint8), settings)
    with pytest.raises(InputError) as err:
        generate(model, text, audio, np.zeros((1024, 1024, 3), np.uint8),
                 dataclasses.replace(settings, size="1024*1024"))
    assert err.value.input_name == "memory" and "1024x1024" in str(err.value) and "cuda:0" in str(err.value)
    short = dataclasses.replace(audio, duration_s=0.1)
    with pytest.raises(InputError, match="shorter than one block"):
        generate(model, text, short, np.zeros((64, 64, 3), np.uint8), settings)
