"""Where the umT5 and wav2vec2 encoders run, where they wait between runs, and in which dtype.

One policy for the ComfyUI nodes and the command line, so both encode a prompt and an audio track the
same way on the same machine.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from ..placement.offload import on_device


@dataclass(frozen=True)
class EncoderPlacement:
    """run_on: the device that encodes; keep_on: where the weights are loaded and wait between runs;
    dtype: of the weights."""

    run_on: torch.device
    keep_on: torch.device
    dtype: torch.dtype

    def running(self, encoder) -> AbstractContextManager:
        """`encoder` (loaded on `keep_on`) on `run_on` inside a `with` block, back afterwards, also
        after an error (`placement.offload.on_device`); nothing moves when both are one device."""
        return nullcontext() if self.run_on == self.keep_on else on_device(encoder, self.run_on)


def _encoder_dtype(precision: str) -> torch.dtype:
    # bf16 and fp8 runs encode in bf16, as the official pipeline; fp32 runs (parity) encode in fp32.
    return torch.float32 if precision == "fp32" else torch.bfloat16


def text_encoder_placement(device: str | torch.device, precision: str = "bf16") -> EncoderPlacement:
    """umT5-XXL: encodes on `device` and waits on the CPU, since its 11 GB must not sit on the GPU
    while the DiT samples. bf16 on every device (its activations overflow float16, and fp32 would
    double the 11 GB in system memory); fp32 only for an fp32 run."""
    return EncoderPlacement(torch.device(device), torch.device("cpu"), _encoder_dtype(precision))


def audio_encoder_placement(device: str | torch.device, precision: str = "bf16") -> EncoderPlacement:
    """wav2vec2 (0.3 B parameters) encodes and waits on `device`. bf16 on a GPU, as the official
    pipeline; fp32 on the CPU, where bf16 matmuls are slow on most processors and the 1.3 GB of fp32
    weights cost little; fp32 for an fp32 run."""
    dev = torch.device(device)
    dtype = _encoder_dtype(precision) if dev.type != "cpu" else torch.float32
    return EncoderPlacement(dev, dev, dtype)
