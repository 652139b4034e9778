"""umT5 weight formats: key maps, ComfyUI single files (fp16, bf16, scaled fp8), refusals."""

import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from liveavatar_core.encoders.text import TextEncoder
from liveavatar_core.errors import InputError, WeightsError
from liveavatar_core.weights.fp8_scaled import quantize_scaled_fp8
from liveavatar_core.weights.layout import T5_FILE
from liveavatar_core.weights.t5 import (TIED_KEY, expected_t5_shapes, hf_to_official, load_t5_weights,
                                        official_to_hf)

ATOL = 1e-4  # fixtures README section 7
LINEAR_SUFFIXES = ("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight", "wi_1.weight", "wo.weight")


@pytest.fixture(scope="module")
def official(ckpt_dir):
    return load_t5_weights(ckpt_dir / T5_FILE)


@pytest.fixture(scope="module")
def hf_tensors(official):
    """The fixture weights under their HF names, as a ComfyUI export would hold them."""
    state_dict, _, _ = official
    return {k: state_dict[k].contiguous() for k in state_dict if k != TIED_KEY}


@pytest.fixture(scope="module")
def golden(fixtures):
    return load_file(fixtures / "golden" / "01_text.safetensors")


@pytest.fixture(scope="module")
def prompt(manifest):
    return manifest["inputs"]["prompt"]


@pytest.fixture(scope="module")
def tokenizer_dir(ckpt_dir):
    return ckpt_dir / "google" / "umt5-xxl"


def _encode_file(path, tokenizer_dir, golden, prompt):
    encoder = TextEncoder.from_pretrained(path, tokenizer_path=tokenizer_dir, dtype=torch.float32,
                                          text_len=golden["input_ids"].shape[1])
    return encoder, encoder.encode(prompt)


def test_official_keys_round_trip_and_fill_the_model(ckpt_dir, official):
    from transformers import UMT5EncoderModel

    file_keys = torch.load(ckpt_dir / T5_FILE, map_location="cpu", weights_only=True, mmap=True).keys()
    assert all(hf_to_official(official_to_hf(k)) == k for k in file_keys)
    _, config, _ = official
    with torch.device("meta"):
        model_keys = set(UMT5EncoderModel(config).state_dict())
    assert {official_to_hf(k) for k in file_keys} | {TIED_KEY} == model_keys
    assert all(official_to_hf(hf_to_official(k)) == k for k in model_keys - {TIED_KEY})
    assert hf_to_official(TIED_KEY) == "token_embedding.weight"


def test_spec_table_of_umt5_xxl():
    # spec/pipeline.md 1.1: the released encoder file.
    xxl = SimpleNamespace(vocab_size=256384, d_model=4096, num_heads=64, d_kv=64, d_ff=10240, num_layers=24,
                          relative_attention_num_buckets=32)
    shapes = expected_t5_shapes(xxl)
    assert len(shapes) == 242
    assert shapes["token_embedding.weight"] == (256384, 4096)
    assert shapes["blocks.23.ffn.gate.0.weight"] == (10240, 4096)
    assert shapes["blocks.23.ffn.fc2.weight"] == (4096, 10240)
    assert shapes["blocks.0.pos_embedding.embedding.weight"] == (32, 64)
    assert sum(math.prod(s) for s in shapes.values()) / 1e9 == pytest.approx(5.68, abs=0.01)


def test_config_and_description_from_shapes(official, manifest):
    _, config, description = official
    tiny = manifest["tiny_config"]["t5"]
    assert (config.vocab_size, config.d_model, config.num_heads, config.num_layers) == (
        tiny["vocab_size"], tiny["dim"], tiny["num_heads"], tiny["encoder_layers"])
    assert (config.num_heads * config.d_kv, config.d_ff) == (tiny["dim_attn"], tiny["dim_ffn"])
    assert config.relative_attention_num_buckets == tiny["num_buckets"]
    assert config.dense_act_fn == "gelu_new" and config.is_gated_act
    assert config.relative_attention_max_distance == 128 and config.layer_norm_epsilon == 1e-6
    assert f"bf16, {2 + 10 * tiny['encoder_layers']} tensors (official Wan layout)" in description


@pytest.mark.parametrize("dtype,prefix,with_encoder,extra", [
    (torch.float16, "", True, None),
    (torch.bfloat16, "", True, "tied+spiece"),
    (torch.bfloat16, "", True, "decoder"),
    (torch.bfloat16, "text_encoders.umt5xxl.transformer.", True, None),
    (torch.bfloat16, "", False, None),
], ids=["fp16", "bf16+tied+spiece", "bf16+decoder", "bf16-prefixed", "bf16-no-encoder-prefix"])
def test_comfyui_single_file_loads_and_encodes(tmp_path, hf_tensors, tokenizer_dir, golden, prompt, dtype,
                                               prefix, with_encoder, extra):
    tensors = {}
    for key, tensor in hf_tensors.items():
        name = key if with_encoder else key.removeprefix("encoder.")
        tensors[prefix + name] = tensor.to(dtype)
    if extra == "tied+spiece":
        # HF exports repeat the tied embedding; ComfyUI files may embed their SentencePiece model.
        tensors[TIED_KEY] = hf_tensors["shared.weight"].to(dtype).clone()
        tensors["spiece_model"] = torch.frombuffer(bytearray((tokenizer_dir / "spiece.model").read_bytes()),
                                                   dtype=torch.uint8)
    if extra == "decoder":
        # A full encoder-decoder umT5 export: the decoder and LM head are skipped.
        tensors.update({"decoder." + k.removeprefix("encoder."): v.to(dtype).clone()
                        for k, v in hf_tensors.items() if k.startswith("encoder.block.0.")})
        tensors["lm_head.weight"] = hf_tensors["shared.weight"].to(dtype).clone()
    path = tmp_path / "umt5_xxl.safetensors"
    save_file(tensors, path)
    encoder, context = _encode_file(path, tokenizer_dir, golden, prompt)
    assert "HF/ComfyUI layout" in encoder.description
    assert {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype] in encoder.description
    torch.testing.assert_close(context, golden["context"], atol=ATOL, rtol=0)


def test_scaled_fp8_file_loads_and_encodes(tmp_path, hf_tensors, tokenizer_dir, golden, prompt):
    linear = [k for k in hf_tensors if k.endswith(LINEAR_SUFFIXES)]
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    quantized = quantize_scaled_fp8(hf_tensors, linear)
    save_file(quantized, path)
    encoder, context = _encode_file(path, tokenizer_dir, golden, prompt)
    assert "fp8_e4m3fn scaled" in encoder.description
    # Tolerance: e4m3 keeps 3 mantissa bits, so each weight carries a relative rounding error (its
    # RMS, eps_w, is measured here). Every one of the 7 quantised matmuls per layer adds output noise of
    # about eps_w; independent noise adds in quadrature over the layers. Allow twice that estimate.
    deq = {k: quantized[k].float() * quantized[k.removesuffix(".weight") + ".scale_weight"] for k in linear}
    eps_w = max(float((deq[k] - hf_tensors[k].float()).norm() / hf_tensors[k].float().norm()) for k in linear)
    bound = 2 * eps_w * math.sqrt(len(linear))
    expected = golden["context"]
    rel = float((context - expected).norm() / expected.norm())
    assert 0 < rel < bound, (rel, bound)
    assert torch.nn.functional.cosine_similarity(context, expected, dim=-1).min() > 1 - bound


@pytest.mark.parametrize("relative,name", [
    ("Wan2.2-S2V-14B/Wan2.1_VAE.pth", "Wan VAE"),
    ("Wan2.2-S2V-14B/diffusion_pytorch_model.safetensors.index.json", "Wan diffusion model"),
    ("Wan2.2-S2V-14B/wav2vec2-large-xlsr-53-english/model.safetensors", "wav2vec2"),
    ("LiveAvatar/liveavatar.safetensors", "LoRA"),
])
def test_other_models_are_named(fixtures, relative, name):
    with pytest.raises(WeightsError, match=f"not a umT5 text encoder: it looks like an? {name}") as err:
        load_t5_weights(fixtures / "ckpt" / relative)
    assert err.value.input_name == "t5_checkpoint"


def test_t5_v1_1_is_named(tmp_path, hf_tensors):
    # T5 v1.1 (the Flux/SD3 t5xxl) keeps a relative-position table in block 0 only.
    tensors = {k: v for k, v in hf_tensors.items()
               if not (k.endswith("relative_attention_bias.weight") and not k.startswith("encoder.block.0."))}
    path = tmp_path / "t5xxl_fp16.safetensors"
    save_file(tensors, path)
    with pytest.raises(WeightsError, match="T5 v1.1"):
        load_t5_weights(path)


def test_incomplete_and_reshaped_files_are_refused(tmp_path, hf_tensors, official):
    _, config, _ = official
    last = f"encoder.block.{config.num_layers - 1}.layer.1.DenseReluDense.wi_1.weight"
    missing = {k: v for k, v in hf_tensors.items() if k != last}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match=rf"1 of \d+ expected tensors missing \(e.g. blocks.{config.num_layers - 1}.ffn.fc1"):
        load_t5_weights(tmp_path / "missing.safetensors")
    reshaped = dict(hf_tensors)
    reshaped[last] = hf_tensors[last][:-1].contiguous()
    save_file(reshaped, tmp_path / "reshaped.safetensors")
    with pytest.raises(WeightsError, match="1 tensors with the wrong shape"):
        load_t5_weights(tmp_path / "reshaped.safetensors")


def test_missing_and_truncated_files(tmp_path, ckpt_dir, hf_tensors):
    with pytest.raises(WeightsError, match="t5_checkpoint: file not found"):
        load_t5_weights(tmp_path / T5_FILE)
    data = (ckpt_dir / T5_FILE).read_bytes()
    (tmp_path / T5_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="t5_checkpoint"):
        TextEncoder.from_pretrained(tmp_path / T5_FILE)
    save_file(hf_tensors, tmp_path / "umt5.safetensors")
    data = (tmp_path / "umt5.safetensors").read_bytes()
    (tmp_path / "umt5.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match="truncated"):
        load_t5_weights(tmp_path / "umt5.safetensors")


def test_missing_tokenizer_folder_says_where_to_put_it(tmp_path, hf_tensors, tokenizer_dir):
    save_file(hf_tensors, tmp_path / "umt5_xxl_fp16.safetensors")
    with pytest.raises(WeightsError) as err:
        TextEncoder.from_pretrained(tmp_path / "umt5_xxl_fp16.safetensors")
    assert err.value.input_name == "tokenizer_path"
    assert str(tmp_path / "google" / "umt5-xxl") in err.value.fix and "tokenizer.json" in err.value.fix
    with pytest.raises(WeightsError, match="does not exist"):
        TextEncoder.from_pretrained(tmp_path / "umt5_xxl_fp16.safetensors", tokenizer_path=tmp_path / "nope")
    # The same file works once the folder is where the message says.
    shutil.copytree(tokenizer_dir, tmp_path / "google" / "umt5-xxl")
    assert TextEncoder.from_pretrained(tmp_path / "umt5_xxl_fp16.safetensors").encode("").shape[0] == 1


def test_unsupported_dtype_and_device_are_refused(ckpt_dir):
    with pytest.raises(InputError) as err:
        TextEncoder.from_pretrained(ckpt_dir / T5_FILE, dtype=torch.float16)
    assert err.value.input_name == "dtype"
    with pytest.raises(InputError) as err:
        TextEncoder.from_pretrained(ckpt_dir / T5_FILE, device="mps")
    assert err.value.input_name == "device"
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            TextEncoder.from_pretrained(ckpt_dir / T5_FILE, device="cuda")
