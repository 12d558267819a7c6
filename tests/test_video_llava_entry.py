"""Video-LLaVA through the existing entry points: the CLI (4-bit on the CPU), batch inference
with a mixed video/image batch, and the training runner's loader path (llava_json + the
model's batch processor)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import videollm.models  # noqa: F401
from videollm.config import PACKAGE_DIR
from videollm.models.video_llava import VideoLLaVA

CFG = str(PACKAGE_DIR.parent / "eval_configs/video_llava_tiny.yaml")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Video-LLaVA saved as a transformers folder, plus a clip and an image."""
    from PIL import Image

    from videollm import synthetic

    root = tmp_path_factory.mktemp("vl")
    cfg = OmegaConf.to_container(OmegaConf.load(PACKAGE_DIR / "configs/models/video_llava_tiny.yaml").model)
    torch.manual_seed(0)
    VideoLLaVA.from_config(cfg).save_pretrained(root / "model")
    spec = synthetic.ClipSpec(name="c", shape="triangle", color="green", direction="down", speed="fast", seed=2)
    synthetic.write_clip(root / "clip.mp4", spec, width=40, height=40, fps=8, duration=2.0)
    Image.fromarray(np.full((36, 44, 3), 90, dtype=np.uint8)).save(root / "img.png")
    (root / "eval.yaml").write_text(
        f"model:\n  arch: video_llava\n  model_type: tiny\n  model_path: {root / 'model'}\nrun:\n  task: instruction_tuning\n")
    return root


@pytest.mark.slow
def test_cli_4bit(folder):
    pytest.importorskip("bitsandbytes")
    from videollm import cli

    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(["--cfg-path", str(folder / "eval.yaml"), "--cpu", "--load-in-4bit", "--video",
                   str(folder / "clip.mp4"), "-q", "What is moving in the video?", "--max-new-tokens", "4"],
                  out=out, err=err)
    assert rc == 0, err.getvalue()
    assert "error" not in err.getvalue().lower()


def test_cli_eval_config_parses():
    """The shipped eval config builds (random weights before training: a notice says so)."""
    from videollm.chat import add_model_args, build_chat_from_args
    import argparse

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    chat, template, notices = build_chat_from_args(parser.parse_args(["--cfg-path", CFG, "--cpu", "--ckpt", ""]))
    assert template == "vicuna_v1" and isinstance(chat.model, VideoLLaVA)
    assert chat.model.hf.config.vision_config.hidden_size == 64  # the recipe's towers


@pytest.mark.slow
def test_infer_mixed_batch(folder, tmp_path):
    from videollm import infer

    lines = [{"video": str(folder / "clip.mp4"), "question": "What is moving in the video?"},
             {"image": str(folder / "img.png"), "question": "What shape is in the image?"},
             {"video": str(folder / "missing.mp4"), "question": "?"}]
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc = infer.main(["--cfg-path", str(folder / "eval.yaml"), "--cpu", "--input", str(src), "--output",
                     str(tmp_path / "a.jsonl"), "--max-new-tokens", "4"], err=io.StringIO())
    records = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert rc == 1  # one failed line
    assert "answer" in records[0] and "answer" in records[1] and "missing.mp4" in records[2]["error"]


@pytest.mark.slow
def test_qlora_trains_on_4bit_decoder(folder):
    """QLoRA: a 4-bit decoder (bitsandbytes, CPU) with LoRA adapters trains; the towers stay full precision."""
    pytest.importorskip("bitsandbytes")
    from videollm.models.base import Media

    cfg = OmegaConf.to_container(OmegaConf.load(PACKAGE_DIR / "configs/models/video_llava_tiny.yaml").model)
    q = VideoLLaVA.from_config({**cfg, "model_path": str(folder / "model"), "load_in_4bit": True,
                                "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})
    q.train()
    ids = q.tokenizer("USER: <video>\nWhat? ASSISTANT: A red circle.</s>", return_tensors="pt")["input_ids"][0]
    out = q({"input_ids": [ids], "labels": [ids.clone()], "media": [[Media("video", torch.randn(3, 8, 32, 32))]]})
    out["loss"].backward()
    lora = [p for n, p in q.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert not any(p.requires_grad for n, p in q.named_parameters() if "_tower." in n)
    assert q.hf.model.image_tower.encoder.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_export_command_writes_a_transformers_folder(folder, tmp_path, capsys):
    from transformers import VideoLlavaForConditionalGeneration

    from videollm.models import video_llava

    assert video_llava.main(["export", "--cfg-path", str(folder / "eval.yaml"), "--out", str(tmp_path / "x")]) == 0
    hf = VideoLlavaForConditionalGeneration.from_pretrained(str(tmp_path / "x"))
    src = VideoLlavaForConditionalGeneration.from_pretrained(str(folder / "model"))
    for (k, a), (_, b) in zip(sorted(hf.state_dict().items()), sorted(src.state_dict().items())):
        assert torch.equal(a, b), k
    assert (tmp_path / "x" / "tokenizer_config.json").is_file()
