"""ImageBind towers: released key layout, parameter counts, weight loading, outputs, training mode."""

from __future__ import annotations

import math
from typing import Dict, Tuple

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from videollm.errors import CheckpointError, ConfigError, DataError
from videollm.models.imagebind import (
    DropPath,
    ImageBindConfig,
    ImageBindModel,
    SelfAttention,
    imagebind_huge,
    imagebind_tiny_config,
    load_imagebind_weights,
)

Shape = Tuple[int, ...]

# The released ImageBind-Huge has 1,200,781,057 parameters over six modalities (reference §1.8).
RELEASED_TOTAL_PARAMS = 1_200_781_057


def _trunk(prefix: str, d: int, blocks: int, bias_kv: bool, pre_ln: bool) -> Dict[str, Shape]:
    keys: Dict[str, Shape] = {}
    if pre_ln:
        keys[f"{prefix}.pre_transformer_layer.0.weight"] = (d,)
        keys[f"{prefix}.pre_transformer_layer.0.bias"] = (d,)
    for i in range(blocks):
        b = f"{prefix}.blocks.{i}"
        keys.update({f"{b}.attn.in_proj_weight": (3 * d, d), f"{b}.attn.in_proj_bias": (3 * d,)})
        if bias_kv:
            keys.update({f"{b}.attn.bias_k": (1, 1, d), f"{b}.attn.bias_v": (1, 1, d)})
        keys.update({f"{b}.attn.out_proj.weight": (d, d), f"{b}.attn.out_proj.bias": (d,)})
        keys.update({f"{b}.norm_1.weight": (d,), f"{b}.norm_1.bias": (d,), f"{b}.norm_2.weight": (d,), f"{b}.norm_2.bias": (d,)})
        keys.update({f"{b}.mlp.fc1.weight": (4 * d, d), f"{b}.mlp.fc1.bias": (4 * d,)})
        keys.update({f"{b}.mlp.fc2.weight": (d, 4 * d), f"{b}.mlp.fc2.bias": (d,)})
    return keys


def _cls_head(prefix: str, d: int, out: int = 1024) -> Dict[str, Shape]:
    return {f"{prefix}.0.weight": (d,), f"{prefix}.0.bias": (d,), f"{prefix}.2.weight": (out, d)}


def _patch_pre(prefix: str, stem: str, conv: Shape, tokens: int, d: int, norm: bool) -> Dict[str, Shape]:
    keys = {f"{prefix}.cls_token": (1, 1, d), stem: conv, f"{prefix}.pos_embedding_helper.pos_embed": (1, tokens, d)}
    if norm:
        base = stem.rsplit(".proj", 1)[0]
        keys.update({f"{base}.norm_layer.weight": (d,), f"{base}.norm_layer.bias": (d,)})
    return keys


def released_layout() -> Tuple[Dict[str, Shape], set]:
    """All keys of the released imagebind_huge.pth, derived from the original model definition.

    Returns (key -> shape, set of keys that are buffers rather than parameters).
    """
    P, T, H, Q = "modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors"
    k: Dict[str, Shape] = {}
    # vision: PadIm2Video + Conv3d (2,14,14) -> 1 x 16 x 16 patches + CLS; LN before the trunk
    k.update(_patch_pre(f"{P}.vision", f"{P}.vision.rgbt_stem.proj.1.weight", (1280, 3, 2, 14, 14), 257, 1280, False))
    k.update(_trunk(f"{T}.vision", 1280, 32, bias_kv=False, pre_ln=True))
    k.update(_cls_head(f"{H}.vision", 1280))
    # text: token + position embeddings, causal mask buffer; EOS head; learnable logit scale
    k.update({f"{P}.text.pos_embed": (1, 77, 1024), f"{P}.text.mask": (77, 77), f"{P}.text.token_embedding.weight": (49408, 1024)})
    k.update(_trunk(f"{T}.text", 1024, 24, bias_kv=False, pre_ln=False))
    k.update({f"{H}.text.proj.0.weight": (1024,), f"{H}.text.proj.0.bias": (1024,), f"{H}.text.proj.1.weight": (1024, 1024)})
    k[f"{Q}.text.1.log_logit_scale"] = ()
    # audio: Conv2d 16/10 on (1,128,204) -> 12 x 19 patches + CLS; stem LayerNorm
    k.update(_patch_pre(f"{P}.audio", f"{P}.audio.rgbt_stem.proj.weight", (768, 1, 16, 16), 229, 768, True))
    k.update(_trunk(f"{T}.audio", 768, 12, bias_kv=True, pre_ln=False))
    k.update(_cls_head(f"{H}.audio", 768))
    k[f"{Q}.audio.1.log_logit_scale"] = ()
    # depth (stem named depth_stem), thermal (rgbt_stem): 14 x 14 patches of 16 + CLS
    k.update(_patch_pre(f"{P}.depth", f"{P}.depth.depth_stem.proj.weight", (384, 1, 16, 16), 197, 384, True))
    k.update(_trunk(f"{T}.depth", 384, 12, bias_kv=True, pre_ln=False))
    k.update(_cls_head(f"{H}.depth", 384))
    k[f"{Q}.depth.1.log_logit_scale"] = ()
    k.update(_patch_pre(f"{P}.thermal", f"{P}.thermal.rgbt_stem.proj.weight", (768, 1, 16, 16), 197, 768, True))
    k.update(_trunk(f"{T}.thermal", 768, 12, bias_kv=True, pre_ln=False))
    k.update(_cls_head(f"{H}.thermal", 768))
    k[f"{Q}.thermal.1.log_logit_scale"] = ()
    # imu: Linear 48 -> 512 stem, 2000 / 8 = 250 patches + CLS, its own pos_embed; head with Dropout at index 2
    k.update({f"{P}.imu.pos_embed": (1, 251, 512), f"{P}.imu.cls_token": (1, 1, 512), f"{P}.imu.imu_stem.proj.weight": (512, 48)})
    k.update({f"{P}.imu.imu_stem.norm_layer.weight": (512,), f"{P}.imu.imu_stem.norm_layer.bias": (512,)})
    k.update(_trunk(f"{T}.imu", 512, 6, bias_kv=True, pre_ln=False))
    k.update({f"{H}.imu.0.weight": (512,), f"{H}.imu.0.bias": (512,), f"{H}.imu.3.weight": (1024, 512)})
    k[f"{Q}.imu.1.log_logit_scale"] = ()
    buffers = {f"{P}.text.mask"} | {f"{Q}.{m}.1.log_logit_scale" for m in ("audio", "depth", "thermal", "imu")}
    return k, buffers


def _numel(shape: Shape) -> int:
    return math.prod(shape)


@pytest.fixture(scope="module")
def huge_meta() -> ImageBindModel:
    with torch.device("meta"):
        return imagebind_huge()


def test_layout_generator_matches_released_parameter_count():
    layout, buffers = released_layout()
    assert sum(_numel(s) for k, s in layout.items() if k not in buffers) == RELEASED_TOTAL_PARAMS


def test_huge_keys_and_shapes_match_released_vision_and_audio(huge_meta):
    layout, buffers = released_layout()
    expected = {k: s for k, s in layout.items() if k.split(".")[1] in ("vision", "audio")}
    got = {k: tuple(v.shape) for k, v in huge_meta.state_dict().items()}
    assert got == expected
    own_buffers = {name for name, _ in huge_meta.named_buffers()}
    assert own_buffers == {"modality_postprocessors.audio.1.log_logit_scale"}  # a buffer, as released
    assert own_buffers <= buffers


def test_huge_parameter_counts(huge_meta):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(huge_meta.modality_trunks["audio"]) == 85_072_896  # reference: 85.1 M
    assert count(huge_meta.modality_trunks["vision"]) == 629_680_640  # reference: 629.7 M
    assert count(huge_meta) == 86_235_648 + 632_829_440


def test_huge_drop_path_schedule_and_shapes_on_meta(huge_meta):
    audio_blocks = huge_meta.modality_trunks["audio"].blocks
    assert isinstance(audio_blocks[0].drop_path, nn.Identity)
    assert isinstance(audio_blocks[-1].drop_path, DropPath) and audio_blocks[-1].drop_path.p == pytest.approx(0.1)
    assert all(isinstance(b.drop_path, nn.Identity) for b in huge_meta.modality_trunks["vision"].blocks)
    audio = torch.empty(2, 8, 1, 128, 204, device="meta")
    feature, embedding = huge_meta.get_audio_feature(audio, "audio")
    assert feature.shape == (2, 8, 768) and embedding.shape == (2, 8, 1024)
    frames = torch.empty(2, 8, 3, 224, 224, device="meta")
    feature, embedding = huge_meta.get_audio_feature(frames, "vision")
    assert feature.shape == (2, 8, 1280) and embedding.shape == (2, 8, 1024)
    tokens = huge_meta.modality_preprocessors["audio"](torch.empty(1, 1, 128, 204, device="meta"))
    assert tokens.shape == (1, 229, 768)  # 12 x 19 patches + CLS


@pytest.fixture
def tiny() -> ImageBindModel:
    torch.manual_seed(0)
    return ImageBindModel(imagebind_tiny_config()).eval()


def test_embedding_norms_and_shapes(tiny):
    torch.manual_seed(1)
    feature, embedding = tiny.get_audio_feature(torch.randn(2, 3, 1, 16, 36), "audio")
    assert feature.shape == (2, 3, 32) and embedding.shape == (2, 3, 24)
    torch.testing.assert_close(embedding.norm(dim=-1), torch.full((2, 3), 20.0))
    feature, embedding = tiny.get_audio_feature(torch.randn(2, 4, 3, 28, 28), "vision")
    assert feature.shape == (2, 4, 32) and embedding.shape == (2, 4, 24)
    torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(2, 4))
    # 4-D input is N clips: no (B, S) restoration
    feature, embedding = tiny.get_audio_feature(torch.randn(5, 1, 16, 36), "audio")
    assert feature.shape == (5, 32) and embedding.shape == (5, 24)


def test_feature_is_head_without_last_linear(tiny):
    x = torch.randn(3, 1, 16, 36)
    feature, embedding = tiny.get_audio_feature(x, "audio")
    tokens = tiny.modality_trunks["audio"](tiny.modality_preprocessors["audio"](x))
    torch.testing.assert_close(feature, tiny.modality_heads["audio"][0](tokens)[:, 0])
    projected = tiny.modality_heads["audio"][2](feature)
    torch.testing.assert_close(embedding, 20.0 * projected / projected.norm(dim=-1, keepdim=True))


def test_image_is_repeated_into_two_frames(tiny):
    image = torch.randn(2, 3, 28, 28)
    clip = image[:, :, None].repeat(1, 1, 2, 1, 1)  # (N, C, T, H, W)
    pre = tiny.modality_preprocessors["vision"]
    tokens = pre(image)
    assert tokens.shape == (2, 1 + 2 * 2, 32)
    torch.testing.assert_close(tokens, pre(clip))
    # A zero second frame gives other tokens: the repeat really is a repeat
    assert not torch.allclose(tokens, pre(torch.stack([image, torch.zeros_like(image)], dim=2)))


def test_forward_averages_clips(tiny):
    audio = torch.randn(2, 3, 1, 16, 36)
    out = tiny({"audio": audio})
    torch.testing.assert_close(out["audio"], tiny.get_audio_feature(audio, "audio")[1].mean(dim=1))


@pytest.mark.parametrize("bias_kv", [True, False])
def test_attention_matches_torch_multihead_attention(bias_kv):
    torch.manual_seed(0)
    ours = SelfAttention(32, 4, add_bias_kv=bias_kv)
    ref = nn.MultiheadAttention(32, 4, bias=True, add_bias_kv=bias_kv)
    ref.load_state_dict(ours.state_dict())  # same parameter names
    x = torch.randn(3, 7, 32)
    expected = ref(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_drop_path_active_only_in_train_mode():
    cfg = imagebind_tiny_config(["audio"])
    cfg.audio_drop_path = 0.9
    torch.manual_seed(0)
    model = ImageBindModel(cfg)
    x = torch.randn(8, 1, 16, 36)
    model.train()
    a, b = model.get_audio_feature(x, "audio")[0], model.get_audio_feature(x, "audio")[0]
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model.get_audio_feature(x, "audio")[0], model.get_audio_feature(x, "audio")[0])


def test_forward_backward(tiny):
    tiny.train()
    _, audio = tiny.get_audio_feature(torch.randn(2, 2, 1, 16, 36), "audio")
    _, vision = tiny.get_audio_feature(torch.randn(2, 2, 3, 28, 28), "vision")
    (audio.sum() * audio[..., 0].sum() + vision[..., 1].sum()).backward()
    for name, p in tiny.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for name in ("modality_preprocessors.audio.rgbt_stem.proj.weight", "modality_trunks.audio.blocks.1.attn.bias_k",
                 "modality_preprocessors.vision.rgbt_stem.proj.1.weight", "modality_heads.vision.2.weight"):
        assert tiny.get_parameter(name).grad.abs().sum() > 0, name


def _with_other_modalities(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    state = dict(state)
    state["modality_preprocessors.text.token_embedding.weight"] = torch.zeros(10, 4)
    state["modality_preprocessors.text.mask"] = torch.zeros(3, 3)
    state["modality_trunks.depth.blocks.0.attn.bias_k"] = torch.zeros(1, 1, 4)
    state["modality_heads.thermal.2.weight"] = torch.zeros(4, 4)
    state["modality_postprocessors.imu.1.log_logit_scale"] = torch.tensor(1.0)
    return state


def test_load_skips_other_modalities_and_counts(tiny, tmp_path):
    torch.manual_seed(5)
    source = ImageBindModel(imagebind_tiny_config())
    state = _with_other_modalities(source.state_dict())
    summary = load_imagebind_weights(tiny, state)
    assert len(summary.loaded) == len(source.state_dict())
    assert len(summary.skipped_other_modality) == 5 and not summary.missing and not summary.unexpected
    for key, value in source.state_dict().items():
        torch.testing.assert_close(tiny.state_dict()[key], value)
    # From a file, and from a directory holding imagebind_huge.pth (what the original's config names)
    torch.save(state, tmp_path / "imagebind_huge.pth")
    audio_only = ImageBindModel(imagebind_tiny_config(["audio"]))
    summary = load_imagebind_weights(audio_only, tmp_path)
    assert not summary.missing and not summary.unexpected
    assert any(k.startswith("modality_trunks.vision.") for k in summary.skipped_other_modality)
    torch.testing.assert_close(audio_only.eval().get_audio_feature(torch.ones(1, 1, 16, 36), "audio")[1],
                               source.eval().get_audio_feature(torch.ones(1, 1, 16, 36), "audio")[1])


def test_load_reports_missing_unexpected_and_rejects_bad_shapes(tiny, tmp_path):
    state = dict(tiny.state_dict())
    del state["modality_heads.audio.2.weight"]
    state["modality_trunks.audio.extra"] = torch.zeros(1)
    summary = load_imagebind_weights(tiny, state)
    assert summary.missing == ["modality_heads.audio.2.weight"]
    assert summary.unexpected == ["modality_trunks.audio.extra"]
    with pytest.raises(CheckpointError, match="missing"):
        load_imagebind_weights(tiny, state, strict=True)
    state = dict(tiny.state_dict())
    state["modality_heads.audio.2.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="modality_heads.audio.2.weight"):
        load_imagebind_weights(tiny, state)
    with pytest.raises(CheckpointError, match="nothere.pth"):
        load_imagebind_weights(tiny, tmp_path / "nothere.pth")
    prefixed = {"audio_encoder." + k: v for k, v in tiny.state_dict().items()}
    assert not load_imagebind_weights(tiny, prefixed, prefix="audio_encoder.").missing


def test_config_errors(tiny):
    with pytest.raises(ConfigError, match="text"):
        ImageBindModel(ImageBindConfig(modalities=["audio", "text"]))
    audio_only = ImageBindModel(imagebind_tiny_config(["audio"]))
    with pytest.raises(ConfigError, match="vision"):
        audio_only.get_audio_feature(torch.randn(1, 3, 28, 28), "vision")
    with pytest.raises(DataError, match="tokens"):
        tiny.get_audio_feature(torch.randn(1, 1, 16, 60), "audio")
    with pytest.raises(ConfigError, match="did you mean audio_embed_dim"):
        ImageBindModel.from_config(OmegaConf.create({"audio_embed_dims": 8}))
    cfg = OmegaConf.structured(imagebind_tiny_config(["vision"]))
    model = ImageBindModel.from_config(cfg)
    assert model.modalities == ("vision",) and "audio" not in model.modality_trunks
