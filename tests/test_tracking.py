"""Experiment tracking: ``run.report_to: [tensorboard, wandb]`` beside log.jsonl (wandb offline,
no network) and the loss / learning-rate curves PNG written at the end of training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_contract import make_runner, run_cfg, tokenizer_dir  # noqa: E402,F401 - fixture reused

from videollm.errors import ConfigError  # noqa: E402
from videollm.runners.metrics import MetricsWriter, plot_curves, read_log  # noqa: E402


@pytest.mark.slow
def test_report_to_tensorboard_and_offline_wandb_and_curves(tmp_path, tokenizer_dir, synthetic_root, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "run"
    cfg = run_cfg(out, tokenizer_dir, synthetic_root, report_to=["tensorboard", "wandb"], init_lr=3e-3,
                  min_lr=1e-4, warmup_steps=2, warmup_lr=1e-4, lr_sched="linear_warmup_cosine_lr")
    make_runner(cfg).train()
    log = read_log(out)
    assert len(log) == 4

    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events, list(out.iterdir())
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert [e.step for e in acc.Scalars("train/loss")] == [r["iteration"] for r in log]
    assert losses == pytest.approx([r["loss"] for r in log], rel=1e-6)

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    data = list(runs[0].glob("run-*.wandb"))
    assert data and data[0].stat().st_size > 0

    png = out / "curves.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as img:
        assert img.size[0] > 300 and img.size[1] > 200


def test_curves_png_and_unknown_tracker(tmp_path):
    w = MetricsWriter(tmp_path, plot_curves=True)
    for i in range(5):
        w.write({"iteration": i, "epoch": 0, "loss": float("nan") if i == 2 else 3.0 - i * 0.5, "lr": 1e-4 * (i + 1)})
    w.close()
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert read_log(tmp_path)[2]["loss"] is None  # the non-finite loss is left out of the plot
    assert plot_curves(tmp_path) == tmp_path / "curves.png"
    with pytest.raises(ConfigError, match="report_to.*'mlflow'"):
        MetricsWriter(tmp_path, report_to=["mlflow"])
