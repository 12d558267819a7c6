"""The model contract: a second architecture (tests/toy_vlm.py) trains, resumes, chats, streams,
answers in batch and evaluates through the same runner, Chat, CLI and infer code; no Video-LLaMA
attribute is used outside its model file; LoRA/QLoRA on the tiny Video-LLaMA."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import toy_vlm  # noqa: F401 - registers toy_vlm
from videollm.chat import Chat, new_conversation
from videollm.config import RunConfig, with_defaults
from videollm.models.base import VideoLLM
from videollm.registry import registry
from videollm.runners import RESUME_NAME, RunnerIter
from videollm.runners.metrics import read_log
from videollm.tasks import setup_task

REPO = Path(__file__).resolve().parents[1]
TINY_VL = REPO / "videollm/configs/models/video_llama_tiny.yaml"
WORDS = ("a red circle is moving left", "a blue square is moving up", "a green triangle is moving right",
         "a yellow circle is moving down", "What is moving in the video?", "Describe the video.", "USER ASSISTANT")
LLM = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
       "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 320, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from videollm.testing import write_tiny_bpe_tokenizer

    return write_tiny_bpe_tokenizer(tmp_path_factory.mktemp("tok"), style="gpt2", vocab_size=300, texts=WORDS * 20)


def toy_model_cfg(tokenizer_dir, **extra):
    return OmegaConf.create({"arch": "toy_vlm", "tokenizer": str(tokenizer_dir), "llm_config": LLM, **extra})


def webvid(root: Path, split_val: bool = False):
    info = {"anno_dir": str(root / "webvid/train"), "videos_dir": str(root / "videos")}
    if split_val:
        info["val_anno_dir"] = str(root / "webvid/test")
    proc = {"name": "alpro_video_eval", "image_size": 16, "n_frms": 2}
    return {"vis_processor": {"train": proc, "eval": proc}, "text_processor": {"train": {"name": "blip_caption"},
            "eval": {"name": "blip_caption"}}, "build_info": info}


def run_cfg(out: Path, tokenizer_dir, root: Path, **run):
    values = {"output_dir": str(out), "max_epoch": 1, "iters_per_epoch": 4, "batch_size_train": 2, "log_freq": 1,
              "init_lr": 3e-3, "min_lr": 3e-3, "warmup_steps": 0, "seed": 0, "num_workers": 0,
              "batch_size_eval": 4, "eval_max_new_tokens": 6}
    values.update(run)
    return OmegaConf.create({"model": toy_model_cfg(tokenizer_dir), "datasets": {"webvid": webvid(root, True)},
                             "run": with_defaults(values, RunConfig)})


def make_runner(cfg):
    torch.manual_seed(0)
    task = setup_task(cfg)
    model = task.build_model(cfg)
    return RunnerIter(cfg, task, model, task.build_datasets(cfg))


class Crash:
    def __init__(self, inner, after):
        self.inner, self.after, self.n = inner, after, 0

    def __next__(self):
        if self.n == self.after:
            raise RuntimeError("simulated crash")
        self.n += 1
        return next(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_toy_is_a_video_llm_with_no_video_llama_names(tokenizer_dir):
    model = registry.get_model_class("toy_vlm").from_config(toy_model_cfg(tokenizer_dir))
    assert isinstance(model, VideoLLM) and model.token_count == "per_frame"
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"vision_tower", "projector", "language_model"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= {"projector.0.weight"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("vision_tower."))


def test_toy_trains_resumes_exactly_and_evaluates(tmp_path, tokenizer_dir, synthetic_root):
    common = dict(max_epoch=2, iters_per_epoch=3, save_freq_iters=2, evaluate=True, eval_scorer="synthetic_attributes")
    full = make_runner(run_cfg(tmp_path / "full", tokenizer_dir, synthetic_root, **common))
    summary = full.train()
    losses = [r["loss"] for r in read_log(tmp_path / "full")]
    assert len(losses) == 6 and all(l == l for l in losses)
    results = full.evaluate()
    assert "webvid/val" in results and results["webvid/val"]["metrics"]["num_samples"] > 0
    assert (tmp_path / "full" / "eval_results.json").is_file()
    assert summary is not None
    # a crash after iteration 4, then auto-resume: the same losses and weights as uninterrupted
    cut_cfg = run_cfg(tmp_path / "cut", tokenizer_dir, synthetic_root, **common)
    first = make_runner(cut_cfg)
    first.train_loader = Crash(first.train_loader, 5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.train()
    assert (tmp_path / "cut" / RESUME_NAME).is_file()
    second = make_runner(OmegaConf.merge(cut_cfg, {"run": {"auto_resume": True}}))
    torch.manual_seed(99)
    second.train()
    assert [r["loss"] for r in read_log(tmp_path / "cut")] == losses
    for k, v in full.model.trainable_state_dict().items():
        assert torch.equal(second.model.trainable_state_dict()[k], v), k


@pytest.fixture(scope="module")
def toy_chat(tokenizer_dir):
    torch.manual_seed(0)
    model = registry.get_model_class("toy_vlm").from_config(toy_model_cfg(tokenizer_dir)).eval()
    return Chat(model)


def _clips(root: Path):
    manifest = json.loads((root / "manifest.json").read_text())
    return [str(root / v["path"]) for v in manifest["videos"][:3]], str(root / manifest["images"][0]["path"])


def test_toy_chats_streams_and_answers_in_batch(toy_chat, synthetic_root):
    clips, image = _clips(synthetic_root)
    convs, lists = [], []
    for clip in clips:
        conv, imgs = new_conversation("toy_chat", "video"), []
        toy_chat.upload_video_without_audio(clip, conv, imgs)
        toy_chat.ask("What is moving in the video?", conv)
        convs.append(conv)
        lists.append(imgs)
    assert convs[0].get_prompt().startswith("A chat. USER: <image>\nWhat is moving in the video?")
    single = []
    for conv, imgs in zip(convs, lists):
        c = conv.copy()
        single.append(toy_chat.answer(c, imgs, max_new_tokens=6)[1].tolist())
    batched = toy_chat.answer_batch([c.copy() for c in convs], lists, max_new_tokens=6)
    assert [ids.tolist() for _, ids in batched] == single
    c = convs[0].copy()
    streamed = "".join(toy_chat.stream_answer(c, lists[0], max_new_tokens=6))
    assert streamed == c.messages[-1][1]
    conv, imgs = new_conversation("toy_chat", "image"), []
    toy_chat.upload_img(image, conv, imgs)
    toy_chat.ask("What shape?", conv)
    text, _ = toy_chat.answer(conv, imgs, max_new_tokens=4)
    assert conv.messages[-1][1] == text and imgs[0].embeds.shape[1] == 4  # one frame of 2 x 2 patches


def _eval_config(tmp_path, tokenizer_dir) -> Path:
    path = tmp_path / "toy_eval.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create({"model": toy_model_cfg(tokenizer_dir), "run": {"task": "video_text_pretrain"}})))
    return path


def test_toy_through_cli_and_infer(tmp_path, tokenizer_dir, synthetic_root):
    from videollm import cli, infer

    clips, _ = _clips(synthetic_root)
    cfg = _eval_config(tmp_path, tokenizer_dir)
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--cfg-path", str(cfg), "--cpu", "--video", clips[0], "-q", "What is moving?",
                     "--max-new-tokens", "4"], out=out, err=err)
    assert code == 0 and out.getvalue().startswith("Q: What is moving?\nA: "), err.getvalue()
    requests = tmp_path / "q.jsonl"
    requests.write_text("".join(json.dumps({"id": i, "video": c, "question": "What is moving?"}) + "\n"
                                for i, c in enumerate(clips)))
    answers = tmp_path / "a.jsonl"
    code = infer.main(["--cfg-path", str(cfg), "--cpu", "--input", str(requests), "--output", str(answers),
                       "--max-new-tokens", "4"])
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert code == 0 and [r["id"] for r in rows] == [0, 1, 2] and all("answer" in r for r in rows)


# ------------------------------------------------------------------ no Video-LLaMA names outside its file
VIDEO_LLAMA_NAMES = ("llama_tokenizer", "encode_videoQformer_visual", "encode_audioQformer", "llama_model",
                     "train_flag", "autocast_dtype", "prompt_list", "prompt_wrap", "equip_audio_branch",
                     "llama_proj", "video_Qformer", "num_video_query_token", "IMAGE_PATCH_TOKEN_ID",
                     "encode_visual_for_training", "caption_inputs", "instruct_inputs", "end_sym",
                     "visual_encoder", "ln_vision", "audio_encoder", "Qformer", "query_tokens")
CONTRACT_USERS = ("videollm/chat.py", "videollm/evaluation.py", "videollm/convert.py", "videollm/runners",
                  "videollm/tasks", "videollm/infer.py", "videollm/cli.py", "videollm/demo_app.py")


def _attribute_uses(source: str) -> set:
    """Names used as attributes (``x.name``) or as ``getattr``/``hasattr``/``setattr`` strings in code
    (docstrings and comments, which may name config keys, are not code)."""
    import ast

    used = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            used.add(node.args[1].value)
    return used


def test_no_video_llama_attribute_outside_its_model_file():
    files = []
    for entry in CONTRACT_USERS:
        p = REPO / entry
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    offenders = []
    for path in files:
        used = _attribute_uses(path.read_text())
        offenders += [f"{path.relative_to(REPO)}: .{name}" for name in VIDEO_LLAMA_NAMES if name in used]
    assert offenders == []
    # the checker itself sees attribute uses
    assert {"llama_model", "train_flag"} <= _attribute_uses("m.llama_model.x\ngetattr(m, 'train_flag', 0)")


# ------------------------------------------------------------------ LoRA / QLoRA on the tiny Video-LLaMA
def _vl(**overrides):
    cfg = OmegaConf.load(TINY_VL).model
    for k, v in overrides.items():
        cfg[k] = v
    torch.manual_seed(0)
    return registry.get_model_class("video_llama").from_config(cfg)


LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _caption_batch():
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(2, 3, 4, 32, 32, generator=g), "text_input": ["a red circle", "a blue square moving up"]}


def test_video_llama_lora_trains_only_adapters_and_connector(tmp_path):
    from videollm.models.lora import load_adapter, merge_lora, save_adapter

    model = _vl(lora=LORA, freeze_llm=True)
    model.train()
    out = model(_caption_batch())
    out["loss"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    lora = {n for n in with_grad if ".lora_" in n}
    connector = {n for n in with_grad if n.startswith(("video_Qformer.", "video_query_tokens", "llama_proj.",
                                                       "video_frame_position_embedding."))}
    assert lora and with_grad == lora | connector
    n_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert n_lora == 2 * 2 * (4 * 64 + 64 * 4)  # 2 layers x (q, v) x (A + B)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    save_adapter(model, model.llm_attr, tmp_path / "adapter")
    model.eval()
    inputs = model.caption_inputs(_caption_batch())
    ref = model.llama_model(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"]).logits
    fresh = _vl(lora=LORA, freeze_llm=True).eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k}, strict=False)
    load_adapter(fresh, fresh.llm_attr, tmp_path / "adapter")
    again = fresh.llama_model(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(again, ref, rtol=0, atol=1e-6)
    merge_lora(model, model.llm_attr)
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    merged = model.llama_model(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"]).logits
    assert (merged - ref).abs().max() < 1e-5


def test_video_llama_qlora_trains_a_few_steps_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    from videollm.testing import write_tiny_llm

    folder = write_tiny_llm(tmp_path / "llm", "llama", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                            intermediate_size=128, max_positions=512)
    model = _vl(llama_model=str(folder), llm_config={}, load_in_4bit=True, llm_dtype="fp32", lora=LORA,
                freeze_llm=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    losses = []
    for _ in range(3):
        loss = model(_caption_batch())["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(l == l and l < 1e4 for l in losses)
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_B" in n)
    assert any("4bit" in type(m).__name__.lower() or "Linear4bit" in type(m).__name__ for m in model.llama_model.modules())


def test_full_state_dict_loads_strictly_with_only_documented_tolerated_keys():
    from videollm.errors import CheckpointError
    from videollm.models.base import WeightSource

    model = _vl(equip_audio_branch=True)
    state = model.state_dict()
    fresh = _vl(equip_audio_branch=True)
    fresh.load_state_dict(state, strict=True)  # every key of the model, nothing else
    missing, unexpected = fresh.load_weights(dict(state), WeightSource("full.pth"), strict=True)
    assert missing == [] and unexpected == []
    tolerated = dict(state, **{"llama_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)})
    _, unexpected = fresh.load_weights(tolerated, WeightSource("old.pth"), strict=True)
    assert unexpected == ["llama_model.model.layers.0.self_attn.rotary_emb.inv_freq"]
    with pytest.raises(CheckpointError, match="not_a_key"):
        fresh.load_weights(dict(state, not_a_key=torch.zeros(1)), WeightSource("bad.pth"), strict=True)
    partial = {k: v for k, v in state.items() if not k.startswith("llama_proj.")}
    with pytest.raises(CheckpointError, match="llama_proj"):
        fresh.load_weights(partial, WeightSource("branch.pth", provides=("llama_proj.",)), strict=True)


def test_validation_every_epoch_keeps_the_best_checkpoint(tmp_path, tokenizer_dir, synthetic_root):
    import json as _json

    cfg = run_cfg(tmp_path / "v", tokenizer_dir, synthetic_root, max_epoch=2, iters_per_epoch=2,
                  valid_every_epoch=True, keep_best_by="color_accuracy", keep_last_checkpoints=1)
    runner = make_runner(cfg)
    runner.train()
    out = tmp_path / "v"
    assert (out / "eval_epoch_0" / "eval_results.json").is_file() and (out / "eval_epoch_1" / "eval_results.json").is_file()
    best = _json.loads((out / "best.json").read_text())
    assert best["metric"] == "color_accuracy" and best["epoch"] in (0, 1)
    assert (out / "checkpoint_best.pth").is_file() and (out / "checkpoint_1.pth").is_file()
    assert not (out / "checkpoint_0.pth").exists()  # pruned (keep 1); the best is never pruned
