"""The umT5 text encoder checkpoint: key maps between its file formats, detection and loading.

Canonical names are the ones transformers' `UMT5EncoderModel` expects, so a loaded state dict goes
into that model with a plain `load_state_dict` (the text encoder runs through transformers):

| format           | where it comes from                               | key map                          |
|------------------|---------------------------------------------------|----------------------------------|
| `official`       | `models_t5_umt5-xxl-enc-bf16.pth` (Wan names:     | `_GLOBAL_KEYS` + `_BLOCK_KEYS`   |
|                  | `token_embedding`, `blocks.i.attn.q`, ...)        |                                  |
| `hf`             | ComfyUI `umt5_xxl_fp16.safetensors` / bf16, HF    | identity after an optional       |
|                  | exports (`shared.weight`, `encoder.block.N...`)   | prefix; `encoder.` added if absent|
| `hf_fp8_scaled`  | ComfyUI `umt5_xxl_fp8_e4m3fn_scaled.safetensors`  | as `hf`; fp8 weights dequantised |
|                  |                                                   | lazily (`fp8_scaled.py`)         |

Nothing but the tensor shapes describes the architecture, so `UMT5Config` is built from them
(spec/pipeline.md 1.1). Files of other models are named in the error instead of failing later.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import WeightsError
from .fp8_scaled import ScaledFP8View, is_scaled_fp8
from .io import open_checkpoint, read_json_object
from .keys import key_mismatch
from .layout import TOKENIZER_DIR, TOKENIZER_FILE

if TYPE_CHECKING:
    from transformers import UMT5Config

INPUT_NAME = "t5_checkpoint"

# (official Wan name inside `blocks.{i}.`, HF name inside `encoder.block.{i}.`)
_BLOCK_KEYS = (
    ("norm1.weight", "layer.0.layer_norm.weight"),
    ("attn.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attn.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attn.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attn.o.weight", "layer.0.SelfAttention.o.weight"),
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm2.weight", "layer.1.layer_norm.weight"),
    # Wan computes fc1(x) * gelu(gate(x)), HF act(wi_0(x)) * wi_1(x): the gate is wi_0. The swapped
    # assignment misses golden/01_text `context` by ~4; this one matches it to 0.
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
)
_GLOBAL_KEYS = (
    ("token_embedding.weight", "shared.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
)
# UMT5EncoderModel's input embedding is tied to `shared.weight`, but both names are in its state dict.
TIED_KEY = "encoder.embed_tokens.weight"

_OFFICIAL_TO_HF_BLOCK = dict(_BLOCK_KEYS)
_HF_TO_OFFICIAL_BLOCK = {hf: off for off, hf in _BLOCK_KEYS}
_OFFICIAL_TO_HF_GLOBAL = dict(_GLOBAL_KEYS)
_HF_TO_OFFICIAL_GLOBAL = {hf: off for off, hf in _GLOBAL_KEYS}
_OFFICIAL_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK_RE = re.compile(r"encoder\.block\.(\d+)\.(.+)")

# The released umT5-XXL encoder, to call it by its name in descriptions.
_XXL = {"vocab": 256384, "d_model": 4096, "layers": 24, "heads": 64, "d_ff": 10240}
# Relative-position constants of umT5 that shapes cannot reveal (spec/pipeline.md 1.1).
MAX_DISTANCE = 128
LAYER_NORM_EPS = 1e-6
# ComfyUI's umT5 single files may carry their SentencePiece model as a uint8 tensor; not a weight.
SPIECE_KEY = "spiece_model"
_EXAMPLES = 3
TOKENIZER_FILES = "tokenizer.json, spiece.model, tokenizer_config.json, special_tokens_map.json"


def official_to_hf(name: str) -> str:
    """Map one official Wan umT5 key to its `UMT5EncoderModel` name (KeyError if unknown)."""
    m = _OFFICIAL_BLOCK_RE.fullmatch(name)
    if m:
        return f"encoder.block.{m.group(1)}.{_OFFICIAL_TO_HF_BLOCK[m.group(2)]}"
    return _OFFICIAL_TO_HF_GLOBAL[name]


def hf_to_official(name: str) -> str:
    """Map one `UMT5EncoderModel` key back to the official Wan name (KeyError if unknown)."""
    if name == TIED_KEY:
        name = "shared.weight"
    m = _HF_BLOCK_RE.fullmatch(name)
    if m:
        return f"blocks.{m.group(1)}.{_HF_TO_OFFICIAL_BLOCK[m.group(2)]}"
    return _HF_TO_OFFICIAL_GLOBAL[name]


def expected_t5_shapes(config: UMT5Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the official umT5 encoder file with its shape (spec/pipeline.md 1.1)."""
    d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
    per_block = {
        "norm1.weight": (d,),
        "attn.q.weight": (inner, d),
        "attn.k.weight": (inner, d),
        "attn.v.weight": (inner, d),
        "attn.o.weight": (d, inner),
        "pos_embedding.embedding.weight": (config.relative_attention_num_buckets, config.num_heads),
        "norm2.weight": (d,),
        "ffn.gate.0.weight": (ff, d),
        "ffn.fc1.weight": (ff, d),
        "ffn.fc2.weight": (d, ff),
    }
    shapes = {"token_embedding.weight": (config.vocab_size, d)}
    for i in range(config.num_layers):
        shapes.update({f"blocks.{i}.{k}": s for k, s in per_block.items()})
    shapes["norm.weight"] = (d,)
    return shapes


def _umt5_config(**fields) -> UMT5Config:
    from transformers import UMT5Config

    # Eager attention reproduces the official numerics: bf16 scores plus bias, softmax computed in
    # fp32 and rounded back, no 1/sqrt(d) scaling (UMT5Attention sets scaling 1).
    return UMT5Config(
        **fields,
        relative_attention_max_distance=MAX_DISTANCE,
        layer_norm_epsilon=LAYER_NORM_EPS,
        feed_forward_proj="gated-gelu",  # transformers maps this to the tanh GELU ("gelu_new")
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        attn_implementation="eager",
    )


class T5StateDict(Mapping):
    """Lazy `UMT5EncoderModel`-named view of a umT5 file; tensors are read (and cast) on access.

    `TIED_KEY` is served from the embedding table, so the view loads strictly into the model.
    """

    def __init__(self, source: Mapping, names: dict[str, str], dtype: torch.dtype | None):
        self._src = source
        self._names = names  # canonical -> file key
        self.dtype = dtype

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self._src[self._names[key]]
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def file_key(self, key: str) -> str:
        """The name `key` has in the file."""
        return self._names[key]


def load_t5_weights(path: str | Path, dtype: torch.dtype | None = None,
                    input_name: str = INPUT_NAME) -> tuple[T5StateDict, UMT5Config, str]:
    """Open a umT5 encoder file of any supported format.

    Returns `(state_dict, UMT5Config, description)`: the lazy state dict in `UMT5EncoderModel`
    names (cast to `dtype` on access when given; scaled fp8 is dequantised to `dtype` or bf16),
    the config built from tensor shapes, and a one-line description for logs. Only headers are
    read here; raises `WeightsError` for missing, corrupt, incomplete or foreign files.
    """
    lazy = open_checkpoint(path, input_name)
    file_dtype = lazy.dtype_summary()
    keys = list(lazy)
    fmt_label = "official Wan layout"
    source: Mapping = lazy
    if is_scaled_fp8(keys):
        source = ScaledFP8View(lazy, dtype or torch.bfloat16)
        keys = list(source)
        fmt_label = "ComfyUI scaled fp8"
    shapes = {k: tuple(lazy.shape(k)) for k in keys}

    names = _official_names(shapes)
    if names is None:
        names = _hf_names(shapes)
        if fmt_label == "official Wan layout":
            fmt_label = "HF/ComfyUI layout"
    if names is None:
        raise WeightsError(input_name, f"{lazy.source} is not a umT5 text encoder: it looks like "
                           f"{_foreign_model(shapes)}.",
                           "pick models_t5_umt5-xxl-enc-bf16.pth from the Wan2.2-S2V-14B folder or a "
                           "ComfyUI umt5_xxl_*.safetensors file.")
    config = _check_and_build_config(names, shapes, lazy.source, input_name)
    names[TIED_KEY] = names["shared.weight"]
    n_tensors = len(names) - 1
    size = ("umT5-XXL encoder" if _is_xxl(config) else
            f"umT5 encoder ({config.num_layers} layers, d_model {config.d_model}, {config.num_heads} heads, "
            f"vocab {config.vocab_size})")
    dtype_label = f"{file_dtype} scaled" if fmt_label == "ComfyUI scaled fp8" else file_dtype
    description = f"{size}, {dtype_label}, {n_tensors} tensors ({fmt_label})"
    return T5StateDict(source, names, dtype), config, description


def _official_names(shapes: Mapping[str, tuple]) -> dict[str, str] | None:
    """Canonical -> file key for the official Wan layout (any prefix), or None if it is not one."""
    anchor = next((k for k in shapes if k.endswith("blocks.0.attn.q.weight")), None)
    if anchor is None:
        return None
    prefix = anchor[: -len("blocks.0.attn.q.weight")]
    if prefix + "token_embedding.weight" not in shapes:
        return None
    names = {}
    for key in shapes:
        if not key.startswith(prefix):
            continue
        local = key[len(prefix):]
        try:
            names[official_to_hf(local)] = key
        except KeyError:
            names["?" + local] = key  # reported as unexpected by the key-set check
    return names


def _hf_names(shapes: Mapping[str, tuple]) -> dict[str, str] | None:
    """Canonical -> file key for HF T5 names, with an optional prefix and optional `encoder.`."""
    tail = "block.0.layer.0.SelfAttention.q.weight"
    # A full umT5 file has the same block names under `decoder.`; the encoder's decide the prefix.
    anchor = next((k for k in shapes if k.endswith(tail) and not k.endswith("decoder." + tail)), None)
    if anchor is None:
        return None
    stem = anchor[: -len(tail)]
    has_encoder = stem.endswith("encoder.")
    prefix = stem[: -len("encoder.")] if has_encoder else stem
    names = {}
    for key in shapes:
        if not key.startswith(prefix):
            continue
        local = key[len(prefix):]
        if local.startswith(("decoder.", "lm_head.")) or local.endswith(SPIECE_KEY):
            continue  # the decoder of a full umT5 file, ComfyUI's embedded tokenizer: not weights we need
        if not has_encoder and local != "shared.weight":
            local = "encoder." + local
        names[local if _is_canonical(local) else "?" + local] = key
    if "shared.weight" not in names and TIED_KEY in names:
        names["shared.weight"] = names[TIED_KEY]
    names.pop(TIED_KEY, None)
    return names


def _is_canonical(name: str) -> bool:
    if name in (TIED_KEY, "shared.weight", "encoder.final_layer_norm.weight"):
        return True
    m = _HF_BLOCK_RE.fullmatch(name)
    return bool(m) and m.group(2) in _HF_TO_OFFICIAL_BLOCK


def _check_and_build_config(names: dict[str, str], shapes: Mapping[str, tuple], source: Path,
                            input_name: str) -> UMT5Config:
    """Recognise T5 relatives, read the architecture from shapes and check every tensor against it."""
    def shape(canonical: str) -> tuple[int, ...] | None:
        return tuple(shapes[names[canonical]]) if canonical in names else None

    rel = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
    layers = 1 + max((int(m.group(1)) for k in names if (m := _HF_BLOCK_RE.fullmatch(k))), default=-1)
    has_gated = any(k.endswith("DenseReluDense.wi_0.weight") for k in names)
    if any(k.endswith("DenseReluDense.wi.weight") for k in names) and not has_gated:
        raise WeightsError(input_name, f"{source} is an original T5 encoder (non-gated feed-forward), "
                           "not umT5.", "use the umT5-XXL encoder (models_t5_umt5-xxl-enc-bf16.pth or "
                           "umt5_xxl_*.safetensors).")
    shared_table = "?pos_embedding.embedding.weight" in names
    if shared_table or (layers > 1 and shape(rel.format(0)) is not None and shape(rel.format(1)) is None):
        raise WeightsError(input_name, f"{source} is a T5 v1.1 encoder (e.g. the t5xxl used by Flux/SD3): all "
                           "its blocks share one relative-position table, umT5 has one per block.",
                           "use the umT5-XXL encoder (models_t5_umt5-xxl-enc-bf16.pth or "
                           "umt5_xxl_*.safetensors).")
    emb, q, table, wi = (shape("shared.weight"), shape("encoder.block.0.layer.0.SelfAttention.q.weight"),
                         shape(rel.format(0)), shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight"))
    if emb is None or q is None or table is None or wi is None or len(table) != 2 or table[1] == 0 \
            or q[0] % table[1]:
        raise WeightsError(input_name, f"{source} lacks the tensors that define a umT5 encoder (token "
                           "embedding, block-0 attention, relative-position table, gated FFN).",
                           "the file is incomplete or of another model; download the umT5 encoder again.")
    config = _umt5_config(vocab_size=emb[0], d_model=emb[1], num_heads=table[1], d_kv=q[0] // table[1],
                          d_ff=wi[0], num_layers=layers, relative_attention_num_buckets=table[0])
    expected = {official_to_hf(k): s for k, s in expected_t5_shapes(config).items()}
    found = {k: shapes[file_key] for k, file_key in names.items()}
    # Missing tensors have no file key: they are named as the official file spells them.
    problems = key_mismatch(expected, found, display=lambda k: names[k] if k in names else hf_to_official(k))
    if problems:
        raise WeightsError(input_name, f"{source} does not match the umT5 encoder layout read from its own "
                           f"shapes ({layers} layers): {'; '.join(problems)}.",
                           "the file is incomplete or modified; download the umT5 encoder again.")
    return config


def _is_xxl(config: UMT5Config) -> bool:
    return (config.vocab_size, config.d_model, config.num_layers, config.num_heads, config.d_ff) == (
        _XXL["vocab"], _XXL["d_model"], _XXL["layers"], _XXL["heads"], _XXL["d_ff"])


def _foreign_model(shapes: Mapping[str, tuple]) -> str:
    """Name the model a non-umT5 file most likely holds, from its key names."""
    keys = list(shapes)

    def has(*fragments: str) -> bool:
        return any(any(f in k for f in fragments) for k in keys)

    if has("lora_A", "lora_B", "lora_down", "lora_up"):
        return "a LoRA"
    if has("decoder.upsamples.", "encoder.downsamples.") or {"conv1.weight", "conv2.weight"} <= set(keys):
        return "a Wan VAE"
    if has("self_attn.q.weight", "patch_embedding.weight", "diffusion_model."):
        return "a Wan diffusion model (DiT)"
    if has("wav2vec2.", "feature_extractor.conv_layers"):
        return "a wav2vec2 audio encoder"
    if has("text_model.encoder.layers", "visual.transformer", "vision_model."):
        return "a CLIP model"
    return f"an unrecognised model (first keys: {', '.join(keys[:_EXAMPLES]) or 'none'})"


def tokenizer_folder(weights_path: str | Path | None, tokenizer_path: str | Path | None = None,
                     input_name: str = "tokenizer_path") -> Path:
    """The umT5 tokenizer folder: `tokenizer_path` (a folder or a file in it), else google/umt5-xxl
    beside `weights_path`, as the official folder has it. Raises `WeightsError` unless it holds
    tokenizer.json.
    """
    if tokenizer_path is not None:
        folder = Path(tokenizer_path)
        if not folder.exists():
            raise WeightsError(input_name, f"{folder} does not exist.",
                               f"point it at the google/umt5-xxl folder ({TOKENIZER_FILES}).")
        folder = folder.parent if folder.is_file() else folder
    else:
        folder = Path(weights_path).parent / TOKENIZER_DIR
        if not folder.is_dir():
            # ComfyUI's umT5 files may embed a SentencePiece model, but its ids can differ from the
            # official tokenizer.json (the dummy-prefix setting), so it is not used as a stand-in.
            raise WeightsError(input_name, f"no umT5 tokenizer found for {weights_path}: {folder} does not "
                               "exist.", f"put the google/umt5-xxl tokenizer files ({TOKENIZER_FILES}, from the "
                               f"Wan2.2-S2V-14B download) in {folder}, or pass tokenizer_path.")
    if not (folder / TOKENIZER_FILE).is_file():
        raise WeightsError(input_name, f"{folder} holds no umT5 tokenizer ({TOKENIZER_FILE} is missing).",
                           f"copy the google/umt5-xxl tokenizer files ({TOKENIZER_FILES}) into it.")
    return folder


def describe_tokenizer(folder: str | Path, input_name: str = "tokenizer_path") -> str:
    """One line for a umT5 tokenizer folder, e.g. "umT5 tokenizer (Unigram, 256300 tokens)"."""
    folder = tokenizer_folder(None, folder, input_name)
    model = read_json_object(folder / TOKENIZER_FILE, input_name).get("model")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), (list, dict)):
        raise WeightsError(input_name, f"{folder / TOKENIZER_FILE} holds no tokenizer model with a vocabulary.",
                           f"restore the tokenizer files ({TOKENIZER_FILES}).")
    return f"umT5 tokenizer ({model.get('type', 'unknown type')}, {len(model['vocab'])} tokens)"
