"""Scores of one benchmark run: per-sample judgements, the summary, its table and its chart.

* multiple choice: accuracy overall and per category level (MVBench task, Video-MME duration /
  domain / task type, NExT-QA type and group), with how many replies needed the random fallback;
* open-ended QA: judge-free exact match and "contains" (the normalised reference occurs in the
  normalised reply as whole words), and the judge's accuracy and mean score when it ran;
* captioning: BLEU-4, ROUGE-L and CIDEr (pycocoevalcap; PTB tokenisation needs Java, without it a
  plain lower-case word split is used and the summary says so).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Lower case, punctuation dropped, articles dropped, whitespace collapsed."""
    words = re.findall(r"[a-z0-9]+", (text or "").lower())
    return " ".join(w for w in words if w not in _ARTICLES)


def open_match(prediction: str, reference: str) -> Dict[str, bool]:
    """Judge-free scores of an open answer: ``exact`` and ``contains``."""
    p, r = normalize_answer(prediction), normalize_answer(reference)
    contains = bool(r) and re.search(r"(?<![a-z0-9])" + re.escape(r) + r"(?![a-z0-9])", p) is not None
    return {"exact": bool(r) and p == r, "contains": contains}


def _pct(num: float, den: int) -> Optional[float]:
    return round(100.0 * num / den, 2) if den else None


def _category_values(record: Mapping[str, Any], level: str) -> str:
    if level == "category":
        return str(record.get("category", "all"))
    return str((record.get("extra") or {}).get(level, "unknown"))


def summarize(records: Sequence[Mapping[str, Any]], kind: str, category_fields: Sequence[str] = ("category",),
              total: Optional[int] = None) -> Dict[str, Any]:
    """The summary of a run's records (errors are counted, not scored)."""
    ok = [r for r in records if "error" not in r]
    out: Dict[str, Any] = {"kind": kind, "samples": total if total is not None else len(records),
                           "answered": len(ok), "errors": len(records) - len(ok)}
    if kind == "mc":
        out["accuracy"] = _pct(sum(bool(r["correct"]) for r in ok), len(ok))
        out["unparsed"] = sum(r.get("parse") in ("fallback", "none") for r in ok)
        out["chance"] = round(100.0 * sum(1.0 / max(len(r.get("options") or [1]), 1) for r in ok) / len(ok), 2) if ok else None
        metric = "correct"
    elif kind == "open":
        out["exact"] = _pct(sum(bool(r["exact"]) for r in ok), len(ok))
        out["contains"] = _pct(sum(bool(r["contains"]) for r in ok), len(ok))
        judged = [r for r in ok if isinstance(r.get("judge"), dict) and r["judge"].get("pred") in ("yes", "no")]
        if judged:
            out["judge_accuracy"] = _pct(sum(r["judge"]["pred"] == "yes" for r in judged), len(judged))
            scores = [float(r["judge"]["score"]) for r in judged if r["judge"].get("score") is not None]
            out["judge_score"] = round(sum(scores) / len(scores), 3) if scores else None
            out["judged"] = len(judged)
        metric = "contains"
    else:
        return out
    per: Dict[str, Dict[str, Any]] = OrderedDict()
    for level in category_fields:
        groups: Dict[str, List[bool]] = defaultdict(list)
        for r in ok:
            groups[_category_values(r, level)].append(bool(r[metric]))
        per[level] = {k: {"n": len(v), "accuracy": _pct(sum(v), len(v))} for k, v in sorted(groups.items())}
    out["per_category"] = per
    out["category_metric"] = "accuracy" if kind == "mc" else "contains"
    return out


def caption_scores(records: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Corpus BLEU-4, ROUGE-L and CIDEr of the answered caption records (pycocoevalcap)."""
    ok = [r for r in records if "error" not in r]
    if not ok:
        return {}
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        from videollm.errors import ConfigError

        raise ConfigError("captioning metrics need pycocoevalcap (pip install pycocoevalcap)") from None
    gts = {str(i): [{"caption": c} for c in r["references"]] for i, r in enumerate(ok)}
    res = {str(i): [{"caption": r["prediction"] or ""}] for i, r in enumerate(ok)}
    tokenizer = "ptb"
    if shutil.which("java"):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts_t, res_t = tok.tokenize(gts), tok.tokenize(res)
    else:
        logger.warning("java not found: captions are tokenised by a plain word split instead of the PTB tokenizer "
                       "(apt-get install default-jre-headless for the standard numbers)")
        tokenizer = "plain (no java)"

        def split(d):
            return {k: [" ".join(re.findall(r"[a-z0-9]+", c["caption"].lower())) for c in v] for k, v in d.items()}
        gts_t, res_t = split(gts), split(res)
    res_t = {k: v if v and v[0] else ["<empty>"] for k, v in res_t.items()}
    bleu, _ = Bleu(4).compute_score(gts_t, res_t, verbose=0)
    rouge, _ = Rouge().compute_score(gts_t, res_t)
    cider, _ = Cider().compute_score(gts_t, res_t)
    return {"BLEU-4": round(100 * float(bleu[3]), 2), "ROUGE-L": round(100 * float(rouge), 2),
            "CIDEr": round(100 * float(cider), 2), "tokenizer": tokenizer}


# --------------------------------------------------------------------------------------------- outputs


def markdown_table(summary: Mapping[str, Any]) -> str:
    """The summary as markdown: the headline numbers, then one table per category level."""
    name = summary.get("benchmark", "")
    lines = [f"## {name}", ""]
    head = [("samples", summary.get("samples")), ("answered", summary.get("answered")), ("errors", summary.get("errors"))]
    for key in ("accuracy", "chance", "unparsed", "exact", "contains", "judge_accuracy", "judge_score",
                "BLEU-4", "ROUGE-L", "CIDEr"):
        if summary.get(key) is not None:
            head.append((key, summary[key]))
    lines += ["| metric | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in head] + [""]
    metric = summary.get("category_metric", "accuracy")
    for level, groups in (summary.get("per_category") or {}).items():
        if len(groups) <= 1 and level == "category" and "all" in groups:
            continue
        lines += [f"| {level} | n | {metric} (%) |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['n']} | {v['accuracy']} |" for k, v in groups.items()] + [""]
    return "\n".join(lines)


def bar_chart(summary: Mapping[str, Any], path: Path) -> Optional[Path]:
    """A PNG bar chart of the first category level's accuracy; None without matplotlib or data."""
    per = summary.get("per_category") or {}
    if not per:
        return None
    level, groups = next(iter(per.items()))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no chart (pip install matplotlib)")
        return None
    names = list(groups)
    values = [groups[k]["accuracy"] or 0.0 for k in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), 3.6), dpi=100)
    ax.bar(range(len(names)), values, color="#4477aa")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"{summary.get('category_metric', 'accuracy')} (%)")
    if summary.get("chance"):
        ax.axhline(summary["chance"], color="grey", linestyle="--", linewidth=1, label=f"chance {summary['chance']}%")
        ax.legend(fontsize=8)
    ax.set_title(f"{summary.get('benchmark', '')}: per {level}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(summary: Dict[str, Any], out_dir: Path) -> Dict[str, str]:
    """summary.json, results.md and accuracy.png in ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"summary": str(out_dir / "summary.json"), "table": str(out_dir / "results.md")}
    chart = bar_chart(summary, out_dir / "accuracy.png")
    if chart is not None:
        paths["chart"] = str(chart)
    summary["outputs"] = dict(paths, predictions=str(out_dir / "predictions.jsonl"))
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out_dir / "summary.json")
    (out_dir / "results.md").write_text(markdown_table(summary) + "\n", encoding="utf-8")
    return paths


__all__ = ["bar_chart", "caption_scores", "markdown_table", "normalize_answer", "open_match", "summarize", "write_outputs"]
