"""Caption evaluation: does the model name what it sees?

For the synthetic clips of :mod:`videollm.synthetic` (one coloured shape moving one way), a
generated caption is scored per attribute: the first word of each closed vocabulary found in the
generated text (shape, colour, motion direction) is compared with the one in the reference
caption. ``exact_match`` compares the whole normalised captions (lower case, punctuation
dropped, spaces collapsed).

Generation follows the training caption path: ``[BOS] + visual tokens`` (wrapped in the model's
first prompt when it has a prompt list), greedy decoding, the text cut at the model's
``end_sym``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from videollm.synthetic import COLORS, DIRECTIONS, SHAPES

logger = logging.getLogger(__name__)

ATTRIBUTES: Dict[str, Sequence[str]] = {"shape": SHAPES, "color": tuple(COLORS), "direction": DIRECTIONS}
RESULTS_NAME = "eval_results.json"


def normalize_caption(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def parse_attributes(text: str, vocab: Mapping[str, Sequence[str]] = ATTRIBUTES) -> Dict[str, Optional[str]]:
    """``{"shape": "circle", "color": "red", "direction": None, ...}``: the first vocabulary word
    of each attribute in ``text`` (None when absent)."""
    words = normalize_caption(text).split()
    out: Dict[str, Optional[str]] = {}
    for attr, values in vocab.items():
        allowed = set(values)
        out[attr] = next((w for w in words if w in allowed), None)
    return out


def score_captions(
    predictions: Sequence[str], references: Sequence[str], vocab: Mapping[str, Sequence[str]] = ATTRIBUTES
) -> Dict[str, float]:
    """Per-attribute accuracy, ``exact_match`` and ``num_samples``.

    A sample whose reference lacks an attribute is not counted for it.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    hits = {a: 0 for a in vocab}
    counts = {a: 0 for a in vocab}
    exact = 0
    for pred, ref in zip(predictions, references):
        p, r = parse_attributes(pred, vocab), parse_attributes(ref, vocab)
        for attr in vocab:
            if r[attr] is not None:
                counts[attr] += 1
                hits[attr] += int(p[attr] == r[attr])
        exact += int(normalize_caption(pred) == normalize_caption(ref))
    n = len(references)
    metrics: Dict[str, float] = {f"{a}_accuracy": (hits[a] / counts[a] if counts[a] else float("nan")) for a in vocab}
    metrics["exact_match"] = exact / n if n else float("nan")
    metrics["num_samples"] = n
    return metrics


def caption_prefix(model: Any, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM input embeddings ``(B, L, H_llm)`` and mask of the caption path's prefix for ``video``
    ``(B, 3, T, H, W)`` (images ``(B, 3, H, W)`` are one-frame videos)."""
    if video.dim() == 4:
        video = video.unsqueeze(2)
    embeds, atts = model.encode_videoQformer_visual(video)
    if getattr(model, "prompt_list", None):
        embeds, atts = model.prompt_wrap(embeds, atts, model.prompt_list[0])
    tok = model.llama_tokenizer
    bos = torch.full((embeds.shape[0], 1), tok.bos_token_id, dtype=torch.long, device=embeds.device)
    bos_embeds = model.embed_tokens(bos)
    inputs = torch.cat([bos_embeds, embeds.to(bos_embeds.dtype)], dim=1)
    mask = torch.cat([atts[:, :1], atts], dim=1)
    return inputs, mask


@torch.no_grad()
def generate_captions(model: Any, video: torch.Tensor, max_new_tokens: int = 16) -> List[str]:
    """Greedy captions of a batch of clips ``(B, 3, T, H, W)``, cut at the model's ``end_sym``."""
    inputs, mask = caption_prefix(model, video)
    ids = model.generate(inputs, mask, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    end_sym = getattr(model, "end_sym", "\n") or "\n"
    texts = []
    for row in ids:
        text = model.llama_tokenizer.decode(row, skip_special_tokens=True)
        texts.append(text.split(end_sym)[0].strip())
    return texts


@torch.no_grad()
def evaluate_caption_dataset(
    model: Any, dataset: Any, batch_size: int = 8, max_new_tokens: int = 16,
    device: torch.device | str = "cpu", vocab: Mapping[str, Sequence[str]] = ATTRIBUTES,
) -> Dict[str, Any]:
    """Caption every sample of a caption dataset (``{"image", "text_input"}`` samples, bad ones
    skipped and counted) and score the captions; returns ``{"metrics", "samples", "bad_samples"}``."""
    was_training = model.training
    model.eval()
    collate = getattr(dataset, "collater", None)
    preds: List[str] = []
    refs: List[str] = []
    bad: List[Any] = []
    n = len(dataset)
    for start in range(0, n, max(1, batch_size)):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        if collate is not None:
            batch = collate(items)
        else:
            batch = {"image": torch.stack([it["image"] for it in items]), "text_input": [it["text_input"] for it in items]}
        bad.extend(batch.get("bad_samples", []))
        if batch.get("num_samples", 1) == 0 or "image" not in batch:
            continue
        preds.extend(generate_captions(model, batch["image"].to(device), max_new_tokens))
        refs.extend(list(batch["text_input"]))
    model.train(was_training)
    metrics = score_captions(preds, refs, vocab)
    metrics["bad_samples"] = len(bad)
    samples = [{"prediction": p, "reference": r} for p, r in zip(preds, refs)]
    return {"metrics": metrics, "samples": samples, "bad_samples": [list(b) for b in bad]}


def write_results(results: Mapping[str, Any], output_dir: os.PathLike | str) -> Path:
    """Write ``eval_results.json`` (``{split key: {"metrics", "samples", ...}}``) into ``output_dir``."""
    path = Path(output_dir) / RESULTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return path
