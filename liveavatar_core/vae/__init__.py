"""Wan 2.1 VAE: model, official chunking protocol and streaming encoder/decoder."""

from .config import VAEConfig
from .loader import load_vae
from .model import WanVAE
from .streaming import StreamingDecoder, StreamingEncoder

__all__ = ["VAEConfig", "WanVAE", "StreamingDecoder", "StreamingEncoder", "load_vae"]
