"""Training metrics: ``log.jsonl`` (one JSON object per logged step), optional TensorBoard.

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
from typing import Any, Dict, List, Optional

logger = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends records to ``output_dir/log.jsonl`` (and TensorBoard when asked and installed)."""

    def __init__(self, output_dir: os.PathLike | str, enabled: bool = True, tensorboard: bool = False) -> None:
        self.path = Path(output_dir) / LOG_NAME
        self.enabled = enabled
        self.tb = None
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

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_log(output_dir: os.PathLike | str) -> List[Dict[str, Any]]:
    """All records of a run's ``log.jsonl``."""
    path = Path(output_dir) / LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_rate(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.1f}"
