"""Beam search under transformers 4.28's rules (videollm.beam_search), traced by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from videollm.beam_search import beam_search_428, greedy_search_428

EOS, A, B, C, PAD = 0, 1, 2, 3, 4  # EOS doubles as BOS, as in OPT
V = 5


def table_step(table, calls=None):
    """A scripted LM: next-token probabilities by generated prefix (tuple of ids). The 'cache'
    is the prefix itself, so beam reordering is exercised as with a real KV cache."""

    def step(inputs_embeds, input_ids, mask, pos, cache):
        if cache is None:
            prefixes = torch.zeros((inputs_embeds.shape[0], 0), dtype=torch.long)
        else:
            prefixes = torch.cat([cache, input_ids], dim=1)
        rows = []
        for row in prefixes.tolist():
            probs = torch.full((V,), 1e-6)
            for tok, p in table.get(tuple(row), {}).items():
                probs[tok] = p
            rows.append(torch.log(probs / probs.sum()))
        if calls is not None:
            calls.append(prefixes.tolist())
        return torch.stack(rows), prefixes

    return step


def run(table, **kw):
    calls = []
    opts = dict(num_beams=2, max_length=4, min_length=1, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS)
    opts.update(kw)
    out = beam_search_428(None, torch.zeros(1, 3, 2), torch.ones(1, 3, dtype=torch.long), step=table_step(table, calls), **opts)
    return out, calls


def test_hand_traced_to_max_length():
    """Step 1: A (-0.693) and B (-0.916) open. Step 2: B C (-1.021) leads; A+EOS (rank 1) is a
    finished hypothesis of [BOS, A] scored -1.204 / 2 = -0.602 (EOS not counted, the dummy BOS
    counted); A A (-2.303) is the second beam. Step 3: B C EOS (-1.378, rank 0) -> [BOS, B, C]
    at -1.378 / 3 = -0.459; A A EOS (-2.408, rank 1) -> -0.803, worse than both kept, dropped;
    not done (-0.602 < -1.378 / 3); ids reach max_length 4. Finalize: the open beams B C A
    (-2.630 / 4) and B C B (-3.834 / 4) do not beat -0.602. Best: [BOS, B, C] + EOS."""
    table = {
        (): {A: 0.5, B: 0.4, EOS: 0.1},
        (A,): {EOS: 0.6, A: 0.2, B: 0.15, C: 0.05},
        (B,): {C: 0.9, EOS: 0.05, A: 0.03, B: 0.02},
        (B, C): {EOS: 0.7, A: 0.2, B: 0.06, C: 0.04},
        (A, A): {EOS: 0.9, B: 0.05, A: 0.03, C: 0.02},
    }
    out, calls = run(table)
    assert out.sequences.tolist() == [[EOS, B, C, EOS]]
    want = (math.log(0.4) + math.log(0.9) + math.log(0.7)) / 3
    assert out.scores.item() == pytest.approx(want, abs=1e-5)
    # forward calls: the prompt repeated per beam, then one token per step in 4.28's beam order
    assert calls == [[[], []], [[A], [B]], [[B, C], [A, A]]]


def test_hand_traced_early_stop():
    """Step 2: A+EOS (-0.616 -> -0.308) and B+EOS (-1.427 -> -0.713) finish; not done since the best
    candidate is A+EOS itself (-0.616 / 2). Step 3: best candidate B C A (-3.794) / 3 = -1.265 <=
    worst finished -0.713 -> done, although max_length is 10. Output [BOS, A] + EOS."""
    table = {
        (): {A: 0.6, B: 0.3, EOS: 0.1},
        (A,): {EOS: 0.9, A: 0.05, B: 0.03, C: 0.02},
        (B,): {EOS: 0.8, C: 0.15, A: 0.03, B: 0.02},
        (B, C): {A: 0.5, EOS: 0.3, B: 0.1, C: 0.1},
        (A, A): {A: 0.5, EOS: 0.3, B: 0.1, C: 0.1},
    }
    out, calls = run(table, max_length=10)
    assert out.sequences.tolist() == [[EOS, A, EOS]]
    assert out.scores.item() == pytest.approx((math.log(0.6) + math.log(0.9)) / 2, abs=1e-5)
    assert len(calls) == 3


def test_min_length_counts_the_dummy_bos():
    """min_length 3 = BOS + 2 tokens: EOS is banned at the first two steps only."""
    table = {(): {EOS: 0.9, A: 0.1}, (A,): {EOS: 0.9, A: 0.1}, (A, A): {EOS: 0.9, A: 0.1}}
    emb, mask = torch.zeros(1, 2, 2), torch.ones(1, 2, dtype=torch.long)
    common = dict(max_length=8, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS)
    greedy = greedy_search_428(None, emb, mask, min_length=3, step=table_step(table), **common)
    assert greedy.sequences.tolist() == [[EOS, A, A, EOS]]
    assert greedy_search_428(None, emb, mask, min_length=1, step=table_step(table), **common).sequences.tolist() == [[EOS, EOS]]


def _scaled_tiny_opt(seed: int):
    import transformers

    from videollm.testing import tiny_llm_config

    cfg = tiny_llm_config("opt", vocab_size=12, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    cfg.pop("model_type")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("opt", **cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)  # peaked distributions: beams end at different steps
    return model, torch.randn(1, 5, 16)


def _log_prob(model, embeds, tokens):
    total = 0.0
    e = embeds
    for t in tokens:
        logits = model(inputs_embeds=e, attention_mask=torch.ones(e.shape[:2], dtype=torch.long)).logits[0, -1]
        total += torch.log_softmax(logits.float(), -1)[t].item()
        e = torch.cat([e, model.get_input_embeddings()(torch.tensor([[t]]))], 1)
    return total


@torch.no_grad()
def test_current_transformers_stops_earlier_than_428():
    """A real (tiny, seeded) OPT where 4.28's bookkeeping and current transformers' beam search
    disagree: current transformers returns [11, EOS]; under 4.28's rules the search goes on
    (one finished hypothesis is not enough to stop) and finds [11, 6, 6, 9, EOS], whose score
    (sum log p / length with the dummy BOS) is higher."""
    model, emb = _scaled_tiny_opt(2)
    mask = torch.ones(1, 5, dtype=torch.long)
    ours = beam_search_428(model, emb, mask, num_beams=2, max_length=8, min_length=1, eos_token_id=2,
                           pad_token_id=1, bos_token_id=2)
    assert ours.sequences[0].tolist() == [2, 11, 6, 6, 9, 2]
    long_score = _log_prob(model, emb, [11, 6, 6, 9, 2]) / 5
    short_score = _log_prob(model, emb, [11, 2]) / 2
    assert ours.scores.item() == pytest.approx(long_score, abs=1e-4)
    assert long_score > short_score
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = model.generate(inputs_embeds=emb, attention_mask=mask, num_beams=2, max_new_tokens=7, min_length=1,
                            eos_token_id=2, pad_token_id=1, bos_token_id=2, do_sample=False, length_penalty=1.0,
                            early_stopping=False)
    assert hf[0].tolist() == [11, 2], "current transformers now agrees with 4.28 here; update the docs"
