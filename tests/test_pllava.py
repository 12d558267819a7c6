"""PLLaVA (arch ``pllava``): released key layout and parameter counts at full size (meta device),
the pooled projector, the inference LoRA alpha, checkpoint folders in the released layouts, the
training step, the VideoChat2-IT prompt and labels, the templates and the preprocessing rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from videollm.errors import CheckpointError
from videollm.models.base import Media
from videollm.models.pllava import (
    DEMO_SYSTEM,
    PLLaVA,
    parse_pooling_shape,
    repeat_frames,
    save_pllava_folder,
)
from videollm.processors import pllava_processors as pp
from videollm.templates import get_template

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "videollm/configs/models"


def tiny_cfg(**overrides):
    cfg = OmegaConf.to_container(OmegaConf.load(PRESETS / "pllava_tiny.yaml").model)
    cfg.update(overrides)
    return cfg


def tiny(seed: int = 0, **overrides) -> PLLaVA:
    torch.manual_seed(seed)
    return PLLaVA.from_config(tiny_cfg(**overrides))


def randomise_lora(model: PLLaVA, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def conversation(q="What is moving in the video?", a="A red circle is moving right."):
    return [{"from": "human", "value": "<video>" + q}, {"from": "gpt", "value": a}]


# ------------------------------------------------------------------------------ full size, meta device
@pytest.mark.parametrize("preset,trainable", [("pllava_7b.yaml", 88_088_576), ("pllava_13b.yaml", 136_325_120)])
def test_full_size_key_layout_and_trainable_parameters(preset, trainable):
    cfg = OmegaConf.to_container(OmegaConf.load(PRESETS / preset).model)
    cfg.update(tokenizer="tiny", tokenizer_kind="llama_exact", lora_alpha_inference=None)
    with torch.device("meta"):
        model = PLLaVA.from_config(cfg)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == trainable
    names = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    h = model.language_model.get_base_model().config.hidden_size
    assert names["vision_tower.vision_model.embeddings.patch_embedding.weight"] == (1024, 3, 14, 14)
    assert names["vision_tower.vision_model.embeddings.position_embedding.weight"] == (577, 1024)
    assert names["multi_modal_projector.linear_1.weight"] == (h, 1024)
    assert names["multi_modal_projector.linear_2.bias"] == (h,)
    last = model.language_model.get_base_model().config.num_hidden_layers - 1
    stem = f"language_model.base_model.model.model.layers.{last}.self_attn."
    assert names[stem + "q_proj.base_layer.weight"] == (h, h)
    assert names[stem + "q_proj.lora_A.default.weight"] == (128, h)
    assert names[stem + "v_proj.lora_B.default.weight"] == (h, 128)
    assert names["language_model.base_model.model.lm_head.weight"] == (32064, h)
    assert not any("k_proj.lora" in k or "image_newline" in k for k in names)
    assert model.num_media_tokens(Media("video", None)) == 2304
    trained = {k.split(".")[0] for k, p in model.named_parameters() if p.requires_grad}
    assert trained == {"multi_modal_projector", "language_model"}
    assert all(".lora_" in k for k, p in model.named_parameters() if p.requires_grad and k.startswith("language_model"))


def test_pooling_shape_and_num_frames_override():
    assert parse_pooling_shape("16-12-12") == (16, 12, 12) == parse_pooling_shape([16, 12, 12])
    m = tiny(num_frames=4, pooling_shape="2-1-1")
    assert m.num_media_tokens(Media("video", None)) == 2
    out = m.encode_media([Media("video", torch.randn(3, 4, 32, 32))])[0]
    assert out.shape == (2, 64)
    with pytest.raises(Exception, match="pooling_shape"):
        parse_pooling_shape("16-12")


# ------------------------------------------------------------------------------ the projector
def test_repeat_frames_rules():
    x = torch.arange(4).view(4, 1)
    assert repeat_frames(x, "video", 16).flatten().tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3]
    assert repeat_frames(torch.tensor([[7]]), "image", 3).flatten().tolist() == [7, 7, 7]
    with pytest.raises(Exception, match="num_frames"):
        repeat_frames(torch.zeros(9, 1), "video", 8)


def _expected_pool(model: PLLaVA, frames: torch.Tensor) -> torch.Tensor:
    """MLP per frame, then the mean over each (2, 2, 2) block: (T'*h'*w', H) for 8 frames of 4x4."""
    feats = model.vision_features(frames)  # (8, 16, D)
    proj = model.multi_modal_projector
    x = proj.linear_2(torch.nn.functional.gelu(proj.linear_1(feats)))  # (8, 16, H)
    x = x.view(4, 2, 2, 2, 2, 2, -1)  # (T', 2, h', 2, w', 2, H)
    return x.mean(dim=(1, 3, 5)).reshape(4 * 2 * 2, -1)


def test_pooled_projector_values_for_videos_and_images():
    m = tiny(pooling_shape="4-2-2").eval()
    video = torch.randn(3, 8, 32, 32)
    with torch.no_grad():
        got = m.encode_media([Media("video", video)])[0]
        want = _expected_pool(m, video.permute(1, 0, 2, 3))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        image = torch.randn(3, 32, 32)
        got_img = m.encode_media([Media("image", image)])[0]  # (4 * 2 * 2, H)
        assert got_img.shape == (16, 64)
        want_img = _expected_pool(m, image.unsqueeze(0).repeat(8, 1, 1, 1))
        torch.testing.assert_close(got_img, want_img, rtol=1e-5, atol=1e-5)
        rows = got_img.view(4, 4, -1)  # an image is the same pooled frame at every T'
        torch.testing.assert_close(rows[0], rows[3])
        # fewer frames are repeat-interleaved up to num_frames (4 -> 3, 3, 2 copies... cut at 8)
        short = torch.randn(3, 4, 32, 32)
        got_short = m.encode_media([Media("video", short)])[0]
        idx = torch.arange(4).repeat_interleave(3)[:8]
        torch.testing.assert_close(got_short, _expected_pool(m, short.permute(1, 0, 2, 3)[idx]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ LoRA alpha
def test_inference_alpha_scales_the_lora_delta_as_alpha_over_r():
    m = tiny(lora={"r": 8, "alpha": 32, "dropout": 0.0}).eval()
    randomise_lora(m)
    layer = m.language_model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)

    def delta(alpha):
        m.set_lora_alpha(alpha)
        with torch.no_grad():
            return layer(x) - layer.base_layer(x)

    d32, d4 = delta(32), delta(4)
    assert d32.abs().max() > 1e-3
    torch.testing.assert_close(d4, d32 * (4 / 32), rtol=1e-5, atol=1e-6)
    assert layer.scaling["default"] == pytest.approx(4 / 8)
    # alpha 0 is the base model: logits equal those with the adapter disabled
    ids = torch.tensor([[1, 450, 504, 474]])
    m.set_lora_alpha(0)
    with torch.no_grad():
        zero = m.language_model(input_ids=ids).logits
        with m.language_model.disable_adapter():
            base = m.language_model(input_ids=ids).logits
        m.set_lora_alpha(32)
        full = m.language_model(input_ids=ids).logits
    torch.testing.assert_close(zero, base)
    assert (full - base).abs().max() > 1e-4


def test_lora_alpha_inference_option_needs_a_loaded_adapter(tmp_path):
    src = tiny()
    randomise_lora(src)
    out = save_pllava_folder(src, tmp_path / "m", full=True)
    m = PLLaVA.from_config({"arch": "pllava", "model_dir": str(out), "tokenizer": "tiny", "tokenizer_kind": "llama_exact",
                            "llm_dtype": "fp32", "lora": {"r": 8, "alpha": 16}, "lora_alpha_inference": 4})
    layer = m.language_model.get_base_model().model.layers[1].self_attn.v_proj
    assert layer.scaling["default"] == pytest.approx(4 / 8)
    projector_only = {k: v for k, v in src.state_dict().items() if k.startswith("multi_modal_projector.")}
    torch.save({"model": projector_only}, tmp_path / "projector.pth")
    with pytest.raises(CheckpointError, match="lora_A"):  # no adapter: refused, not silently fresh
        PLLaVA.from_config(tiny_cfg(ckpt=str(tmp_path / "projector.pth"), lora_alpha_inference=4))


# ------------------------------------------------------------------------------ checkpoints
def _same_state(a: PLLaVA, b: PLLaVA) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_sharded_peft_named_folder_loads_exactly(tmp_path):
    src = tiny(seed=3)
    randomise_lora(src)
    out = save_pllava_folder(src, tmp_path / "pllava-tiny", full=True, max_shard_bytes=200_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()
    keys = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert "language_model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in keys
    assert "language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in keys
    cfg = {"arch": "pllava", "model_dir": str(out), "tokenizer": "tiny", "tokenizer_kind": "llama_exact",
           "llm_dtype": "fp32", "lora": {"r": 8, "alpha": 16}}
    torch.manual_seed(99)
    _same_state(src, PLLaVA.from_config(cfg))
    # the folder's config.json wins over a preset's dimensions
    preset = tiny_cfg(model_dir=str(out))
    preset["llm_config"] = {**preset["llm_config"], "num_hidden_layers": 5}
    _same_state(src, PLLaVA.from_config(preset))
    # weight_dir given as well (the original's scripts pass the same folder twice)
    _same_state(src, PLLaVA.from_config({**cfg, "weight_dir": str(out)}))
    # a lost shard: its keys are missing, reported by name
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        PLLaVA.from_config(cfg)


def test_lora_projector_only_file_on_a_llava_next_base_folder(tmp_path):
    trained = tiny(seed=5)
    randomise_lora(trained)
    lora_dir = save_pllava_folder(trained, tmp_path / "lora", full=False)
    only = load_file(str(lora_dir / "model.safetensors"))
    assert all("lora_" in k or "multi_modal_projector" in k for k in only) and len(only) == 8 + 4
    base_model = tiny(seed=6, use_lora=False)
    base = tmp_path / "llava-v1.6-tiny-hf"
    base.mkdir()
    cfg = json.loads((lora_dir / "config.json").read_text())
    llava_next = {"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
                  "vision_config": cfg["vision_config"], "text_config": cfg["text_config"],
                  "image_token_index": cfg["image_token_index"], "vision_feature_layer": -2}
    (base / "config.json").write_text(json.dumps(llava_next))
    state = dict(base_model.state_dict())
    state["image_newline"] = torch.zeros(64)  # LLaVA-NeXT's, unused by PLLaVA
    save_file(state, str(base / "model.safetensors"))
    opts = {"arch": "pllava", "model_dir": str(base), "weight_dir": str(lora_dir), "tokenizer": "tiny",
            "tokenizer_kind": "llama_exact", "llm_dtype": "fp32", "lora": {"r": 8, "alpha": 16}, "num_frames": 8,
            "pooling_shape": "4-4-4"}
    m = PLLaVA.from_config(opts)
    own = m.state_dict()
    for k, v in only.items():
        assert torch.equal(own[k], v), k
    assert torch.equal(own["language_model.base_model.model.model.layers.1.self_attn.q_proj.base_layer.weight"],
                       state["language_model.model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(own["vision_tower.vision_model.post_layernorm.weight"], state["vision_tower.vision_model.post_layernorm.weight"])
    # the newer transformers layout of llava-hf folders (model.language_model.*, lm_head.*) loads the same
    renamed = {}
    for k, v in state.items():
        k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
        k = k.replace("vision_tower.", "model.vision_tower.").replace("multi_modal_projector.", "model.multi_modal_projector.")
        renamed[k] = v
    save_file(renamed, str(base / "model.safetensors"))
    _same_state(m, PLLaVA.from_config(opts))
    # a LoRA file without the adapter is refused (it would be silently fresh)
    save_file({k: v for k, v in only.items() if "lora_" not in k}, str(lora_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lora"):
        PLLaVA.from_config(opts)
    # an unknown key is refused, named
    save_file({**only, "multi_modal_projector.linear_3.weight": torch.zeros(2)}, str(lora_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match="linear_3"):
        PLLaVA.from_config(opts)


def test_base_folder_without_a_weight_is_an_error_not_a_random_init(tmp_path):
    base_model = tiny(seed=6, use_lora=False)
    folder = save_pllava_folder(base_model, tmp_path / "base", full=True)
    state = load_file(str(next(folder.glob("model-*.safetensors"))))
    state.pop("multi_modal_projector.linear_2.bias")
    save_file(state, str(next(folder.glob("model-*.safetensors"))))
    with pytest.raises(CheckpointError, match="linear_2.bias"):
        PLLaVA.from_config({"arch": "pllava", "model_dir": str(folder), "tokenizer": "tiny",
                            "tokenizer_kind": "llama_exact", "llm_dtype": "fp32", "use_lora": False})


# ------------------------------------------------------------------------------ training
def test_training_step_updates_only_projector_and_lora():
    m = tiny(seed=7)  # the released recipe's freezing: tower and LLM frozen
    randomise_lora(m)
    trainable = {k for k, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(k.startswith("multi_modal_projector.") or ".lora_" in k for k in trainable)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    batch = {"images": torch.randn(2, 3, 8, 32, 32), "conversations": [conversation(), conversation(a="A blue square.")]}
    out = m(batch)
    out["loss"].backward()
    with_grad = {k for k, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable
    torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.02).step()
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable


def test_loss_is_over_the_attended_positions_only():
    m = tiny(seed=8).eval()
    one = {"images": torch.randn(1, 3, 8, 32, 32), "conversations": [conversation()]}
    padded = m.prepare_batch(dict(one))
    longer = m.batch_processor()
    longer.pad_to_max_length, longer.max_txt_l = True, 64
    padded_to_max = longer(dict(one))
    longer.pad_to_max_length = False
    assert padded_to_max["input_ids"].shape[1] == 64 > padded["input_ids"].shape[1]
    with torch.no_grad():
        a = m({**padded, "media": [one["images"][0]]})["loss"]
        b = m({**padded_to_max, "media": [one["images"][0]]})["loss"]
    torch.testing.assert_close(a, b)
    # labels under padding (attention 0) never count, even when they are real token ids
    noisy = dict(padded_to_max)
    noisy["labels"] = noisy["labels"].clone()
    noisy["labels"][noisy["attention_mask"] == 0] = 7
    with torch.no_grad():
        c = m({**noisy, "media": [one["images"][0]]})["loss"]
    torch.testing.assert_close(a, c)


# ------------------------------------------------------------------------------ prompts and labels
def test_videochat2_prompt_and_label_masking():
    m = tiny(max_txt_l=512)
    proc = m.batch_processor()
    turns = conversation() + [{"from": "human", "value": "Which direction?"}, {"from": "gpt", "value": "Right."}]
    text = proc.prompt(turns, "Watch closely.")
    assert text == ("Watch closely. USER:<image>\nWhat is moving in the video?</s>ASSISTANT:A red circle is moving "
                    "right.</s>USER:Which direction?</s>ASSISTANT:Right.</s>")
    ids, labels = proc.tokenize(text)
    tok = m.tokenizer
    assert ids[0] == tok.bos_token_id and ids.count(m.image_token_index) == 1
    supervised = [i for i, lab in zip(ids, labels) if lab != -100]
    assert tok.decode(supervised).replace(" ", "") == "Aredcircleismovingright.</s>Right.</s>"
    # the supervised runs are exactly the two answers
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    assert len(runs) + bool(cur) == 2
    batch = proc({"images": torch.zeros(2, 3, 8, 32, 32), "conversations": [turns, [{"from": "human", "value": "no media"},
                                                                                      {"from": "gpt", "value": "x"}]],
                  "paths": ["a.mp4", "b.mp4"]})
    assert batch["num_samples"] == 2  # the marker is added to the first question when absent
    cut = type(proc)("llama_exact", "tiny", max_txt_l=3)({"images": torch.zeros(1, 3, 8, 32, 32),
                                                          "conversations": [turns], "paths": ["c.mp4"]})
    assert cut["num_samples"] == 0 and cut["bad_samples"] == [("c.mp4", "bad_annotation")]


def test_templates_reproduce_the_original_prompts(tmp_path):
    from videollm.chat import Chat, new_conversation

    m = tiny().eval()
    chat = Chat(m)
    conv, imgs = new_conversation("plain", "video"), []
    chat._add(conv, imgs, [Media("video", torch.zeros(3, 8, 32, 32))], "video")
    chat.ask("What is the man doing?", conv)
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == DEMO_SYSTEM + " USER:<image>  USER:What is the man doing? ASSISTANT:"
    mv = get_template("eval_mvbench").new_conversation("video")
    mv.append_message(mv.roles[0], "<image>\n")
    mv.append_message(mv.roles[0], "Question? (A) x (B) y" + "\nOnly give the best option.")
    mv.append_message(mv.roles[1], None)
    assert mv.get_prompt().startswith("Carefully watch the video")
    assert mv.get_prompt().endswith(".\n USER: <image>\n USER: Question? (A) x (B) y\nOnly give the best option. "
                                    "ASSISTANT:Best option:(")
    qa = get_template("eval_videoqa_llavanext").new_conversation("video")
    qa.append_message(qa.roles[0], "<image>\n " + qa.format_query("What?"))
    qa.append_message(qa.roles[1], None)
    assert qa.get_prompt() == ("<|im_start|>system\nAnswer the question.<|im_end|>\n<|im_start|>user\n<image>\n "
                               + pp_query("What?") + "<|im_end|>\n<|im_start|>assistant\n\nAnswer: In the video,")
    it = get_template("pllava_it").new_conversation("video")
    chat._add(it, [], [Media("video", torch.zeros(3, 8, 32, 32))], "video")
    chat.ask("What is moving in the video?", it)
    it.append_message(it.roles[1], None)
    assert it.get_prompt() == "USER:<image>\nWhat is moving in the video?</s>ASSISTANT:"


def pp_query(q: str) -> str:
    from videollm.models.pllava import VIDEOQA_PRE_QUERY

    return f"{VIDEOQA_PRE_QUERY} {q} \n"


def test_chat_answers_through_the_contract(tmp_path):
    from videollm import synthetic
    from videollm.chat import Chat, new_conversation

    spec = synthetic.ClipSpec(name="c", shape="circle", color="red", direction="right", speed="fast", seed=1)
    path = tmp_path / "c.mp4"
    synthetic.write_clip(path, spec, width=48, height=64, fps=8, duration=2.0, gop=12)
    m = tiny().eval()
    chat = Chat(m)
    medium = m.load_media(str(path), "video")
    assert medium.data.shape == (3, 8, 32, 32)  # decoded in a child process (isolate, the default)
    assert torch.equal(m.load_media(str(path), "video", isolate=False).data, medium.data)
    convs, lists = [], []
    for q in ("What is moving in the video?", "Which direction?"):
        conv, imgs = new_conversation(m.default_template, "video"), []
        chat.upload_video_without_audio(str(path), conv, imgs)
        chat.ask(q, conv)
        convs.append(conv)
        lists.append(imgs)
    single, _ = chat.answer(convs[0].copy(), lists[0], max_new_tokens=5)
    batch = chat.answer_batch(convs, lists, max_new_tokens=5)
    assert isinstance(single, str) and len(batch) == 2
    assert batch[0][0] == single  # left-padded batching gives the single answer
    # the prompt is tokenised whole, as PllavaProcessor does (the placeholder id replaced by the medium)
    prompt = "USER:<image>\nWhat is moving in the video?</s>ASSISTANT:"
    emb = torch.zeros(64, 64)
    segs = m.prompt_segments(prompt, [emb])
    whole = m.tokenizer(prompt)["input_ids"]
    k = whole.index(m.image_token_index)
    assert segs[0].ids.tolist() == whole[:k] and segs[1].embeds is emb and segs[2].ids.tolist() == whole[k + 1:]


# ------------------------------------------------------------------------------ preprocessing
def test_frame_sampling_rules():
    assert pp.chat_frame_indices(161, 16) == [5 + int(np.round(10 * k)) for k in range(16)]
    assert pp.dataset_frame_indices(160, 16, "middle") == [(10 * k + 10 * k + 9) // 2 for k in range(16)]
    import random

    rand = pp.dataset_frame_indices(160, 16, "rand", random.Random(0))
    assert all(10 * k <= i < 10 * k + 9 for k, i in enumerate(rand))  # never a segment's last frame
    assert pp.dataset_frame_indices(5, 8, "middle") == [0, 1, 2, 3, 4, 4, 4, 4]  # padded with the last index


def test_resize_crop_longshort_common_size_and_offset_quirk():
    wide = np.tile(np.arange(854, dtype=np.uint8)[None, :, None] % 251, (480, 1, 3))[None]
    four_three = np.zeros((1, 480, 640, 3), dtype=np.uint8)
    out = pp.resize_crop_longshort([wide, four_three], clip_resolution=336)
    assert out[0].shape == out[1].shape == (1, 480, 640, 3)
    # overhead (854 - 640) // 2 = 107, halved again: the slice starts at 53, not 107
    assert np.array_equal(out[0][0], wide[0][:, 53:693])
    single = pp.resize_crop_longshort([np.zeros((1, 480, 854, 3), np.uint8)], 336)[0]
    assert single.shape == (1, 359, 638, 3)  # short side capped so that the long side stays within 640
    x = pp.clip_preprocess(single, 336)
    assert x.shape == (1, 3, 336, 336)
    torch.testing.assert_close(x[0, :, 0, 0], -torch.tensor(pp.CLIP_MEAN) / torch.tensor(pp.CLIP_STD))


def test_training_transform_uses_imagenet_statistics_by_default():
    clip = torch.full((3, 4, 40, 50), 255.0)
    train = pp.PllavaVideoTrainProcessor(image_size=32, n_frms=4)
    out = train.transform(clip, torch.Generator().manual_seed(0))
    assert out.shape == (3, 4, 32, 32)
    want = (1 - torch.tensor(pp.IMAGENET_MEAN)) / torch.tensor(pp.IMAGENET_STD)
    torch.testing.assert_close(out[:, 0, 0, 0], want)
    clip_norm = pp.PllavaVideoTrainProcessor(image_size=32, n_frms=4, normalize="clip").transform(clip)
    torch.testing.assert_close(clip_norm[:, 0, 0, 0], (1 - torch.tensor(pp.CLIP_MEAN)) / torch.tensor(pp.CLIP_STD))
    ramp = torch.arange(50.0).view(1, 1, 1, 50).expand(3, 2, 40, 50).contiguous()
    outs = [pp.PllavaVideoTrainProcessor(image_size=32, n_frms=2, min_scale=1.0, max_scale=1.0)
            .transform(ramp, torch.Generator().manual_seed(s)) for s in range(8)]
    flips = {bool(o[0, 0, 0, 0] > o[0, 0, 0, -1]) for o in outs}
    assert flips == {True, False}  # a horizontal flip half of the time


def test_videochat2_records_build_batches(tmp_path):
    from videollm import synthetic
    from videollm.datasets.pllava_datasets import VideoChat2InstructDataset

    spec = synthetic.ClipSpec(name="v", shape="square", color="blue", direction="up", speed="slow", seed=2)
    synthetic.write_clip(tmp_path / "v.mp4", spec, width=64, height=48, fps=8, duration=2.0, gop=12)
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(tmp_path / "i.jpg")
    records = [{"video": "v.mp4", "QA": [{"i": "Watch.", "q": "What is moving?", "a": "A blue square."}], "start": 0.5, "end": 1.5},
               {"image": "i.jpg", "QA": [{"q": "What is it?", "a": "Grey."}]},
               {"video": "missing.mp4", "QA": [{"q": "?", "a": "!"}]}]
    (tmp_path / "anno.json").write_text(json.dumps(records))
    proc = pp.PllavaVideoTrainProcessor(image_size=32, n_frms=8)
    ds = VideoChat2InstructDataset(proc, str(tmp_path), str(tmp_path / "anno.json"))
    batch = ds.collater([ds[0], ds[1], ds[2]])
    assert batch["bad_samples"][0][1] == "missing"
    assert batch["media"][0].shape == (3, 8, 32, 32) and batch["media"][1].shape == (3, 32, 32)
    assert batch["media_kinds"] == ["video", "image"] and batch["instructions"][0] == "Watch."
    m = tiny()
    out = m(batch)
    assert torch.isfinite(out["loss"]) and out["num_tokens"] > 0
    frames, indices, fps = pp.load_frames(tmp_path / "v.mp4", 4, "middle", clip=(0.5, 1.5))
    assert all(4 <= i <= 12 for i in indices) and frames.shape == (4, 48, 64, 3)


def test_floor_cosine_schedule_is_the_originals():
    from videollm.runners.lr_sched_floor import floor_cosine_multiplier

    assert floor_cosine_multiplier(0, 20, 100, 0.25) == 0.25  # the warm-up starts at the floor
    assert floor_cosine_multiplier(10, 20, 100, 0.25) == 0.5
    assert floor_cosine_multiplier(20, 20, 100, 0.25) == 1.0
    assert floor_cosine_multiplier(60, 20, 100, 0.25) == pytest.approx(0.5)  # half-way through the cosine
    assert floor_cosine_multiplier(90, 20, 100, 0.25) == 0.25  # clipped, not rescaled
