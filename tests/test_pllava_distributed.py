"""PLLaVA under DeepSpeed ZeRO-3 with CPU offload (2 gloo processes): a few steps of the tiny recipe, and the
checkpoint (parameters gathered from their partitions) loads into a plain single-process model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from videollm.checkpoint import load_file
from videollm.config import load_config
from videollm.models.pllava import PLLaVA
from videollm.runners.metrics import read_log

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "train_configs/pllava_tiny_synthetic.yaml"


@pytest.mark.slow
def test_zero3_two_processes_train_and_checkpoint_loads(tmp_path):
    # the 13B/34B recipes' file: ZeRO-3, parameters and optimizer state offloaded to the CPU
    # (bf16 and pinned memory are CUDA matters: dropped here)
    shipped = json.loads((REPO / "train_configs/pllava_zero3_offload.json").read_text())
    shipped.pop("bf16")
    zero = shipped["zero_optimization"]
    for key in ("offload_optimizer", "offload_param"):
        zero[key]["pin_memory"] = False
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "cpu"
    ds_cfg = tmp_path / "zero3.json"
    ds_cfg.write_text(json.dumps({**shipped, "steps_per_print": 1000}))
    out = tmp_path / "z3"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), "--cfg-path", str(RECIPE), "--options", f"run.output_dir={out}",
           "run.iters_per_epoch=3", "run.batch_size_train=2", "run.num_workers=0", "run.log_freq=1",
           "run.warmup_steps=1", f"run.deepspeed_config={ds_cfg}"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ZeRO stage 3" in proc.stderr + proc.stdout
    records = read_log(out)
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert all(r["loss"] is not None and r["loss"] > 0 for r in records)
    ckpt = load_file(out / "checkpoint_0.pth")["model"]
    assert all(v.numel() > 0 for v in ckpt.values())  # gathered, not the empty ZeRO-3 partitions
    cfg = load_config(RECIPE, [f"model.ckpt={out / 'checkpoint_0.pth'}"])
    loaded = PLLaVA.from_config(cfg.model)
    own = loaded.state_dict()
    assert set(ckpt) == set(own)
    for k, v in ckpt.items():
        assert torch.equal(own[k], v), k
    torch.manual_seed(42)  # train.py's seed: the initial weights of the run
    initial = PLLaVA.from_config(load_config(RECIPE, []).model).state_dict()
    changed = {k for k in ckpt if not torch.equal(initial[k], ckpt[k])}
    assert any(".lora_" in k for k in changed) and any(k.startswith("multi_modal_projector.") for k in changed)
    assert not any(k.startswith("vision_tower.") for k in changed)  # frozen
