"""The on-the-fly synthetic clip dataset (builder ``synthetic_clips``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from videollm import synthetic
from videollm.datasets import build_train_loader
from videollm.errors import ConfigError
from videollm.evaluation import parse_attributes
from videollm.processors.video_loader import load_video
from videollm.registry import registry

PROC = {"train": {"name": "alpro_video_train", "image_size": 32, "n_frms": 4, "sampling": "uniform", "min_scale": 1.0},
        "eval": {"name": "alpro_video_eval", "image_size": 32, "n_frms": 4}}


def build(**build_info):
    cfg = OmegaConf.create({"vis_processor": PROC, "text_processor": {"train": {"name": "blip_caption"}},
                            "build_info": build_info})
    return registry.get_builder_class("synthetic_clips").from_config(cfg, merge_defaults=True).build_datasets()


def test_samples_are_deterministic_and_captions_match_the_drawn_attributes():
    ds = build(num_clips=50, seed=3)["train"]
    assert len(ds) == 50
    a, b = ds[7], ds[7]
    assert torch.equal(a["image"], b["image"]) and a["text_input"] == b["text_input"]
    assert a["image"].shape == (3, 4, 32, 32) and a["type"] == "video"
    spec = ds.spec(7)
    assert parse_attributes(a["text_input"]) == {"shape": spec.shape, "color": spec.color, "direction": spec.direction}
    # another seed gives other clips
    other = build(num_clips=50, seed=4)["train"]
    assert any(other.spec(i) != ds.spec(i) for i in range(10))
    with pytest.raises(IndexError, match="out of range"):
        ds[50]


def test_every_attribute_value_occurs():
    ds = build(num_clips=400)["train"]
    specs = [ds.spec(i) for i in range(400)]
    assert {s.shape for s in specs} == set(synthetic.SHAPES)
    assert {s.color for s in specs} == set(synthetic.COLORS)
    assert {s.direction for s in specs} == set(synthetic.DIRECTIONS)
    assert {s.speed for s in specs} == set(synthetic.SPEEDS)


def test_rendered_frames_match_the_same_clip_decoded_from_a_file(tmp_path):
    ds = build(num_clips=10)["train"]
    spec = ds.spec(2)
    path = tmp_path / "clip.mp4"
    synthetic.write_clip(path, spec, width=64, height=64, fps=8, duration=2.0, seed=spec.seed)
    decoded = load_video(path, n_frms=4, height=32, width=32, sampling="uniform")  # (3, T, 32, 32) 0..255
    rendered = ds.frames(2)
    assert rendered.shape == decoded.shape
    # H.264 and the decoder's own resize filter differ a little; the picture is the same.
    assert (rendered - decoded).abs().mean() < 6.0
    # the shape is where the file says it is in every frame
    for t in range(4):
        fg_r = (rendered[:, t] - rendered[:, t, :1, :1]).abs().sum(0) > 60
        fg_d = (decoded[:, t] - decoded[:, t, :1, :1]).abs().sum(0) > 60
        inter, union = (fg_r & fg_d).sum().item(), (fg_r | fg_d).sum().item()
        assert union > 0 and inter / union > 0.7


def test_the_shape_moves_the_captioned_way():
    ds = build(num_clips=40)["train"]
    ys, xs = np.mgrid[0:32, 0:32]
    for i in range(40):
        spec, frames = ds.spec(i), ds.frames(i)
        fg = [((frames[:, t] - frames[:, t, :1, :1]).abs().sum(0) > 60).numpy() for t in (0, 3)]
        cx = [float(xs[m].mean()) for m in fg]
        cy = [float(ys[m].mean()) for m in fg]
        dx, dy = synthetic.DIRECTION_VECTORS[spec.direction]
        moved = (cx[1] - cx[0]) if dx else (cy[1] - cy[0])
        assert moved * (dx or dy) > 0, (i, spec, cx, cy)


def test_val_split_reads_held_out_files_and_the_loader_batches_train(synthetic_root):
    splits = build(num_clips=16, val_anno_dir=str(synthetic_root / "webvid/test"), videos_dir=str(synthetic_root / "videos"))
    assert len(splits["val"]) > 0 and splits["val"][0]["image"].shape == (3, 4, 32, 32)
    loader = build_train_loader({"synthetic_clips": splits["train"]}, batch_size=4, num_workers=0, seed=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 4, 32, 32) and len(batch["text_input"]) == 4


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="num_clips"):
        build(num_clips=0)
    with pytest.raises(ConfigError, match="width=63"):
        build(width=63)
    with pytest.raises(ConfigError, match="videos_dir"):
        build(val_anno_dir="somewhere")
