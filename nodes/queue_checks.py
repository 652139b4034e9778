"""Queue-time checks of the nodes: one message per problem, and the rules that span two nodes.

How ComfyUI reports a node's VALIDATE_INPUTS (execution.py, validate_inputs, 0.3.x): a returned
string is repeated once for every input the method takes, and each of those widgets is marked; an
exception is reported once, on the node, with its message. So our VALIDATE_INPUTS methods raise
the `InputError` that names the input at fault instead of returning its text.

VALIDATE_INPUTS sees one node's own widgets only. The one rule that spans nodes, the Audio
Encode's frames per clip equal to the Sampler's, is made visible to the Sampler by an on-prompt
handler (ComfyUI calls it on every POST /prompt before validating): it copies the encoder's value
into the Sampler's hidden input AUDIO_FRAMES_PER_CLIP when the two differ, and the Sampler's
VALIDATE_INPUTS refuses the prompt. Prompts that agree are left exactly as they were sent.
"""

from __future__ import annotations

import logging

from ..liveavatar_core.encoders.audio import check_frames_per_clip
from ..liveavatar_core.errors import InputError

log = logging.getLogger("liveavatar")

SAMPLER = "LiveAvatarSampler"
AUDIO_ENCODE = "LiveAvatarAudioEncode"
# The Sampler's hidden input that carries the linked Audio Encode's value (only on a mismatch).
AUDIO_FRAMES_PER_CLIP = "audio_frames_per_clip"
HIDDEN_TYPE = "LIVEAVATAR_AUDIO_FRAMES_PER_CLIP"


def mark_frames_per_clip_mismatch(json_data: dict) -> dict:
    """On-prompt handler: give each Sampler fed by an Audio Encode with another frames_per_clip
    that value in its hidden input, so validation refuses the prompt before anything runs."""
    prompt = json_data.get("prompt")
    if not isinstance(prompt, dict):
        return json_data
    for node in prompt.values():
        if not isinstance(node, dict) or node.get("class_type") != SAMPLER:
            continue
        inputs = node.get("inputs") or {}
        link = inputs.get("audio_features")
        if not (isinstance(link, list) and len(link) == 2):
            continue
        source = prompt.get(str(link[0]))
        if not isinstance(source, dict) or source.get("class_type") != AUDIO_ENCODE:
            continue
        audio_frames = (source.get("inputs") or {}).get("frames_per_clip")
        frames = inputs.get("frames_per_clip")
        # A linked value is only known when the graph runs; the sampler's run-time check covers it.
        if isinstance(audio_frames, int) and isinstance(frames, int) and audio_frames != frames \
                and _valid(audio_frames):  # an invalid one is the encoder's own error, reported there
            inputs[AUDIO_FRAMES_PER_CLIP] = audio_frames
    return json_data


def _valid(frames_per_clip: int) -> bool:
    try:
        check_frames_per_clip(frames_per_clip)
    except InputError:
        return False
    return True


def check_audio_frames(frames_per_clip: int | None, audio_frames_per_clip: int | None) -> None:
    """Refuse a Sampler whose frames_per_clip differs from its Audio Encode's."""
    if audio_frames_per_clip is None or frames_per_clip is None or audio_frames_per_clip == frames_per_clip:
        return
    raise InputError("frames_per_clip", f"the Sampler is set to {frames_per_clip}, but the Live Avatar Audio "
                     f"Encode node feeding its audio_features buckets the audio for {audio_frames_per_clip} "
                     "frames per clip.", "set frames_per_clip to the same value on both nodes (48 is the "
                     "value the model was trained with).")


def register() -> None:
    """Install the on-prompt handler inside a running ComfyUI server; nothing elsewhere."""
    try:
        from server import PromptServer
    except ImportError:  # plain Python: tests and scripts
        return
    server = getattr(PromptServer, "instance", None)
    if server is None or mark_frames_per_clip_mismatch in server.on_prompt_handlers:
        return
    server.add_on_prompt_handler(mark_frames_per_clip_mismatch)
