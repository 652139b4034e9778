"""Sizes of a run computed from the config alone: token counts (`geometry`), the bytes of every
weight, cache, activation and encoder, and the FLOPs of a block call. `plan.py` places them on
devices; `parallel/cost.py` turns FLOPs into seconds.

Weights come from `expected_dit_keys` (FP8 layers as 1 byte per weight + a scale, the rest bf16);
a KV ring per step is latent frames per clip x tokens per frame x heads x head_dim x 2 (k and v) x
bytes per layer (spec/pipeline.md 3.4); the condition cache holds the reference and FramePack
tokens (2.5 x tokens per frame at the release buckets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import DEFAULT_FRAMES_PER_CLIP, DiTConfig, check_frames_per_clip
from .errors import InputError
from .model.dit import unit_of
from .model.framepack import condition_tokens
from .ops.fp8 import IGNORE as FP8_IGNORE
from .weights.dit import expected_dit_keys
from .weights.vae import DIM_MULT, NUM_RES_BLOCKS, SPATIAL_STRIDE, TEMPORAL_DOWNSAMPLE, expected_vae_shapes

GiB = 2 ** 30
BYTES = {"bf16": 2, "fp32": 4, "fp8": 1}  # per element of each dtype name

# umT5-XXL encoder and wav2vec2-large-xlsr-53 (spec/pipeline.md 1.1), for estimates before loading.
_UMT5_XXL = {"vocab": 256384, "d_model": 4096, "layers": 24, "heads": 64, "d_kv": 64, "d_ff": 10240, "buckets": 32}
_WAV2VEC2_LARGE = {"hidden": 1024, "layers": 24, "ffn": 4096, "conv_dim": 512, "pos_kernel": 128, "pos_groups": 16,
                   "conv_kernels": (10, 3, 3, 3, 3, 2, 2), "heads": 16}
_WAV2VEC2_FPS = 50  # hidden-state frames per second of 16 kHz audio


@dataclass(frozen=True)
class Geometry:
    """Token counts of one run, derived from the config and the output size (spec/dit.md 1)."""

    height: int
    width: int
    frames_per_clip: int
    steps: int
    batch: int
    latent_h: int
    latent_w: int
    tokens_per_frame: int
    cache_frames: int
    cond_tokens: int

    frames_per_block: int = 3

    @property
    def block_tokens(self) -> int:
        return self.tokens_per_frame * self.frames_per_block

    @property
    def cache_tokens(self) -> int:
        return self.cache_frames * self.tokens_per_frame


def geometry(cfg: DiTConfig, height: int, width: int, frames_per_clip: int = DEFAULT_FRAMES_PER_CLIP, steps: int = 4,
             batch: int = 1) -> Geometry:
    """Latent grid, tokens per frame, KV ring length and condition tokens for one output size."""
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % 64:
            raise InputError("size", f"output {name} {v!r} is not a positive multiple of 64.",
                             "plan at the output size `encoders.image.choose_output_size` picks for the image.")
    check_frames_per_clip(frames_per_clip)
    if steps < 1:
        raise InputError("sample_steps", f"must be positive, got {steps}.", "use 4.")
    lat_h, lat_w = height // SPATIAL_STRIDE, width // SPATIAL_STRIDE
    _, ph, pw = cfg.patch_size
    fs = (lat_h // ph) * (lat_w // pw)
    m_video, m_lat = cfg.motion_frames
    cache_frames = (frames_per_clip + 3 + m_video) // 4 - m_lat
    cond = condition_tokens(cfg, lat_h, lat_w)
    return Geometry(height, width, frames_per_clip, steps, batch, lat_h, lat_w, fs, cache_frames, cond,
                    cfg.num_frames_per_block)


# ------------------------------------------------------------------------------------------------
# sizes of the pieces


def is_fp8_target(key: str, shape: tuple[int, ...]) -> bool:
    """True for the weight of a Linear that `ops.fp8.convert_to_fp8` quantises."""
    return (key.endswith(".weight") and len(shape) == 2 and not key.startswith("trainable_cond_mask")
            and not any(tag in key for tag in FP8_IGNORE))


def _fp8_linears(keys: dict[str, tuple[int, ...]]) -> set[str]:
    return {k[:-len(".weight")] for k, s in keys.items() if is_fp8_target(k, s)}


def dit_tensor_bytes(cfg: DiTConfig, precision: str) -> dict[str, int]:
    """Bytes of every DiT state tensor on the device under `precision` (FP8 adds a scale per layer)."""
    keys = expected_dit_keys(cfg)
    fp8 = _fp8_linears(keys) if precision == "fp8" else set()
    elem = BYTES["fp32" if precision == "fp32" else "bf16"]
    out = {}
    for k, shape in keys.items():
        n = math.prod(shape)
        if k.endswith(".weight") and k[:-len(".weight")] in fp8:
            out[k] = n + 4  # e4m3 codes + the fp32 dequantisation factor
        else:
            out[k] = n * elem
    return out


def dit_unit_bytes(cfg: DiTConfig, precision: str) -> tuple[int, list[int]]:
    """(bytes outside the swap units, bytes of each unit 0..num_layers-1)."""
    base, units = 0, [0] * cfg.num_layers
    for k, b in dit_tensor_bytes(cfg, precision).items():
        u = unit_of(k, cfg)
        if u is None:
            base += b
        else:
            units[u] += b
    return base, units


def kv_cache_bytes(cfg: DiTConfig, geo: Geometry, dtype: str) -> int:
    """One step's KV ring, all layers: k and v `[L, B, frames*fs, H, HD]`."""
    return cfg.num_layers * kv_layer_bytes(cfg, geo, dtype)


def kv_layer_bytes(cfg: DiTConfig, geo: Geometry, dtype: str) -> int:
    """k and v of one layer of one step's ring (one streaming staging slot); an FP8 ring also
    holds a bf16 scale per head and row."""
    rows = 2 * geo.batch * geo.cache_tokens
    scales = rows * cfg.num_heads * BYTES["bf16"] if dtype == "fp8" else 0
    return rows * cfg.dim * BYTES[dtype] + scales


def cond_cache_bytes(cfg: DiTConfig, geo: Geometry, dtype: str) -> int:
    """Un-rotated condition keys and values of every layer, shared by the step caches."""
    return 2 * cfg.num_layers * geo.batch * geo.cond_tokens * cfg.dim * BYTES[dtype]


def text_cache_bytes(cfg: DiTConfig, geo: Geometry, dtype: str) -> int:
    """Embedded prompt plus each layer's cross-attention keys/values (computed once per stream)."""
    return (2 * cfg.num_layers + 1) * geo.batch * cfg.text_len * cfg.dim * BYTES[dtype]


def block_call_activation_bytes(cfg: DiTConfig, geo: Geometry, precision: str,
                                kv_dtype: str | None = None) -> int:
    """Peak transient memory of one block denoising call, steady (full ring) regime.

    Inside a layer: the fp32 residual plus about three fp32 temporaries of the block's tokens
    (modulation, norms, gates), the FFN hidden state and its GELU, the history + condition keys
    and values as attention reads them (concatenated, or with an FP8 ring the dequantised
    history), and the fp32 rotation of the condition keys. FP8 GEMMs add the fp32 scaled copy
    of the widest GEMM input (the FFN hidden state); an FP8 ring the fp32 quantisation of the
    block's keys and values.
    """
    b, d, ff = geo.batch, cfg.dim, cfg.ffn_dim
    act = BYTES["fp32" if precision == "fp32" else "bf16"]
    lq = geo.block_tokens
    lkv = geo.cache_tokens + geo.cond_tokens
    total = b * lq * d * 4 * 4                     # residual + fp32 temporaries
    total += b * lq * ff * act * 2                 # FFN hidden + activation
    total += b * lkv * d * act * 2                 # keys, values (history + condition)
    total += b * geo.cond_tokens * d * 4 * 2       # condition key rotation in fp32
    if precision == "fp8":
        total += b * lq * ff * 4
    if kv_dtype == "fp8":
        total += b * lq * d * 4 * 2
    return total


def sink_activation_bytes(cfg: DiTConfig, geo: Geometry, precision: str) -> int:
    """Peak transient memory of the sink pass (condition tokens attend among themselves)."""
    act = BYTES["fp32" if precision == "fp32" else "bf16"]
    lc = geo.cond_tokens * geo.batch
    return lc * cfg.dim * 4 * 4 + lc * cfg.ffn_dim * act * 2 + lc * cfg.dim * act * 4


def vae_weight_bytes(base_dim: int = 96, dtype: str = "bf16") -> int:
    """Wan 2.1 VAE parameters (127 M at the released width)."""
    return sum(math.prod(s) for s in expected_vae_shapes(base_dim).values()) * BYTES[dtype]


def vae_decoder_state_bytes(height: int, width: int, base_dim: int = 96, z_dim: int = 16,
                            dtype: str = "bf16", batch: int = 1) -> int:
    """Causal history a streaming decoder carries between calls (2 frames per temporal conv).

    Walks the decoder as `vae.model.Decoder3d` builds it: conv1 on latents, the middle blocks, then
    per stage `num_res_blocks + 1` residual blocks (2 convs each) and an up-sampler whose temporal
    conv keeps history only when the stage up-samples time; the head conv at full resolution.
    """
    e = BYTES[dtype] * batch
    dims = [base_dim * m for m in (DIM_MULT[-1], *DIM_MULT[::-1])]
    temporal_up = TEMPORAL_DOWNSAMPLE[::-1]
    h, w = height // SPATIAL_STRIDE, width // SPATIAL_STRIDE
    total = 2 * z_dim * h * w * e                          # conv1 input
    total += 4 * 2 * dims[0] * h * w * e                   # middle: two residual blocks, 2 convs each
    for stage, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if stage > 0:
            cin //= 2
        for _ in range(NUM_RES_BLOCKS + 1):
            total += 2 * (cin + cout) * h * w * e          # two convs, 2 frames of their inputs
            cin = cout
        if stage != len(DIM_MULT) - 1:
            if temporal_up[stage]:
                total += 2 * cout * h * w * e              # time_conv, before the spatial x2
            h, w = h * 2, w * 2
    total += 2 * dims[-1] * h * w * e                      # head conv
    return total


def vae_decode_peak_bytes(height: int, width: int, base_dim: int = 96, dtype: str = "bf16",
                          batch: int = 1, taps: bool = False) -> int:
    """Transient peak of decoding one latent (4 frames) at full resolution.

    The last stage dominates: the conv input with its 2 history frames (6 frames), its output (with
    `taps`, as on a CUDA VAE, one partial output per temporal tap: `CausalConv3d.partials`), and
    the fp32 RMS-norm temporaries of 4 frames.
    """
    e = BYTES[dtype]
    frame = batch * base_dim * DIM_MULT[0] * height * width
    return frame * (6 * e + (3 if taps else 1) * 4 * e + 2 * 4 * 4)


def text_encoder_bytes(dtype: str = "bf16") -> int:
    """umT5-XXL encoder weights (token embedding, 24 blocks with relative position buckets)."""
    c = _UMT5_XXL
    d, inner = c["d_model"], c["heads"] * c["d_kv"]
    block = 2 * d + 4 * d * inner + c["buckets"] * c["heads"] + 3 * d * c["d_ff"]
    return (c["vocab"] * d + c["layers"] * block + d) * BYTES[dtype]


def audio_encoder_bytes(dtype: str = "bf16") -> int:
    """wav2vec2-large weights: conv feature extractor, positional conv, 24 transformer layers."""
    c = _WAV2VEC2_LARGE
    h, cd = c["hidden"], c["conv_dim"]
    convs = sum(k * (1 if i == 0 else cd) * cd + 3 * cd for i, k in enumerate(c["conv_kernels"]))
    proj = 2 * cd + cd * h + h
    pos = h * (h // c["pos_groups"]) * c["pos_kernel"] + h + 2 * h
    layer = 4 * (h * h + h) + 2 * h * c["ffn"] + c["ffn"] + h + 4 * h
    return (convs + proj + pos + c["layers"] * layer + 2 * h) * BYTES[dtype]


def audio_encoder_activation_bytes(seconds: float, dtype: str = "bf16") -> int:
    """wav2vec2 on the whole audio at once: all 25 hidden states kept, one layer's attention scores."""
    c = _WAV2VEC2_LARGE
    t = int(seconds * _WAV2VEC2_FPS) + 1
    states = (c["layers"] + 1) * t * c["hidden"] * BYTES[dtype]
    scores = c["heads"] * t * t * 4
    return states + scores + t * c["ffn"] * 4


# ------------------------------------------------------------------------------------------------
# FLOPs


def flops_per_call(cfg: DiTConfig, geo: Geometry) -> dict[str, float]:
    """Multiply-add FLOPs (x2) of one steady-state block call: `linear` GEMMs and `attention`."""
    d, ff, lq = cfg.dim, cfg.ffn_dim, geo.block_tokens * geo.batch
    lkv = geo.cache_tokens + geo.cond_tokens
    linear = cfg.num_layers * (2 * lq * d * d * 6 + 2 * 2 * lq * d * ff)  # self qkvo, cross q/o, FFN
    linear += len(cfg.audio_inject_layers) * 2 * lq * d * d * 2          # injector q/o
    attention = cfg.num_layers * 4 * lq * d * (lkv + cfg.text_len)
    attention += len(cfg.audio_inject_layers) * 4 * lq * d * (cfg.num_audio_token + 1)
    return {"linear": float(linear), "attention": float(attention)}


# ------------------------------------------------------------------------------------------------
# the plan
