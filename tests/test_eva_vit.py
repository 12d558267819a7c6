"""Tests of videollm.models.eva_vit: tiny random-weight ViTs on CPU, the full ViT-g on the meta device."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from videollm.errors import CheckpointError, ConfigError
from videollm.models.eva_vit import (
    EVAVisionTransformer,
    FP32LayerNorm,
    convert_weights_to_fp16,
    create_eva_vit_g,
    interpolate_pos_embed,
    load_eva_vit_weights,
)

TINY = dict(patch_size=14, embed_dim=32, depth=2, num_heads=2, mlp_hidden=40)


def tiny_vit(img_size: int = 28, precision: str = "fp32", **kw) -> EVAVisionTransformer:
    return create_eva_vit_g(img_size=img_size, precision=precision, **{**TINY, **kw})


def test_tiny_forward_backward_shapes():
    torch.manual_seed(0)
    vit = tiny_vit()
    x = torch.randn(3, 3, 28, 28)
    out = vit(x)
    assert out.shape == (3, 1 + 4, 32)  # CLS + 2x2 patches, no pooling, no head
    out.square().mean().backward()
    for name, p in vit.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert vit.blocks[0].attn.q_bias.grad.abs().sum() > 0
    assert vit.blocks[0].attn.v_bias.grad.abs().sum() > 0


def test_mlp_hidden_from_ratio_and_explicit():
    vit = create_eva_vit_g(img_size=28, precision="fp32", patch_size=14, embed_dim=32, depth=1, num_heads=2, mlp_ratio=4.3637)
    assert vit.blocks[0].mlp.fc1.out_features == int(32 * 4.3637) == 139
    assert tiny_vit().blocks[0].mlp.fc1.out_features == 40


def _reference_forward(vit: EVAVisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The original's forward written out by hand: zero k bias, q scaled before q @ k^T, pre-norm, exact GELU."""
    h = F.conv2d(x, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=14).flatten(2).transpose(1, 2)
    h = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), h), dim=1) + vit.pos_embed
    for blk in vit.blocks:
        a = blk.attn
        y = F.layer_norm(h, (h.shape[-1],), blk.norm1.weight, blk.norm1.bias, 1e-6)
        bias = torch.cat((a.q_bias, torch.zeros_like(a.q_bias), a.v_bias))
        qkv = y @ a.qkv.weight.T + bias
        b, n, _ = qkv.shape
        q, k, v = qkv.reshape(b, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        q = q * (q.shape[-1] ** -0.5)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, -1) @ a.proj.weight.T + a.proj.bias
        h = h + y
        y = F.layer_norm(h, (h.shape[-1],), blk.norm2.weight, blk.norm2.bias, 1e-6)
        y = F.gelu(y @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias, approximate="none")
        h = h + y @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    return h


def test_matches_handwritten_reference_with_nonzero_biases():
    torch.manual_seed(1)
    vit = tiny_vit().eval()
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.q_bias.normal_()
            blk.attn.v_bias.normal_()
            blk.norm1.weight.normal_()
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(vit(x), _reference_forward(vit, x), rtol=1e-5, atol=1e-5)


def test_fp16_conversion_keeps_listed_params_fp32():
    vit = tiny_vit(precision="fp16")
    for name, p in vit.named_parameters():
        fp32 = (
            name in ("cls_token", "pos_embed")
            or ".norm1." in name
            or ".norm2." in name
            or name.endswith("q_bias")
            or name.endswith("v_bias")
        )
        assert p.dtype == (torch.float32 if fp32 else torch.float16), name
    assert vit.patch_embed.proj.weight.dtype == torch.float16
    assert vit.patch_embed.proj.bias.dtype == torch.float16
    assert vit.blocks[1].attn.qkv.weight.dtype == torch.float16


def test_fp16_model_runs_after_float_and_under_autocast():
    torch.manual_seed(2)
    vit16 = tiny_vit(precision="fp16").eval()
    x = torch.randn(2, 3, 28, 28)
    with pytest.raises(RuntimeError):  # mixed fp32 input / fp16 weights without autocast
        vit16(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac = vit16(x)
    vit32 = tiny_vit(precision="fp32").eval()
    vit32.load_state_dict(vit16.state_dict())  # fp16 values copied into fp32 params
    with torch.no_grad():
        ref = vit32(x)
        out_float = vit16.float()(x)
    assert out_float.dtype == torch.float32
    torch.testing.assert_close(out_float, ref)
    assert out_ac.shape == ref.shape
    torch.testing.assert_close(out_ac.float(), ref, rtol=0.05, atol=0.05)


def test_convert_weights_to_fp16_touches_only_conv_and_linear():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Conv1d(4, 2, 1))
    convert_weights_to_fp16(m)
    assert m[0].weight.dtype == m[0].bias.dtype == torch.float16
    assert m[2].weight.dtype == m[2].bias.dtype == torch.float16
    assert m[1].weight.dtype == m[1].bias.dtype == torch.float32


def test_grad_checkpointing_gives_same_outputs_and_grads():
    x = torch.randn(2, 3, 28, 28)
    results = []
    for use_ckpt in (False, True):
        torch.manual_seed(3)
        vit = tiny_vit(drop_path_rate=0.5, use_checkpoint=use_ckpt).train()
        torch.manual_seed(4)  # same drop-path draws in both runs
        out = vit(x)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in vit.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_set_grad_checkpointing_toggles():
    vit = tiny_vit()
    vit.set_grad_checkpointing(True)
    assert vit.use_checkpoint
    vit.set_grad_checkpointing(False)
    assert not vit.use_checkpoint


def test_interpolate_pos_embed():
    torch.manual_seed(5)
    pe = torch.randn(1, 1 + 4, 8)
    assert interpolate_pos_embed(pe, 2) is pe  # same grid: untouched
    assert interpolate_pos_embed(pe, (2, 2)) is pe
    out = interpolate_pos_embed(pe, 3)
    assert out.shape == (1, 1 + 9, 8)
    torch.testing.assert_close(out[:, :1], pe[:, :1])  # CLS kept
    # Bicubic with align_corners=False against torch directly.
    grid = pe[:, 1:].reshape(1, 2, 2, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(3, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 9, 8)
    torch.testing.assert_close(out[:, 1:], want)
    # A constant field stays constant.
    const = torch.ones(1, 1 + 16, 4) * 0.7
    torch.testing.assert_close(interpolate_pos_embed(const, 6)[:, 1:], torch.full((1, 36, 4), 0.7))
    with pytest.raises(CheckpointError, match="square grid"):
        interpolate_pos_embed(torch.randn(1, 1 + 5, 8), 3)


def test_state_dict_key_names_exact():
    keys = list(tiny_vit().state_dict())
    per_block = [
        "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight",
        "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    ]
    expected = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"] + [
        f"blocks.{i}.{k}" for i in range(2) for k in per_block
    ]
    assert sorted(keys) == sorted(expected)
    assert "blocks.0.attn.qkv.bias" not in keys


def test_load_round_trip_from_path(tmp_path):
    torch.manual_seed(6)
    src = tiny_vit().eval()
    path = tmp_path / "eva_vit_g.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(7)
    dst = tiny_vit().eval()
    x = torch.randn(2, 3, 28, 28)
    assert not torch.allclose(dst(x), src(x))
    result = load_eva_vit_weights(dst, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(dst(x), src(x))


def test_load_reports_missing_and_unexpected_keys_and_strips_prefix(caplog):
    src = tiny_vit()
    sd = {f"visual_encoder.{k}": v for k, v in src.state_dict().items()}
    del sd["visual_encoder.blocks.1.attn.v_bias"]
    sd["visual_encoder.blocks.2.norm1.weight"] = torch.ones(32)  # e.g. a 40th block in the file
    dst = tiny_vit(precision="fp16")
    with caplog.at_level(logging.WARNING, logger="videollm.models.eva_vit"):
        result = load_eva_vit_weights(dst, sd)
    assert result.missing_keys == ["blocks.1.attn.v_bias"]
    assert result.unexpected_keys == ["blocks.2.norm1.weight"]
    assert "blocks.1.attn.v_bias" in caplog.text and "blocks.2.norm1.weight" in caplog.text
    # Loaded values land in the fp16 Linear weights, cast.
    assert dst.blocks[0].attn.qkv.weight.dtype == torch.float16
    torch.testing.assert_close(dst.blocks[0].attn.qkv.weight.float(), src.blocks[0].attn.qkv.weight.half().float())


def test_load_interpolates_pos_embed_for_another_image_size():
    torch.manual_seed(8)
    src = tiny_vit(img_size=28)  # 2x2 grid
    dst = tiny_vit(img_size=42)  # 3x3 grid
    result = load_eva_vit_weights(dst, src.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert dst.pos_embed.shape == (1, 10, 32)
    torch.testing.assert_close(dst.pos_embed[:, :1], src.pos_embed[:, :1])
    torch.testing.assert_close(dst.pos_embed, interpolate_pos_embed(src.pos_embed.detach(), 3))
    assert dst(torch.randn(1, 3, 42, 42)).shape == (1, 10, 32)


def test_load_errors_name_the_problem(tmp_path):
    vit = tiny_vit()
    with pytest.raises(CheckpointError, match="missing.pth"):
        load_eva_vit_weights(vit, tmp_path / "missing.pth")
    bad = tiny_vit().state_dict()
    bad["blocks.0.mlp.fc1.weight"] = torch.zeros(41, 32)
    with pytest.raises(CheckpointError, match="blocks.0.mlp.fc1.weight"):
        load_eva_vit_weights(vit, bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_eva_vit_weights(vit, junk)


def test_config_errors():
    with pytest.raises(ConfigError, match="vit_precision"):
        tiny_vit(precision="bf8")
    with pytest.raises(ConfigError, match="patch_size"):
        tiny_vit(img_size=30)
    with pytest.raises(ConfigError, match="28, 28"):
        tiny_vit()(torch.randn(1, 3, 42, 42))


def test_fp32_layernorm():
    ln = FP32LayerNorm(16)
    assert ln.eps == 1e-5
    torch.manual_seed(9)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = (torch.randn(2, 5, 16) * 30).half()
    out = ln(x)
    assert out.dtype == torch.float16
    want = F.layer_norm(x.float(), (16,), ln.weight, ln.bias, 1e-5).half()
    torch.testing.assert_close(out, want)
    assert ln(x.float()).dtype == torch.float32


def test_full_size_vit_g_on_meta():
    with torch.device("meta"):
        vit = create_eva_vit_g()
    assert sum(p.numel() for p in vit.parameters()) == 985_894_528
    sd = vit.state_dict()
    assert len(sd) == 4 + 39 * 13
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["cls_token"] == (1, 1, 1408)
    assert shapes["pos_embed"] == (1, 257, 1408)
    assert shapes["patch_embed.proj.weight"] == (1408, 3, 14, 14)
    assert shapes["patch_embed.proj.bias"] == (1408,)
    assert shapes["blocks.38.attn.qkv.weight"] == (4224, 1408)
    assert shapes["blocks.38.attn.q_bias"] == shapes["blocks.38.attn.v_bias"] == (1408,)
    assert shapes["blocks.38.attn.proj.weight"] == (1408, 1408)
    assert shapes["blocks.38.mlp.fc1.weight"] == (6144, 1408)
    assert shapes["blocks.38.mlp.fc2.weight"] == (1408, 6144)
    assert "blocks.39.norm1.weight" not in shapes
    assert not any(k.startswith(("norm.", "fc_norm.", "head.")) for k in shapes)
    assert vit.blocks[0].attn.num_heads == 16 and vit.blocks[0].attn.head_dim == 88
    assert vit.blocks[0].norm1.eps == 1e-6
    assert sd["blocks.0.attn.qkv.weight"].dtype == torch.float16  # precision="fp16" default
    assert sd["pos_embed"].dtype == torch.float32
    out = vit.float()(torch.empty(2, 3, 224, 224, device="meta"))
    assert out.shape == (2, 257, 1408)  # 16x16 patches + CLS, all tokens returned
