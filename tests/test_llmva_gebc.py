"""LLMVA-GEBC (arch llmva_gebc): full-size layout on the meta device, tiny-model behaviour."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import videollm.models  # noqa: F401
from videollm.config import build_model_config
from videollm.datasets.llmva_gebc_datasets import build_prompt
from videollm.registry import registry

PROMPTS = [
    "This video describes the change of color.The subject is",
    "This video describes the change of direction.Status before change is",
]


def tiny_model(**overrides) -> torch.nn.Module:
    cfg = build_model_config(OmegaConf.create({"arch": "llmva_gebc", "model_type": "tiny", **overrides}))
    torch.manual_seed(0)
    return registry.get_model_class("llmva_gebc").from_config(cfg)


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


def features(b=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image_query_tokens": torch.randn(b, t, 8, 64, generator=g),
            "other_features_list": torch.randn(b, 32, 1, 48, generator=g),
            "reference_points": torch.tensor([[0.3, 0.5], [0.7, 0.4]][:b], dtype=torch.float64)}


# ---------------------------------------------------------------------------- full size
def test_opt13b_final_config_layout_and_trainable_count_on_meta():
    cfg = build_model_config(OmegaConf.create({"arch": "llmva_gebc", "model_type": "opt13b",
                                               "tokenizer": "assets/gebc_tiny_tokenizer"}))
    with torch.device("meta"):
        m = registry.get_model_class("llmva_gebc").from_config(cfg)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 45_445_376
    assert all(not p.requires_grad for n, p in m.named_parameters() if n.startswith("opt_model."))
    sd = m.state_dict()
    tops = {k.split(".")[0] for k in sd if not k.startswith("opt_model.")}
    assert tops == {"video_frame_position_embedding", "video_Qformer", "video_query_tokens", "temporal_pos_trans",
                    "temporal_pos_trans_norm", "other_feat_linear", "other_feat_position_embedding",
                    "other_feat_Qformer", "other_feat_query_tokens", "other_feat_temporal_pos_trans",
                    "other_feat_temporal_pos_trans_norm", "opt_proj"}
    shapes = {
        "video_frame_position_embedding.weight": (32, 768), "video_query_tokens": (1, 32, 768),
        "other_feat_query_tokens": (1, 8, 768), "other_feat_linear.weight": (768, 3072),
        "other_feat_position_embedding.weight": (128, 768), "temporal_pos_trans.weight": (768, 768),
        "other_feat_temporal_pos_trans_norm.weight": (768,), "opt_proj.weight": (5120, 768),
        "video_Qformer.bert.encoder.layer.1.crossattention.self.key.weight": (768, 768),
        "other_feat_Qformer.bert.encoder.layer.0.intermediate_query.dense.weight": (3072, 768),
        "video_Qformer.bert.embeddings.LayerNorm.weight": (768,),
        "opt_model.model.decoder.embed_tokens.weight": (50272, 5120),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    # the original deletes the text parts of both video Q-Formers
    for prefix in ("video_Qformer.", "other_feat_Qformer."):
        names = [k for k in sd if k.startswith(prefix)]
        assert not [k for k in names if ".intermediate." in k or ".output.dense" in k and "attention" not in k]
        assert not [k for k in names if "word_embeddings" in k or ".cls." in k]
        assert len({k.split(".")[4] for k in names if ".layer." in k}) == 2  # two layers


# ---------------------------------------------------------------------------- encoders
def test_boundary_sinusoid_matches_hand_formula(model):
    ref = torch.tensor([[0.25, 0.5], [-1.0, 2.0]], dtype=torch.float64)
    got = model.get_proposal_pos_embed(ref)
    assert got.shape == (2, 1, 64) and got.dtype == torch.float32
    half = 32
    for b in range(2):
        for c in range(2):
            v = 1 / (1 + math.exp(-float(ref[b, c]))) * 2 * math.pi
            for i in range(half):
                x = v / 10000 ** (2 * (i // 2) / half)
                want = math.sin(x) if i % 2 == 0 else math.cos(x)
                assert abs(float(got[b, 0, c * half + i]) - want) < 1e-6


def test_boundary_embedding_added_to_every_query_of_both_qformers(model, monkeypatch):
    seen = {}
    for name in ("video_Qformer", "other_feat_Qformer"):
        bert = getattr(model, name).bert
        orig = bert.forward

        def spy(*a, _orig=orig, _name=name, **kw):
            seen[_name] = kw["query_embeds"].detach().clone()
            return _orig(*a, **kw)

        monkeypatch.setattr(bert, "forward", spy)
    batch = features()
    with torch.no_grad():
        model.visual_tokens(batch)
        emb_v = model.boundary_embedding(batch["reference_points"], "video")
        emb_o = model.boundary_embedding(batch["reference_points"], "other")
    for name, tokens, emb, n in (("video_Qformer", model.video_query_tokens, emb_v, 32),
                                 ("other_feat_Qformer", model.other_feat_query_tokens, emb_o, 8)):
        added = seen[name] - tokens.detach()
        assert added.shape == (2, n, 64)
        torch.testing.assert_close(added, emb.expand(-1, n, -1))  # the same vector on every query
        assert not torch.allclose(added[0], added[1])  # and it depends on the boundary
    assert not torch.allclose(emb_v, emb_o)  # each branch has its own Linear + LayerNorm


def test_visual_tokens_are_32_plus_8_through_the_shared_projection(model):
    batch = features()
    with torch.no_grad():
        v = model.visual_tokens(batch)
        assert v.shape == (2, 40, model.opt_model.config.hidden_size)
        other = dict(batch, other_features_list=batch["other_features_list"] + 1.0)
        v2 = model.visual_tokens(other)
        torch.testing.assert_close(v[:, :32], v2[:, :32])  # Q-Former tokens -> first 32
        assert not torch.allclose(v[:, 32:], v2[:, 32:])  # other features -> last 8
        swapped = dict(batch, image_query_tokens=batch["image_query_tokens"].flip(1))
        assert not torch.allclose(model.visual_tokens(swapped)[:, :32], v[:, :32])  # frame positions count
        # both branches end in the one opt_proj
        hidden = model.video_Qformer.bert(query_embeds=model.video_query_tokens.expand(2, -1, -1)
                                          + model.boundary_embedding(batch["reference_points"], "video"),
                                          encoder_hidden_states=(batch["image_query_tokens"] + model.video_frame_position_embedding(
                                              torch.arange(12)).unsqueeze(1)).reshape(2, 96, 64))
        torch.testing.assert_close(model.opt_proj(hidden), v[:, :32])


def test_num_media_tokens_and_encode_media(model):
    from videollm.models.base import Media

    b = features(1)
    medium = Media("features", {k: v[0] for k, v in b.items()})
    assert model.num_media_tokens(medium) == 40
    with torch.no_grad():
        torch.testing.assert_close(model.encode_media([medium])[0], model.visual_tokens(b)[0])


# ---------------------------------------------------------------------------- text side
def test_prompt_join_has_no_space():
    assert build_prompt("Change of Color", "subject") == PROMPTS[0]
    assert build_prompt("Change of Direction", "status_before") == PROMPTS[1]
    assert build_prompt("Shot Change", "status_after") == "This video describes the shot change.Status after change is"


def test_label_layout(model):
    tok = model.tokenizer
    batch = dict(features(), prompt=PROMPTS, text_input=["the red circle", "the blue square is moving left"])
    merged = model.llm_inputs(batch)
    prefix = tok("Video:", add_special_tokens=False)["input_ids"]
    p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    c_ids = [tok(t + "</s>", add_special_tokens=False)["input_ids"] for t in batch["text_input"]]
    assert all(c[-1] == tok.eos_token_id for c in c_ids)
    lp, lc = max(map(len, p_ids)), max(map(len, c_ids))
    assert merged.labels.shape[1] == 1 + len(prefix) + 40 + lp + lc
    emb = model.opt_model.get_input_embeddings().weight
    for i in range(2):
        mask, labels = merged.attention_mask[i], merged.labels[i]
        start = 1 + len(prefix) + 40
        want_mask = [1] * start + [1] * len(p_ids[i]) + [0] * (lp - len(p_ids[i])) + [1] * len(c_ids[i]) + [0] * (lc - len(c_ids[i]))
        assert mask.tolist() == want_mask  # prompt padded in the middle, as the original
        want_labels = [-100] * (start + lp) + c_ids[i] + [-100] * (lc - len(c_ids[i]))
        assert labels.tolist() == want_labels
        torch.testing.assert_close(merged.inputs_embeds[i, 0], emb[tok.bos_token_id])
        torch.testing.assert_close(merged.inputs_embeds[i, 1:1 + len(prefix)], emb[prefix])
        torch.testing.assert_close(merged.inputs_embeds[i, start:start + len(p_ids[i])], emb[p_ids[i]])


def test_caption_cut_at_max_txt_len_loses_its_eos(model):
    long = " ".join(["the red circle is moving left"] * 10)
    out = model.prepare_batch(dict(features(1), prompt=PROMPTS[:1], text_input=[long]))
    assert out["caption_ids"].shape == (1, 30)
    assert int(out["caption_ids"][0, -1]) != model.tokenizer.eos_token_id


def test_loss_is_the_token_mean_over_the_three_caption_types(model):
    """Three samples of one boundary (one per type): the loss is the mean over all caption tokens,
    i.e. each type's summed token loss over the total count."""
    b = features(1)
    batch = {k: v.repeat(3, *[1] * (v.dim() - 1)) for k, v in b.items()}
    types = ["subject", "status_before", "status_after"]
    batch["prompt"] = [build_prompt("Change of Color", t) for t in types]
    batch["text_input"] = ["the circle", "the red circle is moving left", "the blue circle is moving left"]
    with torch.no_grad():
        out = model(batch)
        merged = model.llm_inputs(batch)
        logits = model.opt_model(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask).logits
    per_type_sum, counts = [], []
    for i in range(3):
        lab = merged.labels[i, 1:]
        keep = lab != -100
        per_type_sum.append(F.cross_entropy(logits[i, :-1][keep], lab[keep], reduction="sum"))
        counts.append(int(keep.sum()))
    assert counts == [len(model.tokenizer(t + "</s>", add_special_tokens=False)["input_ids"]) for t in batch["text_input"]]
    torch.testing.assert_close(out["loss"], sum(per_type_sum) / sum(counts))
    assert int(out["num_tokens"]) == sum(counts)


# ---------------------------------------------------------------------------- generation
def test_generation_keeps_the_originals_mid_prompt_padding(model):
    """As the original's batched generate: a shorter prompt is right-padded BEFORE the generated
    tokens, so its first token is predicted at a pad position; the longest row is unaffected."""
    batch = dict(features(), prompt=PROMPTS)  # PROMPTS[0] is the shorter one
    with torch.no_grad():
        embeds, mask = model.generation_inputs(batch)
        assert mask[0, -1] == 0 and mask[1, -1] == 1
        both = model.generate(embeds, mask, num_beams=1, max_length=4)
        pos = torch.cumsum(mask, 1) * mask - 1
        logits = model.opt_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, -1]
        assert both[:, 0].tolist() == logits.argmax(-1).tolist()
        alone = [model.generate_captions({k: v[i:i + 1] for k, v in batch.items()}) for i in range(2)]
        assert model.generate_captions(batch)[1] == alone[1][0]


def test_greedy_matches_transformers_greedy(model):
    # equal prompt lengths: no pad position to predict from (where 4.28's OPT put position 1 and
    # current transformers' generate puts 3)
    batch = dict(features(), prompt=[PROMPTS[1], PROMPTS[1]])
    with torch.no_grad():
        embeds, mask = model.generation_inputs(batch)
        ours = model.generate(embeds, mask, num_beams=1, max_length=12)
        hf = model.opt_model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=1,
                                      max_new_tokens=11, eos_token_id=2, pad_token_id=1)
    for a, b in zip(ours.tolist(), hf.tolist()):
        cut = lambda s: s[: s.index(2) + 1] if 2 in s else s  # noqa: E731
        assert cut(a) == cut(b)


def test_decoding_settings_come_from_the_config():
    m = tiny_model(decoding="greedy").eval()
    batch = dict(features(), prompt=PROMPTS)
    with torch.no_grad():
        embeds, mask = m.generation_inputs(batch)
        assert torch.equal(m.generate(embeds, mask), m.generate(embeds, mask, num_beams=1))


# ---------------------------------------------------------------------------- checkpoints
def test_loads_a_video_llama_stage1_checkpoint_and_drops_llama_proj(tmp_path):
    ref = tiny_model()
    torch.manual_seed(123)
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
             for k, v in ref.state_dict().items() if k.startswith(("video_Qformer.", "video_query_tokens",
                                                                      "video_frame_position_embedding."))}
    state["llama_proj.weight"] = torch.randn(5120, 64)  # the Vicuna-13B projection of stage 1
    state["llama_proj.bias"] = torch.randn(5120)
    path = tmp_path / "pretrain-vicuna13b.pth"
    torch.save({"model": state, "optimizer": None, "epoch": 3}, path)  # the LAVIS layout
    m = tiny_model(ckpt=str(path))
    own = m.state_dict()
    for k, v in state.items():
        if k.startswith("llama_proj"):
            assert k not in own
        else:
            assert torch.equal(own[k], v), k
    torch.testing.assert_close(own["opt_proj.weight"], ref.state_dict()["opt_proj.weight"])  # untouched


def test_checkpoint_missing_video_branch_is_an_error(tmp_path):
    from videollm.errors import CheckpointError

    path = tmp_path / "bad.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(3, 3)}}, path)
    with pytest.raises(CheckpointError, match="bad.pth"):
        tiny_model(ckpt=str(path))


def test_trainable_state_dict_roundtrip_in_lavis_layout(tmp_path):
    m = tiny_model(freeze_llm=True)
    sd = m.trainable_state_dict()
    assert not [k for k in sd if k.startswith("opt_model.")]
    assert "opt_proj.weight" in sd and "other_feat_query_tokens" in sd
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": sd, "optimizer": {}, "config": {}, "scaler": None, "epoch": 4}, path)
    m2 = tiny_model(freeze_llm=True, ckpt=str(path))
    for k, v in sd.items():
        assert torch.equal(m2.state_dict()[k], v)


@pytest.mark.parametrize("path", ["train_configs/llmva_gebc_opt13b.yaml", "eval_configs/llmva_gebc_opt13b_eval.yaml",
                                  "train_configs/llmva_gebc_tiny_synthetic.yaml", "eval_configs/llmva_gebc_tiny_synthetic.yaml"])
def test_recipes_validate(path):
    from pathlib import Path

    from videollm.config import load_config
    from videollm.registry import import_all

    import_all()
    cfg = load_config(Path(__file__).resolve().parents[1] / path)
    assert cfg.model.arch == "llmva_gebc" and cfg.run.task == "boundary_captioning"
    if "opt13b" in path:  # the original's final settings
        assert (cfg.model.num_other_feat_query_token, cfg.model.other_feat_total_size, cfg.model.max_txt_len) == (8, 3072, 30)
        assert (cfg.model.num_beams, cfg.model.max_len, cfg.model.min_len) == (2, 30, 1)
    if path.startswith("train_configs/llmva_gebc_opt13b"):
        r = cfg.run
        assert (r.init_lr, r.min_lr, r.warmup_lr, r.warmup_steps, r.max_epoch, r.batch_size_train) == (8e-5, 1e-5, 1e-6, 5000, 5, 16)
        assert cfg.model.ckpt.endswith("pretrain-vicuna13b.pth")


def test_fix_prompt_padding_makes_captions_independent_of_the_batch():
    m = tiny_model(fix_prompt_padding=True).eval()
    batch = dict(features(), prompt=PROMPTS)
    with torch.no_grad():
        both = m.generate_captions(batch, num_beams=1, max_length=8)
        alone = [m.generate_captions({k: v[i:i + 1] for k, v in batch.items()}, num_beams=1, max_length=8)[0]
                 for i in range(2)]
        assert both == alone
        merged = m.llm_inputs(dict(batch, text_input=["the red circle", "the circle"]))
    for row in merged.attention_mask.tolist():
        assert row == sorted(row, reverse=True)  # pads only at the end of a training row
    assert 0 in merged.attention_mask[0].tolist() + merged.attention_mask[1].tolist()


def test_batch_without_features_is_a_clear_error(model):
    from videollm.errors import PromptError

    with pytest.raises(PromptError, match="reference_points"):
        model.visual_tokens({"image_query_tokens": torch.zeros(1, 2, 8, 64), "other_features_list": torch.zeros(1, 4, 1, 48)})
