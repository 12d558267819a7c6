"""The lmms-eval plugin: `lmms-eval --model videollm` runs a local task on the offline benchmark and
reports the same accuracy (and the same replies) as `python -m videollm.evaluate`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_evaluate import tiny_eval_config

import lmms_eval  # noqa: F401,E402 - installed by `make setup` (pip install --no-deps lmms-eval)


def test_the_entry_point_names_the_plugin_model():
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model

    from videollm.integrations.lmms_eval_model import VideoLLMEval

    (ep,) = [e for e in entry_points().select(group="lmms_eval.models") if e.name == "videollm"]
    assert ep.value == "videollm.integrations.lmms_eval:manifest"
    assert get_model("videollm") is VideoLLMEval and VideoLLMEval.is_simple


def test_generation_kwargs_map_to_generation_settings():
    from videollm.integrations.lmms_eval_model import cut_at, settings_from_gen_kwargs

    s, until = settings_from_gen_kwargs({"max_new_tokens": 16, "temperature": 0, "do_sample": False, "until": ["\n\n"]})
    assert (s.max_new_tokens, s.do_sample, until) == (16, False, ["\n\n"])
    s, until = settings_from_gen_kwargs({"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.5, "until": "###"}, cap=20)
    assert (s.max_new_tokens, s.do_sample, s.temperature, s.top_p, until) == (20, True, 0.7, 0.5, ["###"])
    assert cut_at("It is red.\n\nQuestion", ["\n\n"]) == "It is red."


class _Req:
    def __init__(self, args):
        self.args = args


def test_multi_round_keeps_one_conversation_per_document(tmp_path):
    from videollm.integrations.lmms_eval_model import VideoLLMEval
    from videollm.synthetic_bench import write_benchmark

    write_benchmark(tmp_path / "b", num_clips=2)
    cfg = tiny_eval_config(tmp_path)
    model = VideoLLMEval(cfg_path=str(cfg), device="cpu", batch_size=2)
    videos = sorted(str(p) for p in (tmp_path / "b" / "mvbench" / "video" / "synthetic").glob("*.mp4"))
    model.task_dict = {"t": {"test": {0: {"video": videos[0]}, 1: {"video": videos[1]}}}}
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=0, previous_round_info=None):
        seen.append((doc["video"], round_idx, list(previous_output)))
        return None, f"And round {round_idx}?", round_idx >= 2, None, {"n": round_idx}

    gen = {"max_new_tokens": 3, "temperature": 0}
    reqs = [_Req(("What is moving?", gen, lambda d: [d["video"]], doc_to_text, i, "t", "test")) for i in (0, 1)]
    out = model.generate_until_multi_round(reqs)
    assert [len(r) for r in out] == [2, 2]  # rounds 0 and 1; doc_to_text ends it at round 2
    assert [(v, r) for v, r, _ in seen] == [(videos[0], 1), (videos[1], 1), (videos[0], 2), (videos[1], 2)]
    assert seen[2][2] == list(out[0][:2]) and seen[0][2] == [out[0][0]]
    single = model.generate_until([_Req(("What is moving?", gen, lambda d: [d["video"]], 0, "t", "test"))])
    assert single == [out[0][0]]  # the first round is the one-turn answer


@pytest.mark.slow
def test_lmms_eval_reports_the_same_accuracy_as_videollm_evaluate(tmp_path):
    from videollm import evaluate as ev
    from videollm.integrations.lmms_eval import write_task
    from videollm.synthetic_bench import write_benchmark

    write_benchmark(tmp_path / "bench", num_clips=4)
    cfg = tiny_eval_config(tmp_path)
    data = tmp_path / "bench" / "mvbench"
    ours = tmp_path / "ours"
    assert ev.main(["--cfg-path", str(cfg), "--cpu", "--benchmark", "mvbench", "--data-root", str(data), "--prompt-style",
                    "question", "--output", str(ours), "--batch-size", "4", "--no-progress"], out=io.StringIO()) == 0
    summary = json.loads((ours / "summary.json").read_text())
    preds = {json.loads(line)["id"]: json.loads(line) for line in (ours / "predictions.jsonl").read_text().splitlines()}

    task_yaml = write_task(tmp_path / "task", data, benchmark="mvbench", prompt_style="question")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    lmms = Path(sys.executable).with_name("lmms-eval")
    cmd = [str(lmms), "--model", "videollm", "--model_args", f"cfg_path={cfg},device=cpu", "--batch_size", "4",
           "--tasks", task_yaml.stem, "--include_path", str(task_yaml.parent), "--output_path", str(tmp_path / "lmms"),
           "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = list((tmp_path / "lmms").rglob("*_results.json"))
    acc = json.loads(results.read_text())["results"][task_yaml.stem]["accuracy,none"]
    assert 100 * acc == pytest.approx(summary["accuracy"], abs=0.005)  # the summary rounds to 0.01
    (samples_file,) = list((tmp_path / "lmms").rglob("*_samples_*.jsonl"))
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == len(preds) == 12
    docs = [json.loads(line) for line in (task_yaml.parent / "docs.jsonl").read_text().splitlines()]
    for s in samples:
        rec = preds[docs[s["doc_id"]]["id"]]
        reply = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
        assert reply == rec["prediction"].strip()  # the same generation path: the same replies
        assert s["input"] == rec["question"] and s["target"] == rec["reference"]
        assert s["accuracy"] == float(rec["correct"])
