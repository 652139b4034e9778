"""Turning decoded frames into the uint8 RGB pictures that get encoded."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError

# The official `save_video` clamps to [-1, 1] and then normalises with a range of 2 + 1e-5
# (the fixture README, section 6, reproduces `video_uint8` bit for bit only with this divisor),
# and truncates instead of rounding (spec 6.1). So +1.0 maps to 254, never 255.
_OFFICIAL_RANGE = 2.0 + 1e-5


def to_uint8_frames(frames: torch.Tensor | np.ndarray, input_name: str = "frames") -> np.ndarray:
    """Frames as a C-contiguous uint8 array `[n, H, W, 3]`.

    Accepts the pipeline layout (a float tensor `[3, n, H, W]` in [-1, 1], quantised exactly like
    the official writer) or already quantised uint8 `[n, H, W, 3]` (tensor or ndarray, passed through).
    """
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise InputError(
                input_name, f"a numpy array must be uint8 [n, H, W, 3], got dtype {frames.dtype}.",
                "Pass float frames as a torch tensor [3, n, H, W] in [-1, 1], or convert to uint8.",
            )
        frames = torch.from_numpy(frames)
    if not isinstance(frames, torch.Tensor):
        raise InputError(input_name, f"expected a torch tensor or numpy array, got {type(frames).__name__}.")
    if frames.dtype == torch.uint8:
        if frames.dim() != 4 or frames.shape[-1] != 3:
            raise InputError(
                input_name, f"uint8 frames must be [n, H, W, 3], got shape {tuple(frames.shape)}.",
                "Pass RGB frames with the channel last.",
            )
        return np.ascontiguousarray(frames.cpu().numpy())
    if not frames.is_floating_point():
        raise InputError(
            input_name, f"frames must be float in [-1, 1] or uint8, got dtype {frames.dtype}.",
        )
    if frames.dim() != 4 or frames.shape[0] != 3:
        raise InputError(
            input_name, f"float frames must be [3, n, H, W] (channels first, time second), "
            f"got shape {tuple(frames.shape)}.",
            "Drop the batch dimension (frames[0]) or permute to [3, n, H, W].",
        )
    x = frames.detach().to(device="cpu")
    if torch.isnan(x).any():
        raise _nan_error(input_name)
    return quantise(x).numpy()


def quantise(frames: torch.Tensor) -> torch.Tensor:
    """Float frames `[3, n, H, W]` in [-1, 1] -> uint8 `[n, H, W, 3]` on the same device.

    One float32 working copy, then the official operations in their order (IEEE float32 on any
    device, so a GPU gives the CPU's bytes). NaN is not checked here: see `to_uint8_frames`.
    """
    x = frames.detach().to(dtype=torch.float32, copy=True)
    x.clamp_(-1.0, 1.0).add_(1.0).div_(_OFFICIAL_RANGE).mul_(255.0)
    return x.permute(1, 2, 3, 0).to(torch.uint8, memory_format=torch.contiguous_format)  # truncation


def _nan_error(input_name: str) -> InputError:
    return InputError(input_name, "contains NaN values.", "Check the VAE decode that produced these frames.")


class DeviceFrames:
    """Frames quantised on their GPU and copied to host memory without blocking the caller.

    Built on the stream that produced `frames` (after its work is queued); `result()` waits for
    that stream's copy only, then returns what `to_uint8_frames(frames)` would.
    """

    def __init__(self, frames: torch.Tensor, input_name: str = "frames"):
        self.input_name = input_name
        pixels = quantise(frames)
        self._host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        self._host.copy_(pixels, non_blocking=True)
        self._nan = torch.empty((), dtype=torch.bool, pin_memory=True)
        self._nan.copy_(torch.isnan(frames).any(), non_blocking=True)
        self._done = torch.cuda.current_stream(frames.device).record_event()

    def result(self) -> np.ndarray:
        self._done.synchronize()
        if bool(self._nan):
            raise _nan_error(self.input_name)
        # A pageable copy: the pinned buffer goes back to PyTorch's host cache for the next block.
        return self._host.numpy().copy()
