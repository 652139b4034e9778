"""Placement: block swap, streamed KV caches and component offload give the unplaced model's results.

On the CPU the transfers run synchronously through the same code paths (packing, slots, staging,
write-back, prefetch order); results must be bit-identical. The CUDA tests (side streams, pinned
memory, overlap) skip without a GPU.
"""

import pytest
import torch

from liveavatar_core.model.cache import make_step_caches, tokens_per_frame
from liveavatar_core.model.dit import LiveAvatarDiT
from liveavatar_core.ops.fp8 import FP8Linear, fp8_targets
from liveavatar_core.placement import apply_block_swap, make_streamed_step_caches, on_device
from liveavatar_core.placement.kv_stream import StreamedKVCache
from liveavatar_core.sampling.config import SamplerConfig
from liveavatar_core.sampling.generator import BlockSampler
from liveavatar_core.weights.dit import load_dit_checkpoint
from tests.dit_support import build_dit

LAT_H, LAT_W = 8, 16
CACHE_FRAMES = 6  # two blocks of 3: the ring rolls from the third block on
STEPS = 2
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def ckpt(ckpt_dir):
    return load_dit_checkpoint(ckpt_dir)


def build(ckpt, device="cpu", dtype=torch.float32) -> LiveAvatarDiT:
    return build_dit(ckpt, dtype, device).eval()


def inputs(cfg, seed=0, device="cpu", dtype=torch.float32, blocks=4):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)
    return dict(ref=r(1, cfg.in_dim, 1, LAT_H, LAT_W), motion=r(1, cfg.in_dim, cfg.motion_frames[1], LAT_H, LAT_W),
                context=r(7, cfg.text_dim).to(dtype),
                xs=[r(1, cfg.in_dim, 3, LAT_H, LAT_W).to(dtype) for _ in range(blocks)],
                audio=r(1, cfg.num_wav2vec_layers, cfg.audio_dim, 12).to(dtype))


def rollout(model, caches, inp):
    """Sink, then the input's blocks (4: the ring rolls at block 2) x STEPS steps through per-step
    caches."""
    fs = tokens_per_frame(model.cfg, LAT_H, LAT_W)
    text = model.encode_text(inp["context"])
    model.sink(inp["ref"], inp["motion"], text, caches)
    outs = []
    for b, x in enumerate(inp["xs"]):
        for i, cache in enumerate(caches):
            outs.append(model.denoise_block(x, 1000.0 - 300 * i, text, inp["audio"], None, cache, 3 * b * fs,
                                            4 + b + i))
    return outs, [(c.k.clone(), c.v.clone()) for c in caches]


def plain_caches(model, device="cpu", dtype=torch.float32):
    return make_step_caches(model.cfg, LAT_H, LAT_W, num_steps=STEPS, cache_frames=CACHE_FRAMES, dtype=dtype,
                            device=device)


def streamed_caches(model, device="cpu", dtype=torch.float32):
    return make_streamed_step_caches(model.cfg, LAT_H, LAT_W, num_steps=STEPS, cache_frames=CACHE_FRAMES,
                                     dtype=dtype, device=device)


@pytest.fixture(scope="module")
def reference(ckpt):
    model = build(ckpt)
    return rollout(model, plain_caches(model), inputs(model.cfg))


def assert_same(a, b):
    (outs_a, caches_a), (outs_b, caches_b) = a, b
    assert len(outs_a) == len(outs_b)
    for x, y in zip(outs_a, outs_b):
        assert torch.equal(x, y)
    for (ka, va), (kb, vb) in zip(caches_a, caches_b):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.parametrize("blocks_on_gpu", [0, 1, 3])
def test_block_swap_is_bit_identical(ckpt, reference, blocks_on_gpu):
    model = build(ckpt)
    swap = apply_block_swap(model, blocks_on_gpu, "cpu")
    n_swapped = model.cfg.num_layers - blocks_on_gpu
    assert len(swap.units) == n_swapped
    assert_same(rollout(model, plain_caches(model), inputs(model.cfg)), reference)
    if n_swapped > 1:
        # Each swapped unit is loaded once per pass over the layers (text K/V, sink, each call),
        # plus the prefetch of the first unit for a next pass.
        passes = 1 + 1 + len(reference[0])
        assert swap.loads == n_swapped * passes + 1
    # Outside use, swapped weights are the host copies, never a staging slot.
    for unit in swap.units.values():
        if unit.slot is None:
            for (sub, name, is_param, *_), view in zip(unit.tensors, unit.host_views):
                t = getattr(sub, name)
                assert t.data_ptr() == view.data_ptr()


def test_block_swap_moves_units_with_their_audio_injector(ckpt):
    model = build(ckpt)
    injected = model.cfg.audio_inject_layers[0]
    swap = apply_block_swap(model, model.cfg.num_layers - 1, "cpu", layers=(injected,))
    unit = swap.units[injected]
    slot = model.audio_injector.slot[injected]
    owners = {id(sub) for sub, *_ in unit.tensors}
    assert id(model.audio_injector.injector[slot].q) in owners
    assert id(model.audio_injector.injector_adain_layers[slot].linear) in owners
    assert id(model.blocks[injected].ffn[0]) in owners


def fp8_on_cpu(model: LiveAvatarDiT) -> LiveAvatarDiT:
    """`ops.fp8.convert_to_fp8` without its GPU check: CPU PyTorch runs `torch._scaled_mm` too."""
    for name in fp8_targets(model):
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, FP8Linear.from_linear(getattr(model.get_submodule(parent), leaf)))
    return model


# CPU PyTorch multiplies e4m3 matrices with a slow reference kernel (about 4 s a block call here,
# 17 times bf16): the FP8 tests roll out 2 blocks, which still load every swapped unit 4 times.
FP8_BLOCKS = 2


def fp8_inputs(cfg):
    return inputs(cfg, dtype=torch.bfloat16, blocks=FP8_BLOCKS)


@pytest.fixture(scope="module")
def fp8_reference(ckpt):
    model = fp8_on_cpu(build(ckpt, dtype=torch.bfloat16))
    inp = fp8_inputs(model.cfg)
    return rollout(model, plain_caches(model, dtype=torch.bfloat16), inp)


@pytest.mark.parametrize("blocks_on_gpu", [0, 2])
def test_block_swap_of_fp8_blocks_is_bit_identical(ckpt, fp8_reference, blocks_on_gpu):
    """Swap units holding e4m3 weights, their fp32 scales and bf16 biases pack and load intact."""
    model = fp8_on_cpu(build(ckpt, dtype=torch.bfloat16))
    swap = apply_block_swap(model, blocks_on_gpu, "cpu")
    dtypes = {dtype for unit in swap.units.values() for *_, dtype, _ in unit.tensors}
    assert {torch.float8_e4m3fn, torch.float32, torch.bfloat16} <= dtypes
    assert_same(rollout(model, plain_caches(model, dtype=torch.bfloat16),
                        fp8_inputs(model.cfg)), fp8_reference)


def test_compiled_fp8_blocks_with_block_swap_share_their_graphs(ckpt, fp8_reference):
    """Swapping replaces the scale buffers of a unit at every load: the compiled regions must treat
    them as inputs (no recompilation per layer or per load) and give the eager results exactly
    (aot_eager runs the same kernels)."""
    from torch._dynamo.utils import counters

    model = fp8_on_cpu(build(ckpt, dtype=torch.bfloat16))
    apply_block_swap(model, 1, "cpu")
    torch._dynamo.reset()
    counters.clear()
    model.compile_regions(backend="aot_eager", fullgraph=True)
    try:
        inp = fp8_inputs(model.cfg)
        first = rollout(model, plain_caches(model, dtype=torch.bfloat16), inp)
        graphs = counters["stats"]["unique_graphs"]
        again = rollout(model, plain_caches(model, dtype=torch.bfloat16), inp)
        assert counters["stats"]["unique_graphs"] == graphs, "a second stream recompiled"
    finally:
        model.compile_regions(False)
    assert graphs <= 7 < model.cfg.num_layers * 2 * len(fp8_reference[0])
    for a, b, c in zip(first[0], again[0], fp8_reference[0]):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_streamed_kv_cache_is_bit_identical(ckpt, reference):
    model = build(ckpt)
    caches = streamed_caches(model)
    assert all(isinstance(c, StreamedKVCache) for c in caches)
    assert_same(rollout(model, caches, inputs(model.cfg)), reference)
    streamer = caches[0].streamer
    # One fetch per layer per call (plus the sink-free text pass fetches nothing).
    assert streamer.fetches == model.cfg.num_layers * len(reference[0])


def test_block_swap_and_streamed_kv_together(ckpt, reference):
    model = build(ckpt)
    apply_block_swap(model, 2, "cpu")
    assert_same(rollout(model, streamed_caches(model), inputs(model.cfg)), reference)


def test_streamed_caches_in_the_block_sampler_and_resume(ckpt):
    """The sampler's own loop and its resume state work with host-resident rings."""
    model = build(ckpt)
    inp = inputs(model.cfg)
    cfg = SamplerConfig(frames_per_clip=24, steps=STEPS, seed=3)
    audio = torch.randn(1, model.cfg.num_wav2vec_layers, model.cfg.audio_dim, 48, generator=torch.Generator()
                        .manual_seed(1))

    def sampler(streamed):
        s = BlockSampler(model, inp["context"], inp["ref"], inp["motion"], cfg)
        if streamed:
            s.caches = make_streamed_step_caches(model.cfg, LAT_H, LAT_W, num_steps=STEPS,
                                                 cache_frames=s.latent_frames, dtype=s.dtype, device="cpu")
        return s

    want = [b.latents.clone() for b in sampler(False).run(audio)]
    s = sampler(True)
    it = s.run(audio)
    got = [next(it).latents.clone() for _ in range(3)]
    state = s.state_dict()
    resumed = sampler(True)
    resumed.load_state_dict(state)
    got += [b.latents.clone() for b in resumed.run(audio)]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_on_device_returns_component_home():
    lin = torch.nn.Linear(4, 4)
    with on_device(lin, "cpu") as m:
        assert m is lin
    assert lin.weight.device.type == "cpu"


# --- GPU: real side streams, pinned memory, overlap --------------------------------------------

@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (side streams and pinned memory)")
@pytest.mark.parametrize("swap_blocks, stream_kv", [(True, False), (False, True), (True, True)])
def test_gpu_placement_is_bit_identical(ckpt, swap_blocks, stream_kv):
    dtype = torch.bfloat16
    model = build(ckpt, "cuda", dtype)
    inp = inputs(model.cfg, device="cuda", dtype=dtype)
    want = rollout(model, plain_caches(model, "cuda", dtype), inp)
    placed = build(ckpt, "cpu", dtype)
    if swap_blocks:
        apply_block_swap(placed, 1, "cuda")
    else:
        placed.to("cuda")
    caches = streamed_caches(placed, "cuda", dtype) if stream_kv else plain_caches(placed, "cuda", dtype)
    got = rollout(placed, caches, inp)
    torch.cuda.synchronize()
    assert_same((got[0], [(k.cuda(), v.cuda()) for k, v in got[1]]), want)
    if stream_kv:
        assert caches[0].host_k.is_pinned()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_on_device_frees_memory():
    lin = torch.nn.Linear(1024, 1024)
    before = torch.cuda.memory_allocated()
    with on_device(lin, "cuda") as m:
        assert m.weight.is_cuda
        assert torch.cuda.memory_allocated() > before
    assert not lin.weight.is_cuda and torch.cuda.memory_allocated() == before
