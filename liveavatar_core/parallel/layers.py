"""One rank of the layer layout: its layer range of every step of every block (spec/parallel.md 2).

Cell (block n, step s, rank k) runs at time `T = s*(N+d) + k + S*n` (S steps, N ranks, d the
smallest >= 1 with gcd(N+d, S) = 1): no two cells of a rank share a time, every input (the previous
rank's hidden state, the previous step's latents from the last rank, block n-1's rows of the step
cache) is made at an earlier time, and each rank runs its cells in time order, so in steady state
every rank is busy and several blocks are in flight. Rank 0 embeds the block (noise at step 0, the
last rank's latents after), each rank runs its layers and posts `h` and the step's input latents
on; the last rank finishes the step (head, Euler step) and posts the latents back to rank 0, or
yields the denoised block to its VAE. Per rank pair the messages are received in the order they
are sent (the receiver's times are the sender's plus a constant); sends never block (`isend`), so
a rank only ever waits for a message made at an earlier time and the schedule cannot deadlock.

The sink walks the ranks like a cell (rank 0 embeds, each keeps its layers' condition cache), just
before the first cell. The refresh before clip 1 runs at half-integer times too, in a gap of `m`
empty block slots before clip 1 (the cells of clip 0 still in flight keep clip 0's condition): its
new reference is clip 0's first latent (streaming; relayed by the controller) or the decoder's
online refresh (official, "caller": published by the VAE rank after clip 0's decode).

Stop: rank 0 asks the controller to admit each block at its first event (and stops when the audio
ends); a refused block n is passed on as END in place of n's first message, so every rank runs
exactly the blocks before n (those in flight are finished) and their state parts merge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from math import gcd

import torch

from ..errors import InputError
from ..model.cache import CondCache
from ..sampling.generator import VIDEO_PER_LATENT, BlockSampler, LatentBlock
from .transport import END, Peers

CELL, SINK = 0, 1  # message kinds
HEADER = 4  # (kind, clip, block, step)


def skew(ranks: int, steps: int) -> int:
    """d: the smallest >= 1 with gcd(ranks + d, steps) = 1."""
    d = 1
    while gcd(ranks + d, steps) != 1:
        d += 1
    return d


def cell_time(n: int, s: int, k: int, ranks: int, steps: int) -> int:
    """The wavefront time of block slot n's step s on rank k."""
    return s * (ranks + skew(ranks, steps)) + k + steps * n


class LayerSampler(BlockSampler):
    """Rank `rank` of `ranks` running `layers` (its caches and text cache hold only those; see
    BlockSampler for the other arguments). clip_audio(c): clip c's audio or None past the end."""

    def __init__(self, *args, layers: range, rank: int, ranks: int, control, peers: Peers,
                 clip_audio: Callable[[int], torch.Tensor | None], **kwargs):
        super().__init__(*args, **kwargs)
        if self.caches[0].layers != layers or self.text.layers != layers:
            raise InputError("layers", f"the caches hold layers {self.caches[0].layers!r} and the text cache "
                             f"{self.text.layers!r}, the rank runs {layers!r}.", "build both for the rank's layers.")
        self.layers, self.rank, self.ranks = layers, rank, ranks
        self.control, self.peers, self.clip_audio = control, peers, clip_audio

    @property
    def finishes_blocks(self) -> bool:
        return self.rank == self.ranks - 1

    # ----------------------------------------------------------------------------------------

    def blocks(self) -> Iterator[LatentBlock]:
        """Run this rank's events in time order until the stream stops; the last rank yields
        each denoised block (in block order). Afterwards the counters stand at the stop block, as
        in one process stopped after the block before it."""
        S, N, k, bpc = self.config.steps, self.ranks, self.rank, self.blocks_per_clip
        self._g0 = g0 = self.clip * bpc + self.block
        self._audios: dict[int, torch.Tensor] = {}
        self._offsets: dict[int, list[int]] = {}
        self._admitted: set[int] = set()
        self._stop: int | None = None
        period = N + skew(N, S)
        sink = self.caches[0].cond is None
        self.conds: dict[int, CondCache] = {} if sink else {0: self.caches[0].cond}
        self._nb, self._m, refresh2 = self._plan_refresh(g0)
        if self.finishes_blocks and self.config.sink_refresh == "first_clip_output" and 0 < g0 <= bpc \
                and self.refreshed_at != 1:  # resumed after block (0, 0): the other ranks need its latent
            self.control.post("put", "first_clip_latent", self.clip_latents[:, :, :1].cpu())
        t2 = 2 * k - 1
        end2 = None
        while end2 is None or t2 <= end2:
            if t2 % 2:
                if sink and t2 == 2 * k - 1:
                    self.conds[0] = self._sink_walk(0)
                if refresh2 is not None and t2 == refresh2 + 2 * k and self._refresh_runs():
                    self._refresh()
            else:
                cell = self._cell_at(t2 // 2, period)
                if cell is not None and (self._stop is None or cell[0] < self._stop):
                    yield from self._cell(*cell)
            if end2 is None and self._stop is not None:
                end2 = self._end_time(t2, period, refresh2)
            t2 += 1
        self.peers.flush()
        latest = self.conds[max(self.conds)]
        for cache in self.caches:
            cache.cond = latest
        self.clip, self.block = divmod(g0 + self._stop, bpc)

    def _plan_refresh(self, g0: int) -> tuple[int, int, int | None]:
        """(relative slot of clip 1's first block, gap slots before it, doubled time of the refresh
        on rank 0 or None when this run does not refresh)."""
        S, N, policy = self.config.steps, self.ranks, self.config.sink_refresh
        nb = self.blocks_per_clip - g0
        if policy not in ("first_clip_output", "caller") or nb < 0 or self.refreshed_at == 1:
            return nb, 0, None
        if policy == "caller":
            if nb == 0:
                raise InputError("refresh_condition", "this run refreshes the sink before clip 1 (online decode) "
                                 "but resumes at clip 1 with no new conditioning.",
                                 "resume from a state saved after the refresh, or earlier in clip 0.")
            ready = cell_time(nb - 1, S - 1, N - 1, N, S)  # clip 0's last block leaves the last rank
        else:
            ready = cell_time(0, S - 1, N - 1, N, S) if g0 == 0 else -1
        m = 0
        while S * (nb + m) - 1 < ready:
            m += 1
        return nb, m, 2 * (S * (nb + m) - 1) + 1

    def _slot(self, n: int) -> int:
        return n + self._m if n >= self._nb >= 0 else n

    def _cell_at(self, t: int, period: int) -> tuple[int, int] | None:
        """(block, step) of this rank's cell at time t, if any."""
        S = self.config.steps
        for s in range(S):
            q = t - self.rank - s * period
            if q >= 0 and q % S == 0:
                p = q // S
                if self._m and self._nb <= p < self._nb + self._m:
                    return None  # the gap before clip 1
                return (p - self._m if self._m and p >= self._nb else p), s
        return None

    def _end_time(self, now2: int, period: int, refresh2: int | None) -> int:
        """The doubled time of this rank's last event once the stop block is known (at `now2`):
        the last cell of the block before it, or the online-decode refresh."""
        stop, S, k = self._stop, self.config.steps, self.rank
        ends = [now2]
        if stop > 0:
            ends.append(2 * ((S - 1) * period + k + S * self._slot(stop - 1)))
        if refresh2 is not None and self.config.sink_refresh == "caller" and stop >= self._nb:
            ends.append(refresh2 + 2 * k)
        return max(ends)

    # --- cells --------------------------------------------------------------------------------

    def _where(self, n: int) -> tuple[int, int]:
        return divmod(self._g0 + n, self.blocks_per_clip)

    def _first_event(self, n: int, kind: int, step: int) -> torch.Tensor | None:
        """Block n's first event on this rank: the head decides whether n runs; the others learn
        it from their input (END in its place). Returns the input received (None on the head)."""
        clip, b = self._where(n)
        k = self.rank
        if k == 0:
            limit = self.config.num_clips
            ok = (limit is None or clip < limit) and self._audio(clip) is not None \
                and self.control.request("admit", clip, b)
            got = None
        else:
            got = self._take(kind, clip, b, step)
            ok = got is not None
        if not ok:
            self._stop = n
            if k < self.ranks - 1:
                self.peers.post(k + 1, (END,) * HEADER)
            return None
        self._admitted.add(n)
        return got

    def _take(self, kind: int, clip: int, b: int, step: int):
        """The next message from the previous rank (None at END), checked against what is due."""
        if kind == CELL:
            hs = (1, self.frames_per_block * self.fs, self.model.cfg.dim)
            specs = [(hs, self.dtype), (self.block_shape, self.dtype)]
        else:
            specs = [((1, self._sink_tokens(), self.model.cfg.dim), self.dtype)]
        header, tensors = self.peers.take(self.rank - 1, HEADER, specs)
        if header[0] == END:
            return None
        if header != (kind, clip, b, step):
            raise RuntimeError(f"rank {self.rank}: expected {(kind, clip, b, step)} from rank {self.rank - 1}, "
                               f"got {header}")
        return tensors

    def _cell(self, n: int, s: int) -> Iterator[LatentBlock]:
        S, N, k, nfb = self.config.steps, self.ranks, self.rank, self.frames_per_block
        clip, b = self._where(n)
        got = None
        if s == 0 and n not in self._admitted:
            got = self._first_event(n, CELL, 0)
            if n not in self._admitted:
                return
        if s == 0:
            self._offsets[n] = [self.policy.draw() for _ in range(S)]
        if k > 0 and got is None:
            got = self._take(CELL, clip, b, s)
            if got is None:
                raise RuntimeError(f"rank {k}: END in the middle of clip {clip} block {b}")
        model = self.model
        audio = self._audio(clip)[..., b * nfb * VIDEO_PER_LATENT:(b + 1) * nfb * VIDEO_PER_LATENT]
        frame = clip * self.latent_frames + b * nfb
        t = self.schedule.timesteps[s].expand(1, nfb)
        cache = self.caches[s]
        cache.cond = self.conds[1 if clip >= 1 and 1 in self.conds else 0]
        if k == 0:
            if s == 0:
                x = self._block_input(clip, b)
            else:
                header, (x,) = self.peers.take(N - 1, HEADER, [(self.block_shape, self.dtype)])
                if header != (CELL, clip, b, s):
                    raise RuntimeError(f"rank 0: expected {(CELL, clip, b, s)} from rank {N - 1}, got {header}")
            call = model.begin_block(x, t, self.text, audio, None, cache, frame * self.fs, self._offsets[n][s])
        else:
            h, x = got
            call = model.begin_block(x, t, self.text, audio, None, cache, frame * self.fs, self._offsets[n][s],
                                     embed=False)
            call.h = h
        model.run_layers(call, self.layers, cache)
        if s == S - 1:
            del self._offsets[n]
            self._admitted.discard(n)
            if b == self.blocks_per_clip - 1:
                self._audios.pop(clip, None)
        if k < N - 1:
            self.peers.post(k + 1, (CELL, clip, b, s), call.h, x)
            return
        x = self.schedule.step(x, model.finish_block(call), s)
        if s < S - 1:
            self.peers.post(0, (CELL, clip, b, s + 1), x)
            return
        self.clip_latents[:, :, b * nfb:(b + 1) * nfb] = x
        if self.config.sink_refresh == "first_clip_output" and (clip, b) == (0, 0):
            self.control.post("put", "first_clip_latent", x[:, :, :1].cpu())
        yield LatentBlock(clip, b, frame, x, b == self.blocks_per_clip - 1)

    def _audio(self, clip: int) -> torch.Tensor | None:
        if clip not in self._audios:
            audio = self.clip_audio(clip)
            if audio is None:
                return None
            self._audios[clip] = self._check_clip_audio(audio)
        return self._audios[clip]

    # --- sink ---------------------------------------------------------------------------------

    def _sink_tokens(self) -> int:
        call = self.model.begin_sink(self.ref_latents, self.motion_latents, self.text, embed=False)
        return sum(len(g.t) * len(g.h) * len(g.w) for g in (call.ref, *call.motion))

    def _sink_walk(self, clip: int, got=None) -> CondCache:
        """This rank's layers of the sink (the hidden state from the previous rank, to the next)."""
        k, model = self.rank, self.model
        call = model.begin_sink(self.ref_latents, self.motion_latents, self.text, embed=k == 0)
        if k > 0:
            got = got if got is not None else self._take(SINK, clip, 0, 0)
            call.h = got[0]
        model.sink_layers(call, self.layers)
        if k < self.ranks - 1:
            self.peers.post(k + 1, (SINK, clip, 0, 0), call.h)
        return model.finish_sink(call)

    def _refresh_runs(self) -> bool:
        # The streaming refresh belongs to clip 1's first block (it runs only if that block is
        # admitted); the online-decode one happened with clip 0's decode, once clip 0 ran.
        if self.config.sink_refresh == "caller":
            return self._stop is None or self._stop >= self._nb
        return self._stop is None

    def _refresh(self) -> None:
        """The sink refresh before clip 1, on this rank's layers."""
        got = None
        if self.config.sink_refresh == "first_clip_output":
            got = self._first_event(self._nb, SINK, 0)
            if self._nb not in self._admitted:
                return
            ref = self.clip_latents[:, :, :1] if self.finishes_blocks else \
                self.control.request("get", "first_clip_latent")
            motion = self.motion_latents
        else:
            new = self.control.request("get", "refreshed_condition")
            if new is None:  # the decoder did not refresh (no clip follows)
                return
            ref, motion = new
        self.ref_latents, self.motion_latents = self._keep(ref, motion)
        self.refreshed_at = 1
        self.conds[1] = self._sink_walk(1, got)
