"""TextEncoder behaviour: official tokenisation rules, edge prompts, reuse, precision."""

import logging

import pytest
import torch
from safetensors.torch import load_file

from liveavatar_core.encoders.text import TextEncoder, clean_prompt
from liveavatar_core.errors import InputError

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"


@pytest.fixture(scope="module")
def golden(fixtures):
    return load_file(fixtures / "golden" / "01_text.safetensors")


@pytest.fixture(scope="module")
def encoder(ckpt_dir, golden):
    return TextEncoder.from_pretrained(ckpt_dir / T5_FILE, dtype=torch.float32,
                                       text_len=golden["input_ids"].shape[1])


@pytest.fixture(scope="module")
def official_call(ckpt_dir, golden):
    """The tokenizer call the official code makes, on the same tokenizer.json."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(ckpt_dir / "google" / "umt5-xxl"), local_files_only=True)
    text_len = golden["input_ids"].shape[1]

    def call(prompt):
        out = tok([clean_prompt(prompt)], padding="max_length", truncation=True, max_length=text_len,
                  add_special_tokens=True, return_tensors="pt", verbose=False)
        return out["input_ids"], out["attention_mask"]

    return call


def test_cleaning():
    assert clean_prompt("  a &amp;amp; b\n\t c  ") == "a & b c"
    assert clean_prompt("caf\u00c3\u00a9") == "caf\u00e9"  # ftfy repairs mojibake
    assert clean_prompt("") == ""


@pytest.mark.parametrize("prompt", ["", "   ", "  two   spaces\nand a\ttab ", "x &amp;lt; y", "word " * 700])
def test_tokenisation_matches_the_official_tokenizer_call(encoder, official_call, prompt):
    ids, mask = encoder.tokenize(prompt)
    ref_ids, ref_mask = official_call(prompt)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)


def test_empty_prompt_is_just_end_of_sequence(encoder):
    ids, mask = encoder.tokenize("")
    assert int(mask.sum()) == 1 and int(ids[0, 0]) == encoder.tokenizer.eos_id
    context = encoder.encode("")
    assert context.shape == (1, encoder.model.config.d_model)
    assert torch.isfinite(context).all()


def test_long_prompt_is_truncated_with_a_warning(encoder, caplog):
    prompt = "word " * (2 * encoder.tokenizer.text_len)
    with caplog.at_level(logging.WARNING, logger="liveavatar_core.encoders.text"):
        context = encoder.encode(prompt)
    assert context.shape[0] == encoder.tokenizer.text_len
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"keeps the first {encoder.tokenizer.text_len}" in warnings[0]
    assert str(len(encoder.tokenizer._encode(clean_prompt(prompt))) + 1) in warnings[0]
    ids, _ = encoder.tokenize(prompt)
    assert int(ids[0, -1]) == encoder.tokenizer.eos_id


def test_prompts_reuse_the_loaded_weights(encoder, golden, manifest):
    weights = [p.data_ptr() for p in encoder.model.parameters()]
    first = encoder.encode(manifest["inputs"]["prompt"])
    other = encoder.encode("a different prompt")
    first.zero_()  # callers own what they get back; the memo is unaffected
    again = encoder.encode(manifest["inputs"]["prompt"])
    torch.testing.assert_close(again, golden["context"], atol=1e-4, rtol=0)
    assert other.shape[0] != again.shape[0] or not torch.equal(other, again)
    assert [p.data_ptr() for p in encoder.model.parameters()] == weights
    assert len(encoder._memo) <= encoder.memo_size
    assert encoder.to("cpu") is encoder and encoder.device.type == "cpu"


def test_prompt_must_be_text(encoder):
    with pytest.raises(InputError) as err:
        encoder.encode(None)
    assert err.value.input_name == "prompt"


def test_bf16_default_stays_close_to_fp32(ckpt_dir, golden, manifest):
    encoder = TextEncoder.from_pretrained(ckpt_dir / T5_FILE, text_len=golden["input_ids"].shape[1])
    assert encoder.dtype == torch.bfloat16
    context = encoder.encode(manifest["inputs"]["prompt"])
    assert context.dtype == torch.bfloat16
    expected = golden["context"]
    # bf16 keeps 8 significant bits (relative step 2^-8 = 0.4 %); a few roundings per layer stay
    # within a few percent of the fp32 result.
    rel = float((context.float() - expected).norm() / expected.norm())
    assert rel < 0.03, rel
