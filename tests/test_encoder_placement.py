"""Encoder placement and dtype: one policy in the core (`encoders.placement`) that the nodes follow."""

from __future__ import annotations

import pytest
import torch

from liveavatar_core.encoders.placement import EncoderPlacement, audio_encoder_placement, text_encoder_placement
from liveavatar_core.encoders.text import TextEncoder
from tests.test_nodes_support import load_audio as comfy_load_audio
from tests.test_nodes_support import load_pack, models_tree, pack_module

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp8", torch.bfloat16),
                                              ("fp32", torch.float32)])
def test_policy_per_device_and_precision(precision, dtype):
    # umT5 runs where asked and waits on the CPU; bf16 everywhere but in fp32 runs.
    assert text_encoder_placement("cuda:0", precision) == EncoderPlacement(GPU, CPU, dtype)
    assert text_encoder_placement("cpu", precision) == EncoderPlacement(CPU, CPU, dtype)
    # wav2vec2 stays where it runs; a CPU always gets fp32.
    assert audio_encoder_placement("cuda:0", precision) == EncoderPlacement(GPU, GPU, dtype)
    assert audio_encoder_placement(CPU, precision) == EncoderPlacement(CPU, CPU, torch.float32)


class _Devices:
    """Records where `running` sends it (the GPU side of the policy, on a CPU-only machine)."""

    def __init__(self, device: torch.device):
        self.device, self.moves = device, []

    def to(self, device):
        self.device = device
        self.moves.append(device)
        return self


def test_running_brings_the_encoder_back_also_after_an_error():
    at = text_encoder_placement(GPU)
    encoder = _Devices(at.keep_on)
    with pytest.raises(RuntimeError, match="out of memory"):
        with at.running(encoder):
            raise RuntimeError("CUDA out of memory")
    assert encoder.moves == [GPU, CPU]
    same = audio_encoder_placement(CPU)
    still = _Devices(same.keep_on)
    with same.running(still):
        pass
    assert still.moves == []


@pytest.fixture(scope="module")
def encoders_node(tmp_path_factory, fixtures):
    pack = load_pack()
    root = tmp_path_factory.mktemp("comfy")
    pack_module(pack, "nodes.host").use_standalone(models_tree(root, fixtures), root / "output")
    return pack_module(pack, "nodes.encoders"), pack_module(pack, "liveavatar_core.encoders.placement")


def test_nodes_load_the_encoders_as_the_policy_says(encoders_node, fixtures):
    node, policy = encoders_node  # the pack's own copy of the core, imported under its path-like name
    text_choice, audio_choice = node.t5_choices()[0], node.wav2vec2_choices()[0]
    (context,) = node.LiveAvatarTextEncode().encode("a person talking", text_choice, "cpu")
    node.LiveAvatarAudioEncode().encode(comfy_load_audio(fixtures / "inputs" / "audio.wav"), audio_choice, "cpu",
                                        48)
    loaded = {key[0]: (key[-1], encoder) for key, encoder in node.LOADED._items.items()}
    text_at, text_encoder = loaded["t5"]
    audio_at, audio_encoder = loaded["wav2vec2"]
    assert text_at == policy.text_encoder_placement(CPU) and text_encoder.device == CPU
    assert next(text_encoder.model.parameters()).dtype == torch.bfloat16
    assert audio_at == policy.audio_encoder_placement(CPU) and audio_encoder.dtype == torch.float32
    assert context.device == CPU and context.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_text_encoder_runs_on_the_gpu_and_waits_on_the_cpu(ckpt_dir):
    at = text_encoder_placement(GPU)
    encoder = TextEncoder.from_pretrained(ckpt_dir / "models_t5_umt5-xxl-enc-bf16.pth", device=at.keep_on,
                                          dtype=at.dtype)
    on_cpu = encoder.encode("a person talking")
    with at.running(encoder):
        assert encoder.device.type == "cuda"
        on_gpu = encoder.encode("a person talking")
    assert encoder.device == CPU and on_gpu.device.type == "cuda"
    # bf16 kernels of the CPU and the GPU round differently: on an H200 one of 69,632 elements moved
    # by 0.027 (a bf16 step of that value), so the whole embedding is compared, not each element.
    diff = (on_gpu.cpu().float() - on_cpu.float()).norm() / on_cpu.float().norm()
    assert diff < 1e-2, f"GPU and CPU embeddings differ by {diff:.2%} (relative L2)"
