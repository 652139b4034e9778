"""Random weights: a tiny checkpoint written in the official layout, and models built in memory.

The demo and the end-to-end tests run every real loader on the tiny checkpoint: sharded DiT
safetensors with an index and `config.json`, the umT5 `.pth` with official Wan names and a tokenizer
folder, the wav2vec2 HF folder, `Wan2.1_VAE.pth` and a PEFT-named LoRA. Widths are tiny; the
architecture and the file formats are the real ones (the umT5 width stays 4096 because the DiT's
text projection is fixed).

The benchmarks build full-size models with random weights directly on the device instead
(`RandomWeights`, `random_dit`, `random_vae`): timing does not depend on the values, and a 14B
checkpoint need not be on the machine. The same seed gives the same weights in every process.
"""

from __future__ import annotations

import json
import string
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .config import DiTConfig
from .vae.config import VAEConfig
from .synthetic_inputs import make_face_image, make_speech_audio

TINY_DIT = DiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=4, audio_dim=32,
                     audio_inject_layers=(0, 2, 3))
DEMO_PROMPT = "A cheerful cartoon robot with round glasses talks to the camera in a bright studio."


@dataclass(frozen=True)
class RandomWeights:
    """Random weights in place of checkpoint files (`load_parallel`, the benchmarks): the DiT and
    VAE architectures and the seed; every process that builds them gets the same numbers."""

    dit: DiTConfig
    vae: VAEConfig = field(default_factory=VAEConfig)
    seed: int = 0

    def describe(self) -> str:
        return f"random weights (seed {self.seed}; DiT dim {self.dit.dim} x {self.dit.num_layers} layers)"


def random_init_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Fan-in scaled normal weights, unit norm gains: activations stay O(1) through 40 layers."""
    for name, p in module.named_parameters():
        if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight", "gamma")):
            p.data.fill_(1.0)
        elif p.dim() >= 2:
            p.data.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
        else:
            p.data.normal_(0.0, 0.02, generator=gen)


def random_dit(weights: RandomWeights, precision: str, attention: str, device: torch.device):
    """Step 0-1 of `loading` with random weights: `new_dit` on meta, then random weights made on
    `device` (standing for the checkpoint load); `prepare_dit` comes next, as for a file."""
    from .loading import new_dit

    device = torch.device(device)
    model = new_dit(weights.dit, precision, attention).to_empty(device=device)
    random_init_(model, torch.Generator(device=device).manual_seed(weights.seed))
    return model


def random_vae(weights: RandomWeights, device: torch.device, dtype: torch.dtype):
    """The Wan 2.1 VAE with random weights on `device` in `dtype` (not yet placed: `prepare_vae`)."""
    from .vae.model import WanVAE

    device = torch.device(device)
    with torch.device("meta"):
        vae = WanVAE(weights.vae)
    vae = vae.to(dtype).to_empty(device=device)
    random_init_(vae, torch.Generator(device=device).manual_seed(weights.seed + 1))
    return vae


@dataclass(frozen=True)
class TinyCheckpoint:
    """Paths of a written tiny checkpoint and its demo inputs."""

    ckpt_dir: Path
    lora: Path
    image: Path
    audio: Path
    prompt: str


def write_tiny_checkpoint(root: str | Path, seed: int = 0, audio_seconds: float = 3.0) -> TinyCheckpoint:
    """Write the tiny checkpoint and demo inputs under `root` (created if needed)."""
    root = Path(root)
    ckpt = root / "Wan2.2-S2V-14B"
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    shapes = _write_dit(ckpt)
    lora = root / "LiveAvatar" / "liveavatar.safetensors"
    _write_lora(lora, shapes, seed)
    vocab = _write_tokenizer(ckpt / "google" / "umt5-xxl")
    _write_t5(ckpt / "models_t5_umt5-xxl-enc-bf16.pth", vocab)
    _write_wav2vec2(ckpt / "wav2vec2-large-xlsr-53-english")
    _write_vae(ckpt / "Wan2.1_VAE.pth")
    inputs = root / "inputs"
    inputs.mkdir(exist_ok=True)
    image = inputs / "ref_image.png"
    make_face_image(160, 90, seed).save(image)
    audio = inputs / "audio.wav"
    write_wav(audio, make_speech_audio(audio_seconds, 16000, seed), 16000)
    return TinyCheckpoint(ckpt, lora, image, audio, DEMO_PROMPT)


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """Mono 16-bit PCM WAV with the standard library."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())


def _write_dit(ckpt: Path) -> dict[str, tuple]:
    from .model.dit import LiveAvatarDiT

    model = LiveAvatarDiT(TINY_DIT)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:]), start=1):
        name = f"diffusion_pytorch_model-{i:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(ckpt / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (ckpt / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config = {"_class_name": "WanModel_S2V", "model_type": "s2v", **{
        k: (list(v) if isinstance(v, tuple) else v) for k, v in TINY_DIT.to_dict().items()
        if k in ("dim", "ffn_dim", "num_heads", "num_layers", "freq_dim", "text_len", "in_dim", "out_dim",
                 "eps", "cond_dim", "audio_dim", "num_audio_token", "audio_inject_layers")}}
    (ckpt / "config.json").write_text(json.dumps(config, indent=1))
    return {k: tuple(v.shape) for k, v in state.items()}


def _write_lora(path: Path, shapes: dict[str, tuple], seed: int, rank: int = 4) -> None:
    from .weights.lora import lora_targets

    g = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for name in lora_targets(shapes):
        module = name[: -len(".weight")]
        out_f, in_f = shapes[name]
        tensors[f"{module}.lora_A.default.weight"] = (torch.randn(rank, in_f, generator=g) / in_f ** 0.5).bfloat16()
        tensors[f"{module}.lora_B.default.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).bfloat16()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_tokenizer(folder: Path) -> int:
    """A SentencePiece-style unigram tokenizer (tokenizer.json), like umT5's, over a toy vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    words = ("a the cheerful cartoon robot with round glasses talks to camera in bright studio soft warm "
             "light person speaks smiles and of is on at").split()
    pieces = ["▁" + w for w in words] + list(string.ascii_letters + string.digits + ".,!?'-") + ["▁"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -3.0 - 0.01 * i) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.Strip(left=False, right=True),
                                           normalizers.Replace(Regex(" {2,}"), "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0, "legacy": True}))
    return len(vocab)


def _write_t5(path: Path, vocab: int) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    from .weights.t5 import TIED_KEY, hf_to_official

    config = UMT5Config(vocab_size=vocab, d_model=4096, d_kv=8, num_heads=4, d_ff=32, num_layers=2,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True)
    model = UMT5EncoderModel(config)
    state = {hf_to_official(k): v.to(torch.bfloat16).contiguous()
             for k, v in model.state_dict().items() if k != TIED_KEY}
    torch.save(state, path)


def _write_wav2vec2(folder: Path) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    # 24 layers: the DiT mixes exactly 25 hidden states (spec/dit.md 3.5).
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=24, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(32,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True,
                            num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, vocab_size=32,
                            feat_proj_dropout=0.0, hidden_dropout=0.0, attention_dropout=0.0)
    model = Wav2Vec2ForCTC(config)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True, "sampling_rate": 16000}))


def _write_vae(path: Path) -> None:
    from .vae.model import WanVAE

    torch.save({k: v.contiguous() for k, v in WanVAE(VAEConfig(base_dim=8)).state_dict().items()}, path)
