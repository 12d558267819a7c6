"""Video-LLaMA vision-language branch: tiny forward/backward, freezing, checkpoints, full-size layout."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from videollm.conversation import collate_instruct, expand_image_placeholders, tokenize_instruct, videochat_to_turns
from videollm.errors import CheckpointError, ConfigError, PromptError
from videollm.models.video_llama import VideoLLAMA
from videollm.registry import registry
from videollm.tokenizer import load_dataset_tokenizer

TINY = "videollm/configs/models/video_llama_tiny.yaml"


def tiny_cfg(**overrides):
    cfg = OmegaConf.load(TINY).model
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return registry.get_model_class("video_llama").from_config(tiny_cfg()).eval()


def video(b=2, t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, t, 32, 32, generator=g)


def test_video_tokens_shape(model):
    embeds, atts = model.encode_videoQformer_visual(video())
    assert embeds.shape == (2, 8, 64) and atts.shape == (2, 8) and atts.all()


def test_image_is_a_one_frame_video(model):
    img = torch.randn(2, 3, 32, 32)
    a, _, n = model.encode_visual_for_training(img)
    b, _ = model.encode_videoQformer_visual(img.unsqueeze(2))
    torch.testing.assert_close(a, b)
    assert n == 8


def test_frame_position_embedding_is_added_per_frame(model):
    # Swapping two frames changes the output only through the frame position embedding.
    v = video(1)
    swapped = v[:, :, [1, 0, 2, 3]]
    out1, _ = model.encode_videoQformer_visual(v)
    out2, _ = model.encode_videoQformer_visual(swapped)
    assert not torch.allclose(out1, out2)
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.video_frame_position_embedding.weight.zero_()
    out3, _ = m.encode_videoQformer_visual(v)
    out4, _ = m.encode_videoQformer_visual(swapped)
    torch.testing.assert_close(out3, out4)  # the video Q-Former is permutation-invariant without it


def test_caption_path_labels_follow_the_original(model):
    samples = {"image": video(), "text_input": ["a red circle moving left", "a blue square"]}
    inputs = model.caption_inputs(samples)
    labels = inputs["labels"]
    n_vis = model.num_video_query_token
    assert (labels[:, : n_vis + 1] == -100).all()  # BOS + visual tokens
    tok = model.llama_tokenizer
    first = tok.encode("a red circle moving left\n", add_special_tokens=False)
    assert labels[0, n_vis + 1 :].tolist() == first  # no EOS appended; end_sym "\n" supervised
    second = tok.encode("a blue square\n", add_special_tokens=False)
    pad = labels.shape[1] - (n_vis + 1) - len(second)
    assert labels[1, n_vis + 1 :].tolist() == second + [-100] * pad
    assert inputs["attention_mask"][1].tolist() == [1] * (n_vis + 1 + len(second)) + [0] * pad
    torch.testing.assert_close(inputs["inputs_embeds"][0, 0], model.embed_tokens(torch.tensor([1]))[0])


def test_caption_truncation_to_max_txt_len(model):
    inputs = model.caption_inputs({"image": video(1), "text_input": ["a red circle moving left " * 20]})
    assert inputs["labels"].shape[1] == 1 + model.num_video_query_token + model.max_txt_len


def test_forward_backward_trains_only_the_video_branch():
    torch.manual_seed(0)
    m = VideoLLAMA.from_config(tiny_cfg()).train()
    out = m({"image": video(), "text_input": ["a red circle", "a green star"]})
    assert torch.isfinite(out["loss"]) and out["num_tokens"] > 0
    out["loss"].backward()
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"video_frame_position_embedding", "video_Qformer", "video_query_tokens", "llama_proj"}
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in m.named_parameters() if not p.requires_grad)
    # frozen encoders stay in eval mode under model.train(), as the original's disabled_train
    assert not m.visual_encoder.training and not m.Qformer.training and m.video_Qformer.training


@pytest.mark.parametrize("model_type", ["vicuna", "llama_v2"])
def test_instruction_path_video_and_image(model, model_type):
    tok = load_dataset_tokenizer("tiny")
    turns = videochat_to_turns([{"q": "What is moving?", "a": "A red circle."}], 8, "The video contains 4 frames. ")
    ids, labels = tokenize_instruct(turns, tok, model_type)
    img_turns = expand_image_placeholders(
        [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "A circle."}], 8
    )
    img_ids, img_labels = tokenize_instruct(img_turns, tok, model_type)
    batch = collate_instruct([{"input_ids": ids, "labels": labels, "image": video(1)[0]}] * 2, tok.pad_token_id)
    out = model(batch)
    assert torch.isfinite(out["loss"])
    img_batch = collate_instruct([{"input_ids": img_ids, "labels": img_labels, "image": torch.randn(3, 32, 32)}], 0)
    inputs = model.instruct_inputs(img_batch)
    pos = (img_ids == model.IMAGE_PATCH_TOKEN_ID).nonzero()[0, 0]
    visual, _, _ = model.encode_visual_for_training(img_batch["images"])
    torch.testing.assert_close(inputs["inputs_embeds"][0, pos : pos + 8], visual[0])
    assert torch.isfinite(model(img_batch)["loss"])


def test_instruction_path_rejects_wrong_placeholder_runs(model):
    tok = load_dataset_tokenizer("tiny")
    turns = videochat_to_turns([{"q": "What?", "a": "A circle."}], 7)  # one short
    ids, labels = tokenize_instruct(turns, tok, "vicuna")
    batch = collate_instruct([{"input_ids": ids, "labels": labels, "image": video(1)[0]}], 0)
    with pytest.raises(PromptError, match="expected 8"):
        model(batch)
    ids2 = ids.clone()
    pos = (ids2 == model.IMAGE_PATCH_TOKEN_ID).nonzero()[:, 0]
    ids2 = torch.cat([ids2[: pos[3]], torch.tensor([5]), ids2[pos[3] :], torch.tensor([model.IMAGE_PATCH_TOKEN_ID])])
    batch = collate_instruct([{"input_ids": ids2, "labels": torch.full_like(ids2, -100), "image": video(1)[0]}], 0)
    with pytest.raises(PromptError, match="consecutive"):
        model(batch)


def test_prompt_wrap_uses_the_prompt_file():
    cfg = tiny_cfg(prompt_path="prompts/alignment_image.txt", prompt_template="###Human: {} ###Assistant: ", max_txt_len=64)
    m = VideoLLAMA.from_config(cfg).eval()
    assert len(m.prompt_list) == 4 and all(p.startswith("###Human: <Image><ImageHere></Image> ") for p in m.prompt_list)
    inputs = m.caption_inputs({"image": torch.randn(1, 3, 32, 32), "text_input": ["a red circle"]})
    n_text = len(m.llama_tokenizer.encode("a red circle\n", add_special_tokens=False))
    wrapped = inputs["labels"].shape[1] - n_text - 1
    assert wrapped > m.num_video_query_token  # p_before + visual + p_after
    assert (inputs["labels"][0, : wrapped + 1] == -100).all()


def test_trainable_state_dict_round_trip_through_original_format(tmp_path, model):
    torch.manual_seed(1)
    trained = VideoLLAMA.from_config(tiny_cfg()).eval()
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    state = trained.trainable_state_dict()
    assert "video_Qformer.bert.embeddings.position_ids" in state  # buffers kept, as the original
    assert "Qformer.bert.encoder.layer.0.attention.self.query.weight" not in state  # frozen params dropped
    ckpt = {"model": state, "optimizer": {"state": {}, "param_groups": []}, "config": {"a": 1}, "scaler": None, "epoch": 2}
    path = tmp_path / "checkpoint_2.pth"
    torch.save(ckpt, path)
    # The frozen parts come from the same seed; the checkpoint supplies the trained branch.
    torch.manual_seed(1)
    loaded = VideoLLAMA.from_config(tiny_cfg(ckpt=str(path))).eval()
    samples = {"image": video(), "text_input": ["a red circle", "a blue square"]}
    with torch.no_grad():
        torch.testing.assert_close(loaded(samples)["loss"], trained(samples)["loss"])
        torch.testing.assert_close(loaded.encode_videoQformer_visual(video())[0], trained.encode_videoQformer_visual(video())[0])


def test_checkpoint_loading_is_checked(tmp_path, model):
    state = model.trainable_state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("llama_proj")}
    torch.save({"model": partial}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="llama_proj"):
        VideoLLAMA.from_config(tiny_cfg(ckpt=str(tmp_path / "partial.pth")))
    VideoLLAMA.from_config(tiny_cfg(ckpt=str(tmp_path / "partial.pth"), strict_load=False))
    # old checkpoints carry rotary inv_freq buffers: tolerated
    extra = dict(state)
    extra["llama_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save({"model": extra}, tmp_path / "old.pth")
    VideoLLAMA.from_config(tiny_cfg(ckpt=str(tmp_path / "old.pth")))
    bad = dict(state)
    bad["llama_proj.weight"] = torch.zeros(3, 3)
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"llama_proj.weight has shape \(3, 3\)"):
        VideoLLAMA.from_config(tiny_cfg(ckpt=str(tmp_path / "bad.pth")))


def test_blip2_and_minigpt4_files_load_by_original_key_names(tmp_path, model):
    blip2 = {k: v.clone() + 1 for k, v in model.state_dict().items() if k.startswith(("Qformer.", "query_tokens", "ln_vision."))}
    blip2["t5_proj.weight"] = torch.zeros(2, 2)  # other BLIP-2 parts are ignored
    blip2["Qformer.cls.predictions.bias"] = torch.zeros(2)
    torch.save({"model": blip2}, tmp_path / "blip2_pretrained_flant5xxl.pth")
    minigpt4 = {"llama_proj.weight": torch.full_like(model.llama_proj.weight, 0.5), "llama_proj.bias": torch.zeros_like(model.llama_proj.bias)}
    torch.save({"model": minigpt4}, tmp_path / "pretrained_minigpt4_7b.pth")
    m = VideoLLAMA.from_config(
        tiny_cfg(q_former_model=str(tmp_path / "blip2_pretrained_flant5xxl.pth"), llama_proj_model=str(tmp_path / "pretrained_minigpt4_7b.pth"))
    )
    torch.testing.assert_close(m.query_tokens.data, blip2["query_tokens"])
    torch.testing.assert_close(m.ln_vision.weight.data, blip2["ln_vision.weight"])
    assert (m.llama_proj.weight == 0.5).all()


def test_unsafe_checkpoint_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointError):
        VideoLLAMA.from_config(tiny_cfg(ckpt=str(path)))


def test_unknown_model_key_is_rejected():
    with pytest.raises(ConfigError, match=r"model.num_video_query_tokens: unknown key \(did you mean num_video_query_token\?\)"):
        VideoLLAMA.from_config(tiny_cfg(num_video_query_tokens=4))


def test_greedy_generation_from_embeddings(model):
    embeds, _ = model.encode_videoQformer_visual(video(1))
    bos = model.embed_tokens(torch.tensor([[1]]))
    out = model.generate(torch.cat([bos, embeds], 1), max_new_tokens=5, do_sample=False, min_length=1)
    assert out.shape[0] == 1 and 1 <= out.shape[1] <= 6


# ------------------------------------------------------------------------- full size on meta

ORIGINAL_VL_SHAPES = {
    "visual_encoder.cls_token": (1, 1, 1408),
    "visual_encoder.pos_embed": (1, 257, 1408),
    "visual_encoder.patch_embed.proj.weight": (1408, 3, 14, 14),
    "visual_encoder.blocks.38.attn.qkv.weight": (4224, 1408),
    "visual_encoder.blocks.38.attn.q_bias": (1408,),
    "visual_encoder.blocks.38.mlp.fc1.weight": (6144, 1408),
    "ln_vision.weight": (1408,),
    "query_tokens": (1, 32, 768),
    "Qformer.bert.embeddings.LayerNorm.weight": (768,),
    "Qformer.bert.embeddings.position_ids": (1, 512),
    "Qformer.bert.encoder.layer.10.crossattention.self.key.weight": (768, 1408),
    "Qformer.bert.encoder.layer.11.intermediate_query.dense.weight": (3072, 768),
    "Qformer.bert.encoder.layer.11.output_query.LayerNorm.bias": (768,),
    "video_frame_position_embedding.weight": (32, 768),
    "video_query_tokens": (1, 32, 768),
    "video_Qformer.bert.encoder.layer.1.crossattention.self.value.weight": (768, 768),
    "video_Qformer.bert.embeddings.position_ids": (1, 512),
}


@pytest.mark.parametrize(
    "preset, hidden, layers, vocab, expected",
    [("vicuna7b", 4096, 32, 32001, 22_104_064), ("vicuna13b", 5120, 40, 32001, 22_891_520), ("llama2_7b", 4096, 32, 32000, 22_104_064), ("llama2_13b", 5120, 40, 32000, 22_891_520)],
)
def test_full_size_layout_and_trainable_count_on_meta(preset, hidden, layers, vocab, expected):
    cfg = OmegaConf.load(f"videollm/configs/models/video_llama_{preset}.yaml").model
    cfg.update(llama_model="", vit_ckpt="", q_former_model="", tokenizer="tiny", frozen_video_Qformer=False, frozen_llama_proj=False)
    with torch.device("meta"):
        m = VideoLLAMA.from_config(cfg)
    sd = m.state_dict()
    for key, shape in ORIGINAL_VL_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    assert tuple(sd["llama_proj.weight"].shape) == (hidden, 768)
    assert tuple(sd["llama_model.model.embed_tokens.weight"].shape) == (vocab, hidden)
    assert f"llama_model.model.layers.{layers - 1}.self_attn.q_proj.weight" in sd
    assert not any(k.startswith("visual_encoder.blocks.39") for k in sd)
    assert sum(1 for k in sd if k.startswith("Qformer.bert.encoder.layer.") and ".crossattention.self.query.weight" in k) == 6
    assert sum(p.numel() for p in m.visual_encoder.parameters()) == 985_894_528
    assert sum(p.numel() for p in m.Qformer.parameters()) == 105_137_664
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == expected


def test_missing_weights_error_lists_every_missing_path(tmp_path):
    cfg = tiny_cfg(vit_ckpt=str(tmp_path / "eva_vit_g.pth"), q_former_model=str(tmp_path / "blip2.pth"),
                   ckpt=str(tmp_path / "finetune.pth"))
    with pytest.raises(ConfigError) as err:
        VideoLLAMA.from_config(cfg)
    text = str(err.value)
    for key, name in (("vit_ckpt", "eva_vit_g.pth"), ("q_former_model", "blip2.pth"), ("ckpt", "finetune.pth")):
        assert f"model.{key}: {tmp_path / name}" in text
    assert "EVA ViT-g weights" in text and "blip2_pretrained_flant5xxl.pth" in text
