"""umT5 text path against golden/01_text (official tokenizer + encoder, fp32, CPU)."""

import pytest
import torch
from safetensors.torch import load_file

from liveavatar_core.encoders.text import TextEncoder
from tests.parity.tolerance import ENCODER, assert_parity

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"


@pytest.fixture(scope="module")
def golden(fixtures):
    return load_file(fixtures / "golden" / "01_text.safetensors")


@pytest.fixture(scope="module")
def prompt(manifest):
    return manifest["inputs"]["prompt"]


@pytest.fixture(scope="module")
def encoder(ckpt_dir, golden):
    return TextEncoder.from_pretrained(ckpt_dir / T5_FILE, device="cpu", dtype=torch.float32,
                                       text_len=golden["input_ids"].shape[1])


def test_tokenizer_ids_and_mask_exact(encoder, golden, prompt):
    input_ids, mask = encoder.tokenize(prompt)
    assert torch.equal(input_ids, golden["input_ids"])
    assert torch.equal(mask, golden["attention_mask"])


def test_context_matches_official(encoder, golden, prompt):
    context = encoder.encode(prompt)
    expected = golden["context"]
    assert context.shape == expected.shape
    assert context.shape[0] == int(golden["attention_mask"].sum())
    assert context.dtype == torch.float32
    assert_parity(context, expected, ENCODER, "context")
