"""FP8 linear: quantiser numerics (CPU), layer selection, refusal without FP8 hardware, GPU matmul."""

import pytest
import torch

from liveavatar_core.config import DiTConfig
from liveavatar_core.errors import InputError
from liveavatar_core.model.dit import LiveAvatarDiT
from liveavatar_core.ops.fp8 import E4M3, IGNORE, FP8Linear, convert_to_fp8, fp8_targets, quantize_e4m3
from tests.dit_support import build_dit

_CODES = torch.arange(256, dtype=torch.uint8)
_VALUES = _CODES.view(E4M3).float()
_FINITE = torch.isfinite(_VALUES)


def _nearest_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even onto the e4m3fn grid by exhaustive search (independent of torch's cast)."""
    vals, codes = _VALUES[_FINITE], _CODES[_FINITE]
    dist = (x.reshape(-1, 1).double() - vals.double()).abs()
    best = dist.min(dim=1, keepdim=True).values
    tied = dist == best
    # Among equidistant candidates keep the even code (mantissa LSB 0); zero keeps the input's sign.
    same_sign = torch.signbit(vals)[None, :] == torch.signbit(x.reshape(-1, 1))
    score = tied.int() * (4 + ((codes % 2) == 0).int() * 2 + same_sign.int())
    return codes[score.argmax(dim=1)].view(E4M3).reshape(x.shape)


def _check(x: torch.Tensor, expected_scale: float):
    codes, inv = quantize_e4m3(x)
    assert codes.dtype == E4M3 and inv.dtype == torch.float32 and inv.dim() == 0
    assert inv.item() == pytest.approx(1.0 / expected_scale, rel=1e-7)
    s = torch.tensor(expected_scale, dtype=torch.float32)
    ref = _nearest_e4m3(torch.clamp(x.float() * s, -448, 448))
    assert torch.equal(codes.view(torch.uint8), ref.view(torch.uint8))
    return codes


def test_scale_stretches_large_tensors_to_448():
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * 3
    amax = x.abs().max()
    _check(x, (torch.tensor(448.0) / amax).item())


def test_scale_is_capped_for_small_tensors():
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(1)) * 0.05
    _check(x, 448.0)  # amax < 1: not stretched to the full range
    _check(torch.tensor([-1e-7, 1e-7, 0.5, -0.25, -0.0]), 448.0)  # signed zeros survive
    codes = _check(torch.zeros(4, 4), 448.0)
    assert torch.count_nonzero(codes.float()) == 0


def test_bf16_inputs_are_rounded_once():
    x = (torch.randn(20000, generator=torch.Generator().manual_seed(2)) * 2).to(torch.bfloat16)
    codes = _check(x, (torch.tensor(448.0) / x.float().abs().max()).item())
    # Eager bf16 arithmetic would round X*s to bf16 first and land elsewhere on some codes.
    s = (448.0 / x.float().abs().max()).float()
    twice = (x * s).to(E4M3)
    assert twice.dtype == E4M3 and not torch.equal(codes.view(torch.uint8), twice.view(torch.uint8))


def test_targets_on_the_14b_model():
    with torch.device("meta"):
        model = LiveAvatarDiT(DiTConfig.wan_s2v_14b())
    names = fp8_targets(model)
    assert len(names) == 460
    assert sum(n.startswith("blocks.") for n in names) == 400
    assert sum(".injector." in n for n in names) == 48
    assert sum("injector_adain_layers" in n for n in names) == 12
    assert not any(tag in n for n in names for tag in IGNORE)


def test_conversion_is_refused_without_fp8_hardware():
    cfg = DiTConfig(dim=64, ffn_dim=64, num_heads=2, num_layers=1, audio_dim=16, audio_inject_layers=(0,))
    model = LiveAvatarDiT(cfg)
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this machine has FP8 hardware; the model is on the CPU though")
    with pytest.raises(InputError) as err:
        convert_to_fp8(model)
    assert "fp8" in str(err.value) and "Fix:" in str(err.value)
    assert fp8_targets(model)  # nothing was replaced


needs_fp8 = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                               reason="needs a CUDA GPU with FP8 (compute capability >= 8.9)")


@needs_fp8
def test_fp8_linear_matches_dequantised_reference_on_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    lin = torch.nn.Linear(256, 512, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(77, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    fp8 = FP8Linear.from_linear(lin)
    out = fp8(x)
    assert out.dtype == torch.bfloat16 and out.shape == (77, 512)
    xq, xinv = quantize_e4m3(x)
    ref = (xq.float() * xinv) @ (fp8.weight.float() * fp8.weight_scale_inv).t() + lin.bias.float()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    # ~3 % relative L2 vs the bf16 GEMM on random data (spec/dit.md 5).
    rel = (out.float() - lin(x).float()).norm() / lin(x).float().norm()
    assert rel < 0.06
    assert fp8(x.float()).dtype == torch.float32  # output follows the input dtype


@needs_fp8
def test_converted_tiny_model_runs_on_gpu(ckpt_dir):
    from liveavatar_core.model.cache import make_step_caches
    from liveavatar_core.weights.dit import load_dit_checkpoint

    ckpt = load_dit_checkpoint(ckpt_dir)
    model = build_dit(ckpt, torch.bfloat16, "cuda")
    cfg, f = model.cfg, model.cfg.num_frames_per_block
    g = torch.Generator().manual_seed(0)
    ref, motion = torch.randn(1, 16, 1, 8, 16, generator=g), torch.randn(1, 16, 19, 8, 16, generator=g)
    ctx, x = torch.randn(9, cfg.text_dim, generator=g), torch.randn(1, 16, f, 8, 16, generator=g)
    audio = torch.randn(1, cfg.num_wav2vec_layers, cfg.audio_dim, 4 * f, generator=g).to(torch.bfloat16)
    preds = []
    for convert in (False, True):
        if convert:
            targets = fp8_targets(model)
            assert convert_to_fp8(model) == len(targets) > 0
            assert fp8_targets(model) == []  # every eligible Linear is now an FP8Linear
        cache = make_step_caches(cfg, 8, 16, num_steps=1, cache_frames=2 * f, device="cuda")[0]
        model.sink(ref, motion, ctx, cache)
        preds.append(model.denoise_block(x, 800.0, ctx, audio, None, cache, 0, 10).float())
    assert torch.isfinite(preds[1]).all()
    assert (preds[1] - preds[0]).norm() / preds[0].norm() < 0.2


@needs_fp8
def test_host_weights_are_quantised_on_the_gpu_and_stay_on_the_host():
    """Block swap keeps weights in host memory: converting them for a GPU gives the codes a
    conversion on that GPU gives, and leaves them where they were."""
    cfg = DiTConfig(dim=64, ffn_dim=64, num_heads=2, num_layers=2, audio_dim=16, audio_inject_layers=(0,))
    host = LiveAvatarDiT(cfg).to(torch.bfloat16)
    gpu = LiveAvatarDiT(cfg).to(torch.bfloat16)
    gpu.load_state_dict(host.state_dict())
    gpu.cuda()
    assert convert_to_fp8(host, compute_device="cuda") == convert_to_fp8(gpu) > 0

    def bits(t):  # e4m3 codes compared as bytes
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    on_gpu = gpu.state_dict()
    for name, a in host.state_dict().items():
        assert a.device.type == "cpu" and torch.equal(bits(a), bits(on_gpu[name]).cpu()), name
