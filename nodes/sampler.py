"""Chunk sampler node: validates the generation settings and hands a lazy stream to the writer."""

from __future__ import annotations

from ..liveavatar_core.encoders.audio import DEFAULT_FRAMES_PER_CLIP, FRAMES_PER_BLOCK
from ..liveavatar_core.encoders.image import DEFAULT_SIZE, SIZE_PRESETS, parse_size
from ..liveavatar_core.errors import InputError
from ..liveavatar_core.model.offset import D_MAX, D_MIN
from ..liveavatar_core.pipeline import GenerationSettings, generate
from ..liveavatar_core.sampling.config import MODES, OFFICIAL_STEPS
from . import host, queue_checks
from .encoders import AUDIO_FEATURES, TEXT_EMBEDS
from .loader import MODEL

STREAM = "LIVEAVATAR_STREAM"
CUSTOM_SIZE = "custom"
# "recorded" needs a list of draws, which only the Python API can pass.
REF_OFFSET_MODES = ("default", "seeded", "fixed", "official")
SEED_MAX = 2 ** 63 - 1


def settings_from_widgets(size: str, custom_width: int, custom_height: int, seed: int, num_clips: int,
                          frames_per_clip: int, sample_steps: int, mode: str, ref_offset_mode: str,
                          ref_offset: int, online_decode: bool) -> GenerationSettings:
    """The widgets as core settings, fully validated (also used at queue time)."""
    if size != CUSTOM_SIZE and size not in SIZE_PRESETS:
        raise InputError("size", f"'{size}' is not a preset.", f"choose a preset or '{CUSTOM_SIZE}'.")
    if ref_offset_mode not in REF_OFFSET_MODES:
        raise InputError("ref_offset_mode", f"unknown mode '{ref_offset_mode}'.",
                         f"choose one of {', '.join(REF_OFFSET_MODES)}.")
    area = f"{custom_width}*{custom_height}" if size == CUSTOM_SIZE else size
    parse_size(area)
    settings = GenerationSettings(
        size=area, seed=seed, num_clips=num_clips, frames_per_clip=frames_per_clip, sample_steps=sample_steps,
        mode=mode, ref_offset_mode=None if ref_offset_mode == "default" else ref_offset_mode,
        ref_offset=ref_offset, online_decode=online_decode)
    settings.sampler_config()  # steps, frames per clip and offset rules live there
    return settings


class LiveAvatarSampler:
    DESCRIPTION = ("Plans a Live Avatar video: the causal DiT samples it block by block (3 latent frames, "
                   "12 video frames) while the writer decodes and saves each block. Nothing heavy runs "
                   "here; the work happens in the writer.")
    CATEGORY = "LiveAvatar/sampling"
    FUNCTION = "sample"
    RETURN_TYPES = (STREAM,)
    RETURN_NAMES = ("stream",)
    OUTPUT_TOOLTIPS = ("A lazy video stream; connect it to Live Avatar Video Writer.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL, {"tooltip": "From Live Avatar Model Loader."}),
            "text_embeds": (TEXT_EMBEDS, {"tooltip": "From Live Avatar Text Encode."}),
            "audio_features": (AUDIO_FEATURES, {"tooltip": "From Live Avatar Audio Encode."}),
            "image": ("IMAGE", {"tooltip": "Reference picture of the person (the first image of a batch)."}),
            "size": ([*SIZE_PRESETS, CUSTOM_SIZE], {"default": DEFAULT_SIZE, "tooltip": "Pixel area W*H; the "
                     "aspect ratio follows the image (sides are multiples of 64). 'custom' uses the two "
                     "values below."}),
            "custom_width": ("INT", {"default": 704, "min": 64, "max": 4096, "step": 16,
                                     "tooltip": "Width of the custom area (only with size 'custom')."}),
            "custom_height": ("INT", {"default": 384, "min": 64, "max": 4096, "step": 16,
                                      "tooltip": "Height of the custom area (only with size 'custom')."}),
            "seed": ("INT", {"default": 420, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                             "tooltip": "Noise seed; clip r uses seed + r."}),
            "num_clips": ("INT", {"default": 0, "min": 0, "max": 100000,
                                  "tooltip": "Clips to generate (48 frames each); 0 = as long as the audio."}),
            "frames_per_clip": ("INT", {"default": DEFAULT_FRAMES_PER_CLIP, "min": FRAMES_PER_BLOCK, "max": 480,
                                        "step": FRAMES_PER_BLOCK, "tooltip": "Video frames per clip, a "
                                        "multiple of 12; 48 is the trained value and must match the audio "
                                        "encoder's."}),
            "sample_steps": ("INT", {"default": OFFICIAL_STEPS, "min": 1, "max": 50,
                                     "tooltip": "Denoising steps per block; the distilled model uses 4."}),
            "mode": (list(MODES), {"default": "streaming", "tooltip": "streaming: every block is decoded as "
                                   "soon as it is sampled (low latency). official: the release single-GPU "
                                   "pipeline, decoded per clip (parity)."}),
            "ref_offset_mode": (list(REF_OFFSET_MODES), {"default": "default", "tooltip": "How far ahead of "
                                "each block the reference (sink) frame sits in RoPE time: default (seeded in "
                                "streaming, official in official mode), seeded random, fixed, or the "
                                "official draw."}),
            "ref_offset": ("INT", {"default": D_MAX, "min": D_MIN, "max": D_MAX, "tooltip": "Reference distance "
                                   "in latent frames for ref_offset_mode 'fixed'."}),
            "online_decode": ("BOOLEAN", {"default": False, "tooltip": "Official mode only: the release's "
                                          "online-decode variant (sink refreshed after clip 0)."}),
        }, "hidden": {queue_checks.AUDIO_FRAMES_PER_CLIP: queue_checks.HIDDEN_TYPE}}

    @classmethod
    def VALIDATE_INPUTS(cls, size=None, custom_width=None, custom_height=None, seed=None, num_clips=None,
                        frames_per_clip=None, sample_steps=None, mode=None, ref_offset_mode=None,
                        ref_offset=None, online_decode=None, audio_frames_per_clip=None):
        # Raises rather than returns: see queue_checks (one message, not one per input).
        values = dict(size=size, custom_width=custom_width, custom_height=custom_height, seed=seed,
                      num_clips=num_clips, frames_per_clip=frames_per_clip, sample_steps=sample_steps, mode=mode,
                      ref_offset_mode=ref_offset_mode, ref_offset=ref_offset, online_decode=online_decode)
        host.check_declared(cls.INPUT_TYPES()["required"], {k: v for k, v in values.items() if v is not None})
        if all(v is not None for v in values.values()):  # a linked widget is checked when the node runs
            settings_from_widgets(**values)
        queue_checks.check_audio_frames(frames_per_clip, audio_frames_per_clip)
        return True

    def sample(self, model, text_embeds, audio_features, image, **widgets):
        settings = settings_from_widgets(**widgets)
        return (generate(model, text_embeds, audio_features, image, settings,
                         should_stop=host.interrupt_requested),)
