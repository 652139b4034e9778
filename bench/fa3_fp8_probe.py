"""Decision probe (stop 33, removed after it ran): FA3 bf16 vs e4m3 at the steady-state call's shapes, inputs quantised beforehand."""
import torch, flash_attn_interface as fa
from liveavatar_core.ops.attention import merge_attention, _cudnn_with_lse
torch.manual_seed(0)
dev = "cuda"; H, D = 40, 128
q = torch.randn(1, 3168, H, D, device=dev, dtype=torch.bfloat16)
kh = torch.randn(1, 12672, H, D, device=dev, dtype=torch.bfloat16); vh = torch.randn_like(kh)
kc = torch.randn(1, 2640, H, D, device=dev, dtype=torch.bfloat16); vc = torch.randn_like(kc)
E = torch.float8_e4m3fn
def quant(t):  # one scale per (batch, head)
    s = t.abs().amax(dim=(1, 3)).float().clamp_min(1e-6) / 448.0
    return (t.float() / s[:, None, :, None]).to(E), s
qq, qs = quant(q); khq, khs = quant(kh); vhq, vhs = quant(vh); kcq, kcs = quant(kc); vcq, vcs = quant(vc)
vcm = vhq.transpose(-1, -3).contiguous().transpose(-1, -3)
def f3(q, k, v, **kw):
    o, lse = fa.flash_attn_func(q, k, v, return_attn_probs=True, **kw)[:2]
    return o, lse.transpose(1, 2)
def t(fn, n=30):
    for _ in range(5): fn()
    a, b = torch.cuda.Event(True), torch.cuda.Event(True); torch.cuda.synchronize(); a.record()
    for _ in range(n): fn()
    b.record(); torch.cuda.synchronize(); return a.elapsed_time(b) / n
ref = merge_attention(*zip(*[_cudnn_with_lse(q.float().to(torch.bfloat16), k, v) for k, v in ((kh, vh), (kc, vc))]))
ex = torch.nn.functional.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, torch.cat([kh, kc], 1), torch.cat([vh, vc], 1)))).transpose(1, 2)
err = lambda o: ((o.float() - ex).norm() / ex.norm()).item()
cases = {
 "cudnn bf16 merged": lambda: merge_attention(*zip(*[_cudnn_with_lse(q, k, v) for k, v in ((kh, vh), (kc, vc))])),
 "fa3 bf16 merged": lambda: merge_attention(*zip(*[f3(q, k, v) for k, v in ((kh, vh), (kc, vc))])),
 "fa3 bf16 history only": lambda: f3(q, kh, vh)[0],
 "fa3 e4m3 merged (prequantised)": lambda: merge_attention(*zip(*[f3(qq, k, v, q_descale=qs, k_descale=ks, v_descale=vs) for k, v, ks, vs in ((khq, vhq, khs, vhs), (kcq, vcq, kcs, vcs))])),
 "fa3 e4m3 history only": lambda: f3(qq, khq, vhq, q_descale=qs, k_descale=khs, v_descale=vhs)[0],

 "fa3 e4m3 merged + q quant": lambda: (lambda qq, qs: merge_attention(*zip(*[f3(qq, k, v, q_descale=qs, k_descale=ks, v_descale=vs) for k, v, ks, vs in ((khq, vhq, khs, vhs), (kcq, vcq, kcs, vcs))])))(*quant(q)),
}
for name, fn in cases.items():
  try:
    print(f"{name:34s} {t(fn):6.3f} ms  err {err(fn()) * 100:.2f} %", flush=True)
  except Exception as exc:
    print(name, "failed:", str(exc)[:200], flush=True)
print("fa3 e4m3 out dtype", f3(qq, khq, vhq, q_descale=qs, k_descale=khs, v_descale=vhs)[0].dtype)
