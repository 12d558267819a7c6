"""``accelerate launch`` as an alternative to torchrun: two CPU processes (gloo) under accelerate
give the same per-iteration losses as the same run under torchrun (train.py reads RANK,
WORLD_SIZE and LOCAL_RANK, which both launchers set; see docs/launchers.md)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from videollm.runners.metrics import read_log

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import NO_DROPOUT, RECIPE, REPO, _env  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(launcher, out: Path, data: Path) -> None:
    cmd = launcher + [
        str(REPO / "train.py"), "--cfg-path", str(RECIPE), "--options", f"run.output_dir={out}",
        f"datasets.webvid.build_info.anno_dir={data / 'webvid/train'}",
        f"datasets.webvid.build_info.videos_dir={data / 'videos'}", "run.log_freq=1", "run.num_workers=0",
        "run.max_epoch=1", "run.iters_per_epoch=3", "run.batch_size_train=2", *NO_DROPOUT]
    proc = subprocess.run(cmd, env=_env(), cwd=out.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_accelerate_launch_equals_torchrun(tmp_path, synthetic_root):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(_free_port())]
    a, b = tmp_path / "torchrun", tmp_path / "accelerate"
    _run(torchrun, a, synthetic_root)
    _run(accelerate, b, synthetic_root)
    la, lb = read_log(a), read_log(b)
    assert len(la) == len(lb) == 3
    for ra, rb in zip(la, lb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6), (ra, rb)
        assert rb["num_tokens"] == ra["num_tokens"] and rb["lr"] == ra["lr"]
    assert (b / "checkpoint_0.pth").is_file()
