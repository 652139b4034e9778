"""Whole-model offload for components used once per prompt or audio track (the umT5 encoder).

`on_device(component, device)` moves a component to `device` for a `with` block and back to where
it was afterwards, freeing the GPU memory for the DiT; `encoders.placement` decides which encoder
runs where. A component is an `nn.Module` or an object with `.to(device)` and `.device` (the encoders).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..errors import InputError


def component_device(component) -> torch.device:
    """Where a component's weights are."""
    dev = getattr(component, "device", None)
    if isinstance(dev, torch.device):
        return dev
    if isinstance(component, torch.nn.Module):
        p = next(component.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
    raise InputError("component", f"{type(component).__name__} has neither parameters nor a device.",
                     "pass an nn.Module or an encoder object with .to() and .device.")


@contextmanager
def on_device(component, device: str | torch.device) -> Iterator:
    """Use `component` on `device` inside the block; it returns to its previous device after.

    Pinned host copies are not kept: the component moves once in and once out per use, which is
    what a once-per-run encoder needs.
    """
    device = torch.device(device)
    home = component_device(component)
    if home == device:
        yield component
        return
    moved = component.to(device)
    moved = component if moved is None else moved
    try:
        yield moved
    finally:
        moved.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()
