"""LLaMA-VID: full-size layout on meta, the token computations, batches, feature files, checkpoints, chat."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_vid_helpers import build_tiny, tiny_cfg, write_bert_vocab  # noqa: E402

from videollm.errors import ConfigError, DataError  # noqa: E402
from videollm.models.base import Media  # noqa: E402
from videollm.models.llama_vid import (  # noqa: E402
    IMAGE_TOKEN_INDEX,
    LLaMAVID,
    LLaMAVIDProcessor,
    feature_medium,
    from_released_key,
    to_released_key,
    tokenizer_image_token,
)

VICUNA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return write_bert_vocab(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def model(bert_dir):
    return build_tiny(bert_dir)


def video(frames: int = 3, seed: int = 0) -> Media:
    g = torch.Generator().manual_seed(seed)
    return Media("video", torch.randn(3, frames, 32, 32, generator=g))


# ------------------------------------------------------------------ full size (meta device)
@pytest.mark.slow  # ~20 s for the first case on a loaded 2-core machine (the 7B LLaMA on meta)
@pytest.mark.parametrize("stage,trainable", [
    (1, 22_552_576 + 1_082_752 + 1_983_872 + 5_771_264),  # mm_projector + the three vlm_att projections
    (2, 7_941_388_160 - 985_894_528),  # everything but EVA
    (3, 6_738_415_616 + 22_552_576),  # LLM + mm_projector
])
def test_full_size_7b_on_meta(bert_dir, stage, trainable):
    cfg = tiny_cfg(bert_dir, image_size=224, vit={}, num_query=32, qformer={}, llm_config=VICUNA_7B,
                   llm_dtype="fp16", vit_precision="fp16", stage=stage, model_max_length=2048)
    with torch.device("meta"):
        m = LLaMAVID.from_config(cfg)
    total = sum(p.numel() for p in m.parameters())
    assert total == 7_941_388_160
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == trainable
    released = {to_released_key(k): tuple(v.shape) for k, v in m.state_dict().items()}
    expect = {
        "model.mm_projector.0.weight": (4096, 1408), "model.mm_projector.2.weight": (4096, 4096),
        "model.vlm_att_query": (1, 32, 768), "model.vlm_att_ln.weight": (1408,),
        "model.vlm_att_projector.weight": (1408, 768), "model.vlm_att_key_projector.weight": (1408, 1408),
        "model.vlm_att_val_projector.weight": (4096, 1408),
        "model.vlm_att_encoder.bert.embeddings.word_embeddings.weight": (30523, 768),
        "model.vlm_att_encoder.bert.encoder.layer.0.crossattention.self.key.weight": (768, 1408),
        "model.vlm_att_encoder.bert.encoder.layer.11.output.dense.weight": (768, 3072),
        "model.embed_tokens.weight": (32000, 4096), "model.layers.31.mlp.down_proj.weight": (4096, 11008),
        "model.norm.weight": (4096,), "lm_head.weight": (32000, 4096),
        "model.vision_tower.vision_tower.pos_embed": (1, 257, 1408),
    }
    for key, shape in expect.items():
        assert released[key] == shape, key
    assert not any(k.startswith("model.vlm_att_encoder.cls") for k in released)
    assert all(k.startswith(("model.", "lm_head.")) for k in released)
    assert all(from_released_key(to_released_key(k)) == k for k in m.state_dict())
    assert "model.layers.1.self_attn.q_proj.weight" in m.released_state_dict()


# ------------------------------------------------------------------ tokens
def test_context_depends_on_the_question_content_does_not(model):
    v = video(3)
    with torch.no_grad():
        a = model.encode_media([v], "what is the color?")[0]
        a2 = model.encode_media([v], "what is the color?")[0]
        b = model.encode_media([v], "which shape appears first?")[0]
    assert a.shape == (3 * 2, 64) and model.num_media_tokens(v) == 6
    torch.testing.assert_close(a, a2)
    ctx_a, ctx_b = a[0::2], b[0::2]
    assert (ctx_a - ctx_b).abs().max() > 1e-5  # context tokens: conditioned on the question
    torch.testing.assert_close(a[1::2], b[1::2])  # content tokens: not


def test_two_prompts_of_one_sample_give_two_token_sets(model):
    v = video(2, seed=1)
    with torch.no_grad():
        feats, _ = model.medium_features(v)
        both = model.vlm_attention(feats, ["what is the color?", "which shape moves left?"])
        one = model.vlm_attention(feats, ["which shape moves left?"])
    assert both.shape == (2, 4, 64)
    torch.testing.assert_close(both[1], one[0], atol=1e-5, rtol=1e-5)  # padding to the longest changes nothing
    assert (both[0] - both[1]).abs().max() > 1e-5


def test_context_and_content_tokens_as_described(model):
    """Recompute by hand: Q-Former on [queries ; ids] over LN(V0), then the attention formulas."""
    m = model.model
    v = video(1, seed=2)
    with torch.no_grad():
        got = model.encode_media([v], "what is moving?")[0]
        v0 = model.encode_frames(v.data.permute(1, 0, 2, 3))  # (1, 17, 64): CLS + 4x4
        tok = model.bert_tokenizer(["what is moving?"], return_tensors="pt")
        assert tok["input_ids"][0, 0] == model.bert_tokenizer.cls_token_id
        hidden = m.vlm_att_encoder.bert(query_embeds=m.vlm_att_query, input_ids=tok["input_ids"],
                                        attention_mask=torch.ones(1, 8 + tok["input_ids"].shape[1]),
                                        encoder_hidden_states=m.vlm_att_ln(v0))
        q = m.vlm_att_projector(hidden[:, :8])
        patches = v0[:, 1:]
        att = (q @ m.vlm_att_key_projector(patches).transpose(1, 2) / math.sqrt(64)).softmax(-1)
        ctx = m.vlm_att_val_projector((att @ patches).mean(1))
        content = m.mm_projector(patches.mean(1))
    torch.testing.assert_close(got[0], ctx[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], content[0], atol=1e-5, rtol=1e-5)


def test_grid_2_and_image_without_compression(bert_dir):
    grid = build_tiny(bert_dir, compress_type="grid:2")
    v = video(2, seed=3)
    with torch.no_grad():
        toks = grid.encode_media([v], "what?")[0]
        v0 = grid.encode_frames(v.data.permute(1, 0, 2, 3))[:, 1:]
        pooled = F.avg_pool2d(v0.reshape(2, 4, 4, 64).permute(0, 3, 1, 2), 2, 2).permute(0, 2, 3, 1).flatten(1, 2)
    assert toks.shape == (2 * 5, 64) and grid.tokens_per_frame == 5
    torch.testing.assert_close(toks.reshape(2, 5, 64)[:, 1:], grid.model.mm_projector(pooled), atol=1e-5, rtol=1e-5)
    full = build_tiny(bert_dir, compress_type="none")
    image = Media("image", torch.randn(3, 32, 32))
    with torch.no_grad():
        assert full.encode_media([image], "describe it")[0].shape == (1 + 16, 64)
    assert full.num_media_tokens(image) == 17


def test_full_size_token_counts_per_frame(bert_dir):
    from videollm.models.llama_vid import content_tokens

    assert 1 + content_tokens("mean", 256) == 2
    assert 1 + content_tokens("grid:2", 256) == 5 and 1 + content_tokens("grid:4", 256) == 17
    assert 1 + content_tokens(None, 256) == 257 and 1 + content_tokens(None, 576) == 577


# ------------------------------------------------------------------ batches
def _turns(*pairs):
    out = []
    for h, g in pairs:
        out += [{"from": "human", "value": h}, {"from": "gpt", "value": g}]
    return out


def test_stage2_batch_ids_labels_prompts(model):
    proc = LLaMAVIDProcessor("tiny", "imgsp_v1", 2048, 2)
    tok = proc.tokenizer
    random.seed(0)
    turns = _turns(("What is the color?\n<image>", "red"), ("Which shape?", "a circle"))
    batch = proc({"conversations": [turns, _turns(("hello", "hi"))], "media": [video(2), None]})
    ids, labels = batch["input_ids"][0, : batch["lengths"][0]].tolist(), batch["labels"][0, : batch["lengths"][0]].tolist()
    assert batch["prompts"][0] == ["What is the color?", "Which shape?"]
    assert ids.count(IMAGE_TOKEN_INDEX) == 2  # imgsp_v1 puts one into the later turn too
    # the supervised tokens are exactly the two answers and their </s>
    supervised = [i for i, lab in zip(ids, labels) if lab != -100]
    text = tok.decode([i for i in supervised])
    assert text.replace(" ", "") == "red</s>acircle</s>".replace(" ", "")
    assert labels[0] == -100 and ids[0] == tok.bos_token_id
    # text-only sample: plain tokenisation, no placeholder, its answer supervised
    n1 = batch["lengths"][1]
    assert IMAGE_TOKEN_INDEX not in batch["input_ids"][1, :n1].tolist()
    assert (batch["labels"][1, :n1] != -100).sum() > 0
    assert batch["attention_mask"][1, n1:].sum() == 0
    # the prompt starts as the v1 conversation with <image>\n moved to the turn's start
    prompt = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions. USER: <image>\nWhat is the color? ASSISTANT: red</s>")
    head = tokenizer_image_token(prompt, tok)
    assert ids[: len(head)] == head


def test_label_mismatch_masks_the_sample():
    proc = LLaMAVIDProcessor("tiny", "imgsp_v1", 2048, 2)
    # a user text holding "</s>" splits a round in two: the lengths no longer add up
    batch = proc({"conversations": [_turns(("<image>\nsay </s> now", "ok"))], "media": [video(1)]})
    assert (batch["labels"] != -100).sum() == 0


def test_stage1_plain_guided_batch():
    proc = LLaMAVIDProcessor("tiny", "plain_guided", 2048, 2)
    tok = proc.tokenizer
    batch = proc({"conversations": [_turns(("Describe the video briefly.\n<image>", "a red circle moves left"))],
                  "media": [video(2)]})
    ids = batch["input_ids"][0].tolist()
    assert batch["prompts"] == [["Describe the video briefly."]]  # the instruction goes to the Q-Former
    assert ids == tokenizer_image_token("<image>a red circle moves left\n", tok)
    assert ids[:2] == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    assert batch["labels"][0, :2].tolist() == [-100, -100] and batch["labels"][0, 2:].tolist() == ids[2:]


def test_stage3_long_video_batch_and_loss(bert_dir):
    model = build_tiny(bert_dir, stage=3)
    proc = model.batch_processor()
    feats = np.random.default_rng(0).standard_normal((5, 17, 64)).astype(np.float16)
    inputs = "<image>hello...<image><image>bye<image><image>"
    medium = feature_medium(feats, inputs, 2)
    batch = proc({"conversations": [_turns(("<image>\nWhat happened?", "a circle"))], "media": [medium]})
    ids = batch["input_ids"][0].tolist()
    assert batch["prompts"] == [["What happened?"]]
    assert ids.count(IMAGE_TOKEN_INDEX) == 10
    assert "..." not in proc.tokenizer.decode([i for i in ids if i >= 0])
    out = model(batch)
    assert torch.isfinite(out["loss"]) and out["num_tokens"] > 0
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"llm.model", "llm.lm_head", "model.mm_projector"}


def test_multi_question_feature_file_sample_refused_unless_movie_multi_turn(bert_dir, monkeypatch):
    # the original gives each later question an <image> a feature file has no tokens for (its model then
    # fails): refused and counted by default; movie_multi_turn keeps the later questions text only
    model = build_tiny(bert_dir, stage=3)
    feats = np.random.default_rng(0).standard_normal((3, 17, 64)).astype(np.float16)
    medium = feature_medium(feats, "<image>part one<image>part two<image>", 2)
    turns = _turns(("<image>\nWhat is in part one?", "a circle"), ("And in part two?", "a square"))
    single = _turns(("<image>\nWhat is in part one?", "a circle"))
    batch = model.batch_processor()({"conversations": [turns, single], "media": [medium, medium], "paths": ["a.pkl", "b.pkl"]})
    assert batch["num_samples"] == 1 and batch["bad_samples"] == [("a.pkl", "bad_annotation")]
    monkeypatch.setattr(model.cfg, "movie_multi_turn", True)
    model._processor = None
    batch = model.batch_processor()({"conversations": [turns, single], "media": [medium, medium]})
    assert batch["num_samples"] == 2 and batch["prompts"] == [["What is in part one?"], ["What is in part one?"]]
    n = batch["lengths"][0]
    ids, labels = batch["input_ids"][0, :n].tolist(), batch["labels"][0, :n].tolist()
    assert ids.count(IMAGE_TOKEN_INDEX) == 6  # the movie's tokens once, in the first question
    tok = model.batch_processor().tokenizer
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != -100]).replace(" ", "") == "acircle</s>asquare</s>"
    # the one-question sample is the same with or without the option
    n1 = batch["lengths"][1]
    monkeypatch.setattr(model.cfg, "movie_multi_turn", False)
    model._processor = None
    plain = model.batch_processor()({"conversations": [single], "media": [medium]})
    assert plain["input_ids"][0].tolist() == batch["input_ids"][1, :n1].tolist()
    assert plain["labels"][0].tolist() == batch["labels"][1, :n1].tolist()
    with torch.no_grad():
        out = model(batch)
    assert torch.isfinite(out["loss"])


def test_model_max_length_cuts_the_ids_not_the_sequence_with_media(model, monkeypatch):
    # the original's collator cuts the ids at model_max_length; the media tokens then go in uncut
    # (a sample may grow past it); cut_after_media=True cuts the sequence after (an option)
    batch = model.batch_processor()({"conversations": [_turns(("<image>\nWhat is the color?", "red"))],
                                     "media": [video(3)]})
    n_ids = int(batch["lengths"][0])  # one <image> id; 3 frames x 2 tokens take its place
    with torch.no_grad():
        ref = model(dict(batch))
        monkeypatch.setattr(model.cfg, "model_max_length", n_ids)
        same = model(dict(batch))
        monkeypatch.setattr(model.cfg, "cut_after_media", True)
        cut = model(dict(batch))
    assert ref["seq_len"] == same["seq_len"] == n_ids - 1 + 6
    assert torch.equal(same["loss"], ref["loss"]) and same["num_tokens"] == ref["num_tokens"]
    assert cut["seq_len"] == n_ids and cut["num_tokens"] < ref["num_tokens"]  # the answer's tail is cut off


def test_training_step_reduces_loss_stage2(bert_dir):
    model = build_tiny(bert_dir, stage=2)
    model.train()
    proc = model.batch_processor()
    batch = proc({"conversations": [_turns(("<image>\nWhat is the color?", "red")),
                                    _turns(("<image>\nWhat is the shape?", "square"))],
                  "media": [video(2, 4), Media("image", torch.randn(3, 32, 32))]})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("model.vision_tower."))


# ------------------------------------------------------------------ long video
def test_feature_file_round_trip_and_chunking(tmp_path, bert_dir):
    from videollm.long_video import interleave_subtitles, movie_block, parse_srt, read_feature_file, write_feature_file
    from videollm.models.llama_vid import load_feature_media

    srt = tmp_path / "m.srt"
    srt.write_text("1\n00:00:00,500 --> 00:00:01,500\nHello...\nthere\n\n2\n00:00:02,100 --> 00:00:03,900\nBye\n")
    subs = parse_srt(srt)
    assert subs == [{"start_time": 0.5, "end_time": 1.5, "text": "Hello there"},
                    {"start_time": 2.1, "end_time": 3.9, "text": "Bye"}]
    inputs = interleave_subtitles(subs, [0.0, 1.0, 2.0, 3.0, 4.0])
    assert inputs == "<image><image>Hello there<image><image>Bye<image>"
    feats = np.random.default_rng(1).standard_normal((5, 17, 64)).astype(np.float16)
    write_feature_file(tmp_path / "m.pkl", feats, inputs)
    back, text = read_feature_file(tmp_path / "m.pkl")
    assert back.dtype == np.float16 and np.array_equal(back, feats) and text == inputs
    medium = load_feature_media(tmp_path / "m.pkl", 2)
    assert medium.data.shape == (5, 16, 64) and medium.meta["placeholders"] == 10
    assert medium.meta["msg"] == movie_block(inputs, 2) and medium.meta["msg"].count("<image>") == 10
    small = build_tiny(bert_dir, frame_chunk=2)
    big = build_tiny(bert_dir, frame_chunk=64)
    with torch.no_grad():
        a = small.encode_media([medium], "what?")[0]
        b = big.encode_media([medium], "what?")[0]
    assert a.shape == (10, 64)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    (tmp_path / "bad.pkl").write_bytes(b"\x80\x04cos\nsystem\n.")
    with pytest.raises(DataError, match="refused"):
        read_feature_file(tmp_path / "bad.pkl")


# ------------------------------------------------------------------ checkpoints
def _write_released(model, folder: Path, layout: str, eva_path: Path) -> None:
    state = model.released_state_dict()
    folder.mkdir(parents=True)
    cfg = model.llm.config.to_dict()
    cfg.update(model_type="llava", architectures=["LlavaLlamaAttForCausalLM"], mm_vision_tower=str(eva_path),
               image_processor="./llamavid/processor/clip-patch14-224", compress_type="mean", num_query=8,
               bert_type="qformer_pretrain", mm_projector_type="mlp2x_gelu", mm_hidden_size=64,
               mm_vision_select_feature="patch", image_aspect_ratio="pad")
    (folder / "config.json").write_text(json.dumps(cfg))
    if layout == "sharded":
        keys = sorted(state)
        halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        weight_map = {}
        for name, ks in halves.items():
            torch.save({k: state[k].clone() for k in ks}, folder / name)
            weight_map.update({k: name for k in ks})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif layout == "single":
        torch.save({k: v.clone() for k, v in state.items()}, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.clone().contiguous() for k, v in state.items()}, folder / "model.safetensors")


@pytest.mark.parametrize("layout", ["sharded", "single", "safetensors"])
def test_released_folder_loads_unchanged(tmp_path, bert_dir, model, layout):
    eva = tmp_path / "eva_vit_g.pth"
    torch.save(model.model.vision_tower.vision_tower.state_dict(), eva)
    _write_released(model, tmp_path / "llama-vid-tiny", layout, eva)
    cfg = tiny_cfg(bert_dir, model_path=str(tmp_path / "llama-vid-tiny"), llm_config={}, compress_type=None,
                   num_query=None, vision_tower=None, image_size=32)
    loaded = LLaMAVID.from_config(cfg)
    assert loaded.compress_type == "mean" and loaded.num_query == 8  # from the released config.json
    ours, theirs = model.state_dict(), loaded.state_dict()
    for key in ours:
        if key.startswith("model.vision_tower.") or key.startswith(("model.vlm_att", "model.mm_projector", "llm.")):
            torch.testing.assert_close(theirs[key], ours[key], msg=key)


def test_eva_path_error_names_the_override(tmp_path, bert_dir, model):
    _write_released(model, tmp_path / "llama-vid", "single", Path("./model_zoo/LAVIS/eva_vit_g.pth"))
    cfg = tiny_cfg(bert_dir, model_path=str(tmp_path / "llama-vid"), llm_config={}, vision_tower=None, image_size=32)
    with pytest.raises(ConfigError, match=r"model\.vision_tower.*overrides"):
        LLaMAVID.from_config(cfg)
    eva = tmp_path / "eva.pth"
    torch.save(model.model.vision_tower.vision_tower.state_dict(), eva)
    LLaMAVID.from_config({**cfg, "vision_tower": str(eva)})  # the override wins


def test_stage1_inits_from_instructblip_and_saves_mm_projector(tmp_path, bert_dir, model):
    src = model.state_dict()
    blip = {"Qformer.bert." + k[len("model.vlm_att_encoder.bert."):]: v.clone() + 1
            for k, v in src.items() if k.startswith("model.vlm_att_encoder.bert.")}
    blip["Qformer.bert.embeddings.position_ids"] = src["model.vlm_att_encoder.bert.embeddings.position_ids"]
    blip["ln_vision.weight"] = torch.full((64,), 2.0)
    blip["ln_vision.bias"] = torch.zeros(64)
    blip["query_tokens"] = torch.full((1, 8, 64), 0.5)
    blip["Qformer.cls.predictions.bias"] = torch.zeros(3)  # InstructBLIP extras are ignored
    blip["llm_proj.weight"] = torch.zeros(2, 2)
    torch.save({"model": blip}, tmp_path / "instruct_blip_trimmed.pth")
    stage1 = build_tiny(bert_dir, stage=1, pretrain_qformer=str(tmp_path / "instruct_blip_trimmed.pth"))
    got = stage1.state_dict()
    torch.testing.assert_close(got["model.vlm_att_query"], torch.full((1, 8, 64), 0.5))
    torch.testing.assert_close(got["model.vlm_att_ln.weight"], torch.full((64,), 2.0))
    key = "model.vlm_att_encoder.bert.encoder.layer.1.output.dense.weight"
    torch.testing.assert_close(got[key], src[key] + 1)
    trainable = sorted({n.rsplit(".", 1)[0] for n, p in stage1.named_parameters() if p.requires_grad})
    assert trainable == ["model.mm_projector.0", "model.mm_projector.2", "model.vlm_att_key_projector",
                         "model.vlm_att_projector", "model.vlm_att_val_projector"]
    adapter = stage1.adapter_state_dict()
    assert "model.vlm_att_encoder.bert.encoder.layer.0.attention.self.query.weight" in adapter
    assert not any(k.startswith(("llm.", "lm_head", "model.layers")) for k in adapter)
    torch.save(adapter, tmp_path / "mm_projector.bin")
    stage2 = build_tiny(bert_dir, seed=5, stage=2, pretrain_mm_mlp_adapter=str(tmp_path / "mm_projector.bin"))
    for k in adapter:
        torch.testing.assert_close(stage2.state_dict()[k], adapter[k])


def test_rope_scaling_for_64k(bert_dir):
    m = build_tiny(bert_dir, model_max_length=65536, llm_config={**tiny_cfg(bert_dir)["llm_config"],
                                                                  "max_position_embeddings": 4096})
    rope = m.llm.config.rope_parameters
    assert rope["factor"] == 16.0 and rope["rope_type"] == "linear"
    inv = m.llm.model.rotary_emb.inv_freq
    plain = build_tiny(bert_dir).llm.model.rotary_emb.inv_freq
    torch.testing.assert_close(inv, plain / 16)  # linear scaling: positions divided by 16


# ------------------------------------------------------------------ chat
def test_chat_moves_media_to_latest_turn_and_reencodes(model, monkeypatch):
    from videollm.chat import Chat
    from videollm.templates import get_template

    chat = Chat(model)
    conv = get_template("llamavid_llava_v1").new_conversation()
    imgs = []
    medium = video(2)
    chat._add(conv, imgs, [medium], "video")
    seen = []
    original = model.encode_media

    def spy(media, text=None):
        seen.append(text)
        return original(media, text)

    monkeypatch.setattr(model, "encode_media", spy)
    chat.ask("What is the color?", conv)
    chat.answer(conv, imgs, max_new_tokens=3)
    assert conv.get_prompt().startswith("A chat between a curious human")
    assert "USER: <image>\nWhat is the color? ASSISTANT:" in conv.get_prompt()
    chat.ask("Which shape?", conv)
    prompt = conv.get_prompt()
    assert "USER: What is the color? ASSISTANT:" in prompt and prompt.count("<image>") == 1
    assert prompt.endswith("USER: <image>\nWhich shape? ")
    chat.answer(conv, imgs, max_new_tokens=3)
    assert seen == ["What is the color?", "Which shape?"]


def test_chat_with_feature_file(tmp_path, model):
    from videollm.chat import Chat
    from videollm.long_video import MOVIE_END, write_feature_file
    from videollm.templates import get_template

    feats = np.random.default_rng(2).standard_normal((3, 17, 64)).astype(np.float16)
    write_feature_file(tmp_path / "movie.pkl", feats, "<image>hi<image><image>")
    chat = Chat(model)
    conv = get_template("llamavid_vicuna_v1").new_conversation()
    imgs = []
    chat.upload_video_without_audio(str(tmp_path / "movie.pkl"), conv, imgs)
    chat.ask("What is said?", conv)
    assert conv.messages[0][1].endswith(MOVIE_END + "\nWhat is said?")
    assert chat._question(conv, get_template("llamavid_vicuna_v1"), imgs) == "What is said?"
    text, ids = chat.answer(conv, imgs, max_new_tokens=2)
    assert isinstance(text, str)


@pytest.mark.parametrize("path", [
    "train_configs/llama_vid_stage1_pretrain_7b.yaml", "train_configs/llama_vid_stage2_finetune_7b.yaml",
    "train_configs/llama_vid_stage3_longvideo_7b.yaml", "train_configs/llama_vid_tiny_synthetic.yaml",
    "train_configs/llama_vid_tiny_synthetic_long.yaml", "train_configs/llama_vid_tiny_synthetic_long_more.yaml",
    "eval_configs/llama_vid_tiny.yaml",
    "eval_configs/llama_vid_7b_video.yaml", "eval_configs/llama_vid_7b_longvideo.yaml"])
def test_recipes_validate(path):
    from videollm.config import load_config

    root = Path(__file__).resolve().parents[1]
    text = (root / path).read_text()
    assert text.startswith("#")  # the header: command, hardware, time, result
    cfg = load_config(str(root / path), [])
    assert cfg.model.arch == "llama_vid"
    if "stage" in path or "synthetic" in path:
        stage = 1 if "stage1" in path else 3 if ("stage3" in path or "long" in path) else 2
        assert cfg.model.stage == stage
        assert cfg.model.conv_template == ("plain_guided" if stage == 1 else "imgsp_v1")
    if "stage3" in path:
        assert cfg.model.model_max_length == 65536


def test_dataset_builder_emits_media_and_conversations(tmp_path):
    from videollm.datasets.llama_vid_datasets import LLaMAVIDJsonDataset
    from videollm.long_video import write_feature_file
    from videollm.synthetic import ClipSpec, ImageSpec, render_image, write_clip
    from PIL import Image

    write_clip(tmp_path / "c.mp4", ClipSpec("c", "circle", "red", "left", "slow"), width=32, height=32, fps=4,
               duration=3)
    Image.fromarray(render_image(ImageSpec("i", "square", "blue"), size=(48, 24))).save(tmp_path / "i.png")
    write_feature_file(tmp_path / "m.pkl", np.zeros((2, 17, 64), np.float16), "<image>a<image>")
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    items = [{"id": 1, "video": "c.mp4", "conversations": conv}, {"id": 2, "image": "i.png", "conversations": conv},
             {"id": 3, "video": "m.pkl", "conversations": conv}, {"id": 4, "conversations": conv},
             {"id": 5, "video": "missing.mp4", "conversations": conv}]
    (tmp_path / "d.json").write_text(json.dumps(items))
    ds = LLaMAVIDJsonDataset(str(tmp_path / "d.json"), str(tmp_path), str(tmp_path), image_size=32)
    batch = ds.collater([ds[i] for i in range(len(ds))])
    kinds = [m.kind if m is not None else None for m in batch["media"]]
    assert kinds == ["video", "image", "features", None] and batch["num_samples"] == 4
    assert batch["media"][0].data.shape == (3, 3, 32, 32)  # 3 s at 4 fps -> step 4 -> 3 frames
    image = batch["media"][1].data  # padded square with the mean colour before the CLIP processor
    assert image.shape == (3, 32, 32) and image[:, 0].abs().max() < 0.02  # the pad rows normalise to ~0
    assert batch["media"][2].data.shape == (2, 16, 64) and batch["media"][2].meta["inputs"] == "<image>a<image>"
    assert len(batch["bad_samples"]) == 1


def test_eva_position_embedding_interpolated_and_rounded_to_fp16(tmp_path, bert_dir, model):
    """336 px from a 224 px checkpoint: pos_embed resized bicubically from the file's grid, then the
    tower is cast whole to fp16 (the original's vision_tower.to(float16)), rounding it too."""
    from videollm.models.eva_vit import interpolate_pos_embed

    eva = tmp_path / "eva.pth"
    state = model.model.vision_tower.vision_tower.state_dict()  # 32 px, 4x4 grid
    torch.save(state, eva)
    big = build_tiny(bert_dir, image_size=48, vision_tower=str(eva), vit_precision="fp16")  # 6x6 grid
    pos = big.model.vision_tower.vision_tower.pos_embed
    assert pos.dtype == torch.float16 and pos.shape == (1, 37, 64)
    torch.testing.assert_close(pos, interpolate_pos_embed(state["pos_embed"], 6).half(), atol=0, rtol=0)
    assert big.encode_media([Media("image", torch.randn(3, 48, 48))], "what?")[0].shape == (2, 64)


def test_clip_processor_matches_transformers():
    import transformers
    from PIL import Image

    from videollm.processors.clip_image import CLIPImageProcessor, fps_indices

    ref = transformers.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                          do_center_crop=True, resample=3)
    for shape in ((180, 300, 3), (301, 200, 3)):
        img = Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8))
        want = torch.tensor(np.asarray(ref.preprocess(img, return_tensors="np")["pixel_values"][0]))
        torch.testing.assert_close(CLIPImageProcessor(224)(img), want, atol=1e-6, rtol=0)
    assert fps_indices(100, 29.97) == list(range(0, 100, 30)) and fps_indices(10, 4.0) == [0, 4, 8]


def test_feature_extraction_subcommand_and_batch_inference(tmp_path, bert_dir):
    from videollm import features, infer
    from videollm.long_video import read_feature_file
    from videollm.synthetic import ClipSpec, write_clip

    write_clip(tmp_path / "v.mp4", ClipSpec("v", "circle", "red", "left", "slow"), width=32, height=32, fps=4, duration=3)
    (tmp_path / "v.srt").write_text("1\n00:00:00,000 --> 00:00:01,500\nhello there\n")
    tiny = Path(__file__).resolve().parents[1] / "videollm/configs/models/llama_vid_tiny.yaml"
    assert features.main(["llama-vid", "--video", str(tmp_path / "v.mp4"), "--out", str(tmp_path / "f"),
                          "--model-config", str(tiny), "--device", "cpu"]) == 0
    feats, inputs = read_feature_file(tmp_path / "f" / "v.pkl")
    assert feats.shape == (3, 17, 64) and feats.dtype == np.float16
    assert inputs == "<image><image>hello there<image>"
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model:\n  arch: llama_vid\n  model_type: tiny\n  stage: 0\n  bert_tokenizer: {bert_dir}\n"
                   "  chat_template: llamavid_vicuna_v1\n")
    (tmp_path / "q.jsonl").write_text(json.dumps({"video": "v.mp4", "question": "What color?"}) + "\n"
                                      + json.dumps({"video": "f/v.pkl", "question": "What is said?"}) + "\n")
    rc = infer.main(["--cfg-path", str(cfg), "--input", str(tmp_path / "q.jsonl"), "--output",
                     str(tmp_path / "a.jsonl"), "--max-new-tokens", "3", "--cpu"])
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert rc == 0 and len(lines) == 2 and all("answer" in x for x in lines), lines


def test_generation_inputs_for_evaluation(model):
    """The eval scripts' vicuna_v1 prompt, tokens conditioned on each row's question, left-padded."""
    batch = {"media": [video(2), Media("image", torch.randn(3, 32, 32))], "questions": ["What color?", "Which shape is it?"]}
    with torch.no_grad():
        embeds, mask = model.generation_inputs(batch)
        out = model.generate(embeds, mask, max_new_tokens=2, do_sample=False)
    assert embeds.shape[0] == 2 and mask[:, -1].tolist() == [1, 1] and out.shape == (2, 2)
    assert mask[0].sum() != mask[1].sum()  # a video of 2 frames (4 tokens) vs an image (2 tokens), different texts


def test_long_video_model_turns_a_video_file_into_features(tmp_path, bert_dir):
    from videollm.chat import Chat
    from videollm.long_video import MOVIE_START
    from videollm.synthetic import ClipSpec, write_clip
    from videollm.templates import get_template

    write_clip(tmp_path / "m.mp4", ClipSpec("m", "square", "green", "up", "slow"), width=32, height=32, fps=2, duration=3)
    (tmp_path / "m.srt").write_text("1\n00:00:00,000 --> 00:00:01,200\nhi\n")  # found next to the video
    model = build_tiny(bert_dir, long_video=True)
    chat = Chat(model)
    conv, imgs = get_template("llamavid_vicuna_v1").new_conversation(), []
    chat.upload_video_without_audio(str(tmp_path / "m.mp4"), conv, imgs)
    assert imgs[0].media.kind == "features" and imgs[0].media.meta["placeholders"] == 6
    assert conv.messages[0][1].startswith(MOVIE_START + "<image><image><image><image>hi<image><image>")
    chat.ask("What is shown?", conv)
    text, _ = chat.answer(conv, imgs, max_new_tokens=2)
    assert isinstance(text, str)
