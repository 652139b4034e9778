"""Step caches that keep a copy of the condition rows after the ring (`joint_cond`).

Once the ring is full a block attends to one contiguous key set instead of the ring and the
condition keys apart; the result must be the same as with the two sets concatenated, bit for bit
(on the CPU both are one softmax over the same keys in the same order), resume files must not see
the extra rows, and a condition cache of another size is refused.
"""

import pytest
import torch

from liveavatar_core.errors import InputError
from liveavatar_core.model.cache import make_step_caches
from liveavatar_core.model.framepack import condition_tokens
from liveavatar_core.sizes import geometry

from tests.test_placement import CACHE_FRAMES, LAT_H, LAT_W, STEPS, build, inputs, rollout


@pytest.fixture(scope="module")
def model(ckpt_dir):
    from liveavatar_core.weights.dit import load_dit_checkpoint

    return build(load_dit_checkpoint(ckpt_dir))


def _caches(model, joint, lat_h=LAT_H, lat_w=LAT_W):
    return make_step_caches(model.cfg, lat_h, lat_w, num_steps=STEPS, cache_frames=CACHE_FRAMES,
                            dtype=torch.float32, device="cpu", joint_cond=joint)


def test_joint_condition_rows_give_the_same_blocks(model):
    inp = inputs(model.cfg)
    want, want_rings = rollout(model, _caches(model, False), inp)
    caches = _caches(model, True)
    seen = []
    segments = type(caches[0]).segments

    def spy(self, layer, history, cond_k, cond_v):
        out = segments(self, layer, history, cond_k, cond_v)
        seen.append(len(out))
        return out
    type(caches[0]).segments = spy
    try:
        got, rings = rollout(model, caches, inp)
    finally:
        type(caches[0]).segments = segments
    layers, calls = model.cfg.num_layers, len(inp["xs"]) * STEPS
    # Block 0 sees a part of the ring (two sets); from block 1 on the ring is full (one set).
    assert seen == [2] * (STEPS * layers) + [1] * ((calls - STEPS) * layers)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for (k, v), (wk, wv) in zip(rings, want_rings):
        assert torch.equal(k, wk) and torch.equal(v, wv)
    cond = caches[0].cond
    assert torch.equal(caches[1]._v[:, :, caches[1].length:], torch.stack(cond.v))


def test_joint_rings_keep_resume_tensors_and_size_the_condition_rows(model):
    joint, apart = _caches(model, True)[0], _caches(model, False)[0]
    assert {n: t.shape for n, t in joint.tensors().items()} == {n: t.shape for n, t in apart.tensors().items()}
    rows = condition_tokens(model.cfg, LAT_H, LAT_W)
    assert joint.cond_rows == rows == geometry(model.cfg, 8 * LAT_H, 8 * LAT_W).cond_tokens
    other = _caches(model, True, lat_w=2 * LAT_W)[0]
    inp = inputs(model.cfg)
    model.sink(inp["ref"], inp["motion"], model.encode_text(inp["context"]), [apart])
    with pytest.raises(InputError, match=f"room for {other.cond_rows} condition rows.*holds {rows}"):
        other.cond = apart.cond
