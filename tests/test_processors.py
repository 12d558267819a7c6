"""Tests of the registered processors (video, image, caption) and their transforms."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from videollm.config import validate_mapping
from videollm.errors import ConfigError, ImageDecodeError
from videollm.processors import CLIP_MEAN, CLIP_STD, load_processor, load_video
from videollm.processors import transforms as T
from videollm.registry import registry

MEAN = torch.tensor(CLIP_MEAN)[:, None, None, None]
STD = torch.tensor(CLIP_STD)[:, None, None, None]


def unnormalize_video(x: torch.Tensor) -> torch.Tensor:
    """Back to 0..255 (C, T, H, W)."""
    return (x * STD + MEAN) * 255


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from videollm.synthetic import ClipSpec, write_clip

    path = tmp_path_factory.mktemp("proc") / "clip.mp4"
    spec = ClipSpec(name="clip", shape="circle", color="green", direction="left", speed="fast", seed=3)
    write_clip(path, spec, width=96, height=64, fps=8, duration=3.0, gop=12)
    return path


def test_all_processors_are_registered() -> None:
    names = set(registry.list("processor"))
    assert {"alpro_video_train", "alpro_video_eval", "blip2_image_train", "blip2_image_eval", "blip_caption"} <= names


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------


def test_from_config_defaults_are_the_originals() -> None:
    train = load_processor("alpro_video_train")
    assert (train.image_size, train.n_frms, train.scale, train.sampling) == (256, sys.maxsize, (0.5, 1.0), "headtail")
    ev = load_processor("alpro_video_eval")
    assert (ev.image_size, ev.n_frms, ev.sampling, ev.mean, ev.std) == (256, sys.maxsize, "uniform", CLIP_MEAN, CLIP_STD)
    assert load_processor("blip2_image_train").image_size == 224
    assert load_processor("blip2_image_eval").image_size == 224
    cap = load_processor("blip_caption")
    assert (cap.prompt, cap.max_words) == ("", 50)


def test_from_config_reads_the_original_yaml_keys() -> None:
    cfg = OmegaConf.create({"name": "alpro_video_train", "n_frms": 8, "image_size": 224, "min_scale": 0.6})
    validate_mapping(OmegaConf.to_container(cfg), registry.get_processor_class("alpro_video_train").config_schema, "p")
    p = registry.get_processor_class("alpro_video_train").from_config(cfg)
    assert (p.n_frms, p.image_size, p.scale) == (8, 224, (0.6, 1.0))
    cap = registry.get_processor_class("blip_caption").from_config(OmegaConf.create({"name": "blip_caption", "prompt": "a photo of "}))
    assert cap("A Dog.") == "a photo of a dog"
    with pytest.raises(ConfigError, match="p.n_frm: unknown key \\(did you mean n_frms\\?\\)"):
        validate_mapping({"name": "alpro_video_eval", "n_frm": 8}, registry.get_processor_class("alpro_video_eval").config_schema, "p")


# ----------------------------------------------------------------------------------------
# Crop parameters
# ----------------------------------------------------------------------------------------


def test_random_resized_crop_params_respect_scale_and_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = T.random_resized_crop_params(120, 160, (0.5, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 160
        assert 0.45 <= h * w / (120 * 160) <= 1.0
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_random_resized_crop_params_fallback_is_a_centre_crop() -> None:
    # An impossible area forces the fallback: the widest centred box with a ratio in range.
    assert T.random_resized_crop_params(100, 300, (2.0, 3.0)) == (0, 83, 100, 133)
    assert T.random_resized_crop_params(300, 100, (2.0, 3.0)) == (83, 0, 133, 100)
    assert T.random_resized_crop_params(100, 110, (2.0, 3.0)) == (0, 0, 100, 110)


def test_random_resized_crop_params_follow_the_generator_and_global_seed() -> None:
    a = T.random_resized_crop_params(224, 224, generator=torch.Generator().manual_seed(1))
    b = T.random_resized_crop_params(224, 224, generator=torch.Generator().manual_seed(1))
    assert a == b
    torch.manual_seed(7)
    c = T.random_resized_crop_params(224, 224)
    torch.manual_seed(7)
    assert T.random_resized_crop_params(224, 224) == c


# ----------------------------------------------------------------------------------------
# Video processors
# ----------------------------------------------------------------------------------------


def test_alpro_video_eval_is_decoder_resize_then_normalise(clip_path: Path) -> None:
    proc = load_processor("alpro_video_eval", OmegaConf.create({"image_size": 224, "n_frms": 8}))
    out = proc(clip_path)
    assert out.shape == (3, 8, 224, 224) and out.dtype == torch.float32
    frames = load_video(clip_path, 8, 224, 224, backend="decord")  # the original's decoder
    expected = (frames / 255 - MEAN) / STD
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert torch.equal(proc(clip_path), out)  # deterministic
    assert torch.equal(proc.transform(frames), out)  # Chat path: transform on a loaded clip


def test_alpro_video_train_shapes_ranges_and_determinism(clip_path: Path) -> None:
    proc = load_processor("alpro_video_train", OmegaConf.create({"image_size": 32, "n_frms": 8}))
    random.seed(0)
    torch.manual_seed(0)
    a = proc(clip_path)
    random.seed(0)
    torch.manual_seed(0)
    b = proc(clip_path)
    assert a.shape == (3, 8, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    pixels = unnormalize_video(a)
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)  # uint8 levels
    assert pixels.min() > -0.01 and pixels.max() < 255.01
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    assert not torch.equal(proc(clip_path, generator=g1), proc(clip_path, generator=g2))


def test_alpro_video_train_casts_to_uint8_without_clamping() -> None:
    # A hard 0/255 edge: bicubic overshoots below 0 and above 255 next to it.
    clip = torch.zeros(3, 2, 40, 40)
    clip[:, :, :, 20:] = 255.0
    proc = load_processor("alpro_video_train", OmegaConf.create({"image_size": 64}))
    g = torch.Generator().manual_seed(0)
    out = proc.transform(clip, generator=g)
    top, left, h, w = T.random_resized_crop_params(40, 40, (0.5, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    resized = torch.nn.functional.interpolate(clip[..., top : top + h, left : left + w], size=(64, 64), mode="bicubic",
                                              align_corners=False)
    assert resized.min() < 0 and resized.max() > 255  # there is overshoot
    wrapped = resized.to(torch.uint8).float()
    clamped = resized.clamp(0, 255).to(torch.uint8).float()
    assert not torch.equal(wrapped, clamped)
    torch.testing.assert_close(unnormalize_video(out), wrapped, rtol=0, atol=1e-3)


def test_alpro_video_train_uses_headtail(clip_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_load_video(path, **kw):
        seen.update(kw)
        return torch.full((3, 4, kw["height"], kw["width"]), 128.0)

    import videollm.processors.video_processors as vp

    monkeypatch.setattr(vp, "load_video", fake_load_video)
    load_processor("alpro_video_train", OmegaConf.create({"image_size": 16, "n_frms": 4}))(clip_path)
    assert (seen["sampling"], seen["n_frms"], seen["height"], seen["width"]) == ("headtail", 4, 16, 16)
    load_processor("alpro_video_eval", OmegaConf.create({"image_size": 16, "n_frms": 4}))(clip_path)
    assert seen["sampling"] == "uniform"


# ----------------------------------------------------------------------------------------
# Image processors
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8))


def test_blip2_image_eval_is_a_bicubic_squash(image: Image.Image, tmp_path: Path) -> None:
    proc = load_processor("blip2_image_eval")
    out = proc(image)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    ref = np.asarray(image.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255
    expected = (torch.from_numpy(ref).permute(2, 0, 1) - MEAN[:, 0]) / STD[:, 0]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert torch.equal(proc(image), out)
    image.save(tmp_path / "im.png")
    assert torch.equal(proc(tmp_path / "im.png"), out)  # paths are opened
    assert proc(image.convert("L")).shape == (3, 224, 224)  # converted to RGB


def test_blip2_image_train_crop(image: Image.Image) -> None:
    proc = load_processor("blip2_image_train", OmegaConf.create({"image_size": 32}))
    a = proc(image, generator=torch.Generator().manual_seed(3))
    b = proc(image, generator=torch.Generator().manual_seed(3))
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    top, left, h, w = T.random_resized_crop_params(60, 100, (0.5, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(3))
    crop = image.crop((left, top, left + w, top + h)).resize((32, 32), Image.BICUBIC)
    expected = (torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255).permute(2, 0, 1) - MEAN[:, 0]) / STD[:, 0]
    torch.testing.assert_close(a, expected, rtol=0, atol=1e-6)
    pixels = (a * STD[:, 0] + MEAN[:, 0])
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5


def test_image_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\x00not an image" * 20)
    with pytest.raises(ImageDecodeError, match="corrupt.jpg: not a readable image"):
        load_processor("blip2_image_eval")(bad)
    with pytest.raises(ImageDecodeError, match="missing.jpg: no such file"):
        load_processor("blip2_image_eval")(tmp_path / "missing.jpg")


# ----------------------------------------------------------------------------------------
# Caption processor (quirk A5)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("A Dog. Running!! (fast) #tag: yes; ~ok*", "a dog running fast tag yes ok"),
        ('He said "Hi" to   everyone.', "he said hi to everyone"),
        ("  leading and trailing  \n", "leading and trailing"),
        ("tab\tstays single", "tab\tstays single"),  # only runs of 2+ whitespace collapse
        ("two \t mixed", "two mixed"),
        ("commas, dashes - and 'quotes' stay", "commas, dashes - and 'quotes' stay"),
        ("...", ""),
    ],
)
def test_blip_caption_cleaning(raw: str, expected: str) -> None:
    assert load_processor("blip_caption")(raw) == expected


def test_blip_caption_max_words_and_prompt() -> None:
    words = " ".join(f"w{i}" for i in range(60))
    assert load_processor("blip_caption")(words).split(" ") == [f"w{i}" for i in range(50)]
    proc = load_processor("blip_caption", OmegaConf.create({"prompt": "a picture of ", "max_words": 3}))
    assert proc("One Two Three Four") == "a picture of one two three"
