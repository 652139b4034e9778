"""Streaming VAE: encode or decode a video piece by piece with bounded state.

`StreamingDecoder.decode(block)` turns each block of latents into frames as soon as it arrives
(3 latents -> 12 frames after the first call). The first call starts with the official first chunk
(latent 0 -> 1 frame), so decoding a sequence in blocks gives the frames of one official
`decode` of the whole sequence (spec/pipeline.md 4.3, 4.5). Between calls only the causal conv
history is kept (`FeatureCache`: 2 frames per conv at that layer's resolution): memory does not
grow with the video length.

`latents_per_pass` / `groups_per_pass` > 1 run several latents (groups of 4 frames) through the
network at once: mathematically the same result (the causal history is exact either way), fewer
and larger kernel calls, more activation memory. 1 reproduces the upstream op order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from .layers import FeatureCache

if TYPE_CHECKING:
    from .model import WanVAE


class StreamingDecoder:
    """Decodes consecutive latent blocks of one video; `reset()` starts a new video."""

    def __init__(self, vae: "WanVAE", latents_per_pass: int = 1):
        self.vae = vae
        self.latents_per_pass = _positive("latents_per_pass", latents_per_pass)
        self.cache = FeatureCache()

    def reset(self) -> None:
        self.cache = FeatureCache()

    def state_bytes(self) -> int:
        """Bytes of causal state carried to the next call."""
        return self.cache.nbytes()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents `[B,z,T,h,w]` -> float32 frames in [-1,1]: `4T` frames (`4T-3` on the first call)."""
        vae = self.vae
        vae.check_latents(latents)
        x = vae.conv2(vae.denormalize(latents.to(vae.device)))
        t, n = x.shape[2], self.latents_per_pass
        # The first latent of a stream is always a pass of its own (the first-chunk rules).
        first = 1 if self.cache.first_chunk else 0
        passes = [(0, 1)] if first else []
        passes += [(start, min(start + n, t)) for start in range(first, t, n)]
        frames = []
        for start, end in passes:
            self.cache.begin_chunk()
            frames.append(vae.decoder(x[:, :, start:end], self.cache))
            self.cache.end_chunk()
        return torch.cat(frames, dim=2).float().clamp_(-1.0, 1.0)


class StreamingEncoder:
    """Encodes consecutive frame blocks of one video: frame 0 alone, then groups of 4.

    Frames that do not complete a group wait (at most 3) for the next call.
    """

    def __init__(self, vae: "WanVAE", groups_per_pass: int = 1):
        self.vae = vae
        self.groups_per_pass = _positive("groups_per_pass", groups_per_pass)
        self.reset()

    def reset(self) -> None:
        self.cache = FeatureCache()
        self.pending: torch.Tensor | None = None

    def state_bytes(self) -> int:
        """Bytes of causal state and pending frames carried to the next call."""
        extra = self.pending.numel() * self.pending.element_size() if self.pending is not None else 0
        return self.cache.nbytes() + extra

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frames `[B,3,T,H,W]` in [-1,1] -> normalised float32 latents for every completed chunk."""
        vae = self.vae
        vae.check_pixels(pixels)
        x = pixels.to(vae.device)
        if self.pending is not None:
            x = torch.cat([self.pending, x], dim=2)
        chunks = []
        if self.cache.first_chunk and x.shape[2] > 0:
            chunks.append(x[:, :, :1])
            x = x[:, :, 1:]
        full = x.shape[2] // 4 * 4
        step = 4 * self.groups_per_pass
        chunks += [x[:, :, i:min(i + step, full)] for i in range(0, full, step)]
        self.pending = x[:, :, full:].clone() if full < x.shape[2] else None
        outs = []
        for chunk in chunks:
            self.cache.begin_chunk()
            outs.append(vae.encoder(chunk, self.cache))
            self.cache.end_chunk()
        if not outs:
            b, _, _, h, w = pixels.shape
            return torch.zeros(b, vae.cfg.z_dim, 0, h // 8, w // 8, device=vae.device)
        mu = vae.conv1(torch.cat(outs, dim=2))[:, :vae.cfg.z_dim]
        return vae.normalize(mu).float()


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise InputError(name, f"must be a positive integer, got {value!r}.", "use 1 (upstream op order) or more.")
    return value
