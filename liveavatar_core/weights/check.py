"""Every weight file of a run checked in a second, before any of them is loaded.

The loaders read headers before tensors too, but each only when its turn comes: a truncated VAE
was found after the encoders and the DiT had loaded. `check_run_files` opens nothing but headers,
zip directories, JSON settings and file sizes (`io.check_checkpoint`), so a missing LoRA, a corrupt
config.json, a missing or truncated shard or VAE fails at once, naming the file and the fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..config import DiTConfig
from ..errors import WeightsError
from . import dit, lora, t5, wav2vec2
from .io import CheckedFile, check_checkpoint, read_json_object
from .layout import LORA_FILE, LORA_REPO, TOKENIZER_FILE

VAE_INPUT = "vae"
# What the official scripts pass as --lora_path_dmd: a Hugging Face repository id, not a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

PathLike = str | os.PathLike


def check_run_files(dit_path: PathLike | None = None, *, lora_path: PathLike | None = None,
                    vae_path: PathLike | None = None, t5_path: PathLike | None = None,
                    tokenizer_path: PathLike | None = None,
                    wav2vec2_path: PathLike | None = None) -> list[CheckedFile]:
    """Check the files of every given part from headers and sizes alone; returns what was checked.

    dit_path: the official Wan2.2-S2V-14B folder, its `*.index.json` or a single DiT file (the
    config.json that goes with it is parsed and validated); lora_path: liveavatar.safetensors;
    vae_path: the Wan 2.1 VAE file; t5_path: the umT5 weights, with `tokenizer_path` (None: the
    google/umt5-xxl folder beside them, where the text encoder looks); wav2vec2_path: the
    wav2vec2 folder or a single file. Parts left None are not checked. Raises `WeightsError`
    naming the first missing, truncated or corrupt file and the fix; reads no tensor data.
    """
    checked: list[CheckedFile] = []
    if dit_path is not None:
        weights, config_json, _ = dit.resolve_dit_files(dit_path)
        if config_json is not None:
            DiTConfig.from_json(config_json)
        checked.append(check_checkpoint(weights, dit.INPUT_NAME))
    if lora_path is not None:
        checked.append(check_checkpoint(_lora_file(lora_path), lora.INPUT_NAME))
    if vae_path is not None:
        checked.append(check_checkpoint(vae_path, VAE_INPUT))
    if t5_path is not None:
        checked.append(check_checkpoint(t5_path, t5.INPUT_NAME))
        folder = t5.tokenizer_folder(t5_path, tokenizer_path)
        for name in (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).exists():
                read_json_object(folder / name, "tokenizer_path")
    if wav2vec2_path is not None:
        weights, config_json, preprocessor_json = wav2vec2.wav2vec2_files(wav2vec2_path)
        for settings in (config_json, preprocessor_json):
            if settings is not None:
                read_json_object(settings, "audio_encoder")
        checked.append(check_checkpoint(weights, "audio_encoder"))
    return checked


def _lora_file(path: PathLike) -> Path:
    """The LoRA file; a Hugging Face id (as the official scripts pass) is named as one, with the download."""
    text = os.fspath(path)
    if not Path(text).exists() and _HUB_ID.match(text) and not text.startswith("."):
        raise WeightsError(lora.INPUT_NAME, f"'{text}' is a Hugging Face repository id, not a file; this pack "
                           "reads local files only.",
                           f"download {LORA_FILE} from {LORA_REPO} (`hf download {LORA_REPO} {LORA_FILE} "
                           f"--local-dir ckpt/LiveAvatar`) and pass ckpt/LiveAvatar/{LORA_FILE}.")
    return Path(text)
