"""Model configuration: one dataclass for the real 14B DiT and for any smaller checkpoint.

The values of a checkpoint come from its `config.json` (official folder) or from its tensor shapes
(single files); `DiTConfig.wan_s2v_14b()` holds the release defaults (spec/dit.md section 1).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import WeightsError

# The official class ignores these config.json keys and always uses its own defaults
# (spec/dit.md section 1; fixtures README section 2).
_IGNORED_JSON_KEYS = {"patch_size", "text_dim", "window_size", "qk_norm", "cross_attn_norm"}


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of the causal S2V DiT. Defaults are the Wan2.2-S2V-14B release values."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cond_dim: int = 16
    audio_dim: int = 1024
    num_audio_token: int = 4
    num_wav2vec_layers: int = 25
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    zip_frame_buckets: tuple[int, int, int] = (1, 2, 16)
    motion_frames: tuple[int, int] = (73, 19)
    num_frames_per_block: int = 3
    rope_theta: float = 10000.0
    ref_rope_index: int = 30
    adain_eps: float = 1e-5
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def wan_s2v_14b(cls) -> "DiTConfig":
        return cls()

    @classmethod
    def from_json(cls, path: str | Path) -> "DiTConfig":
        """Read an official `config.json`; keys the official class ignores are ignored here too.

        Raises `WeightsError` for a missing or unreadable file, invalid JSON, JSON that is not an
        object, a non-S2V model and any field of the wrong type or out of range.
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise WeightsError("ckpt_dir", f"{path} not found.",
                               "point to the Wan2.2-S2V-14B folder that holds config.json.") from None
        except OSError as exc:
            raise WeightsError("ckpt_dir", f"cannot read {path} ({exc.strerror or exc}).",
                               "make config.json a readable file (download it again).") from None
        except ValueError as exc:
            raise WeightsError("ckpt_dir", f"{path} is not valid JSON ({exc}).",
                               "download config.json again.") from None
        if not isinstance(raw, dict):
            raise WeightsError("ckpt_dir", f"{path} holds a JSON {type(raw).__name__}, not an object of settings.",
                               "download config.json again.")
        model_type = raw.get("model_type", "s2v")
        if model_type != "s2v":
            raise WeightsError("ckpt_dir", f"{path} describes a Wan '{model_type}' model, not Wan2.2-S2V.",
                               "use the Wan2.2-S2V-14B checkpoint folder.")
        known = {f.name: f for f in fields(cls) if f.name != "extra"}
        values = {}
        for key, value in raw.items():
            if key in _IGNORED_JSON_KEYS or key not in known:
                continue
            values[key] = _checked_value(path, key, value, known[key].type)
        extra = {k: v for k, v in raw.items() if k not in known}
        cfg = cls(**values, extra=extra)
        cfg._check_consistent(path)
        return cfg

    def _check_consistent(self, path: Path) -> None:
        problem = None
        if self.dim % self.num_heads:
            problem = f"dim {self.dim} is not divisible by num_heads {self.num_heads}"
        elif any(i >= self.num_layers for i in self.audio_inject_layers):
            problem = f"audio_inject_layers {list(self.audio_inject_layers)} name layers beyond num_layers " \
                      f"{self.num_layers}"
        if problem:
            raise WeightsError("ckpt_dir", f"{path}: {problem}.", "download config.json again.")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


def _checked_value(path: Path, key: str, value, annotation: str):
    """`value` of config field `key`, refused unless it has the field's type (lists become tuples)."""
    def refuse(expected: str):
        raise WeightsError("ckpt_dir", f"{path}: {key} is {json.dumps(value)}, {expected} is expected.",
                           "fix that entry or download config.json again.")

    if annotation.startswith("tuple"):
        length = None if "..." in annotation else annotation.count(",") + 1
        if not isinstance(value, list) or not all(_is_int(v) and v >= 0 for v in value) or (
                length is not None and len(value) != length):
            refuse(f"a list of {length or 'some'} non-negative integers")
        return tuple(value)
    if annotation == "int":
        if not _is_int(value) or value < 1:
            refuse("a positive integer")
        return value
    if annotation == "float":
        if not (_is_int(value) or isinstance(value, float)) or not value > 0:
            refuse("a positive number")
        return float(value)
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
