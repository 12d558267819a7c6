"""The ``boundary_captioning`` task (LLMVA-GEBC's): train on captions, evaluate by caption type.

Training is the base task's step (the model's loss). Evaluation (``run.evaluate``) captions every
sample of each held-out split (``run.valid_splits`` + ``run.test_splits``) through the model
contract (``generation_inputs`` -> ``generate`` with the model's decoding settings, beam search
by default -> ``decode_caption``) and writes the original's result file
``<output_dir>/result/<split>.json`` (``[{"caption", "boundary_id", "type"}]``). Splits with
captions are scored with the registered scorer ``run.eval_scorer`` (``gebc``: per-type ROUGE-L,
CIDEr-D, SPICE and the original's aggregation, :mod:`videollm.gebc_metrics`); a split without
captions (the challenge's test) gets the submission pickle ``result/submit_<split>.pkl``.
A boundary left without a caption (its features were bad) is scored with an empty caption and
counted in ``missing_predictions``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List

import torch

import videollm.gebc_metrics  # noqa: F401  (registers the "gebc" scorer)
from videollm.registry import registry
from videollm.tasks.base_task import BaseTask

logger = logging.getLogger(__name__)


def _to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def caption_split(model: Any, dataset: Any, batch_size: int, device: torch.device) -> Dict[str, Any]:
    """[{"caption", "boundary_id", "type"}] for every good sample of ``dataset``, and the bad ones."""
    results: List[Dict[str, str]] = []
    bad: List[Any] = []
    n = len(dataset)
    for start in range(0, n, max(1, batch_size)):
        batch = dataset.collater([dataset[i] for i in range(start, min(n, start + batch_size))])
        bad.extend(batch.get("bad_samples", []))
        if batch.get("num_samples", 1) == 0:
            continue
        batch = _to_device(batch, device)
        embeds, mask = model.generation_inputs(batch)
        ids = model.generate(embeds, mask)
        for row, bid, ctype in zip(ids, batch["boundary_id"], batch["caption_type"]):
            results.append({"caption": model.decode_caption(row.tolist()), "boundary_id": bid, "type": ctype})
    return {"results": results, "bad_samples": [list(b) for b in bad]}


@registry.register_task("boundary_captioning")
class BoundaryCaptioningTask(BaseTask):
    """Generic event boundary captioning (Kinetic-GEBC)."""

    name = "boundary_captioning"

    def evaluate(self, model: torch.nn.Module, datasets: Dict[str, Dict[str, Any]], run: Any,
                 device: torch.device) -> Dict[str, Any]:
        from videollm.gebc_metrics import CAPTION_TYPES, write_submission

        splits = list(run.get("valid_splits", []) or []) + list(run.get("test_splits", []) or [])
        scorer_name = str(run.get("eval_scorer", "gebc"))
        if scorer_name == "synthetic_attributes":  # the run schema's default, meant for caption clips
            scorer_name = "gebc"
        out_dir = Path(str(run.get("output_dir", "output"))) / "result"
        out_dir.mkdir(parents=True, exist_ok=True)
        results: Dict[str, Any] = {}
        was_training = model.training
        model.eval()
        for name, by_split in datasets.items():
            for split in splits:
                dataset = by_split.get(split)
                if dataset is None:
                    continue
                got = caption_split(model, dataset, int(run.get("batch_size_eval", 8)), device)
                preds = got["results"]
                (out_dir / f"{split}.json").write_text(json.dumps(preds, indent=1) + "\n")
                entry: Dict[str, Any] = {"samples": preds, "bad_samples": got["bad_samples"]}
                gt = dataset.ground_truth() if getattr(dataset, "with_captions", False) else None
                if gt and gt["subject"]:
                    have = {(p["boundary_id"], p["type"]) for p in preds}
                    filled = [{"boundary_id": b, "type": t, "caption": ""} for t in CAPTION_TYPES for b in gt[t]
                              if (b, t) not in have]
                    scored = [p for p in preds if p["boundary_id"] in gt[p["type"]]] + filled
                    metrics = dict(registry.get_scorer(scorer_name)(scored, gt))
                    metrics["missing_predictions"] = len(filled)
                else:
                    path = write_submission(preds, dataset.boundary_ids(), out_dir / f"submit_{split}.pkl")
                    metrics = {"agg_metrics": 0.0, "submission": str(path)}
                metrics["bad_samples"] = len(got["bad_samples"])
                entry["metrics"] = metrics
                results[f"{name}/{split}"] = entry
                logger.info("%s/%s: %s", name, split, {k: v for k, v in metrics.items() if k != "spice"})
        model.train(was_training)
        return results

