"""Multi-process training on CPU (gloo): DDP equals one process with the same global batch, and a
DeepSpeed ZeRO-2 run writes a checkpoint that a plain single-process model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from videollm.checkpoint import load_file
from videollm.config import load_config
from videollm.dist import DistInfo, all_gather_object, all_reduce_sum, get_rank, get_world_size, init_distributed
from videollm.models.video_llama import VideoLLAMA
from videollm.runners.metrics import read_log

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "train_configs/tiny_stage1.yaml"
NO_DROPOUT = [
    "model.qformer.hidden_dropout_prob=0.0", "model.qformer.attention_probs_dropout_prob=0.0",
    "model.video_qformer.hidden_dropout_prob=0.0", "model.video_qformer.attention_probs_dropout_prob=0.0",
]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _train(out: Path, data: Path, nproc: int, *options: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [
        str(REPO / "train.py"), "--cfg-path", str(RECIPE), "--options", f"run.output_dir={out}",
        f"datasets.webvid.build_info.anno_dir={data / 'webvid/train'}",
        f"datasets.webvid.build_info.videos_dir={data / 'videos'}", "run.log_freq=1", "run.num_workers=0", *options]
    proc = subprocess.run(cmd, env=_env(), cwd=out.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_single_process_helpers_are_no_ops(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    assert not info.distributed and info.is_main
    assert (get_rank(), get_world_size(), all_reduce_sum(3)) == (0, 1, 3)
    assert all_gather_object({"a": 1}) == [{"a": 1}]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path, synthetic_root):
    """2 ranks x batch 4 == 1 rank x batch 8: the same per-iteration losses and final weights."""
    common = ["run.max_epoch=1", "run.iters_per_epoch=4", *NO_DROPOUT]
    one, two = tmp_path / "one", tmp_path / "two"
    _train(one, synthetic_root, 1, "run.batch_size_train=8", *common)
    _train(two, synthetic_root, 2, "run.batch_size_train=4", *common)
    a, b = read_log(one), read_log(two)
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), (ra, rb)
        assert rb["num_tokens"] == ra["num_tokens"]  # the same samples, split over the ranks
        assert rb["lr"] == ra["lr"]
    wa, wb = load_file(one / "checkpoint_0.pth")["model"], load_file(two / "checkpoint_0.pth")["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=5e-5, msg=k)


@pytest.mark.slow
def test_deepspeed_zero2_two_processes_train_and_checkpoint_loads(tmp_path, synthetic_root):
    ds_cfg = tmp_path / "zero2.json"
    ds_cfg.write_text(json.dumps({"zero_optimization": {"stage": 2}, "steps_per_print": 1000}))
    out = tmp_path / "ds"
    _train(out, synthetic_root, 2, "run.max_epoch=1", "run.iters_per_epoch=4", "run.batch_size_train=2",
           f"run.deepspeed_config={ds_cfg}")
    records = read_log(out)
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]
    assert all(r["loss"] is not None for r in records)
    ckpt = load_file(out / "checkpoint_0.pth")
    assert set(ckpt) == {"model", "optimizer", "config", "scaler", "epoch"}
    # a plain single-process model loads it through model.ckpt (strict on the video branch)
    cfg = load_config(RECIPE, [f"model.ckpt={out / 'checkpoint_0.pth'}"])
    torch.manual_seed(42)  # the seed train.py builds with: same random frozen parts
    loaded = VideoLLAMA.from_config(cfg.model)
    torch.manual_seed(42)
    initial = VideoLLAMA.from_config(OmegaConf.merge(cfg.model, {"ckpt": ""}))
    changed = 0
    for k, v in ckpt["model"].items():
        assert torch.equal(loaded.state_dict()[k], v), k
        changed += int(not torch.equal(initial.state_dict()[k], v))
    assert changed > 0  # the run did train
