"""The Wan 2.1 causal video VAE (spec/pipeline.md 4), parameter names as in `Wan2.1_VAE.pth`.

Compression is 4x8x8: `1 + 4k` frames <-> `1 + k` latent frames. `WanVAE.encode`/`decode` follow
the official non-streaming protocol (frame 0 then groups of 4; one latent at a time); the
streaming objects in `streaming.py` keep the causal state between calls instead.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import InputError
from ..ops.transfer import upload
from .config import VAEConfig
from .layers import (EAGER, AttentionBlock, CausalConv3d, FeatureCache, Kernels, ResidualBlock, Resample, RMSNorm,
                     norm_silu, residual_sum)
from .streaming import StreamingDecoder, StreamingEncoder


def _head(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1))


def _run_head(head: nn.Sequential, x: torch.Tensor, cache: FeatureCache, kernels: Kernels) -> torch.Tensor:
    return head[2](kernels.norm_silu(x, head[0].gamma.detach(), head[2].weight.dtype), cache)


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


class Encoder3d(nn.Module):
    """Pixels `[B,3,T,H,W]` -> `[B, 2*z, T', H/8, W/8]` (mean and unused log-variance), chunk by chunk."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for stage, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if stage != len(cfg.dim_mult) - 1:
                blocks.append(Resample(cout, "downsample3d" if cfg.temporal_downsample[stage] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * cfg.z_dim)
        self.kernels = EAGER

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)
        return _run_head(self.head, x, cache, self.kernels)


class Decoder3d(nn.Module):
    """Latents (after `conv2`) -> pixels, chunk by chunk; the mirror image of `Encoder3d`."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_up = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        blocks: list[nn.Module] = []
        for stage, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if stage > 0:
                cin //= 2  # the previous up-sampler halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if stage != len(cfg.dim_mult) - 1:
                blocks.append(Resample(cout, "upsample3d" if temporal_up[stage] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], 3)
        self.kernels = EAGER

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in (*self.middle, *self.upsamples):
            x = block(x, cache)
        return _run_head(self.head, x, cache, self.kernels)


@functools.cache
def _compiled_kernels(options: tuple) -> Kernels:
    # Sizes dynamic (one graph serves every resolution), channel counts static: the reduction
    # over channels then runs as one persistent kernel, which in the channels-last layout is seven
    # times as fast as the looped reduction a dynamic count gets. That makes one graph per channel
    # count, first chunk or not, input layout and number of conv partials: a few dozen in encoder
    # and decoder together, past dynamo's default limit of 8 graphs per function, hence the
    # raised limit for these.
    limit = torch._dynamo.config.patch(recompile_limit=max(64, torch._dynamo.config.recompile_limit))

    def static_channels(fn):
        compiled = torch.compile(fn, **{"dynamic": True, **dict(options)})

        @limit
        def run(x, *args):
            for t in x if isinstance(x, tuple) else (x,):
                torch._dynamo.mark_static(t, 1)
            return compiled(x, *args)
        return run
    return Kernels(static_channels(norm_silu), static_channels(residual_sum))


# Narrower 3-D convs run as per-tap 2-D convs in channels-last (CausalConv3d.partials).
TAPS_BELOW_CHANNELS = 128


class WanVAE(nn.Module):
    """Wan 2.1 VAE with latent normalisation.

    Weights may be float32 (parity) or bfloat16 (GPU; numerics of the official bf16 autocast run).
    `latent_dtype` is the dtype of the normalisation constants: the official wrapper builds them in
    its own dtype, so it defaults to the weights' dtype; None means "follow the weights".
    """

    def __init__(self, cfg: VAEConfig = VAEConfig(), latent_dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg = cfg
        self.latent_dtype = latent_dtype
        self._constants: tuple | None = None  # ((device, dtype), mean, 1/std), see latent_constants
        self.description = f"Wan 2.1 VAE (z={cfg.z_dim}, base width {cfg.base_dim}), randomly initialised"
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)

    @property
    def device(self) -> torch.device:
        return self.conv1.weight.device

    def compile_regions(self, enabled: bool = True, **options) -> None:
        """Compile the work between convs into one kernel each: the bias of the conv before, the
        normalisation, SiLU and cast before every conv (in eager mode half the decode time: five
        full-size float32 passes), and the residual sums. Convs, the causal cache and the chunk
        logic stay eager. `options` go to `torch.compile`; `enabled=False` returns to eager."""
        kernels = _compiled_kernels(tuple(sorted(options.items()))) if enabled else EAGER
        for module in self.modules():
            if isinstance(module, (ResidualBlock, Encoder3d, Decoder3d)):
                module.kernels = kernels

    def set_channels_last(self, enabled: bool = True) -> None:
        """Store conv weights and activations channels-last (NDHWC), the layout cuDNN's tensor-core
        convolutions run in; contiguous NCDHW makes it transpose around every conv. Same
        arithmetic, other kernels: results agree to rounding. The residual blocks' 3-D convs with
        under 128 input channels then run as one 2-D conv per temporal tap
        (`CausalConv3d.partials`). For CUDA; on the CPU it is slower."""
        fmt3, fmt2 = ((torch.channels_last_3d, torch.channels_last) if enabled
                      else (torch.contiguous_format, torch.contiguous_format))
        for module in self.modules():
            if isinstance(module, CausalConv3d):
                module.memory_format = fmt3
                module.taps = enabled and module.tappable and module.in_channels < TAPS_BELOW_CHANNELS
            if isinstance(module, nn.Conv3d | nn.Conv2d):
                fmt = fmt3 if module.weight.dim() == 5 else fmt2
                module.weight.data = module.weight.data.contiguous(memory_format=fmt)

    @property
    def channels_last(self) -> bool:
        """Whether `set_channels_last` is in effect."""
        return self.decoder.conv1.memory_format == torch.channels_last_3d

    @property
    def compiled(self) -> bool:
        """Whether `compile_regions` is in effect."""
        return self.decoder.kernels is not EAGER

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def latent_constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean, 1/std)` as `[1, z, 1, 1, 1]` tensors, built like the official wrapper builds them."""
        dtype = self.latent_dtype or self.dtype
        key = (self.device, dtype)
        if self._constants is None or self._constants[0] != key:
            # Built from the Python floats directly in the target dtype (one rounding), then the
            # reciprocal in that dtype (IEEE, so the host gives the GPU's bits): this reproduces
            # the official bf16 values (spec 4.2). Made once per device: a fresh upload per call
            # would make the host wait for the GPU.
            mean = torch.tensor(self.cfg.latent_mean, dtype=dtype)
            inv = 1.0 / torch.tensor(self.cfg.latent_std, dtype=dtype)
            shape = (1, self.cfg.z_dim, 1, 1, 1)
            self._constants = (key, upload(mean.view(shape), self.device), upload(inv.view(shape), self.device))
            if self.device.type == "cuda":  # once: later users may run on other streams
                torch.cuda.current_stream(self.device).synchronize()
        return self._constants[1], self._constants[2]

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        mean, inv = self.latent_constants()
        return (mu - mean) * inv

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, inv = self.latent_constants()
        return z / inv + mean

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, groups_per_pass: int = 1) -> torch.Tensor:
        """Pixels `[B,3,T,H,W]` in [-1,1] -> normalised float32 latents `[B,z,1+(T-1)//4,H/8,W/8]`.

        Official protocol: frame 0 alone, then groups of 4; trailing frames that do not complete
        a group are ignored. `groups_per_pass`: see `streaming.py`.
        """
        return self.stream_encoder(groups_per_pass).encode(pixels)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, latents_per_pass: int = 1) -> torch.Tensor:
        """Normalised latents `[B,z,T,h,w]` -> float32 pixels `[B,3,1+4(T-1),8h,8w]` clamped to [-1,1].

        Official protocol: latent 0 gives one frame, every later latent four (spec 4.3).
        """
        return self.stream_decoder(latents_per_pass).decode(latents)

    def stream_decoder(self, latents_per_pass: int = 1) -> StreamingDecoder:
        """A decoder that keeps its causal state between calls (first call = official first chunk)."""
        return StreamingDecoder(self, latents_per_pass)

    def stream_encoder(self, groups_per_pass: int = 1) -> StreamingEncoder:
        """An encoder that keeps its causal state (and up to 3 pending frames) between calls."""
        return StreamingEncoder(self, groups_per_pass)

    def check_pixels(self, pixels: torch.Tensor) -> None:
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 5 or pixels.shape[1] != 3:
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise InputError("pixels", f"expected a video tensor [batch, 3, frames, height, width], got {shape}.",
                             "pass RGB frames as [B, 3, T, H, W] in [-1, 1].")
        if pixels.shape[3] % 8 or pixels.shape[4] % 8:
            raise InputError("pixels", f"height and width must be multiples of 8, got "
                             f"{pixels.shape[3]}x{pixels.shape[4]}.", "resize or crop the frames.")

    def check_latents(self, latents: torch.Tensor) -> None:
        z = self.cfg.z_dim
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[1] != z:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise InputError("latents", f"expected [batch, {z}, frames, height, width], got {shape}.",
                             f"pass Wan 2.1 latents ({z} channels) as a 5-D tensor.")
        if latents.shape[2] == 0:
            raise InputError("latents", "no latent frames to decode.", "pass at least one latent frame.")
