"""The Live Avatar causal S2V DiT (Wan2.2-S2V-14B architecture + LiveAvatar LoRA), plain PyTorch.

Two entry points (spec/dit.md 3.0):
* `sink(...)` embeds the reference latent and the FramePack motion tokens, runs them through every
  block with t = 0 and stores each layer's un-rotated keys and values in a `CondCache`.
* `denoise_block(...)` denoises one block of latent frames for one sampler step: only the block's
  tokens are queries; history and condition tokens enter through the step's `KVCache`.

Both (and `encode_text`) are compositions of public pieces, begin / layers / finish, so a process
owning only layers [a, b) (the layer layout, spec/parallel.md 2) runs the same operations on its
layers with caches holding only those layers: `begin_block` -> `run_layers` -> `finish_block`,
`begin_sink` -> `sink_layers` -> `finish_sink`, `encode_text(context, layers=...)`.

Parameter names are the Wan-native ones, so the official checkpoint loads unchanged
(`weights.dit.load_into_module`, strict). RoPE values are computed per call, never stored: the state_dict holds exactly the
checkpoint's tensors. The parameters' dtype is the compute dtype: fp32 for parity, bf16 for use.
"""

from __future__ import annotations

import functools

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..config import DiTConfig
from ..errors import InputError
from ..ops.attention import AttentionFn, get_attention, merge_attention
from ..ops.transfer import upload
from .audio import AudioInjector, CausalAudioEncoder, inject
from .blocks import DiTBlock, modulate
from .cache import CondCache, KVCache, TextCache, check_layers, tokens_per_frame
from .framepack import FramePacker
from .layers import Attention, Fp32Linear, Linear, layer_norm
from .offset import reference_time
from .rope import RopeFreqs, TokenGrid, apply_rope

# trainable_cond_mask rows (spec 3.2 / 3.8)
_NOISY, _REF, _MOTION = 0, 1, 2


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan time sinusoid in float64 (cos half first), returned as fp32 `[N, dim]`."""
    half = dim // 2
    pos = t.to(torch.float64).flatten()
    freqs = torch.pow(10000, -torch.arange(half, device=pos.device).to(pos).div(half))
    s = torch.outer(pos, freqs)
    return torch.cat([torch.cos(s), torch.sin(s)], dim=1).float()


def rotate_condition(cond_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The condition keys rotated to this call's positions (spec/dit.md 3.9 step 3), in `dtype`."""
    return apply_rope(cond_k, cos, sin).to(dtype)


_COMPILED_FNS: dict[tuple, object] = {}


def _compiled(name: str, fn, options: dict):
    """One compiled version of `fn` per option set, shared by every layer and model in the process."""
    options = {"dynamic": False, **options}
    key = (name, *sorted(options.items()))
    if key not in _COMPILED_FNS:
        _COMPILED_FNS[key] = torch.compile(fn, **options)
    return _COMPILED_FNS[key]


class Head(nn.Module):
    """Output projection modulated by the un-projected time embedding, computed in fp32."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))
        patch = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
        self.head = Fp32Linear(cfg.dim, patch * cfg.out_dim)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x `[B, F*fs, D]`, e `[B, F, D]` fp32 -> `[B, F*fs, 64]` in x's dtype."""
        mod = self.modulation.float().unsqueeze(1) + e.unsqueeze(2)  # [B, F, 2, D]
        shift, scale = mod[:, :, 0:1], mod[:, :, 1:2]
        y = modulate(layer_norm(x, self.eps).to(x.dtype).float(), shift, scale)
        return self.head(y).to(x.dtype)


def unit_names(cfg: DiTConfig, layer: int) -> tuple[str, ...]:
    """The block unit of `layer`: the module names of transformer block `layer` and, when that
    layer injects audio, of its injector slot, which runs right after it. Block swap moves a unit as
    one piece, the planner sizes it, and sharding will wrap it; everything else is the base."""
    names = (f"blocks.{layer}",)
    if layer in cfg.audio_inject_layers:
        slot = cfg.audio_inject_layers.index(layer)
        names += (f"audio_injector.injector.{slot}", f"audio_injector.injector_adain_layers.{slot}")
    return names


@functools.lru_cache(maxsize=8)
def _unit_owners(cfg: DiTConfig) -> dict[str, int]:
    return {name: layer for layer in range(cfg.num_layers) for name in unit_names(cfg, layer)}


def unit_of(key: str, cfg: DiTConfig) -> int | None:
    """The layer whose block unit holds state-dict entry `key` (None: the base)."""
    owners = _unit_owners(cfg)
    parts = key.split(".")
    for n in (3, 2):  # "audio_injector.injector.3.*" or "blocks.7.*"
        layer = owners.get(".".join(parts[:n]))
        if layer is not None:
            return layer
    return None


@dataclass
class BlockCall:
    """Per-call inputs of one `denoise_block` call, shared by all its layers (`begin_block`).

    `h` `[B, F*fs, D]` is the hidden state entering the next layer to run: the embedded block
    tokens after `begin_block`, each `run_layers` replaces it; a process whose range starts
    later sets it to the previous range's output.
    """

    h: torch.Tensor | None
    e: torch.Tensor  # fp32 time embedding [B, F, D] (head)
    e0: torch.Tensor  # fp32 time projection [B, F, 6, D] (blocks)
    rope: tuple[torch.Tensor, torch.Tensor]  # block tokens' cos/sin
    cond_rope: tuple[torch.Tensor, torch.Tensor]  # condition keys' cos/sin at this call's offset
    audio_tokens: torch.Tensor  # [B, F, n, D]
    audio_global: torch.Tensor  # [B, F, D]
    text: TextCache
    current_start: int
    shape: tuple[int, int, int, int]  # (B, F, H_l, W_l) of the latents


@dataclass
class SinkCall:
    """Inputs of one sink pass (`begin_sink`) and the keys/values stored so far (`sink_layers`)."""

    h: torch.Tensor | None  # condition tokens entering the next layer (see BlockCall.h)
    e0: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    text: TextCache
    ref: TokenGrid
    motion: list[TokenGrid]
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    layers: range | None = None  # layers run so far (one contiguous range)


class LiveAvatarDiT(nn.Module):
    """Causal S2V DiT. Build from a `DiTConfig`; inject the attention kernel by name or function."""

    def __init__(self, cfg: DiTConfig, attention: str | AttentionFn = "sdpa"):
        super().__init__()
        self.cfg = cfg
        attn = get_attention(attention) if isinstance(attention, str) else attention
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cond_encoder = nn.Conv3d(cfg.cond_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.trainable_cond_mask = nn.Embedding(3, d)
        self.text_embedding = nn.Sequential(Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), Linear(d, d))
        self.time_embedding = nn.Sequential(Fp32Linear(cfg.freq_dim, d), nn.SiLU(), Fp32Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), Fp32Linear(d, 6 * d))
        self.blocks = nn.ModuleList([DiTBlock(cfg, attn) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.frame_packer = FramePacker(cfg)
        self.casual_audio_encoder = CausalAudioEncoder(cfg)
        self.audio_injector = AudioInjector(cfg, attn)
        self.rope = RopeFreqs(cfg.head_dim, cfg.rope_theta)
        self._rotate = rotate_condition  # or its compiled version (compile_regions)

    def unit_modules(self, layer: int) -> list[nn.Module]:
        """The modules of `layer`'s block unit (see `unit_names`)."""
        return [self.get_submodule(name) for name in unit_names(self.cfg, layer)]

    # ----------------------------------------------------------------------------------------
    # helpers

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (that of the non-quantised weights)."""
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def set_attention(self, attention: str | AttentionFn) -> None:
        """Swap the attention kernel of every attention layer."""
        attn = get_attention(attention) if isinstance(attention, str) else attention
        for m in self.modules():
            if isinstance(m, Attention):
                m.attn = attn

    def compile_regions(self, enabled: bool = True, **options) -> None:
        """Regional compilation: compile the repeated pure tensor parts of a call, not the model.

        The two halves of every block around its cache and attention kernel, the rotation of the
        condition keys, the merging of attention over history and condition keys, and the audio
        injection are compiled once and shared by all layers (their parameters are inputs of the
        compiled code). Python control flow, cache bookkeeping and placement hooks stay eager, so
        block swap and streamed caches keep working. `options` go to `torch.compile` (`backend`,
        `mode`, ...); `enabled=False` returns to eager.
        """
        if enabled:
            regions = (_compiled("attn_inputs", DiTBlock.attn_inputs, options),
                       _compiled("attn_outputs", DiTBlock.attn_outputs, options))
            rotate = _compiled("rotate", rotate_condition, options)
            merge = _compiled("merge", merge_attention, {"dynamic": None, **options})
            injection = _compiled("inject", inject, options)
        else:
            regions, rotate, merge, injection = ((DiTBlock.attn_inputs, DiTBlock.attn_outputs), rotate_condition,
                                                 merge_attention, inject)
        for block in self.blocks:
            block.regions = regions
            block.self_attn.merge = merge
        self._rotate = rotate
        self.audio_injector.inject = injection

    @property
    def compiled(self) -> bool:
        """Whether `compile_regions` is in effect."""
        return self._rotate is not rotate_condition

    def _patchify(self, conv: nn.Conv3d, lat: torch.Tensor) -> torch.Tensor:
        # Contiguous tokens: the first block then sees the same strides as all later ones, so its
        # compiled regions are reused instead of being compiled again for a transposed input.
        out = conv(lat.to(device=self.device, dtype=conv.weight.dtype)).flatten(2).transpose(1, 2)
        return out.contiguous()

    def _time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 time embedding e `[N, D]` and projection e0 `[N, 6, D]` (spec 3.2 step 4)."""
        e = self.time_embedding(upload(sinusoid(t, self.cfg.freq_dim), self.device))
        return e, self.time_projection(e).unflatten(1, (6, self.cfg.dim))

    def _grid(self, lat_h: int, lat_w: int) -> tuple[int, int]:
        _, ph, pw = self.cfg.patch_size
        return lat_h // ph, lat_w // pw

    def block_grid(self, frame0: int, frames: int, lat_h: int, lat_w: int) -> TokenGrid:
        """RoPE positions of a block's noisy tokens: absolute latent frames, full patch grid."""
        hp, wp = self._grid(lat_h, lat_w)
        return TokenGrid(tuple(range(frame0, frame0 + frames)), tuple(range(hp)), tuple(range(wp)))

    @torch.no_grad()
    def encode_text(self, context, layers: range | None = None) -> TextCache:
        """Embed the umT5 context and compute each layer's cross-attention keys/values once.

        `context`: `[L, text_dim]`, `[B, L, text_dim]` or a list of `[L_i, text_dim]`; each is
        zero-padded to `text_len` rows, all of which are attended (as in the official model).
        `layers`: the layers whose keys/values are computed and kept (default all).
        """
        layers = self._layers(layers)
        items = [context] if torch.is_tensor(context) and context.dim() == 2 else list(context)
        rows = []
        for u in items:
            if u.dim() != 2 or u.shape[1] != self.cfg.text_dim:
                raise InputError("context", f"expected [tokens, {self.cfg.text_dim}] text embeddings, "
                                 f"got {tuple(u.shape)}.", "pass the umT5 encoder output.")
            if u.shape[0] > self.cfg.text_len:
                raise InputError("context", f"{u.shape[0]} text tokens exceed text_len {self.cfg.text_len}.",
                                 "shorten the prompt.")
            rows.append(torch.cat([u, u.new_zeros(self.cfg.text_len - u.shape[0], u.shape[1])]))
        text = self.text_embedding(torch.stack(rows).to(self.device))
        return TextCache(text, [self.blocks[i].text_kv(text) for i in layers], layers)

    def _layers(self, layers: range | None) -> range:
        return check_layers(range(self.cfg.num_layers) if layers is None else layers, self.cfg.num_layers)

    def _text(self, context_or_text_cache) -> TextCache:
        if isinstance(context_or_text_cache, TextCache):
            return context_or_text_cache
        return self.encode_text(context_or_text_cache)

    # ----------------------------------------------------------------------------------------
    # sink

    @torch.no_grad()
    def sink(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor, context,
             caches: KVCache | Sequence[KVCache] = ()) -> CondCache:
        """Fill the condition cache from the reference latent and the motion latents.

        ref_latents `[B, 16, 1, H_l, W_l]`, motion_latents `[B, 16, T_m, H_l, W_l]` (the last
        sum(zip_frame_buckets) frames are used). The returned `CondCache` is attached to every
        given step cache (they share it).
        """
        call = self.begin_sink(ref_latents, motion_latents, context)
        self.sink_layers(call, range(self.cfg.num_layers))
        return self.finish_sink(call, caches)

    @torch.no_grad()
    def begin_sink(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor, context,
                   embed: bool = True) -> SinkCall:
        """The sink's per-pass inputs (see `sink` for the arguments). With `embed=False` the
        condition tokens are not computed: the caller sets `h` to the previous layer range's output."""
        cfg = self.cfg
        if ref_latents.dim() != 5 or ref_latents.shape[1] != cfg.in_dim or ref_latents.shape[2] != 1:
            raise InputError("ref_latents", f"expected [B, {cfg.in_dim}, 1, H, W], got {tuple(ref_latents.shape)}.",
                             "pass the VAE latent of the reference image.")
        if (motion_latents.dim() != 5 or motion_latents.shape[1] != cfg.in_dim
                or motion_latents.shape[3:] != ref_latents.shape[3:] or motion_latents.shape[0] != ref_latents.shape[0]):
            raise InputError("motion_latents", f"expected [B, {cfg.in_dim}, T, H, W] matching the reference "
                             f"latent {tuple(ref_latents.shape)}, got {tuple(motion_latents.shape)}.",
                             "encode the motion frames at the reference's size.")
        lat_h, lat_w = ref_latents.shape[3:]
        if lat_h % 8 or lat_w % 8:
            raise InputError("ref_latents", f"latent size {lat_h}x{lat_w} is not a multiple of 8 "
                             "(FramePack's 4x patches).", "use pixel sizes that are multiples of 64.")
        b = ref_latents.shape[0]
        hp, wp = self._grid(lat_h, lat_w)

        # 1. Condition tokens: reference then FramePack post / 2x / 4x, with their mask rows.
        x = None
        if embed:
            ref = self._patchify(self.patch_embedding, ref_latents)
            mot = self.frame_packer(motion_latents.to(self.device))
            x = torch.cat([ref, mot], dim=1)
            rows = upload(torch.tensor([_REF] * ref.shape[1] + [_MOTION] * mot.shape[1]), self.device)
            x = x + self.trainable_cond_mask(rows).to(x.dtype)

        # 2. RoPE positions (reference at its fixed index, motion at negative times) and t = 0.
        ref_grid = TokenGrid((cfg.ref_rope_index,), tuple(range(hp)), tuple(range(wp)))
        motion_grids = self.frame_packer.grids(lat_h, lat_w)
        rope = self.rope.sequence([ref_grid, *motion_grids], device=self.device)
        _, e0 = self._time(torch.zeros(1))
        e0 = e0.view(1, 1, 6, -1).expand(b, 1, 6, -1)
        return SinkCall(x, e0, rope, self._text(context), ref_grid, motion_grids)

    @torch.no_grad()
    def sink_layers(self, call: SinkCall, layers: range) -> torch.Tensor:
        """Run the sink through blocks `layers`, keeping their un-rotated keys and values in `call`;
        returns (and sets) `call.h`. Successive calls must continue the layers already run."""
        layers = self._layers(layers)
        if call.h is None:
            raise InputError("sink_call", "its hidden state h is not set.",
                             "set call.h to the previous layer range's output (or begin with embed=True).")
        if call.layers is not None and layers.start != call.layers.stop:
            raise InputError("layers", f"{layers!r} does not continue the layers {call.layers!r} already run.",
                             "run the sink's layer ranges in order.")

        # Blocks: store un-rotated keys and values; attend bidirectionally among cond tokens.
        def store(k_rot, k, v):
            call.k.append(k)
            call.v.append(v)
            return [(k_rot, v)]

        x = call.h
        for i in layers:
            x = self.blocks[i](x, call.e0, call.rope, store, call.text.layer_kv(i))
        call.h = x
        call.layers = layers if call.layers is None else range(call.layers.start, layers.stop)
        return x

    def finish_sink(self, call: SinkCall, caches: KVCache | Sequence[KVCache] = ()) -> CondCache:
        """The `CondCache` of the layers the sink ran, attached to every given step cache."""
        if call.layers is None:
            raise InputError("sink_call", "no layers were run.", "call sink_layers first.")
        cond = CondCache(call.k, call.v, call.ref, call.motion, call.layers)
        for cache in ([caches] if isinstance(caches, KVCache) else caches):
            cache.cond = cond
        return cond

    # ----------------------------------------------------------------------------------------
    # inference

    @torch.no_grad()
    def denoise_block(self, x: torch.Tensor, t, context_or_text_cache, audio: torch.Tensor,
                      cond_states: torch.Tensor | None, cache: KVCache, current_start: int,
                      ref_offset: int) -> torch.Tensor:
        """Flow prediction for one block of noisy latents at one sampler step.

        x `[B, 16, F, H_l, W_l]`; t: per-frame timesteps `[B, F]` (or a scalar); audio
        `[B, layers, C_a, 4F]` wav2vec2 states of the block's video frames; cond_states pose
        latents like x or None (zeros); cache: this step's `KVCache` with its cond part filled;
        current_start: token offset of the block (absolute latent frame * fs); ref_offset: this
        call's reference distance `d` (see offset.py). Returns `[B, 16, F, H_l, W_l]` in the
        model dtype.
        """
        call = self.begin_block(x, t, context_or_text_cache, audio, cond_states, cache, current_start, ref_offset)
        self.run_layers(call, range(self.cfg.num_layers), cache)
        return self.finish_block(call)

    @torch.no_grad()
    def begin_block(self, x: torch.Tensor, t, context_or_text_cache, audio: torch.Tensor,
                    cond_states: torch.Tensor | None, cache: KVCache, current_start: int, ref_offset: int,
                    embed: bool = True) -> BlockCall:
        """The per-call inputs of `denoise_block` (same arguments), inputs checked.

        With `embed=False` the block tokens are not computed and only x's shape is read (a meta
        tensor will do): the caller sets `h` to the previous layer range's output.
        """
        cfg = self.cfg
        dt = self.dtype
        b, c, f, lat_h, lat_w = self._check_block(x, audio, cond_states, cache, current_start)
        hp, wp = self._grid(lat_h, lat_w)
        fs = hp * wp
        frame0 = current_start // fs

        # 1. Audio tokens: prepend copies of the first frame as motion context, encode causally,
        #    drop the context frames (spec 3.5).
        a = upload(audio.contiguous(), self.device)
        a = torch.cat([a[..., :1].expand(*a.shape[:-1], cfg.motion_frames[0]), a], dim=-1)
        glob, local = self.casual_audio_encoder(a)
        audio_tokens = local[:, cfg.motion_frames[1]:].to(dt)
        audio_global = glob[:, cfg.motion_frames[1]:, 0].to(dt)
        if audio_tokens.shape[1] != f:
            raise InputError("audio", f"{audio.shape[-1]} audio frames give {audio_tokens.shape[1]} latent "
                             f"frames of audio tokens, the block has {f}.",
                             "pass 4 video frames of wav2vec2 states per latent frame.")

        # 2. Noisy tokens (+ pose latents, zeros -> the cond_encoder bias only) and mask row 0.
        h = None
        if embed:
            h = self._patchify(self.patch_embedding, x)
            if cond_states is None:
                h = h + self.cond_encoder.bias.to(h.dtype)
            else:
                h = h + self._patchify(self.cond_encoder, cond_states)
            h = h + self.trainable_cond_mask.weight[_NOISY].to(h.dtype)

        # 3. Text and per-frame time modulation.
        text = self._text(context_or_text_cache)
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        t = (t.expand(b * f) if t.numel() == 1 else t).reshape(b, f)
        e, e0 = self._time(t)
        e0 = e0.view(b, f, 6, -1)

        # 4. RoPE: block tokens at their absolute frames; cached reference keys moved by d.
        rope = self.rope.sequence([self.block_grid(frame0, f, lat_h, lat_w)], device=self.device)
        cond_rope = cache.cond.rope(self.rope, reference_time(cfg.ref_rope_index, frame0, ref_offset),
                                    device=self.device)
        return BlockCall(h, e.view(b, f, -1), e0, rope, cond_rope, audio_tokens, audio_global, text,
                         current_start, (b, f, lat_h, lat_w))

    @torch.no_grad()
    def run_layers(self, call: BlockCall, layers: range, cache: KVCache) -> torch.Tensor:
        """Run blocks `layers` (each followed by its audio injection) through the step cache
        `cache` (holding at least those layers); returns (and sets) `call.h`."""
        layers = self._layers(layers)
        if call.h is None:
            raise InputError("block_call", "its hidden state h is not set.",
                             "set call.h to the previous layer range's output (or begin with embed=True).")
        cond, current_start = cache.cond, call.current_start
        cond_cos, cond_sin = call.cond_rope
        h = call.h
        # Blocks with the step cache, audio injection after the listed layers.
        for i in layers:
            cond_k, cond_v = cond.layer_kv(i)

            def self_kv(k_rot, k, v, i=i, cond_k=cond_k, cond_v=cond_v):
                history = cache.update(i, current_start, k_rot, v)
                return history, (self._rotate(cond_k, cond_cos, cond_sin, v.dtype), cond_v)

            h = self.blocks[i](h, call.e0, call.rope, self_kv, call.text.layer_kv(i))
            h = self.audio_injector(i, h, call.audio_tokens, call.audio_global)
        call.h = h
        return h

    def finish_block(self, call: BlockCall) -> torch.Tensor:
        """Head (fp32) and unpatchify of the last layer's output: `[B, 16, F, H_l, W_l]`."""
        cfg = self.cfg
        b, f, lat_h, lat_w = call.shape
        hp, wp = self._grid(lat_h, lat_w)
        # Channel index (q*2 + r)*16 + c -> latent [c, f, 2h+q, 2w+r].
        out = self.head(call.h, call.e)
        _, ph, pw = cfg.patch_size
        out = out.view(b, f, hp, wp, ph, pw, cfg.out_dim).permute(0, 6, 1, 2, 4, 3, 5)
        return out.reshape(b, cfg.out_dim, f, lat_h, lat_w)

    def _check_block(self, x, audio, cond_states, cache, current_start):
        cfg = self.cfg
        if x.dim() != 5 or x.shape[1] != cfg.in_dim:
            raise InputError("x", f"expected noisy latents [B, {cfg.in_dim}, F, H, W], got {tuple(x.shape)}.",
                             "pass one block of latents with a batch dimension.")
        b, c, f, lat_h, lat_w = x.shape
        if lat_h % 2 or lat_w % 2:
            raise InputError("x", f"latent size {lat_h}x{lat_w} is not even.", "use pixel sizes that are multiples of 64.")
        if cond_states is not None and cond_states.shape != (b, cfg.cond_dim, f, lat_h, lat_w):
            raise InputError("cond_states", f"expected {(b, cfg.cond_dim, f, lat_h, lat_w)}, "
                             f"got {tuple(cond_states.shape)}.", "pass pose latents shaped like x, or None.")
        if audio.dim() != 4 or audio.shape[0] != b or audio.shape[1:3] != (cfg.num_wav2vec_layers, cfg.audio_dim):
            raise InputError("audio", f"expected [{b}, {cfg.num_wav2vec_layers}, {cfg.audio_dim}, T] wav2vec2 "
                             f"states, got {tuple(audio.shape)}.",
                             "pass all hidden states of the audio encoder for this block, one batch row per video.")
        if cache.cond is None:
            raise InputError("kv_cache", "the condition cache is empty.", "call sink() for this stream first.")
        if cache.cond.patch_grid != self._grid(lat_h, lat_w) or cache.cond.k[0].shape[0] != b:
            raise InputError("kv_cache", f"the condition cache was filled for a {cache.cond.patch_grid} patch "
                             f"grid, the block has {self._grid(lat_h, lat_w)} (batch {b}).",
                             "re-run sink() with latents of this size.")
        fs = tokens_per_frame(cfg, lat_h, lat_w)
        if current_start % fs:
            raise InputError("current_start", f"{current_start} is not a multiple of the {fs} tokens per frame.",
                             "pass absolute latent frame index * tokens per frame.")
        if cache.length % fs or cache.layers.stop > cfg.num_layers or cache.k.shape[1] != b:
            raise InputError("kv_cache", f"cache {tuple(cache.k.shape)} of layers {cache.layers.start}.."
                             f"{cache.layers.stop - 1} does not fit {cfg.num_layers} layers, "
                             f"batch {b} and whole frames of {fs} tokens.",
                             "allocate it with make_step_caches for this model, batch and latent size.")
        cache.window(current_start, f * fs)
        return b, c, f, lat_h, lat_w
