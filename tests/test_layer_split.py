"""Layer ranges in one process: the pieces of a DiT call run per range of layers, each range with
caches holding only its layers, give the whole call's results bit for bit (spec/parallel.md 2, the
layer layout), and sampler states split into layer parts and merge back unchanged."""

import functools
from dataclasses import replace

import pytest
import torch

from liveavatar_core.errors import InputError
from liveavatar_core.loading import drop_other_layers
from liveavatar_core.model.cache import make_step_caches, tokens_per_frame
from liveavatar_core.placement import apply_block_swap, make_streamed_step_caches
from liveavatar_core.plan import plan_run
from liveavatar_core.sampling.config import SamplerConfig
from liveavatar_core.sampling.generator import BlockSampler
from liveavatar_core.sampling.state import load_state, merge_stage_states, restore_cond, save_state, stage_part
from liveavatar_core.weights.dit import load_dit_checkpoint
from tests.dit_support import build_dit

LAT_H, LAT_W = 8, 16
CACHE_FRAMES = 6  # two blocks of 3: the ring rolls from the third block on
STEPS = 2
BLOCKS = 4
# Reference offsets 24 + 2b + i: from block 2 on the reference keys move (offset.reference_time),
# so the per-call condition rotation is exercised, not only its resting position.
SPLITS = [(1,), (2,), (3,), (1, 3)]  # interior cut points of the 4 fixture layers


@pytest.fixture(scope="module")
def model(ckpt_dir):
    return build_dit(load_dit_checkpoint(ckpt_dir)).eval()


@pytest.fixture(scope="module")
def inputs(model):
    cfg = model.cfg
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    return dict(ref=r(1, cfg.in_dim, 1, LAT_H, LAT_W), motion=r(1, cfg.in_dim, cfg.motion_frames[1], LAT_H, LAT_W),
                context=r(7, cfg.text_dim), xs=[r(1, cfg.in_dim, 3, LAT_H, LAT_W) for _ in range(BLOCKS)],
                audio=r(1, cfg.num_wav2vec_layers, cfg.audio_dim, 12))


def ranges(n, cuts):
    bounds = (0, *cuts, n)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def whole(model, inp, factory=make_step_caches):
    """Text, sink, then BLOCKS x STEPS calls of the unsplit model through full caches."""
    caches = factory(model.cfg, LAT_H, LAT_W, num_steps=STEPS, cache_frames=CACHE_FRAMES, dtype=model.dtype)
    text = model.encode_text(inp["context"])
    cond = model.sink(inp["ref"], inp["motion"], text, caches)
    fs = tokens_per_frame(model.cfg, LAT_H, LAT_W)
    outs = [model.denoise_block(x, 1000.0 - 300 * i, text, inp["audio"], None, cache, 3 * b * fs, 24 + 2 * b + i)
            for b, x in enumerate(inp["xs"]) for i, cache in enumerate(caches)]
    return text, cond, caches, outs


def split(model, inp, parts, factory=make_step_caches):
    """The same rollout with each layer range as its own rank would run it: its own text K/V,
    sink pass and step caches; only the hidden state crosses from one range to the next.
    `model`: one model for every range, or one per range (a rank's, holding only its layers)."""
    models = model if isinstance(model, list) else [model] * len(parts)
    model = models[0]
    cfg = model.cfg
    fs = tokens_per_frame(cfg, LAT_H, LAT_W)
    caches = [factory(cfg, LAT_H, LAT_W, num_steps=STEPS, cache_frames=CACHE_FRAMES, dtype=model.dtype, layers=p)
              for p in parts]
    texts = [m.encode_text(inp["context"], layers=p) for m, p in zip(models, parts)]
    conds, h = [], None
    for k, (m, p) in enumerate(zip(models, parts)):
        call = m.begin_sink(inp["ref"], inp["motion"], texts[k], embed=k == 0)
        if k:
            call.h = h
        h = m.sink_layers(call, p)
        conds.append(m.finish_sink(call, caches[k]))
    outs = []
    shape_only = torch.empty(inp["xs"][0].shape, device="meta")
    for b, x in enumerate(inp["xs"]):
        for i in range(STEPS):
            h = None
            for k, (m, p) in enumerate(zip(models, parts)):
                call = m.begin_block(x if k == 0 else shape_only, 1000.0 - 300 * i, texts[k], inp["audio"], None,
                                     caches[k][i], 3 * b * fs, 24 + 2 * b + i, embed=k == 0)
                if k:
                    call.h = h
                h = m.run_layers(call, p, caches[k][i])
            outs.append(models[-1].finish_block(call))
    return texts, conds, caches, outs


@pytest.fixture(scope="module")
def reference(model, inputs):
    return whole(model, inputs)


@pytest.mark.parametrize("cuts", SPLITS)
def test_layer_ranges_give_the_whole_model_bit_for_bit(model, inputs, reference, cuts):
    text, cond, caches, outs = reference
    parts = ranges(model.cfg.num_layers, cuts)
    p_texts, p_conds, p_caches, p_outs = split(model, inputs, parts)
    assert len(p_outs) == len(outs)
    for a, b in zip(outs, p_outs):
        assert torch.equal(a, b)
    # Each range computed and stored its own layers only; together they are the whole caches.
    for p, t, c, cs in zip(parts, p_texts, p_conds, p_caches):
        assert t.layers == c.layers == p and len(t.kv) == len(c.k) == len(p)
        assert all(kc.layers == p and kc.k.shape[0] == len(p) for kc in cs)
    assert all(torch.equal(a, b) for (ka, va), (kb, vb) in zip(text.kv, [kv for t in p_texts for kv in t.kv])
               for a, b in ((ka, kb), (va, vb)))
    assert all(torch.equal(a, b) for a, b in zip(cond.k + cond.v, [k for c in p_conds for k in c.k]
                                                  + [v for c in p_conds for v in c.v]))
    for i, cache in enumerate(caches):
        for name, t in cache.tensors().items():
            assert torch.equal(t, torch.cat([cs[i].tensors()[name] for cs in p_caches]))


def test_streamed_caches_of_a_layer_range_are_bit_identical(model, inputs, reference):
    parts = ranges(model.cfg.num_layers, (2,))

    def streamed(*args, **kwargs):
        return make_streamed_step_caches(*args, device="cpu", **kwargs)
    _, _, p_caches, p_outs = split(model, inputs, parts, streamed)
    for a, b in zip(reference[3], p_outs):
        assert torch.equal(a, b)
    for i, cache in enumerate(reference[2]):
        assert torch.equal(cache.k, torch.cat([cs[i].k for cs in p_caches]))


def test_layer_ranges_under_block_swap_and_compiled_regions(ckpt_dir, inputs, reference):
    """The pieces keep the placement hooks and compiled regions of the whole call."""
    model = build_dit(load_dit_checkpoint(ckpt_dir)).eval()
    apply_block_swap(model, 1, "cpu")
    parts = ranges(model.cfg.num_layers, (1, 3))
    assert all(torch.equal(a, b) for a, b in zip(reference[3], split(model, inputs, parts)[3]))
    torch._dynamo.reset()
    model.compile_regions(backend="aot_eager", fullgraph=True)
    try:
        outs = split(model, inputs, parts)[3]
    finally:
        model.compile_regions(False)
    assert all(torch.equal(a, b) for a, b in zip(reference[3], outs))


def test_a_rank_swaps_blocks_of_its_own_layers(ckpt_dir, inputs, reference):
    """A layer layout rank holding only its layers (the others on the meta device) may swap some
    of them, as the planner chooses for a card too small even for its share."""
    parts = ranges(4, (2,))
    models = []
    for p in parts:
        m = build_dit(load_dit_checkpoint(ckpt_dir)).eval()
        plan = plan_run(m.cfg, devices=[], precision="fp32")
        drop_other_layers(m, p, plan)
        swap = apply_block_swap(m, 1, "cpu", layers=(p[-1],))
        models.append((m, swap))
    outs = split([m for m, _ in models], inputs, parts)[3]
    assert all(torch.equal(a, b) for a, b in zip(reference[3], outs))
    assert all(swap.loads > 0 for _, swap in models)
    owned = replace(plan, owned=range(2, 4), swapped=(3,))
    with pytest.raises(InputError, match="not all among the layers 0-1"):
        drop_other_layers(build_dit(load_dit_checkpoint(ckpt_dir)), range(0, 2), owned)


def test_layers_outside_a_range_are_refused(model, inputs):
    cfg = model.cfg
    text = model.encode_text(inputs["context"], layers=range(1, 3))
    with pytest.raises(InputError, match="text_cache"):
        text.layer_kv(0)
    caches = make_step_caches(cfg, LAT_H, LAT_W, num_steps=1, cache_frames=CACHE_FRAMES, dtype=model.dtype,
                              layers=range(1, 3))
    with pytest.raises(InputError, match="kv_cache"):
        caches[0].local(3)
    for bad in (range(0), range(2, 9), range(0, 4, 2), (0, 2)):
        with pytest.raises(InputError, match="layers"):
            make_step_caches(cfg, LAT_H, LAT_W, num_steps=1, cache_frames=CACHE_FRAMES, layers=bad)
    call = model.begin_sink(inputs["ref"], inputs["motion"], text, embed=False)
    with pytest.raises(InputError, match="hidden state"):
        model.sink_layers(call, range(1, 3))


def test_sampler_state_splits_into_layer_parts_and_merges_back(model, inputs, tmp_path):
    config = SamplerConfig(steps=STEPS, frames_per_clip=24, seed=5)
    sampler = BlockSampler(model, inputs["context"], inputs["ref"], inputs["motion"], config)
    audio = torch.randn(1, model.cfg.num_wav2vec_layers, model.cfg.audio_dim, 48, generator=torch.Generator()
                        .manual_seed(1))
    blocks = sampler.run(audio)
    for _ in range(3):  # into clip 1: the rings have rolled
        next(blocks)
    state = sampler.state_dict()
    steps = tuple(range(STEPS))
    for cuts in SPLITS:
        parts = []
        for k, p in enumerate(ranges(model.cfg.num_layers, cuts)):
            # Through a file, as a rank's part travels; its condition cache is its layers'.
            save_state(stage_part(state, steps, p), tmp_path / f"part{k}.pt")
            parts.append(load_state(tmp_path / f"part{k}.pt"))
            cond = restore_cond(parts[-1]["meta"], parts[-1]["tensors"], "cpu", model.dtype)
            assert cond.layers == p
            assert all(torch.equal(a, b) for a, b in zip(cond.k, sampler.caches[0].cond.k[p.start:p.stop]))
        merged = merge_stage_states(parts, finishing=len(parts) - 1)
        assert merged["meta"] == state["meta"]
        assert merged["tensors"].keys() == state["tensors"].keys()
        assert all(torch.equal(merged["tensors"][k], v) for k, v in state["tensors"].items())
    # Cells of both layouts: steps on some ranks, layer ranges of one step on others.
    cells = [stage_part(state, (0,)), stage_part(state, (1,), range(0, 1)), stage_part(state, (1,), range(1, 4))]
    merged = merge_stage_states(cells, finishing=2)
    assert all(torch.equal(merged["tensors"][k], v) for k, v in state["tensors"].items())
    # A rank's sampler with caches of its layers loads its part and saves it back unchanged.
    part = stage_part(state, steps, range(1, 3))
    rank = BlockSampler(model, inputs["context"], inputs["ref"], inputs["motion"], config,
                        cache_factory=functools.partial(make_step_caches, layers=range(1, 3)))
    rank.load_state_dict(part)
    assert rank.caches[0].cond.layers == range(1, 3)
    again = rank.state_dict()
    assert again["meta"] == part["meta"] and again["tensors"].keys() == part["tensors"].keys()
    assert all(torch.equal(again["tensors"][k], v) for k, v in part["tensors"].items())
    with pytest.raises(InputError, match="layer range missing"):
        merge_stage_states(cells[:1] + cells[2:], finishing=1)
    with pytest.raises(InputError, match="already one rank's part"):
        stage_part(cells[1], steps, range(0, 1))
