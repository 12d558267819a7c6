"""videollm.evaluate: batched, resumable, sharded runs on the offline benchmark with a tiny model."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
TINY_EVAL = ROOT / "eval_configs" / "tiny.yaml"


def tiny_eval_config(tmp: Path, seed: int = 0) -> Path:
    """eval_configs/tiny.yaml with model.ckpt = a full state dict of a seeded random tiny model, so
    that every process (and lmms-eval) builds exactly the same weights."""
    from videollm.config import load_config
    from videollm.models.video_llama import VideoLLAMA

    torch.manual_seed(seed)
    model_cfg = load_config(str(TINY_EVAL)).model
    model_cfg.ckpt = ""  # the config's glob: no checkpoint, random weights from the seed
    model = VideoLLAMA.from_config(model_cfg)
    cfg = OmegaConf.load(TINY_EVAL)
    ckpt = tmp / f"tiny_seed{seed}.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    cfg.model.ckpt = str(ckpt)
    path = tmp / f"tiny_seed{seed}.yaml"
    OmegaConf.save(cfg, path)
    return path


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory) -> Path:
    from videollm.synthetic_bench import write_benchmark

    root = tmp_path_factory.mktemp("synthetic_bench")
    write_benchmark(root, num_clips=4, seed=0)
    return root


@pytest.fixture(scope="module")
def eval_cfg(tmp_path_factory) -> Path:
    return tiny_eval_config(tmp_path_factory.mktemp("tiny_cfg"))


@pytest.fixture(scope="module")
def chat(eval_cfg):
    import argparse

    from videollm.chat import build_chat_from_args

    args = argparse.Namespace(cfg_path=str(eval_cfg), options=None, model_type=None, gpu_id=None, cpu=True, ckpt=None,
                              low_resource=False, load_in_4bit=False, device_map=None, vit_on_cpu=False)
    chat, template, _ = build_chat_from_args(args)
    return chat, template


def records(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_offline_benchmark_is_in_the_mvbench_and_msvd_qa_layouts_with_held_out_seeds(bench_root):
    from videollm.benchmarks import load_benchmark
    from videollm.synthetic_bench import SEED_BASE

    mc = load_benchmark("mvbench", bench_root / "mvbench")
    assert mc.kind == "mc" and len(mc.samples) == 12 and mc.prompt.style == "pllava"
    assert {s.category for s in mc.samples} == {"Object Color", "Object Shape", "Moving Direction"}
    manifest = json.loads((bench_root / "manifest.json").read_text())
    by_video = {Path(c["video"]).name: c for c in manifest["clips"]}
    for s in mc.samples:
        clip = by_video[Path(s.video).name]
        attr = {"Object Color": "color", "Object Shape": "shape", "Moving Direction": "direction"}[s.category]
        assert s.options["ABCD".index(s.answer)] == clip[attr]  # the answer letter names the clip's attribute
        assert Path(s.video).is_file()
    assert all(c["seed"] >= SEED_BASE for c in manifest["clips"])  # above every training seed
    qa = load_benchmark("msvd_qa", bench_root / "msvd_qa")
    assert qa.kind == "open" and len(qa.samples) == 12
    assert all(Path(s.video).is_file() for s in qa.samples)
    assert sorted(s.answer for s in qa.samples) == sorted(s.options["ABCD".index(s.answer)] for s in mc.samples)


@pytest.mark.slow
def test_a_run_writes_records_summary_table_and_chart(chat, bench_root, tmp_path):
    from videollm.benchmarks import load_benchmark
    from videollm.chat import GenerationSettings
    from videollm.evaluate import EvalOptions, evaluate

    c, template = chat
    bench = load_benchmark("mvbench", bench_root / "mvbench")  # PLLaVA prompting, "Best option:(" cue
    out = tmp_path / "run"
    summary = evaluate(c, template, bench, out, EvalOptions(batch_size=4, generation=GenerationSettings(max_new_tokens=6),
                                                            progress=False))
    recs = records(out / "predictions.jsonl")
    assert [r["id"] for r in recs] == [s.id for s in bench.samples]
    for r in recs:
        assert r["prompt"].endswith("Assistant: Best option:(") and "(A) " in r["prompt"] and "Question: " in r["prompt"]
        assert set(r) >= {"prompt", "options", "reference", "prediction", "parsed", "correct"}
        assert r["correct"] == (r["parsed"] == r["reference"])
    assert summary["samples"] == 12 and summary["answered"] == 12
    assert summary["accuracy"] == pytest.approx(100 * sum(r["correct"] for r in recs) / 12, abs=0.01)
    per = summary["per_category"]["category"]
    assert sum(v["n"] for v in per.values()) == 12
    saved = json.loads((out / "summary.json").read_text())
    assert saved["accuracy"] == summary["accuracy"] and saved["prompt_style"] == "pllava"
    assert "| Moving Direction | 4 |" in (out / "results.md").read_text()
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((out / "parts").glob("*.jsonl"))  # merged into predictions.jsonl


def test_batched_answers_equal_one_by_one_answers_with_and_without_the_cue(chat, bench_root):
    from videollm.benchmarks import load_benchmark
    from videollm.chat import GenerationSettings
    from videollm.evaluate import ask_batch

    c, template = chat
    bench = load_benchmark("mvbench", bench_root / "mvbench")
    s = bench.samples[:3]
    gen = GenerationSettings(max_new_tokens=6)
    for cue, system in (("Best option:(", bench.system_text()), ("", None)):
        texts = [bench.user_text(x) for x in s]
        together = ask_batch(c, template, [x.video for x in s], texts, gen, system=system, cue=cue)
        alone = [ask_batch(c, template, [x.video], [t], gen, system=system, cue=cue)[0] for x, t in zip(s, texts)]
        assert together == alone
        assert all(p.endswith(cue) for p, _ in together)


def test_a_missing_video_is_an_error_record_and_a_rerun_retries_only_it(chat, bench_root, tmp_path, monkeypatch):
    import shutil

    from videollm import evaluate as ev
    from videollm.benchmarks import load_benchmark
    from videollm.chat import GenerationSettings

    c, template = chat
    root = tmp_path / "mv"
    shutil.copytree(bench_root / "mvbench", root)
    bench = load_benchmark("mvbench", root, prompt_style="question")
    victim = Path(bench.samples[1].video)
    hidden = victim.with_suffix(".bak")
    victim.rename(hidden)
    out = tmp_path / "run"
    opts = ev.EvalOptions(batch_size=4, generation=GenerationSettings(max_new_tokens=4), progress=False)
    summary = ev.evaluate(c, template, bench, out, opts)
    errs = [r for r in records(out / "predictions.jsonl") if "error" in r]
    assert len(errs) == 3 and all("video not found" in r["error"] and str(victim) in r["error"] for r in errs)
    assert summary["errors"] == 3 and summary["answered"] == 9
    hidden.rename(victim)
    asked = []
    real = ev.ask_batch

    def spy(chat_, template_, videos, texts, *a, **k):
        asked.extend(videos)
        return real(chat_, template_, videos, texts, *a, **k)

    monkeypatch.setattr(ev, "ask_batch", spy)
    summary = ev.evaluate(c, template, bench, out, opts)
    assert asked == [str(victim)] * 3  # only the three questions about the restored clip
    assert summary["errors"] == 0 and summary["answered"] == 12


@pytest.mark.slow
def test_resume_after_a_kill_skips_answered_samples_and_ends_with_the_same_records(chat, bench_root, tmp_path, monkeypatch):
    from videollm import evaluate as ev
    from videollm.benchmarks import load_benchmark
    from videollm.chat import GenerationSettings

    c, template = chat
    bench = load_benchmark("mvbench", bench_root / "mvbench", prompt_style="question")
    opts = ev.EvalOptions(batch_size=4, generation=GenerationSettings(max_new_tokens=4), progress=False)
    reference = tmp_path / "reference"
    ev.evaluate(c, template, bench, reference, opts)
    out = tmp_path / "killed"
    real = ev.ask_batch
    calls = {"n": 0}

    def dies_in_the_second_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a kill: no summary, only the first batch's appended records
        return real(*a, **k)

    monkeypatch.setattr(ev, "ask_batch", dies_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(c, template, bench, out, opts)
    part = records(out / "parts" / "rank0.jsonl")
    assert len(part) == 4 and not (out / "summary.json").exists()
    with open(out / "parts" / "rank0.jsonl", "a") as f:
        f.write('{"id": "Object Shape/0", "predic')  # a torn last line
    asked = []

    def spy(chat_, template_, videos, texts, *a, **k):
        asked.extend(texts)
        return real(chat_, template_, videos, texts, *a, **k)

    monkeypatch.setattr(ev, "ask_batch", spy)
    summary = ev.evaluate(c, template, bench, out, opts)
    assert len(asked) == 8 and summary["run_this_time"] == 8
    strip = lambda rs: [{k: v for k, v in r.items()} for r in rs]  # noqa: E731
    assert strip(records(out / "predictions.jsonl")) == strip(records(reference / "predictions.jsonl"))
    # a third run has nothing left to do
    asked.clear()
    assert ev.evaluate(c, template, bench, out, opts)["run_this_time"] == 0 and asked == []


def test_an_output_folder_of_another_benchmark_is_refused(chat, bench_root, tmp_path):
    from videollm.benchmarks import load_benchmark
    from videollm.chat import GenerationSettings
    from videollm.errors import ConfigError
    from videollm.evaluate import EvalOptions, evaluate

    c, template = chat
    opts = EvalOptions(batch_size=4, limit=2, generation=GenerationSettings(max_new_tokens=2), progress=False)
    evaluate(c, template, load_benchmark("mvbench", bench_root / "mvbench"), tmp_path, opts)
    with pytest.raises(ConfigError, match="prompt_style"):
        evaluate(c, template, load_benchmark("mvbench", bench_root / "mvbench", prompt_style="letter"), tmp_path, opts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_worker(rank: int, world: int, port: int, cfg: str, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from videollm import evaluate as ev

    code = ev.main(["--cfg-path", cfg, "--cpu", "--benchmark", "mvbench", "--data-root", root, "--output", out,
                    "--batch-size", "2", "--max-new-tokens", "4", "--no-progress"], out=io.StringIO(), err=io.StringIO())
    if code != 0:
        raise SystemExit(code)


@pytest.mark.slow
def test_a_two_process_gloo_run_equals_a_one_process_run(eval_cfg, bench_root, tmp_path):
    import torch.multiprocessing as mp

    from videollm import evaluate as ev

    root = str(bench_root / "mvbench")
    one = tmp_path / "one"
    assert ev.main(["--cfg-path", str(eval_cfg), "--cpu", "--benchmark", "mvbench", "--data-root", root, "--output",
                    str(one), "--batch-size", "2", "--max-new-tokens", "4", "--no-progress"], out=io.StringIO()) == 0
    two = tmp_path / "two"
    mp.spawn(_shard_worker, args=(2, _free_port(), str(eval_cfg), root, str(two)), nprocs=2, join=True)
    a, b = records(one / "predictions.jsonl"), records(two / "predictions.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == 12
    assert a == b
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert sb["world_size"] == 2 and sa["world_size"] == 1
    assert sa["accuracy"] == sb["accuracy"] and sa["per_category"] == sb["per_category"]


def test_the_cli_names_bad_input(tmp_path, eval_cfg):
    from videollm import evaluate as ev

    err = io.StringIO()
    assert ev.main(["--cfg-path", str(eval_cfg), "--cpu", "--benchmark", "mvbenc", "--data-root", str(tmp_path)],
                   err=err) == 2
    assert "did you mean mvbench" in err.getvalue()
    err = io.StringIO()
    assert ev.main(["--cfg-path", str(eval_cfg), "--cpu", "--benchmark", "mvbench", "--data-root", str(tmp_path)],
                   err=err) == 2
    assert "json" in err.getvalue() and "DataError" in err.getvalue()


def test_open_ended_qa_end_to_end_with_a_local_judge(chat, bench_root, tmp_path):
    from test_benchmarks import FakeJudge

    from videollm.benchmarks import load_benchmark
    from videollm.benchmarks.judge import SYSTEM_PROMPT, JudgeClient
    from videollm.chat import GenerationSettings
    from videollm.evaluate import EvalOptions, evaluate

    c, template = chat
    bench = load_benchmark("msvd_qa", bench_root / "msvd_qa")
    with FakeJudge() as fake:
        opts = EvalOptions(batch_size=6, generation=GenerationSettings(max_new_tokens=4), progress=False,
                           judge=JudgeClient(fake.url, model="fake-judge", timeout=5))
        summary = evaluate(c, template, bench, tmp_path, opts)
    assert len(fake.requests) == 12
    recs = records(tmp_path / "predictions.jsonl")
    assert all(r["judge"]["model"] == "fake-judge" and r["judge"]["raw"].startswith("{'pred'") for r in recs)
    assert all(r["judge"]["messages"][1]["content"].endswith("{'pred': 'yes', 'score': 4.8}.") for r in recs)
    yes = sum(r["judge"]["pred"] == "yes" for r in recs)
    assert summary["judge_accuracy"] == round(100 * yes / 12, 2) and summary["judged"] == 12
    assert summary["contains"] == round(100 * sum(r["contains"] for r in recs) / 12, 2)  # judge-free, always there
    assert summary["judge"]["model"] == "fake-judge" and summary["judge"]["system_prompt"] == SYSTEM_PROMPT
