"""One entry point that says what a weight file or folder is, in one line, from keys and shapes.

Used by the CLI's `inspect` command and the loader node to report what was found before loading.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import WeightsError
from .dit import detect_dit
from .io import open_checkpoint
from .vae import describe_vae

# Files of the official Wan2.2-S2V-14B folder and what each holds (spec/pipeline.md 1.1).
OFFICIAL_PARTS = {
    "diffusion_pytorch_model.safetensors.index.json": "DiT",
    "models_t5_umt5-xxl-enc-bf16.pth": "text encoder",
    "Wan2.1_VAE.pth": "VAE",
    "wav2vec2-large-xlsr-53-english/model.safetensors": "audio encoder",
}


def identify(path: str | Path, input_name: str = "checkpoint") -> str:
    """Describe a checkpoint file, or every part of an official folder (missing parts named)."""
    path = Path(path)
    if path.is_dir():
        lines = []
        for rel, role in OFFICIAL_PARTS.items():
            part = path / rel
            lines.append(f"{role}: {identify(part, input_name) if part.exists() else 'MISSING (' + rel + ')'}")
        if not (path / "google" / "umt5-xxl" / "tokenizer.json").exists():
            lines.append("tokenizer: MISSING (google/umt5-xxl/tokenizer.json)")
        return f"{path}:\n  " + "\n  ".join(lines)
    lazy = open_checkpoint(path, input_name)
    found = detect_dit(lazy)
    if found.kind == "vae":
        try:
            return describe_vae(lazy.shapes(), lazy.dtype_summary())
        except WeightsError as exc:
            return exc.problem
    return found.description
