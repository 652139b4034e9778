"""The Live Avatar LoRA: parsing every PEFT spelling, strict validation, and the fp32 merge.

The official loader wraps the DiT with PEFT and loads the file with `strict=False`, so a key in an
unexpected spelling is silently dropped and the merge becomes a no-op (spec/dit.md section 4).
Here every spelling maps onto `<module>.weight` of the canonical DiT names, and anything that does
not land on a model weight with the right shape is refused with examples.

Accepted key spellings (all combinations):
  prefix        none | `base_model.model.` | `diffusion_model.` | `model.diffusion_model.`
  factor        `lora_A` / `lora_B` (PEFT) | `lora_down` / `lora_up` (kohya-style)
  adapter       `<factor>.weight` | `<factor>.<adapter>.weight` (PEFT's `.default.`)
Per-module `alpha` tensors are ignored: the scale always comes from the configuration (alpha/rank,
64/128 = 0.5 for the release).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WeightsError
from .dit import detect_dit
from .io import open_checkpoint
from .keys import examples

INPUT_NAME = "lora"
DEFAULT_SCALE = 0.5

# PEFT suffix targets of the release (liveavatar/configs/s2v_causal_sft.yaml).
TARGET_MODULES = ("q", "k", "v", "o", "ffn.0", "ffn.2")

_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.")
_FACTOR_RE = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?"
                        r"\.weight$")
_ALPHA_RE = re.compile(r"^.+\.alpha$")
_DOWN = {"lora_A": "A", "lora_down": "A", "lora_B": "B", "lora_up": "B"}
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


@dataclass(frozen=True)
class LoraKeyPlan:
    """How a LoRA file's keys map onto model weights: `pairs[weight] = (A file key, B file key)`."""

    pairs: dict[str, tuple[str, str]]
    ignored_alpha: int


def parse_lora_keys(keys, input_name: str = INPUT_NAME) -> LoraKeyPlan:
    """Pair up A/B factors of any accepted spelling; refuse unpaired factors and non-LoRA tensors."""
    factors: dict[str, dict[str, str]] = {}
    adapters: set[str] = set()
    foreign, alphas = [], 0
    for key in keys:
        canon = _strip_prefixes(key)
        match = _FACTOR_RE.match(canon)
        if match is None:
            if _ALPHA_RE.match(canon):
                alphas += 1
            else:
                foreign.append(key)
            continue
        adapters.add(match["adapter"] or "")
        slot = factors.setdefault(match["module"] + ".weight", {})
        side = _DOWN[match["factor"]]
        if side in slot:
            raise WeightsError(input_name, f"the file holds two '{side}' factors for {match['module']} "
                               f"('{slot[side]}' and '{key}').", "use a file with a single adapter.")
        slot[side] = key
    if foreign:
        raise WeightsError(input_name, f"{len(foreign)} tensors are not LoRA factors (full weights are never "
                           f"merged from a LoRA file): {examples(foreign)}.",
                           "use the LiveAvatar LoRA file (liveavatar.safetensors), which holds only lora_A/lora_B.")
    if len(adapters) > 1:
        names = ", ".join(sorted(a or "<none>" for a in adapters))
        raise WeightsError(input_name, f"the file mixes several adapters ({names}).", "export a single adapter.")
    unpaired = [f"{w[:-len('.weight')]} (only {next(iter(s))})" for w, s in factors.items() if len(s) != 2]
    if unpaired:
        raise WeightsError(input_name, f"{len(unpaired)} LoRA factors have no partner: {examples(unpaired)}.",
                           "the file is incomplete; download it again.")
    if not factors:
        raise WeightsError(input_name, "the file contains no LoRA A/B pairs.",
                           "select the LiveAvatar LoRA (liveavatar.safetensors).")
    return LoraKeyPlan({w: (s["A"], s["B"]) for w, s in factors.items()}, alphas)


def lora_targets(model_shapes: Mapping[str, tuple]) -> list[str]:
    """Model weights PEFT's suffix matching of TARGET_MODULES selects (448 for the 14B DiT)."""
    out = []
    for name, shape in model_shapes.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        if any(module == t or module.endswith("." + t) for t in TARGET_MODULES):
            out.append(name)
    return out


def check_lora_shapes(plan: LoraKeyPlan, lora_shapes: Mapping[str, tuple], model_shapes: Mapping[str, tuple],
                      require_all_targets: bool = True, input_name: str = INPUT_NAME) -> int:
    """Validate every pair against the model's weights; returns the common rank.

    Refuses pairs that match no weight, factors whose shapes do not fit the weight, mixed ranks,
    and (with `require_all_targets`) a file that leaves some target layers without a pair.
    """
    unmatched = [w for w in plan.pairs if w not in model_shapes]
    if unmatched:
        raise WeightsError(input_name, f"{len(unmatched)} of {len(plan.pairs)} LoRA pairs match no weight of the "
                           f"model: {examples(unmatched)}.",
                           "use the LoRA made for Wan2.2-S2V-14B (LiveAvatar liveavatar.safetensors).")
    wrong, ranks = [], set()
    for weight, (a_key, b_key) in plan.pairs.items():
        a, b, w = tuple(lora_shapes[a_key]), tuple(lora_shapes[b_key]), tuple(model_shapes[weight])
        ok = len(a) == 2 and len(b) == 2 and len(w) == 2 and a[0] == b[1] and a[1] == w[1] and b[0] == w[0]
        if not ok:
            wrong.append(f"{weight} {w} with A {a}, B {b}")
        else:
            ranks.add(a[0])
    if wrong:
        raise WeightsError(input_name, f"{len(wrong)} LoRA pairs do not fit their weight (A must be [rank, in], "
                           f"B [out, rank]): {examples(wrong)}.",
                           "use the LoRA made for this model size (the 14B LoRA does not fit other sizes).")
    if len(ranks) > 1:
        raise WeightsError(input_name, f"the LoRA mixes ranks {sorted(ranks)}; one alpha/rank scale cannot apply "
                           "to all of them.", "use the LiveAvatar LoRA file.")
    if require_all_targets:
        missing = [t for t in lora_targets(model_shapes) if t not in plan.pairs]
        if missing:
            total = len(plan.pairs) + len(missing)
            raise WeightsError(input_name, f"the LoRA covers {len(plan.pairs)} of the {total} layers it must adapt; "
                               f"missing: {examples(missing)}.",
                               "the file is incomplete or made for another model; download liveavatar.safetensors "
                               "again.")
    return ranks.pop()


@dataclass(frozen=True)
class LoraWeights:
    """LoRA factors keyed by the canonical model weight they modify: `pairs[w] = (A [r, in], B [out, r])`."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    description: str
    path: Path


def load_lora(path: str | Path, model_shapes: Mapping[str, tuple], require_all_targets: bool = True,
              input_name: str = INPUT_NAME) -> LoraWeights:
    """Read and validate a LoRA file against `model_shapes` (canonical DiT names -> shapes)."""
    path = Path(path)
    lazy = open_checkpoint(path, input_name)
    keys = [_strip_prefixes(k) for k in lazy]
    if not any(_FACTOR_RE.match(k) or _ALPHA_RE.match(k) for k in keys):
        raise WeightsError(input_name, f"{path.name} is {detect_dit(lazy).description}, not a LoRA file.",
                           "select the LiveAvatar LoRA (liveavatar.safetensors).")
    plan = parse_lora_keys(list(lazy), input_name)
    rank = check_lora_shapes(plan, lazy.shapes(), model_shapes, require_all_targets, input_name)
    pairs = {w: (lazy[a], lazy[b]) for w, (a, b) in plan.pairs.items()}
    alpha_note = f", {plan.ignored_alpha} alpha tensors ignored" if plan.ignored_alpha else ""
    description = (f"LoRA rank {rank}, {len(pairs)} pairs matching {len(pairs)} model weights, "
                   f"{lazy.dtype_summary()}{alpha_note}")
    return LoraWeights(pairs, rank, description, path)


@contextmanager
def _ieee_fp32_matmul():
    """The reference merge is plain fp32 (no TF32), whatever the host application configured."""
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 spells the switch fp32_precision; older releases (still common in ComfyUI
    # installs) only have allow_tf32.
    attr, strict = ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)
    previous = getattr(matmul, attr)
    setattr(matmul, attr, strict)
    try:
        yield
    finally:
        setattr(matmul, attr, previous)


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                  weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`dtype(fp32(W) + scale * (fp32(B) @ fp32(A)))`, rounded once (spec/dit.md section 4).

    fp8 weights are dequantised with `weight_scale` first and come back as bf16.
    """
    w = weight.to(torch.float32)
    out_dtype = weight.dtype
    if weight.dtype in _FP8:
        if weight_scale is not None:
            w = w * weight_scale.to(device=w.device, dtype=torch.float32)
        out_dtype = torch.bfloat16
    delta = b.to(device=w.device, dtype=torch.float32) @ a.to(device=w.device, dtype=torch.float32)
    return (w + delta * scale).to(out_dtype)


def merge_lora(target: torch.nn.Module | MutableMapping, lora: LoraWeights, scale: float = DEFAULT_SCALE) -> int:
    """Merge `lora` into a module's parameters or a mutable state dict, one tensor at a time.

    Returns the number of merged pairs. In a state dict, an fp8 weight with a `.scale_weight`
    beside it (ComfyUI scaled_fp8) is replaced by its merged bf16 value and its scales are dropped.
    """
    if isinstance(target, torch.nn.Module):
        params = dict(target.named_parameters())
        _require_names(lora, params)
        with torch.no_grad(), _ieee_fp32_matmul():
            for name, (a, b) in lora.pairs.items():
                param = params[name]
                param.copy_(merged_weight(param, a, b, scale))
        return len(lora.pairs)
    if not isinstance(target, MutableMapping):
        raise TypeError(f"merge_lora needs an nn.Module or a mutable state dict, got {type(target).__name__}")
    _require_names(lora, target)
    with torch.no_grad(), _ieee_fp32_matmul():
        for name, (a, b) in lora.pairs.items():
            module = name[: -len(".weight")]
            weight_scale = target.get(module + ".scale_weight")
            weight = target[name]
            target[name] = merged_weight(weight, a, b, scale, weight_scale)
            if weight.dtype in _FP8:
                for suffix in (".scale_weight", ".scale_input"):
                    target.pop(module + suffix, None)
    return len(lora.pairs)


def _require_names(lora: LoraWeights, names) -> None:
    absent = [w for w in lora.pairs if w not in names]
    if absent:
        raise WeightsError(INPUT_NAME, f"{len(absent)} LoRA pairs target weights this model does not have: "
                           f"{examples(absent)}.", "load the LoRA against the same checkpoint it is merged into.")
