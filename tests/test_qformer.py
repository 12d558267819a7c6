"""Tests of videollm.models.qformer: tiny random-weight Q-Formers, HF parity, full sizes on the meta device."""

from __future__ import annotations

import pytest
import torch

from videollm.errors import ConfigError
from videollm.models.qformer import QFormer, QFormerConfig, build_qformer

HIDDEN, HEADS, INTER, ENC = 32, 4, 37, 24


def tiny(num_layers: int = 4, freq: int = 2, num_query: int = 5, **kw):
    return build_qformer(
        num_query, ENC, num_hidden_layers=num_layers, cross_attention_freq=freq,
        hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=INTER, **kw,
    )


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter non-trivial values (BERT init zeroes biases and sets LayerNorms to 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == HIDDEN else 0.0))


def test_tiny_forward_backward_shapes():
    torch.manual_seed(0)
    qf, query_tokens = tiny()
    assert query_tokens.shape == (1, 5, HIDDEN) and isinstance(query_tokens, torch.nn.Parameter)
    enc = torch.randn(3, 7, ENC, requires_grad=True)
    out = qf(query_tokens.expand(3, -1, -1), enc)
    assert out.shape == (3, 5, HIDDEN)
    out.square().mean().backward()
    assert query_tokens.grad is not None and query_tokens.grad.abs().sum() > 0
    assert enc.grad is not None and enc.grad.abs().sum() > 0
    for name, p in qf.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_cross_attention_layer_placement_and_widths():
    qf, _ = tiny(num_layers=4, freq=2)
    assert [layer.crossattention is not None for layer in qf.bert.encoder.layer] == [True, False, True, False]
    qf1, _ = tiny(num_layers=3, freq=1)
    assert all(layer.crossattention is not None for layer in qf1.bert.encoder.layer)
    ca = qf.bert.encoder.layer[0].crossattention.self
    assert ca.key.in_features == ca.value.in_features == ENC and ca.query.in_features == HIDDEN
    assert qf.bert.encoder.layer[0].attention.self.key.in_features == HIDDEN


def test_stripped_state_dict_key_names_exact():
    qf, _ = tiny(num_layers=2, freq=2)
    sd = qf.state_dict()
    attn = [f"{m}.{wb}" for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
            for wb in ("weight", "bias")]
    ffn = [f"{m}.{wb}" for m in ("intermediate_query.dense", "output_query.dense", "output_query.LayerNorm")
           for wb in ("weight", "bias")]
    expected = {"bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias", "bert.embeddings.position_ids"}
    for i in range(2):
        expected |= {f"bert.encoder.layer.{i}.attention.{k}" for k in attn}
        expected |= {f"bert.encoder.layer.{i}.{k}" for k in ffn}
    expected |= {f"bert.encoder.layer.0.crossattention.{k}" for k in attn}
    assert set(sd) == expected
    pos = sd["bert.embeddings.position_ids"]
    assert pos.dtype == torch.int64 and pos.shape == (1, 512)
    assert torch.equal(pos[0], torch.arange(512))
    assert "position_ids" not in qf.bert.embeddings._non_persistent_buffers_set


def test_load_round_trip_via_state_dict():
    torch.manual_seed(1)
    src, q = tiny()
    randomize(src, 1)
    dst, _ = tiny()
    src.eval(), dst.eval()
    enc = torch.randn(2, 6, ENC)
    queries = q.detach().expand(2, -1, -1)
    assert not torch.allclose(src(queries, enc), dst(queries, enc))
    result = dst.load_state_dict(src.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(dst(queries, enc), src(queries, enc))


def test_bert_init():
    qf, q = build_qformer(32, ENC, num_hidden_layers=2, cross_attention_freq=1)
    layer = qf.bert.encoder.layer[1]
    assert torch.all(layer.attention.output.LayerNorm.weight == 1)
    assert torch.all(layer.attention.output.LayerNorm.bias == 0)
    assert torch.all(layer.crossattention.self.key.bias == 0)
    assert abs(layer.intermediate_query.dense.weight.std().item() - 0.02) < 0.002
    assert abs(q.detach().std().item() - 0.02) < 0.003 and abs(q.detach().mean().item()) < 0.003
    cfg = qf.config
    assert (cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob, cfg.layer_norm_eps) == (0.1, 0.1, 1e-12)
    assert qf.bert.embeddings.LayerNorm.eps == 1e-12


def test_query_embeddings_go_through_layernorm():
    # With zero layers the output is exactly LayerNorm(query_embeds) (reference notes, item M2).
    qf, q = tiny(num_layers=0)
    randomize(qf, 2)
    qf.eval()
    x = torch.randn(2, 5, HIDDEN)
    ln = qf.bert.embeddings.LayerNorm
    torch.testing.assert_close(qf(x, torch.randn(2, 3, ENC)), ln(x))


def test_encoder_mask_hides_padded_tokens():
    torch.manual_seed(3)
    qf, q = tiny()
    randomize(qf, 3)
    qf.eval()
    enc = torch.randn(2, 6, ENC)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    queries = q.detach().expand(2, -1, -1)
    out = qf(queries, enc, mask)
    enc2 = enc.clone()
    enc2[0, 4:] = torch.randn(2, ENC) * 10  # change only the padded tokens of sample 0
    torch.testing.assert_close(qf(queries, enc2, mask), out)
    ref0 = qf(queries[:1], enc[:1, :4])  # same as dropping the padded tokens
    torch.testing.assert_close(out[:1], ref0, rtol=1e-5, atol=1e-5)
    # An all-ones mask equals no mask.
    torch.testing.assert_close(qf(queries, enc, torch.ones(2, 6)), qf(queries, enc))


def test_runs_under_cpu_autocast_with_mask():
    torch.manual_seed(8)
    qf, q = tiny()
    randomize(qf, 8)
    qf.eval()
    enc = torch.randn(2, 6, ENC)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    queries = q.detach().expand(2, -1, -1)
    ref = qf(queries, enc, mask)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = qf(queries, enc, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_dropout_active_only_in_train_mode():
    torch.manual_seed(4)
    qf, q = tiny()
    enc = torch.randn(2, 6, ENC)
    queries = q.detach().expand(2, -1, -1)
    qf.eval()
    torch.testing.assert_close(qf(queries, enc), qf(queries, enc))
    qf.train()
    assert not torch.allclose(qf(queries, enc), qf(queries, enc))


def test_grad_checkpointing_gives_same_outputs_and_grads():
    enc = torch.randn(2, 6, ENC)
    results = []
    for use_ckpt in (False, True):
        torch.manual_seed(5)
        qf, q = tiny()
        qf.set_grad_checkpointing(use_ckpt)
        qf.train()
        torch.manual_seed(6)  # same dropout draws in both runs
        out = qf(q.expand(2, -1, -1), enc)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in qf.named_parameters()}, q.grad.clone()))
    (out_a, g_a, qg_a), (out_b, g_b, qg_b) = results
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(qg_a, qg_b)
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], msg=name)


def test_with_text_parts_and_forward():
    torch.manual_seed(7)
    qf, q = tiny(num_layers=2, with_text=True, vocab_size=50, max_position_embeddings=16)
    sd = qf.state_dict()
    for key in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                "bert.encoder.layer.1.intermediate.dense.weight", "bert.encoder.layer.1.output.LayerNorm.bias",
                "cls.predictions.bias", "cls.predictions.decoder.weight", "cls.predictions.transform.dense.weight"):
        assert key in sd, key
    assert qf.cls.predictions.decoder.weight is qf.bert.embeddings.word_embeddings.weight
    assert qf.cls.predictions.decoder.bias is qf.cls.predictions.bias
    qf.eval()
    ids = torch.randint(0, 50, (2, 3))
    out = qf.bert(q.expand(2, -1, -1), torch.randn(2, 6, ENC), input_ids=ids)
    assert out.shape == (2, 5 + 3, HIDDEN)


def test_errors_name_the_problem():
    qf, q = tiny()
    with pytest.raises(ConfigError, match="encoder_width=24"):
        qf(q, torch.randn(1, 6, ENC + 1))
    with pytest.raises(ConfigError, match="encoder_attention_mask"):
        qf(q, torch.randn(1, 6, ENC), torch.ones(1, 5))
    with pytest.raises(ConfigError, match="encoder_hidden_states is None"):
        qf.bert(q, None)
    with pytest.raises(ConfigError, match="with_text=True"):
        qf.bert(q, torch.randn(1, 6, ENC), input_ids=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ConfigError, match="did you mean hidden_size"):
        build_qformer(32, 768, hiden_size=64)
    with pytest.raises(ConfigError, match="not divisible"):
        QFormerConfig(hidden_size=30, num_attention_heads=4)


@pytest.mark.parametrize(
    "args, expected",
    [
        ((32, 1408), 105_137_664),  # image Q-Former (12 layers, freq 2), stripped
        ((32, 768, 2, 1), 18_905_088),  # video Q-Former
        ((8, 1024, 2, 1), 19_691_520),  # audio Q-Former
    ],
)
def test_full_size_parameter_counts_on_meta(args, expected):
    with torch.device("meta"):
        qf, q = build_qformer(*args)
    assert sum(p.numel() for p in qf.parameters()) == expected
    assert q.shape == (1, args[0], 768)
    sd = qf.state_dict()
    assert sd["bert.embeddings.position_ids"].shape == (1, 512)
    assert not any("word_embeddings" in k or ".intermediate." in k or ".output." in k.replace("attention.output.", "")
                   or k.startswith("cls.") for k in sd)
    if args[1] == 1408:
        cross = sorted({int(k.split(".")[3]) for k in sd if ".crossattention." in k})
        assert cross == [0, 2, 4, 6, 8, 10]
        assert sd["bert.encoder.layer.10.crossattention.self.key.weight"].shape == (768, 1408)
        assert sd["bert.encoder.layer.11.intermediate_query.dense.weight"].shape == (3072, 768)


# --------------------------------------------------------------------------------------------
# Parity with transformers' Blip2QFormerModel.
#
# Differences found while mapping (none changes the result in these tests):
# * key names: HF's embedding norm is `layernorm.*` (ours `bert.embeddings.LayerNorm.*`), its
#   attention modules are `attention.attention.*` / `crossattention.attention.*` (ours
#   `attention.self.*` / `crossattention.self.*`), and there is no `bert.` level nor position_ids
#   buffer in Blip2QFormerModel (HF's Blip2TextEmbeddings keeps position_ids NON-persistent);
# * HF applies the embedding LayerNorm to whatever `query_embeds` it is given, the text embeddings
#   (if any) being concatenated by the caller beforehand; ours builds [queries; text] itself and
#   normalises the concatenation, which is the same computation;
# * HF casts query_embeds and encoder_hidden_states to the LayerNorm's dtype (keeping the Q-Former
#   in fp32); ours computes in the input dtype, like the original;
# * HF masks with a boolean / dtype-min mask for self-attention; the original (and ours) adds
#   -10000, which gives the same probabilities unless a row is entirely masked.
# --------------------------------------------------------------------------------------------


def _hf_pair(num_layers: int, with_text: bool = False):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    cfg = Blip2QFormerConfig(
        hidden_size=HIDDEN, num_hidden_layers=num_layers, num_attention_heads=HEADS, intermediate_size=INTER,
        encoder_hidden_size=ENC, cross_attention_frequency=2, use_qformer_text_input=with_text,
        vocab_size=50, max_position_embeddings=16,
    )
    hf = Blip2QFormerModel(cfg).eval()
    ours, _ = tiny(num_layers=num_layers, freq=2, with_text=with_text, vocab_size=50, max_position_embeddings=16)
    randomize(ours, 11)
    ours.eval()
    mapped = {}
    for key, value in ours.state_dict().items():
        if not key.startswith("bert.") or key == "bert.embeddings.position_ids" or "_embeddings." in key:
            continue
        hf_key = key[len("bert."):].replace("embeddings.LayerNorm.", "layernorm.")
        hf_key = hf_key.replace("attention.self.", "attention.attention.")
        mapped[hf_key] = value
    result = hf.load_state_dict(mapped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ours, hf


@pytest.mark.parametrize("num_layers", [2, 3])
def test_parity_with_transformers_blip2_qformer(num_layers):
    torch.manual_seed(12)
    ours, hf = _hf_pair(num_layers)
    queries = torch.randn(2, 5, HIDDEN)
    enc = torch.randn(2, 7, ENC)
    enc_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        for mask in (None, enc_mask):
            want = hf(query_embeds=queries, encoder_hidden_states=enc, encoder_attention_mask=mask).last_hidden_state
            got = ours(queries, enc, mask)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_parity_with_transformers_text_path():
    torch.manual_seed(13)
    ours, hf = _hf_pair(2, with_text=True)
    emb = ours.bert.embeddings
    queries = torch.randn(2, 5, HIDDEN)
    enc = torch.randn(2, 7, ENC)
    ids = torch.randint(1, 50, (2, 4))
    self_mask = torch.tensor([[1] * 9, [1] * 7 + [0, 0]])
    with torch.no_grad():
        text = emb.word_embeddings(ids) + emb.position_embeddings(torch.arange(4)[None])
        want = hf(
            query_embeds=torch.cat((queries, text), dim=1), query_length=5, attention_mask=self_mask,
            encoder_hidden_states=enc,
        ).last_hidden_state
        got = ours.bert(queries, enc, input_ids=ids, attention_mask=self_mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
