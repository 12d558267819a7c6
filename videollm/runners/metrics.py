"""Training metrics: ``log.jsonl`` (one JSON object per logged step), experiment trackers, curves.

``run.report_to`` (a list; ``run.tensorboard: true`` is the same as naming ``tensorboard``) adds
trackers beside the jsonl log: ``tensorboard`` (events under ``output_dir/tensorboard``) and
``wandb`` (a run under ``output_dir/wandb``, project ``run.wandb_project``; ``WANDB_MODE=offline``
writes it locally without a network, to upload later with ``wandb sync``; without ``WANDB_MODE``
and without ``WANDB_API_KEY`` it runs offline too). At the end of training (``close``),
``output_dir/curves.png`` plots the loss and the learning rate of ``log.jsonl`` (matplotlib,
Agg backend; ``run.plot_curves: false`` turns it off).

Only rank 0 writes. Each line holds at least ``iteration`` (global, 0-based), ``epoch``,
``loss`` (that iteration's loss, averaged over all ranks weighted by supervised tokens; ``null``
when non-finite), ``lr``, ``samples_per_s``, ``tokens_per_s`` (LLM sequence tokens, all ranks)
and ``data_wait_fraction`` (share of the wall time since the previous line spent waiting for
data). On resume, lines at or after the resumed iteration are dropped first, so the file of a
resumed run reads like that of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"
CURVES_NAME = "curves.png"
TRACKERS = ("tensorboard", "wandb")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends records to ``output_dir/log.jsonl`` (and TensorBoard when asked and installed)."""

    def __init__(self, output_dir: os.PathLike | str, enabled: bool = True, tensorboard: bool = False,
                 report_to: Sequence[str] = (), config: Optional[Dict[str, Any]] = None,
                 wandb_project: str = "videollm", plot_curves: bool = False) -> None:
        from videollm.errors import ConfigError

        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOG_NAME
        self.enabled = enabled
        self.plot_curves = plot_curves
        trackers = [str(t).lower() for t in (report_to or [])]
        for name in trackers:
            if name not in TRACKERS:
                raise ConfigError(f"run.report_to: {name!r} is unknown; choose from {list(TRACKERS)}")
        tensorboard = tensorboard or "tensorboard" in trackers
        self.tb = None
        self.wandb = None
        if enabled and "wandb" in trackers:
            self.wandb = _start_wandb(self.output_dir, wandb_project, config)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            except Exception as exc:  # noqa: BLE001 - the package is optional
                logger.warning("run.tensorboard is true but TensorBoard is unavailable (%s); "
                               "pip install tensorboard. Logging to %s only", exc, self.path)

    def truncate_from(self, iteration: int) -> None:
        """Drop the lines whose ``iteration`` is >= ``iteration`` (a resumed run redoes them)."""
        if not self.enabled or not self.path.is_file():
            return
        keep: List[str] = []
        dropped = 0
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a kill
                dropped += 1
                continue
            if int(rec.get("iteration", -1)) >= iteration:
                dropped += 1
            else:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, self.path)
        if dropped:
            logger.info("%s: dropped %d line(s) from iteration %d on (redone after resume)", self.path, dropped, iteration)

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {k: _clean(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            step = int(record["iteration"])
            for key, value in record.items():
                if key not in ("iteration", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            scalars = {f"train/{k}": v for k, v in record.items() if k not in ("iteration",)
                       and isinstance(v, (int, float)) and math.isfinite(v)}
            self.wandb.log(scalars, step=int(record["iteration"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.enabled and self.plot_curves and self.path.is_file():
            try:
                plot_curves(self.output_dir)
            except Exception as exc:  # noqa: BLE001 - a plot must never fail a finished run
                logger.warning("could not write %s: %s", self.output_dir / CURVES_NAME, exc)


def _start_wandb(output_dir: Path, project: str, config: Optional[Dict[str, Any]]):
    """A wandb run in ``output_dir/wandb``; offline unless WANDB_MODE or an API key says otherwise."""
    from videollm.errors import ConfigError

    try:
        import wandb
    except ImportError:
        raise ConfigError("run.report_to: wandb needs the wandb package (pip install wandb, or make setup)") from None
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    output_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, dir=str(output_dir), mode=mode, config=config or {}, name=output_dir.name,
                     reinit="finish_previous")
    logger.info("wandb run %s (%s mode) in %s", run.id, mode, output_dir / "wandb")
    return run


def plot_curves(output_dir: os.PathLike | str) -> Path:
    """``output_dir/curves.png``: loss (top) and learning rate (bottom) against the iteration, from
    ``log.jsonl`` (non-finite losses, logged as null, are left out). Returns the file."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    records = read_log(output_dir)
    its = [r["iteration"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    pts = [(r["iteration"], r["loss"]) for r in records if r.get("loss") is not None]
    if pts:
        ax_loss.plot(*zip(*pts), color="tab:blue")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(its, [r.get("lr") for r in records], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(Path(output_dir).name)
    fig.tight_layout()
    out = Path(output_dir) / CURVES_NAME
    tmp = out.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def read_log(output_dir: os.PathLike | str) -> List[Dict[str, Any]]:
    """All records of a run's ``log.jsonl``."""
    path = Path(output_dir) / LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_rate(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.1f}"
