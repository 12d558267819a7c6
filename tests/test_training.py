"""Training: the runner, its optimizer groups, accumulation, checkpoints, metrics, bad steps and
bad samples, exact resume after SIGKILL, the recipes, and the caption evaluation."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from videollm.checkpoint import load_file
from videollm.config import RunConfig, load_config, with_defaults
from videollm.datasets import build_train_loader, collate_caption
from videollm.errors import DataError, TrainingError
from videollm.evaluation import parse_attributes, score_captions
from videollm.models.video_llama import VideoLLAMA
from videollm.runners import RESUME_NAME, RunnerIter, param_groups
from videollm.runners.metrics import read_log
from videollm.tasks import setup_task

REPO = Path(__file__).resolve().parents[1]
TINY_PRESET = REPO / "videollm/configs/models/video_llama_tiny.yaml"
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
CHECKPOINT_KEYS = {"model", "optimizer", "config", "scaler", "epoch"}
LOG_FIELDS = {"iteration", "epoch", "loss", "lr", "samples_per_s", "tokens_per_s", "data_wait_fraction"}
WORDS = ["red", "green", "blue", "circle", "square", "moving", "left", "right", "up", "down"]


class ToyCaptions(Dataset):
    """Random 2-frame 32-px clips with captions of different lengths (so token counts differ)."""

    def __init__(self, n: int = 16, frames: int = 2) -> None:
        self.n, self.frames = n, frames

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(1000 + i)
        words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(1 + (i * 5) % 7)]
        return {"image": torch.randn(3, self.frames, 32, 32, generator=g), "text_input": "a " + " ".join(words)}

    def collater(self, samples):
        return collate_caption(samples)


def tiny_config(out: Path, dropout: bool = False, **run) -> OmegaConf:
    model = OmegaConf.load(TINY_PRESET).model
    if not dropout:
        model.qformer = OmegaConf.merge(model.qformer, NO_DROPOUT)
        model.video_qformer = NO_DROPOUT
    values = {"output_dir": str(out), "max_epoch": 1, "iters_per_epoch": 2, "batch_size_train": 4, "log_freq": 1,
              "init_lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 0, "seed": 0}
    values.update(run)
    return OmegaConf.create({"model": model, "run": with_defaults(values, RunConfig)})


def make_runner(cfg, dataset=None, task=None, seed: int = 0) -> RunnerIter:
    torch.manual_seed(seed)
    task = task or setup_task(cfg)
    model = task.build_model(cfg)
    dataset = dataset or ToyCaptions()
    loader = build_train_loader({"toy": dataset}, batch_size=int(cfg.run.batch_size_train), seed=int(cfg.run.seed))
    return RunnerIter(cfg, task, model, {"toy": {"train": dataset}}, train_loader=loader)


def capture_grads(runner: RunnerIter) -> list:
    """Record the gradients at every optimizer step."""
    seen = []
    step = runner.optimizer.step

    def wrapped(*args, **kwargs):
        seen.append({n: p.grad.clone() for n, p in runner.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    runner.optimizer.step = wrapped
    return seen


# ------------------------------------------------------------------------------ optimizer groups
def test_param_groups_tiny_rules_agree_and_stage_counts():
    cfg = OmegaConf.load(TINY_PRESET).model
    model = VideoLLAMA.from_config(cfg)
    groups, report = param_groups(model, 0.05)
    assert report.disagreements == []  # the norm-module rule adds nothing on Video-LLaMA
    names = report.decay + report.no_decay
    assert all(n.startswith(("video_Qformer.", "video_query_tokens", "video_frame_position_embedding.", "llama_proj."))
               for n in names)
    assert "llama_proj.weight" in report.decay and "llama_proj.bias" in report.no_decay
    assert "video_query_tokens" in report.decay  # 3-D, no bias/ln/bn: decayed, as in the original
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    expected = sum(p.numel() for m in (model.video_Qformer, model.video_frame_position_embedding, model.llama_proj)
                   for p in m.parameters()) + model.video_query_tokens.numel()
    assert report.num_trainable == expected
    # unfreezing everything (the tiny_synthetic recipe): still no disagreement, norms undecayed
    cfg.freeze_vit = cfg.freeze_qformer = cfg.freeze_llm = False
    groups, report = param_groups(VideoLLAMA.from_config(cfg), 0.05)
    assert report.disagreements == []
    assert any("layernorm" in n.lower() or "norm" in n for n in report.no_decay)
    assert report.num_trainable == sum(p.numel() for p in VideoLLAMA.from_config(cfg).parameters())


@pytest.mark.parametrize(
    "model_type,audio,expected",
    [("vicuna7b", False, 22_104_064), ("vicuna13b", False, 22_891_520), ("llama2_7b", False, 22_104_064),
     ("vicuna7b", True, 22_855_680), ("vicuna13b", True, 23_643_136)],
)
def test_full_size_trainable_counts_on_meta(model_type, audio, expected):
    from videollm.config import build_model_config

    user = {"arch": "video_llama", "model_type": model_type, "llama_model": "", "vit_ckpt": "", "q_former_model": "",
            "tokenizer": "tiny", "imagebind_ckpt_path": ""}
    if audio:  # AL stages: audio Q-Former trains, the video branch and llama_proj stay frozen
        user.update(equip_audio_branch=True, frozen_audio_Qformer=False)
    else:  # VL stages
        user.update(frozen_video_Qformer=False, frozen_llama_proj=False)
    cfg = build_model_config(OmegaConf.create(user))
    with torch.device("meta"):
        model = VideoLLAMA.from_config(cfg)
    _, report = param_groups(model, 0.05)
    assert report.num_trainable == expected


# ------------------------------------------------------------------------------ accumulation
def test_grad_accumulation_2x4_equals_batch_8(tmp_path):
    big = make_runner(tiny_config(tmp_path / "big", iters_per_epoch=1, batch_size_train=8))
    grads_big = capture_grads(big)
    big.train()
    small = make_runner(tiny_config(tmp_path / "small", iters_per_epoch=2, batch_size_train=4, accum_grad_iters=2))
    grads_small = capture_grads(small)
    small.train()
    assert len(grads_big) == len(grads_small) == 1
    # the two micro-batches had different numbers of supervised tokens: plain loss averaging would differ
    tokens = [r["num_tokens"] for r in read_log(tmp_path / "small")]
    assert tokens[0] != tokens[1]
    assert grads_big[0].keys() == grads_small[0].keys()
    for name, g in grads_big[0].items():
        torch.testing.assert_close(grads_small[0][name], g, rtol=1e-4, atol=1e-7, msg=name)
    # the logged token-weighted loss of the big batch is the token-weighted mean of the two halves
    big_loss = read_log(tmp_path / "big")[0]["loss"]
    halves = read_log(tmp_path / "small")
    mean = sum(r["loss"] * r["num_tokens"] for r in halves) / sum(r["num_tokens"] for r in halves)
    assert big_loss == pytest.approx(mean, rel=1e-5)
    # after one AdamW step (lr 1e-3; Adam divides by |g|, which magnifies rounding where g ~ 0)
    torch.testing.assert_close(big.model.trainable_state_dict(), small.model.trainable_state_dict(), rtol=0, atol=2e-5)


# ------------------------------------------------------------------------------ checkpoints and log
def test_checkpoint_format_log_fields_and_reload(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(out, max_epoch=2, iters_per_epoch=2, keep_last_checkpoints=1, save_freq_iters=1)
    runner = make_runner(cfg)
    summary = runner.train()
    assert summary["optimizer_steps"] == 4 and summary["skipped_steps"] == 0
    # keep_last_checkpoints=1: only the final epoch's file survives
    assert sorted(p.name for p in out.glob("checkpoint_*.pth")) == ["checkpoint_1.pth"]
    ckpt = load_file(out / "checkpoint_1.pth")  # weights_only: a plain, safe file
    assert set(ckpt) == CHECKPOINT_KEYS
    assert ckpt["epoch"] == 1 and ckpt["scaler"] is None and isinstance(ckpt["config"], dict)
    model = runner.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers() if n in model.state_dict()}
    assert set(ckpt["model"]) == trainable | buffers
    assert set(ckpt["optimizer"]) == {"state", "param_groups"} and len(ckpt["optimizer"]["param_groups"]) == 2
    # a fresh model loads it through model.ckpt and gets the trained weights
    model_cfg = OmegaConf.merge(cfg.model, {"ckpt": str(out / "checkpoint_1.pth")})
    fresh = VideoLLAMA.from_config(model_cfg)
    for k, v in model.trainable_state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, msg=k)
    resume = load_file(out / RESUME_NAME)
    assert resume["epoch"] == 1 and resume["iteration"] == 2 and resume["data"] is not None
    assert {"scheduler", "rng", "optimizer", "bad_samples"} <= set(resume)
    records = read_log(out)
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]
    for r in records:
        assert LOG_FIELDS <= set(r)
        assert math.isfinite(r["loss"]) and r["samples_per_s"] > 0 and r["tokens_per_s"] > 0
        assert 0.0 <= r["data_wait_fraction"] <= 1.0
        assert r["lr"] == pytest.approx(1e-3)


def test_save_frozen_weights_puts_the_random_frozen_encoders_in_the_checkpoint(tmp_path):
    # The tiny preset freezes the ViT and the image Q-Former at random init: without their
    # weights in the file, a model built in another process (stage 2, the demo) would differ.
    out = tmp_path / "run"
    cfg = tiny_config(out, save_frozen_weights=True, keep_last_checkpoints=1)
    runner = make_runner(cfg)
    runner.train()
    ckpt = load_file(out / "checkpoint_0.pth")
    model = runner.model
    assert any(not p.requires_grad for p in model.parameters())
    assert set(ckpt["model"]) == set(model.state_dict())
    torch.manual_seed(123)  # another random init
    fresh = VideoLLAMA.from_config(OmegaConf.merge(cfg.model, {"ckpt": str(out / "checkpoint_0.pth")}))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, msg=k)


class CrashingLoader:
    """Wraps a loader and raises after ``n`` batches (a crash in the middle of an epoch)."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def __next__(self):
        if self.n == 0:
            raise RuntimeError("simulated crash")
        self.n -= 1
        return next(self.loader)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def test_resume_in_process_matches_uninterrupted(tmp_path):
    """Crash mid-epoch after a save, resume a new runner from resume_latest.pth: same losses, weights."""
    import random

    common = dict(max_epoch=2, iters_per_epoch=3, dropout=True, warmup_steps=2, min_lr=1e-4, save_freq_iters=4)
    full = make_runner(tiny_config(tmp_path / "full", **common))
    full.train()
    cut = tiny_config(tmp_path / "cut", **common)
    first = make_runner(cut)
    first.train_loader = CrashingLoader(first.train_loader, 5)  # iterations 0-4 run; the save after 3 is kept
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.train()
    assert load_file(tmp_path / "cut" / RESUME_NAME)["global_iteration"] == 4
    assert read_log(tmp_path / "cut")[-1]["iteration"] == 4  # redone after the resume
    second = make_runner(OmegaConf.merge(cut, {"run": {"auto_resume": True}}))
    torch.manual_seed(123)  # scramble the RNGs: the resume state must restore them
    random.seed(123)
    second.train()
    assert [r["loss"] for r in read_log(tmp_path / "full")] == [r["loss"] for r in read_log(tmp_path / "cut")]
    for k, v in full.model.trainable_state_dict().items():
        assert torch.equal(second.model.trainable_state_dict()[k], v), k


# ------------------------------------------------------------------------------ bad steps
class NaNTask:
    """Wraps a real task; the loss is NaN at the chosen iterations (counted per forward)."""

    def __init__(self, cfg, bad):
        self.inner = setup_task(cfg)
        self.bad = bad
        self.calls = 0

    def build_model(self, cfg):
        return self.inner.build_model(cfg)

    def forward_step(self, model, samples):
        out = self.inner.forward_step(model, samples)
        bad = self.bad(self.calls)
        self.calls += 1
        if bad:
            out = dict(out, loss=out["loss"] * float("nan"))
        return out


def test_nonfinite_loss_skips_the_step(tmp_path, caplog):
    cfg = tiny_config(tmp_path / "nan", iters_per_epoch=3)
    task = NaNTask(cfg, lambda i: i == 1)
    runner = make_runner(cfg, task=task)
    snapshots = []
    step = runner.optimizer.step
    runner.optimizer.step = lambda *a, **k: (snapshots.append(1), step(*a, **k))[1]
    with caplog.at_level(logging.WARNING):
        summary = runner.train()
    assert summary["skipped_steps"] == 1 and summary["optimizer_steps"] == 2 and len(snapshots) == 2
    assert "non-finite loss" in caplog.text
    records = read_log(tmp_path / "nan")
    assert records[1]["loss"] is None and records[1]["skipped_steps"] == 1
    for p in runner.model.parameters():
        assert torch.isfinite(p).all()


def test_nonfinite_losses_in_a_row_stop_the_run(tmp_path):
    cfg = tiny_config(tmp_path / "nan2", iters_per_epoch=10, max_nonfinite_in_row=3)
    task = NaNTask(cfg, lambda i: i >= 2)
    runner = make_runner(cfg, task=task)
    before = {k: v.clone() for k, v in runner.model.trainable_state_dict().items()}
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        runner.train()
    assert task.calls == 5  # 2 good iterations, then 3 bad ones
    changed = [k for k, v in runner.model.trainable_state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the good steps did update


# ------------------------------------------------------------------------------ bad samples
def _webvid_with_broken(root: Path, synthetic_root: Path, broken: list) -> Path:
    """A WebVid annotation dir listing the good train clips plus the given broken files."""
    import csv

    anno = root / "anno"
    anno.mkdir(parents=True)
    manifest = json.loads((synthetic_root / "manifest.json").read_text())
    videos = root / "videos" / "000"
    videos.mkdir(parents=True)
    rows = []
    for v in manifest["videos"]:
        if v["split"] == "train":
            os.symlink(synthetic_root / v["path"], videos / f"{v['videoid']}.mp4")
            rows.append({"videoid": v["videoid"], "name": v["caption"], "page_dir": "000"})
    for k, name in enumerate(broken):
        os.symlink(synthetic_root / "broken" / name, videos / f"bad{k}.mp4")
        rows.append({"videoid": f"bad{k}", "name": "a broken clip", "page_dir": "000"})
    with (anno / "part.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["videoid", "name", "page_dir"])
        w.writeheader()
        w.writerows(rows)
    return anno


def _webvid_dataset(anno: Path, root: Path):
    from videollm.registry import registry

    node = OmegaConf.create({
        "vis_processor": {"train": {"name": "alpro_video_train", "image_size": 32, "n_frms": 2}},
        "text_processor": {"train": {"name": "blip_caption"}},
        "build_info": {"anno_dir": str(anno), "videos_dir": str(root / "videos")},
    })
    return registry.get_builder_class("webvid").from_config(node, merge_defaults=True).build_datasets()["train"]


def test_bad_samples_are_counted_and_summarised(tmp_path, synthetic_root, caplog):
    anno = _webvid_with_broken(tmp_path, synthetic_root, ["zero_byte.mp4", "text.mp4"])
    dataset = _webvid_dataset(anno, tmp_path)
    cfg = tiny_config(tmp_path / "out", iters_per_epoch=5, batch_size_train=4, max_bad_sample_fraction=0.5)
    with caplog.at_level(logging.INFO):
        runner = make_runner(cfg, dataset=dataset)
        runner.train()
    tracker = runner.bad_samples
    assert tracker.bad == 2 and tracker.good == 18  # one pass: 18 good clips + 2 broken in 5 batches of 4
    assert {"empty", "not_a_video"} <= set(tracker.counts)
    assert "2 of 20 samples bad" in caplog.text
    assert read_log(tmp_path / "out")[-1]["bad_samples"] == 2


def test_too_many_bad_samples_stop_the_run(tmp_path, synthetic_root):
    broken = ["zero_byte.mp4", "text.mp4", "truncated.mp4", "audio_only.mp4"] * 2
    anno = _webvid_with_broken(tmp_path, synthetic_root, broken)
    dataset = _webvid_dataset(anno, tmp_path)
    cfg = tiny_config(tmp_path / "out", iters_per_epoch=6, batch_size_train=6, max_bad_sample_fraction=0.05)
    runner = make_runner(cfg, dataset=dataset)
    with pytest.raises(DataError, match="too many bad samples"):
        runner.train()


# ------------------------------------------------------------------------------ evaluation
def test_caption_scoring():
    assert parse_attributes("A Red circle, moving LEFT.") == {"shape": "circle", "color": "red", "direction": "left"}
    assert parse_attributes("nothing here") == {"shape": None, "color": None, "direction": None}
    m = score_captions(["a red circle moving left", "a blue square moving up", "green"],
                       ["a red circle moving left", "a blue triangle moving up", "a red square moving down"])
    assert m["shape_accuracy"] == pytest.approx(1 / 3) and m["color_accuracy"] == pytest.approx(2 / 3)
    assert m["direction_accuracy"] == pytest.approx(2 / 3) and m["exact_match"] == pytest.approx(1 / 3)
    assert m["num_samples"] == 3


# ------------------------------------------------------------------------------ recipes
RECIPES = sorted((REPO / "train_configs").glob("*.yaml"))
# Video-LLaMA's full-size recipes (the relatives' recipes are checked in their own test files)
FULL_SIZE = [p for p in RECIPES if p.name.startswith(("visionbranch_", "audiobranch_"))]


def test_recipe_set_is_complete():
    names = {p.stem for p in RECIPES}
    for stage in ("visionbranch_stage1_pretrain", "visionbranch_stage2_finetune", "audiobranch_stage1_pretrain",
                  "audiobranch_stage2_finetune"):
        assert stage in names
        for llm in ("vicuna7b", "vicuna13b", "llama2_7b", "llama2_13b"):
            assert f"{stage}_{llm}" in names
    assert "tiny_synthetic" in names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads(path):
    text = path.read_text()
    assert text.startswith("#")
    head = text.split("\n\n", 1)[0]
    assert "train.py --cfg-path train_configs/" + path.name in head
    cfg = load_config(path)
    from videollm.registry import registry

    assert cfg.run.task in registry.list("task")
    if path in FULL_SIZE:
        assert cfg.run.task in ("video_text_pretrain", "instruction_tuning", "image_text_pretrain")
        assert "8xA100-80G" in head
        assert cfg.run.amp is True and cfg.run.distributed is True
        stage1 = "stage1" in path.name
        assert cfg.run.init_lr == (1e-4 if stage1 else 3e-5)
        assert cfg.run.batch_size_train == (32 if stage1 else 4)
        audio = path.name.startswith("audiobranch")
        assert cfg.model.equip_audio_branch is audio
        assert cfg.model.frozen_video_Qformer is audio and cfg.model.frozen_audio_Qformer is (not audio)


@pytest.mark.parametrize("name,expected", [("visionbranch_stage1_pretrain_llama2_13b", 22_891_520),
                                           ("audiobranch_stage2_finetune_vicuna7b", 22_855_680)])
def test_full_size_recipe_builds_on_meta(name, expected):
    cfg = load_config(REPO / "train_configs" / f"{name}.yaml", [
        "model.llama_model=''", "model.vit_ckpt=''", "model.q_former_model=''", "model.tokenizer=tiny", "model.ckpt=''",
        "model.ckpt_2=''", "model.llama_proj_model=''", "model.imagebind_ckpt_path=''"])
    with torch.device("meta"):
        model = setup_task(cfg).build_model(cfg)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


# ------------------------------------------------------------------------------ train.py end to end
def _train_cmd(cfg_path: Path, out: Path, data: Path, *options: str) -> list:
    return [sys.executable, str(REPO / "train.py"), "--cfg-path", str(cfg_path), "--options",
            f"run.output_dir={out}", f"datasets.webvid.build_info.anno_dir={data / 'webvid/train'}",
            f"datasets.webvid.build_info.videos_dir={data / 'videos'}", *options]


@pytest.mark.slow
def test_sigkill_and_resume_reproduce_the_run_exactly(tmp_path, synthetic_root):
    recipe = REPO / "train_configs/tiny_stage1.yaml"
    opts = ["run.max_epoch=2", "run.iters_per_epoch=6", "run.save_freq_iters=2", "run.log_freq=1",
            "run.num_workers=0", "run.auto_resume=true"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = tmp_path / "full"
    subprocess.run(_train_cmd(recipe, full, synthetic_root, *opts), check=True, env=env, cwd=tmp_path,
                   capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(recipe, killed, synthetic_root, *opts), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # kill once the run is past a mid-epoch save (iteration 8 saved after iteration 7 ran)
    while time.time() < deadline:
        log = killed / "log.jsonl"
        if log.is_file() and any(json.loads(l)["iteration"] >= 8 for l in log.read_text().splitlines() if l.strip()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / RESUME_NAME).is_file()
    assert load_file(killed / RESUME_NAME)["global_iteration"] < 12  # really interrupted
    subprocess.run(_train_cmd(recipe, killed, synthetic_root, *opts), check=True, env=env, cwd=tmp_path,
                   capture_output=True)
    losses_full = [r["loss"] for r in read_log(full)]
    losses_resumed = [r["loss"] for r in read_log(killed)]
    assert len(losses_full) == 12 and losses_resumed == losses_full
    a, b = load_file(full / "checkpoint_1.pth")["model"], load_file(killed / "checkpoint_1.pth")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ bench FLOP accounting
def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train_step", REPO / "bench/train_step.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def test_bench_flop_accounting_and_gpu_args():
    b = _bench()
    shape = b.TransformerShape(params=1000, layers=2, width=8)
    assert b.forward_flops(shape, 10) == 2 * 1000 * 10 + 4 * 2 * 8 * 10 * 10
    assert b.forward_flops(shape, 4, context=10) == 2 * 1000 * 4 + 4 * 2 * 8 * 4 * 10
    assert b.frozen_backward_flops(shape, 10) == 2 * 1000 * 10 + 8 * 2 * 8 * 100
    assert b.train_flops(50, 3) == 900
    f = b.sample_flops(shape, 10, 2, shape, 4, shape, 10, 50, 8)
    assert f["encoder_fwd"] == 2 * (b.forward_flops(shape, 10) + b.forward_flops(shape, 4, 10))
    assert f["total"] == pytest.approx(f["encoder_fwd"] + f["llm_fwd"] + f["llm_bwd"] + f["trainable"])
    # the 7B LLM's matmul parameters (meta device: no memory), and a plausible per-sample count
    from videollm.config import build_model_config

    cfg = build_model_config(OmegaConf.create({"arch": "video_llama", "model_type": "vicuna7b", "llama_model": "",
                                               "vit_ckpt": "", "q_former_model": "", "tokenizer": "tiny"}))
    with torch.device("meta"):
        model = VideoLLAMA.from_config(cfg)
    shapes = b.model_shapes(model)
    assert shapes["llm"].params == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert (shapes["vit"].layers, shapes["vit"].width) == (39, 1408)
    f = b.flops_for(model, frames=8, seq_len=65)
    # ViT-g (~1B matmul params) on 8 x 257 tokens dominates stage 1: ~4.3 TFLOP of ~6.2
    assert 3.5e12 < f["encoder_fwd"] < 5e12 and f["encoder_fwd"] > f["llm_fwd"] + f["llm_bwd"]
    args = b.parse_args(["--gpu", "--model-type", "vicuna13b", "--batch-size", "8"])
    assert args.gpu and args.model_type == "vicuna13b" and args.batch_size == 8


def test_make_demo_recipes_chain_on_a_few_iterations(tmp_path, synthetic_root):
    """tiny_synthetic (rendered clips, frozen random encoders saved in the checkpoint, held-out
    files captioned) -> tiny_synthetic_chat (loads it) -> the chat builds from the stage-2 file."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    stage1, stage2 = tmp_path / "s1", tmp_path / "s2"
    subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--cfg-path", str(REPO / "train_configs/tiny_synthetic.yaml"), "--options",
         f"run.output_dir={stage1}", "run.max_epoch=1", "run.iters_per_epoch=3", "run.num_workers=0",
         f"datasets.synthetic_clips.build_info.val_anno_dir={synthetic_root / 'webvid/test'}",
         f"datasets.synthetic_clips.build_info.videos_dir={synthetic_root / 'videos'}"],
        check=True, env=env, cwd=tmp_path, capture_output=True)
    results = json.loads((stage1 / "eval_results.json").read_text())
    assert results["synthetic_clips/val"]["metrics"]["num_samples"] == len(
        (synthetic_root / "webvid/test/part_0.csv").read_text().strip().splitlines()) - 1
    ckpt = load_file(stage1 / "checkpoint_0.pth")
    assert any(k.startswith("visual_encoder.") for k in ckpt["model"])  # frozen, but saved
    assert any(k.startswith("Qformer.") for k in ckpt["model"])
    subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--cfg-path", str(REPO / "train_configs/tiny_synthetic_chat.yaml"),
         "--options", f"run.output_dir={stage2}", "run.max_epoch=1", "run.iters_per_epoch=2", "run.num_workers=0",
         f"model.ckpt={stage1 / 'checkpoint_0.pth'}"],
        check=True, env=env, cwd=tmp_path, capture_output=True)
    final = load_file(stage2 / "checkpoint_0.pth")["model"]
    # stage 2 kept the frozen encoders of stage 1 bit for bit and carries them on to the demo
    for key in ("visual_encoder.pos_embed", "Qformer.bert.embeddings.LayerNorm.weight", "query_tokens"):
        assert torch.equal(final[key], ckpt["model"][key]), key
    cfg = load_config(REPO / "eval_configs/tiny.yaml", [f"model.ckpt={stage2 / 'checkpoint_0.pth'}"])
    torch.manual_seed(999)
    model = VideoLLAMA.from_config(cfg.model)
    for key, value in final.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_progress_in_a_log_file_is_whole_lines(caplog):
    from videollm.runners.runner_iter import LineProgress

    caplog.set_level(logging.INFO, logger="videollm.runners.runner_iter")
    bar = LineProgress(total=200, initial=0)
    for i in range(200):
        bar.set_postfix(loss=f"{1.0 / (i + 1):.3f}")
        bar.update(1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: ")]
    assert len(lines) == 20 and lines[-1].startswith("train: 200/200 (100%)") and "loss=" in lines[-1]
    assert not any("\r" in line for line in lines)
