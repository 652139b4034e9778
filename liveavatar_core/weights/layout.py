"""Names of the files in the official downloads: the one place loaders, nodes, checks and messages read.

`Wan-AI/Wan2.2-S2V-14B` holds the DiT, the encoders and the VAE (spec/pipeline.md 1.1);
`Quark-Vision/Live-Avatar` holds the LoRA (spec/pipeline.md 1.2).
"""

from __future__ import annotations

from pathlib import PurePosixPath

LORA_REPO = "Quark-Vision/Live-Avatar"

DIT_CONFIG = "config.json"
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIT_SINGLE = "diffusion_pytorch_model.safetensors"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
# The umT5 tokenizer folder, relative to the official folder (and so to the T5 file beside it).
TOKENIZER_DIR = PurePosixPath("google", "umt5-xxl")
TOKENIZER_FILE = "tokenizer.json"
VAE_FILE = "Wan2.1_VAE.pth"
WAV2VEC2_DIR = "wav2vec2-large-xlsr-53-english"
# Weight files of a transformers wav2vec2 folder, in the order they are preferred.
WAV2VEC2_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
LORA_FILE = "liveavatar.safetensors"
