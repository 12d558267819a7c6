"""Beam search and greedy decoding with transformers 4.28's bookkeeping, over any causal LM.

LLMVA-GEBC (and every LAVIS-era model) generated with ``opt_model.generate(inputs_embeds=...,
num_beams=2, max_length=30, min_length=1)`` under transformers 4.28. Later versions changed how
beams end and how long sequences are, so they give other captions from the same weights. This
module reproduces 4.28's rules (read from ``BeamSearchScorer`` / ``BeamHypotheses`` /
``GenerationMixin.beam_search`` of that release) on top of the model's forward with a KV cache:

1. Prompt from embeddings: 4.28 still puts a dummy ``[[bos_token_id]]`` in ``input_ids``
   (``_maybe_initialize_input_ids_for_generation``), so every length counts it: ``max_length``
   30 means at most 29 new tokens, ``min_length`` 1 is already met, and the returned sequences
   start with it.
2. Inputs are repeated ``num_beams`` times (``repeat_interleave``); beam scores start at 0 for the
   first beam and -1e9 for the others.
3. Each step: log-softmax of the last logits (float32), the min-length processor (EOS -inf while
   ``cur_len < min_length``), plus the running beam scores; the top ``2 * num_beams`` of
   ``num_beams * vocab`` candidates (sorted); then, per sample, candidates in rank order: an EOS
   candidate ranked ``>= num_beams`` is dropped, one ranked lower becomes a finished hypothesis of
   the CURRENT ids (EOS not included) with score ``sum_logprobs / len(ids) ** length_penalty``;
   other candidates fill the next beams until ``num_beams`` are chosen.
4. A sample is done (``early_stopping=False``) once it has ``num_beams`` finished hypotheses and
   ``worst finished score >= best candidate score / cur_len ** length_penalty`` (``cur_len``
   before this step's token). Done samples keep stepping with pad tokens and beam index 0
   (absolute, as 4.28 writes it; their rows are ignored).
5. Stop when all samples are done or ``len(ids) >= max_length``; finalize adds every open beam of
   the unfinished samples as a hypothesis (score divided by its full length), keeps the best,
   appends EOS when it fits and pads shorter rows.

Checked against the original's own ``generate`` call under transformers 4.28.0 at tiny size
(``scripts/llmva_gebc_parity.py``: identical captions). ``model`` is any transformers causal LM: ``model(inputs_embeds | input_ids, attention_mask,
position_ids, cache, use_cache=True)``; position ids are ``cumsum(mask) * mask - 1``
(OPT's own rule, so pads in the middle of a prompt are skipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["BeamHypotheses428", "GenerationOutput", "beam_search_428", "greedy_search_428", "StepFn"]

# step(inputs_embeds or None, input_ids or None, attention_mask, position_ids, cache) -> (logits (N, V), cache)
StepFn = Callable[..., Tuple[torch.Tensor, Any]]


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, L) with 4.28's dummy BOS in column 0
    scores: Optional[torch.Tensor] = None  # (B,) beam search: the best hypothesis' score


class BeamHypotheses428:
    """The n-best list of one sample (4.28 ``BeamHypotheses`` with ``early_stopping=False``)."""

    def __init__(self, num_beams: int, length_penalty: float) -> None:
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.beams: List[Tuple[float, torch.Tensor]] = []
        self.worst_score = 1e9

    def __len__(self) -> int:
        return len(self.beams)

    def add(self, hyp: torch.Tensor, sum_logprobs: float) -> None:
        score = sum_logprobs / (hyp.shape[-1] ** self.length_penalty)
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self) < self.num_beams:
            return False
        return self.worst_score >= best_sum_logprobs / cur_len ** self.length_penalty


def hf_step(model: Any) -> StepFn:
    """A step function over a transformers causal LM with a DynamicCache."""

    import inspect

    # transformers >= 5.2x names the cache argument ``cache``; older releases ``past_key_values``.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step(inputs_embeds, input_ids, attention_mask, position_ids, cache):
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
        out = model(inputs_embeds=inputs_embeds, input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids, use_cache=True, return_dict=True, **{name: cache})
        new_cache = getattr(out, name, None)
        return out.logits[:, -1, :], new_cache if new_cache is not None else cache

    return step


def _positions(mask: torch.Tensor, new: int) -> torch.Tensor:
    pos = (torch.cumsum(mask, dim=1) * mask - 1).long()
    return pos[:, -new:]


def _reorder(cache: Any, index: torch.Tensor) -> Any:
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
        return cache
    if isinstance(cache, (tuple, list)):  # legacy tuples, or the scripted caches of tests
        return type(cache)(_reorder(c, index) for c in cache)
    if isinstance(cache, torch.Tensor):
        return cache.index_select(0, index.to(cache.device))
    return cache


def beam_search_428(
    model: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_beams: int,
    max_length: int,
    min_length: int = 0,
    eos_token_id: int,
    pad_token_id: int,
    bos_token_id: int,
    length_penalty: float = 1.0,
    step: Optional[StepFn] = None,
) -> GenerationOutput:
    """4.28 beam search from prompt embeddings (B, L, H) and mask (B, L). ``step`` replaces the
    model's forward (tests); returns sequences (B, n) that start with the dummy BOS."""
    if num_beams < 2:
        raise ValueError(f"num_beams must be >= 2 for beam search, got {num_beams}")
    step = step or hf_step(model)
    batch = inputs_embeds.shape[0]
    device = inputs_embeds.device
    input_ids = torch.full((batch * num_beams, 1), bos_token_id, dtype=torch.long, device=device)
    embeds = inputs_embeds.repeat_interleave(num_beams, dim=0)
    mask = attention_mask.to(device).long().repeat_interleave(num_beams, dim=0)
    hyps = [BeamHypotheses428(num_beams, length_penalty) for _ in range(batch)]
    done = [False] * batch
    beam_scores = torch.zeros((batch, num_beams), dtype=torch.float32, device=device)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    cache = None
    logits, cache = step(embeds, None, mask, _positions(mask, mask.shape[1]), cache)
    while True:
        cur_len = input_ids.shape[-1]
        scores = F.log_softmax(logits.float(), dim=-1)
        if cur_len < min_length:
            scores[:, eos_token_id] = -float("inf")
        scores = scores + beam_scores[:, None]
        vocab = scores.shape[-1]
        top_scores, top_tokens = torch.topk(scores.view(batch, num_beams * vocab), 2 * num_beams, dim=1,
                                            largest=True, sorted=True)
        top_beams = torch.div(top_tokens, vocab, rounding_mode="floor")
        top_tokens = top_tokens % vocab
        next_scores = torch.zeros((batch, num_beams), dtype=top_scores.dtype, device=device)
        next_tokens = torch.zeros((batch, num_beams), dtype=torch.long, device=device)
        next_index = torch.zeros((batch, num_beams), dtype=torch.long, device=device)
        for b in range(batch):
            if done[b]:
                next_tokens[b, :] = pad_token_id  # scores 0, beam index 0 (absolute), as 4.28
                continue
            chosen = 0
            for rank in range(2 * num_beams):
                token = int(top_tokens[b, rank])
                row = b * num_beams + int(top_beams[b, rank])
                if token == eos_token_id:
                    if rank >= num_beams:
                        continue
                    hyps[b].add(input_ids[row].clone(), float(top_scores[b, rank]))
                else:
                    next_scores[b, chosen] = top_scores[b, rank]
                    next_tokens[b, chosen] = token
                    next_index[b, chosen] = row
                    chosen += 1
                if chosen == num_beams:
                    break
            done[b] = done[b] or hyps[b].is_done(float(top_scores[b].max()), cur_len)
        beam_scores = next_scores.view(-1)
        beam_idx = next_index.view(-1)
        input_ids = torch.cat([input_ids[beam_idx], next_tokens.view(-1, 1)], dim=-1)
        if all(done) or input_ids.shape[-1] >= max_length:
            break
        cache = _reorder(cache, beam_idx)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        logits, cache = step(None, input_ids[:, -1:], mask, _positions(mask, 1), cache)
    # finalize
    for b in range(batch):
        if done[b]:
            continue
        for k in range(num_beams):
            row = b * num_beams + k
            hyps[b].add(input_ids[row], float(beam_scores[row]))
    best, best_scores = [], []
    for h in hyps:
        score, seq = sorted(h.beams, key=lambda x: x[0])[-1]
        best.append(seq)
        best_scores.append(score)
    lengths = [int(s.shape[-1]) for s in best]
    out_len = min(max(lengths) + 1, max_length)
    out = torch.full((batch, out_len), pad_token_id, dtype=torch.long, device=device)
    for i, seq in enumerate(best):
        out[i, : lengths[i]] = seq
        if lengths[i] < out_len:
            out[i, lengths[i]] = eos_token_id
    return GenerationOutput(out, torch.tensor(best_scores, dtype=torch.float32))


def greedy_search_428(
    model: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_length: int,
    min_length: int = 0,
    eos_token_id: int,
    pad_token_id: int,
    bos_token_id: int,
    step: Optional[StepFn] = None,
) -> GenerationOutput:
    """4.28 greedy search from embeddings: the same dummy BOS and length rules; finished rows get
    pad tokens; stops when every row has produced EOS or at ``max_length``."""
    step = step or hf_step(model)
    batch = inputs_embeds.shape[0]
    device = inputs_embeds.device
    input_ids = torch.full((batch, 1), bos_token_id, dtype=torch.long, device=device)
    mask = attention_mask.to(device).long()
    unfinished = torch.ones(batch, dtype=torch.long, device=device)
    logits, cache = step(inputs_embeds, None, mask, _positions(mask, mask.shape[1]), None)
    while True:
        scores = logits.float()
        if input_ids.shape[-1] < min_length:
            scores[:, eos_token_id] = -float("inf")
        tokens = scores.argmax(dim=-1)
        tokens = tokens * unfinished + pad_token_id * (1 - unfinished)
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        unfinished = unfinished * (tokens != eos_token_id).long()
        if int(unfinished.max()) == 0 or input_ids.shape[-1] >= max_length:
            break
        mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=-1)
        logits, cache = step(None, input_ids[:, -1:], mask, _positions(mask, 1), cache)
    return GenerationOutput(input_ids)
