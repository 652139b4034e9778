"""Helpers for the node tests (no tests here): import the pack as ComfyUI does, lay out a models
folder from the fixture set, load inputs like ComfyUI's LoadImage/LoadAudio, run an API prompt.

ComfyUI itself cannot run in CI (it needs torchvision), so `run_prompt` is a small executor with
ComfyUI's semantics for what our nodes see: queue-time VALIDATE_INPUTS, inputs by name, outputs
by slot, output caching of unchanged nodes across prompts. LoadImage and LoadAudio are rebuilt
from ComfyUI's code paths (PIL -> float [1,H,W,3]; PyAV -> float [1,C,T] + sample rate).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
# The shipped workflows: UI graphs and their API twins.
UI_FILES = sorted((REPO / "example_workflows").glob("*.json"))
API_DIR = REPO / "workflows" / "api"
# Those that write a video; the live template serves sessions until Cancel, which only real ComfyUI
# sends (tests/test_comfyui_server.py runs it there with a client).
VIDEO_FILES = [p for p in UI_FILES if "LiveAvatarLiveSession" not in p.read_text()]


def load_pack():
    """Import the repository the way ComfyUI imports a custom-node folder (path-named module)."""
    name = str(REPO).replace(".", "_x_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, str(REPO / "__init__.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def pack_module(pack, dotted: str):
    return sys.modules[f"{pack.__name__}.{dotted}"]


def models_tree(root: Path, fixtures: Path) -> Path:
    """`root/models` with the fixture checkpoints in the official download layout under liveavatar/."""
    own = root / "models" / "liveavatar"
    own.mkdir(parents=True)
    for folder in (fixtures / "ckpt").iterdir():
        (own / folder.name).symlink_to(folder, target_is_directory=True)
    return root / "models"


def cpu_prompt(prompt: dict, frames_per_clip: int, sampler: dict, writer: dict) -> dict:
    """An API prompt with the fixture's inputs, a precision a CPU runs well, `frames_per_clip` on both
    the Audio Encode and the Sampler, and the given Sampler and Video Writer inputs (changed in place)."""
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "LoadImage":
            inputs["image"] = "ref_image.png"
        elif kind == "LoadAudio":
            inputs["audio"] = "audio.wav"
        elif kind == "LiveAvatarModelLoader" and not torch.cuda.is_available():
            # fp32 is fastest on a CPU; FP8 KV caches need a bf16 DiT, which a CPU also runs.
            inputs["precision"] = "bf16" if inputs["kv_cache_dtype"] == "fp8" else "fp32"
        elif kind == "LiveAvatarAudioEncode":
            inputs["frames_per_clip"] = frames_per_clip
        elif kind == "LiveAvatarSampler":
            inputs.update(frames_per_clip=frames_per_clip, **sampler)
        elif kind == "LiveAvatarVideoWriter":
            inputs.update(writer)
    return prompt


def load_image(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        image = ImageOps.exif_transpose(img).convert("RGB")
    return torch.from_numpy(np.array(image, dtype=np.float32) / 255.0)[None]


def load_audio(path: Path) -> dict:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        chunks = [f.to_ndarray() for f in container.decode(stream)]
        rate = stream.codec_context.sample_rate
    data = np.concatenate(chunks, axis=1)
    if data.dtype == np.int16:
        data = data.astype(np.float32) / 32768.0
    return {"waveform": torch.from_numpy(data.astype(np.float32))[None], "sample_rate": rate}


class Executor:
    """Runs API-format prompts against NODE_CLASS_MAPPINGS, keeping ComfyUI's output cache."""

    def __init__(self, mappings: dict, input_dir: Path):
        self.mappings, self.input_dir = mappings, input_dir
        self.cache: dict[str, tuple] = {}
        self.executed: list[str] = []

    def validate(self, prompt: dict) -> dict:
        """Queue-time checks: node exists, required inputs present, VALIDATE_INPUTS. {id: message}."""
        errors = {}
        for nid, node in prompt.items():
            if node["class_type"] in ("LoadImage", "LoadAudio"):
                continue
            cls = self.mappings.get(node["class_type"])
            if cls is None:
                errors[nid] = f"node {node['class_type']} does not exist"
                continue
            missing = [k for k in cls.INPUT_TYPES()["required"] if k not in node["inputs"]]
            if missing:
                errors[nid] = f"missing required inputs {missing}"
                continue
            check = getattr(cls, "VALIDATE_INPUTS", None)
            if check is not None:
                params = inspect.signature(check).parameters
                consts = {k: v for k, v in node["inputs"].items() if k in params and not isinstance(v, list)}
                try:  # our checks raise InputError (a ValueError), as ComfyUI reports that once
                    result = check(**consts)
                except ValueError as exc:
                    result = str(exc)
                if result is not True:
                    errors[nid] = result
        return errors

    def run(self, prompt: dict) -> dict:
        """Execute every output node; returns {node id: ui dict}."""
        errors = self.validate(prompt)
        if errors:
            raise ValueError(json.dumps(errors))
        ui, results = {}, {}
        for nid, node in prompt.items():
            cls = self.mappings.get(node["class_type"])
            if cls is not None and getattr(cls, "OUTPUT_NODE", False):
                self._value(prompt, nid, results, ui)
        return ui

    def _key(self, prompt: dict, nid: str) -> str:
        node = prompt[nid]
        inputs = {k: (self._key(prompt, v[0]), v[1]) if isinstance(v, list) else v for k, v in node["inputs"].items()}
        return json.dumps([node["class_type"], inputs], sort_keys=True)

    def _value(self, prompt: dict, nid: str, results: dict, ui: dict) -> tuple:
        if nid in results:
            return results[nid]
        node = prompt[nid]
        key = self._key(prompt, nid)
        if key in self.cache:
            results[nid] = self.cache[key]
            return results[nid]
        kwargs = {k: self._value(prompt, v[0], results, ui)[v[1]] if isinstance(v, list) else v
                  for k, v in node["inputs"].items()}
        if node["class_type"] == "LoadImage":
            out = (load_image(self.input_dir / kwargs["image"]),)
        elif node["class_type"] == "LoadAudio":
            out = (load_audio(self.input_dir / kwargs["audio"]),)
        else:
            cls = self.mappings[node["class_type"]]
            hidden = cls.INPUT_TYPES().get("hidden", {})
            if "unique_id" in hidden:
                kwargs["unique_id"] = nid
            out = getattr(cls(), cls.FUNCTION)(**kwargs)
            if isinstance(out, dict):
                ui[nid] = out.get("ui")
                out = out["result"]
        self.executed.append(nid)
        self.cache[key] = results[nid] = out
        return out
