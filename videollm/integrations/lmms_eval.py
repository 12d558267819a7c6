"""lmms-eval integration: the ``videollm`` model, and task folders for videollm's benchmarks.

    pip install --no-deps lmms-eval          # plus what it imports at run time: see the dev extra
    python -m videollm.synthetic_bench --out data/synthetic_bench --lmms-eval-task
    lmms-eval --model videollm --model_args cfg_path=eval_configs/tiny.yaml --batch_size 8 \\
        --tasks videollm_mvbench --include_path data/synthetic_bench/lmms_eval_task

lmms-eval finds plugin models through the ``lmms_eval.models`` entry-point group (its
``ModelRegistryV2.load_entrypoint_manifests``): videollm's ``pyproject.toml`` points the name
``videollm`` at :func:`manifest`, which returns a ``ModelManifest`` naming the model class
(:class:`videollm.integrations.lmms_eval_model.VideoLLMEval`, a "simple" model: it receives
the task's text and the visuals' paths). ``--model_args`` are that class's arguments.

The model answers through the Chat API exactly as ``python -m videollm.evaluate`` does
(:func:`videollm.evaluate.ask_batch`), so a task written by :func:`write_task` (documents from
videollm's own loader, the same question text, the same option parsing in
:func:`process_results`) reports the same accuracy as the evaluator. This module imports
nothing from lmms-eval: the task functions and :func:`write_task` work without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

MODEL_ID = "videollm"
MODEL_CLASS = "videollm.integrations.lmms_eval_model.VideoLLMEval"


def manifest():
    """The entry point's payload: videollm's model manifest for lmms-eval's registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)


# --------------------------------------------------------------------------------------------- task functions
# Named from a task YAML as ``!function videollm.integrations.lmms_eval.<name>`` (lmms-eval
# falls back to an absolute import when no utils.py sits next to the YAML).


def doc_to_visual(doc: Dict[str, Any]) -> List[str]:
    return [doc["video"]]


def doc_to_text(doc: Dict[str, Any], lmms_eval_specific_kwargs: Optional[Dict[str, Any]] = None) -> str:
    return doc["prompt_text"]


def process_results(doc: Dict[str, Any], results: Sequence[str]) -> Dict[str, float]:
    """Score one reply exactly as ``videollm.evaluate`` does (same parser, same fallback)."""
    from videollm.benchmarks.metrics import open_match
    from videollm.benchmarks.options import extract_option

    reply = results[0] if results else ""
    if doc["kind"] == "mc":
        choice = extract_option(reply, doc["options"], prefix=doc.get("reply_prefix") or "",
                                fallback=doc.get("fallback") or None, key=doc["id"])
        return {"accuracy": float(choice.letter == doc["answer"])}
    m = open_match(reply, doc["answer"])
    return {"accuracy": float(m["contains"]), "exact": float(m["exact"])}


# --------------------------------------------------------------------------------------------- task folders

_TASK_YAML = """\
# lmms-eval task written by videollm.integrations.lmms_eval.write_task from {benchmark} at {root}
# ({n} samples, prompt style {style}). Run:
#   lmms-eval --model videollm --model_args cfg_path=CONFIG.yaml --tasks {task} --include_path {folder}
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function videollm.integrations.lmms_eval.doc_to_visual
doc_to_text: !function videollm.integrations.lmms_eval.doc_to_text
doc_to_target: answer
process_results: !function videollm.integrations.lmms_eval.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
metric_list:
{metrics}
metadata:
  version: 1.0
"""


def write_task(task_dir: Union[str, Path], data_root: Union[str, Path], *, benchmark: str = "mvbench",
               prompt_style: Optional[str] = None, limit: Optional[int] = None, task: Optional[str] = None,
               max_new_tokens: Optional[int] = None, fallback: Optional[str] = "random") -> Path:
    """Write an lmms-eval task folder (``<task>.yaml`` + ``docs.jsonl``) for a videollm benchmark.

    Documents come from videollm's loader, so lmms-eval sees the same samples, questions and
    answers as ``python -m videollm.evaluate --benchmark ... --prompt-style ...``. Answer cues
    after the assistant role (``pllava``) have no lmms-eval equivalent: use another style.
    Returns the YAML's path.
    """
    from videollm.benchmarks import load_benchmark
    from videollm.errors import ConfigError
    from videollm.evaluate import DEFAULT_MAX_NEW_TOKENS

    bench = load_benchmark(benchmark, data_root, prompt_style=prompt_style)
    if bench.kind == "caption":
        raise ConfigError("write_task: captioning benchmarks are not written as lmms-eval tasks")
    if bench.answer_cue() or bench.system_text():
        raise ConfigError(f"write_task: prompt style {bench.prompt.style!r} sets a system text and an answer cue that "
                          "lmms-eval cannot pass to a model; use --prompt-style letter, videomme or question")
    folder = Path(task_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    name = task or f"videollm_{bench.name}"
    samples = bench.samples[:limit] if limit else bench.samples
    docs = folder / "docs.jsonl"
    with open(docs, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps({"id": s.id, "video": s.video, "prompt_text": bench.user_text(s), "options": list(s.options),
                                "answer": s.answer, "category": s.category, "kind": bench.kind,
                                "reply_prefix": bench.reply_prefix(), "fallback": fallback or ""}, ensure_ascii=False) + "\n")
    metric_names = ["accuracy"] + (["exact"] if bench.kind == "open" else [])
    metrics = "\n".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true" for m in metric_names)
    yaml_path = folder / f"{name}.yaml"
    yaml_path.write_text(_TASK_YAML.format(
        benchmark=bench.name, root=bench.root, n=len(samples), style=bench.prompt.style, task=name, folder=folder,
        docs=json.dumps(str(docs)), max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS[bench.kind],
        metrics=metrics), encoding="utf-8")
    return yaml_path


__all__ = ["MODEL_CLASS", "MODEL_ID", "doc_to_text", "doc_to_visual", "manifest", "process_results", "write_task"]
