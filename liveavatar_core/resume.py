"""Resume files: everything needed to continue an interrupted video stream into the same MP4.

A stream written by `write_mp4(..., resume_path=...)` that stops early (a cancel, an exception,
Ctrl-C) leaves a playable MP4 of every completed block and, next to it, a resume file with the
state after the last of those blocks. `generate(..., resume_from=file)` continues from the next
block and `write_mp4` appends to the same MP4, so the finished video equals an uninterrupted run.

What a file holds (`torch.save`, loadable with `weights_only=True`: tensors and JSON-able data):
* the block sampler's state (step KV rings, condition cache, counters; see sampling/state.py);
* the decoder's state: in streaming mode the causal VAE feature cache, in official mode the
  decoded-frame window (only its generated tail: the rest is the reference picture) and its
  re-encoded latents;
* the stream's counters, the `GenerationSettings` and the MP4 writer's state;
* after a failed write (a full disk), the frames handed out that the MP4 lacks;
* digests of the inputs (text embedding, audio embedding, reference pixels, model), so that a
  resume with anything else is refused instead of silently making a different video.

The file is as large as the state: at release size the step KV rings dominate (tens of GB).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

FORMAT = "liveavatar.stream_resume.v1"
ResumeState = dict[str, Any]  # {"meta": JSON-able dict, "tensors": {name: tensor}}

# What each fingerprint entry is, in the words of a refusal.
_INPUTS = {
    "text": "prompt (its text embedding differs)",
    "audio": "audio (its audio embedding differs)",
    "reference": "reference image (its pixels at the output size differ)",
    "model": "model",
}
_META_KEYS = ("settings", "fingerprint", "model", "stream", "sampler", "decoder", "writer")
_FIX_SAME_RUN = ("resume with the inputs and settings of the interrupted run (the same command plus "
                 "--resume), or start a new video without resuming.")


def tensor_digest(tensor: torch.Tensor) -> str:
    """Digest of a tensor's dtype, shape and bytes, on any device and in any dtype."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def input_fingerprint(*, text: torch.Tensor | None = None, audio: torch.Tensor | str | None = None,
                      reference: torch.Tensor | None = None, model=None) -> dict[str, str]:
    """Digests of the given inputs: text embedding, audio embedding, reference pixels, model.

    A string is taken as an input's digest already (streamed audio: `StreamedAudioFeatures.digest`).

    The model is identified by its `identity`: files, LoRA, precision and the digest of its patch
    embedding after the LoRA merge (which tells apart checkpoints with the same layout), not its
    placement, so a run resumes on another GPU count.
    """
    out = {}
    for name, value in (("text", text), ("audio", audio), ("reference", reference)):
        if value is not None:
            out[name] = value if isinstance(value, str) else tensor_digest(value)
    if model is not None:
        out["model"] = model.identity
    return out


def build_resume_state(*, settings: dict, fingerprint: dict[str, str], model_description: str, stream: dict,
                       sampler: dict, decoder: dict, writer: dict | None,
                       unwritten: list[torch.Tensor] = ()) -> ResumeState:
    """One resume state from its parts; `sampler` and `decoder` are `{"meta", "tensors"}` dicts.

    unwritten: the uint8 chunks `[n, H, W, 3]` the stream handed out after those in the MP4 (a
    write that failed); a resumed run writes them first.
    """
    tensors = {f"sampler.{k}": v for k, v in sampler["tensors"].items()}
    tensors.update({f"decoder.{k}": v for k, v in decoder["tensors"].items()})
    tensors.update({f"unwritten.{i}": frames for i, frames in enumerate(unwritten)})
    meta = {"format": FORMAT, "settings": settings, "fingerprint": fingerprint, "model": model_description,
            "stream": stream, "sampler": sampler["meta"], "decoder": decoder["meta"], "writer": writer}
    return {"meta": meta, "tensors": tensors}


def unwritten_chunks(state: ResumeState) -> list[torch.Tensor]:
    """The chunks a resumed run writes before its first new block (see `build_resume_state`)."""
    count = sum(1 for k in state["tensors"] if k.startswith("unwritten."))
    return [state["tensors"][f"unwritten.{i}"] for i in range(count)]


def resume_part(state: ResumeState, name: str) -> dict:
    """The `{"meta", "tensors"}` dict of one part ("sampler" or "decoder") of a resume state."""
    prefix = name + "."
    tensors = {k[len(prefix):]: v for k, v in state["tensors"].items() if k.startswith(prefix)}
    return {"meta": state["meta"][name], "tensors": tensors}


# Less free space than this after a failed write: the disk was full.
_ROOM_BYTES = 1 << 20


def save_resume_state(state: ResumeState, path: str | os.PathLike) -> Path:
    """Write a state atomically: a kill during the write leaves the previous file (if any) intact."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError("resume", f"folder {path.parent} does not exist.",
                         "save the resume file in an existing folder.")
    # Views would drag their whole storage into the file (a window slice, a ring row range).
    tensors = {k: v.detach().clone() if _is_view(v) else v.detach() for k, v in state["tensors"].items()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            # torch.save copies device tensors to the CPU one storage at a time while writing.
            try:
                torch.save({"meta": state["meta"], "tensors": tensors}, f)
            except RuntimeError as exc:
                # torch's zip writer reports a write the disk refused as "unexpected pos": name the
                # cause when it is that there is no room left.
                if shutil.disk_usage(tmp.parent).free < _ROOM_BYTES:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from exc
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _is_view(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def load_resume_state(source: str | os.PathLike | ResumeState) -> ResumeState:
    """Read (memory-mapped) and check the structure of a resume file; a loaded state passes through."""
    if isinstance(source, dict):
        return _checked(source, "the given resume state")
    path = Path(source)
    if not path.is_file():
        raise InputError("resume", f"{path} does not exist.",
                         "pass the .resume file written when the run was interrupted (by default the video's "
                         "path plus '.resume').")
    try:
        # Memory-mapped: a resumed stream reads each tensor once, straight into its place. Not on
        # Windows, where a mapped file cannot be replaced or deleted (the next save, the cleanup).
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=os.name != "nt")
    except Exception as exc:  # torch raises several types for damaged or foreign files
        raise InputError("resume", f"{path} is not a readable resume file ({type(exc).__name__}: {exc}).",
                         "it may be truncated or damaged; start the video again without resuming.") from None
    return _checked(state, str(path))


def _checked(state, where: str) -> ResumeState:
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(state.get("tensors"), dict):
        raise InputError("resume", f"{where} is not a Live Avatar stream resume file ({FORMAT}).",
                         "pass the .resume file written by an interrupted generate / write_mp4 run.")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise InputError("resume", f"{where} lacks {', '.join(missing)}.",
                         "the file is damaged; start the video again without resuming.")
    return state


def check_resume_state(state: ResumeState, settings: dict | None = None,
                       fingerprint: dict[str, str] | None = None) -> None:
    """Refuse a resume whose settings or inputs differ from the interrupted run's (only those given)."""
    meta = state["meta"]
    if settings is not None:
        saved = meta["settings"]
        diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if diff:
            raise InputError("resume", "the interrupted run used other settings: " + ", ".join(
                f"{k}={saved.get(k)!r} (now {settings.get(k)!r})" for k in diff) + ".", _FIX_SAME_RUN)
    for name, digest in (fingerprint or {}).items():
        if meta["fingerprint"].get(name) != digest:
            what = _INPUTS[name]
            if name == "model":
                what += f": it was {meta['model']}"
            raise InputError("resume", f"the interrupted run used another {what}.", _FIX_SAME_RUN)


def partial_video(state: ResumeState) -> Path:
    """The MP4 an interrupted run was writing; refused if it is gone or shorter than recorded."""
    writer = state["meta"]["writer"]
    if writer is None:
        raise InputError("resume", "the resume file holds no MP4 writer state (the interrupted stream was not "
                         "written with write_mp4).", "resume it with generate(..., resume_from=...) and consume "
                         "the frames yourself, or start a new video.")
    path = Path(writer["path"])
    size = path.stat().st_size if path.is_file() else -1
    if size < writer["bytes"]:
        raise InputError("resume", f"the partial video {path} is missing or shorter than the recorded "
                         f"{writer['bytes']} bytes.",
                         "put the interrupted MP4 back where it was, or start a new video.")
    return path
