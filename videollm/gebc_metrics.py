"""Kinetic-GEBC caption metrics and the challenge submission file (LLMVA-GEBC's evaluation).

As the original's ``video_llama/evaluation/gebc_evaluation/evaluation_utils.py``:

* predictions ``[{"boundary_id", "type", "caption"}]`` are split by caption type (subject,
  status_before, status_after); the ground truth is every boundary of the annotation file;
* per type: PTB tokenisation (pycocoevalcap's Stanford PTBTokenizer, a Java program), then
  ROUGE-L, CIDEr-D (pycocoevalcap's ``Cider``: document frequencies from the references of the
  split, sigma 6, clipped, x10) and SPICE;
* keys: ``subject_<M>``, ``before_<M>`` and ``after+<M>`` (the original's typo, kept so that
  its logs and ours compare) = score x 100; ``mean_<M>`` = the mean over the three types x 100;
  ``overall_score`` = the sum of the three means; ``mean_score`` = overall / 3;
  ``agg_metrics`` (what selects the best checkpoint) = ``overall_score``.

SPICE needs Java and the Stanford CoreNLP 3.6.0 jars next to pycocoevalcap's ``spice-1.0.jar``
(the original's ``get_stanford_models.sh``; pycocoevalcap would download them, which is not
possible offline). When they are missing SPICE is reported as unavailable: ``SPICE`` entries are
None, ``spice`` holds the reason, ``overall_score`` / ``mean_score`` are None (a sum without
SPICE is not the challenge score) and ``overall_score_without_spice`` (ROUGE-L + CIDEr means) is
the ``agg_metrics``. Never a silent 0.

Submission (``generate_submission_file.py``): a pickle ``{boundary_id: {"Subject",
"Status_Before", "Status_After"}}`` over every boundary of the split; boundaries without
predictions get empty strings (and so does a missing caption type, which the original cannot
produce since it always generates all three).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from videollm.errors import ConfigError, DataError
from videollm.registry import registry

logger = logging.getLogger(__name__)

CAPTION_TYPES = ("subject", "status_before", "status_after")
TYPE_PREFIX = {"subject": "subject_", "status_before": "before_", "status_after": "after+"}  # original's keys
SUBMISSION_KEYS = {"subject": "Subject", "status_before": "Status_Before", "status_after": "Status_After"}
METRICS = ("SPICE", "ROUGE_L", "CIDEr")
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def _pycocoevalcap_dir() -> Path:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise ConfigError("GEBC metrics need pycocoevalcap (pip install pycocoevalcap; it is in the dev extra)") from None
    return Path(list(pycocoevalcap.__path__)[0])


def require_java() -> None:
    if shutil.which("java") is None:
        raise ConfigError("GEBC metrics: the PTB tokenizer of pycocoevalcap needs Java; install a runtime "
                          "(apt-get install default-jre-headless; `make sysdeps` does it)")


def spice_status() -> Tuple[bool, str]:
    """(available, reason): Java, spice-1.0.jar and the CoreNLP 3.6.0 jars in ``spice/lib``."""
    if shutil.which("java") is None:
        return False, "no java on PATH"
    spice = _pycocoevalcap_dir() / "spice"
    if not (spice / "spice-1.0.jar").is_file():
        return False, f"{spice / 'spice-1.0.jar'} missing"
    missing = [j for j in CORENLP_JARS if not (spice / "lib" / j).is_file()]
    if missing:
        return False, (f"Stanford CoreNLP jars missing in {spice / 'lib'}: {', '.join(missing)} "
                       "(get_stanford_models.sh of pycocoevalcap downloads them)")
    return True, ""


def split_pred(predictions: Sequence[Mapping[str, Any]]) -> Dict[str, Dict[str, List[str]]]:
    """[{"boundary_id", "type", "caption"}] -> {type: {boundary_id: [caption]}} (the last wins)."""
    out: Dict[str, Dict[str, List[str]]] = {t: {} for t in CAPTION_TYPES}
    for p in predictions:
        if p.get("type") not in out:
            raise DataError(f"prediction {dict(p)}: type must be one of {CAPTION_TYPES}")
        out[p["type"]][str(p["boundary_id"])] = [str(p["caption"])]
    return out


def split_gt(annotation: Mapping[str, Sequence[Mapping[str, Any]]]) -> Dict[str, Dict[str, List[str]]]:
    """A GEBC annotation dict -> {type: {boundary_id: [caption]}} (the original's ``split_gt``)."""
    out: Dict[str, Dict[str, List[str]]] = {t: {} for t in CAPTION_TYPES}
    for boundaries in annotation.values():
        for b in boundaries:
            for t in CAPTION_TYPES:
                out[t][str(b["boundary_id"])] = [b[t]]
    return out


def _check_keys(pred: Mapping[str, List[str]], gt: Mapping[str, List[str]], ctype: str) -> None:
    missing = sorted(set(gt) - set(pred))
    extra = sorted(set(pred) - set(gt))
    if missing or extra:
        raise DataError(f"GEBC metrics ({ctype}): {len(missing)} boundaries without a prediction (e.g. {missing[:3]}) "
                        f"and {len(extra)} predictions for unknown boundaries (e.g. {extra[:3]}); the metrics need "
                        "exactly one caption per boundary and type")


def ptb_tokenize(groups: Mapping[str, Mapping[str, List[str]]]) -> Dict[str, Dict[str, List[str]]]:
    """PTB-tokenise several {key: [caption]} dicts in ONE Java run (the tokenisation of a caption does
    not depend on the others, so this equals tokenising each dict on its own, as the original)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    require_java()
    flat = {f"{g}\x00{k}": [{"caption": c} for c in caps] for g, d in groups.items() for k, caps in d.items()}
    done = PTBTokenizer().tokenize(flat) if flat else {}
    out: Dict[str, Dict[str, List[str]]] = {g: {} for g in groups}
    for key, caps in done.items():
        g, k = key.split("\x00", 1)
        out[g][k] = caps
    return out


def score_tokenized(gts: Mapping[str, List[str]], res: Mapping[str, List[str]], *,
                    use_spice: Optional[bool] = None) -> Dict[str, Optional[float]]:
    """One caption type, PTB-tokenised: {"ROUGE_L", "CIDEr", "SPICE"} (SPICE None when unavailable)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = list(gts)
    gts = {k: gts[k] for k in keys}
    res = {k: res[k] for k in keys}
    result: Dict[str, Optional[float]] = {}
    result["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    result["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    available = spice_status()[0] if use_spice is None else use_spice
    if available:
        from pycocoevalcap.spice.spice import Spice

        result["SPICE"] = float(Spice().compute_score(gts, res)[0])
    else:
        result["SPICE"] = None
    return result


def evaluate_on_caption(pred: Mapping[str, List[str]], gt: Mapping[str, List[str]], *,
                        use_spice: Optional[bool] = None) -> Dict[str, Optional[float]]:
    """One caption type from raw captions (the original's ``evaluate_on_caption``)."""
    _check_keys(pred, gt, "captions")
    tok = ptb_tokenize({"gts": gt, "res": pred})
    return score_tokenized(tok["gts"], tok["res"], use_spice=use_spice)


def gebc_captioning_eval(predictions: Sequence[Mapping[str, Any]], gt: Mapping[str, Mapping[str, List[str]]], *,
                         use_spice: Optional[bool] = None) -> Dict[str, Any]:
    """The original's ``gebc_captioning_eval`` on in-memory predictions and ``split_gt`` output."""
    pred = split_pred(predictions)
    for t in CAPTION_TYPES:
        _check_keys(pred[t], gt[t], t)
    tok = ptb_tokenize({**{f"gts/{t}": gt[t] for t in CAPTION_TYPES}, **{f"res/{t}": pred[t] for t in CAPTION_TYPES}})
    per_type = {t: score_tokenized(tok[f"gts/{t}"], tok[f"res/{t}"], use_spice=use_spice) for t in CAPTION_TYPES}
    spice_ok = all(per_type[t]["SPICE"] is not None for t in CAPTION_TYPES)
    scores: Dict[str, Any] = {}
    for t in CAPTION_TYPES:
        for m in METRICS:
            v = per_type[t][m]
            scores[TYPE_PREFIX[t] + m] = None if v is None else v * 100
    means: Dict[str, Optional[float]] = {}
    for m in METRICS:
        vals = [per_type[t][m] for t in CAPTION_TYPES]
        means["mean_" + m] = None if any(v is None for v in vals) else sum(vals) * 100.0 / 3
    scores.update(means)
    without_spice = means["mean_ROUGE_L"] + means["mean_CIDEr"]
    scores["overall_score_without_spice"] = without_spice
    if spice_ok:
        overall = without_spice + means["mean_SPICE"]
        scores["overall_score"] = overall
        scores["mean_score"] = overall / 3
        scores["agg_metrics"] = overall
        scores["spice"] = "computed"
    else:
        _, why = spice_status() if use_spice is None else (False, "disabled by the caller")
        scores["overall_score"] = None
        scores["mean_score"] = None
        scores["agg_metrics"] = without_spice
        scores["spice"] = f"unavailable: {why}"
        logger.warning("GEBC metrics: SPICE unavailable (%s); overall_score is not computed, agg_metrics = "
                       "mean ROUGE-L + mean CIDEr", why)
    scores["num_boundaries"] = len(gt["subject"])
    return scores


@registry.register_scorer("gebc")
def score_gebc(predictions: Sequence[Mapping[str, Any]], references: Mapping[str, Mapping[str, List[str]]]) -> Dict[str, Any]:
    """Registered scorer: predictions ``[{"boundary_id", "type", "caption"}]``, references
    ``{type: {boundary_id: [caption]}}`` (``GEBCDataset.ground_truth()``)."""
    return gebc_captioning_eval(predictions, references)


def submission(predictions: Sequence[Mapping[str, Any]], boundary_ids: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """{boundary_id: {"Subject", "Status_Before", "Status_After"}} over ``boundary_ids`` (the split's
    annotation) plus any predicted boundary; missing ones as empty strings."""
    out: Dict[str, Dict[str, str]] = {}
    for p in predictions:
        out.setdefault(str(p["boundary_id"]), {})[SUBMISSION_KEYS[p["type"]]] = p["caption"]
    missing = [b for b in dict.fromkeys(boundary_ids) if b not in out]
    if missing:
        logger.warning("submission: %d boundaries without predictions get empty captions (e.g. %s)",
                       len(missing), missing[:3])
    for b in missing:
        out[b] = {}
    for entry in out.values():
        for key in SUBMISSION_KEYS.values():
            entry.setdefault(key, "")
    return out


def write_submission(predictions: Sequence[Mapping[str, Any]], boundary_ids: Sequence[str], path: os.PathLike | str) -> Path:
    """Pickle :func:`submission` to ``path`` (the original's ``submit_test.pkl``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(submission(predictions, boundary_ids), f)
    os.replace(tmp, path)
    return path
