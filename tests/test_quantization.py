"""fp8 storage with float compute: accuracy, state dicts, dtype safety, and no hidden float copies for backward."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from flux_lora.model.flux import PRESETS, Flux
from flux_lora.model.fp8 import (
    FP8,
    FP8Linear,
    default_predicate,
    dequantize_weight,
    quantize_,
    quantize_weight,
    storage_bytes,
)
from flux_lora.weights.loading import load_flow_model

from helpers.dit import dit_inputs
from helpers.numerics import rel_err


def test_quantize_weight_per_channel_scales():
    w = torch.randn(64, 48) * torch.logspace(-4, 1, 64)[:, None]  # rows spanning five decades
    q, s = quantize_weight(w)
    assert q.dtype == FP8 and s.dtype == torch.float32 and s.shape == (64,)
    assert torch.equal(torch.log2(s), torch.log2(s).round())  # powers of two: exact in bf16
    rows_max = q.float().abs().amax(1)
    assert ((rows_max >= 224) & (rows_max <= 448)).all()  # (224, 448] before rounding to e4m3
    rel = (dequantize_weight(q, s, torch.float32) - w).norm(dim=1) / w.norm(dim=1)
    assert rel.max() < 0.05  # every row keeps e4m3's relative precision
    q1, s1 = quantize_weight(w, per_channel=False)
    rel1 = (dequantize_weight(q1, s1, torch.float32) - w).norm(dim=1) / w.norm(dim=1)
    assert rel1[:8].min() > 0.5  # plain cast: the smallest rows drown in subnormals or flush to zero


def test_fp8_linear_matches_dequantized_linear_forward_and_backward():
    torch.manual_seed(0)
    lin = nn.Linear(48, 32)
    fp8 = FP8Linear.from_linear(lin, bias_dtype=torch.float32)
    ref = nn.Linear(48, 32)
    ref.weight.data = fp8.dequantized_weight()
    ref.bias.data = lin.bias.data.clone()
    ref.requires_grad_(False)
    x = torch.randn(5, 7, 48, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = fp8(x), ref(x2)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    assert fp8.weight.grad is None and not fp8.weight.requires_grad
    # and close to the original float layer: e4m3 keeps 3 mantissa bits, about 2-3 % relative error overall
    with torch.no_grad():
        assert rel_err(fp8(x), lin(x)) < 0.05


def test_e5m2_layer_keeps_its_bytes_and_dequantizes_also_with_fp8_matmul():
    """A file's e5m2 weight stays e5m2 (through dtype conversions too) and computes through the dequantize path,
    also when fp8 GEMMs are switched on (they take e4m3 operands), to float32 rounding of its dequantized weight."""
    torch.manual_seed(0)
    lin = nn.Linear(48, 32)
    fp8 = FP8Linear.from_linear(lin, bias_dtype=torch.float32)
    fp8.weight.data = lin.weight.detach().mul(1000).to(torch.float8_e5m2)
    fp8.weight_scale.fill_(1e-3)
    fp8.to(torch.bfloat16)
    assert fp8.weight.dtype == torch.float8_e5m2 and "float8_e5m2" in repr(fp8)
    ref = fp8.to_linear(torch.float32)
    x = torch.randn(16, 48)
    fp8.fp8_matmul = True
    torch.testing.assert_close(fp8(x), ref(x))  # float32 rounding (the scale is no power of two); fp8 GEMMs: 3 %


def test_bf16_compute_and_autocast():
    torch.manual_seed(0)
    fp8 = FP8Linear.from_linear(nn.Linear(32, 16), bias_dtype=torch.bfloat16)
    x = torch.randn(4, 32)
    assert fp8(x.bfloat16()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8(x).dtype == torch.bfloat16  # float32 input, bf16 compute under autocast
    assert fp8.weight.dtype == FP8


def test_dtype_conversions_keep_fp8_storage():
    """`.to(bfloat16)` (what Lightning's bf16-true does to every parameter) must not upcast the fp8 weights."""
    model = quantize_(Flux(PRESETS["tiny"]))
    before = storage_bytes(model)
    model.to(torch.bfloat16)
    lin = model.double_blocks[0].img_attn.qkv
    assert lin.weight.dtype == FP8 and lin.weight_scale.dtype == torch.float32 and lin.bias.dtype == torch.bfloat16
    assert model.img_in.weight.dtype == torch.bfloat16
    assert storage_bytes(model) <= before


def test_state_dict_roundtrip(tiny_dev_dir):
    model = load_flow_model(tiny_dev_dir, dtype=torch.float32, quantize="float8_e4m3fn")
    sd = model.state_dict()
    assert sd["double_blocks.0.img_attn.qkv.weight"].dtype == FP8
    assert sd["double_blocks.0.img_attn.qkv.weight_scale"].shape == (3 * 64,)
    fresh = quantize_(Flux(PRESETS["tiny"]))
    fresh.load_state_dict(sd, strict=True)
    x = dit_inputs(PRESETS["tiny"])
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x), model(**x), rtol=0, atol=0)


def _realistic_tiny(seed=0) -> Flux:
    """The tiny model with FLUX-like weight magnitudes (std 0.02), where a plain cast lands in subnormals."""
    torch.manual_seed(seed)
    model = Flux(PRESETS["tiny"]).eval().requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
    return model


def test_scaled_fp8_beats_plain_cast():
    ref = _realistic_tiny()
    x = dit_inputs(PRESETS["tiny"], seed=1)
    errs = {}
    for per_channel in (True, False):
        for policy in ("blocks", "all"):
            model = quantize_(copy.deepcopy(ref), default_predicate(policy), per_channel=per_channel)
            with torch.no_grad():
                errs[per_channel, policy] = rel_err(model(**x), ref(**x))
    assert errs[True, "blocks"] < 0.05 and errs[True, "all"] < 0.05
    assert errs[True, "blocks"] < errs[False, "blocks"] and errs[True, "all"] < errs[False, "all"]


class _NaiveFP8Linear(FP8Linear):
    """What autocast or `weight.to(bf16)` inside forward does: autograd keeps the float copy for backward."""

    def forward(self, x):
        return F.linear(x, dequantize_weight(self.weight, self.weight_scale, x.dtype), self.bias.to(x.dtype))


def _saved_bytes(model: nn.Module, x: dict) -> int:
    """Bytes autograd saves for backward that are not the model's own parameters or buffers."""
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**x)
    out.float().square().mean().backward()
    return sum(saved.values())


def test_backward_keeps_no_float_weight_copies():
    p = PRESETS["tiny"]
    bf16 = _realistic_tiny().to(torch.bfloat16)
    x = {
        k: (v.to(torch.bfloat16) if v is not None and k in ("img", "txt", "y") else v)
        for k, v in dit_inputs(p, lat_h=8, lat_w=8, seed=2).items()
    }
    for k in ("img", "txt", "y"):  # every block Linear then sits on the gradient path (as with LoRA everywhere)
        x[k].requires_grad_(True)
    ours = quantize_(copy.deepcopy(bf16))
    naive = copy.deepcopy(bf16)
    for name, m in list(naive.named_modules()):
        if type(m) is nn.Linear and default_predicate("blocks")(name, m):
            parent, _, child = name.rpartition(".")
            q = FP8Linear.from_linear(m)
            q.__class__ = _NaiveFP8Linear
            setattr(naive.get_submodule(parent), child, q)
    e5m2 = copy.deepcopy(ours)  # a scaled e5m2 file's layers, kept as stored: the same path
    for m in e5m2.modules():
        if isinstance(m, FP8Linear):
            m.weight.data = m.dequantized_weight(torch.float32).to(torch.float8_e5m2)
            m.weight_scale.fill_(1.0)
    base, fp8, control = _saved_bytes(bf16, x), _saved_bytes(ours, x), _saved_bytes(naive, x)
    assert fp8 <= base, (fp8, base)
    assert _saved_bytes(e5m2, x) <= base
    block_weights = sum(m.weight.numel() * 2 for m in ours.modules() if isinstance(m, FP8Linear))
    assert control >= base + block_weights  # the trap the test guards against really shows up in this count


def test_peft_wraps_fp8_linear_with_float32_adapters():
    """peft wraps FP8Linear like any Linear; our injection keeps the adapters in float32 (peft alone makes them
    fp8 on an fp8 base), and only they receive gradients."""
    from flux_lora.config import LoraConfig
    from flux_lora.lora.peft_adapters import inject_lora

    model = quantize_(_realistic_tiny())
    names = inject_lora(model, LoraConfig(rank=4, alpha=4, targets=["*.qkv", "*.linear1"]))
    assert len(names) == 2 * 2 + 2
    layer = model.double_blocks[0].img_attn.qkv
    assert isinstance(layer.base_layer, FP8Linear) and layer.base_layer.weight.dtype == FP8
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = dit_inputs(PRESETS["tiny"])
    model(**x).square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)


def test_lightning_bf16_true_keeps_fp8_storage():
    """Lightning's bf16-true converts every floating parameter to bf16; FP8Linear keeps its fp8 weight."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    model = quantize_(Flux(PRESETS["tiny"]))
    model = HalfPrecision("bf16-true").convert_module(model)
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == FP8
    assert model.img_in.weight.dtype == torch.bfloat16
