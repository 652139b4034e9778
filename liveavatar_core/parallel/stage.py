"""One rank's part of the pipeline: a `BlockSampler` that runs only its own denoising steps.

The stage is the single-process sampler with three seams (spec/parallel.md 2):
* its first step's input is the clip noise on the head rank (admitted block by block by the
  controller, which is how a cancel stops the pipeline at a block boundary) and the previous
  rank's output everywhere else;
* every rank draws all of a block's reference offsets and uses its own steps' (the draws are
  counted per call, so each rank replays the single-process sequence);
* a rank that does not finish blocks gets the streaming sink refresh (clip 0's first latent) and
  the official online-decode refresh from the controller, which relays what the finishing rank
  and the VAE rank publish. Every rank computes its own sink from the same inputs.
"""

from __future__ import annotations

import torch

from ..sampling.generator import BlockSampler
from .transport import Peers


class StageSampler(BlockSampler):
    """A pipeline stage over `steps` (see BlockSampler for the other arguments).

    control: the rank's `ControlClient`; peers: its point-to-point links; prev: the rank that
    sends this one its input (None on the head rank); has_vae: the VAE runs in this process (it
    then refreshes the sink itself in online-decode mode).
    """

    def __init__(self, *args, steps, control, peers: Peers, prev: int | None, has_vae: bool, **kwargs):
        super().__init__(*args, steps=steps, **kwargs)
        self.control, self.peers, self.prev, self.has_vae = control, peers, prev, has_vae
        self.ended = False  # END received from the previous rank (or, on the head, a stop)

    def _block_input(self, clip: int, block: int) -> torch.Tensor | None:
        if self.prev is None:
            if not self.control.request("admit", clip, block):
                self.ended = True
                return None
            return super()._block_input(clip, block)
        got = self.peers.recv(self.prev, self.block_shape, self.dtype)
        if got is None:
            self.ended = True
            return None
        if got[:2] != (clip, block):
            raise RuntimeError(f"pipeline out of order: expected clip {clip} block {block} from rank {self.prev}, "
                               f"got clip {got[0]} block {got[1]}")
        return got[2]

    def _first_clip_latent(self) -> torch.Tensor:
        if self.finishes_blocks:
            return super()._first_clip_latent()
        return self.control.request("get", "first_clip_latent").to(self.model.device, self.dtype)

    def _begin_clip(self, r: int) -> None:
        if (r == 1 and self.config.sink_refresh == "caller" and not self.has_vae and self.refreshed_at != 1
                and self.caches[0].cond is not None):
            ref, motion = self.control.request("get", "refreshed_condition")
            self.refresh_condition(ref, motion)
        super()._begin_clip(r)
