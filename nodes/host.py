"""Everything the nodes need from ComfyUI, in one place, usable without ComfyUI.

Inside ComfyUI this module uses `folder_paths`, `comfy.utils.ProgressBar`,
`comfy.model_management` and `server.PromptServer`. Outside it (unit tests, scripts) the same
calls work against a "standalone root" set with `use_standalone(models_dir, output_dir)`: a folder
laid out like ComfyUI's `models/` (diffusion_models/, loras/, vae/, text_encoders/,
audio_encoders/, liveavatar/). Progress, previews and status text then go nowhere (there is no UI).

Model choices: files of ComfyUI's standard folders are listed by their relative names, as the
core loaders do. Entries of our own `liveavatar` folder (the official Hugging Face download layout)
are spelled `liveavatar:<relative path>`: a folder such as `liveavatar:Wan2.2-S2V-14B` stands
for every component inside it, a file such as `liveavatar:LiveAvatar/liveavatar.safetensors` for
itself. The colon keeps them apart from ComfyUI file names (Windows forbids it in names).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..liveavatar_core.errors import InputError

try:  # inside ComfyUI
    import folder_paths
except ImportError:  # plain Python: tests and scripts use the standalone root
    folder_paths = None

log = logging.getLogger("liveavatar")

OWN_FOLDER = "liveavatar"
OWN_PREFIX = "liveavatar:"
WEIGHT_EXTENSIONS = (".safetensors", ".sft", ".pth", ".pt", ".bin", ".ckpt")
# How deep the `liveavatar` folder is searched for official folders (e.g. Wan-AI/Wan2.2-S2V-14B).
_SEARCH_DEPTH = 2


@dataclass(frozen=True)
class Standalone:
    """Folders used when ComfyUI is absent."""

    models_dir: Path
    output_dir: Path


_standalone: Standalone | None = None


def use_standalone(models_dir: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Serve model lookups from `models_dir` and write outputs to `output_dir` (no ComfyUI)."""
    global _standalone
    _standalone = Standalone(Path(models_dir), Path(output_dir))


def in_comfyui() -> bool:
    return folder_paths is not None


def register_model_folder() -> None:
    """Add `models/liveavatar` to ComfyUI's folders, keeping paths extra_model_paths.yaml added."""
    if folder_paths is None:
        return
    default = os.path.join(folder_paths.models_dir, OWN_FOLDER)
    paths, _ = folder_paths.folder_names_and_paths.get(OWN_FOLDER, ([], set()))
    if default not in paths:
        paths = [*paths, default]
    folder_paths.folder_names_and_paths[OWN_FOLDER] = (paths, set(folder_paths.supported_pt_extensions))


def folder_roots(folder: str) -> list[Path]:
    """Every directory that holds models of ComfyUI folder type `folder`."""
    if folder_paths is not None:
        try:
            return [Path(p) for p in folder_paths.get_folder_paths(folder)]
        except KeyError:
            return []
    if _standalone is None:
        return []
    return [_standalone.models_dir / folder]


def list_files(folder: str) -> list[str]:
    """Relative names of the weight files in `folder` (ComfyUI's own list inside ComfyUI)."""
    if folder_paths is not None:
        try:
            return [n for n in folder_paths.get_filename_list(folder) if n.lower().endswith(WEIGHT_EXTENSIONS)]
        except KeyError:
            return []
    names = []
    for root in folder_roots(folder):
        for dirpath, _, files in os.walk(root, followlinks=True):
            for name in files:
                if name.lower().endswith(WEIGHT_EXTENSIONS):
                    names.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(set(names))


def own_entries(member: str, want_dir: bool) -> list[str]:
    """`liveavatar:<folder>` entries of folders holding `member`, or `liveavatar:<file>` entries."""
    found = set()
    for root in folder_roots(OWN_FOLDER):
        if not root.is_dir():
            continue
        if want_dir:
            for folder in _walk_dirs(root, _SEARCH_DEPTH):
                if (folder / member).exists():
                    found.add(OWN_PREFIX + folder.relative_to(root).as_posix())
        else:
            for dirpath, _, files in os.walk(root, followlinks=True):
                for name in files:
                    if re.fullmatch(member, name):
                        found.add(OWN_PREFIX + Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def _walk_dirs(root: Path, depth: int):
    level = [root]
    for _ in range(depth):
        level = [d for parent in level for d in sorted(parent.iterdir()) if d.is_dir()]
        yield from level


def resolve(folder: str, name: str, input_name: str, member: str | None = None) -> Path:
    """Absolute path of choice `name`; `member` is the component inside a `liveavatar:` folder."""
    if not isinstance(name, str) or not name:
        raise InputError(input_name, "no file chosen.", f"pick a file from models/{folder} or models/{OWN_FOLDER}.")
    if name.startswith(OWN_PREFIX):
        rel = name[len(OWN_PREFIX):]
        for root in folder_roots(OWN_FOLDER):
            candidate = root / rel
            if member is not None and candidate.is_dir():
                candidate = candidate / member
            if _inside(candidate, root) and candidate.exists():
                return candidate
        what = f"{rel}/{member}" if member else rel
        raise InputError(input_name, f"{what} was not found in models/{OWN_FOLDER}.",
                         f"put the official download there (models/{OWN_FOLDER}/{what}) and refresh the page.")
    for root in folder_roots(folder):
        candidate = root / name
        if _inside(candidate, root) and candidate.is_file():
            return candidate
    raise InputError(input_name, f"'{name}' is not in models/{folder}.",
                     f"copy the file into models/{folder} (or add that folder in extra_model_paths.yaml), "
                     "then refresh the page and choose it again.")


def _inside(path: Path, root: Path) -> bool:
    # A choice must not walk out of its model folder ("../../etc").
    return os.path.normpath(path).startswith(os.path.normpath(root) + os.sep)


def check_declared(spec: dict, values: dict) -> None:
    """Apply the declared choices and min/max of `spec` (INPUT_TYPES entries) to `values`.

    ComfyUI skips its own range and choice checks for every input a node's VALIDATE_INPUTS
    receives (execution.py, validate_inputs), so such a node must make them itself.
    """
    for name, value in values.items():
        kind, options = spec[name]
        if isinstance(kind, list):
            if value not in kind:
                raise InputError(name, f"{value!r} is not one of the choices.",
                                 f"choose one of {', '.join(map(str, kind))}.")
        elif kind in ("INT", "FLOAT"):
            low, high = options.get("min"), options.get("max")
            if (low is not None and value < low) or (high is not None and value > high):
                raise InputError(name, f"{value} is outside the allowed range {low}..{high}.",
                                 f"use a value from {low} to {high}.")


# --- outputs ---------------------------------------------------------------------------------


def output_directory() -> Path:
    if folder_paths is not None:
        return Path(folder_paths.get_output_directory())
    if _standalone is None:
        raise InputError("filename_prefix", "no output folder is configured outside ComfyUI.",
                         "call nodes.host.use_standalone(models_dir, output_dir) first.")
    return _standalone.output_dir


def new_output_path(prefix: str, width: int, height: int, ext: str = ".mp4") -> tuple[Path, str, str]:
    """(absolute path, file name, subfolder) of a new numbered output file for `prefix`."""
    from ..liveavatar_core.video import safe_output_path

    bad = sorted({f"\\x{ord(c):02x}" for c in prefix if ord(c) < 32 or ord(c) == 127})
    if bad:
        raise InputError("filename_prefix", f"{prefix!r} contains the control character(s) {', '.join(bad)}, "
                         "which file names must not contain.",
                         "type the prefix again without them, e.g. video/LiveAvatar.")
    out = output_directory()
    if folder_paths is not None:
        try:
            folder, stem, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, str(out), width, height)
        except Exception as exc:  # ComfyUI raises a bare Exception for prefixes leaving output/
            raise InputError("filename_prefix", str(exc), "use a relative prefix such as video/LiveAvatar.") from None
        path = Path(folder) / f"{stem}_{counter:05}_{ext}"
        return path, path.name, subfolder
    subfolder, _, stem = prefix.replace("\\", "/").rpartition("/")
    if any(part in ("..", "") for part in subfolder.split("/") if subfolder) or subfolder.startswith("/"):
        raise InputError("filename_prefix", f"'{prefix}' leaves the output folder.",
                         "use a relative prefix such as video/LiveAvatar.")
    path = safe_output_path(out / subfolder, stem or "LiveAvatar", ext)
    return path, path.name, subfolder


# --- progress, previews, status text, cancel ------------------------------------------------


def interrupt_requested() -> bool:
    """True once the user pressed Cancel (only reads the flag, so the stream can end cleanly)."""
    if folder_paths is None:
        return False
    import comfy.model_management

    return comfy.model_management.processing_interrupted()


def raise_if_interrupted() -> None:
    """Let ComfyUI report the prompt as interrupted (it consumes the flag)."""
    if folder_paths is None:
        return
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI progress bar + node status text + websocket status event; silent outside ComfyUI.

    `listener`, when set (tests, scripts), sees every call inside and outside ComfyUI:
    `("progress", {"node", "value", "max"})` and `("status", {"node", "text", **data})`.
    """

    EVENT = "liveavatar.status"
    listener: Callable[[str, dict], None] | None = None

    def __init__(self, node_id: str | None):
        self.node_id = node_id
        self._bar = None
        self._total = None
        if folder_paths is not None:
            import comfy.utils

            self._utils = comfy.utils
        else:
            self._utils = None

    def update(self, done: int, total: int, preview=None) -> None:
        """Move the bar to `done` of `total`; `preview` is a PIL image shown on the node."""
        if Progress.listener is not None:  # read on the class: a plain function, not a method
            Progress.listener("progress", {"node": self.node_id, "value": done, "max": total})
        if self._utils is None:
            return
        if self._bar is None or self._total != total:
            self._bar, self._total = self._utils.ProgressBar(total), total
        self._bar.update_absolute(done, total, ("JPEG", preview, 512) if preview is not None else None)

    def status(self, text: str, data: dict) -> None:
        """Status line on the node and a `liveavatar.status` event for the web extension."""
        if Progress.listener is not None:
            Progress.listener("status", {"node": self.node_id, "text": text, **data})
        if folder_paths is None or self.node_id is None:
            return
        from server import PromptServer

        server = PromptServer.instance
        server.send_progress_text(text, self.node_id)
        server.send_sync(self.EVENT, {"node": self.node_id, **data}, server.client_id)


def video_output(path: Path):
    """A core VIDEO object for `path` where this ComfyUI has one, else the path as a string."""
    try:
        from comfy_api.latest import InputImpl
    except ImportError:
        return str(path)
    return InputImpl.VideoFromFile(str(path))


# --- devices ---------------------------------------------------------------------------------

# A fixed list, so a workflow saved on a 4-GPU machine still loads on a 1-GPU one; what is
# actually present is checked when the prompt is queued.
DEVICE_CHOICES = ("auto", "cpu", *(f"cuda:{i}" for i in range(8)))


def check_device(choice: str, input_name: str) -> None:
    """Refuse a device that is not in the list or not present on this machine."""
    import torch

    if choice not in DEVICE_CHOICES:
        raise InputError(input_name, f"'{choice}' is not a device choice.",
                         f"choose one of {', '.join(DEVICE_CHOICES)}.")
    if choice.startswith("cuda:"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(choice.split(":")[1]) >= count:
            raise InputError(input_name, f"{choice} was chosen but this machine has {count} CUDA GPU(s).",
                             "choose 'auto' or 'cpu'" + (f", or cuda:0..cuda:{count - 1}." if count else "."))


def torch_device(choice: str, input_name: str):
    """The torch device of a checked choice; 'auto' is ComfyUI's compute device (else cuda:0 or cpu)."""
    import torch

    check_device(choice, input_name)
    if choice != "auto":
        return torch.device(choice)
    if folder_paths is not None:
        import comfy.model_management

        return comfy.model_management.get_torch_device()
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def free_comfy_models() -> None:
    """Unload ComfyUI's own models from the GPU before ours are placed (it cannot evict ours)."""
    if folder_paths is None:
        return
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


def worker_log_dir() -> Path | None:
    """Where parallel workers write their logs: ComfyUI's temp folder (None: a new temp folder)."""
    if folder_paths is None:
        return None
    return Path(folder_paths.get_temp_directory()) / "liveavatar_workers"


def drop_cached_outputs() -> None:
    """Have ComfyUI forget every cached node output once the running prompt ends (as its "Free model
    and node cache" does), so a released model is loaded again by the next run."""
    if folder_paths is None:
        return
    from server import PromptServer

    PromptServer.instance.prompt_queue.set_flag("free_memory", True)
