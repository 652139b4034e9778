"""Host-to-GPU copies that do not stall the host, and CUDA device lookups."""

from __future__ import annotations

import torch


def upload(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """`t.to(device)` without making the host wait for the GPU.

    A copy from pageable host memory returns only once all work queued before it on the GPU is
    done, so every small per-call table (RoPE, time embedding, audio slice) would drain the GPU
    and leave it idle while the host prepares the next kernels. Through pinned memory the copy is
    queued like a kernel; PyTorch keeps the pinned buffer until the copy has run.
    """
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def cuda_index(device: torch.device) -> int:
    """The index of the CUDA `device` (the current device when it names none)."""
    return device.index if device.index is not None else torch.cuda.current_device()
