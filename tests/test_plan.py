"""Run planner: sizes from exact tensor counts, fits and refusals on injected GPUs, auto placement."""

import json
import math

import pytest
import torch

from liveavatar_core.config import DiTConfig
from liveavatar_core.errors import InputError
from liveavatar_core.model.cache import make_step_caches
from liveavatar_core.model.dit import LiveAvatarDiT
from liveavatar_core.ops.fp8 import fp8_targets
from liveavatar_core.plan import DeviceSpec, plan_run, swapped_layers
from liveavatar_core.sizes import (GiB, cond_cache_bytes, dit_tensor_bytes, dit_unit_bytes, geometry, is_fp8_target,
                                   kv_cache_bytes, vae_decoder_state_bytes)
from liveavatar_core.weights.dit import expected_dit_keys

CFG = DiTConfig.wan_s2v_14b()
HOST = DeviceSpec("cpu", 256 * GiB, "host")


def gpu(gib: float) -> list[DeviceSpec]:
    return [DeviceSpec("cuda:0", int(gib * GiB), f"test GPU {gib} GiB")]


def plan(gib: float = 80, **kw):
    kw.setdefault("host", HOST)
    return plan_run(CFG, devices=gpu(gib), **kw)


@pytest.fixture(scope="module")
def meta_model():
    with torch.device("meta"):
        return LiveAvatarDiT(CFG)


# --- sizes against the spec's figures (spec/dit.md 1, 2, 5; spec/pipeline.md 3.4) ---------------

def test_block_unit_is_one_description(meta_model):
    """The modules of each unit (what block swap moves) and the state-dict keys the planner sizes
    per unit are the same tensors: block i, plus its injector slot where layer i injects audio."""
    from liveavatar_core.model.dit import unit_of

    keys = {k for k, _ in meta_model.state_dict().items()}
    owned = {}
    for layer in range(CFG.num_layers):
        for module in meta_model.unit_modules(layer):
            prefix = next(n for n, m in meta_model.named_modules() if m is module)
            for name in module.state_dict():
                owned[f"{prefix}.{name}"] = layer
    assert all(unit_of(k, CFG) == owned.get(k) for k in keys)
    injected = [layer for layer in range(CFG.num_layers) if len(meta_model.unit_modules(layer)) == 3]
    assert injected == list(CFG.audio_inject_layers)
    assert sum(1 for k in keys if unit_of(k, CFG) is None) > 0  # the base: embeddings, head, audio encoder


def test_weight_bytes_match_spec():
    bf16 = dit_tensor_bytes(CFG, "bf16")
    assert len(bf16) == 1260
    assert round(sum(bf16.values()) / 1e9, 1) == 32.6
    # spec 5: 15,938,355,200 fp8 values + 357,400,409 bf16 values (+ one fp32 scale per FP8 layer).
    fp8 = dit_tensor_bytes(CFG, "fp8")
    n_fp8 = sum(1 for k, s in expected_dit_keys(CFG).items() if is_fp8_target(k, s))
    assert n_fp8 == 460
    assert sum(fp8.values()) == 15_938_355_200 + 2 * 357_400_409 + 4 * n_fp8


def test_fp8_rule_is_the_converters(meta_model):
    keys = expected_dit_keys(CFG)
    mine = {k[:-len(".weight")] for k, s in keys.items() if is_fp8_target(k, s)}
    assert mine == set(fp8_targets(meta_model))


def test_cache_sizes_match_spec():
    geo = geometry(CFG, 384, 704)
    assert (geo.tokens_per_frame, geo.cache_frames, geo.cache_tokens) == (1056, 12, 12672)
    assert geo.cond_tokens == 2640 == int(2.5 * geo.tokens_per_frame)
    assert round(kv_cache_bytes(CFG, geo, "bf16") / 1e9, 1) == 10.4
    # Official allocation: 2800 condition rows (spec/pipeline.md 3.4) -> 2.3 GB; ours holds 2640.
    official = cond_cache_bytes(CFG, geo, "bf16") * 2800 // geo.cond_tokens
    assert round(official / 1e9, 1) == 2.3


def test_flops_match_the_issue():
    p = plan()
    flops = sum(p.flops_per_call().values())
    assert 115e12 < flops < 125e12  # "about 120 TFLOP" per block call
    per_frame = flops * p.geometry.steps / (p.geometry.frames_per_block * 4)
    assert 38e12 < per_frame < 43e12  # "about 41 TFLOP per output frame"


def test_condition_tokens_equal_framepack_output(meta_model):
    for h, w in [(384, 704), (512, 512), (448, 768)]:
        geo = geometry(CFG, h, w)
        motion = torch.empty(1, 16, 19, h // 8, w // 8, device="meta")
        assert meta_model.frame_packer(motion).shape[1] + geo.tokens_per_frame == geo.cond_tokens


def test_kv_bytes_equal_allocated_caches(ckpt_dir):
    cfg = DiTConfig.from_json(ckpt_dir / "config.json")
    geo = geometry(cfg, 128, 256, steps=2)
    caches = make_step_caches(cfg, geo.latent_h, geo.latent_w, num_steps=2, cache_frames=geo.cache_frames,
                              dtype=torch.bfloat16)
    real = sum(c.k.nbytes + c.v.nbytes for c in caches)
    assert real == geo.steps * kv_cache_bytes(cfg, geo, "bf16")


def test_fp8_kv_bytes_equal_allocated_caches(ckpt_dir):
    from liveavatar_core.ops.fp8 import E4M3

    cfg = DiTConfig.from_json(ckpt_dir / "config.json")
    geo = geometry(cfg, 128, 256, steps=2)
    caches = make_step_caches(cfg, geo.latent_h, geo.latent_w, num_steps=2, cache_frames=geo.cache_frames,
                              dtype=torch.bfloat16, storage_dtype=E4M3)
    real = sum(t.nbytes for c in caches for t in c.tensors().values())
    assert real == geo.steps * kv_cache_bytes(cfg, geo, "fp8")


def test_fp8_kv_cache_halves_the_rings_and_is_offered_as_a_fix():
    bf16, fp8 = plan(141), plan(141, kv_cache_dtype="fp8")
    rings = {p.kv_cache_dtype: next(i.bytes for i in p.items if i.name == "KV caches") for p in (bf16, fp8)}
    assert rings["fp8"] == rings["bf16"] // 2 + rings["bf16"] // CFG.head_dim  # codes + bf16 scale per head row
    assert "KV cache fp8 on gpu" in fp8.summary()
    # FP8 weights with an FP8 ring fit a 48 GiB card whole; bf16 rings would be streamed.
    assert plan(48, precision="fp8", kv_cache_dtype="fp8", offload="model").fits()
    assert not plan(48, precision="fp8", offload="model").fits()
    with pytest.raises(InputError, match=r"kv_cache_dtype='fp8' \(saves \d+\.\d GiB"):
        plan(48, precision="fp8", offload="model").validate()
    # Streamed FP8 rings move half the bytes per call.
    moved = {d: plan(24, precision="fp8", kv_cache_location="cpu", kv_cache_dtype=d).transfer_bytes_per_call()
             for d in ("auto", "fp8")}
    assert moved["fp8"] < 0.52 * moved["auto"]
    with pytest.raises(InputError) as err:
        plan(80, precision="fp32", kv_cache_dtype="fp8")
    assert err.value.input_name == "kv_cache_dtype"


def test_fp8_blocks_are_swapped_on_small_cards():
    """16 GiB: FP8 weights do not fit whole, so auto swaps FP8 blocks, moving about half the
    bytes per call that bf16 blocks need; an FP8 ring lowers that further."""
    moved = {}
    for precision, kv in (("bf16", None), ("fp8", None), ("fp8", "fp8")):
        p = plan(16, precision=precision, kv_cache_dtype=kv, offload="auto").validate()
        assert p.swapped and p.streamed_kv_layers() == CFG.num_layers
        moved[precision, kv] = p.transfer_bytes_per_call()
    assert moved["fp8", None] < 0.6 * moved["bf16", None]
    assert moved["fp8", "fp8"] < moved["fp8", None]


def test_vae_state_formula_equals_streaming_decoder(ckpt_dir):
    from liveavatar_core.vae.loader import load_vae

    vae = load_vae(ckpt_dir / "Wan2.1_VAE.pth")
    h, w = 64, 128
    dec = vae.stream_decoder()
    dec.decode(torch.randn(1, vae.cfg.z_dim, 3, h // 8, w // 8))
    assert dec.state_bytes() == vae_decoder_state_bytes(h, w, base_dim=vae.cfg.base_dim, dtype="fp32")


def test_the_warmed_decoder_state_is_kept_only_where_it_fits():
    roomy = plan(80, precision="fp8")
    assert roomy.keep_warm_decoder
    kept = [i for i in roomy.items if i.name == "VAE warmed state (per picture)"]
    g = roomy.geometry
    assert [i.bytes for i in kept] == [vae_decoder_state_bytes(g.height, g.width, dtype="bf16")]
    # A cap with room for the run but not for the kept state as well: nothing is kept.
    tight = plan(80, precision="fp8", memory_cap=roomy.required_bytes("cuda:0") - 1).validate()
    assert not tight.keep_warm_decoder and all(i.name != kept[0].name for i in tight.items)
    assert tight.peak_bytes("cuda:0") == roomy.peak_bytes("cuda:0") - kept[0].bytes
    # Replanned at another size, it is kept where it fits at that size.
    assert roomy.replanned(384, 640).keep_warm_decoder and tight.replanned(384, 640).keep_warm_decoder
    assert not tight.replanned(384, 704).keep_warm_decoder


# --- fits, refusals, auto ---------------------------------------------------------------------

def test_80gib_fits_bf16_and_fp8_with_encoders_offloaded():
    for precision in ("bf16", "fp8"):
        p = plan(80, precision=precision, offload="model").validate()
        assert p.streamed_kv_layers() == 0 and not p.swapped
        assert p.transfer_bytes_per_call() == 0
    assert plan(80, precision="fp8").fits()
    bf16, fp8 = plan(80, offload="model"), plan(80, precision="fp8", offload="model")
    saved = bf16.peak_bytes("cuda:0") - fp8.peak_bytes("cuda:0")

    def item(p, name):
        return sum(i.bytes for i in p.items if i.name == name)
    # FP8 saves the weight bytes, plus what its block call needs less or more in activations; only
    # the FP8 plan has room to keep the warmed decoder state.
    assert not bf16.keep_warm_decoder and fp8.keep_warm_decoder
    assert saved == (sum(dit_tensor_bytes(CFG, "bf16").values()) - sum(dit_tensor_bytes(CFG, "fp8").values())
                     + item(bf16, "activations (block call)") - item(fp8, "activations (block call)")
                     - item(fp8, "VAE warmed state (per picture)"))


def test_refusal_names_numbers_and_fix():
    p = plan(48, memory_cap=48 * GiB)
    with pytest.raises(InputError) as err:
        p.validate()
    msg = str(err.value)
    assert msg.startswith("memory: needs ")
    assert (f"needs {p.required_bytes('cuda:0') / GiB:.1f} GiB on cuda:0, "
            f"has {p.budget_bytes('cuda:0') / GiB:.1f} GiB") in msg
    assert "kv_cache_location='cpu'" in msg and "offload='auto'" in msg


def test_refusal_suggests_fp8_when_it_fits_alone():
    # bf16 without the encoders needs ~74 GiB; fp8 saves ~15 GiB.
    p = plan(72, offload="model", audio_encoder="cpu", text_encoder="cpu")
    with pytest.raises(InputError, match=r"use fp8 \(saves 14\.\d GiB\)"):
        p.validate()


def test_refusal_when_nothing_fits():
    with pytest.raises(InputError, match="smaller output size or a GPU with more memory"):
        plan(6, precision="fp8").validate()


def test_auto_choices_per_budget():
    full = plan(80, offload="auto")
    assert full.fits() and full.transfer_bytes_per_call() == 0
    for cap in (48, 24):
        for precision in ("bf16", "fp8"):
            p = plan(80, precision=precision, offload="auto", memory_cap=cap * GiB).validate()
            assert p.required_bytes("cuda:0") <= cap * GiB
            assert p.note.startswith("auto:")
    # 48 GiB: streaming the KV rings is enough, no block leaves the GPU.
    assert not plan(80, offload="auto", memory_cap=48 * GiB).swapped
    # 24 GiB: bf16 weights alone exceed it, so blocks are swapped; fp8 weights fit.
    assert plan(80, offload="auto", memory_cap=24 * GiB).swapped
    assert not plan(80, precision="fp8", offload="auto", memory_cap=24 * GiB).swapped


def test_auto_moves_fewest_bytes_among_fitting_placements():
    best = plan(80, offload="auto", memory_cap=30 * GiB)
    for n in range(0, 41, 2):
        for kv in ("gpu", "cpu"):
            cand = plan(80, offload="block_swap", blocks_on_gpu=n, kv_cache_location=kv,
                        memory_cap=30 * GiB, text_encoder="offload", audio_encoder="offload")
            if cand.fits():
                assert cand.transfer_bytes_per_call() >= best.transfer_bytes_per_call()


def test_block_swap_accounting():
    p = plan(80, offload="block_swap", blocks_on_gpu=24)
    assert len(p.swapped) == 16 and p.blocks_on_gpu == 24
    base, units = dit_unit_bytes(CFG, "bf16")
    assert base + sum(units) == sum(dit_tensor_bytes(CFG, "bf16").values())
    assert p.transfer_bytes_per_call() == sum(units[i] for i in p.swapped)
    host = {i.name: i.bytes for i in p.items if i.device == "cpu"}
    assert host["swapped DiT blocks (pinned)"] == sum(units[i] for i in p.swapped)
    # Spread evenly: never two swapped blocks in a row when fewer than half are swapped.
    assert all(b - a > 1 for a, b in zip(p.swapped, p.swapped[1:]))
    assert swapped_layers(40, 40) == () and swapped_layers(40, 0) == tuple(range(40))


def test_memory_cap_fraction():
    p = plan(80, memory_cap=0.5)
    assert p.memory_cap_bytes == 40 * GiB and p.budget_bytes("cuda:0") == 40 * GiB


def test_cpu_only_plan_is_valid():
    p = plan_run(CFG, devices=[], host=HOST, size="704*384", text_encoder="offload").validate()
    assert p.dit_device == "cpu" and {i.device for i in p.items} == {"cpu"}
    # Said in CPU words: nothing claims a GPU, and an "offloaded" encoder is counted once.
    assert p.placement_words() == "everything on the CPU (no GPU in this plan)"
    assert "GPU" not in p.summary().replace("no GPU", "").replace("host->GPU", "")
    assert sum(1 for i in p.items if i.name.startswith("umT5")) == 1
    assert p.to_dict()["vae"] == "cpu" and p.to_dict()["kv_cache_location"] == "cpu"
    gpu_plan = plan(80)
    assert gpu_plan.placement_words() == "DiT, caches and VAE on the GPU"
    assert plan(80, vae="cpu").placement_words() == "DiT and caches on the GPU, VAE on the CPU"
    with pytest.raises(InputError, match="no GPU"):
        plan_run(CFG, devices=[], host=HOST, kv_cache_location="cpu")


def test_a_cpu_vae_is_planned_in_float32():
    """bf16 3-D convolutions are ~900x slower than fp32 ones on the CPU: a VAE there computes in
    fp32, and its weights and state are planned at four bytes an element."""
    def vae_bytes(p, device):
        return sum(i.bytes for i in p.items if i.name in ("VAE weights", "VAE streaming state") and i.device == device)

    on_cpu, on_gpu = plan(80, vae="cpu"), plan(80)
    assert vae_bytes(on_cpu, "cpu") == 2 * vae_bytes(on_gpu, "cuda:0") > 0
    fp32 = plan_run(CFG, devices=[], host=HOST, precision="fp32")
    assert vae_bytes(plan_run(CFG, devices=[], host=HOST), "cpu") == vae_bytes(fp32, "cpu") > 0


@pytest.mark.parametrize("kw, name", [
    (dict(offload="swap"), "offload"),
    (dict(offload="block_swap"), "blocks_on_gpu"),
    (dict(offload="block_swap", blocks_on_gpu=41), "blocks_on_gpu"),
    (dict(blocks_on_gpu=10), "blocks_on_gpu"),
    (dict(kv_cache_dtype="fp32"), "kv_cache_dtype"),
    (dict(size="32*32"), "size"),
    (dict(size=(384, 700)), "size"),
    (dict(frames_per_clip=50), "frames_per_clip"),
    (dict(vae="tpu"), "vae"),
])
def test_bad_settings_are_refused(kw, name):
    with pytest.raises(InputError) as err:
        plan(80, **kw)
    assert err.value.input_name == name


def test_plans_at_the_output_size_and_replans_with_the_same_placement():
    """A (height, width) is the output size itself; an area string is planned as for an image of
    its own shape (480*832: a 480x832 image gives 448x832, where the exact W*H used to be refused)."""
    assert (plan(80, size=(448, 832)).geometry.height, plan(80, size=(448, 832)).geometry.width) == (448, 832)
    g = plan(80, size="480*832").geometry
    assert (g.height, g.width) == (832, 448)
    small = plan(80, offload="auto", memory_cap=24 * GiB)
    big = small.replanned(704, 1280)
    assert (big.blocks_on_gpu, big.kv_cache_location, big.precision) == (small.blocks_on_gpu,
                                                                           small.kv_cache_location, small.precision)
    assert big.geometry.tokens_per_frame > small.geometry.tokens_per_frame
    assert big.peak_bytes("cuda:0") > small.peak_bytes("cuda:0")
    with pytest.raises(InputError) as err:
        plan(24, offload="auto").replanned(1280, 1280).validate()
    assert err.value.input_name == "memory"


def test_plan_json_has_output_size_and_devices():
    d = plan(141, size=(384, 704)).to_dict()
    assert d["output_size"] == [704, 384] and d["fits"] is True
    assert [x["device"] for x in d["devices"]] == ["cuda:0", "cpu"]
    assert all(isinstance(x["planned_bytes"], int) for x in d["devices"])
    assert d["devices"][0]["planned_bytes"] > 30 * GiB  # the DiT alone is 32.6 GB in bf16
    json.dumps(d)


def test_summary_lists_items_and_verdict():
    text = plan(80, offload="auto", memory_cap=24 * GiB).summary()
    for word in ("cuda:0:", "cpu:", "DiT weights (resident)", "KV caches (pinned)", "OK", "TFLOP per block call"):
        assert word in text
    assert "DOES NOT FIT" in plan(48).summary()
    assert math.isclose(plan().geometry.block_tokens, 3 * 1056)
