"""Caption evaluation: does the model name what it sees?

For the synthetic clips of :mod:`videollm.synthetic` (one coloured shape moving one way), a
generated caption is scored per attribute: the first word of each closed vocabulary found in the
generated text (shape, colour, motion direction) is compared with the one in the reference
caption. ``exact_match`` compares the whole normalised captions (lower case, punctuation
dropped, spaces collapsed).

Generation uses only the model contract: ``model.generation_inputs(batch)`` (for Video-LLaMA the
training caption path: ``[BOS] + visual tokens``, wrapped in the model's first prompt when it has
a prompt list), greedy ``model.generate``, ``model.decode_caption`` (cut at the model's end
symbol). Scorers are registered (``registry.register_scorer``); the task's ``evaluate`` picks one
by name (``run.eval_scorer``, default ``synthetic_attributes``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from videollm.registry import registry
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


@torch.no_grad()
def generate_captions(model: Any, batch: Mapping[str, Any], max_new_tokens: int = 16) -> List[str]:
    """Greedy captions of a caption-style batch (``batch["image"]`` (B, 3, T, H, W) for Video-LLaMA)."""
    inputs, mask = model.generation_inputs(batch)
    ids = model.generate(inputs, mask, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    return [model.decode_caption(row.tolist()) for row in ids]


@registry.register_scorer("synthetic_attributes")
def score_synthetic_attributes(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """Colour / shape / direction accuracy and exact match of the synthetic clips' captions."""
    return score_captions(predictions, references, ATTRIBUTES)


@registry.register_scorer("exact_match")
def score_exact_match(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    n = len(references)
    hits = sum(normalize_caption(p) == normalize_caption(r) for p, r in zip(predictions, references))
    return {"exact_match": hits / n if n else float("nan"), "num_samples": n}


@torch.no_grad()
def evaluate_caption_dataset(
    model: Any, dataset: Any, batch_size: int = 8, max_new_tokens: int = 16,
    device: torch.device | str = "cpu", vocab: Optional[Mapping[str, Sequence[str]]] = None,
    scorer: str = "synthetic_attributes",
) -> Dict[str, Any]:
    """Caption every sample of a caption dataset (``{"image", "text_input"}`` samples, bad ones
    skipped and counted) and score the captions with the registered ``scorer`` (or with
    ``vocab`` attribute accuracy when given); returns ``{"metrics", "samples", "bad_samples"}``."""
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
        batch["image"] = batch["image"].to(device)
        preds.extend(generate_captions(model, batch, max_new_tokens))
        refs.extend(list(batch["text_input"]))
    model.train(was_training)
    metrics = dict(score_captions(preds, refs, vocab) if vocab is not None else registry.get_scorer(scorer)(preds, refs))
    metrics["bad_samples"] = len(bad)
    samples = [{"prediction": p, "reference": r} for p, r in zip(preds, refs)]
    return {"metrics": metrics, "samples": samples, "bad_samples": [list(b) for b in bad]}


def write_results(results: Mapping[str, Any], output_dir: os.PathLike | str) -> Path:
    """Write ``eval_results.json`` (``{split key: {"metrics", "samples", ...}}``) into ``output_dir``."""
    path = Path(output_dir) / RESULTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return path
