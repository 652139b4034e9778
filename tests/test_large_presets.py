"""The large official presets run: the condition cache is sized from the output area.

The official code allocates a fixed 2800-token condition cache and crashes above 720*400-class
sizes (spec/pipeline.md 8.12); every official preset must work here, end to end through the size
search, the sink and one denoising call of the fixture DiT.
"""

import pytest
import torch

from liveavatar_core.encoders.image import output_size, target_area
from liveavatar_core.model.cache import make_step_caches, tokens_per_frame
from liveavatar_core.weights.dit import load_dit_checkpoint
from tests.dit_support import build_dit

OFFICIAL_CAPACITY = 2800


@pytest.fixture(scope="module")
def dit(ckpt_dir):
    ckpt = load_dit_checkpoint(ckpt_dir)
    return build_dit(ckpt, torch.float32)


# The largest official preset; the smaller ones that crash officially (1024*704, 480*832) need fewer tokens.
@pytest.mark.parametrize("preset,image_hw", [("1280*720", (720, 1280))])
def test_large_preset_sink_and_block(dit, preset, image_hw):
    h, w = output_size(*image_hw, target_area(preset))
    lat_h, lat_w = h // 8, w // 8
    cfg = dit.cfg
    fs = tokens_per_frame(cfg, lat_h, lat_w)
    g = torch.Generator().manual_seed(0)
    caches = make_step_caches(cfg, lat_h, lat_w, num_steps=1, cache_frames=3, dtype=torch.float32)
    cond = dit.sink(torch.randn(1, 16, 1, lat_h, lat_w, generator=g),
                    torch.randn(1, 16, 19, lat_h, lat_w, generator=g), torch.randn(5, cfg.text_dim, generator=g),
                    caches)
    assert cond.num_tokens * 2 == 5 * fs and cond.num_tokens > OFFICIAL_CAPACITY
    x = torch.randn(1, 16, 3, lat_h, lat_w, generator=g)
    audio = torch.randn(1, cfg.num_wav2vec_layers, cfg.audio_dim, 12, generator=g)
    out = dit.denoise_block(x, 900.0, torch.randn(5, cfg.text_dim, generator=g), audio, None, caches[0], 0, 10)
    assert out.shape == x.shape and torch.isfinite(out).all()
