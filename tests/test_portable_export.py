"""Exports for transformers users and other machines: every registered chat template has a Jinja
form that renders exactly our prompt (transformers' apply_chat_template), the exported tokenizer
carries it, and an exported folder moved to another directory still loads and answers."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toy_vlm  # noqa: E402,F401 - registers the toy_chat template

import videollm.models  # noqa: E402,F401 - every model registers its templates
from videollm import convert  # noqa: E402
from videollm.templates import TEMPLATES, chat_template_jinja, prompt_of_messages  # noqa: E402

CASES = [
    [{"role": "user", "content": "<image>\nWhat is in the video?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
     {"role": "user", "content": "And now?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
     {"role": "assistant", "content": "A1"}],
    [{"role": "user", "content": "Q1 ünïcode \"quoted\"\n{{ not jinja }}"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from videollm.testing import write_tiny_bpe_tokenizer

    folder = write_tiny_bpe_tokenizer(tmp_path_factory.mktemp("tok"), style="gpt2", vocab_size=280,
                                      texts=["hello world"] * 10)
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_jinja_chat_template_renders_our_prompt(name, hf_tokenizer):
    hf_tokenizer.chat_template = chat_template_jinja(name)
    checked = 0
    for messages in CASES:
        for gen in (True, False):
            try:
                want = prompt_of_messages(name, messages, gen)
            except Exception:  # noqa: BLE001 - a conversation this template refuses (e.g. llama_v2 rules)
                continue
            got = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert got == want, (name, messages, gen)
            checked += 1
    assert checked >= 6


def test_chat_template_of_the_vicuna_template_reads_as_expected():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    t = ImmutableSandboxedEnvironment().from_string(chat_template_jinja("vicuna"))
    out = t.render(messages=[{"role": "user", "content": "<Video><ImageHere></Video> Hi"}], add_generation_prompt=True)
    assert out == "###Human: <Video><ImageHere></Video> Hi###Assistant:"


def _eval_cfg(tmp_path: Path) -> Path:
    from videollm.models.video_llama import VideoLLAMA

    torch.manual_seed(1)
    tiny = OmegaConf.load(Path(convert.__file__).parent / "configs/models/video_llama_tiny.yaml").model
    model = VideoLLAMA.from_config(tiny)
    torch.save({"model": model.trainable_state_dict(), "epoch": 0}, tmp_path / "vl.pth")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("model:\n  arch: video_llama\n  model_type: tiny\n"
                   f"  ckpt: {tmp_path / 'vl.pth'}\n  max_txt_len: 64\n"
                   "datasets:\n  webvid:\n    vis_processor:\n      train: {name: alpro_video_eval, n_frms: 4, image_size: 32}\n"
                   "    text_processor:\n      train: {name: blip_caption}\nrun:\n  task: video_text_pretrain\n")
    return cfg


def _answer(cfg_path: Path, clip: Path) -> str:
    from videollm.chat import add_generation_args, add_model_args, build_chat_from_args, new_conversation

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    add_generation_args(parser)
    chat, template, _ = build_chat_from_args(parser.parse_args(["--cfg-path", str(cfg_path), "--cpu"]))
    conv, imgs = new_conversation(template, "video"), []
    chat.upload_video(str(clip), conv, imgs)
    chat.ask("What is moving?", conv)
    text, ids = chat.answer(conv, imgs, max_new_tokens=8, do_sample=False, min_length=8)
    return text, ids.tolist()


@pytest.mark.slow
def test_exported_folder_moved_elsewhere_still_serves(tmp_path):
    from transformers import AutoTokenizer

    from videollm import synthetic

    clip = tmp_path / "clip.mp4"
    spec = synthetic.ClipSpec(name="c", shape="square", color="red", direction="up", speed="slow", seed=3)
    synthetic.write_clip(clip, spec, width=32, height=32, fps=8, duration=1.0)
    torch.manual_seed(0)
    out_cfg = convert.export_folder(_eval_cfg(tmp_path), tmp_path / "a" / "export")
    model = OmegaConf.load(out_cfg).model
    assert str(tmp_path) not in OmegaConf.to_yaml(model)  # no absolute path left in the model section
    for key in ("llama_model", "tokenizer", "ckpt", "vit_ckpt", "q_former_model"):
        assert model[key].startswith("./"), (key, model[key])
    before = _answer(out_cfg, clip)

    moved = tmp_path / "elsewhere" / "deeper" / "served"
    moved.parent.mkdir(parents=True)
    shutil.move(str(tmp_path / "a" / "export"), str(moved))
    shutil.rmtree(tmp_path / "a")
    (tmp_path / "vl.pth").unlink()  # nothing outside the folder is needed any more
    after = _answer(moved / "config.yaml", clip)
    assert after == before and len(after[1]) == 8

    # the exported tokenizer carries the chat template, for transformers users
    tok_dir = moved / "tokenizer"
    assert (tok_dir / "chat_template.jinja").read_text() == chat_template_jinja("vicuna")
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    msgs = [{"role": "user", "content": "Hi"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        prompt_of_messages("vicuna", msgs, True)


def test_load_config_resolves_dot_paths_from_the_config_folder(tmp_path, monkeypatch):
    from videollm.config import load_config

    folder = tmp_path / "exported"
    folder.mkdir()
    cfg = folder / "config.yaml"
    cfg.write_text("model:\n  arch: video_llama\n  model_type: tiny\n  ckpt: ./adapter.safetensors\n"
                   "  llama_model: ../shared/llm\n  prompt_path: prompts/alignment_image.txt\n")
    monkeypatch.chdir(tmp_path)  # the working directory does not matter for ./ paths
    m = load_config(cfg).model
    assert m.ckpt == str(folder / "adapter.safetensors")
    assert m.llama_model == str(tmp_path / "shared" / "llm")
    assert m.prompt_path == "prompts/alignment_image.txt"  # other relative paths keep their meaning


@pytest.mark.slow
def test_video_llava_save_pretrained_carries_its_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from videollm.registry import registry

    cfg = OmegaConf.load(Path(convert.__file__).parent / "configs/models/video_llava_tiny.yaml").model
    model = registry.get_model_class("video_llava").from_config(cfg)
    out = model.save_pretrained(tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "<video>\nWhat happens?"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        prompt_of_messages(model.default_template, msgs, True)
