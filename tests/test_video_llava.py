"""Video-LLaVA (arch video_llava) against transformers' own VideoLlavaForConditionalGeneration:
logits and greedy tokens of our merge path, both checkpoint layouts, saving, processing,
prompts and label masks, freeze plans, LoRA merge, 8-bit loading, the llava_json builder,
and the full-size (7B) layout on the meta device."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import videollm.models  # noqa: F401 - registers the models
from videollm.config import PACKAGE_DIR
from videollm.models.base import Media
from videollm.models.video_llava import (
    KEY_RENAMES,
    VideoLLaVA,
    VideoLLaVAProcessor,
    clip_preprocess,
    linspace_indices,
)
from videollm.templates import get_template

TINY = PACKAGE_DIR / "configs/models/video_llava_tiny.yaml"


def tiny_cfg(**overrides):
    cfg = OmegaConf.to_container(OmegaConf.load(TINY).model, resolve=True)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VideoLLaVA.from_config(tiny_cfg()).eval()


def legacy_key(key: str) -> str:
    """transformers 5 name -> the published -hf layout (written independently of KEY_RENAMES)."""
    key = re.sub(r"^model\.language_model\.", "language_model.model.", key)
    key = re.sub(r"^lm_head\.", "language_model.lm_head.", key)
    key = re.sub(r"^model\.(image|video)_tower\.", r"\1_tower.vision_model.", key)
    return re.sub(r"^model\.multi_modal_projector\.", "multi_modal_projector.", key)


def write_legacy_folder(hf_model, tokenizer, out):
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {legacy_key(k): v.contiguous() for k, v in hf_model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_model.config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out, state


def media_batch(seed=0, size=32, frames=8):
    g = torch.Generator().manual_seed(seed)
    video = Media("video", torch.randn(3, frames, size, size, generator=g))
    image = Media("image", torch.randn(3, size, size, generator=g))
    return video, image


def hf_inputs(model, prompts, media):
    """transformers' processor form of prompts: expanded placeholders, left padding, pixel tensors."""
    proc = model.batch_processor()
    tok = model.tokenizer
    rows = [proc.expand(tok(p, return_tensors="pt")["input_ids"][0], ms, model.patches) for p, ms in zip(prompts, media)]
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):] = r
        mask[i, longest - len(r):] = 1
    flat = [m for ms in media for m in ms]
    images = [m.data for m in flat if m.kind == "image"]
    videos = [m.data.permute(1, 0, 2, 3) for m in flat if m.kind == "video"]
    kw = {"input_ids": ids, "attention_mask": mask}
    if images:
        kw["pixel_values"] = torch.stack(images)
    if videos:
        kw["pixel_values_videos"] = torch.stack(videos)
    return kw


PROMPT_V = "USER: <video>\nWhat is moving in the video? ASSISTANT:"
PROMPT_I = "USER: <image>\nWhat shape is in the image? ASSISTANT:"


def our_ids(model, prompt):
    return model.tokenizer(prompt, return_tensors="pt")["input_ids"][0]


@pytest.mark.parametrize("which", ["video", "image", "mixed"])
def test_logits_equal_transformers(model, which):
    video, image = media_batch()
    if which == "video":
        prompts, media = [PROMPT_V], [[video]]
    elif which == "image":
        prompts, media = [PROMPT_I], [[image]]
    else:  # a left-padded batch: a video sample, an image sample, and one with both
        prompts = [PROMPT_V, PROMPT_I, "USER: <image>\nA shape. USER: <video>\nAnd here? ASSISTANT:"]
        media = [[video], [image], [image, video]]
    ours, mask = model.logits([our_ids(model, p) for p in prompts], media, padding_side="left")
    with torch.no_grad():
        ref = model.hf(**hf_inputs(model, prompts, media)).logits
    assert ours.shape == ref.shape
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-4, rtol=0)
    if which == "mixed":  # the rows really are padded differently
        assert (mask.sum(1) != mask.shape[1]).any()


def test_greedy_tokens_equal_transformers(model):
    video, image = media_batch(1)
    prompts, media = [PROMPT_V, PROMPT_I], [[video], [image]]
    merged = model.build_inputs([our_ids(model, p) for p in prompts], media, padding_side="left")
    ours = model.generate(merged.inputs_embeds, merged.attention_mask, max_new_tokens=8, do_sample=False,
                          min_new_tokens=8)
    kw = hf_inputs(model, prompts, media)
    with torch.no_grad():
        ref = model.hf.generate(**kw, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                pad_token_id=model.tokenizer.pad_token_id)
    assert torch.equal(ours, ref[:, kw["input_ids"].shape[1]:])
    # the evaluation harness's caption prompt: a batch of clips, left-padded
    embeds, mask = model.generation_inputs({"image": torch.stack([video.data, video.data])})
    assert embeds.shape[:2] == mask.shape and embeds.shape[1] > model.num_media_tokens(video)


def test_chat_prompt_and_answer_equal_transformers(model, tmp_path):
    from videollm import synthetic
    from videollm.chat import Chat

    spec = synthetic.ClipSpec(name="c", shape="circle", color="red", direction="left", speed="fast", seed=3)
    path = tmp_path / "clip.mp4"
    synthetic.write_clip(path, spec, width=48, height=40, fps=8, duration=2.0)
    chat = Chat(model)
    conv = get_template(model.default_template).new_conversation()
    imgs = []
    chat.upload_video_without_audio(str(path), conv, imgs)
    chat.ask("What is moving in the video?", conv)
    text, ids = chat.answer(conv, imgs, max_new_tokens=6, min_length=1)
    assert conv.get_prompt().startswith(PROMPT_V)
    medium = imgs[0].media
    assert tuple(medium.data.shape) == (3, 8, 32, 32)
    kw = hf_inputs(model, [PROMPT_V], [[medium]])
    with torch.no_grad():
        ref = model.hf.generate(**kw, max_new_tokens=6, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    ref_new = ref[0, kw["input_ids"].shape[1]:].tolist()
    assert list(ids) == ref_new[:len(ids)] and len(ids) >= 1
    # multi-turn as transformers documents it
    chat.ask("Which direction?", conv)
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == f"{PROMPT_V} {text} USER: Which direction? ASSISTANT:"


def test_both_layouts_load_and_our_save_loads_in_transformers(model, tmp_path):
    from transformers import VideoLlavaForConditionalGeneration

    video, image = media_batch(2)
    prompts, media = [PROMPT_V, PROMPT_I], [[video], [image]]
    ids = [our_ids(model, p) for p in prompts]
    want, mask = model.logits(ids, media)
    keep = mask.bool()
    # the published -hf layout: language_model.model.*, image_tower.vision_model.*, ...
    legacy, state = write_legacy_folder(model.hf, model.tokenizer, tmp_path / "legacy")
    assert "language_model.model.embed_tokens.weight" in state and "language_model.lm_head.weight" in state
    assert "image_tower.vision_model.embeddings.patch_embedding.weight" in state
    assert "video_tower.vision_model.post_layernorm.weight" in state
    assert "multi_modal_projector.linear_2.bias" in state
    a = VideoLLaVA.from_config(tiny_cfg(model_path=str(legacy), tokenizer=str(legacy))).eval()
    torch.testing.assert_close(a.logits(ids, media)[0][keep], want[keep], atol=1e-5, rtol=0)
    # transformers 5's own save_pretrained layout
    model.hf.save_pretrained(str(tmp_path / "tf5"))
    b = VideoLLaVA.from_config(tiny_cfg(model_path=str(tmp_path / "tf5"))).eval()
    torch.testing.assert_close(b.logits(ids, media)[0][keep], want[keep], atol=1e-5, rtol=0)
    # ours -> transformers
    model.save_pretrained(tmp_path / "ours")
    ref = VideoLlavaForConditionalGeneration.from_pretrained(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        got = ref(**hf_inputs(model, prompts, media)).logits
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=0)
    # a bare state dict in the legacy names loads through our checked loader too
    c = VideoLLaVA.from_config(tiny_cfg()).eval()
    c.load_weights(state, "legacy.safetensors")
    torch.testing.assert_close(c.logits(ids, media)[0][keep], want[keep], atol=1e-5, rtol=0)


def test_full_size_meta_layout_and_parameter_count():
    """The 7B preset (the published config.json values) against what transformers builds."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    hf_cfg = OmegaConf.to_container(OmegaConf.load(PACKAGE_DIR / "configs/models/video_llava_7b.yaml").model.hf_config)
    with torch.device("meta"):
        ours = VideoLLaVA._build(VideoLLaVA.config_schema(**{"hf_config": hf_cfg, "dtype": "fp16"}))
        ref = VideoLlavaForConditionalGeneration(VideoLlavaConfig(
            text_config={"model_type": "llama", "vocab_size": 32064, "pad_token_id": 32002,
                         "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}))  # vision: the ViT-L/14 default
    shapes = {legacy_key(k): tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {legacy_key(k): tuple(v.shape) for k, v in ref.state_dict().items()}
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    lm = sum(p.numel() for n, p in ours.named_parameters() if "language_model" in n or n.startswith("lm_head"))
    assert lm == 6_738_415_616 + 2 * 64 * 4096  # LLaMA-7B with 64 more vocabulary rows (32064)
    assert 7.3e9 < count < 7.4e9
    expect = {
        "language_model.model.embed_tokens.weight": (32064, 4096),
        "language_model.lm_head.weight": (32064, 4096),
        "language_model.model.layers.31.mlp.gate_proj.weight": (11008, 4096),
        "language_model.model.norm.weight": (4096,),
        "image_tower.vision_model.embeddings.class_embedding": (1024,),
        "image_tower.vision_model.embeddings.patch_embedding.weight": (1024, 3, 14, 14),
        "image_tower.vision_model.embeddings.position_embedding.weight": (257, 1024),
        "image_tower.vision_model.encoder.layers.23.mlp.fc1.weight": (4096, 1024),
        "video_tower.vision_model.encoder.layers.23.mlp.fc2.weight": (1024, 4096),
        "video_tower.vision_model.pre_layrnorm.weight": (1024,),
        "multi_modal_projector.linear_1.weight": (4096, 1024),
        "multi_modal_projector.linear_2.weight": (4096, 4096),
    }
    for key, shape in expect.items():
        assert shapes[key] == shape, key
    assert not any(k.startswith("language_model.model.layers.32") for k in shapes)
    # every -hf key maps back onto ours through KEY_RENAMES
    for key in list(shapes)[:50] + list(expect):
        new = key
        for pat, rep in KEY_RENAMES:
            if re.sub(pat, rep, key) != key:
                new = re.sub(pat, rep, key)
                break
        assert legacy_key(new[len("video_llava."):]) == key


def test_clip_preprocess_equals_transformers_image_processors():
    from transformers import VideoLlavaImageProcessor

    try:
        from transformers import CLIPImageProcessorPil as CLIPProc
    except ImportError:  # older transformers: the PIL one is CLIPImageProcessor
        from transformers import CLIPImageProcessor as CLIPProc
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(3, 180, 260, 3), dtype=np.uint8)
    ours = clip_preprocess(frames, 224)
    assert ours.shape == (3, 3, 224, 224)
    clip = CLIPProc()(images=list(frames), return_tensors="pt")["pixel_values"]
    vl = VideoLlavaImageProcessor()(images=list(frames), return_tensors="pt",
                                    return_legacy_image_output=False)["pixel_values"]
    torch.testing.assert_close(ours, clip, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, vl, atol=1e-5, rtol=0)
    tall = rng.integers(0, 256, size=(1, 300, 200, 3), dtype=np.uint8)
    torch.testing.assert_close(clip_preprocess(tall, 224), CLIPProc()(images=list(tall), return_tensors="pt")["pixel_values"],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(clip_preprocess(frames, 224, flip=True), ours.flip(-1))
    assert linspace_indices(100, 8) == [0, 14, 28, 42, 56, 70, 84, 99]
    assert linspace_indices(4, 8) == [0, 0, 0, 1, 1, 2, 2, 3]


def test_placeholder_expansion_full_size_counts(model):
    proc = model.batch_processor()
    tok = model.tokenizer
    ids = tok("USER: <image>\nA? ASSISTANT: B</s>USER: <video>\nC? ASSISTANT:", return_tensors="pt")["input_ids"][0]
    video8 = Media("video", torch.zeros(3, 8, 1, 1))
    full = proc.expand(ids, [Media("image", torch.zeros(3, 1, 1)), video8], patches=256)
    assert int((full == model.image_token_id).sum()) == 256
    assert int((full == model.video_token_id).sum()) == 257 * 8 == 2056
    tiny = proc.expand(ids, [Media("image", torch.zeros(3, 1, 1)), video8], patches=model.patches)
    assert int((tiny == model.video_token_id).sum()) == model.num_media_tokens(video8) == 17 * 8


def test_llava_v1_label_mask_supervises_only_answers(model):
    proc = model.batch_processor()
    turns = [{"from": "human", "value": "<video>\nWhat is moving?"}, {"from": "gpt", "value": "A red circle."},
             {"from": "human", "value": "Which way?"}, {"from": "gpt", "value": "It is moving left."}]
    text, _ = proc.prompt(turns)
    system = get_template("vicuna_v1").conversation.system
    assert text == (system + " USER: <video>\nWhat is moving? ASSISTANT: A red circle.</s>"
                    "USER: Which way? ASSISTANT: It is moving left.</s>")
    ids, labels = proc.tokenize(turns)
    tok = model.tokenizer
    kept = ids[labels != -100]
    assert tok.decode(kept).replace(" ", "") == "Aredcircle.</s>Itismovingleft.</s>"
    assert int((ids == tok.eos_token_id).sum()) == 2 and bool((labels[ids == tok.eos_token_id] != -100).all())
    assert labels[0] == -100 and bool((labels[ids == model.video_token_id] == -100).all())


def test_mixed_batch_trains_and_freeze_plans(model):
    rng = np.random.default_rng(1)
    batch = {
        "conversations": [
            [{"from": "human", "value": "<video>\nWhat is moving?"}, {"from": "gpt", "value": "A red circle."}],
            [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "A square."}],
            [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}],  # media missing: bad
        ],
        "media": [[{"kind": "video", "frames": rng.integers(0, 256, (20, 40, 48, 3), dtype=np.uint8)}],
                  [{"kind": "image", "frames": rng.integers(0, 256, (1, 40, 40, 3), dtype=np.uint8)}], []],
        "paths": ["a.mp4", "b.jpg", "c.jpg"],
    }
    out = model.batch_processor()(batch)
    assert out["num_samples"] == 2 and out["bad_samples"] == [("c.jpg", "bad_annotation")]
    assert tuple(out["media"][0][0].data.shape) == (3, 8, 32, 32)
    m = VideoLLaVA.from_config(tiny_cfg(lora={"r": 4, "alpha": 8, "dropout": 0.0}))
    m.train()
    loss = m(out)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("multi_modal_projector" in n for n in grads) and any("lora_" in n for n in grads)
    assert not any("tower" in n or "embed_tokens" in n for n in grads)
    proj = sum(p.numel() for n, p in m.named_parameters() if "multi_modal_projector" in n)
    stage1 = VideoLLaVA.from_config(tiny_cfg(tune_mm_mlp_adapter=True)).apply_freeze_plan()
    assert stage1["trainable"] == proj
    stage2 = VideoLLaVA.from_config(tiny_cfg()).apply_freeze_plan()
    towers = sum(p.numel() for n, p in model.named_parameters() if "_tower." in n)
    assert stage2["frozen"] == towers


def test_lora_merged_save_loads_in_transformers(tmp_path):
    from transformers import VideoLlavaForConditionalGeneration

    torch.manual_seed(0)
    m = VideoLLaVA.from_config(tiny_cfg(lora={"r": 4, "alpha": 8, "dropout": 0.0})).eval()
    with torch.no_grad():  # a non-zero adapter
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    video, image = media_batch(3)
    ids = [our_ids(m, PROMPT_V), our_ids(m, PROMPT_I)]
    want, mask = m.logits(ids, [[video], [image]])
    m.save_pretrained(tmp_path / "merged")
    ref = VideoLlavaForConditionalGeneration.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        got = ref(**hf_inputs(m, [PROMPT_V, PROMPT_I], [[video], [image]])).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=0)
    from videollm.models.lora import merge_lora

    merge_lora(m, m.llm_attr)
    torch.testing.assert_close(m.logits(ids, [[video], [image]])[0][mask.bool()], want[mask.bool()], atol=1e-4, rtol=0)


def test_8bit_loads_decoder_only(model, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model.hf.save_pretrained(str(tmp_path / "m"))
    model.tokenizer.save_pretrained(str(tmp_path / "m"))
    q = VideoLLaVA.from_config(tiny_cfg(model_path=str(tmp_path / "m"), low_resource=True)).eval()
    mods = dict(q.hf.named_modules())
    assert isinstance(mods["model.language_model.layers.0.self_attn.q_proj"], bnb.nn.Linear8bitLt)
    assert not isinstance(mods["model.image_tower.encoder.layers.0.self_attn.q_proj"], bnb.nn.Linear8bitLt)
    assert not isinstance(mods["model.multi_modal_projector.linear_1"], bnb.nn.Linear8bitLt)
    assert q.llm_is_placed()
    video, _ = media_batch(4)
    logits, _ = q.logits([our_ids(q, PROMPT_V)], [[video]])
    want, _ = model.logits([our_ids(model, PROMPT_V)], [[video]])
    assert torch.isfinite(logits).all()
    assert torch.corrcoef(torch.stack([logits[0, -1], want[0, -1]]))[0, 1] > 0.9


def test_llava_json_builder(tmp_path):
    from PIL import Image

    from videollm import synthetic
    from videollm.registry import registry

    spec = synthetic.ClipSpec(name="v", shape="square", color="blue", direction="up", speed="slow", seed=1)
    synthetic.write_clip(tmp_path / "vids" / "v.mp4", spec, width=32, height=32, fps=8, duration=2.0)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.full((20, 30, 3), 200, dtype=np.uint8)).save(tmp_path / "imgs" / "a.png")
    entries = [
        {"id": "1", "video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat?"},
                                                      {"from": "gpt", "value": "A blue square."}]},
        {"id": "2", "image": "a.png", "video": ["v.mp4"], "conversations": [
            {"from": "human", "value": "<image>\nAnd <video>?"}, {"from": "gpt", "value": "Both."}]},
        {"id": "3", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "4", "image": "../outside.png", "conversations": [{"from": "human", "value": "<image>"},
                                                                 {"from": "gpt", "value": "x"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(entries))
    cfg = OmegaConf.create({"build_info": {"anno_path": str(tmp_path / "data.json"), "image_dir": str(tmp_path / "imgs"),
                                           "video_dir": str(tmp_path / "vids"), "n_frms": 8}})
    ds = registry.get_builder_class("llava_json").from_config(cfg, merge_defaults=True).build_datasets()["train"]
    batch = ds.collater([ds[i] for i in range(len(ds))])
    assert batch["num_samples"] == 3 and batch["bad_samples"][0][1] == "outside_root"
    assert [m["kind"] for m in batch["media"][1]] == ["image", "video"] and batch["media"][2] == []
    v = batch["media"][0][0]["frames"]
    assert v.dtype == torch.uint8 and tuple(v.shape) == (8, 32, 32, 3)
    assert tuple(batch["media"][1][0]["frames"].shape) == (1, 20, 30, 3)
    proc = VideoLLaVAProcessor("tiny", "vicuna_v1", 32, 8)
    out = proc(batch)
    assert out["num_samples"] == 3 and [len(m) for m in out["media"]] == [1, 2, 0]


def test_projector_lr_scale_groups():
    from omegaconf import OmegaConf as OC

    from videollm.runners.lr_sched import build_lr_scheduler
    from videollm.runners.optim import build_optimizer

    m = VideoLLaVA.from_config(tiny_cfg(lora={"r": 4, "alpha": 8}, mm_projector_lr_scale=0.1))
    run = OC.create({"weight_decay": 0.0, "init_lr": 2e-4, "min_lr": 0.0, "warmup_lr": 2e-4, "warmup_steps": 0,
                     "lr_sched": "linear_warmup_cosine_lr", "max_epoch": 1, "iters_per_epoch": 10})
    opt, _ = build_optimizer(m, run)
    sched = build_lr_scheduler(run, opt)
    sched.step(0, 0)
    proj = {id(p) for n, p in m.named_parameters() if "multi_modal_projector" in n}
    lrs = {round(g["lr"], 12) for g in opt.param_groups if all(id(p) in proj for p in g["params"])}
    others = {round(g["lr"], 12) for g in opt.param_groups if not any(id(p) in proj for p in g["params"])}
    assert lrs == {2e-5} and others == {2e-4}
