"""Text (umT5) and audio (wav2vec2) encoder nodes."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from ..liveavatar_core.encoders.audio import (DEFAULT_FRAMES_PER_CLIP, FRAMES_PER_BLOCK, AudioEncoder,
                                              check_frames_per_clip)
from ..liveavatar_core.encoders.placement import (EncoderPlacement, audio_encoder_placement,
                                                  text_encoder_placement)
from ..liveavatar_core.encoders.text import TextEncoder
from ..liveavatar_core.errors import InputError
from ..liveavatar_core.weights.layout import T5_FILE as T5_MEMBER
from ..liveavatar_core.weights.layout import TOKENIZER_DIR as TOKENIZER_SUBDIR
from ..liveavatar_core.weights.layout import WAV2VEC2_DIR as WAV2VEC2_MEMBER
from . import host

TEXT_EMBEDS = "LIVEAVATAR_TEXT_EMBEDS"
AUDIO_FEATURES = "LIVEAVATAR_AUDIO_FEATURES"


class _Loaded:
    """The last encoder of each kind, so a new prompt or audio does not reload it from disk.

    ComfyUI re-runs an encoder node whenever any of its inputs changes (the prompt included);
    keying on the file's identity and the placement keeps the weights across such runs.
    """

    def __init__(self):
        self._items: OrderedDict[tuple, object] = OrderedDict()

    def get(self, kind: str, path: Path, placement: EncoderPlacement, load):
        stat = path.stat()
        key = (kind, str(path), stat.st_mtime_ns, stat.st_size, placement)
        for old in [k for k in self._items if k[0] == kind and k != key]:
            del self._items[old]
        if key not in self._items:
            self._items[key] = load()
        return self._items[key]


LOADED = _Loaded()


def t5_choices() -> list[str]:
    return host.list_files("text_encoders") + host.own_entries(T5_MEMBER, want_dir=True)


def wav2vec2_choices() -> list[str]:
    return host.list_files("audio_encoders") + host.own_entries(WAV2VEC2_MEMBER, want_dir=True)


def _tokenizer_for(weights: Path) -> Path | None:
    """The umT5 tokenizer beside the weights, else the one of an official folder in models/liveavatar."""
    if (weights.parent / TOKENIZER_SUBDIR).is_dir():
        return None  # TextEncoder finds it by itself
    for entry in host.own_entries(TOKENIZER_SUBDIR.as_posix(), want_dir=True):
        return host.resolve(host.OWN_FOLDER, entry, "t5_encoder", TOKENIZER_SUBDIR.as_posix())
    raise InputError("t5_encoder", f"no umT5 tokenizer for {weights.name}: ComfyUI's text encoder files do not "
                     "carry the official tokenizer.",
                     f"put the google/umt5-xxl folder of the Wan2.2-S2V-14B download into "
                     f"models/{host.OWN_FOLDER}/Wan2.2-S2V-14B/google/umt5-xxl.")


class LiveAvatarTextEncode:
    DESCRIPTION = ("Encodes the prompt with umT5-XXL. The encoder stays loaded, so changing only the prompt "
                   "re-encodes without reading the weights again.")
    CATEGORY = "LiveAvatar/encoders"
    FUNCTION = "encode"
    RETURN_TYPES = (TEXT_EMBEDS,)
    RETURN_NAMES = ("text_embeds",)
    OUTPUT_TOOLTIPS = ("umT5 embedding of the prompt, for the Live Avatar sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prompt": ("STRING", {"multiline": True, "default": "A person talking to the camera, natural "
                                  "expressions, soft light.",
                                  "tooltip": "What the video shows; the speech itself comes from the audio."}),
            "t5_encoder": (t5_choices(), {"tooltip": "umT5-XXL encoder: a file in models/text_encoders, or the "
                                          "official Wan2.2-S2V-14B folder in models/liveavatar."}),
            "device": (list(host.DEVICE_CHOICES), {"default": "auto", "tooltip": "Where the encoder runs; "
                                                   "it moves back to the CPU after encoding."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, device):
        host.check_device(device, "device")  # raised, not returned: see queue_checks
        return True

    def encode(self, prompt: str, t5_encoder: str, device: str):
        weights = host.resolve("text_encoders", t5_encoder, "t5_encoder", T5_MEMBER)
        tokenizer = _tokenizer_for(weights)
        at = text_encoder_placement(host.torch_device(device, "device"))
        encoder = LOADED.get("t5", weights, at, lambda: TextEncoder.from_pretrained(
            weights, tokenizer, device=at.keep_on, dtype=at.dtype))
        with at.running(encoder):
            context = encoder.encode(prompt)
        return (context.cpu(),)


def wav2vec2(choice: str, device: str) -> AudioEncoder:
    """The wav2vec2 encoder of an `audio_encoder` choice on `device` (kept loaded between runs)."""
    path = host.resolve("audio_encoders", choice, "audio_encoder", WAV2VEC2_MEMBER)
    at = audio_encoder_placement(host.torch_device(device, "device"))
    return LOADED.get("wav2vec2", path, at, lambda: AudioEncoder.from_pretrained(
        path, device=at.keep_on, dtype=at.dtype, input_name="audio_encoder"))


class LiveAvatarAudioEncode:
    DESCRIPTION = ("Turns speech into the 25 fps wav2vec2 features that drive the avatar, and keeps the "
                   "audio for the MP4.")
    CATEGORY = "LiveAvatar/encoders"
    FUNCTION = "encode"
    RETURN_TYPES = (AUDIO_FEATURES, "INT")
    RETURN_NAMES = ("audio_features", "num_clips")
    OUTPUT_TOOLTIPS = ("Audio features (and the 16 kHz audio) for the Live Avatar sampler.",
                       "How many clips the audio covers.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "audio": ("AUDIO", {"tooltip": "The speech, e.g. from Load Audio; resampled to 16 kHz mono."}),
            "audio_encoder": (wav2vec2_choices(), {"tooltip": "wav2vec2-large-xlsr-53-english: a file in "
                                                   "models/audio_encoders, or the official Wan2.2-S2V-14B folder "
                                                   "in models/liveavatar."}),
            "device": (list(host.DEVICE_CHOICES), {"default": "auto", "tooltip": "Where wav2vec2 runs."}),
            "frames_per_clip": ("INT", {"default": DEFAULT_FRAMES_PER_CLIP, "min": FRAMES_PER_BLOCK, "max": 480,
                                        "step": FRAMES_PER_BLOCK,
                                        "tooltip": "Video frames per clip; must equal the sampler's (48 = "
                                                   "trained value)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, device=None, frames_per_clip=None):
        # Raises rather than returns: see queue_checks. A widget turned into a linked input arrives
        # as None here; it is checked when the node runs.
        if device is not None:
            host.check_device(device, "device")
        if frames_per_clip is not None:
            host.check_declared(cls.INPUT_TYPES()["required"], {"frames_per_clip": frames_per_clip})
            check_frames_per_clip(frames_per_clip)
        return True

    def encode(self, audio, audio_encoder: str, device: str, frames_per_clip: int):
        encoder = wav2vec2(audio_encoder, device)
        # Encoded by the sampler for its mode, on the device the placement keeps wav2vec2 on: window
        # by window while streaming, the whole audio at once in official mode.
        features = encoder.prepare(audio, frames_per_clip=frames_per_clip)
        return (features, features.num_clips)
